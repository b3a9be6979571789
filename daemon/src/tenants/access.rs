//! What a caller may see and touch, and what a tenant's creates may take.
//! The HTTP layer asks here, and nowhere else, before it hands a request
//! to the daemon.

use capsa_api::{ApiError, ErrorCode, GroupSpec, GroupView, NetworkRequest};

use super::owners::Kind;
use super::{Caller, Quota, Tenant};
use crate::errors::{error, internal, network_error, no_group, volume_error};
use crate::groups::Daemon;

/// The answer for an object the caller may not see: the same, word for
/// word, as for one that does not exist.
pub fn not_found(kind: Kind, name: &str) -> ApiError {
    match kind {
        Kind::Group => no_group(name),
        Kind::Volume => volume_error(capsa_volumes::VolumeError::NotFound(name.to_string())),
        Kind::Network => network_error(capsa_network::NetworkError::NotFound(name.to_string())),
    }
}

pub fn forbidden(what: &str) -> ApiError {
    error(
        ErrorCode::Forbidden,
        format!("{what} is for the host's admin (capsad's Unix socket), not for tenants"),
    )
}

/// What a tenant holds, against which its quota is checked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub groups: u64,
    pub vcpus: u64,
    pub memory_mib: u64,
    pub volume_mib: u64,
}

impl Usage {
    fn of_group(spec: &GroupSpec) -> Usage {
        Usage {
            groups: 1,
            vcpus: u64::from(spec.cpus()),
            memory_mib: spec.memory_mib(),
            volume_mib: 0,
        }
    }

    fn plus(self, other: Usage) -> Usage {
        Usage {
            groups: self.groups.saturating_add(other.groups),
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
            volume_mib: self.volume_mib.saturating_add(other.volume_mib),
        }
    }
}

/// Refuses `held` plus `adding` where it passes `quota`, naming each limit
/// passed, what is held and what was asked.
pub fn check_quota(
    tenant: &str,
    quota: &Quota,
    held: Usage,
    adding: Usage,
) -> Result<(), ApiError> {
    let total = held.plus(adding);
    let limits = [
        (
            "groups",
            quota.groups,
            held.groups,
            adding.groups,
            total.groups,
            "",
        ),
        (
            "vcpus",
            quota.vcpus,
            held.vcpus,
            adding.vcpus,
            total.vcpus,
            "",
        ),
        (
            "memory-mib",
            quota.memory_mib,
            held.memory_mib,
            adding.memory_mib,
            total.memory_mib,
            " MiB",
        ),
        (
            "volume-mib",
            quota.volume_mib,
            held.volume_mib,
            adding.volume_mib,
            total.volume_mib,
            " MiB",
        ),
    ];
    let details: Vec<String> = limits
        .iter()
        .filter(|(_, limit, _, adding, total, _)| *adding > 0 && limit.is_some_and(|l| *total > l))
        .map(|(what, limit, held, adding, _, unit)| {
            format!(
                "{what}: {held}{unit} held and {adding}{unit} asked for, above the quota of {}{unit}",
                limit.unwrap_or_default()
            )
        })
        .collect();
    if details.is_empty() {
        return Ok(());
    }
    Err(ApiError {
        code: ErrorCode::QuotaExceeded,
        message: format!("tenant {tenant:?} would pass its quota"),
        details,
    })
}

impl Daemon {
    pub fn sees(&self, caller: &Caller, kind: Kind, name: &str) -> bool {
        match caller.tenant() {
            None => true,
            Some(tenant) => self.owners.owner(kind, name).as_deref() == Some(tenant),
        }
    }

    /// Ok where `caller` may reach `name`; the not-found answer otherwise.
    pub fn reach(&self, caller: &Caller, kind: Kind, name: &str) -> Result<(), ApiError> {
        if self.sees(caller, kind, name) {
            Ok(())
        } else {
            Err(not_found(kind, name))
        }
    }

