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
        let mut taken: Vec<u32> = used
            .into_iter()
            .filter(|id| self.contains(*id))
            .collect();
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

#[cfg(test)]
mod tests {
    use super::*;

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
