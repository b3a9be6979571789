//! Booting a group's VM, launching its containers with their output going
//! to logs, and stopping the VM again.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use capsa_api::{ApiError, ContainerSpec, GroupSpec, GroupStatus, GroupView};
use capsa_guest_client::{Guest, Streams};
use capsa_protocol::stdio::StreamKind;
use capsa_vm_process::{self as vm, sandbox, VmSpec};
use capsa_vmm_config::DiskConfig;

use super::lifecycle::{Refused, Transition};
use super::{layers, oci, restart, Daemon, Group};
use crate::errors::{conflict, guest_failed, internal, invalid, refused};
use crate::logs::LogWriter;
use crate::state::now_ms;

/// How long a booting guest gets to answer.
const BOOT_PATIENCE: Duration = Duration::from_secs(120);
/// The serial of a group's scratch disk.
const SCRATCH_SERIAL: &str = "scratch";
/// How long a killed VMM gets to end before its group goes on without it.
pub(super) const VMM_EXIT_PATIENCE: Duration = Duration::from_secs(10);
/// Disks a VM may have (volumes and image layers): the VMM's 19 virtio
/// slots, less the network, vsock and entropy devices.
const MAX_DISKS: usize = 16;

impl Daemon {
    /// Boots the group's VM and starts its containers, telling `report`
    /// each step; returns once they run (or the start failed, which leaves
    /// the group Failed).
    pub fn start(
        self: &Arc<Self>,
        name: &str,
        report: &mut dyn FnMut(String),
    ) -> Result<GroupView, ApiError> {
        let began = Instant::now();
        let group = self.group(name)?;
        // Before the start lock: a first conversion of a big image must
        // not hold other groups' starts back.
        let images = group
            .snapshot()
            .spec
            .all_containers()
            .map(|c| Ok((c.name.clone(), self.open_image(&c.image)?)))
            .collect::<Result<Vec<_>, ApiError>>()?;
        let layer_disks = layers::disks(&self.layer_images, &images, report)?;
        let starting = self.starting.lock().unwrap_or_else(|e| e.into_inner());
        let record = group.snapshot();
        if record.status == GroupStatus::Running {
            return Err(refused(Refused::AlreadyRunning {
                group: name.to_string(),
            }));
        }
        let running: Vec<GroupSpec> = self
            .all_groups()
            .iter()
            .map(|g| g.snapshot())
            .filter(|r| r.status == GroupStatus::Running && r.spec.name != record.spec.name)
            .map(|r| r.spec)
            .collect();
        self.settings
            .capacity
            .admit(&record.spec, &running)
            .map_err(conflict)?;
        let volumes = crate::volumes::plan(&self.volumes, &record.spec, &running)?;
        let mut disks = volumes.disks.clone();
        // Made afresh at each boot: nothing the guest wrote before is read.
        let scratch = group.paths.scratch();
        let _ = std::fs::remove_file(&scratch);
        if record.spec.scratch_mib() > 0 {
            capsa_volumes::make_ext4(
                &format!("scratch disk of {name}"),
                &scratch,
                record.spec.scratch_mib(),
            )
            .map_err(internal)?;
            disks.push(DiskConfig::at(
                scratch,
                false,
                Some(SCRATCH_SERIAL.to_string()),
            ));
        }
        disks.extend(layer_disks);
        if disks.len() > MAX_DISKS {
            return Err(invalid(format!(
                "group {name:?} needs {} disks (its volumes and its images' layers); a VM has at most {MAX_DISKS}",
                disks.len()
            )));
        }
        let (disk_rate, network_rate) = self.settings.rates(&record.spec);
        for disk in &mut disks {
            disk.rate = disk_rate.as_ref().map(super::vmm_rate);
        }
        let net = match (&self.network, record.ip) {
            (Some(network), Some(ip)) => Some(capsa_vmm_config::NetConfig {
                rate: network_rate.as_ref().map(super::vmm_rate),
                ..network
                    .nic(record.spec.network(), ip)
                    .map_err(crate::errors::network_error)?
            }),
            _ => None,
        };
        let cgroup = self
            .settings
            .cgroups
            .as_ref()
            .map(|cgroups| {
                cgroups.create(
                    name,
                    &capsa_cgroup::Limits::for_vm(
                        record.spec.cpus(),
                        record.spec.memory_mib(),
                        record.spec.cpu_limit(),
                    ),
                )
            })
            .transpose()
            .map_err(internal)?;
        let jail_root = group.paths.jail();
        let jail = match (self.settings.jail_ids, record.jail_id) {
            (None, _) => None,
            (Some(_), Some(id)) => Some(vm::JailSpec {
                root: &jail_root,
                uid: id,
                gid: id,
            }),
            (Some(_), None) => {
                return Err(conflict(format!(
                    "group {name:?} has no jail id (all are taken): delete a group, or give capsad more (--jail-ids)"
                )))
            }
        };
        let (vsock, console) = (group.paths.vsock(), group.paths.console());
        let cgroup_procs = cgroup.as_ref().map(|c| c.procs());
        let cold = VmSpec {
            cpus: record.spec.cpus(),
            memory_mib: record.spec.memory_mib(),
            net,
            disks: &disks,
            vsock: &vsock,
            console: &console,
            cgroup_procs: cgroup_procs.as_deref(),
            jail,
            snapshot: vm::Snapshot::None,
        };
        let shape = self.template_shape(&record.spec, cold.net.is_some());
        let restored = shape
            .as_ref()
            .and_then(|shape| self.restore_clone(&group, shape, &cold, report));
        let (origin, mut child, template) = match restored {
            Some(clone) => (
                Origin::Restored(clone.sandbox),
                clone.child,
                Some(clone.template),
            ),
            None => {
                let (booting, child) = sandbox::boot(&self.vm, &cold).map_err(|e| {
                    // No VMM: nothing will end in that cgroup to remove it later.
                    if let Some(cgroup) = &cgroup {
                        let _ = cgroup.remove(Duration::ZERO);
                    }
                    internal(e)
                })?;
                (Origin::Booting(booting), child, None)
            }
        };
        let pid = origin.pid();
        if let Origin::Booting(_) = origin {
            report(format!(
                "booting the microVM: {} vCPU, {} MiB (VMM pid {pid})",
                record.spec.cpus(),
                record.spec.memory_mib()
            ));
        }
        if let Err(e) = group.transition(Transition::Boot {
            vmm_pid: pid,
            at: now_ms(),
            template: template.clone(),
        }) {
            // Started meanwhile by someone else: this VMM is not wanted.
            vm::kill(pid);
            let _ = child.wait();
            return Err(refused(e));
        }
        drop(starting);
        let (daemon, watched) = (self.clone(), group.clone());
        std::thread::spawn(move || {
            let how = child
                .wait()
                .map(vm::describe_exit)
                .unwrap_or_else(|e| e.to_string());
            vm_exited(&daemon, &watched, how);
        });
        match self.run_containers(&group, origin, volumes.sandbox, report) {
            Ok(()) => {
                self.metrics
                    .start_seconds
                    .observe(began.elapsed().as_secs_f64());
                if let (Some(shape), None) = (shape, &template) {
                    self.build_template_later(shape);
                }
                crate::metrics::read_in_background(self, name.to_string());
                Ok(group.snapshot().view())
            }
            Err(e) => {
                let _ = group.transition(Transition::Stop);
                // Gone before the group is: its tap and address may be
                // the next group's at once.
                if !vm::kill_and_wait(pid, VMM_EXIT_PATIENCE) {
                    tracing::warn!("group {name}: its VMM {pid} outlived SIGKILL");
                }
                let _ = group.transition(Transition::Fail {
                    error: e.message.clone(),
                });
                Err(e)
            }
        }
    }

