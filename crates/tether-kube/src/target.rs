//! From `deploy/api` to one running, ready pod and one container in it.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, ReplicaSet, StatefulSet},
        batch::v1::Job,
        core::v1::{Container, Pod, Probe},
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{Api, Client, ResourceExt, api::ListParams};
use tether_config::{KubeKind, KubeTarget};

/// Containers that are a mesh's sidecar, never the app.
const SIDECARS: [&str; 2] = ["istio-proxy", "linkerd-proxy"];

/// The pod and container a session works against.
#[derive(Debug, Clone)]
pub struct TargetPod {
    pub namespace: String,
    pub pod: String,
    /// The pod's uid: a StatefulSet's replacement pod has the same name, never the same uid.
    pub uid: String,
    pub node: String,
    pub container: String,
    /// `containerd://…`, `cri-o://…`, `docker://…`.
    pub container_id: String,
    pub pod_ip: Option<String>,
    pub mesh: Option<Mesh>,
    pub probes: Vec<ProbePort>,
    /// What tether chose on the user's behalf, to say so (`"pod api-7d9c of deploy/api"`).
    pub notes: Vec<String>,
    /// `shareProcessNamespace`: the pod's containers share one PID namespace (PID 1 is the
    /// pause process).
    pub shares_process_namespace: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mesh {
    Istio,
    Linkerd,
}

impl std::fmt::Display for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mesh::Istio => "Istio",
            Mesh::Linkerd => "Linkerd",
        })
    }
}

/// A kubelet probe of the target container, with its port resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbePort {
    /// `liveness`, `readiness` or `startup`.
    pub kind: &'static str,
    pub port: u16,
    /// `http`, `grpc` or `tcp`.
    pub protocol: &'static str,
}

/// Finds the pod and container of `target` in `namespace`.
pub async fn resolve(
    client: &Client,
    namespace: &str,
    target: &KubeTarget,
) -> anyhow::Result<TargetPod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let (pod, mut notes) = match target.kind {
        KubeKind::Pod => {
            let pod = match pods
                .get_opt(&target.name)
                .await
                .context("cannot read pods")?
            {
                Some(pod) => pod,
                None => {
                    let names = names(pods.list(&ListParams::default()).await?.items);
                    bail!(
                        "pod/{} not found in namespace {namespace}; {}",
                        target.name,
                        existing("pods", &names)
                    );
                }
            };
            if let Some(problem) = not_ready(&pod) {
                bail!("pod/{} is not ready: {problem}", target.name);
            }
            (pod, Vec::new())
        }
        kind => {
            let selector = workload_selector(client, namespace, kind, &target.name).await?;
            let candidates = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .context("cannot list the workload's pods")?
                .items;
            let total = candidates.len();
            let mut problems = Vec::new();
            let mut ready: Vec<Pod> = Vec::new();
            for pod in candidates {
                match not_ready(&pod) {
                    None => ready.push(pod),
                    Some(problem) => problems.push(format!("{}: {problem}", pod.name_any())),
                }
            }
            // The oldest ready pod: the one least likely to be replaced first by a rollout.
            ready.sort_by_key(|p| (p.metadata.creation_timestamp.clone(), p.name_any()));
            let Some(pod) = ready.into_iter().next() else {
                if total == 0 {
                    bail!(
                        "{}/{} has no pods (selector {selector}); is it scaled to zero?",
                        kind.as_str(),
                        target.name
                    );
                }
                bail!(
                    "no running, ready pod in {}/{}: {}",
                    kind.as_str(),
                    target.name,
                    problems.join("; ")
                );
            };
            let note = format!(
                "pod {} of {}/{}",
                pod.name_any(),
                kind.as_str(),
                target.name
            );
            (pod, vec![note])
        }
    };
    let mut found = target_pod(&pod, namespace, target.container.as_deref(), &mut notes)?;
    found.notes = notes;
    Ok(found)
}

