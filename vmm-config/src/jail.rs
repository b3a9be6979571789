//! `--jail ROOT,uid=U,gid=G`: where and as whom the VMM confines itself
//! before the guest runs.

use std::path::PathBuf;
use std::str::FromStr;

use crate::device::{field, split, ArgError};

/// The VMM's jail: an empty directory that becomes its root, and the
/// unprivileged user and group it runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailConfig {
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

impl JailConfig {
    pub fn to_arg(&self) -> Result<String, ArgError> {
        Ok(format!(
            "{},uid={},gid={}",
            field("jail directory", self.root.as_os_str())?,
            self.uid,
            self.gid
        ))
    }
}

impl FromStr for JailConfig {
    type Err = ArgError;

    fn from_str(spec: &str) -> Result<Self, ArgError> {
        let (root, options) = split(spec, "the jail directory")?;
        let (mut uid, mut gid) = (None, None);
        for option in options {
            let id = |text: &str| {
                text.parse::<u32>()
                    .ok()
                    .filter(|id| *id != 0)
                    .ok_or_else(|| ArgError::BadId(text.to_string()))
            };
            match option.split_once('=') {
                Some(("uid", text)) => uid = Some(id(text)?),
                Some(("gid", text)) => gid = Some(id(text)?),
                _ => {
                    return Err(ArgError::UnknownOption {
                        device: "jail",
                        option: option.to_string(),
                        expected: "uid=N or gid=N",
                    })
                }
            }
        }
        Ok(JailConfig {
            root: PathBuf::from(root),
            uid: uid.ok_or(ArgError::Missing("the jail's uid=N"))?,
            gid: gid.ok_or(ArgError::Missing("the jail's gid=N"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jail_round_trips_and_root_is_refused() {
        let jail = JailConfig {
            root: "/run/capsa/g/jail".into(),
            uid: 900001,
            gid: 900001,
        };
        assert_eq!(jail.to_arg().unwrap().parse::<JailConfig>(), Ok(jail));
        assert_eq!(
            "/j,uid=0,gid=5".parse::<JailConfig>(),
            Err(ArgError::BadId("0".into()))
        );
        assert_eq!(
            "/j,uid=5".parse::<JailConfig>(),
            Err(ArgError::Missing("the jail's gid=N"))
        );
    }
}
