//! Group starts from templates: a clone of the template of the group's
//! shape restored in place of a boot, given fresh entropy at once (its
//! identity follows in the sandbox's setup), and a template built in the
//! background after a shape's first boot. A template that fails its
//! restore is deleted, with an event, and the group boots from its kernel.

use std::os::fd::AsFd;
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use capsa_api::GroupSpec;
use capsa_templates::Shape;
use capsa_vm_process::{self as vm, sandbox, VmSpec};

use super::{Daemon, Group};

/// How long a restored guest gets to answer before its template is given
/// up (a restore is about a second, nested).
const RESTORE_PATIENCE: Duration = Duration::from_secs(30);
/// How long a template's VM gets to boot, and then to be snapshotted.
const TEMPLATE_PATIENCE: Duration = Duration::from_secs(120);
/// The event of a template given up.
pub const TEMPLATE_FAILED: &str = "template-failed";

/// A VM restored from a template, its agent answering and reseeded.
pub(super) struct Clone {
    pub sandbox: sandbox::Sandbox,
    pub child: Child,
    pub template: String,
}

impl Daemon {
    /// The template shape of `spec`'s VM; None when it opted out, or when
    /// capsad has no templates.
    pub(super) fn template_shape(&self, spec: &GroupSpec, nic: bool) -> Option<Shape> {
        let templates = self
            .settings
            .templates
            .as_ref()
            .filter(|_| !spec.cold_boot)?;
        templates
            .shape(&self.vm, spec.cpus(), spec.memory_mib(), nic)
            .map_err(|e| tracing::warn!("group {}: no template: {e}", spec.name))
            .ok()
    }

    /// A clone of the template of `shape`, restored with `cold`'s devices
    /// and disks (in the template's slots); None when there is no such
    /// template, the disks do not fit its slots, or its restore failed.
    pub(super) fn restore_clone(
        &self,
        group: &Group,
        shape: &Shape,
        cold: &VmSpec,
        report: &mut dyn FnMut(String),
    ) -> Option<Clone> {
        let templates = self.settings.templates.as_ref()?;
        let template = templates.find(shape)?;
        let slots = group.paths.dir.join("slots");
        if let Err(e) = capsa_templates::make_empty_disks(&slots) {
            tracing::warn!("group {}: making its empty disks: {e}", group.name());
            return None;
        }
        let disks = capsa_templates::slotted(cold.disks, &slots)?;
        let give_up = |why: String| {
            group.emit(
                None,
                TEMPLATE_FAILED,
                Some(format!(
                    "template {}: {why}; it is deleted, and the microVM boots from its kernel",
                    template.id
                )),
            );
            if let Err(e) = templates.discard(&template.id) {
                tracing::warn!("{e}");
            }
            None
        };
        let (state, memory) = match template.open() {
            Ok(files) => files,
            Err(e) => return give_up(e.to_string()),
        };
        let spec = VmSpec {
            disks: &disks,
            snapshot: vm::Snapshot::From {
                state: state.as_fd(),
                memory: memory.as_fd(),
            },
            ..cold.clone()
        };
        // What fails here (a disk, the tap) fails the boot the same way,
        // which then says so: the template is not to blame.
        let (booting, mut child) = sandbox::boot(&self.vm, &spec).ok()?;
        drop((state, memory));
        report(format!(
            "restoring the microVM from template {}: {} vCPU, {} MiB (VMM pid {})",
            template.id,
            shape.cpus,
            shape.memory_mib,
            booting.pid()
        ));
        let reached = booting
            .connect(RESTORE_PATIENCE)
            .map_err(|e| format!("the restored guest did not answer: {e}"))
            .and_then(|sandbox| {
                // Before anything else: no two clones draw the same bytes.
                sandbox
                    .guest()
                    .reseed_from_host()
                    .map(|()| sandbox)
                    .map_err(|e| format!("reseeding the restored guest: {e}"))
            });
        match reached {
            Ok(sandbox) => Some(Clone {
                sandbox,
                child,
                template: template.id,
            }),
            Err(why) => {
                // Gone before the cold boot that takes its tap.
                vm::kill_and_wait(child.id(), super::start::VMM_EXIT_PATIENCE);
                let _ = child.wait();
                give_up(why)
            }
        }
    }

    /// Builds the template of `shape` in the background, unless it is kept
    /// already, being built, or was given up.
    pub(super) fn build_template_later(self: &Arc<Self>, shape: Shape) {
        let daemon = self.clone();
        std::thread::spawn(move || {
            let Some(templates) = &daemon.settings.templates else {
                return;
            };
            let Some(claim) = templates.claim(&shape) else {
                return;
            };
            let id = claim.id().to_string();
            tracing::info!(
                "building template {id}: {} vCPU, {} MiB",
                shape.cpus,
                shape.memory_mib
            );
            match claim.build(
                &daemon.vm,
                daemon.settings.template_jail_id,
                TEMPLATE_PATIENCE,
            ) {
                Ok(template) => tracing::info!(
                    "template {id} built in {} ms ({} MiB on disk)",
                    template.build_ms,
                    template.disk_bytes() >> 20
                ),
                Err(e) => {
                    tracing::warn!("building template {id}: {e}; its shape boots from its kernel");
                    let _ = templates.discard(&id);
                }
            }
        });
    }
}
