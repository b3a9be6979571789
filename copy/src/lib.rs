//! `capsa cp`'s archives, one home for both ends: the host packs what it
//! sends into a container and unpacks what it gets out of one; the guest's
//! agent does the same inside the container.
//!
//! An archive is an uncompressed tar whose entries all sit under one top
//! entry, the copied path's own name. Unpacking follows docker cp: into a
//! destination that is a directory the top entry keeps its name; otherwise
//! it takes the destination's name, in the destination's parent, which must
//! exist. What is unpacked is checked entry by entry: a relative path
//! without `..`, one top entry, regular files, directories and symbolic
//! links only (no hard links, devices or fifos), and never written through
//! a symbolic link, the archive's own or the destination's.

use std::fs;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: give a path that names a file or directory")]
    NoName(String),
    #[error("the archive is not a tar: {0}")]
    NotTar(std::io::Error),
    #[error("the archive's entry {entry:?}: {why}")]
    Refused { entry: String, why: &'static str },
    #[error("{0}: no such directory to copy into")]
    NoParent(String),
    #[error("the archive is empty")]
    Empty,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CopyError + '_ {
    move |source| CopyError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What an unpack wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    pub entries: u64,
    pub bytes: u64,
}

/// Packs `source` (a file, a directory with all it holds, or a symbolic
/// link, not followed) into `out` under its own name.
pub fn pack(source: &Path, out: impl Write) -> Result<(), CopyError> {
    let name = source
        .file_name()
        .ok_or_else(|| CopyError::NoName(source.display().to_string()))?;
    let metadata = fs::symlink_metadata(source).map_err(io(source))?;
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    if metadata.is_dir() {
        builder.append_dir_all(name, source).map_err(io(source))?;
    } else {
        builder
            .append_path_with_name(source, name)
            .map_err(io(source))?;
    }
    builder
        .into_inner()
        .map_err(io(source))?
        .flush()
        .map_err(io(source))
}

/// Where the archive's entries go: `base` joined with the entry's path,
/// its first component replaced by `rename` where given.
struct Target {
    base: PathBuf,
    rename: Option<std::ffi::OsString>,
}

/// Unpacks `archive` at `destination` by docker cp's rules (see above).
pub fn unpack(archive: impl Read, destination: &Path) -> Result<Unpacked, CopyError> {
    let target = match fs::metadata(destination) {
        Ok(metadata) if metadata.is_dir() => Target {
            base: destination.to_path_buf(),
            rename: None,
        },
        _ => {
            let name = destination
                .file_name()
                .ok_or_else(|| CopyError::NoName(destination.display().to_string()))?;
            let parent = match destination.parent() {
                Some(parent) if parent.as_os_str().is_empty() => Path::new("."),
                Some(parent) => parent,
                None => Path::new("/"),
            };
            if !fs::metadata(parent).is_ok_and(|m| m.is_dir()) {
                return Err(CopyError::NoParent(parent.display().to_string()));
            }
            Target {
                base: parent.to_path_buf(),
                rename: Some(name.to_os_string()),
            }
        }
    };
    let base = fs::canonicalize(&target.base).map_err(io(&target.base))?;
    let mut archive = tar::Archive::new(archive);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(false);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    let mut top: Option<std::ffi::OsString> = None;
    let mut done = Unpacked::default();
    for entry in archive.entries().map_err(CopyError::NotTar)? {
        let mut entry = entry.map_err(CopyError::NotTar)?;
        let raw = entry.path().map_err(CopyError::NotTar)?.into_owned();
        let shown = raw.display().to_string();
        let refuse = |why| CopyError::Refused {
            entry: shown.clone(),
            why,
        };
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            return Err(refuse(
                "only files, directories and symbolic links are copied",
            ));
        }
        let mut parts = Vec::new();
        for component in raw.components() {
            match component {
                Component::Normal(part) => parts.push(part.to_os_string()),
                Component::CurDir => {}
                _ => return Err(refuse("not a plain relative path")),
            }
        }
        let Some(first) = parts.first().cloned() else {
            return Err(refuse("an empty path"));
        };
        match &top {
            None => top = Some(first.clone()),
            Some(top) if *top != first => {
                return Err(refuse("a second top entry (one path is copied at once)"))
            }
            Some(_) => {}
        }
        if let Some(rename) = &target.rename {
            parts[0] = rename.clone();
        }
        let path: PathBuf = parts.iter().collect();
        let destination = base.join(&path);
        let parent = destination.parent().unwrap_or(&base);
        // The parent must be there already (an archive lists a directory
        // before what it holds) and, resolved, still under the base: no
        // symbolic link, the archive's or one found there, leads out.
        let resolved = fs::canonicalize(parent)
            .map_err(|_| refuse("comes before its directory, or its directory is not one"))?;
        if !resolved.starts_with(&base) {
            return Err(refuse("would be written outside the destination"));
        }
        let destination = resolved.join(destination.file_name().unwrap_or_default());
        match fs::symlink_metadata(&destination) {
            Ok(existing) if existing.is_dir() && kind.is_dir() => {}
            Ok(existing) if existing.is_dir() => return Err(refuse("would replace a directory")),
            Ok(_) => fs::remove_file(&destination).map_err(io(&destination))?,
            Err(_) => {}
        }
        done.bytes += entry.header().size().unwrap_or(0);
        entry.unpack(&destination).map_err(io(&destination))?;
        done.entries += 1;
    }
    if done.entries == 0 {
        return Err(CopyError::Empty);
    }
    Ok(done)
}

#[cfg(test)]
mod tests;