    fn run_containers(
        self: &Arc<Self>,
        group: &Arc<Group>,
        origin: Origin,
        volumes: Vec<capsa_protocol::agent::Volume>,
        report: &mut dyn FnMut(String),
    ) -> Result<(), ApiError> {
        let record = group.snapshot();
        let began = Instant::now();
        let restored = matches!(origin, Origin::Restored(_));
        let sandbox = match origin {
            // The error carries the console: the best clue to why.
            Origin::Booting(booting) => {
                let sandbox = booting
                    .connect(BOOT_PATIENCE)
                    .map_err(|e| internal(format!("the guest did not answer: {e}")))?;
                report(format!(
                    "the guest agent answered after {} ms",
                    began.elapsed().as_millis()
                ));
                sandbox
            }
            Origin::Restored(sandbox) => sandbox,
        };
        let guest = sandbox.guest().clone();
        guest
            .setup_sandbox(&self.sandbox_request(&record, volumes, restored))
            .map_err(|e| guest_failed(&group.paths.console(), "setting up the sandbox", e))?;
        group.set_sandbox(Arc::new(sandbox));
        for init in &record.spec.init_containers {
            self.run_init(group, &guest, init, report)?;
        }
        for container in &record.spec.containers {
            let copiers = self.launch(group, &guest, container, report)?;
            restart::watch_container(
                self.clone(),
                group.clone(),
                guest.clone(),
                container.name.clone(),
                copiers,
            );
        }
        Ok(())
    }

