//! What the controllers and kube-proxy do to a Deployment's pods while a session runs: pods
//! deleted (gracefully: terminating first, then gone) and replaced by successors with a new
//! name, address and container id, rollouts through a new ReplicaSet, scaling; the workloads'
//! status follows, and a Service's virtual IP is programmed (nft, as kube-proxy's nftables mode
//! does) in the client's namespace with the ready pods as endpoints.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use super::{
    AppPod, Cluster, State, checked, kubelet,
    store::{self, DEPLOYMENTS, Key, PODS, REPLICASETS, STATEFULSETS},
};

/// A Service's virtual IP in the client's namespace.
#[derive(Debug, Clone)]
pub(crate) struct Service {
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) selector: String,
    pub(crate) client_netns: String,
    pub(crate) vip: Ipv4Addr,
    pub(crate) port: u16,
}

impl Cluster {
    /// A Service `name` for the pods of `namespace` that `selector` matches: connections from
    /// `client_netns` to `vip:port` go to a ready pod's `port`, one pod after the other
    /// (round robin), as kube-proxy programs it; with no ready pod they are refused. Endpoints
    /// follow every pod change the simulator makes. `vip` must be on the pods' subnet (it needs
    /// a route), unused by any pod.
    pub fn expose(
        &self,
        namespace: &str,
        name: &str,
        selector: &str,
        client_netns: &str,
        vip: Ipv4Addr,
        port: u16,
    ) {
        self.state.services.lock().unwrap().push(Service {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            selector: selector.to_owned(),
            client_netns: client_netns.to_owned(),
            vip,
            port,
        });
        sync_services(&self.state);
    }

    /// Deletes pod `name` as `kubectl delete pod` does: it turns terminating (not ready, out of
    /// the Service's endpoints), its containers get SIGTERM, then it is gone. A controller's
    /// replacement is up to the caller ([`replace_pod`](Self::replace_pod)).
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let key = Key {
            resource: PODS,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        {
            let mut store = self.state.store.lock().unwrap();
            let Some(mut pod) = store.get(&key).cloned() else {
                panic!("no pod {namespace}/{name} to delete");
            };
            pod["metadata"]["deletionTimestamp"] = json!(store::now());
            pod["metadata"]["deletionGracePeriodSeconds"] = json!(30);
            set_ready(&mut pod, false);
            store.put(PODS, checked::<k8s_openapi::api::core::v1::Pod>(pod));
        }
        self.state.changed.send_modify(|v| *v += 1);
        sync_services(&self.state);
        // The kubelet stops the containers: the app's and any ephemeral (agent) ones.
        kubelet::stop_pod(&self.state, namespace, name);
        let pod_key = format!("{namespace}/{name}");
        if let Some(pid) = self.state.pod_pids.lock().unwrap().remove(&pod_key) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deleted = self.state.store.lock().unwrap().delete(&key);
        self.state.pod_netns.lock().unwrap().remove(&pod_key);
        self.state.changed.send_modify(|v| *v += 1);
        if let Some(owner) = deleted.as_ref().and_then(owner_deployment(&self.state)) {
            self.refresh_status(namespace, &owner);
        }
    }

    /// The ReplicaSet controller's answer to a deleted pod: `name` is deleted and a successor
    /// (`app`: a new address and container) created in the Deployment's newest ReplicaSet.
    /// Returns the successor's name.
    pub fn replace_pod(
        &self,
        namespace: &str,
        deployment: &str,
        name: &str,
        app: &AppPod<'_>,
    ) -> String {
        self.delete_pod(namespace, name);
        self.create_replica(namespace, deployment, app)
    }

    /// Scales `deployment` up by one: a new pod (`app`) in its newest ReplicaSet. Returns its
    /// name.
    pub fn add_replica(&self, namespace: &str, deployment: &str, app: &AppPod<'_>) -> String {
        self.change_replicas(namespace, deployment, 1);
        self.create_replica(namespace, deployment, app)
    }