/// The target in `pod`: its `container` (by default the app's, skipping sidecars), where it
/// runs, its probes. What tether chose on the user's behalf is added to `notes`.
pub fn target_pod(
    pod: &Pod,
    namespace: &str,
    container: Option<&str>,
    notes: &mut Vec<String>,
) -> anyhow::Result<TargetPod> {
    let spec = pod.spec.clone().unwrap_or_default();
    let container = pick_container(&spec.containers, container, notes)
        .with_context(|| format!("in pod {}", pod.name_any()))?;
    let container_id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|all| all.iter().find(|s| s.name == container.name))
        .and_then(|s| s.container_id.clone())
        .filter(|id| !id.is_empty())
        .with_context(|| {
            format!(
                "container {} of pod {} has not started (no container id yet)",
                container.name,
                pod.name_any()
            )
        })?;
    let node = spec
        .node_name
        .clone()
        .with_context(|| format!("pod {} is not on a node yet", pod.name_any()))?;
    Ok(TargetPod {
        namespace: namespace.to_owned(),
        pod: pod.name_any(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        node,
        container: container.name.clone(),
        container_id,
        pod_ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        mesh: mesh(pod),
        probes: probe_ports(container),
        notes: Vec::new(),
        shares_process_namespace: spec.share_process_namespace == Some(true),
    })
}

/// The pods a workload selects, as a label selector string.
pub async fn workload_selector(
    client: &Client,
    namespace: &str,
    kind: KubeKind,
    name: &str,
) -> anyhow::Result<String> {
    async fn get<K>(
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<Result<K, Vec<String>>>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(client.clone(), namespace);
        match api.get_opt(name).await? {
            Some(object) => Ok(Ok(object)),
            None => Ok(Err(api
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .map(ResourceExt::name_any)
                .collect())),
        }
    }

    let found: Result<Option<LabelSelector>, Vec<String>> = match kind {
        KubeKind::Deployment => get::<Deployment>(client, namespace, name)
            .await?
            .map(|d| d.spec.map(|s| s.selector)),
        KubeKind::StatefulSet => get::<StatefulSet>(client, namespace, name)
            .await?
            .map(|d| d.spec.map(|s| s.selector)),
        KubeKind::ReplicaSet => get::<ReplicaSet>(client, namespace, name)
            .await?
            .map(|d| d.spec.map(|s| s.selector)),
        KubeKind::Job => get::<Job>(client, namespace, name)
            .await?
            .map(|d| d.spec.and_then(|s| s.selector)),
        KubeKind::Pod => unreachable!("pods have no selector"),
    };
    let plural = match kind {
        KubeKind::Deployment => "deployments",
        KubeKind::StatefulSet => "statefulsets",
        KubeKind::ReplicaSet => "replicasets",
        KubeKind::Job => "jobs",
        KubeKind::Pod => "pods",
    };
    match found {
        Ok(Some(selector)) => selector_string(&selector)
            .with_context(|| format!("{}/{name} has an empty selector", kind.as_str())),
        Ok(None) => bail!("{}/{name} has no selector", kind.as_str()),
        Err(names) => bail!(
            "{}/{name} not found in namespace {namespace}; {}",
            kind.as_str(),
            existing(plural, &names)
        ),
    }
}

/// `matchLabels` and `matchExpressions` as a label selector string.
pub fn selector_string(selector: &LabelSelector) -> Option<String> {
    let mut terms: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for expression in selector.match_expressions.iter().flatten() {
        let values = expression.values.clone().unwrap_or_default().join(",");
        terms.push(match expression.operator.as_str() {
            "In" => format!("{} in ({values})", expression.key),
            "NotIn" => format!("{} notin ({values})", expression.key),
            "Exists" => expression.key.clone(),
            "DoesNotExist" => format!("!{}", expression.key),
            _ => continue,
        });
    }
    (!terms.is_empty()).then(|| terms.join(","))
}

