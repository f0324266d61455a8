//! deploy/*.yaml parsed with k8s-openapi's types and checked for what the
//! agent needs and for what it must not get, so the manifests cannot rot:
//! a field k8s-openapi does not know (a typo, a field of another version)
//! fails the round trip, and RBAC, capabilities, mounts and probes are
//! checked against the agent's needs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::serde::de::DeserializeOwned;
use k8s_openapi::serde::{Deserialize, Serialize};
use serde_json::Value;

/// Capabilities the agent may hold (deploy/README.md says why each, and
/// that the agent cannot start without any one of them).
const ALLOWED_CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    daemon_sets: Vec<DaemonSet>,
}

/// Deserializes `document` as `T` and checks that serializing it back gives
/// the same JSON: k8s-openapi skips fields it does not know, so a
/// misspelled or misplaced field shows up as a difference here.
fn typed<T: DeserializeOwned + Serialize>(document: &Value, origin: &str) -> T {
    let object: T = serde_json::from_value(document.clone()).unwrap_or_else(|error| {
        panic!(
            "{origin}: not a valid {}: {error}",
            std::any::type_name::<T>()
        )
    });
    let round_trip = serde_json::to_value(&object).expect("k8s-openapi types serialize");
    if let Some(difference) = first_difference(document, &round_trip, "") {
        panic!("{origin}: {difference} (a field k8s-openapi does not know, or a wrong type)");
    }
    object
}

fn first_difference(written: &Value, understood: &Value, path: &str) -> Option<String> {
    match (written, understood) {
        (Value::Object(written), Value::Object(understood)) => {
            for (key, value) in written {
                let here = format!("{path}.{key}");
                match understood.get(key) {
                    Some(other) => {
                        if let Some(difference) = first_difference(value, other, &here) {
                            return Some(difference);
                        }
                    }
                    None => return Some(format!("{here} was dropped")),
                }
            }
            understood
                .keys()
                .find(|key| !written.contains_key(*key))
                .map(|key| format!("{path}.{key} appeared"))
        }
        (Value::Array(written), Value::Array(understood)) if written.len() == understood.len() => {
            written
                .iter()
                .zip(understood)
                .enumerate()
                .find_map(|(index, (a, b))| first_difference(a, b, &format!("{path}[{index}]")))
        }
        _ if written == understood => None,
        _ => Some(format!(
            "{path} is {written} but reads back as {understood}"
        )),
    }
}

fn load() -> Manifests {
    let mut manifests = Manifests::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("read deploy/")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "yaml" || extension == "yml")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "deploy/ holds manifests");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read a manifest");
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let origin = format!("{} document {}", file.display(), index + 1);
            let yaml = serde_yaml::Value::deserialize(document)
                .unwrap_or_else(|error| panic!("{origin}: not YAML: {error}"));
            if yaml.is_null() {
                continue;
            }
            let document = serde_json::to_value(&yaml).expect("YAML maps to JSON");
            let kind = (
                document["apiVersion"].as_str().unwrap_or_default(),
                document["kind"].as_str().unwrap_or_default(),
            );
            match kind {
                ("v1", "Namespace") => manifests.namespaces.push(typed(&document, &origin)),
                ("v1", "ServiceAccount") => {
                    manifests.service_accounts.push(typed(&document, &origin))
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    manifests.cluster_roles.push(typed(&document, &origin));
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    manifests
                        .cluster_role_bindings
                        .push(typed(&document, &origin));
                }
                ("apps/v1", "DaemonSet") => manifests.daemon_sets.push(typed(&document, &origin)),
                (api_version, kind) => panic!("{origin}: unexpected {api_version}/{kind}"),
            }
        }
    }
    manifests
}

fn daemon_set(manifests: &Manifests) -> &DaemonSet {
    assert_eq!(manifests.daemon_sets.len(), 1, "one DaemonSet");
    &manifests.daemon_sets[0]
}

fn pod_spec(daemon_set: &DaemonSet) -> &PodSpec {
    daemon_set
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .expect("a pod template")
}

fn agent(daemon_set: &DaemonSet) -> &Container {
    let containers = &pod_spec(daemon_set).containers;
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

#[test]
fn cluster_role_reads_exactly_services_endpointslices_and_nodes() {
    let manifests = load();
    assert_eq!(manifests.cluster_roles.len(), 1, "one ClusterRole");
    let role = &manifests.cluster_roles[0];
    assert!(role.aggregation_rule.is_none());
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none(), "no per-name rules");
        assert!(rule.non_resource_urls.is_none(), "no non-resource URLs");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    for (group, resource) in [
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "nodes"),
    ] {
        for verb in ["get", "list", "watch"] {
            expected.insert((group.to_owned(), resource.to_owned(), verb.to_owned()));
        }
    }
    assert_eq!(granted, expected);
}

