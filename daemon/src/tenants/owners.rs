//! Which tenant made each group, volume and network, in `owners.json`
//! under capsad's root. An object the admin made has no entry. Entries
//! outlive their objects until the next create of that name (which always
//! writes the creator, the admin included), so a tenant still gets the
//! events of its group's deletion.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Group,
    Volume,
    Network,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Table {
    #[serde(default)]
    groups: BTreeMap<String, String>,
    #[serde(default)]
    volumes: BTreeMap<String, String>,
    #[serde(default)]
    networks: BTreeMap<String, String>,
}

impl Table {
    fn of(&mut self, kind: Kind) -> &mut BTreeMap<String, String> {
        match kind {
            Kind::Group => &mut self.groups,
            Kind::Volume => &mut self.volumes,
            Kind::Network => &mut self.networks,
        }
    }
}

#[derive(Debug)]
pub struct Owners {
    path: PathBuf,
    table: Mutex<Table>,
}

impl Owners {
    /// Reads `owners.json` under `root`; a missing file is an empty table.
    /// A damaged one is an error: starting without it would hand every
    /// tenant's objects to the admin alone, silently.
    pub fn open(root: &Path) -> std::io::Result<Owners> {
        let path = root.join("owners.json");
        let table = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Table::default(),
            Err(e) => return Err(e),
        };
        Ok(Owners {
            path,
            table: Mutex::new(table),
        })
    }

    pub fn owner(&self, kind: Kind, name: &str) -> Option<String> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.of(kind).get(name).cloned()
    }

    /// Records who made `name`: a tenant, or the admin (None).
    pub fn set(&self, kind: Kind, name: &str, tenant: Option<&str>) -> std::io::Result<()> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let before = table.clone();
        match tenant {
            Some(tenant) => table.of(kind).insert(name.to_string(), tenant.to_string()),
            None => table.of(kind).remove(name),
        };
        if let Err(e) = self.save(&table) {
            *table = before;
            return Err(e);
        }
        Ok(())
    }

    /// Forgets the entries of objects that are gone (at start).
    pub fn retain(&self, kind: Kind, exists: impl Fn(&str) -> bool) -> std::io::Result<()> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let before = table.of(kind).len();
        table.of(kind).retain(|name, _| exists(name));
        if table.of(kind).len() != before {
            self.save(&table)?;
        }
        Ok(())
    }

    fn save(&self, table: &Table) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(table).map_err(std::io::Error::other)?;
        let temporary = self.path.with_extension("json.new");
        std::fs::write(&temporary, text)?;
        std::fs::rename(&temporary, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_survive_a_restart_and_the_admin_has_no_entry() {
        let root = tempfile::tempdir().unwrap();
        let owners = Owners::open(root.path()).unwrap();
        owners.set(Kind::Group, "web", Some("alice")).unwrap();
        owners.set(Kind::Volume, "web", Some("bob")).unwrap();
        owners.set(Kind::Network, "n", Some("alice")).unwrap();
        let again = Owners::open(root.path()).unwrap();
        assert_eq!(again.owner(Kind::Group, "web").as_deref(), Some("alice"));
        assert_eq!(again.owner(Kind::Volume, "web").as_deref(), Some("bob"));
        again.set(Kind::Group, "web", None).unwrap();
        assert_eq!(again.owner(Kind::Group, "web"), None);
        again.retain(Kind::Network, |_| false).unwrap();
        let third = Owners::open(root.path()).unwrap();
        assert_eq!(third.owner(Kind::Network, "n"), None);
        assert_eq!(third.owner(Kind::Volume, "web").as_deref(), Some("bob"));
    }

    #[test]
    fn a_damaged_table_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("owners.json"), b"{not json").unwrap();
        assert!(Owners::open(root.path()).is_err());
    }
}
