//! A container's OCI seccomp profile (`linux.seccomp`: what Kubernetes'
//! RuntimeDefault and Localhost profiles become) compiled into BPF with
//! seccompiler and installed on each of the container's processes just
//! before it becomes its program.
//!
//! An OCI profile gives each syscall its own action, while a seccompiler
//! filter has one action on match and one on mismatch. The profile is
//! therefore compiled into a stack of filters, which the kernel runs
//! together, taking the action of highest precedence:
//! - a base filter: every syscall the profile names with an action other
//!   than its default (under the syscall's argument conditions) is allowed,
//!   anything else gets the default action;
//! - one filter per other action: those syscalls get it, the rest are
//!   allowed.
//!
//! A call a rule matches thus meets its rule's action and otherwise
//! allow; a call no rule matches meets the default. What cannot be honoured
//! here (a user-space notifier, an unknown flag) is refused by name;
//! syscalls this architecture does not have are skipped, as runc does.

use std::collections::BTreeMap;
use std::str::FromStr;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use syscalls::Sysno;

/// The errno of `SCMP_ACT_ERRNO` when the profile gives none.
const DEFAULT_ERRNO: u32 = libc::EPERM as u32;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: {0} cannot be honoured in a Capsa guest")]
    Unsupported(String),
    #[error("seccomp: {0}")]
    Invalid(String),
}

/// A compiled profile: the filters to stack, in order, and the flags to
/// install them with.
#[derive(Debug)]
pub struct Filters {
    programs: Vec<BpfProgram>,
    flags: libc::c_ulong,
}

/// Rules by syscall number; `None` matches the syscall whatever its arguments.
type Rules = BTreeMap<i64, Option<Vec<SeccompRule>>>;

/// Compiles `profile` for this (x86_64) guest.
pub fn compile(profile: &LinuxSeccomp) -> Result<Filters, SeccompError> {
    if profile.listener_path().is_some() {
        return Err(SeccompError::Unsupported(
            "a listener (listenerPath: a user-space notifier on the host)".into(),
        ));
    }
    let archs = profile.architectures().clone().unwrap_or_default();
    if !archs.is_empty()
        && !archs
            .iter()
            .any(|a| matches!(a, Arch::ScmpArchX86_64 | Arch::ScmpArchNative))
    {
        return Err(SeccompError::Unsupported(
            "a profile without SCMP_ARCH_X86_64 (the guest's architecture)".into(),
        ));
    }
    let mut flags: libc::c_ulong = 0;
    for flag in profile.flags().iter().flatten() {
        flags |= match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            // The container's process is single-threaded when its filter goes on.
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
        };
    }
    let default = action(
        profile.default_action(),
        profile.default_errno_ret(),
        "defaultAction",
    )?;

    // Rules by action, the default's own left out (they change nothing).
    let mut by_action: Vec<(SeccompAction, Rules)> = Vec::new();
    let mut base = Rules::new();
    for (i, syscall) in profile.syscalls().iter().flatten().enumerate() {
        let wanted = action(
            syscall.action(),
            syscall.errno_ret(),
            &format!("syscalls[{i}].action"),
        )?;
        if wanted == default {
            continue;
        }
        let rules = rules_of(syscall.args().as_deref().unwrap_or_default())
            .map_err(|e| SeccompError::Invalid(format!("syscalls[{i}]: {e}")))?;
        let slot = match by_action.iter().position(|(a, _)| *a == wanted) {
            Some(at) => at,
            None => {
                by_action.push((wanted.clone(), Rules::new()));
                by_action.len() - 1
            }
        };
        for name in syscall.names() {
            // Unknown here (another architecture's, or newer than this
            // table): nothing can call it, so nothing to filter.
            let Ok(number) = Sysno::from_str(name) else {
                continue;
            };
            let number = i64::from(number.id());
            add(&mut by_action[slot].1, number, &rules);
            add(&mut base, number, &rules);
        }
    }

    let arch = TargetArch::x86_64;
    let build = |rules: Rules, mismatch: SeccompAction, matched: SeccompAction| {
        // seccompiler's empty chain matches whatever the arguments.
        let rules = rules
            .into_iter()
            .map(|(number, chain)| (number, chain.unwrap_or_default()))
            .collect();
        SeccompFilter::new(rules, mismatch, matched, arch)
            .and_then(BpfProgram::try_from)
            .map_err(|e| SeccompError::Invalid(e.to_string()))
    };
    let mut programs = Vec::new();
    if default != SeccompAction::Allow {
        programs.push(build(base, default.clone(), SeccompAction::Allow)?);
    }
    for (wanted, rules) in by_action {
        if wanted != SeccompAction::Allow && !rules.is_empty() {
            programs.push(build(rules, SeccompAction::Allow, wanted)?);
        }
    }
    Ok(Filters { programs, flags })
}