#[test]
fn the_service_account_exists_and_is_bound_to_the_role() {
    let manifests = load();
    let daemon_set = daemon_set(&manifests);
    let namespace = daemon_set
        .metadata
        .namespace
        .as_deref()
        .expect("a namespace");
    assert!(
        namespace == "kube-system"
            || manifests
                .namespaces
                .iter()
                .any(|candidate| candidate.metadata.name.as_deref() == Some(namespace)),
        "namespace {namespace} is created by the manifests"
    );
    let account = pod_spec(daemon_set)
        .service_account_name
        .as_deref()
        .expect("the DaemonSet names its ServiceAccount");
    assert!(
        manifests.service_accounts.iter().any(|candidate| {
            candidate.metadata.name.as_deref() == Some(account)
                && candidate.metadata.namespace.as_deref() == Some(namespace)
        }),
        "ServiceAccount {namespace}/{account} exists"
    );
    let role = manifests.cluster_roles[0]
        .metadata
        .name
        .as_deref()
        .expect("a role name");
    assert_eq!(manifests.cluster_role_bindings.len(), 1, "one binding");
    let binding = &manifests.cluster_role_bindings[0];
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, role);
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "bound to the agent only");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, account);
    assert_eq!(subjects[0].namespace.as_deref(), Some(namespace));
    // The namespace admits what the agent needs (Pod Security).
    if let Some(created) = manifests
        .namespaces
        .iter()
        .find(|candidate| candidate.metadata.name.as_deref() == Some(namespace))
    {
        let labels = created.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels
                .get("pod-security.kubernetes.io/enforce")
                .map(String::as_str),
            Some("privileged")
        );
    }
}

#[test]
fn the_agent_has_the_fewest_capabilities_and_is_not_privileged() {
    let manifests = load();
    let security = agent(daemon_set(&manifests))
        .security_context
        .as_ref()
        .expect("a securityContext");
    assert_ne!(security.privileged, Some(true), "not privileged");
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let allowed: BTreeSet<&str> = ALLOWED_CAPABILITIES.into_iter().collect();
    assert!(added.is_subset(&allowed), "only {allowed:?}, got {added:?}");
    assert!(
        added.contains("BPF") && added.contains("NET_ADMIN"),
        "{added:?}"
    );
    assert!(!added.contains("SYS_ADMIN"));
    let pod_security = pod_spec(daemon_set(&manifests)).security_context.as_ref();
    assert!(pod_security.is_none_or(|context| context.sysctls.is_none()));
}

#[test]
fn the_agent_runs_on_every_node_in_the_host_network() {
    let manifests = load();
    let daemon_set = daemon_set(&manifests);
    let spec = daemon_set.spec.as_ref().expect("a spec");
    let pod = pod_spec(daemon_set);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations.iter().flatten().any(|toleration| {
            toleration.operator.as_deref() == Some("Exists")
                && toleration.key.is_none()
                && toleration.effect.is_none()
        }),
        "tolerates every taint"
    );
    assert_eq!(
        spec.update_strategy
            .as_ref()
            .and_then(|strategy| strategy.type_.as_deref()),
        Some("RollingUpdate")
    );
    // The selector must select the template (the API server checks it).
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    let labels: BTreeMap<String, String> = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    assert!(!selector.is_empty());
    assert!(
        selector
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    );
}