    fn owned(&self, tenant: &str, kind: Kind, name: &str) -> bool {
        self.owners.owner(kind, name).as_deref() == Some(tenant)
    }

    fn usage(&self, tenant: &str) -> Result<Usage, ApiError> {
        let mut usage = Usage::default();
        for view in self.list() {
            if self.owned(tenant, Kind::Group, &view.name) {
                usage = usage.plus(Usage::of_group(&view.spec));
            }
        }
        for volume in self.volumes.list().map_err(volume_error)? {
            if self.owned(tenant, Kind::Volume, &volume.name) {
                usage.volume_mib = usage
                    .volume_mib
                    .saturating_add(volume.size_bytes.div_ceil(1 << 20));
            }
        }
        Ok(usage)
    }

    /// Creates a group for `caller`. A tenant's group joins the tenant's
    /// own network (named after it, made on first use) unless it names one
    /// of its networks; its persistent volumes must be its own, and those
    /// given a size that do not exist yet are made now, as its own; the
    /// whole is checked against its quota first.
    pub fn create_as(&self, caller: &Caller, mut spec: GroupSpec) -> Result<GroupView, ApiError> {
        let Caller::Tenant(tenant) = caller else {
            return self.create(spec, None);
        };
        let _one_at_a_time = self.tenancy.lock().unwrap_or_else(|e| e.into_inner());
        let held = self.usage(&tenant.name)?;
        let mut adding = Usage::of_group(&spec);
        let mut new_volumes = Vec::new();
        for persistent in spec.volumes.iter().filter_map(|v| v.persistent.as_ref()) {
            match self.volumes.get(&persistent.volume) {
                Ok(_) => self.reach(caller, Kind::Volume, &persistent.volume)?,
                Err(capsa_volumes::VolumeError::NotFound(_)) if persistent.size_mib.is_some() => {
                    let size = persistent.size_mib.unwrap_or_default();
                    adding.volume_mib = adding.volume_mib.saturating_add(size);
                    new_volumes.push((persistent.volume.clone(), size));
                }
                Err(e) => return Err(volume_error(e)),
            }
        }
        match &spec.network {
            Some(network) => self.reach(caller, Kind::Network, network)?,
            None if self.network.is_some() => {
                spec.network = Some(self.own_network(tenant)?);
            }
            None => {}
        }
        check_quota(&tenant.name, &tenant.quota, held, adding)?;
        for (name, size_mib) in new_volumes {
            self.volumes.create(&name, size_mib).map_err(volume_error)?;
            self.owners
                .set(Kind::Volume, &name, Some(&tenant.name))
                .map_err(internal)?;
        }
        self.create(spec, Some(&tenant.name))
    }

    /// The tenant's own network, made when missing.
    fn own_network(&self, tenant: &Tenant) -> Result<String, ApiError> {
        let name = tenant.name.clone();
        if self.inspect_network(&name).is_ok() {
            if !self.owned(&tenant.name, Kind::Network, &name) {
                return Err(error(
                    ErrorCode::Conflict,
                    format!(
                        "tenant {name:?}'s own network would be named {name:?}, and that name is taken: give the group a network (capsa network create)"
                    ),
                ));
            }
            return Ok(name);
        }
        self.create_network_as(
            Some(&tenant.name),
            NetworkRequest {
                name: name.clone(),
                subnet: None,
                egress: None,
            },
        )?;
        Ok(name)
    }

    /// Makes a network owned by `owner` (a tenant; None for the admin).
    pub fn create_network_as(
        &self,
        owner: Option<&str>,
        request: NetworkRequest,
    ) -> Result<capsa_api::NetworkView, ApiError> {
        let name = request.name.clone();
        let view = self.create_network(request)?;
        if let Err(e) = self.owners.set(Kind::Network, &name, owner) {
            let _ = self.remove_network(&name);
            return Err(internal(e));
        }
        Ok(view)
    }