/// Adds `new` for `number`: `None` is unconditional, and wins over any
/// conditional rules the syscall also has.
fn add(rules: &mut Rules, number: i64, new: &Option<Vec<SeccompRule>>) {
    match (rules.get_mut(&number), new) {
        (None, _) => {
            rules.insert(number, new.clone());
        }
        (Some(entry), None) => *entry = None,
        (Some(Some(entry)), Some(new)) => entry.extend(new.iter().cloned()),
        (Some(None), Some(_)) => {}
    }
}

/// The seccompiler rules of one OCI syscall entry's conditions: all of
/// them together, or, where one argument is named more than once (which
/// one rule cannot express), each on its own, as runc reads them.
fn rules_of(args: &[LinuxSeccompArg]) -> Result<Option<Vec<SeccompRule>>, String> {
    if args.is_empty() {
        return Ok(None);
    }
    let conditions = args.iter().map(condition).collect::<Result<Vec<_>, _>>()?;
    let mut indices: Vec<usize> = args.iter().map(|a| a.index()).collect();
    indices.sort_unstable();
    indices.dedup();
    let rules = if indices.len() == args.len() {
        vec![SeccompRule::new(conditions).map_err(|e| e.to_string())?]
    } else {
        conditions
            .into_iter()
            .map(|c| SeccompRule::new(vec![c]).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?
    };
    Ok(Some(rules))
}

fn condition(arg: &LinuxSeccompArg) -> Result<SeccompCondition, String> {
    let index = u8::try_from(arg.index())
        .ok()
        .filter(|&i| i < 6)
        .ok_or_else(|| format!("argument index {} is not 0 to 5", arg.index()))?;
    let (operator, value) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        // libseccomp: (arg & value) == valueTwo.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            SeccompCmpOp::MaskedEq(arg.value()),
            arg.value_two().unwrap_or(0),
        ),
    };
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, operator, value)
        .map_err(|e| e.to_string())
}

fn action(
    wanted: LinuxSeccompAction,
    errno: Option<u32>,
    field: &str,
) -> Result<SeccompAction, SeccompError> {
    Ok(match wanted {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(errno.unwrap_or(DEFAULT_ERRNO)),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno.unwrap_or(0)),
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SeccompError::Unsupported(format!(
                "{field} SCMP_ACT_NOTIFY (a user-space notifier)"
            )))
        }
    })
}

impl Filters {
    /// How many filters the profile stacks (none for an allow-all one).
    pub fn len(&self) -> usize {
        self.programs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.programs.is_empty()
    }

    /// Installs the filters on the calling thread. Without no_new_privs
    /// this needs CAP_SYS_ADMIN, so the caller installs them before it
    /// drops its capabilities.
    pub fn install(&self) -> std::io::Result<()> {
        for program in &self.programs {
            let prog = libc::sock_fprog {
                len: u16::try_from(program.len()).map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "a seccomp filter over 65535 instructions",
                    )
                })?,
                filter: program.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: seccompiler's sock_filter is repr(C) with the
            // kernel's layout, as libc's is; `prog` points at `program`,
            // which outlives the call, and the kernel copies the filter
            // before it returns.
            let status = unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    self.flags,
                    &prog as *const libc::sock_fprog,
                )
            };
            if status != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_runtime_default_like_profile_stacks_a_filter_per_action() {
        let filters = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 1,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": ["read", "write", "landlock_create_ruleset", "not_a_syscall"],
                 "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 2114060288, "valueTwo": 0,
                           "op": "SCMP_CMP_MASKED_EQ"}]},
                {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
                {"names": ["mount"], "action": "SCMP_ACT_ERRNO"}
            ]
        })))
        .unwrap();
        // The base (default EPERM) and ENOSYS; mount's EPERM is the default's.
        assert_eq!(filters.len(), 2);
    }

    #[test]
    fn an_allow_all_profile_installs_nothing() {
        let filters = compile(&profile(
            serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW"}),
        ))
        .unwrap();
        assert!(filters.is_empty());
    }

    #[test]
    fn what_cannot_be_honoured_is_named() {
        let cases = [
            (
                serde_json::json!({"defaultAction": "SCMP_ACT_NOTIFY"}),
                "SCMP_ACT_NOTIFY",
            ),
            (
                serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
                                   "listenerPath": "/run/seccomp-agent.sock"}),
                "listenerPath",
            ),
            (
                serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
                                   "architectures": ["SCMP_ARCH_AARCH64"]}),
                "SCMP_ARCH_X86_64",
            ),
            (
                serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                    {"names": ["kill"], "action": "SCMP_ACT_ERRNO",
                     "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}),
                "syscalls[0]: argument index 6",
            ),
        ];
        for (json, named) in cases {
            let err = compile(&profile(json)).unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
        }
    }
}
