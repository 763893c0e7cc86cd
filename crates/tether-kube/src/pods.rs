//! A session's view of its target's pods, kept current with a watch: which pod went away, which
//! are ready to take over.

use std::collections::BTreeMap;

use futures_util::{StreamExt as _, stream::BoxStream};
pub use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};

/// The pods a session follows: a workload's (by its selector) or one pod (by name).
pub struct PodWatch {
    stream: BoxStream<'static, Result<watcher::Event<Pod>, watcher::Error>>,
    pods: BTreeMap<String, Pod>,
    /// A re-list in progress (after the watch expired): applied whole when it is done.
    relist: Option<BTreeMap<String, Pod>>,
    /// The first list is done: until then nothing is known of the pods.
    listed: bool,
}

impl std::fmt::Debug for PodWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodWatch")
            .field("pods", &self.pods.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl PodWatch {
    /// The pods of `namespace` that `selector` (a label selector) matches.
    pub fn selector(client: &Client, namespace: &str, selector: &str) -> PodWatch {
        PodWatch::new(
            client,
            namespace,
            watcher::Config::default().labels(selector),
        )
    }

    /// Pod `name` of `namespace`.
    pub fn named(client: &Client, namespace: &str, name: &str) -> PodWatch {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        PodWatch::new(client, namespace, config)
    }

    fn new(client: &Client, namespace: &str, config: watcher::Config) -> PodWatch {
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        // A failed watch is retried with backoff (the API server restarting, say); the pods seen
        // so far stay as they were meanwhile.
        let stream = watcher(api, config).default_backoff().boxed();
        PodWatch {
            stream,
            pods: BTreeMap::new(),
            relist: None,
            listed: false,
        }
    }

    /// Waits for the next change and returns the pods as they are now; `None` when the watch
    /// ended.
    pub async fn changed(&mut self) -> Option<&BTreeMap<String, Pod>> {
        loop {
            match self.stream.next().await? {
                Ok(watcher::Event::Apply(pod)) => {
                    self.pods.insert(pod.name_any(), pod);
                }
                Ok(watcher::Event::Delete(pod)) => {
                    self.pods.remove(&pod.name_any());
                }
                Ok(watcher::Event::Init) => {
                    self.relist = Some(BTreeMap::new());
                    continue;
                }
                Ok(watcher::Event::InitApply(pod)) => {
                    if let Some(relist) = &mut self.relist {
                        relist.insert(pod.name_any(), pod);
                    }
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    self.pods = self.relist.take().unwrap_or_default();
                    self.listed = true;
                }
                Err(error) => {
                    tracing::warn!("watching the target's pods: {error}");
                    continue;
                }
            }
            return Some(&self.pods);
        }
    }

    /// True once the pods were listed (before, [`pods`](Self::pods) is empty for want of
    /// knowing, not because there are none).
    pub fn listed(&self) -> bool {
        self.listed
    }

    /// The pods as last seen.
    pub fn pods(&self) -> &BTreeMap<String, Pod> {
        &self.pods
    }
}

/// Why a session can no longer stay with the pod `uid` (named `name`), as said after its name
/// ("was deleted", "is terminating", "has finished"); `None` while it can (a pod that is only
/// not ready, say during a container restart, keeps its session). A pod of the same name but
/// another uid (a StatefulSet's replacement) is another pod.
pub fn gone(pods: &BTreeMap<String, Pod>, name: &str, uid: &str) -> Option<&'static str> {
    let Some(pod) = pods
        .get(name)
        .filter(|p| p.metadata.uid.as_deref() == Some(uid))
    else {
        return Some("was deleted");
    };
    if pod.metadata.deletion_timestamp.is_some() {
        return Some("is terminating");
    }
    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Succeeded" | "Failed") => Some("has finished"),
        _ => None,
    }
}

/// The pods that can take a session now (running, ready, not terminating), oldest first: the
/// ones a rollout replaces last.
pub fn ready(pods: &BTreeMap<String, Pod>) -> Vec<&Pod> {
    let mut ready: Vec<&Pod> = pods
        .values()
        .filter(|pod| crate::target::not_ready(pod).is_none())
        .collect();
    ready.sort_by_key(|p| (p.metadata.creation_timestamp.clone(), p.name_any()));
    ready
}

/// A pod's name.
pub fn name(pod: &Pod) -> String {
    pod.name_any()
}

/// A pod's uid.
pub fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}