/// Why a pod cannot be a target now (`None`: it can).
pub fn not_ready(pod: &Pod) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Some("terminating".into());
    }
    let status = pod.status.as_ref()?;
    // A waiting container says most: CrashLoopBackOff, ImagePullBackOff, …
    for container in status.container_statuses.iter().flatten() {
        if let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = waiting.reason.clone().unwrap_or_else(|| "waiting".into());
            return Some(if container.restart_count > 0 {
                format!(
                    "{reason} (container {} restarted {} times)",
                    container.name, container.restart_count
                )
            } else {
                format!("{reason} (container {})", container.name)
            });
        }
    }
    let phase = status.phase.clone().unwrap_or_else(|| "Unknown".into());
    if phase != "Running" {
        return Some(phase);
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    (!ready).then(|| "running but not ready".into())
}

fn pick_container<'a>(
    containers: &'a [Container],
    wanted: Option<&str>,
    notes: &mut Vec<String>,
) -> anyhow::Result<&'a Container> {
    let all: Vec<&str> = containers.iter().map(|c| c.name.as_str()).collect();
    if let Some(wanted) = wanted {
        return containers
            .iter()
            .find(|c| c.name == wanted)
            .with_context(|| format!("no container {wanted}; containers: {}", all.join(", ")));
    }
    let apps: Vec<&Container> = containers
        .iter()
        .filter(|c| !SIDECARS.contains(&c.name.as_str()))
        .collect();
    match apps.as_slice() {
        [] => bail!(
            "only sidecar containers ({}); name one with /container/NAME",
            all.join(", ")
        ),
        [only] => {
            if containers.len() > 1 {
                notes.push(format!("container {} (skipping sidecars)", only.name));
            }
            Ok(only)
        }
        [first, ..] => {
            notes.push(format!(
                "container {} of {} (choose with /container/NAME)",
                first.name,
                all.join(", ")
            ));
            Ok(first)
        }
    }
}

fn mesh(pod: &Pod) -> Option<Mesh> {
    let annotations: BTreeMap<String, String> =
        pod.metadata.annotations.clone().unwrap_or_default();
    let containers: Vec<&str> = pod
        .spec
        .iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .map(|c| c.name.as_str())
        .collect();
    if annotations.contains_key("sidecar.istio.io/status") || containers.contains(&"istio-proxy") {
        Some(Mesh::Istio)
    } else if annotations.contains_key("linkerd.io/proxy-version")
        || containers.contains(&"linkerd-proxy")
    {
        Some(Mesh::Linkerd)
    } else {
        None
    }
}

/// The container's probes, with named ports resolved against its `ports`.
pub fn probe_ports(container: &Container) -> Vec<ProbePort> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let resolve = |port: &IntOrString| match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    };
    let probes: [(&'static str, &Option<Probe>); 3] = [
        ("liveness", &container.liveness_probe),
        ("readiness", &container.readiness_probe),
        ("startup", &container.startup_probe),
    ];
    probes
        .into_iter()
        .filter_map(|(kind, probe)| {
            let probe = probe.as_ref()?;
            let (port, protocol) = if let Some(http) = &probe.http_get {
                (resolve(&http.port)?, "http")
            } else if let Some(grpc) = &probe.grpc {
                (u16::try_from(grpc.port).ok()?, "grpc")
            } else if let Some(tcp) = &probe.tcp_socket {
                (resolve(&tcp.port)?, "tcp")
            } else {
                return None;
            };
            Some(ProbePort {
                kind,
                port,
                protocol,
            })
        })
        .collect()
}

/// One thing `--target` can name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Targetable {
    /// `deploy/api`, `pod/api-7d9c-x2k4q`, …
    pub target: String,
    /// `2/3` ready pods, or the pod's state.
    pub ready: String,
    /// Whether a session can start on it now.
    pub usable: bool,
}