    /// What the agent sets up before any container: the hostname, the
    /// clock, the volumes and, with networking, eth0, its route and DNS.
    /// A VM `restored` from a template has the template's MAC: its agent
    /// finds the NIC by that one and gives it the group's.
    fn sandbox_request(
        &self,
        record: &crate::state::GroupRecord,
        volumes: Vec<capsa_protocol::agent::Volume>,
        restored: bool,
    ) -> capsa_protocol::agent::SetupSandboxRequest {
        let mut sandbox = capsa_protocol::agent::SetupSandboxRequest {
            hostname: record.spec.name.clone(),
            scratch_disk: if record.spec.scratch_mib() > 0 {
                SCRATCH_SERIAL.to_string()
            } else {
                String::new()
            },
            time_unix_ns: (now_ms() as i64) * 1_000_000,
            volumes,
            ..Default::default()
        };
        let addressing = self
            .network
            .as_ref()
            .zip(record.ip)
            .and_then(|(network, ip)| Some((network.addressing(record.spec.network()).ok()?, ip)));
        if let Some((addressing, ip)) = addressing {
            let gateway = addressing.gateway.to_string();
            sandbox.interfaces.push(capsa_protocol::agent::Interface {
                mac: capsa_network::mac_for(ip).to_string(),
                found_by_mac: if restored {
                    capsa_templates::TEMPLATE_MAC.to_string()
                } else {
                    String::new()
                },
                name: "eth0".into(),
                addresses: vec![format!("{ip}/{}", addressing.prefix_len)],
                ..Default::default()
            });
            sandbox.routes.push(capsa_protocol::agent::Route {
                destination: "default".into(),
                gateway: gateway.clone(),
                device: "eth0".into(),
                ..Default::default()
            });
            sandbox.dns = protobuf::MessageField::some(capsa_protocol::agent::Dns {
                servers: vec![gateway],
                ..Default::default()
            });
        }
        sandbox
    }

    /// Runs an init container to its end, its output going to its log; an
    /// exit other than 0 fails the start.
    fn run_init(
        &self,
        group: &Arc<Group>,
        guest: &Arc<Guest>,
        container: &ContainerSpec,
        report: &mut dyn FnMut(String),
    ) -> Result<(), ApiError> {
        let console = group.paths.console();
        let console = console.as_path();
        let name = &container.name;
        let failed = |what: String| move |e| guest_failed(console, &what, e);
        let image = self.open_image(&container.image)?;
        let disks = layers::serials(&image)?;
        let spec = oci::spec_for(&image, container, &group.name()).map_err(internal)?;
        guest
            .create_on_disks(name, &disks, &spec, Streams::OUTPUT)
            .map_err(failed(format!("init container {name}")))?;
        let copiers = attach_logs(group, guest, container)?;
        guest
            .start(name)
            .map_err(failed(format!("init container {name}")))?;
        report(format!("init container {name} started"));
        let started_at = now_ms();
        let ended = guest
            .wait(name, "")
            .map_err(failed(format!("init container {name}")))?;
        // Its whole output is in its log before its exit is told.
        for copier in copiers {
            let _ = copier.join();
        }
        let exit = super::lifecycle::Exit {
            code: ended.code,
            signal: (ended.signal != 0).then_some(ended.signal),
            oom_killed: ended.oom_killed,
        };
        group
            .transition(Transition::InitExited {
                name: name.clone(),
                exit,
                started_at,
                at: now_ms(),
            })
            .map_err(refused)?;
        // Its memory back to the guest; a failure here changes nothing.
        let _ = guest.delete(name);
        if exit.code != 0 || exit.signal.is_some() {
            return Err(crate::errors::error(
                capsa_api::ErrorCode::Conflict,
                format!(
                    "init container {name} exited {}{}: the containers were not started",
                    exit.code,
                    exit.signal
                        .map_or(String::new(), |s| format!(" (signal {s})"))
                ),
            ));
        }
        report(format!("init container {name} exited 0"));
        Ok(())
    }

