//! The VMM boots the guest kernel and the agent: 1 and 2 vCPUs reach the
//! agent's ready line with their CPU count and memory and the VMM exits
//! 0 at power-off; a guest panic exits with the panic status and text.

use std::time::Duration;

use anyhow::{bail, ensure, Result};

use crate::suite::Suite;
use crate::vm::{self, Artifacts, Run, PANIC_STATUS};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const MEMORY_MIB: u64 = 128;

fn boot(artifacts: &Artifacts, cpus: u8, cmdline: &str) -> Result<Run> {
    let args = capsa_vmm_config::VmmArgs {
        cmdline: cmdline.to_string(),
        ..artifacts.vm(cpus, MEMORY_MIB)
    };
    let command = artifacts.command_in(None, &artifacts.vmm(), &args.to_args()?);
    let run = vm::run(command, BOOT_TIMEOUT)?;
    if let Some(fault) = run.fault() {
        return Err(fault.into());
    }
    Ok(run)
}

pub fn run(suite: &mut Suite, artifacts: &Artifacts) {
    for cpus in [1u8, 2] {
        let name = format!("boot-{cpus}cpu");
        let checks = [
            format!("{name}: the VMM exits 0 at power-off"),
            format!("{name}: the ready line reports {cpus} CPUs"),
            format!("{name}: MemTotal fits {MEMORY_MIB} MiB"),
        ];
        if !checks.iter().any(|c| suite.wants(c)) {
            continue;
        }
        let run = boot(artifacts, cpus, "quiet capsa.exit_after_ready=1");
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                let detail = format!("{e:#}");
                suite.check(&checks[0], || Err(e));
                for check in &checks[1..] {
                    suite.verdict(check, false, format!("no boot: {detail}"));
                }
                continue;
            }
        };
        suite.verdict(
            &checks[0],
            run.status == Some(0),
            format!("status {:?}; {}", run.status, run.tail(5)),
        );
        let ready = run.ready();
        suite.verdict(
            &checks[1],
            ready.is_some_and(|r| r.cpus == u64::from(cpus)),
            format!("{ready:?}"),
        );
        // MemTotal leaves out the kernel image and early allocations, but
        // most of the RAM must be there.
        let mib = ready.map(|r| r.mem_total_kib / 1024);
        suite.verdict(
            &checks[2],
            mib.is_some_and(|m| (MEMORY_MIB * 3 / 4..MEMORY_MIB).contains(&m)),
            format!("MemTotal {mib:?} MiB"),
        );
    }
    suite.check(
        "panic: the VMM exits with the panic status and its text",
        || {
            let run = boot(
                artifacts,
                1,
                "quiet rdinit=/does-not-exist root=/dev/nothing",
            )?;
            ensure!(
                run.status == Some(PANIC_STATUS),
                "status {:?}: {}",
                run.status,
                run.tail(10)
            );
            // The VMM's own report carries the console's tail.
            if !run.stderr.contains("Kernel panic - not syncing") {
                bail!("no panic text in the VMM's report: {}", run.tail(10));
            }
            Ok("status 2 with the panic text".into())
        },
    );
}
