//! The user and group ids jails run as: one per VM from a range the
//! operator sets aside, so two tenants' VMMs never share an id.

/// `count` ids from `first` (uid and gid alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub first: u32,
    pub count: u32,
}

/// Far above the ids of people and system users, and of the usual
/// subordinate ranges given to rootless containers.
pub const DEFAULT_IDS: IdRange = IdRange {
    first: 900_000,
    count: 65_536,
};

impl IdRange {
    /// The lowest id of the range that is not in `used`.
    pub fn lowest_free(&self, used: impl IntoIterator<Item = u32>) -> Option<u32> {
        let mut taken: Vec<u32> = used.into_iter().filter(|id| self.contains(*id)).collect();
        taken.sort_unstable();
        taken.dedup();
        let mut candidate = self.first;
        for id in taken {
            if id != candidate {
                break;
            }
            candidate = candidate.checked_add(1)?;
        }
        self.contains(candidate).then_some(candidate)
    }

    pub fn contains(&self, id: u32) -> bool {
        id >= self.first && u64::from(id) < u64::from(self.first) + u64::from(self.count)
    }
}

/// Ids handed out by processes that keep no shared record (one
/// containerd shim per sandbox): each id taken is a file in a directory,
/// made exclusively, naming the directory of what holds it. A claim whose
/// holder's directory is gone was left by a process that died, and is
/// taken over.
pub struct Claims {
    pub dir: std::path::PathBuf,
    pub range: IdRange,
}

impl Claims {
    /// Claims the lowest free id of the range for `holder`.
    pub fn claim(&self, holder: &std::path::Path) -> std::io::Result<u32> {
        use std::io::Write;
        std::fs::create_dir_all(&self.dir)?;
        let last = u64::from(self.range.first) + u64::from(self.range.count);
        for id in u64::from(self.range.first)..last {
            let id = id as u32;
            let path = self.dir.join(id.to_string());
            for _ in 0..2 {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                {
                    Ok(mut file) => {
                        file.write_all(holder.as_os_str().as_encoded_bytes())?;
                        return Ok(id);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let held_by = std::fs::read(&path).unwrap_or_default();
                        let held_by = std::path::PathBuf::from(
                            String::from_utf8_lossy(&held_by).into_owned(),
                        );
                        if held_by.as_os_str().is_empty() || held_by.exists() {
                            break;
                        }
                        let _ = std::fs::remove_file(&path);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Err(std::io::Error::other(format!(
            "all {} jail ids from {} are taken",
            self.range.count, self.range.first
        )))
    }

    pub fn release(&self, id: u32) {
        let _ = std::fs::remove_file(self.dir.join(id.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_exclusive_released_and_taken_over_from_the_dead() {
        let dir = tempfile::tempdir().unwrap();
        let claims = Claims {
            dir: dir.path().join("ids"),
            range: IdRange {
                first: 10,
                count: 2,
            },
        };
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        assert_eq!(claims.claim(&a).unwrap(), 10);
        assert_eq!(claims.claim(&b).unwrap(), 11);
        assert!(claims.claim(&a).is_err(), "the range is used up");
        claims.release(10);
        assert_eq!(claims.claim(&b).unwrap(), 10);
        std::fs::remove_dir(&b).unwrap();
        // b's holder is gone: both its ids are free again.
        assert_eq!(claims.claim(&a).unwrap(), 10);
    }

    #[test]
    fn the_lowest_free_id_fills_gaps_and_runs_out() {
        let range = IdRange {
            first: 100,
            count: 3,
        };
        assert_eq!(range.lowest_free([]), Some(100));
        assert_eq!(range.lowest_free([100, 102, 7]), Some(101));
        assert_eq!(range.lowest_free([101, 100]), Some(102));
        assert_eq!(range.lowest_free([100, 101, 102]), None);
        assert!(!range.contains(103) && !range.contains(99));
    }
}
