//! A process's user as docker resolves it: `user[:group]`, each a name or
//! a number, looked up in the container's own /etc/passwd and /etc/group
//! (read from inside its root, so a symlink there cannot point outside).
//!
//! The rules (runc's and moby's): an empty user is root. A name must be in
//! /etc/passwd; a number need not be, and then its group is 0. Without a
//! group, the user's passwd entry gives the primary group and every group
//! of /etc/group that lists the user's name is a supplementary one; with a
//! group, that group (a name that must be in /etc/group, or a number) is
//! the only one. The home directory is the passwd entry's, else `/`.

use std::fs::File;
use std::io::Read;
use std::path::Path;

/// /etc/passwd and /etc/group are read up to this much; an image's are
/// a few kilobytes.
pub const MAX_DATABASE_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, in /etc/group's order.
    pub additional_gids: Vec<u32>,
    pub home: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("unable to find user {0}: no matching entries in passwd file")]
    NoSuchUser(String),
    #[error("unable to find group {0}: no matching entries in group file")]
    NoSuchGroup(String),
    #[error("invalid user {0:?}: use user[:group], each a name or a number")]
    Invalid(String),
    #[error("reading {path}: {message}")]
    Read { path: String, message: String },
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: fields[0],
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: fields[5],
        })
    })
}

fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 || line.starts_with('#') {
            return None;
        }
        Some(GroupEntry {
            name: fields[0],
            gid: fields[2].parse().ok()?,
            members: fields[3].split(',').filter(|m| !m.is_empty()).collect(),
        })
    })
}

/// Resolves `user` against the text of /etc/passwd and /etc/group (empty
/// when the image has none).
pub fn resolve(user: &str, passwd: &str, group: &str) -> Result<ResolvedUser, UserError> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    if user.contains(char::is_whitespace) || group_part.is_some_and(|g| g.is_empty()) {
        return Err(UserError::Invalid(user.to_string()));
    }
    let user_part = if user_part.is_empty() {
        if group_part.is_some() {
            return Err(UserError::Invalid(user.to_string()));
        }
        "0"
    } else {
        user_part
    };
    let numeric: Option<u32> = user_part.parse().ok();
    let entry = passwd_entries(passwd)
        .find(|e| Some(e.uid) == numeric || (numeric.is_none() && e.name == user_part));
    let (uid, mut gid, name, home) = match (&entry, numeric) {
        (Some(e), _) => (e.uid, e.gid, Some(e.name), e.home.to_string()),
        (None, Some(uid)) => (uid, 0, None, "/".to_string()),
        (None, None) => return Err(UserError::NoSuchUser(user_part.to_string())),
    };
    let mut additional_gids = Vec::new();
    match group_part {
        Some(group_part) => {
            gid = match group_part.parse() {
                Ok(number) => number,
                Err(_) => group_entries(group)
                    .find(|g| g.name == group_part)
                    .map(|g| g.gid)
                    .ok_or_else(|| UserError::NoSuchGroup(group_part.to_string()))?,
            };
        }
        None => {
            if let Some(name) = name {
                additional_gids = group_entries(group)
                    .filter(|g| g.members.contains(&name))
                    .map(|g| g.gid)
                    .collect();
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home: if home.is_empty() { "/".into() } else { home },
    })
}

/// A user database file of the container, or "" when it has none.
pub fn read_database(path: &Path) -> Result<String, UserError> {
    let failed = |message: String| UserError::Read {
        path: path.display().to_string(),
        message,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(failed(e.to_string())),
    };
    let mut bytes = Vec::new();
    file.take(MAX_DATABASE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| failed(e.to_string()))?;
    if bytes.len() as u64 > MAX_DATABASE_BYTES {
        return Err(failed(format!("longer than {MAX_DATABASE_BYTES} bytes")));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        broken line\n\
        nohome:x:1001:1001:::/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nextra:x:2000:app,other\nwheel:x:10:root\n";

    fn resolved(user: &str) -> ResolvedUser {
        resolve(user, PASSWD, GROUP).unwrap()
    }

    fn ids(user: &str) -> (u32, u32, Vec<u32>) {
        let r = resolved(user);
        (r.uid, r.gid, r.additional_gids)
    }

    #[test]
    fn empty_is_root_with_roots_groups() {
        assert_eq!(ids(""), (0, 0, vec![10]));
        assert_eq!(resolved("").home, "/root");
    }

    #[test]
    fn a_name_takes_its_entry_and_the_groups_listing_it() {
        assert_eq!(ids("app"), (1000, 1000, vec![2000]));
        assert_eq!(resolved("app").home, "/home/app");
        assert_eq!(
            resolve("ghost", PASSWD, GROUP),
            Err(UserError::NoSuchUser("ghost".into()))
        );
    }

    #[test]
    fn a_number_need_not_be_listed() {
        assert_eq!(ids("1000"), (1000, 1000, vec![2000]));
        assert_eq!(ids("4242"), (4242, 0, vec![]));
        assert_eq!(resolved("4242").home, "/");
        assert_eq!(resolved("1001").home, "/");
    }

    #[test]
    fn a_group_given_is_the_only_group() {
        assert_eq!(ids("app:extra"), (1000, 2000, vec![]));
        assert_eq!(ids("app:77"), (1000, 77, vec![]));
        assert_eq!(ids("4242:4343"), (4242, 4343, vec![]));
        assert_eq!(
            resolve("app:ghosts", PASSWD, GROUP),
            Err(UserError::NoSuchGroup("ghosts".into()))
        );
    }

    #[test]
    fn malformed_users_are_refused() {
        for bad in [":0", "app:", "a b"] {
            assert!(
                matches!(resolve(bad, PASSWD, GROUP), Err(UserError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_image_without_databases_has_numbers_only() {
        assert_eq!(resolve("0", "", "").unwrap().home, "/");
        assert!(resolve("root", "", "").is_err());
    }

    #[test]
    fn databases_are_read_bounded_and_may_be_missing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_database(&dir.path().join("none")).unwrap(), "");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; MAX_DATABASE_BYTES as usize + 1]).unwrap();
        assert!(read_database(&big).is_err());
    }
}
