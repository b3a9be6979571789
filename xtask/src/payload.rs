//! The payload of a run: the static binaries, the kernel and initramfs,
//! the images and disks the suites use, in one directory; and running
//! capsa-e2e on it, here or in the nested outer machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};
use capsa_e2e::report::Progress;

use crate::E2eArgs;

/// What the outer machine's busybox init leaves to the payload: the
/// native programs' libraries where the loader looks, cgroup v2 for
/// containerd's tasks, terminals for `script`, the /etc/hosts and
/// /etc/resolv.conf containerd's CRI plugin copies into each pod, and
/// iptables' extensions where iptables looks (for CNI's portmap).
const NESTED_SETUP: &str =
    "mkdir -p /lib/x86_64-linux-gnu /lib64 /run /var/run /sys/fs/cgroup /dev/pts /etc
[ -e /etc/hosts ] || echo '127.0.0.1 localhost' > /etc/hosts
[ -e /etc/resolv.conf ] || : > /etc/resolv.conf
cp lib/* /lib/x86_64-linux-gnu/
ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2
mount -t cgroup2 none /sys/fs/cgroup
mount -t devpts -o ptmxmode=0666 devpts /dev/pts
if [ -d xtables ]; then mkdir -p /usr/lib/x86_64-linux-gnu && cp -r xtables /usr/lib/x86_64-linux-gnu/; fi
if [ -d locale ]; then mkdir -p /usr/lib/locale && cp -r locale/* /usr/lib/locale/; fi
";

/// After the suites: the system calls the VMMs' seccomp filters refused
/// (the kernel's audit records, type 1326), counted by thread name and
/// syscall number, for whoever reads a failed run's log.
const NESTED_AFTER: &str = "echo '=== seccomp refusals (count, thread, syscall number):'
dmesg | grep -a type=1326 | sed -e 's/.*comm=//' -e 's/ exe=.*syscall=/ /' -e 's/ compat.*//' | sort | uniq -c
";

/// The longest one outer machine may run (a full run took about 2100 s
/// nested on 2026-12-01).
const MAX_OUTER_SECS: u64 = 3000;

pub struct Payload {
    root: PathBuf,
    dir: PathBuf,
    /// This host's KVM is PVM: the suites run in the nested outer machine.
    nested: bool,
}

/// Whether a suite to run pulls from a registry on loopback (Debian's
/// docker-registry serving the payload's registry-data).
fn wants_registry(args: &E2eArgs) -> bool {
    args.wants_suite("images") || args.wants_suite("cri")
}

