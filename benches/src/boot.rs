use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::stats::{cell, Summary};

const READY_PREFIX: &str = "CAPSA_READY ";
const GUEST_CMDLINE: &str = "quiet capsa.exit_after_ready=1";

#[derive(clap::Args)]
pub struct BootArgs {
    /// The capsa-vmm binary.
    #[arg(long)]
    vmm: PathBuf,
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: PathBuf,
    /// QEMU to boot the same guest with `-M microvm` for comparison.
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// Directory with QEMU's firmware (bios-microvm.bin), passed as `-L`.
    #[arg(long)]
    qemu_data_dir: Option<PathBuf>,
    /// Boots per runner.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
    /// Give up on one boot after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// More runners: NAME=PARAMS, capsa-vmm with these kernel parameters
    /// added (to try what a trimmed command line saves). Repeatable.
    #[arg(long = "variant")]
    variants: Vec<String>,
    /// Boot once more with `initcall_debug` and print where the kernel's
    /// time went: its slowest initcalls and when it ran /init.
    #[arg(long)]
    profile: bool,
    /// Where to write the JSON results.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Where one boot's kernel time went, from its console with
/// `initcall_debug`.
#[derive(Serialize)]
struct Profile {
    /// The kernel's clock when it ran /init.
    init_at_ms: Option<f64>,
    /// The slowest initcalls, slowest first: (name, milliseconds).
    slowest_initcalls: Vec<(String, f64)>,
    /// All initcalls together.
    initcalls_ms: f64,
}

/// Reads `initcall X+0x.. returned 0 after N usecs` lines and the
/// `[ seconds] Run /init` line.
fn profile_of(console: &str) -> Profile {
    let mut calls: Vec<(String, f64)> = console
        .lines()
        .filter_map(|line| {
            let rest = line.split("initcall ").nth(1)?;
            let name = rest.split('+').next()?.trim().to_string();
            let usecs: f64 = rest
                .split(" after ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((name, usecs / 1000.0))
        })
        .collect();
    let initcalls_ms = calls.iter().map(|(_, ms)| ms).sum();
    calls.sort_by(|a, b| b.1.total_cmp(&a.1));
    calls.truncate(15);
    let init_at_ms = console
        .lines()
        .find(|l| l.contains("Run /init as init process"))
        .and_then(|l| l.split(']').next())
        .and_then(|t| t.trim_start_matches('[').trim().parse::<f64>().ok())
        .map(|s| s * 1000.0);
    Profile {
        init_at_ms,
        slowest_initcalls: calls,
        initcalls_ms,
    }
}

#[derive(Serialize)]
struct RunnerResult {
    runner: String,
    runs: usize,
    wall_ms: Option<Summary>,
    ready_uptime_ms: Option<Summary>,
}

#[derive(Serialize)]
struct Report<'a> {
    benchmark: &'static str,
    kernel: &'a Path,
    cpus: u8,
    memory_mib: u64,
    results: Vec<RunnerResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    profile: Option<Profile>,
}

struct Sample {
    wall_ms: f64,
    ready_uptime_ms: Option<f64>,
}

fn boot_once(command: Command, timeout: Duration) -> Result<Sample> {
    let finished = crate::process::run(command, timeout)?.success()?;
    let wall_ms = finished.wall.as_secs_f64() * 1000.0;
    let output = finished.stdout;
    let ready_uptime_ms = output
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(READY_PREFIX))
        .and_then(|json| serde_json::from_str::<serde_json::Value>(json).ok())
        .and_then(|v| v.get("uptime_ms").and_then(|u| u.as_f64()));
    if ready_uptime_ms.is_none() {
        bail!("no ready line in the guest output:\n{output}");
    }
    Ok(Sample {
        wall_ms,
        ready_uptime_ms,
    })
}

/// The id the jailed runs take (capsad's range starts at 900000).
const JAIL_ID: u32 = 899_999;

fn capsa_args(args: &BootArgs) -> capsa_vmm_config::VmmArgs {
    capsa_vmm_config::VmmArgs {
        cmdline: GUEST_CMDLINE.to_string(),
        ..crate::process::vmm_args(&args.kernel, &args.initrd, args.cpus, args.memory_mib)
    }
}

fn qemu_command(qemu: &Path, args: &BootArgs) -> Command {
    let mut c = Command::new(qemu);
    c.args([
        "-M",
        "microvm,acpi=on,pit=on,pic=off,rtc=off",
        "-enable-kvm",
        "-cpu",
        "host",
    ])
    .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
    .args(["-serial", "stdio", "-smp"])
    .arg(args.cpus.to_string())
    .arg("-m")
    .arg(args.memory_mib.to_string())
    .arg("-kernel")
    .arg(&args.kernel)
    .arg("-initrd")
    .arg(&args.initrd)
    .arg("-append")
    .arg(format!("console=ttyS0 reboot=k panic=-1 {GUEST_CMDLINE}"));
    if let Some(dir) = &args.qemu_data_dir {
        c.arg("-L").arg(dir);
    }
    c
}

fn measure(
    name: &str,
    runs: usize,
    timeout: Duration,
    make: impl Fn() -> Command,
) -> Result<RunnerResult> {
    let mut wall = Vec::with_capacity(runs);
    let mut uptime = Vec::with_capacity(runs);
    for run in 0..runs {
        let sample =
            boot_once(make(), timeout).with_context(|| format!("{name}, boot {}", run + 1))?;
        wall.push(sample.wall_ms);
        uptime.extend(sample.ready_uptime_ms);
    }
    Ok(RunnerResult {
        runner: name.to_string(),
        runs,
        wall_ms: Summary::of(&wall),
        ready_uptime_ms: Summary::of(&uptime),
    })
}

