//! `--snapshot-to` and `--restore-from`: the descriptors a VMM writes a
//! snapshot to, or restores one from. Descriptors rather than paths, so
//! that a jailed VMM (whose root is empty) can use them and only whoever
//! started it can open the files.

use std::str::FromStr;

use crate::device::parse_fd;
use crate::ArgError;

/// `--snapshot-to control=N,state=N,memory=N`: a byte read on `control`
/// (one end of a socket pair) makes the VMM pause the guest, write its
/// state to `state` and its memory to `memory`, answer on `control`
/// (`ok` or `error: WHY`, one line) and end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotTo {
    pub control: i32,
    pub state: i32,
    pub memory: i32,
}

/// `--restore-from state=N,memory=N`: the VM is not booted but restored
/// from a snapshot's state and memory (mapped copy-on-write, so that the
/// clones of one snapshot share its pages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreFrom {
    pub state: i32,
    pub memory: i32,
}

/// Reads `key=N` options into `slots`, each named once.
fn descriptors<const N: usize>(
    spec: &str,
    device: &'static str,
    keys: [&'static str; N],
    expected: &'static str,
) -> Result<[i32; N], ArgError> {
    let mut found = [None; N];
    for option in spec.split(',') {
        let (key, value) = option.split_once('=').unwrap_or((option, ""));
        let slot = keys
            .iter()
            .position(|k| *k == key)
            .filter(|&i| found[i].is_none())
            .ok_or_else(|| ArgError::UnknownOption {
                device,
                option: option.to_string(),
                expected,
            })?;
        found[slot] = Some(parse_fd(value)?);
    }
    let mut fds = [0; N];
    for (i, fd) in found.into_iter().enumerate() {
        fds[i] = fd.ok_or(ArgError::Missing(keys[i]))?;
    }
    Ok(fds)
}

impl FromStr for SnapshotTo {
    type Err = ArgError;

    fn from_str(spec: &str) -> Result<Self, ArgError> {
        let [control, state, memory] = descriptors(
            spec,
            "--snapshot-to",
            ["control", "state", "memory"],
            "control=N, state=N and memory=N, each once",
        )?;
        Ok(SnapshotTo {
            control,
            state,
            memory,
        })
    }
}

impl SnapshotTo {
    pub fn to_arg(&self) -> String {
        format!(
            "control={},state={},memory={}",
            self.control, self.state, self.memory
        )
    }

    pub fn fds(&self) -> [i32; 3] {
        [self.control, self.state, self.memory]
    }
}

impl FromStr for RestoreFrom {
    type Err = ArgError;

    fn from_str(spec: &str) -> Result<Self, ArgError> {
        let [state, memory] = descriptors(
            spec,
            "--restore-from",
            ["state", "memory"],
            "state=N and memory=N, each once",
        )?;
        Ok(RestoreFrom { state, memory })
    }
}

impl RestoreFrom {
    pub fn to_arg(&self) -> String {
        format!("state={},memory={}", self.state, self.memory)
    }

    pub fn fds(&self) -> [i32; 2] {
        [self.state, self.memory]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_form_round_trips() {
        let to = SnapshotTo {
            control: 5,
            state: 6,
            memory: 7,
        };
        assert_eq!(to.to_arg().parse::<SnapshotTo>(), Ok(to));
        let from = RestoreFrom {
            state: 8,
            memory: 9,
        };
        assert_eq!(from.to_arg().parse::<RestoreFrom>(), Ok(from));
    }

    #[test]
    fn a_missing_twice_named_or_bad_descriptor_is_refused() {
        assert_eq!(
            "state=5".parse::<RestoreFrom>(),
            Err(ArgError::Missing("memory"))
        );
        assert!(matches!(
            "state=5,state=6,memory=7".parse::<RestoreFrom>(),
            Err(ArgError::UnknownOption { .. })
        ));
        assert_eq!(
            "state=1,memory=7".parse::<RestoreFrom>(),
            Err(ArgError::BadFd("1".into()))
        );
        assert!(matches!(
            "control=5,state=6".parse::<SnapshotTo>(),
            Err(ArgError::Missing("memory"))
        ));
    }
}