    /// Creates and starts one container in the guest, its output going to
    /// its log.
    pub(super) fn launch(
        &self,
        group: &Arc<Group>,
        guest: &Arc<Guest>,
        container: &ContainerSpec,
        report: &mut dyn FnMut(String),
    ) -> Result<Vec<JoinHandle<()>>, ApiError> {
        let console = group.paths.console();
        let console = console.as_path();
        let failed = |what: String| move |e| guest_failed(console, &what, e);
        let image = self.open_image(&container.image)?;
        let disks = layers::serials(&image)?;
        let spec = oci::spec_for(&image, container, &group.name()).map_err(internal)?;
        let streams = Streams {
            stdin: container.stdin,
            ..Streams::OUTPUT
        };
        guest
            .create_on_disks(&container.name, &disks, &spec, streams)
            .map_err(failed(format!("container {}", container.name)))?;
        let copiers = attach_logs(group, guest, container)?;
        if container.stdin {
            // Held here for the container's life: clients that attach
            // write into it one after another (the agent takes one).
            let stdin = guest
                .attach(&container.name, "", StreamKind::Stdin)
                .map_err(failed(format!("container {}'s input", container.name)))?;
            // A guest that stops reading holds a client's write this long.
            stdin
                .set_write_timeout(Some(Duration::from_secs(10)))
                .map_err(internal)?;
            group
                .lock()
                .stdin
                .insert(container.name.clone(), Arc::new(Mutex::new(Some(stdin))));
        }
        guest
            .start(&container.name)
            .map_err(failed(format!("container {}", container.name)))?;
        report(format!("container {} started", container.name));
        let started_at = now_ms();
        if let Err(e) = group.transition(Transition::ContainerStarted {
            name: container.name.clone(),
            at: started_at,
        }) {
            // The group stopped meanwhile; its VM takes the container.
            tracing::warn!("{e}");
            return Ok(copiers);
        }
        let probes = [
            (&container.liveness_probe, crate::probes::Purpose::Liveness),
            (
                &container.readiness_probe,
                crate::probes::Purpose::Readiness,
            ),
        ];
        for (probe, purpose) in probes {
            if let Some(probe) = probe {
                crate::probes::watch(
                    group.clone(),
                    guest.clone(),
                    container.name.clone(),
                    (probe.clone(), purpose),
                    spec.process().clone().unwrap_or_default(),
                    started_at,
                );
            }
        }
        Ok(copiers)
    }
}

/// Where a starting group's VM comes from.
enum Origin {
    /// Booted from its kernel; its agent not reached yet.
    Booting(sandbox::Booting),
    /// Restored from a template, its agent answering and reseeded.
    Restored(sandbox::Sandbox),
}

impl Origin {
    fn pid(&self) -> u32 {
        match self {
            Origin::Booting(booting) => booting.pid(),
            Origin::Restored(sandbox) => sandbox.pid(),
        }
    }
}

/// Copies a container's output into its log, from where it is now: the
/// agent resends what an earlier daemon had not kept.
pub(super) fn attach_logs(
    group: &Group,
    guest: &Guest,
    container: &ContainerSpec,
) -> Result<Vec<JoinHandle<()>>, ApiError> {
    let log = LogWriter::open(&group.paths.log(&container.name)).map_err(internal)?;
    // A terminal has one output stream.
    let streams: &[_] = if container.tty {
        &[(StreamKind::Stdout, "stdout")]
    } else {
        &[
            (StreamKind::Stdout, "stdout"),
            (StreamKind::Stderr, "stderr"),
        ]
    };
    let mut copiers = Vec::new();
    for &(kind, tag) in streams {
        let stream = guest
            .attach_acked(&container.name, "", kind, log.resume_point(tag))
            .map_err(internal)?;
        let log = log.clone();
        let terminal = container.tty;
        copiers.push(std::thread::spawn(move || {
            if let Err(e) = log.copy(tag, stream, terminal) {
                tracing::warn!("log of {}: {e}", log.path().display());
            }
        }));
    }
    Ok(copiers)
}

/// Stops the containers (SIGTERM, SIGKILL after `grace`), then the VM,
/// by force if it does not power off in time.
pub(super) fn stop_vm(group: &Arc<Group>, grace: Duration) {
    let _ = group.transition(Transition::Stop);
    let sandbox = group.lock().sandbox.take();
    match (sandbox, group.snapshot().vmm_pid) {
        (Some(sandbox), _) => {
            let _ = sandbox.shutdown(grace);
        }
        // Someone else is shutting it down (a container's end and a
        // delete can overlap), it is booting, or its agent is out of
        // reach: it gets the same time to go before it is killed, so that
        // a shutdown under way can sync its disks.
        (None, Some(pid)) => {
            sandbox::stop(pid, &group.paths.vsock(), grace + sandbox::POWER_OFF_MARGIN)
        }
        (None, None) => {}
    }
    let _ = group.transition(Transition::Stopped);
}

/// The VMM process ended: a failure unless the daemon was stopping it,
/// and then the restart policy may boot the group again.
pub(super) fn vm_exited(daemon: &Arc<Daemon>, group: &Arc<Group>, how: String) {
    {
        let mut state = group.lock();
        state.sandbox.take();
        state.stdin.clear();
    }
    if let Some(cgroup) = daemon
        .settings
        .cgroups
        .as_ref()
        .and_then(|c| c.find(&group.name()))
    {
        if let Err(e) = cgroup.remove(Duration::from_secs(5)) {
            tracing::warn!("group {}: {e}", group.name());
        }
    }
    let console = vm::console_tail(&group.paths.console());
    let after = group.transition(Transition::VmmExited { how, console });
    // Refused when a stop recorded the end first; over either way.
    if group.snapshot().spec.auto_remove {
        if group.is_over() {
            restart::remove_when_unheld(daemon, group);
        }
    } else if after.is_ok_and(|record| record.status == GroupStatus::Failed) {
        restart::restart_failed_group(daemon, group);
    }
}
