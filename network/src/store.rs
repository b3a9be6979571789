//! The networks users created, one record each at `ROOT/NAME.json`
//! (written to a temporary file, synced, then renamed), so that a restarted
//! daemon builds the same networks again. The default network is not
//! stored: it comes from the daemon's flags.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::NetworkError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkDef {
    pub name: String,
    pub subnet: Ipv4Net,
    /// Whether its groups reach beyond the host (masqueraded).
    pub egress: bool,
    pub created_at: u64,
}

pub struct Store {
    root: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> NetworkError {
    move |source| NetworkError::Store { what, source }
}

impl Store {
    pub fn open(root: &Path) -> Result<Self, NetworkError> {
        fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    /// Every stored network; a record that cannot be read is an error
    /// that names it, never a network silently gone.
    pub fn load(&self) -> Result<Vec<NetworkDef>, NetworkError> {
        let mut defs = Vec::new();
        let entries =
            fs::read_dir(&self.root).map_err(io(format!("listing {}", self.root.display())))?;
        for entry in entries {
            let path = entry
                .map_err(io(format!("listing {}", self.root.display())))?
                .path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = fs::read(&path).map_err(io(format!("reading {}", path.display())))?;
            let def: NetworkDef =
                serde_json::from_slice(&text).map_err(|e| NetworkError::Corrupt {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            defs.push(def);
        }
        defs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(defs)
    }

    pub fn save(&self, def: &NetworkDef) -> Result<(), NetworkError> {
        let path = self.path(&def.name);
        let temp = self.root.join(format!(".{}.json.tmp", def.name));
        let text = serde_json::to_vec_pretty(def).map_err(|e| NetworkError::Store {
            what: format!("encoding network {}", def.name),
            source: e.into(),
        })?;
        let write = || -> std::io::Result<()> {
            let mut file = fs::File::create(&temp)?;
            file.write_all(&text)?;
            file.sync_all()?;
            fs::rename(&temp, &path)?;
            fs::File::open(&self.root)?.sync_all()
        };
        write().map_err(io(format!("writing {}", path.display())))
    }

    pub fn remove(&self, name: &str) -> Result<(), NetworkError> {
        let path = self.path(name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io(format!("removing {}", path.display()))(e))
            }
            _ => Ok(()),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.json"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_and_a_corrupt_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let def = NetworkDef {
            name: "blue".into(),
            subnet: "10.89.3.0/24".parse().unwrap(),
            egress: false,
            created_at: 5,
        };
        store.save(&def).unwrap();
        assert_eq!(store.load().unwrap(), vec![def]);
        store.remove("blue").unwrap();
        store.remove("blue").unwrap();
        assert!(store.load().unwrap().is_empty());
        fs::write(dir.path().join("red.json"), b"{").unwrap();
        let error = store.load().unwrap_err().to_string();
        assert!(error.contains("red.json"), "{error}");
    }
}