/// Every workload and pod in `namespace` a session can target (tether's own agent pods
/// excluded).
pub async fn list(client: &Client, namespace: &str) -> anyhow::Result<Vec<Targetable>> {
    let params = ListParams::default();
    let mut out = Vec::new();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    for d in deployments
        .list(&params)
        .await
        .context("cannot list deployments")?
    {
        let status = d.status.clone().unwrap_or_default();
        let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let ready = status.ready_replicas.unwrap_or(0);
        out.push(Targetable {
            target: format!("deploy/{}", d.name_any()),
            ready: format!("{ready}/{want}"),
            usable: ready > 0,
        });
    }
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    for s in sets
        .list(&params)
        .await
        .context("cannot list statefulsets")?
    {
        let status = s.status.clone().unwrap_or_default();
        let want = s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let ready = status.ready_replicas.unwrap_or(0);
        out.push(Targetable {
            target: format!("statefulset/{}", s.name_any()),
            ready: format!("{ready}/{want}"),
            usable: ready > 0,
        });
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let agents = "app.kubernetes.io/name!=tether-agent";
    for pod in pods
        .list(&ListParams::default().labels(agents))
        .await
        .context("cannot list pods")?
    {
        let problem = not_ready(&pod);
        out.push(Targetable {
            target: format!("pod/{}", pod.name_any()),
            ready: problem.clone().unwrap_or_else(|| "Running, ready".into()),
            usable: problem.is_none(),
        });
    }
    Ok(out)
}

fn names(pods: Vec<Pod>) -> Vec<String> {
    pods.iter().map(ResourceExt::name_any).collect()
}

fn existing(plural: &str, names: &[String]) -> String {
    match names {
        [] => format!("there are no {plural} there"),
        names if names.len() <= 10 => format!("{plural} there: {}", names.join(", ")),
        names => format!(
            "{plural} there: {}, … ({} in all)",
            names[..10].join(", "),
            names.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(json: serde_json::Value) -> Container {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn named_probe_ports_are_resolved() {
        let c = container(serde_json::json!({
            "name": "app",
            "ports": [{"name": "http", "containerPort": 8080}, {"name": "admin", "containerPort": 9901}],
            "livenessProbe": {"httpGet": {"port": "http", "path": "/healthz"}},
            "readinessProbe": {"tcpSocket": {"port": "admin"}},
            "startupProbe": {"grpc": {"port": 9090}},
        }));
        assert_eq!(
            probe_ports(&c),
            [
                ProbePort {
                    kind: "liveness",
                    port: 8080,
                    protocol: "http"
                },
                ProbePort {
                    kind: "readiness",
                    port: 9901,
                    protocol: "tcp"
                },
                ProbePort {
                    kind: "startup",
                    port: 9090,
                    protocol: "grpc"
                },
            ]
        );
        let unknown = container(serde_json::json!({
            "name": "app", "livenessProbe": {"httpGet": {"port": "nope"}}
        }));
        assert!(probe_ports(&unknown).is_empty());
    }

    #[test]
    fn sidecars_are_skipped_and_choices_are_said() {
        let containers: Vec<Container> = ["istio-proxy", "app"]
            .iter()
            .map(|n| container(serde_json::json!({"name": n})))
            .collect();
        let mut notes = Vec::new();
        assert_eq!(
            pick_container(&containers, None, &mut notes).unwrap().name,
            "app"
        );
        assert_eq!(notes, ["container app (skipping sidecars)"]);
        let error = pick_container(&containers, Some("db"), &mut notes).unwrap_err();
        assert_eq!(
            error.to_string(),
            "no container db; containers: istio-proxy, app"
        );
        let two: Vec<Container> = ["web", "worker"]
            .iter()
            .map(|n| container(serde_json::json!({"name": n})))
            .collect();
        let mut notes = Vec::new();
        assert_eq!(pick_container(&two, None, &mut notes).unwrap().name, "web");
        assert!(
            notes[0].contains("choose with /container/NAME"),
            "{notes:?}"
        );
    }

    #[test]
    fn selectors_become_strings() {
        let selector: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": {"app": "api"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "edge"]},
                                 {"key": "canary", "operator": "DoesNotExist"}]
        }))
        .unwrap();
        assert_eq!(
            selector_string(&selector).unwrap(),
            "app=api,tier in (web,edge),!canary"
        );
    }
}
