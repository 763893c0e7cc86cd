//! A Kubernetes cluster simulator: a real HTTP API server speaking the subset of the API tether
//! uses, backed by the test's network-namespace pods.
//!
//! - **API**: get/list/watch of pods, deployments, replicasets, statefulsets, jobs and events;
//!   create/delete of jobs; SelfSubjectAccessReview. Objects are JSON in the shapes of
//!   `k8s-openapi` (checked when they are stored), with `resourceVersion`, `uid` and
//!   `creationTimestamp` stamped as the API server does. Watches replay the history after the
//!   given `resourceVersion` as `{"type":…,"object":…}` lines. Errors are `metav1.Status`.
//! - **Bearer token** from the kubeconfig the simulator writes; anything else gets 401.
//! - **RBAC**: [`Cluster::deny`] takes a permission away; requests needing it get 403 and
//!   SelfSubjectAccessReview says `allowed: false`.
//! - **Pods**: [`Cluster::add_deployment`] and [`Cluster::add_pod`] publish pods whose
//!   containers are real processes in the test's namespaces, each moved into a cgroup named like
//!   a containerd container ([`crate::cgroup`]), so a node agent can find them by container id.
//! - **Kubelet** (`kubelet.rs`): creating a Job creates its pod and really runs the container's
//!   command (mapped to the agent binary under test) in a namespace of its own, in a new PID
//!   namespace unless the pod has `hostPID: true` (so a pod without it cannot see the node's
//!   processes, as in a real cluster). Jobs are deleted with their pods only with a
//!   `propagationPolicy` (the API's default for Jobs orphans them); `ttlSecondsAfterFinished`
//!   and `activeDeadlineSeconds` are honoured.
//! - **Ephemeral containers**: `PATCH pods/NAME/ephemeralcontainers` adds them to the pod and
//!   runs them in the pod's network namespace and its app container's PID namespace.
//! - **Workloads** (`workload.rs`): pods deleted gracefully (terminating, then gone) and replaced
//!   by successors with new addresses and container ids, rollouts through a new ReplicaSet,
//!   scaling, with the workloads' status kept; Services as kube-proxy programs them (nft DNAT in
//!   the client's namespace to the ready pods).
//! - **Port-forward** (`portforward.rs`): `pods/NAME/portforward` over WebSocket, byte for byte
//!   as the kubelet speaks it (field-notes.md §1), into the pod's namespace. Faults:
//!   [`Cluster::drop_port_forwards`], [`Cluster::refuse_port_forwards`].

mod api;
mod images;
mod kubelet;
mod portforward;
mod rest;
mod store;
mod workload;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{Network, Pod, cgroup::Container};

use store::{DEPLOYMENTS, PODS, REPLICASETS, Store};

/// The node every simulated pod runs on.
pub const NODE: &str = "sim-node-1";

/// A running simulator. Dropping it stops the server and every agent pod it started.
#[derive(Debug)]
pub struct Cluster {
    state: Arc<State>,
    addr: SocketAddr,
    kubeconfig: tempfile::NamedTempFile,
    runtime: Option<tokio::runtime::Runtime>,
}

/// What a simulated pod's main container is.
#[derive(Debug, Clone)]
pub struct AppPod<'a> {
    /// The network namespace (and address) of the pod.
    pub pod: &'a Pod,
    /// The container's main process (its namespaces are the container's).
    pub pid: u32,
    /// Container ports: `(name, port)`.
    pub ports: Vec<(String, u16)>,
    /// Extra fields merged into the app container (probes, env, …), as pod spec JSON.
    pub container: Value,
    /// An Istio sidecar container and annotation next to the app.
    pub istio: bool,
}

