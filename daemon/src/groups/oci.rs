//! The OCI runtime spec of one container of a group spec: the image's
//! process, overridden by the spec's command, arguments, environment and
//! working directory, its volumes as bind mounts, and its resources as
//! cgroup limits.

use std::path::Path;

use capsa_api::ContainerSpec;
use capsa_guest_client::OciImage;
use oci_spec::runtime::{
    LinuxBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder, Spec,
};

/// CFS period the CPU limit is a quota of.
const CPU_PERIOD_USEC: u64 = 100_000;

/// The name the image store knows `image` by.
pub fn normalized(image: &str) -> String {
    capsa_image_store::normalize_name(image).unwrap_or_else(|_| image.to_string())
}

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

pub fn spec_for(image: &OciImage, container: &ContainerSpec) -> anyhow::Result<Spec> {
    let config = image.config.config().clone().unwrap_or_default();
    let mut spec = image.spec(None)?;
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(argv(
        config.entrypoint().as_deref().unwrap_or_default(),
        config.cmd().as_deref().unwrap_or_default(),
        container.command.as_deref(),
        container.args.as_deref(),
    )));
    let mut env = process.env().clone().unwrap_or_default();
    for (key, value) in &container.env {
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(format!("{key}={value}"));
    }
    process.set_env(Some(env));
    if let Some(dir) = &container.working_dir {
        process.set_cwd(dir.into());
    }
    process.set_terminal(Some(container.tty));
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
    fn the_image_process_runs_unless_the_spec_says_otherwise() {
        let spec = spec_for(&image(), &container("")).unwrap();
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
        let spec = spec_for(&image(), &container(r#","args":["once"]"#)).unwrap();
        assert_eq!(args(&spec), ["/bin/entry", "once"]);
        // A command alone drops the image's cmd, as Kubernetes does.
        let spec = spec_for(&image(), &container(r#","command":["sleep","600"]"#)).unwrap();
        assert_eq!(args(&spec), ["sleep", "600"]);
        let both = r#","command":["/bin/sh","-c"],"args":["echo hi"]"#;
        let spec = spec_for(&image(), &container(both)).unwrap();
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

    #[test]
    fn env_overrides_the_image_and_working_dir_and_tty_apply() {
        let fields = r#","env":{"MODE":"spec","NEW":"1"},"workingDir":"/tmp","tty":true"#;
        let spec = spec_for(&image(), &container(fields)).unwrap();
        let process = spec.process().clone().unwrap();
        let env = process.env().clone().unwrap();
        assert!(env.contains(&"MODE=spec".to_string()), "{env:?}");
        assert!(!env.contains(&"MODE=image".to_string()), "{env:?}");
        assert!(env.contains(&"NEW=1".to_string()) && env.contains(&"PATH=/bin".to_string()));
        assert_eq!(process.cwd(), Path::new("/tmp"));
        assert_eq!(process.terminal(), Some(true));
    }

    #[test]
    fn spec_env_comes_after_the_image_env_in_its_own_order() {
        let fields = r#","env":{"ZED":"1","ALPHA":"2","MODE":"spec"}"#;
        let spec = spec_for(&image(), &container(fields)).unwrap();
        let env = spec.process().clone().unwrap().env().clone().unwrap();
        assert_eq!(env, ["PATH=/bin", "ZED=1", "ALPHA=2", "MODE=spec"]);
    }

    #[test]
    fn volume_mounts_bind_the_sandbox_volume() {
        let fields = r#","volumeMounts":[{"name":"data","mountPath":"/data","readOnly":true}]"#;
        let spec = spec_for(&image(), &container(fields)).unwrap();
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
        let spec = spec_for(&image(), &container(fields)).unwrap();
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
