//! A group's volumes as its VM gets them: persistent ones as disks for the
//! VMM (checked against the other running groups' claims), and all of them
//! as the agent's sandbox volumes.

use base64::Engine;
use capsa_api::{ApiError, ErrorCode, GroupSpec};
use capsa_protocol::agent::{volume, BlockDevice, EmptyDir, Secret, SecretFile, Volume};
use capsa_vmm_config::DiskConfig;
use capsa_volumes::VolumeStore;

use crate::errors::{error, volume_error};

/// What the VMM and the agent get for a group's volumes.
#[derive(Debug, Default)]
pub struct VolumePlan {
    /// The VMM's disks.
    pub disks: Vec<DiskConfig>,
    pub sandbox: Vec<Volume>,
}

/// The disk serial of the group's `index`th persistent volume (virtio-blk
/// serials hold 20 bytes).
fn serial(index: usize) -> String {
    format!("capsa-vol{index}")
}

/// Plans `spec`'s volumes; `running` are the other running groups' specs.
/// A persistent volume given a size is created when missing. One attached
/// read-write to a running group cannot be attached to another, nor can
/// one attached anywhere be attached read-write.
pub fn plan(
    store: &VolumeStore,
    spec: &GroupSpec,
    running: &[GroupSpec],
) -> Result<VolumePlan, ApiError> {
    let mut plan = VolumePlan::default();
    for group_volume in &spec.volumes {
        let source = if let Some(empty) = &group_volume.empty_dir {
            volume::Source::EmptyDir(EmptyDir {
                size_limit_bytes: empty.size_mib.unwrap_or(0) << 20,
                ..Default::default()
            })
        } else if let Some(files) = &group_volume.secret {
            let mut secret = Secret::default();
            for (path, content) in files {
                let content = base64::engine::general_purpose::STANDARD
                    .decode(content)
                    .map_err(|_| {
                        error(
                            ErrorCode::InvalidSpec,
                            format!("secret {}: {path} is not base64", group_volume.name),
                        )
                    })?;
                secret.files.push(SecretFile {
                    path: path.clone(),
                    content,
                    ..Default::default()
                });
            }
            volume::Source::Secret(secret)
        } else if let Some(persistent) = &group_volume.persistent {
            let name = &persistent.volume;
            for other in running {
                let claim = other
                    .volumes
                    .iter()
                    .filter_map(|v| v.persistent.as_ref())
                    .find(|p| &p.volume == name);
                if let Some(claim) = claim {
                    if !claim.read_only || !persistent.read_only {
                        return Err(error(
                            ErrorCode::Conflict,
                            format!(
                                "volume {name:?} is attached {} to running group {:?}; it can be shared only read-only",
                                if claim.read_only { "read-only" } else { "read-write" },
                                other.name
                            ),
                        ));
                    }
                }
            }
            let image = match (store.image(name), persistent.size_mib) {
                (Ok(image), _) => image,
                (Err(capsa_volumes::VolumeError::NotFound(_)), Some(size)) => {
                    store.create(name, size).map_err(volume_error)?;
                    store.image(name).map_err(volume_error)?
                }
                (Err(e), _) => return Err(volume_error(e)),
            };
            let serial = serial(plan.disks.len());
            plan.disks.push(DiskConfig::at(
                image,
                persistent.read_only,
                Some(serial.clone()),
            ));
            volume::Source::Block(BlockDevice {
                serial,
                fstype: "ext4".into(),
                read_only: persistent.read_only,
                ..Default::default()
            })
        } else {
            continue;
        };
        plan.sandbox.push(Volume {
            name: group_volume.name.clone(),
            source: Some(source),
            ..Default::default()
        });
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> GroupSpec {
        GroupSpec::parse(text).unwrap()
    }

    #[test]
    fn volumes_become_disks_and_sandbox_volumes_and_claims_are_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let store = VolumeStore::open(dir.path()).unwrap();
        let group = spec(
            r#"{"name":"a","volumes":[
                {"name":"cache","emptyDir":{"sizeMib":4}},
                {"name":"creds","secret":{"token":"czNjcmV0"}},
                {"name":"data","persistent":{"volume":"data","sizeMib":16}}],
              "containers":[{"name":"c","image":"busybox"}]}"#,
        );
        let plan = plan(&store, &group, &[]).unwrap();
        assert_eq!(plan.disks.len(), 1);
        assert!(
            plan.disks[0].path.ends_with("data/disk.ext4"),
            "{:?}",
            plan.disks
        );
        assert_eq!(plan.disks[0].id.as_deref(), Some("capsa-vol0"));
        assert!(store.get("data").is_ok(), "made on first use");
        let kinds: Vec<String> = plan
            .sandbox
            .iter()
            .map(|v| match &v.source {
                Some(volume::Source::EmptyDir(e)) => {
                    format!("{}:empty:{}", v.name, e.size_limit_bytes)
                }
                Some(volume::Source::Secret(s)) => {
                    format!(
                        "{}:secret:{}",
                        v.name,
                        String::from_utf8_lossy(&s.files[0].content)
                    )
                }
                Some(volume::Source::Block(b)) => format!("{}:block:{}", v.name, b.serial),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "cache:empty:4194304",
                "creds:secret:s3cret",
                "data:block:capsa-vol0"
            ]
        );

        // Read-write in a running group: nobody else may attach it.
        let other = spec(
            r#"{"name":"b","volumes":[{"name":"d","persistent":{"volume":"data","readOnly":true}}],
              "containers":[{"name":"c","image":"busybox"}]}"#,
        );
        let refused = super::plan(&store, &other, std::slice::from_ref(&group)).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Conflict);
        assert!(
            refused
                .message
                .contains("read-write to running group \"a\""),
            "{refused:?}"
        );
        // Read-only next to read-only is fine.
        assert!(super::plan(&store, &other, std::slice::from_ref(&other)).is_ok());

        let missing = spec(
            r#"{"name":"c","volumes":[{"name":"d","persistent":{"volume":"nope"}}],
              "containers":[{"name":"c","image":"busybox"}]}"#,
        );
        let error = super::plan(&store, &missing, &[]).unwrap_err();
        assert_eq!(error.code, ErrorCode::NotFound);
        assert!(
            error.message.contains("capsa volume create nope"),
            "{error:?}"
        );
    }
}
