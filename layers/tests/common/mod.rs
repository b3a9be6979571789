//! The tar layers the tests build, hostile ones included.
#![allow(dead_code)]

use std::io::Write;

use tar::{EntryType, Header};

/// One tar entry, with raw names so hostile paths can be written (the tar
/// crate's own setters refuse them).
pub struct Entry {
    pub name: Vec<u8>,
    pub kind: EntryType,
    pub data: Vec<u8>,
    pub link: Vec<u8>,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub device: (u32, u32),
    pub pax: Vec<(String, Vec<u8>)>,
}

pub fn entry(name: &str, kind: EntryType) -> Entry {
    Entry {
        name: name.as_bytes().to_vec(),
        kind,
        data: Vec::new(),
        link: Vec::new(),
        mode: if kind == EntryType::Directory {
            0o755
        } else {
            0o644
        },
        uid: 0,
        gid: 0,
        mtime: 1_600_000_000,
        device: (0, 0),
        pax: Vec::new(),
    }
}

pub fn file(name: &str, data: &[u8]) -> Entry {
    Entry {
        data: data.to_vec(),
        ..entry(name, EntryType::Regular)
    }
}

pub fn dir(name: &str) -> Entry {
    entry(name, EntryType::Directory)
}

pub fn symlink(name: &str, target: &str) -> Entry {
    Entry {
        link: target.as_bytes().to_vec(),
        ..entry(name, EntryType::Symlink)
    }
}

pub fn hard_link(name: &str, target: &str) -> Entry {
    Entry {
        link: target.as_bytes().to_vec(),
        ..entry(name, EntryType::Link)
    }
}

pub fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for e in entries {
        if !e.pax.is_empty() {
            builder
                .append_pax_extensions(e.pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .unwrap();
        }
        let mut header = Header::new_ustar();
        header.as_old_mut().name[..e.name.len()].copy_from_slice(&e.name);
        header.as_old_mut().linkname[..e.link.len()].copy_from_slice(&e.link);
        header.set_entry_type(e.kind);
        header.set_size(e.data.len() as u64);
        header.set_mode(e.mode);
        header.set_uid(e.uid);
        header.set_gid(e.gid);
        header.set_mtime(e.mtime);
        header.set_device_major(e.device.0).unwrap();
        header.set_device_minor(e.device.1).unwrap();
        header.set_cksum();
        builder.append(&header, e.data.as_slice()).unwrap();
    }
    builder.into_inner().unwrap()
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Appends to the archive `tar` (ending it again) a file `name` holding
/// "long", with its name in a GNU long-name record: for names past
/// ustar's 100 bytes.
pub fn append_long_name(tar: &mut Vec<u8>, name: &str, mtime: u64) {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = Header::new_gnu();
    header.set_size(4);
    header.set_mode(0o644);
    header.set_entry_type(EntryType::Regular);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(mtime);
    builder
        .append_data(&mut header, name, &b"long"[..])
        .unwrap();
    tar.truncate(tar.len() - 1024); // drop the end-of-archive blocks
    tar.extend(builder.into_inner().unwrap());
}