impl<'a> AppPod<'a> {
    pub fn new(pod: &'a Pod, pid: u32) -> AppPod<'a> {
        AppPod {
            pod,
            pid,
            ports: vec![("http".into(), 80)],
            container: json!({}),
            istio: false,
        }
    }
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) token: String,
    /// The agent image's entrypoint, as it runs here: the container's `args` are appended.
    pub(crate) agent_command: Vec<String>,
    pub(crate) store: Mutex<Store>,
    /// Bumped on every change; watches wait on it.
    pub(crate) changed: watch::Sender<u64>,
    /// Network namespace of each pod, by `namespace/name`.
    pub(crate) pod_netns: Mutex<HashMap<String, String>>,
    /// The app container's main process of each pod, by `namespace/name`.
    pub(crate) pod_pids: Mutex<HashMap<String, u32>>,
    /// Permissions taken away: `(verb, resource[/subresource])`.
    pub(crate) denied: Mutex<HashSet<(String, String)>>,
    pub(crate) faults: Mutex<Faults>,
    /// Live port-forward connections; [`Cluster::drop_port_forwards`] aborts them.
    pub(crate) port_forwards: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Agent pods' processes, by `namespace/name`.
    pub(crate) running: Mutex<HashMap<String, kubelet::Running>>,
    /// Where agent pods get their namespaces.
    pub(crate) network_prefix: String,
    pub(crate) next_netns: std::sync::atomic::AtomicU32,
    /// The `/etc/hosts` and `/etc/resolv.conf` agent pods get (the cluster's names).
    pub(crate) hosts: String,
    pub(crate) resolv_conf: String,
    /// `/etc/netns/NAME` directories written for agent pods, removed on drop.
    pub(crate) etc_dirs: Mutex<Vec<std::path::PathBuf>>,
    /// Agent pods' output (stdout and stderr), by `namespace/name`.
    pub(crate) logs: Mutex<HashMap<String, Vec<String>>>,
    /// cgroup directories of the app containers (removed with the simulator).
    pub(crate) containers: Mutex<Vec<Container>>,
    /// Services whose virtual IPs follow their pods ([`Cluster::expose`]).
    pub(crate) services: Mutex<Vec<workload::Service>>,
    /// Entrypoints of images pulled from loopback registries.
    pub(crate) image_dir: tempfile::TempDir,
    /// Images pulled from loopback registries, in order.
    pub(crate) pulled: Mutex<Vec<String>>,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Faults {
    pub(crate) refuse_port_forwards: bool,
    /// Port-forward upgrades are answered this late (a slow apiserver or kubelet).
    pub(crate) port_forward_delay: Option<std::time::Duration>,
    /// Image pulls of agent pods fail with this message.
    pub(crate) image_pull_error: Option<String>,
}

impl Cluster {
    /// Starts a simulator whose agent pods run `agent_command` (e.g. `[tether, "agent"]`) with
    /// the agent container's `args`, in namespaces of `network`.
    pub fn start(network: &Network, agent_command: &[&str]) -> Cluster {
        Cluster::start_with_hosts(network, agent_command, "")
    }

    /// Like [`start`](Self::start); agent pods' `/etc/hosts` also names `hosts` (lines of
    /// `IP NAME`), as the cluster DNS would answer for them.
    pub fn start_with_hosts(network: &Network, agent_command: &[&str], hosts: &str) -> Cluster {
        sweep_etc_netns();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cluster-sim")
            .enable_all()
            .build()
            .expect("a runtime for the cluster simulator");
        let token = format!("{:032x}", rand::random::<u128>());
        let state = Arc::new(State {
            token: token.clone(),
            agent_command: agent_command.iter().map(|s| (*s).to_owned()).collect(),
            store: Mutex::default(),
            changed: watch::channel(0).0,
            pod_netns: Mutex::default(),
            pod_pids: Mutex::default(),
            denied: Mutex::default(),
            faults: Mutex::default(),
            port_forwards: Mutex::default(),
            running: Mutex::default(),
            network_prefix: network.prefix().to_owned(),
            next_netns: 0.into(),
            containers: Mutex::default(),
            services: Mutex::default(),
            logs: Mutex::default(),
            hosts: format!("127.0.0.1 localhost\n{hosts}"),
            resolv_conf: "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n".into(),
            etc_dirs: Mutex::default(),
            image_dir: tempfile::tempdir().expect("a directory for pulled images"),
            pulled: Mutex::default(),
        });
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the simulator's API port");
        let addr = listener.local_addr().unwrap();
        runtime.spawn(api::serve(listener, Arc::clone(&state)));
        let kubeconfig = write_kubeconfig(addr, &token);
        Cluster {
            state,
            addr,
            kubeconfig,
            runtime: Some(runtime),
        }
    }

