//! The OCI runtime spec of one container of a group spec: the image's
//! process, overridden by the spec's command, arguments, environment and
//! working directory, its volumes as bind mounts, and its resources as
//! cgroup limits.

use std::path::Path;

use capsa_api::ContainerSpec;
use capsa_guest_client::OciImage;
use oci_spec::image::Config as ImageConfig;
use oci_spec::runtime::{
    Capabilities, Capability, LinuxBuilder, LinuxCpuBuilder, LinuxMemoryBuilder,
    LinuxResourcesBuilder, Spec,
};

/// CFS period the CPU limit is a quota of.
const CPU_PERIOD_USEC: u64 = 100_000;

/// The process's argv, as Kubernetes combines them: the spec's `command`
/// replaces the image's entrypoint and drops its cmd, and `args` replace
/// the cmd. So: neither given runs entrypoint + cmd; args alone run
/// entrypoint + args; command alone runs command (the image's cmd is not
/// appended); both run command + args. (docker's `--entrypoint` is
/// `command`, its trailing arguments `args`.)
pub fn argv(
    entrypoint: &[String],
    cmd: &[String],
    command: Option<&[String]>,
    args: Option<&[String]>,
) -> Vec<String> {
    match (command, args) {
        (None, None) => [entrypoint, cmd].concat(),
        (None, Some(args)) => [entrypoint, args].concat(),
        (Some(command), None) => command.to_vec(),
        (Some(command), Some(args)) => [command, args].concat(),
    }
}

/// The PATH a container gets when its image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const SIGTERM: i32 = 15;

/// What runs in a container and how it is stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerProcess {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// `user[:group]` as given, resolved in the guest against the
    /// container's own /etc/passwd and /etc/group (empty: root).
    pub user: String,
    pub stop_signal: i32,
}

/// Sets `entry` (`KEY=value`) in `env`: in place when the key is there,
/// else at the end (containerd's and docker's replace-or-append).
fn set_env(env: &mut Vec<String>, entry: String) {
    let key = entry.split('=').next().unwrap_or_default();
    match env.iter_mut().find(|e| e.split('=').next() == Some(key)) {
        Some(slot) => *slot = entry,
        None => env.push(entry),
    }
}

/// The one place a container's process is decided, from its image's
/// config and its spec, as containerd's CRI does for Kubernetes:
/// - argv: see `argv`;
/// - env: PATH (a default) and HOSTNAME, TERM=xterm with a terminal, then
///   the image's, then the spec's in its order, each replacing a variable
///   of the same name in place;
/// - working directory: the spec's, else the image's, else `/`;
/// - user: the spec's, else the image's, else root;
/// - stop signal: the spec's, else the image's, else SIGTERM.
pub fn process(
    config: &ImageConfig,
    container: &ContainerSpec,
    hostname: &str,
) -> ContainerProcess {
    let mut env = vec![
        format!("PATH={DEFAULT_PATH}"),
        format!("HOSTNAME={hostname}"),
    ];
    if container.tty {
        env.push("TERM=xterm".into());
    }
    for entry in config.env().iter().flatten() {
        set_env(&mut env, entry.clone());
    }
    for (key, value) in &container.env {
        set_env(&mut env, format!("{key}={value}"));
    }
    let image_dir = config.working_dir().clone().filter(|d| !d.is_empty());
    let stop_signal = container
        .stop_signal
        .as_deref()
        .or(config.stop_signal().as_deref())
        .and_then(capsa_api::signal::number)
        .unwrap_or(SIGTERM);
    ContainerProcess {
        args: argv(
            config.entrypoint().as_deref().unwrap_or_default(),
            config.cmd().as_deref().unwrap_or_default(),
            container.command.as_deref(),
            container.args.as_deref(),
        ),
        env,
        cwd: container
            .working_dir
            .clone()
            .or(image_dir)
            .unwrap_or_else(|| "/".into()),
        user: container
            .user
            .clone()
            .or_else(|| config.user().clone())
            .unwrap_or_default(),
        stop_signal,
    }
}

