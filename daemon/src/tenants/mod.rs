//! Tenants: who calls capsad over its TLS listener, what each owns, and
//! how much each may hold.
//!
//! - `Tenants`: the tenants file (names, bearer token digests, quotas) and
//!   authentication;
//! - `owners`: which tenant made each group, volume and network (kept on
//!   disk beside the groups);
//! - `access`: what a caller may see and touch, and the quota checks.
//!
//! The Unix socket is the host's admin: it sees everything and has no
//! quota. A tenant sees only what it made; anything else answers as if it
//! did not exist.

pub mod access;
pub mod owners;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// What one tenant may hold at once; no limit where not given.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Quota {
    /// Groups, in any state.
    pub groups: Option<u64>,
    /// vCPUs of all its groups' VMs together.
    pub vcpus: Option<u64>,
    /// Memory of all its groups' VMs together.
    pub memory_mib: Option<u64>,
    /// Sizes of all its persistent volumes together.
    pub volume_mib: Option<u64>,
}

#[derive(Debug)]
pub struct Tenant {
    pub name: String,
    token_sha256: [u8; 32],
    pub quota: Quota,
}

impl Tenant {
    /// A tenant no token names and nothing is owned by.
    pub fn nobody() -> Tenant {
        Tenant {
            name: String::new(),
            token_sha256: [0; 32],
            quota: Quota::default(),
        }
    }
}

/// Who is calling: the host's admin (the Unix socket) or a tenant.
#[derive(Debug, Clone)]
pub enum Caller {
    Admin,
    Tenant(Arc<Tenant>),
}

impl Caller {
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Caller::Admin => None,
            Caller::Tenant(tenant) => Some(&tenant.name),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TenantsError {
    #[error("reading the tenants file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the tenants file {path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    #[serde(default)]
    tenant: Vec<TenantEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct TenantEntry {
    name: String,
    /// SHA-256 of the tenant's bearer token, in hex (`printf %s TOKEN |
    /// sha256sum`): the file never holds a token itself.
    token_sha256: String,
    #[serde(default)]
    quota: Quota,
}

/// The tenants of the TLS listener, by name.
#[derive(Debug, Default)]
pub struct Tenants {
    by_name: BTreeMap<String, Arc<Tenant>>,
}

impl Tenants {
    pub fn load(path: &Path) -> Result<Tenants, TenantsError> {
        let text = std::fs::read_to_string(path).map_err(|source| TenantsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Tenants::parse(&text).map_err(|message| TenantsError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Tenants, String> {
        let file: TenantsFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut tenants = Tenants::default();
        for (i, entry) in file.tenant.into_iter().enumerate() {
            let at = format!("tenant[{i}]");
            if !capsa_api::spec::valid_name(&entry.name) {
                return Err(format!(
                    "{at}.name: {:?} is not a valid name (lowercase letters, digits and '-')",
                    entry.name
                ));
            }
            let digest = hex::decode(entry.token_sha256.trim())
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .ok_or_else(|| {
                    format!("{at}.token-sha256: not 64 hex digits (printf %s TOKEN | sha256sum)")
                })?;
            if tenants.by_name.values().any(|t| t.token_sha256 == digest) {
                return Err(format!("{at}.token-sha256: another tenant has this token"));
            }
            let tenant = Tenant {
                name: entry.name.clone(),
                token_sha256: digest,
                quota: entry.quota,
            };
            if tenants
                .by_name
                .insert(entry.name.clone(), Arc::new(tenant))
                .is_some()
            {
                return Err(format!("{at}.name: {:?} is given twice", entry.name));
            }
        }
        Ok(tenants)
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The tenant whose token this is. Digests are compared in full, in
    /// constant time, so that the answer's timing tells nothing of them.
    pub fn authenticate(&self, token: &str) -> Option<Arc<Tenant>> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for tenant in self.by_name.values() {
            let difference = tenant
                .token_sha256
                .iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if difference == 0 {
                found = Some(Arc::clone(tenant));
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    #[test]
    fn a_token_names_its_tenant_and_nothing_else_does() {
        let text = format!(
            "[[tenant]]\nname = \"alice\"\ntoken-sha256 = \"{}\"\n[tenant.quota]\ngroups = 2\nmemory-mib = 1024\n\n[[tenant]]\nname = \"bob\"\ntoken-sha256 = \"{}\"\n",
            digest("alice-secret"),
            digest("bob-secret")
        );
        let tenants = Tenants::parse(&text).unwrap();
        let alice = tenants.authenticate("alice-secret").unwrap();
        assert_eq!(alice.name, "alice");
        assert_eq!(alice.quota.groups, Some(2));
        assert_eq!(alice.quota.memory_mib, Some(1024));
        assert_eq!(alice.quota.vcpus, None);
        assert_eq!(tenants.authenticate("bob-secret").unwrap().name, "bob");
        assert!(tenants.authenticate("").is_none());
        assert!(tenants.authenticate("alice-secret ").is_none());
        assert!(tenants.authenticate(&digest("alice-secret")).is_none());
    }

    #[test]
    fn a_bad_file_is_refused_with_the_field_named() {
        let bad_digest = "[[tenant]]\nname = \"alice\"\ntoken-sha256 = \"abc\"\n";
        assert!(Tenants::parse(bad_digest)
            .unwrap_err()
            .contains("tenant[0].token-sha256"));
        let bad_name = format!(
            "[[tenant]]\nname = \"Alice\"\ntoken-sha256 = \"{}\"\n",
            digest("x")
        );
        assert!(Tenants::parse(&bad_name)
            .unwrap_err()
            .contains("tenant[0].name"));
        let twice = format!(
            "[[tenant]]\nname = \"a\"\ntoken-sha256 = \"{}\"\n[[tenant]]\nname = \"a\"\ntoken-sha256 = \"{}\"\n",
            digest("x"),
            digest("y")
        );
        assert!(Tenants::parse(&twice).unwrap_err().contains("given twice"));
        let shared = format!(
            "[[tenant]]\nname = \"a\"\ntoken-sha256 = \"{0}\"\n[[tenant]]\nname = \"b\"\ntoken-sha256 = \"{0}\"\n",
            digest("x")
        );
        assert!(Tenants::parse(&shared)
            .unwrap_err()
            .contains("another tenant"));
        let unknown = "[[tenant]]\nname = \"a\"\ntoken = \"x\"\n";
        assert!(Tenants::parse(unknown).is_err());
    }
}