    /// Scales `deployment` down by one, removing pod `name`.
    pub fn remove_replica(&self, namespace: &str, deployment: &str, name: &str) {
        self.change_replicas(namespace, deployment, -1);
        self.delete_pod(namespace, name);
    }

    /// Starts a rollout of `deployment`: a new pod template, so a new ReplicaSet (returned),
    /// which the pods created from now on belong to. Replace the old pods one by one with
    /// [`replace_pod`](Self::replace_pod), as the Deployment controller does.
    pub fn start_rollout(&self, namespace: &str, deployment: &str) -> String {
        let hash = &format!("{:010x}", rand::random::<u64>())[..10];
        let rs_name = format!("{deployment}-{hash}");
        let labels = json!({"app": deployment, "pod-template-hash": hash});
        let mut store = self.state.store.lock().unwrap();
        let mut object = existing(&store, DEPLOYMENTS, namespace, deployment);
        let generation = object["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        object["metadata"]["generation"] = json!(generation);
        object["spec"]["template"]["metadata"]["annotations"] =
            json!({"kubectl.kubernetes.io/restartedAt": store::now()});
        let object = store.put(
            DEPLOYMENTS,
            checked::<k8s_openapi::api::apps::v1::Deployment>(object),
        );
        store.put(
            REPLICASETS,
            checked::<k8s_openapi::api::apps::v1::ReplicaSet>(json!({
                "metadata": {"name": rs_name, "namespace": namespace, "labels": labels,
                             "annotations": {REVISION: generation.to_string()},
                             "ownerReferences": [super::owner(&object, true)]},
                "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                         "template": {"metadata": {"labels": labels},
                                      "spec": {"containers": [{"name": "app", "image": "example.invalid/app:2"}]}}},
                "status": {"replicas": 0}
            })),
        );
        drop(store);
        self.state.changed.send_modify(|v| *v += 1);
        rs_name
    }

    /// Publishes a StatefulSet `name` in `namespace` with one pod per entry, named `NAME-0`,
    /// `NAME-1`, … and labelled `app=NAME`. Returns the pods' names.
    pub fn add_statefulset(&self, namespace: &str, name: &str, pods: &[AppPod<'_>]) -> Vec<String> {
        let replicas = pods.len();
        let labels = json!({"app": name});
        let set = self.state.store.lock().unwrap().put(
            STATEFULSETS,
            checked::<k8s_openapi::api::apps::v1::StatefulSet>(json!({
                "metadata": {"name": name, "namespace": namespace, "labels": labels, "generation": 1},
                "spec": {
                    "replicas": replicas, "serviceName": name,
                    "selector": {"matchLabels": labels},
                    "template": {"metadata": {"labels": labels},
                                 "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}}
                },
                "status": {"replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
                           "currentReplicas": replicas, "updatedReplicas": replicas, "observedGeneration": 1}
            })),
        );
        let names = pods
            .iter()
            .enumerate()
            .map(|(i, app)| {
                let pod = format!("{name}-{i}");
                self.publish_pod(namespace, &pod, &labels, Some(&set), app, true);
                pod
            })
            .collect();
        self.state.changed.send_modify(|v| *v += 1);
        sync_services(&self.state);
        names
    }

    /// The StatefulSet controller's answer to a deleted pod: pod `name` is deleted, then created
    /// again with the same name (its identity) but a new uid, address and container (`app`).
    pub fn recreate_pod(&self, namespace: &str, statefulset: &str, name: &str, app: &AppPod<'_>) {
        self.delete_pod(namespace, name);
        let set = existing(
            &self.state.store.lock().unwrap(),
            STATEFULSETS,
            namespace,
            statefulset,
        );
        let labels = set["spec"]["template"]["metadata"]["labels"].clone();
        self.publish_pod(namespace, name, &labels, Some(&set), app, false);
        self.start_successor(namespace, name);
    }

    /// A new pod of `deployment` in its newest ReplicaSet.
    fn create_replica(&self, namespace: &str, deployment: &str, app: &AppPod<'_>) -> String {
        let rs = {
            let store = self.state.store.lock().unwrap();
            replica_sets(&store, namespace, deployment)
                .pop()
                .unwrap_or_else(|| panic!("deployment {namespace}/{deployment} has no ReplicaSet"))
        };
        let labels = rs["spec"]["template"]["metadata"]["labels"].clone();
        let name = format!(
            "{}-{}",
            rs["metadata"]["name"].as_str().unwrap_or(deployment),
            kubelet::random_suffix()
        );
        self.publish_pod(namespace, &name, &labels, Some(&rs), app, false);
        self.start_successor(namespace, &name);
        self.refresh_status(namespace, deployment);
        name
    }

    /// A controller's new pod, published not ready (its containers starting, its readiness
    /// probe not passed yet), turns ready: two steps, as watchers see them.
    fn start_successor(&self, namespace: &str, name: &str) {
        self.state.changed.send_modify(|v| *v += 1);
        let key = Key {
            resource: PODS,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        {
            let mut store = self.state.store.lock().unwrap();
            let mut pod = store.get(&key).cloned().expect("the pod just published");
            set_ready(&mut pod, true);
            store.put(PODS, checked::<k8s_openapi::api::core::v1::Pod>(pod));
        }
        self.state.changed.send_modify(|v| *v += 1);
        sync_services(&self.state);
    }

    fn change_replicas(&self, namespace: &str, deployment: &str, by: i64) {
        let mut store = self.state.store.lock().unwrap();
        let mut object = existing(&store, DEPLOYMENTS, namespace, deployment);
        let replicas = object["spec"]["replicas"].as_i64().unwrap_or(1) + by;
        object["spec"]["replicas"] = json!(replicas.max(0));
        store.put(
            DEPLOYMENTS,
            checked::<k8s_openapi::api::apps::v1::Deployment>(object),
        );
    }

    /// The Deployment's and its ReplicaSets' status, counted from their pods.
    fn refresh_status(&self, namespace: &str, deployment: &str) {
        let mut store = self.state.store.lock().unwrap();
        let sets = replica_sets(&store, namespace, deployment);
        let pods: Vec<Value> = store
            .list(PODS, Some(namespace))
            .into_iter()
            .cloned()
            .collect();
        let (mut total, mut ready, mut updated) = (0, 0, 0);
        let newest = sets.len().saturating_sub(1);
        for (i, mut rs) in sets.into_iter().enumerate() {
            let name = rs["metadata"]["name"].as_str().unwrap_or("").to_owned();
            let mine: Vec<&Value> = pods
                .iter()
                .filter(|p| owned_by(p, "ReplicaSet", &name))
                .collect();
            let running = mine
                .iter()
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .count();
            let ready_here = mine.iter().filter(|p| is_ready(p)).count();
            rs["spec"]["replicas"] = json!(running);
            rs["status"] = json!({"replicas": running, "readyReplicas": ready_here,
                                  "availableReplicas": ready_here});
            store.put(
                REPLICASETS,
                checked::<k8s_openapi::api::apps::v1::ReplicaSet>(rs),
            );
            total += running;
            ready += ready_here;
            if i == newest {
                updated = running;
            }
        }
        let key = Key {
            resource: DEPLOYMENTS,
            namespace: namespace.to_owned(),
            name: deployment.to_owned(),
        };
        if let Some(mut object) = store.get(&key).cloned() {
            object["status"] = json!({
                "replicas": total, "readyReplicas": ready, "availableReplicas": ready,
                "updatedReplicas": updated, "observedGeneration": object["metadata"]["generation"]
            });
            store.put(
                DEPLOYMENTS,
                checked::<k8s_openapi::api::apps::v1::Deployment>(object),
            );
        }
        drop(store);
        self.state.changed.send_modify(|v| *v += 1);
    }
}

/// The ReplicaSets of `deployment`, oldest first: by their `deployment.kubernetes.io/revision`
/// annotation, as the Deployment controller numbers them.
fn replica_sets(store: &store::Store, namespace: &str, deployment: &str) -> Vec<Value> {
    let mut sets: Vec<Value> = store
        .list(REPLICASETS, Some(namespace))
        .into_iter()
        .filter(|rs| owned_by(rs, "Deployment", deployment))
        .cloned()
        .collect();
    sets.sort_by_key(|rs| {
        rs["metadata"]["annotations"][REVISION]
            .as_str()
            .and_then(|r| r.parse::<u64>().ok())
    });
    sets
}

/// The annotation by which a Deployment's ReplicaSets are numbered.
pub(crate) const REVISION: &str = "deployment.kubernetes.io/revision";

/// An object the caller knows exists (a test naming a workload it made).
fn existing(store: &store::Store, resource: store::Resource, namespace: &str, name: &str) -> Value {
    let key = Key {
        resource,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    store
        .get(&key)
        .cloned()
        .unwrap_or_else(|| panic!("no {} {namespace}/{name}", resource.kind))
}

/// The Deployment a pod belongs to (through its ReplicaSet), if any.
fn owner_deployment(state: &State) -> impl Fn(&Value) -> Option<String> + '_ {
    move |pod| {
        let rs = controller(pod, "ReplicaSet")?;
        let store = state.store.lock().unwrap();
        let rs = store.get(&Key {
            resource: REPLICASETS,
            namespace: pod["metadata"]["namespace"].as_str()?.to_owned(),
            name: rs,
        })?;
        controller(rs, "Deployment")
    }
}

fn controller(object: &Value, kind: &str) -> Option<String> {
    object["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| o["kind"] == kind && o["controller"] == true)
        .and_then(|o| o["name"].as_str().map(str::to_owned))
}

fn owned_by(object: &Value, kind: &str, name: &str) -> bool {
    controller(object, kind).as_deref() == Some(name)
}

fn is_ready(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

pub(super) fn set_ready(pod: &mut Value, ready: bool) {
    let value = if ready { "True" } else { "False" };
    if let Some(conditions) = pod["status"]["conditions"].as_array_mut() {
        for condition in conditions {
            if condition["type"] == "Ready" || condition["type"] == "ContainersReady" {
                condition["status"] = json!(value);
            }
        }
    }
    if let Some(statuses) = pod["status"]["containerStatuses"].as_array_mut() {
        for status in statuses {
            status["ready"] = json!(ready);
        }
    }
}

/// Programs every Service's endpoints (its ready pods) into its client namespace, atomically.
pub(crate) fn sync_services(state: &State) {
    let services = state.services.lock().unwrap().clone();
    for service in services {
        let endpoints: Vec<String> = {
            let store = state.store.lock().unwrap();
            let mut ips: Vec<String> = store
                .list(PODS, Some(&service.namespace))
                .into_iter()
                .filter(|p| store::labels_match(&service.selector, p) && is_ready(p))
                .filter_map(|p| p["status"]["podIP"].as_str().map(str::to_owned))
                .collect();
            ips.sort();
            ips
        };
        let table = format!("tt_svc_{}", service.name.replace('-', "_"));
        let (vip, port) = (service.vip, service.port);
        let (nat, filter) = if endpoints.is_empty() {
            (
                String::new(),
                format!("ip daddr {vip} tcp dport {port} reject with tcp reset"),
            )
        } else {
            let map: Vec<String> = endpoints
                .iter()
                .enumerate()
                .map(|(i, ip)| format!("{i} : {ip}"))
                .collect();
            (
                format!(
                    "ip daddr {vip} tcp dport {port} dnat to numgen inc mod {} map {{ {} }}",
                    endpoints.len(),
                    map.join(", ")
                ),
                String::new(),
            )
        };
        let script = format!(
            "table ip {table} {{}}\nflush table ip {table}\ntable ip {table} {{\n\
             chain nat {{\ntype nat hook output priority -100;\n{nat}\n}}\n\
             chain filter {{\ntype filter hook output priority 0;\n{filter}\n}}\n}}\n"
        );
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &service.client_netns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run nft for a Service");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "nft rejected the Service's rules:\n{script}"
        );
    }
}
