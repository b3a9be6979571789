//! Azure Container Instances' container-group YAML (the file of `az
//! container create --file`), mapped to a [`GroupSpec`]: what has a
//! meaning here is taken, and each field that has none (or that Capsa does
//! not run yet) is an error naming it.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::spec::{
    ContainerSpec, EmptyDirSpec, ExecProbe, GroupSpec, PortProtocol, PortSpec, Probe,
    RestartPolicy, SpecError, VolumeMount, VolumeSpec,
};

/// Whether `value` (a parsed YAML or JSON document) is an ACI container
/// group rather than a Capsa spec: it has `properties.containers`.
pub fn is_aci(value: &Value) -> bool {
    value
        .get("properties")
        .and_then(|p| p.get("containers"))
        .is_some()
}

/// The Capsa spec of an ACI container group.
pub fn group_spec(value: Value) -> Result<GroupSpec, SpecError> {
    let group: AciGroup = serde_json::from_value(value).map_err(|e| SpecError {
        problems: vec![format!("ACI container group: {e}")],
    })?;
    let mut problems = Vec::new();
    let spec = map_group(group, &mut problems);
    if let Err(e) = spec.validate() {
        problems.extend(e.problems);
    }
    if problems.is_empty() {
        Ok(spec)
    } else {
        Err(SpecError { problems })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AciGroup {
    name: String,
    properties: AciProperties,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    // Where and how Azure keeps the group: nothing to run here.
    #[serde(default, rename = "apiVersion")]
    _api_version: Option<Value>,
    #[serde(default, rename = "location")]
    _location: Option<Value>,
    #[serde(default, rename = "type")]
    _kind: Option<Value>,
    #[serde(default, rename = "zones")]
    _zones: Option<Value>,
    #[serde(default)]
    identity: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AciProperties {
    containers: Vec<AciContainer>,
    #[serde(default)]
    os_type: Option<String>,
    #[serde(default)]
    restart_policy: Option<String>,
    #[serde(default)]
    ip_address: Option<AciIpAddress>,
    #[serde(default)]
    volumes: Vec<AciVolume>,
    #[serde(default)]
    init_containers: Vec<AciContainer>,
    #[serde(default)]
    sku: Option<String>,
    // Known, and not run by Capsa: each is an error when given.
    #[serde(default)]
    image_registry_credentials: Option<Value>,
    #[serde(default)]
    diagnostics: Option<Value>,
    #[serde(default)]
    subnet_ids: Option<Value>,
    #[serde(default)]
    dns_config: Option<Value>,
    #[serde(default)]
    encryption_properties: Option<Value>,
    #[serde(default)]
    extensions: Option<Value>,
    #[serde(default)]
    priority: Option<Value>,
    #[serde(default)]
    confidential_compute_properties: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AciContainer {
    name: String,
    properties: AciContainerProperties,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AciContainerProperties {
    image: String,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    environment_variables: Vec<AciEnv>,
    #[serde(default)]
    resources: Option<AciResources>,
    #[serde(default)]
    ports: Vec<AciPort>,
    #[serde(default)]
    volume_mounts: Vec<VolumeMount>,
    #[serde(default)]
    liveness_probe: Option<AciProbe>,
    #[serde(default)]
    readiness_probe: Option<AciProbe>,
    #[serde(default)]
    security_context: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AciEnv {
    name: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    secure_value: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AciResources {
    requests: AciResource,
    #[serde(default)]
    limits: Option<AciResource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AciResource {
    #[serde(default)]
    cpu: Option<f64>,
    #[serde(default, rename = "memoryInGB")]
    memory_in_gb: Option<f64>,
    #[serde(default)]
    gpu: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AciPort {
    port: u16,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AciProbe {
    #[serde(default)]
    exec: Option<ExecProbe>,
    #[serde(default)]
    http_get: Option<Value>,
    #[serde(default)]
    initial_delay_seconds: Option<u32>,
    #[serde(default)]
    period_seconds: Option<u32>,
    #[serde(default)]
    timeout_seconds: Option<u32>,
    #[serde(default)]
    failure_threshold: Option<u32>,
    #[serde(default)]
    success_threshold: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AciIpAddress {
    #[serde(default)]
    ports: Vec<AciPort>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    dns_name_label: Option<String>,
    #[serde(default)]
    ip: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AciVolume {
    name: String,
    #[serde(default)]
    empty_dir: Option<Value>,
    #[serde(default)]
    secret: Option<BTreeMap<String, String>>,
    #[serde(default)]
    azure_file: Option<Value>,
    #[serde(default)]
    git_repo: Option<Value>,
}

const MIB_PER_GB: f64 = 1024.0;

fn mib(gb: f64) -> u64 {
    (gb * MIB_PER_GB).round().max(0.0) as u64
}

fn protocol(text: Option<&str>, at: &str, problems: &mut Vec<String>) -> PortProtocol {
    match text.map(str::to_ascii_lowercase).as_deref() {
        None | Some("tcp") => PortProtocol::Tcp,
        Some("udp") => PortProtocol::Udp,
        Some(other) => {
            problems.push(format!("{at}.protocol: {other:?} is not TCP or UDP"));
            PortProtocol::Tcp
        }
    }
}

fn unsupported(problems: &mut Vec<String>, given: bool, field: &str, why: &str) {
    if given {
        problems.push(format!("{field}: not supported by Capsa ({why})"));
    }
}

fn map_group(group: AciGroup, problems: &mut Vec<String>) -> GroupSpec {
    unsupported(
        problems,
        group.identity.is_some(),
        "identity",
        "an Azure service setting",
    );
    let p = group.properties;
    let at = "properties";
    unsupported(
        problems,
        p.image_registry_credentials.is_some(),
        "properties.imageRegistryCredentials",
        "pull the image first: capsa image pull --username",
    );
    for (given, field) in [
        (p.diagnostics.is_some(), "diagnostics"),
        (p.subnet_ids.is_some(), "subnetIds"),
        (p.dns_config.is_some(), "dnsConfig"),
        (p.encryption_properties.is_some(), "encryptionProperties"),
        (p.extensions.is_some(), "extensions"),
        (p.priority.is_some(), "priority"),
        (
            p.confidential_compute_properties.is_some(),
            "confidentialComputeProperties",
        ),
    ] {
        unsupported(
            problems,
            given,
            &format!("{at}.{field}"),
            "an Azure service setting",
        );
    }
    if let Some(os) = p.os_type.as_deref() {
        if !os.eq_ignore_ascii_case("linux") {
            problems.push(format!("{at}.osType: {os:?}: only Linux containers run"));
        }
    }
    if let Some(sku) = p.sku.as_deref() {
        if !sku.eq_ignore_ascii_case("standard") {
            problems.push(format!("{at}.sku: {sku:?}: only Standard"));
        }
    }
    // ACI restarts containers unless told otherwise.
    let restart_policy = match p.restart_policy.as_deref() {
        None | Some("Always") => RestartPolicy::Always,
        Some("OnFailure") => RestartPolicy::OnFailure,
        Some("Never") => RestartPolicy::Never,
        Some(other) => {
            problems.push(format!(
                "{at}.restartPolicy: {other:?} is not Always, OnFailure or Never"
            ));
            RestartPolicy::Always
        }
    };
    let volumes = p
        .volumes
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let at = format!("{at}.volumes[{i}]");
            unsupported(
                problems,
                v.azure_file.is_some(),
                &format!("{at}.azureFile"),
                "use a persistent volume in a Capsa spec",
            );
            unsupported(
                problems,
                v.git_repo.is_some(),
                &format!("{at}.gitRepo"),
                "deprecated by ACI too",
            );
            VolumeSpec {
                name: v.name,
                empty_dir: v.empty_dir.map(|_| EmptyDirSpec::default()),
                secret: v.secret,
                persistent: None,
            }
        })
        .collect();
    let (mut cpus, mut memory_mib) = (0.0f64, 0u64);
    // Run before the containers; their resources are the group's.
    let init_containers: Vec<ContainerSpec> = p
        .init_containers
        .into_iter()
        .enumerate()
        .map(|(i, c)| map_container(c, &format!("{at}.initContainers[{i}]"), problems))
        .collect();
    let mut containers: Vec<ContainerSpec> = p
        .containers
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let spec = map_container(c, &format!("{at}.containers[{i}]"), problems);
            cpus += spec.cpu_request.unwrap_or(0.0);
            memory_mib += spec.memory_request_mib.unwrap_or(0);
            spec
        })
        .collect();
    // The VM holds every container's request, and any one's limit.
    for c in &containers {
        cpus = cpus.max(c.cpu_limit.unwrap_or(0.0));
        memory_mib = memory_mib.max(c.memory_limit_mib.unwrap_or(0));
    }
    let mut labels = group.tags;
    if let Some(address) = p.ip_address {
        let at = format!("{at}.ipAddress");
        let public = match address.kind.as_deref() {
            None | Some("Public") => true,
            Some("Private") => false,
            Some(other) => {
                problems.push(format!("{at}.type: {other:?} is not Public or Private"));
                false
            }
        };
        unsupported(
            problems,
            address.ip.is_some(),
            &format!("{at}.ip"),
            "the group's address comes from its network",
        );
        if let Some(label) = address.dns_name_label {
            if label != group.name {
                problems.push(format!(
                    "{at}.dnsNameLabel: {label:?}: a group answers to its own name ({:?}) on its network; name the group so",
                    group.name
                ));
            }
            labels.insert("dnsNameLabel".into(), label);
        }
        for (j, port) in address.ports.iter().enumerate() {
            let at = format!("{at}.ports[{j}]");
            let protocol = protocol(port.protocol.as_deref(), &at, problems);
            let Some(owner) = containers.iter_mut().find(|c| {
                c.ports
                    .iter()
                    .any(|p| p.container_port == port.port && p.protocol == protocol)
            }) else {
                problems.push(format!(
                    "{at}: port {} is not a port of any container",
                    port.port
                ));
                continue;
            };
            // A Public address publishes the port on every host address;
            // a Private one leaves it on the group's network address.
            if public {
                for published in owner
                    .ports
                    .iter_mut()
                    .filter(|p| p.container_port == port.port && p.protocol == protocol)
                {
                    published.host_port = port.port;
                    published.host_ip = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
                }
            }
        }
    }
    // Ports no group address publishes are only the container's own.
    for c in &mut containers {
        c.ports.retain(|p| p.host_port != 0);
    }
    GroupSpec {
        name: group.name,
        containers,
        init_containers,
        cpus: Some((cpus.ceil() as u8).max(1)),
        memory_mib: (memory_mib > 0).then_some(memory_mib),
        cpu_limit: None,
        labels,
        restart_policy,
        volumes,
        scratch_mib: None,
        disk_rate_limit: None,
        network_rate_limit: None,
        network: None,
        auto_remove: false,
        cold_boot: false,
    }
}

/// An ACI probe as ours: exec only, one success.
fn map_probe(probe: AciProbe, at: &str, problems: &mut Vec<String>) -> Option<Probe> {
    unsupported(
        problems,
        probe.http_get.is_some(),
        &format!("{at}.httpGet"),
        "use exec",
    );
    if probe.success_threshold.is_some_and(|n| n != 1) {
        problems.push(format!("{at}.successThreshold: only 1"));
    }
    let Some(exec) = probe.exec else {
        problems.push(format!("{at}: an exec probe is needed"));
        return None;
    };
    Some(Probe {
        exec: Some(exec),
        tcp_socket: None,
        initial_delay_seconds: probe.initial_delay_seconds.unwrap_or(0),
        period_seconds: probe.period_seconds.unwrap_or(10),
        timeout_seconds: probe.timeout_seconds.unwrap_or(1),
        failure_threshold: probe.failure_threshold.unwrap_or(3),
    })
}

fn map_container(c: AciContainer, at: &str, problems: &mut Vec<String>) -> ContainerSpec {
    let p = c.properties;
    let at = format!("{at}.properties");
    unsupported(
        problems,
        p.security_context.is_some(),
        &format!("{at}.securityContext"),
        "not yet",
    );
    let mut env = indexmap::IndexMap::new();
    for (i, variable) in p.environment_variables.into_iter().enumerate() {
        match (variable.value, variable.secure_value) {
            (Some(value), None) | (None, Some(value)) => {
                env.insert(variable.name, value);
            }
            _ => problems.push(format!(
                "{at}.environmentVariables[{i}]: give exactly one of value and secureValue"
            )),
        }
    }
    let (requests, limits) = match p.resources {
        Some(r) => (Some(r.requests), r.limits),
        None => (None, None),
    };
    for (resource, field) in [(&requests, "requests"), (&limits, "limits")] {
        unsupported(
            problems,
            resource.as_ref().is_some_and(|r| r.gpu.is_some()),
            &format!("{at}.resources.{field}.gpu"),
            "no GPUs in microVMs",
        );
    }
    let ports = p
        .ports
        .iter()
        .enumerate()
        .map(|(j, port)| PortSpec {
            container_port: port.port,
            // Published only by the group's ipAddress (see map_group).
            host_port: 0,
            host_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            protocol: protocol(
                port.protocol.as_deref(),
                &format!("{at}.ports[{j}]"),
                problems,
            ),
        })
        .collect();
    let liveness_probe = p
        .liveness_probe
        .and_then(|probe| map_probe(probe, &format!("{at}.livenessProbe"), problems));
    let readiness_probe = p
        .readiness_probe
        .and_then(|probe| map_probe(probe, &format!("{at}.readinessProbe"), problems));
    ContainerSpec {
        name: c.name,
        image: p.image,
        command: p.command,
        args: None,
        env,
        working_dir: None,
        user: None,
        stop_signal: None,
        cpu_limit: limits.as_ref().and_then(|l| l.cpu),
        memory_limit_mib: limits.as_ref().and_then(|l| l.memory_in_gb).map(mib),
        cpu_request: requests.as_ref().and_then(|r| r.cpu),
        memory_request_mib: requests.as_ref().and_then(|r| r.memory_in_gb).map(mib),
        tty: false,
        stdin: false,
        ports,
        volume_mounts: p.volume_mounts,
        cap_add: Vec::new(),
        liveness_probe,
        readiness_probe,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
apiVersion: 2019-12-01
location: eastus
name: hello
type: Microsoft.ContainerInstance/containerGroups
tags:
  team: web
properties:
  osType: Linux
  restartPolicy: Never
  containers:
  - name: app
    properties:
      image: busybox
      command: ["sh", "-c", "echo $GREETING $TOKEN"]
      environmentVariables:
      - name: GREETING
        value: hello
      - name: TOKEN
        secureValue: s3cret
      resources:
        requests:
          cpu: 1
          memoryInGB: 0.5
        limits:
          cpu: 1.5
          memoryInGB: 0.75
      ports:
      - port: 80
      - port: 9000
      volumeMounts:
      - name: scratch
        mountPath: /scratch
      - name: keys
        mountPath: /keys
        readOnly: true
      livenessProbe:
        exec:
          command: ["true"]
        periodSeconds: 5
  - name: sidecar
    properties:
      image: busybox
      resources:
        requests:
          cpu: 0.5
          memoryInGB: 0.25
  ipAddress:
    type: Public
    dnsNameLabel: hello
    ports:
    - protocol: tcp
      port: 80
  volumes:
  - name: scratch
    emptyDir: {}
  - name: keys
    secret:
      key.pem: aGVsbG8=
"#;

    fn parse(text: &str) -> Result<GroupSpec, SpecError> {
        let value: Value = serde_yaml_ng::from_str(text).unwrap();
        assert!(is_aci(&value));
        group_spec(value)
    }

    #[test]
    fn init_containers_are_ours() {
        let with = SAMPLE.replace(
            "  containers:\n",
            "  initContainers:\n  - name: setup\n    properties:\n      image: busybox\n      command: [touch, /ready]\n  containers:\n",
        );
        let spec = parse(&with).unwrap();
        assert_eq!(spec.init_containers.len(), 1);
        assert_eq!(spec.init_containers[0].name, "setup");
        assert_eq!(
            spec.init_containers[0].command.as_deref(),
            Some(&["touch".to_string(), "/ready".to_string()][..])
        );
    }

    #[test]
    fn a_readiness_probe_is_ours() {
        let with = SAMPLE.replace(
            "        periodSeconds: 5",
            "        periodSeconds: 5\n      readinessProbe:\n        exec: {command: [test, -f, /ready]}\n        periodSeconds: 2",
        );
        let spec = parse(&with).unwrap();
        let probe = spec.containers[0].readiness_probe.as_ref().unwrap();
        assert_eq!(probe.period_seconds, 2);
        assert_eq!(
            probe.exec.as_ref().unwrap().command,
            ["test", "-f", "/ready"]
        );
    }

    #[test]
    fn the_sample_maps_to_an_equal_group() {
        let spec = parse(SAMPLE).unwrap();
        assert_eq!(spec.name, "hello");
        assert_eq!(spec.restart_policy, RestartPolicy::Never);
        assert_eq!(spec.labels["team"], "web");
        // The requests together (1.5 CPUs, 768 MiB), and any one limit.
        assert_eq!((spec.cpus, spec.memory_mib), (Some(2), Some(768)));
        let app = &spec.containers[0];
        assert_eq!(app.env["GREETING"], "hello");
        assert_eq!(app.env["TOKEN"], "s3cret");
        assert_eq!(app.memory_limit_mib, Some(768));
        assert_eq!(app.cpu_request, Some(1.0));
        assert_eq!(app.ports.len(), 1, "only what the address publishes");
        assert_eq!(app.ports[0].to_string(), "80/tcp -> 0.0.0.0:80");
        assert!(app.volume_mounts[1].read_only);
        assert_eq!(app.liveness_probe.as_ref().unwrap().period_seconds, 5);
        assert!(spec.volumes[0].empty_dir.is_some());
        assert_eq!(
            spec.volumes[1].secret.as_ref().unwrap()["key.pem"],
            "aGVsbG8="
        );
    }

    #[test]
    fn what_capsa_does_not_run_is_named() {
        let bad = SAMPLE
            .replace("osType: Linux", "osType: Windows")
            .replace("dnsNameLabel: hello", "dnsNameLabel: other")
            .replace(
                "  volumes:\n",
                "  imageRegistryCredentials: [{server: r}]\n  volumes:\n  - name: share\n    azureFile: {shareName: s}\n",
            )
            .replace("        periodSeconds: 5", "        periodSeconds: 5\n      readinessProbe: {httpGet: {path: /}}");
        let problems = parse(&bad).unwrap_err().problems;
        for field in [
            "properties.osType",
            "properties.ipAddress.dnsNameLabel",
            "properties.imageRegistryCredentials",
            "properties.volumes[0].azureFile",
            "properties.containers[0].properties.readinessProbe.httpGet",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(field)),
                "{field} not named in {problems:?}"
            );
        }
        let unknown = parse(&SAMPLE.replace("  osType: Linux", "  osTipe: Linux")).unwrap_err();
        assert!(unknown.problems[0].contains("osTipe"), "{unknown:?}");
        let both = SAMPLE.replace("value: hello", "value: hello\n        secureValue: x");
        assert!(parse(&both).unwrap_err().problems[0].contains("environmentVariables[0]"));
    }
}