    pub fn create_volume_as(
        &self,
        caller: &Caller,
        name: &str,
        size_mib: u64,
    ) -> Result<capsa_volumes::Volume, ApiError> {
        let _one_at_a_time = self.tenancy.lock().unwrap_or_else(|e| e.into_inner());
        if let Caller::Tenant(tenant) = caller {
            let adding = Usage {
                volume_mib: size_mib,
                ..Usage::default()
            };
            check_quota(
                &tenant.name,
                &tenant.quota,
                self.usage(&tenant.name)?,
                adding,
            )?;
        }
        let volume = self.volumes.create(name, size_mib).map_err(volume_error)?;
        if let Err(e) = self.owners.set(Kind::Volume, name, caller.tenant()) {
            let _ = self.volumes.remove(name);
            return Err(internal(e));
        }
        Ok(volume)
    }

    /// Grows a volume the caller reaches, within a tenant's quota.
    pub fn grow_volume_as(
        &self,
        caller: &Caller,
        name: &str,
        size_mib: u64,
    ) -> Result<capsa_volumes::Volume, ApiError> {
        let _one_at_a_time = self.tenancy.lock().unwrap_or_else(|e| e.into_inner());
        if let Caller::Tenant(tenant) = caller {
            let now = self.volumes.get(name).map_err(volume_error)?;
            let adding = Usage {
                volume_mib: size_mib.saturating_sub(now.size_bytes.div_ceil(1 << 20)),
                ..Usage::default()
            };
            check_quota(
                &tenant.name,
                &tenant.quota,
                self.usage(&tenant.name)?,
                adding,
            )?;
        }
        self.volumes.grow(name, size_mib).map_err(volume_error)
    }

    /// Forgets the owners of what is gone (at start).
    pub fn forget_gone_owners(&self) -> std::io::Result<()> {
        let groups: Vec<String> = self.list().into_iter().map(|g| g.name).collect();
        self.owners
            .retain(Kind::Group, |name| groups.iter().any(|g| g == name))?;
        if let Ok(volumes) = self.volumes.list() {
            self.owners
                .retain(Kind::Volume, |name| volumes.iter().any(|v| v.name == name))?;
        }
        if let Ok(networks) = self.list_networks() {
            self.owners.retain(Kind::Network, |name| {
                networks.iter().any(|n| n.name == name)
            })?;
        }
        Ok(())
    }

    /// Drops what `caller` may not see from a list of views.
    pub fn visible<T>(
        &self,
        caller: &Caller,
        kind: Kind,
        items: Vec<T>,
        name: impl Fn(&T) -> &str,
    ) -> Vec<T> {
        items
            .into_iter()
            .filter(|item| self.sees(caller, kind, name(item)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_refusal_names_each_limit_passed() {
        let quota = Quota {
            groups: Some(2),
            vcpus: Some(4),
            memory_mib: Some(2048),
            volume_mib: None,
        };
        let held = Usage {
            groups: 1,
            vcpus: 2,
            memory_mib: 1536,
            volume_mib: 50_000,
        };
        let small = Usage {
            groups: 1,
            vcpus: 1,
            memory_mib: 512,
            volume_mib: 10,
        };
        assert!(check_quota("alice", &quota, held, small).is_ok());
        let big = Usage {
            groups: 1,
            vcpus: 4,
            memory_mib: 1024,
            volume_mib: 0,
        };
        let e = check_quota("alice", &quota, held, big).unwrap_err();
        assert_eq!(e.code, ErrorCode::QuotaExceeded);
        assert_eq!(e.details.len(), 2, "{:?}", e.details);
        assert!(e.details[0].starts_with("vcpus: 2 held and 4 asked for, above the quota of 4"));
        assert!(e.details[1].starts_with("memory-mib: 1536 MiB held"));
        // What is not added is not checked: a tenant over a lowered quota
        // may still make what does not add to it.
        let over = Usage { groups: 5, ..held };
        assert!(check_quota(
            "alice",
            &quota,
            over,
            Usage {
                volume_mib: 1,
                ..Usage::default()
            }
        )
        .is_ok());
    }
}