pub fn spec_for(
    image: &OciImage,
    container: &ContainerSpec,
    hostname: &str,
) -> anyhow::Result<Spec> {
    let config = image.config.config().clone().unwrap_or_default();
    let decided = process(&config, container, hostname);
    let mut spec = image.spec(None)?;
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(decided.args));
    process.set_env(Some(decided.env));
    process.set_cwd(decided.cwd.into());
    // Names are resolved in the guest, in the container's own files.
    let mut user = process.user().clone();
    user.set_username(Some(decided.user));
    process.set_user(user);
    process.set_terminal(Some(container.tty));
    if !container.cap_add.is_empty() {
        let mut capabilities = process.capabilities().clone().unwrap_or_default();
        let add = |set: Option<Capabilities>| -> anyhow::Result<Capabilities> {
            let mut set = set.unwrap_or_default();
            for name in &container.cap_add {
                set.insert(
                    name.parse::<Capability>()
                        .map_err(|e| anyhow::anyhow!("capability {name}: {e}"))?,
                );
            }
            Ok(set)
        };
        capabilities.set_bounding(Some(add(capabilities.bounding().clone())?));
        capabilities.set_effective(Some(add(capabilities.effective().clone())?));
        capabilities.set_permitted(Some(add(capabilities.permitted().clone())?));
        process.set_capabilities(Some(capabilities));
    }
    let mut annotations = spec.annotations().clone().unwrap_or_default();
    annotations.insert(
        capsa_protocol::STOP_SIGNAL_ANNOTATION.to_string(),
        decided.stop_signal.to_string(),
    );
    spec.set_annotations(Some(annotations));
    spec.set_process(Some(process));
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for mount in &container.volume_mounts {
        mounts.push(
            oci_spec::runtime::MountBuilder::default()
                .destination(&mount.mount_path)
                .source(Path::new(capsa_protocol::VOLUMES_DIR).join(&mount.name))
                .typ("bind")
                .options(vec![
                    "rbind".to_string(),
                    if mount.read_only { "ro" } else { "rw" }.to_string(),
                ])
                .build()?,
        );
    }
    spec.set_mounts(Some(mounts));
    let wants_cpu = container.cpu_limit.is_some() || container.cpu_request.is_some();
    let wants_memory =
        container.memory_limit_mib.is_some() || container.memory_request_mib.is_some();
    if wants_cpu || wants_memory {
        let mut resources = LinuxResourcesBuilder::default();
        if wants_cpu {
            let mut cpu = LinuxCpuBuilder::default();
            if let Some(cpus) = container.cpu_limit {
                cpu = cpu
                    .period(CPU_PERIOD_USEC)
                    .quota((cpus * CPU_PERIOD_USEC as f64) as i64);
            }
            if let Some(cpus) = container.cpu_request {
                // 1024 shares per CPU, as Kubernetes maps requests.
                cpu = cpu.shares((cpus * 1024.0) as u64);
            }
            resources = resources.cpu(cpu.build()?);
        }
        if wants_memory {
            let mut memory = LinuxMemoryBuilder::default();
            if let Some(mib) = container.memory_limit_mib {
                memory = memory.limit((mib << 20) as i64);
            }
            if let Some(mib) = container.memory_request_mib {
                memory = memory.reservation((mib << 20) as i64);
            }
            resources = resources.memory(memory.build()?);
        }
        let mut linux = spec
            .linux()
            .clone()
            .unwrap_or(LinuxBuilder::default().build()?);
        linux.set_resources(Some(resources.build()?));
        spec.set_linux(Some(linux));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsa_api::GroupSpec;
    use oci_spec::image::{ConfigBuilder, ImageConfigurationBuilder};

    fn image() -> OciImage {
        let config = ConfigBuilder::default()
            .entrypoint(vec!["/bin/entry".to_string()])
            .cmd(vec!["serve".to_string(), "--port=80".to_string()])
            .env(vec!["PATH=/bin".to_string(), "MODE=image".to_string()])
            .working_dir("/srv".to_string())
            .build()
            .unwrap();
        OciImage {
            layers: Vec::new(),
            config: ImageConfigurationBuilder::default()
                .config(config)
                .build()
                .unwrap(),
        }
    }

    fn container(fields: &str) -> ContainerSpec {
        let spec = GroupSpec::parse(&format!(
            r#"{{"name":"g","volumes":[{{"name":"data","emptyDir":{{}}}}],
                "containers":[{{"name":"c","image":"busybox"{fields}}}]}}"#
        ))
        .unwrap();
        spec.containers[0].clone()
    }

    fn args(spec: &Spec) -> Vec<String> {
        spec.process().clone().unwrap().args().clone().unwrap()
    }

    #[test]
    fn added_capabilities_join_the_default_set_and_unknown_ones_are_refused() {
        let capabilities_of = |spec: &oci_spec::runtime::Spec| {
            spec.process()
                .clone()
                .unwrap()
                .capabilities()
                .clone()
                .unwrap()
        };
        let spec = spec_for(&image(), &container(r#","capAdd":["NET_ADMIN"]"#), "g").unwrap();
        let capabilities = capabilities_of(&spec);
        for set in [
            capabilities.bounding(),
            capabilities.effective(),
            capabilities.permitted(),
        ] {
            let set = set.clone().unwrap();
            assert!(set.contains(&Capability::NetAdmin) && set.contains(&Capability::Chown));
        }
        let plain = capabilities_of(&spec_for(&image(), &container(""), "g").unwrap());
        assert!(!plain
            .effective()
            .clone()
            .unwrap()
            .contains(&Capability::NetAdmin));
        let refused = GroupSpec::parse(
            r#"{"name":"g","containers":[{"name":"c","image":"busybox","capAdd":["ALL"]}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            refused.contains("capAdd") && refused.contains("NET_ADMIN"),
            "{refused}"
        );
    }

    #[test]
    fn the_image_process_runs_unless_the_spec_says_otherwise() {
        let spec = spec_for(&image(), &container(""), "g").unwrap();
        assert_eq!(args(&spec), ["/bin/entry", "serve", "--port=80"]);
        let process = spec.process().clone().unwrap();
        assert_eq!(process.cwd(), Path::new("/srv"));
        assert_eq!(process.terminal(), Some(false));
        let resources = spec.linux().clone().and_then(|l| l.resources().clone());
        assert!(resources
            .as_ref()
            .is_none_or(|r| r.cpu().is_none() && r.memory().is_none()));
    }

    #[test]
    fn args_replace_the_cmd_and_a_command_replaces_the_entrypoint() {
        let spec = spec_for(&image(), &container(r#","args":["once"]"#), "g").unwrap();
        assert_eq!(args(&spec), ["/bin/entry", "once"]);
        // A command alone drops the image's cmd, as Kubernetes does.
        let spec = spec_for(&image(), &container(r#","command":["sleep","600"]"#), "g").unwrap();
        assert_eq!(args(&spec), ["sleep", "600"]);
        let both = r#","command":["/bin/sh","-c"],"args":["echo hi"]"#;
        let spec = spec_for(&image(), &container(both), "g").unwrap();
        assert_eq!(args(&spec), ["/bin/sh", "-c", "echo hi"]);
    }

    #[test]
    fn command_and_args_combine_as_kubernetes_documents() {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (entrypoint, cmd) = (words(&["/entry"]), words(&["serve"]));
        let (command, args) = (words(&["/bin/sh", "-c"]), words(&["echo hi"]));
        let run = |c: Option<&Vec<String>>, a: Option<&Vec<String>>| {
            argv(
                &entrypoint,
                &cmd,
                c.map(Vec::as_slice),
                a.map(Vec::as_slice),
            )
        };
        assert_eq!(run(None, None), ["/entry", "serve"]);
        assert_eq!(run(None, Some(&args)), ["/entry", "echo hi"]);
        assert_eq!(run(Some(&command), None), ["/bin/sh", "-c"]);
        assert_eq!(
            run(Some(&command), Some(&args)),
            ["/bin/sh", "-c", "echo hi"]
        );
        // An empty args list is given args: the cmd goes (docker's
        // `--entrypoint` with no arguments).
        assert_eq!(argv(&entrypoint, &cmd, None, Some(&[])), ["/entry"]);
        assert_eq!(argv(&[], &cmd, None, None), ["serve"]);
    }

    fn decided(fields: &str) -> ContainerProcess {
        let config = image().config.config().clone().unwrap();
        process(&config, &container(fields), "web")
    }

    #[test]
    fn env_is_path_and_hostname_then_the_images_then_the_specs_in_place() {
        assert_eq!(
            decided("").env,
            ["PATH=/bin", "HOSTNAME=web", "MODE=image"],
            "the image's PATH replaces the default in place"
        );
        let fields = r#","env":{"ZED":"1","ALPHA":"2","MODE":"spec","HOSTNAME":"mine"}"#;
        assert_eq!(
            decided(fields).env,
            [
                "PATH=/bin",
                "HOSTNAME=mine",
                "MODE=spec",
                "ZED=1",
                "ALPHA=2"
            ]
        );
        let bare = ConfigBuilder::default().build().unwrap();
        let env = process(&bare, &container(r#","tty":true"#), "web").env;
        assert_eq!(
            env,
            [
                format!("PATH={DEFAULT_PATH}"),
                "HOSTNAME=web".into(),
                "TERM=xterm".into()
            ]
        );
    }

    #[test]
    fn working_dir_is_the_specs_then_the_images_then_root() {
        assert_eq!(decided("").cwd, "/srv");
        assert_eq!(decided(r#","workingDir":"/tmp""#).cwd, "/tmp");
        let bare = ConfigBuilder::default()
            .working_dir(String::new())
            .build()
            .unwrap();
        assert_eq!(process(&bare, &container(""), "g").cwd, "/");
    }

    #[test]
    fn user_is_the_specs_then_the_images_then_root() {
        let bare = ConfigBuilder::default().build().unwrap();
        assert_eq!(process(&bare, &container(""), "g").user, "");
        let app = ConfigBuilder::default()
            .user("app".to_string())
            .build()
            .unwrap();
        assert_eq!(process(&app, &container(""), "g").user, "app");
        let given = process(&app, &container(r#","user":"1000:extra""#), "g");
        assert_eq!(given.user, "1000:extra");
    }

    #[test]
    fn stop_signal_is_the_specs_then_the_images_then_sigterm() {
        assert_eq!(decided("").stop_signal, 15);
        let quits = ConfigBuilder::default()
            .stop_signal("SIGQUIT".to_string())
            .build()
            .unwrap();
        assert_eq!(process(&quits, &container(""), "g").stop_signal, 3);
        let given = process(&quits, &container(r#","stopSignal":"USR1""#), "g");
        assert_eq!(given.stop_signal, 10);
    }

    #[test]
    fn the_spec_carries_the_decision_to_the_guest() {
        let fields = r#","user":"app","stopSignal":"SIGINT","workingDir":"/tmp","tty":true"#;
        let spec = spec_for(&image(), &container(fields), "web").unwrap();
        let process = spec.process().clone().unwrap();
        assert_eq!(process.user().username().as_deref(), Some("app"));
        assert_eq!(process.cwd(), Path::new("/tmp"));
        assert_eq!(process.terminal(), Some(true));
        let annotations = spec.annotations().clone().unwrap();
        assert_eq!(annotations[capsa_protocol::STOP_SIGNAL_ANNOTATION], "2");
    }

    #[test]
    fn volume_mounts_bind_the_sandbox_volume() {
        let fields = r#","volumeMounts":[{"name":"data","mountPath":"/data","readOnly":true}]"#;
        let spec = spec_for(&image(), &container(fields), "g").unwrap();
        let mount = spec
            .mounts()
            .clone()
            .unwrap()
            .into_iter()
            .find(|m| m.destination() == Path::new("/data"))
            .unwrap();
        assert_eq!(
            mount.source().as_deref(),
            Some(
                Path::new(capsa_protocol::VOLUMES_DIR)
                    .join("data")
                    .as_path()
            )
        );
        assert_eq!(mount.typ().as_deref(), Some("bind"));
        assert_eq!(
            mount.options().clone().unwrap(),
            ["rbind".to_string(), "ro".to_string()]
        );
    }

    #[test]
    fn resources_become_cgroup_limits() {
        let fields =
            r#","cpuLimit":0.5,"cpuRequest":0.25,"memoryLimitMib":64,"memoryRequestMib":32"#;
        let spec = spec_for(&image(), &container(fields), "g").unwrap();
        let resources = spec.linux().clone().unwrap().resources().clone().unwrap();
        let cpu = resources.cpu().clone().unwrap();
        assert_eq!(
            (cpu.period(), cpu.quota(), cpu.shares()),
            (Some(100_000), Some(50_000), Some(256))
        );
        let memory = resources.memory().unwrap();
        assert_eq!(
            (memory.limit(), memory.reservation()),
            (Some(64 << 20), Some(32 << 20))
        );
    }
}