pub fn run(args: &BootArgs) -> Result<()> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let argv = capsa_args(args).to_args()?;
    let unfiltered = capsa_vmm_config::VmmArgs {
        seccomp: capsa_vmm_config::Seccomp::Off,
        ..capsa_args(args)
    }
    .to_args()?;
    // As capsad runs it: jailed (a fresh empty root each boot) and
    // filtered.
    let jails = tempfile::tempdir()?;
    let boots = std::cell::Cell::new(0);
    let mut results = vec![measure("capsa-vmm, jailed", args.runs, timeout, || {
        boots.set(boots.get() + 1);
        let root = jails.path().join(boots.get().to_string());
        let jailed = std::fs::create_dir(&root)
            .map_err(anyhow::Error::from)
            .and_then(|()| {
                Ok(capsa_vmm_config::VmmArgs {
                    jail: Some(capsa_vmm_config::JailConfig {
                        root,
                        uid: JAIL_ID,
                        gid: JAIL_ID,
                    }),
                    ..capsa_args(args)
                }
                .to_args()?)
            });
        let mut c = Command::new(&args.vmm);
        // An unusable argument fails the boot, and says why.
        c.args(jailed.unwrap_or_else(|e| vec![format!("--jail-failed={e}").into()]));
        c
    })?];
    results.push(measure("capsa-vmm", args.runs, timeout, || {
        let mut c = Command::new(&args.vmm);
        c.args(&argv);
        c
    })?);
    // The price of the jail and the seccomp filter (target: at most 5%).
    results.push(measure(
        "capsa-vmm, no jail, --seccomp off",
        args.runs,
        timeout,
        || {
            let mut c = Command::new(&args.vmm);
            c.args(&unfiltered);
            c
        },
    )?);
    for variant in &args.variants {
        let Some((name, params)) = variant.split_once('=') else {
            bail!("--variant {variant}: expected NAME=PARAMS");
        };
        let argv = capsa_vmm_config::VmmArgs {
            cmdline: format!("{GUEST_CMDLINE} {params}"),
            ..capsa_args(args)
        }
        .to_args()?;
        results.push(measure(
            &format!("capsa-vmm, {name}"),
            args.runs,
            timeout,
            || {
                let mut c = Command::new(&args.vmm);
                c.args(&argv);
                c
            },
        )?);
    }
    if let Some(qemu) = &args.qemu {
        results.push(measure("qemu -M microvm", args.runs, timeout, || {
            qemu_command(qemu, args)
        })?);
    }
    let profile = if args.profile {
        let argv = capsa_vmm_config::VmmArgs {
            cmdline: "capsa.exit_after_ready=1 initcall_debug printk.time=1 loglevel=8".into(),
            ..capsa_args(args)
        }
        .to_args()?;
        let mut c = Command::new(&args.vmm);
        c.args(&argv);
        let finished = crate::process::run(c, timeout)?.success()?;
        Some(profile_of(&finished.stdout))
    } else {
        None
    };

    println!(
        "boot to ready line and power-off, {} vCPU, {} MiB, {} runs each; median (min-max) ms",
        args.cpus, args.memory_mib, args.runs
    );
    println!("| runner | wall, process start to exit | guest uptime at ready |");
    println!("|---|---|---|");
    for r in &results {
        println!(
            "| {} | {} | {} |",
            r.runner,
            cell(&r.wall_ms),
            cell(&r.ready_uptime_ms)
        );
    }

    if let [jailed, _, bare, ..] = results.as_slice() {
        if let (Some(a), Some(b)) = (&jailed.wall_ms, &bare.wall_ms) {
            println!(
                "jail and seccomp on / off: {:.2}x (target: at most 1.05x)",
                a.median / b.median
            );
        }
    }
    if let Some(profile) = &profile {
        println!(
            "initcall_debug boot: /init at {} ms; initcalls {:.1} ms in all; the slowest:",
            profile
                .init_at_ms
                .map_or("?".to_string(), |ms| format!("{ms:.1}")),
            profile.initcalls_ms
        );
        for (name, ms) in &profile.slowest_initcalls {
            println!("  {ms:>9.2} ms  {name}");
        }
    }
    let report = Report {
        benchmark: "boot",
        kernel: &args.kernel,
        cpus: args.cpus,
        memory_mib: args.memory_mib,
        results,
        profile,
    };
    let path = args
        .json
        .clone()
        .unwrap_or_else(|| crate::default_json("boot"));
    crate::write_json(&path, &report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_is_read_from_an_initcall_debug_console() {
        let console = "\
[    0.101000] calling  pci_subsys_init+0x0/0x60 @ 1
[    0.150000] initcall pci_subsys_init+0x0/0x60 returned 0 after 49000 usecs
[    0.150100] initcall fast_one+0x0/0x10 returned 0 after 12 usecs
[    0.400000] Run /init as init process
";
        let profile = profile_of(console);
        assert_eq!(profile.init_at_ms, Some(400.0));
        assert_eq!(
            profile.slowest_initcalls[0],
            ("pci_subsys_init".into(), 49.0)
        );
        assert_eq!(profile.slowest_initcalls.len(), 2);
        assert!((profile.initcalls_ms - 49.012).abs() < 1e-9);
    }
}
