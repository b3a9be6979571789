//! A scratch directory a benchmark removes when it is done.

use std::path::PathBuf;

use anyhow::{Context, Result};

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("capsa-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The directory a benchmark works in: the one given, or a temporary one
/// (kept alive by the returned guard).
pub fn scratch(given: &Option<PathBuf>) -> Result<(Option<TempDir>, PathBuf)> {
    match given {
        Some(dir) => Ok((None, dir.clone())),
        None => {
            let temp = TempDir::new()?;
            let path = temp.0.clone();
            Ok((Some(temp), path))
        }
    }
}