/// Runs a script of the repository's, returning its stdout (its stderr
/// shows as it comes).
fn script(root: &Path, name: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(root.join(name))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {name}"))?;
    ensure!(output.status.success(), "{name} failed ({})", output.status);
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// `text` as one word of sh.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

impl Payload {
    pub fn build(args: &E2eArgs) -> Result<Payload> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("the workspace root")?
            .to_path_buf();
        let kernel = match &args.kernel {
            Some(kernel) => kernel.clone(),
            None => script(&root, "guest-kernel/build.sh", &[])?.into(),
        };
        let initrd = match &args.initrd {
            Some(initrd) => initrd.clone(),
            None => script(&root, "rootfs/build.sh", &[])?.into(),
        };
        eprintln!("xtask e2e: building the static binaries");
        let bin = PathBuf::from(script(
            &root,
            "scripts/build-static.sh",
            &[
                "capsa-e2e",
                "capsa-vmm",
                "capsa-io-probe",
                "capsa-daemon",
                "capsa-cli",
                "containerd-shim-capsa-v2",
            ],
        )?);
        let dir = root.join("target/e2e/payload");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        for program in [
            "capsa-e2e",
            "capsa-proc-probe",
            "capsa-vmm-fake",
            "capsa-vmm",
            "capsa-io-probe",
            "capsad",
            "capsa",
        ] {
            copy(&bin.join(program), &dir.join(program))?;
        }
        // containerd finds the shim on PATH, and the shim capsa-vmm beside it.
        std::fs::create_dir_all(dir.join("bin"))?;
        for program in ["containerd-shim-capsa-v2", "capsa-vmm"] {
            copy(&bin.join(program), &dir.join("bin").join(program))?;
        }
        copy(&kernel, &dir.join("vmlinux"))?;
        copy(&initrd, &dir.join("initramfs.cpio"))?;
        eprintln!("xtask e2e: building the images");
        // The devices suite's guest: the probe as init, busybox for ping.
        let probe = format!(
            "{}=bin/capsa-io-probe",
            bin.join("capsa-io-probe").display()
        );
        let probe_initrd = dir.join("probe-initramfs.cpio");
        script(
            &root,
            "rootfs/build.sh",
            &[
                "--add",
                &probe,
                "--add",
                "/bin/busybox=bin/busybox",
                path(&probe_initrd)?,
            ],
        )?;
        script(
            &root,
            "scripts/busybox-image.sh",
            &[path(&dir.join("busybox-oci"))?],
        )?;
        // The same image as an OCI archive, for `ctr image import`.
        let tar = Command::new("tar")
            .arg("-cf")
            .arg(dir.join("busybox.tar"))
            .arg("-C")
            .arg(dir.join("busybox-oci"))
            .arg(".")
            .status()?;
        ensure!(tar.success(), "packing busybox.tar");
        // A real-size image for the images suite (built once, cached).
        if args.wants_suite("images") {
            let debian = script(&root, "scripts/debian-image.sh", &[])?;
            let copied = Command::new("cp")
                .arg("-r")
                .arg(&debian)
                .arg(dir.join("debian-oci"))
                .status()?;
            ensure!(copied.success(), "copying the Debian image");
        }
        if wants_registry(args) {
            // A Docker Hub mirror's storage holding busybox, for the
            // images and cri suites' registry on loopback.
            script(
                &root,
                "scripts/registry-data.sh",
                &[
                    path(&dir.join("busybox-oci"))?,
                    path(&dir.join("registry-data"))?,
                ],
            )?;
        }
        // An empty ext4 disk for the agent suite's block volume.
        let disk = dir.join("data.img");
        std::fs::File::create(&disk)?.set_len(16 << 20)?;
        let mkfs = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&disk)
            .status()
            .context("running mkfs.ext4")?;
        ensure!(mkfs.success(), "mkfs.ext4 failed ({mkfs})");
        let nested = Command::new(root.join("scripts/kvm-is-pvm.sh"))
            .status()
            .context("running scripts/kvm-is-pvm.sh")?
            .success();
        // The suites' files (group specs, bad specs), as they are.
        let fixtures = dir.join("fixtures");
        let copied = Command::new("cp")
            .arg("-r")
            .arg(root.join("e2e/fixtures"))
            .arg(&fixtures)
            .status()?;
        ensure!(copied.success(), "copying e2e/fixtures");
        if nested {
            // The outer machine has busybox only: iproute2, curl for the
            // published ports, mkfs.ext4 for capsad's fresh disks (and no
            // other e2fsprogs tool: capsad must need none), nft for its
            // packet filter.
            for program in ["ip", "curl", "mkfs.ext4", "nft"] {
                script(
                    &root,
                    "scripts/nested-add-program.sh",
                    &[path(&dir)?, program],
                )?;
            }
            // Programs that re-execute themselves (containerd's shims,
            // runc) cannot run behind that wrapper: they and their
            // libraries are installed where the loader looks (NESTED_SETUP).
            let registry = if wants_registry(args) {
                " docker-registry"
            } else {
                ""
            };
            // The CRI suite's pod networks: Debian's CNI plugins, and
            // iptables for portmap's hostPort rules (its extensions are
            // loaded at run time: copied whole, installed by NESTED_SETUP).
            let cni = if args.wants_suite("cri") {
                let copied = Command::new("cp")
                    .args(["-r", "/usr/lib/x86_64-linux-gnu/xtables"])
                    .arg(dir.join("xtables"))
                    .status()?;
                ensure!(copied.success(), "copying iptables' extensions");
                " /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/loopback /usr/lib/cni/portmap iptables"
            } else {
                ""
            };
            // tmux (the terminal of the interactive checks) wants a UTF-8
            // locale: glibc's C.UTF-8, installed by NESTED_SETUP.
            std::fs::create_dir_all(dir.join("locale"))?;
            let copied = Command::new("cp")
                .args(["-r", "/usr/lib/locale/C.utf8"])
                .arg(dir.join("locale"))
                .status()?;
            ensure!(copied.success(), "copying the C.UTF-8 locale");
            let native = format!(
                ". {}/scripts/lib.sh && native_programs {} containerd ctr containerd-shim-runc-v2 runc crun script tmux{registry}{cni}",
                root.display(),
                dir.display()
            );
            let status = Command::new("bash").args(["-c", &native]).status()?;
            ensure!(status.success(), "copying containerd and its libraries");
        }
        Ok(Payload { root, dir, nested })
    }

    /// Whether the suites run in nested outer machines.
    pub fn nested(&self) -> bool {
        self.nested
    }

    /// capsa-e2e's arguments for a run of `suites`.
    fn e2e_args(
        &self,
        suites: &[String],
        args: &E2eArgs,
        force: Option<&str>,
        resume: &[(String, Progress)],
    ) -> Vec<String> {
        let mut argv = Vec::new();
        for (suite, at) in resume {
            argv.extend(["--resume".to_string(), format!("{suite}={}", at.to_arg())]);
        }
        for asked in &args.resume {
            if !resume
                .iter()
                .any(|(suite, _)| asked.starts_with(&format!("{suite}=")))
            {
                argv.extend(["--resume".to_string(), asked.clone()]);
            }
        }
        for suite in suites {
            argv.extend(["--suite".to_string(), suite.clone()]);
        }
        if let Some(check) = &args.check {
            argv.extend(["--check".to_string(), check.clone()]);
        }
        argv.extend(["--bulk-bytes".to_string(), args.bulk_bytes.to_string()]);
        if self.nested {
            // A microVM that stops answering now and then is the nested
            // emulation's; on real KVM none may.
            argv.extend(["--allowed-hangs".to_string(), "2".to_string()]);
        }
        if let Some(suite) = force {
            argv.extend(["--force-fault".to_string(), suite.to_string()]);
        }
        argv
    }

    /// Runs `suites` once, as run `number` (several may run at once
    /// nested); returns what capsa-e2e printed (in the nested case, the
    /// whole outer console, which has its lines among others).
    pub fn run(
        &self,
        suites: &[String],
        args: &E2eArgs,
        force: Option<&str>,
        resume: &[(String, Progress)],
        number: u32,
    ) -> Result<String> {
        let e2e_args = self.e2e_args(suites, args, force, resume);
        eprintln!(
            "xtask e2e: run {number}: {} ({})",
            suites.join(", "),
            if self.nested {
                "nested outer machine"
            } else {
                "this host's KVM"
            }
        );
        if !self.nested {
            let output = Command::new(self.dir.join("capsa-e2e"))
                .args(["--artifacts", path(&self.dir)?])
                .args(&e2e_args)
                .current_dir(&self.dir)
                .stderr(Stdio::inherit())
                .output()
                .context("running capsa-e2e")?;
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let words: Vec<String> = e2e_args.iter().map(|a| quoted(a)).collect();
        let script = format!("run-{number}.sh");
        std::fs::write(
            self.dir.join(&script),
            format!(
                "{NESTED_SETUP}./capsa-e2e --artifacts /payload --ip /payload/bin/ip {}\n{NESTED_AFTER}",
                words.join(" ")
            ),
        )?;
        let log = self.root.join(format!("target/e2e/outer-{number}.log"));
        // Capped: a full run takes about 2100 s nested, and a suite that
        // hangs past the cap (a guest capsad waits on without bound, issue
        // 16) is then run again on its own with its own budget, within
        // CI's 90 minutes, rather than holding the machine for the sum of
        // every budget.
        let timeout: u64 = (120
            + suites
                .iter()
                .map(|s| capsa_e2e::suites::budget_secs(s))
                .sum::<u64>())
        .min(MAX_OUTER_SECS);
        let status = Command::new(self.root.join("scripts/nested-kvm.sh"))
            .arg(&self.dir)
            .arg(&log)
            // The retries are this runner's, suite by suite.
            .env("CAPSA_NESTED_ATTEMPTS", "1")
            .env("CAPSA_NESTED_SCRIPT", &script)
            // capsa-e2e's heartbeat speaks every 10 s while the machine
            // runs and no soft lockup is being logged: 90 s of quiet is a
            // freeze (it was 240 s without the heartbeat's rule, about a
            // third of CI's time in one run that froze often).
            .env("CAPSA_NESTED_STALL_SECS", "90")
            // containerd's overlayfs snapshotter; tc's ingress qdisc, u32
            // filter and mirred redirect (the shim's pod networks); the
            // iptables matches and targets of CNI's portmap (hostPort), on
            // nftables.
            .env(
                "CAPSA_NESTED_MODULES",
                "fs/overlayfs/overlay net/sched/sch_ingress net/sched/cls_u32 net/sched/act_mirred \
                 net/netfilter/x_tables net/netfilter/nft_compat net/netfilter/xt_comment \
                 net/netfilter/xt_multiport net/netfilter/xt_nat net/netfilter/xt_addrtype \
                 net/netfilter/xt_mark net/netfilter/xt_MASQUERADE net/netfilter/xt_conntrack \
                 net/netfilter/xt_tcpudp",
            )
            .env("CAPSA_NESTED_TIMEOUT_SECS", timeout.to_string())
            .status()
            .context("running scripts/nested-kvm.sh")?;
        if !status.success() {
            bail!("scripts/nested-kvm.sh failed ({status})");
        }
        std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))
    }
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("a non-UTF-8 path")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_sh() {
        assert_eq!(quoted("boot-1cpu: exit 0"), "'boot-1cpu: exit 0'");
        assert_eq!(quoted("it's"), r"'it'\''s'");
    }
}