#[test]
fn the_agent_knows_its_node_and_reports_readiness() {
    let manifests = load();
    let container = agent(daemon_set(&manifests));
    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|variable| variable.name == "NODE_NAME")
        .expect("NODE_NAME is set");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|source| source.field_ref.as_ref())
        .expect("NODE_NAME comes from the downward API");
    assert_eq!(field.field_path, "spec.nodeName");
    // The API server is reached directly, not through the ClusterIP the
    // agent itself programs.
    for variable in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        let value = container
            .env
            .iter()
            .flatten()
            .find(|env| env.name == variable)
            .and_then(|env| env.value.as_deref())
            .unwrap_or_else(|| panic!("{variable} is set"));
        assert!(!value.is_empty(), "{variable}");
    }
    let args = container.args.as_deref().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("run"));
    assert!(args.iter().any(|arg| arg == "--node-name=$(NODE_NAME)"));
    assert!(
        args.iter().any(|arg| arg == "--attach-veths"),
        "the pods' veths are found, not listed"
    );
    the_agent_accepts(args);
    assert!(
        !args
            .iter()
            .any(|arg| arg.starts_with("--kubeconfig") || arg.starts_with("--manifests")),
        "in-cluster configuration, Kubernetes source"
    );

    // Probes reach the port the agent serves its health endpoint on.
    let health_port: i32 = args
        .iter()
        .find_map(|arg| arg.strip_prefix("--health-addr="))
        .and_then(|address| address.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .expect("--health-addr=HOST:PORT");
    let ports = container.ports.as_deref().unwrap_or_default();
    let port_number = |port: &IntOrString| match port {
        IntOrString::Int(number) => *number,
        IntOrString::String(name) => ports
            .iter()
            .find(|candidate| candidate.name.as_deref() == Some(name.as_str()))
            .map(|candidate| candidate.container_port)
            .unwrap_or_else(|| panic!("no container port named {name}")),
    };
    for (probe, path) in [
        (container.readiness_probe.as_ref(), "/readyz"),
        (container.liveness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe
            .and_then(|probe| probe.http_get.as_ref())
            .unwrap_or_else(|| panic!("an HTTP probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            port_number(&get.port),
            health_port,
            "{path} probes the health address"
        );
    }

    let resources = container.resources.as_ref().expect("resources");
    let requests = resources.requests.clone().unwrap_or_default();
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    assert!(
        resources
            .limits
            .as_ref()
            .is_some_and(|limits| limits.contains_key("memory"))
    );
}

#[test]
fn bpffs_and_cgroup_come_from_the_host() {
    let manifests = load();
    let daemon_set = daemon_set(&manifests);
    let pod = pod_spec(daemon_set);
    let container = agent(daemon_set);
    let host_path_of = |volume_name: &str| {
        pod.volumes
            .iter()
            .flatten()
            .find(|volume| volume.name == volume_name)
            .and_then(|volume| volume.host_path.as_ref())
            .map(|host_path| host_path.path.clone())
    };
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    let bpffs = mounts
        .iter()
        .find(|mount| mount.mount_path == "/sys/fs/bpf")
        .expect("bpffs is mounted at /sys/fs/bpf");
    assert_eq!(host_path_of(&bpffs.name).as_deref(), Some("/sys/fs/bpf"));
    assert_ne!(bpffs.read_only, Some(true), "the agent pins its maps there");
    let cgroup = mounts
        .iter()
        .find(|mount| mount.mount_path == "/sys/fs/cgroup")
        .expect("the cgroup hierarchy is mounted");
    assert_eq!(
        host_path_of(&cgroup.name).as_deref(),
        Some("/sys/fs/cgroup")
    );
    // The API server refuses Bidirectional propagation in containers that
    // are not privileged.
    let privileged = container
        .security_context
        .as_ref()
        .and_then(|context| context.privileged)
        .unwrap_or(false);
    for mount in mounts {
        assert!(
            privileged || mount.mount_propagation.as_deref() != Some("Bidirectional"),
            "{} uses Bidirectional propagation without privileged",
            mount.mount_path
        );
    }
    // Pins go inside the bpffs mount.
    let pin_dir = container
        .args
        .iter()
        .flatten()
        .find_map(|arg| arg.strip_prefix("--pin-dir="))
        .expect("--pin-dir");
    assert!(pin_dir.starts_with("/sys/fs/bpf/"), "{pin_dir}");
}

#[test]
fn the_image_is_built_with_the_toolchain_the_agent_pins() {
    let containerfile =
        std::fs::read_to_string(deploy_dir().join("Containerfile")).expect("read Containerfile");
    let build_script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../lb-agent/build.rs"))
            .expect("read lb-agent/build.rs");
    let toolchain = build_script
        .lines()
        .find_map(|line| line.trim().strip_prefix("const BPF_TOOLCHAIN: &str = \""))
        .and_then(|rest| rest.strip_suffix("\";"))
        .expect("lb-agent/build.rs pins BPF_TOOLCHAIN");
    let stages: Vec<&str> = containerfile
        .lines()
        .filter(|line| line.starts_with("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    assert!(
        stages[0].contains(&format!("rust:{toolchain}")),
        "{}",
        stages[0]
    );
    assert!(stages[1].contains("debian"), "{}", stages[1]);
    assert!(containerfile.contains(&format!("rust-src --toolchain {toolchain}")));
    assert!(containerfile.contains("cargo install bpf-linker --version 0.13."));
    // The runtime stage takes the binary and nothing else from the build.
    let runtime = containerfile
        .split("FROM ")
        .nth(2)
        .expect("a runtime stage");
    let copies: Vec<&str> = runtime
        .lines()
        .filter(|line| line.starts_with("COPY"))
        .collect();
    assert_eq!(
        copies,
        ["COPY --from=build /lb-agent /usr/local/bin/lb-agent"]
    );
    let daemon_set = daemon_set(&load()).clone();
    let command = agent(&daemon_set).command.clone().unwrap_or_default();
    assert_eq!(command, ["/usr/local/bin/lb-agent"]);
}

/// The agent binary parses `args` (`$(NODE_NAME)` filled in, as the kubelet
/// does): outside a cluster it then stops on the missing in-cluster
/// configuration (exit 1, before loading or binding anything), not on a
/// usage error (exit 2).
fn the_agent_accepts(args: &[String]) {
    let binary = lb_tests::agent::agent_binary().expect("the agent binary");
    let args: Vec<String> = args
        .iter()
        .map(|arg| arg.replace("$(NODE_NAME)", "node-1"))
        .collect();
    let output = std::process::Command::new(&binary)
        .args(&args)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("RUST_LOG")
        .output()
        .expect("running the agent");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(stderr.contains("in-cluster configuration"), "{stderr}");
}
