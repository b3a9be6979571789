//! A template's disk slots. Virtio-mmio has no hotplug, so a template's VM
//! is built with a fixed row of disks, each an empty file: the read-only
//! ones (image layers) first, then the writable ones (the scratch disk and
//! volumes). A clone is restored with the group's own disks in those
//! slots, and empty files in the slots it leaves; its kernel reads each
//! disk's new size from the configuration interrupt the restore raises,
//! and its serial at each ask.

use std::path::{Path, PathBuf};

use capsa_vmm_config::DiskConfig;

/// Read-only disks a template has room for: the layers of a group's
/// images.
pub const READ_ONLY_SLOTS: usize = 8;
/// Writable disks a template has room for: the scratch disk and volumes.
pub const WRITABLE_SLOTS: usize = 4;

/// The empty file of a slot left unused, in `dir`: one for every
/// read-only slot (they share it), one each for the writable ones (a
/// writable disk is locked by the VMM that has it).
fn empty(dir: &Path, read_only: bool, slot: usize) -> PathBuf {
    if read_only {
        dir.join("empty-ro")
    } else {
        dir.join(format!("empty-rw-{slot}"))
    }
}

/// Makes (or empties) the files of the unused slots in `dir`.
pub fn make_empty_disks(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let paths = std::iter::once(empty(dir, true, 0))
        .chain((0..WRITABLE_SLOTS).map(|slot| empty(dir, false, slot)));
    for path in paths {
        std::fs::File::create(path)?;
    }
    Ok(())
}

/// `disks` laid out in a template's slots, the unused ones given the empty
/// files of `dir` ([`make_empty_disks`]); None when they do not fit (the
/// group boots cold).
pub fn slotted(disks: &[DiskConfig], dir: &Path) -> Option<Vec<DiskConfig>> {
    let (read_only, writable): (Vec<&DiskConfig>, Vec<&DiskConfig>) =
        disks.iter().partition(|d| d.read_only);
    if read_only.len() > READ_ONLY_SLOTS || writable.len() > WRITABLE_SLOTS {
        return None;
    }
    let row = |kind: Vec<&DiskConfig>, slots: usize, is_read_only: bool| {
        (0..slots)
            .map(|slot| match kind.get(slot) {
                Some(disk) => (*disk).clone(),
                None => DiskConfig::at(empty(dir, is_read_only, slot), is_read_only, None),
            })
            .collect::<Vec<_>>()
    };
    let mut row_of_disks = row(read_only, READ_ONLY_SLOTS, true);
    row_of_disks.extend(row(writable, WRITABLE_SLOTS, false));
    Some(row_of_disks)
}

/// The slots of a template's own VM: every one empty.
pub fn all_empty(dir: &Path) -> Vec<DiskConfig> {
    slotted(&[], dir).unwrap_or_default()
}