    /// A kubeconfig for this cluster (context `sim`, namespace `default`, bearer token).
    pub fn kubeconfig(&self) -> &Path {
        self.kubeconfig.path()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Publishes a Deployment `name` in `namespace` with one ReplicaSet and one pod per entry,
    /// all labelled `app=NAME`. Returns the pods' names.
    pub fn add_deployment(&self, namespace: &str, name: &str, pods: &[AppPod<'_>]) -> Vec<String> {
        let hash = &format!("{:010x}", rand::random::<u64>())[..10];
        let rs_name = format!("{name}-{hash}");
        let selector = json!({"matchLabels": {"app": name}});
        let replicas = pods.len();
        let template_labels = json!({"app": name, "pod-template-hash": hash});
        let mut store = self.state.store.lock().unwrap();
        let deployment = store.put(
            DEPLOYMENTS,
            checked::<k8s_openapi::api::apps::v1::Deployment>(json!({
                "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}, "generation": 1},
                "spec": {
                    "replicas": replicas,
                    "selector": selector,
                    "template": {"metadata": {"labels": {"app": name}},
                                 "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}}
                },
                "status": {"replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
                           "updatedReplicas": replicas, "observedGeneration": 1}
            })),
        );
        let rs = store.put(
            REPLICASETS,
            checked::<k8s_openapi::api::apps::v1::ReplicaSet>(json!({
                "metadata": {"name": rs_name, "namespace": namespace, "labels": template_labels,
                             "annotations": {workload::REVISION: "1"},
                             "ownerReferences": [owner(&deployment, true)]},
                "spec": {"replicas": replicas, "selector": {"matchLabels": template_labels},
                         "template": {"metadata": {"labels": template_labels},
                                      "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}}},
                "status": {"replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas}
            })),
        );
        drop(store);
        let names: Vec<String> = pods
            .iter()
            .map(|app| {
                let suffix = kubelet::random_suffix();
                let pod_name = format!("{rs_name}-{suffix}");
                self.publish_pod(namespace, &pod_name, &template_labels, Some(&rs), app, true);
                pod_name
            })
            .collect();
        self.state.changed.send_modify(|v| *v += 1);
        names
    }

    /// Publishes a bare pod (no owner).
    pub fn add_pod(&self, namespace: &str, name: &str, app: &AppPod<'_>) {
        self.publish_pod(namespace, name, &json!({"run": name}), None, app, true);
        self.state.changed.send_modify(|v| *v += 1);
    }

    fn publish_pod(
        &self,
        namespace: &str,
        name: &str,
        labels: &Value,
        owner_object: Option<&Value>,
        app: &AppPod<'_>,
        ready: bool,
    ) {
        let container = Container::adopt(app.pid);
        let id = container.id.clone();
        self.state.containers.lock().unwrap().push(container);
        let mut app_container = json!({
            "name": "app",
            "image": "example.invalid/app:1",
            "ports": app.ports.iter().map(|(n, p)| json!({"name": n, "containerPort": p, "protocol": "TCP"})).collect::<Vec<_>>(),
        });
        if let (Some(into), Some(extra)) =
            (app_container.as_object_mut(), app.container.as_object())
        {
            into.extend(extra.clone());
        }
        let mut containers = vec![app_container];
        let mut statuses = vec![running_status("app", "example.invalid/app:1", &id)];
        let mut annotations = json!({});
        if app.istio {
            containers.insert(
                0,
                json!({"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.24.0",
                       "ports": [{"name": "http-envoy-prom", "containerPort": 15090}]}),
            );
            // The sidecar's own process is not simulated; its id points nowhere.
            statuses.insert(
                0,
                running_status(
                    "istio-proxy",
                    "docker.io/istio/proxyv2:1.24.0",
                    &format!("containerd://{:064x}", 0xdead_u128),
                ),
            );
            annotations = json!({"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"});
        }
        let pod = json!({
            "metadata": {
                "name": name, "namespace": namespace, "labels": labels, "annotations": annotations,
                "ownerReferences": owner_object.map(|o| vec![owner(o, true)]).unwrap_or_default(),
            },
            "spec": {"nodeName": NODE, "containers": containers},
            "status": {
                "phase": "Running",
                "podIP": app.pod.ip.to_string(),
                "podIPs": [{"ip": app.pod.ip.to_string()}],
                "hostIP": "10.213.255.1",
                "startTime": store::now(),
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Initialized", "status": "True"},
                    {"type": "ContainersReady", "status": "True"},
                    {"type": "Ready", "status": "True"}
                ],
                "containerStatuses": statuses,
            }
        });
        let mut pod = pod;
        if !ready {
            workload::set_ready(&mut pod, false);
        }
        self.state
            .store
            .lock()
            .unwrap()
            .put(PODS, checked::<k8s_openapi::api::core::v1::Pod>(pod));
        self.state
            .pod_netns
            .lock()
            .unwrap()
            .insert(format!("{namespace}/{name}"), app.pod.netns.clone());
        self.state
            .pod_pids
            .lock()
            .unwrap()
            .insert(format!("{namespace}/{name}"), app.pid);
    }

    /// Takes a permission away: `verb` on `resource` (`pods`, `jobs`, `pods/portforward`, …).
    pub fn deny(&self, verb: &str, resource: &str) {
        self.state
            .denied
            .lock()
            .unwrap()
            .insert((verb.to_owned(), resource.to_owned()));
    }

    /// Images the kubelet pulled from loopback registries (others count as present on the node).
    pub fn pulled_images(&self) -> Vec<String> {
        self.state.pulled.lock().unwrap().clone()
    }

    /// Agent pods' image pulls fail with `message` (or succeed again with `None`).
    pub fn fail_image_pulls(&self, message: Option<&str>) {
        self.state.faults.lock().unwrap().image_pull_error = message.map(str::to_owned);
    }

    /// Closes every open port-forward at once, as an apiserver restart does: the client's
    /// connection closes and the pod-side connection too. Returns how many were open.
    pub fn drop_port_forwards(&self) -> usize {
        let handles = std::mem::take(&mut *self.state.port_forwards.lock().unwrap());
        let live = handles.iter().filter(|h| !h.is_finished()).count();
        for handle in handles {
            handle.abort();
        }
        live
    }

    /// Refuses new port-forward upgrades (HTTP 500, as an unreachable kubelet gives) while on.
    pub fn refuse_port_forwards(&self, on: bool) {
        self.state.faults.lock().unwrap().refuse_port_forwards = on;
    }

    /// Answers port-forward upgrades `delay` late (or at once again with `None`).
    pub fn delay_port_forwards(&self, delay: Option<std::time::Duration>) {
        self.state.faults.lock().unwrap().port_forward_delay = delay;
    }

    /// Pods in `namespace` whose labels match `selector` (`""` for all): name and phase.
    pub fn pods(&self, namespace: &str, selector: &str) -> Vec<(String, String)> {
        let store = self.state.store.lock().unwrap();
        store
            .list(PODS, Some(namespace))
            .into_iter()
            .filter(|p| store::labels_match(selector, p))
            .map(|p| {
                (
                    p["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                    p["status"]["phase"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    /// A pod as the API serves it.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state.pod(namespace, name)
    }

    /// Jobs in `namespace`, as JSON.
    pub fn jobs(&self, namespace: &str) -> Vec<Value> {
        let store = self.state.store.lock().unwrap();
        store
            .list(store::JOBS, Some(namespace))
            .into_iter()
            .cloned()
            .collect()
    }

    /// What agent pods in `namespace` printed, pod by pod (`kubectl logs`), for failure messages.
    pub fn logs(&self, namespace: &str) -> String {
        let logs = self.state.logs.lock().unwrap();
        let mut out = String::new();
        for (pod, lines) in logs
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{namespace}/")))
        {
            out.push_str(&format!("--- {pod}\n{}\n", lines.join("\n")));
        }
        out
    }

    /// Agent processes still running.
    pub fn running_agents(&self) -> usize {
        self.state.running.lock().unwrap().len()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // As a node shutting down: every agent pod gets its SIGTERM (its guard removes its rules)
        // and up to 10 s to end, before the runtime (and with it, `kill_on_drop`) goes.
        for running in self.state.running.lock().unwrap().values() {
            running.kill();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !self.state.running.lock().unwrap().is_empty() && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        for dir in self.state.etc_dirs.lock().unwrap().drain(..) {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(std::time::Duration::from_secs(2));
        }
    }
}

/// Removes `/etc/netns/tt-<pid>-…` directories of test processes that no longer run (a killed
/// test leaves them; `ip netns exec` would bind-mount them into a reused namespace name).
fn sweep_etc_netns() {
    let Ok(entries) = std::fs::read_dir("/etc/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("tt-").and_then(|r| r.split('-').next()) else {
            continue;
        };
        if pid
            .parse()
            .is_ok_and(|pid| !tether_sys::process::alive(pid))
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Serialises `value` through the `k8s-openapi` type first: the simulator serves only objects
/// a real API server could have served.
fn checked<T: serde::de::DeserializeOwned>(value: Value) -> Value {
    if let Err(error) = serde_json::from_value::<T>(value.clone()) {
        panic!(
            "the simulator built an object {} would reject: {error}\n{value:#}",
            std::any::type_name::<T>()
        );
    }
    value
}

fn owner(object: &Value, controller: bool) -> Value {
    json!({
        "apiVersion": object["apiVersion"],
        "kind": object["kind"],
        "name": object["metadata"]["name"],
        "uid": object["metadata"]["uid"],
        "controller": controller,
        "blockOwnerDeletion": true,
    })
}

fn running_status(name: &str, image: &str, id: &str) -> Value {
    json!({
        "name": name, "image": image, "imageID": format!("{image}@sha256:{:064x}", 1),
        "containerID": id, "ready": true, "started": true, "restartCount": 0,
        "state": {"running": {"startedAt": store::now()}}
    })
}

fn write_kubeconfig(addr: SocketAddr, token: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new()
        .prefix("tether-sim-kubeconfig-")
        .tempfile()
        .unwrap();
    let text = format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: sim\n  cluster:\n    server: http://{addr}\n\
         users:\n\
         - name: dev\n  user:\n    token: {token}\n\
         contexts:\n\
         - name: sim\n  context:\n    cluster: sim\n    user: dev\n    namespace: default\n\
         current-context: sim\n"
    );
    std::fs::write(file.path(), text).unwrap();
    file
}

impl State {
    /// A pod as the API serves it.
    pub(crate) fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.store
            .lock()
            .unwrap()
            .get(&store::Key {
                resource: PODS,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
            .cloned()
    }
}

/// Where a `namespace/name` pod's network namespace is, if the simulator knows the pod.
pub(crate) fn netns_of(state: &State, namespace: &str, name: &str) -> Option<String> {
    state
        .pod_netns
        .lock()
        .unwrap()
        .get(&format!("{namespace}/{name}"))
        .cloned()
}
