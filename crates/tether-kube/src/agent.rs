//! The agent pod: create its Job, wait (with a watch) until it runs, reach it, remove it.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Event, Pod},
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy},
    runtime::watcher,
};

use crate::manifest::{AgentSpec, SESSION_LABEL};

/// A running agent: a Job's pod, or an ephemeral container in the target pod.
#[derive(Debug, Clone)]
pub struct AgentPod {
    pub namespace: String,
    /// The Job to delete at the end (`None` for an ephemeral container, which cannot be
    /// removed and ends on its own once idle).
    pub job: Option<String>,
    /// The pod to port-forward to.
    pub pod: String,
    pub port: u16,
}

/// Waiting reasons that will not fix themselves while we wait.
const HOPELESS: [&str; 7] = [
    "ErrImagePull",
    "ErrImageNeverPull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
];

/// For a waiting reason that says the image cannot be had: one line saying so, with both ways
/// out (a registry the cluster pulls from, or the tarball loaded on the nodes).
fn unpullable(image: &str, reason: &str) -> Option<String> {
    matches!(
        reason,
        "ErrImagePull" | "ImagePullBackOff" | "ErrImageNeverPull" | "InvalidImageName"
    )
    .then(|| {
        format!(
            "the agent image {image} cannot be pulled ({reason}): push it to a registry the cluster pulls from \
             (`tether agent-image --push REGISTRY/REPOSITORY:TAG`, then set agent.image to it), \
             or load it on the nodes (`tether agent-image --output agent.tar`, then agent.image_pull_policy: IfNotPresent)"
        )
    })
}

/// Creates the agent's Job and waits until its pod runs. `progress` hears each new state
/// ("Pending", "ContainerCreating", …). On failure the Job is deleted again.
pub async fn start(
    client: &Client,
    spec: &AgentSpec,
    timeout: Duration,
    progress: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<AgentPod> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), &spec.namespace);
    jobs.create(&PostParams::default(), &spec.job())
        .await
        .with_context(|| {
            format!(
                "cannot create the agent Job in namespace {}",
                spec.namespace
            )
        })?;
    let job = spec.job_name();
    match wait_running(client, spec, timeout, progress).await {
        Ok(pod) => Ok(AgentPod {
            namespace: spec.namespace.clone(),
            job: Some(job),
            pod,
            port: spec.port,
        }),
        Err(error) => {
            let _ = delete(client, &spec.namespace, &job).await;
            Err(error)
        }
    }
}

/// Adds the agent as an ephemeral container to `target` (in the spec's namespace), next to
/// `container`, and waits until it runs.
pub async fn start_ephemeral(
    client: &Client,
    spec: &AgentSpec,
    target: &str,
    container: &str,
    timeout: Duration,
    progress: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<AgentPod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &spec.namespace);
    let agent = spec.ephemeral_container(container);
    let name = agent.name.clone();
    let patch = serde_json::json!({"spec": {"ephemeralContainers": [agent]}});
    pods.patch_ephemeral_containers(target, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .with_context(|| {
            format!("cannot add the agent to pod {target} as an ephemeral container")
        })?;
    let started = Instant::now();
    let mut last_seen = String::new();
    let config = watcher::Config::default().fields(&format!("metadata.name={target}"));
    let mut stream = watcher(pods, config).boxed();
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        let next = tokio::time::timeout(left, stream.try_next())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the ephemeral agent did not start within {} s (agent.startup_timeout); last seen: {last_seen}",
                    timeout.as_secs()
                )
            })?
            .context("lost the watch on the target pod")?;
        let pod = match next {
            Some(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
            Some(watcher::Event::Delete(_)) => bail!("the target pod {target} was deleted"),
            Some(_) => continue,
            None => bail!("the watch on the target pod ended"),
        };
        let status = pod
            .status
            .and_then(|s| s.ephemeral_container_statuses)
            .and_then(|all| all.into_iter().find(|s| s.name == name));
        let Some(state) = status.and_then(|s| s.state) else {
            continue;
        };
        if state.running.is_some() {
            return Ok(AgentPod {
                namespace: spec.namespace.clone(),
                job: None,
                pod: target.to_owned(),
                port: spec.port,
            });
        }
        if let Some(waiting) = state.waiting {
            let reason = waiting.reason.unwrap_or_default();
            if reason != last_seen {
                progress(&format!("{name}: {reason}"));
                last_seen.clone_from(&reason);
            }
            if HOPELESS.contains(&reason.as_str()) {
                let detail = waiting.message.unwrap_or_default();
                match unpullable(&spec.image, &reason) {
                    Some(headline) => bail!("{headline}\n  {detail}"),
                    None => bail!("the ephemeral agent cannot start: {reason}: {detail}"),
                }
            }
        }
        if let Some(terminated) = state.terminated {
            bail!(
                "the ephemeral agent exited before it was ready (exit {}){}",
                terminated.exit_code,
                terminated
                    .message
                    .map(|m| format!("; it said: {}", m.trim()))
                    .unwrap_or_default()
            );
        }
    }
}

async fn wait_running(
    client: &Client,
    spec: &AgentSpec,
    timeout: Duration,
    progress: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &spec.namespace);
    let selector = format!("{SESSION_LABEL}={}", spec.session);
    let started = Instant::now();
    let mut last_seen = "no pod yet".to_owned();
    let mut stream = watcher(pods.clone(), watcher::Config::default().labels(&selector)).boxed();
    // A pod the Job controller cannot create (admission, quota) never shows up in the watch: the
    // Job's events say why.
    let mut job_check = tokio::time::interval(Duration::from_secs(2));
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        let next = tokio::select! {
            next = tokio::time::timeout(left, stream.try_next()) => match next {
                Ok(next) => next.context("lost the watch on the agent pod")?,
                Err(_) => bail!(
                    "the agent pod did not start within {} s (agent.startup_timeout); last seen: {last_seen}\n{}",
                    timeout.as_secs(),
                    events(client, &spec.namespace, &spec.job_name()).await
                ),
            },
            _ = job_check.tick() => {
                if let Some(problem) = job_problem(client, spec).await {
                    bail!("the agent Job {} cannot run its pod: {problem}", spec.job_name());
                }
                continue;
            }
        };
        let pod = match next {
            Some(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
            Some(watcher::Event::Delete(pod)) => {
                bail!(
                    "the agent pod {} was deleted while starting",
                    pod.name_any()
                )
            }
            Some(_) => continue,
            None => bail!("the watch on the agent pod ended"),
        };
        let name = pod.name_any();
        let state = describe(&pod);
        if state != last_seen {
            progress(&format!("{name}: {state}"));
            last_seen = state.clone();
        }
        let status = pod.status.clone().unwrap_or_default();
        let phase = status.phase.as_deref().unwrap_or("Pending");
        let running = status
            .container_statuses
            .iter()
            .flatten()
            .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
        if phase == "Running" && running {
            return Ok(name);
        }
        let waiting = status
            .container_statuses
            .iter()
            .flatten()
            .find_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone());
        let unschedulable = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False");
        if let Some(reason) = waiting.filter(|r| HOPELESS.contains(&r.as_str())) {
            let headline = unpullable(&spec.image, &reason)
                .unwrap_or_else(|| format!("the agent pod {name} cannot start: {reason}"));
            bail!(
                "{headline}\n{}",
                events(client, &spec.namespace, &name).await
            );
        }
        if let Some(condition) = unschedulable {
            bail!(
                "the agent pod {name} cannot be scheduled: {}\n{}",
                condition.message.clone().unwrap_or_default(),
                events(client, &spec.namespace, &name).await
            );
        }
        if matches!(phase, "Failed" | "Succeeded") {
            bail!(
                "the agent pod {name} exited before it was ready ({state}); see `kubectl logs -n {} {name}`\n{}",
                spec.namespace,
                events(client, &spec.namespace, &name).await
            );
        }
    }
}

/// Why the agent's Job cannot make progress, from its conditions and `FailedCreate` events.
async fn job_problem(client: &Client, spec: &AgentSpec) -> Option<String> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), &spec.namespace);
    let job = jobs.get_opt(&spec.job_name()).await.ok()??;
    if let Some(failed) = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Failed" && c.status == "True"))
    {
        return Some(format!(
            "{}: {}",
            failed.reason.clone().unwrap_or_default(),
            failed.message.clone().unwrap_or_default()
        ));
    }
    let events: Api<Event> = Api::namespaced(client.clone(), &spec.namespace);
    let params = ListParams::default().fields(&format!("involvedObject.name={}", spec.job_name()));
    let list = events.list(&params).await.ok()?;
    list.items
        .into_iter()
        .find(|e| e.reason.as_deref() == Some("FailedCreate"))
        .map(|e| e.message.unwrap_or_default())
}

/// "Pending", "ContainerCreating", "Running", "Failed (exit 1: Error)".
fn describe(pod: &Pod) -> String {
    let status = pod.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or_else(|| "Pending".into());
    let container = status.container_statuses.iter().flatten().next();
    let detail = container.and_then(|c| {
        let state = c.state.as_ref()?;
        if let Some(waiting) = &state.waiting {
            return waiting.reason.clone();
        }
        state.terminated.as_ref().map(|t| {
            let mut said = format!(
                "exit {}: {}",
                t.exit_code,
                t.reason.clone().unwrap_or_default()
            );
            // With FallbackToLogsOnError, the end of the agent's log.
            if let Some(message) = t.message.as_deref().filter(|m| !m.is_empty()) {
                said.push_str(&format!("; it said: {}", message.trim()));
            }
            said
        })
    });
    match detail {
        Some(detail) => format!("{phase} ({detail})"),
        None => phase,
    }
}

/// The pod's events, oldest first, one per line (or why there are none).
async fn events(client: &Client, namespace: &str, pod: &str) -> String {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let params = ListParams::default().fields(&format!("involvedObject.name={pod}"));
    match api.list(&params).await {
        Ok(list) => {
            let mut events = list.items;
            events.sort_by_key(|e| e.last_timestamp.clone());
            let lines: Vec<String> = events
                .iter()
                .map(|e| {
                    format!(
                        "  {} {}: {}",
                        e.type_.clone().unwrap_or_default(),
                        e.reason.clone().unwrap_or_default(),
                        e.message.clone().unwrap_or_default()
                    )
                })
                .collect();
            if lines.is_empty() {
                "  (no events)".into()
            } else {
                format!("events of {pod}:\n{}", lines.join("\n"))
            }
        }
        Err(error) => format!("  (cannot read its events: {error})"),
    }
}

/// Deletes the agent's Job and its pod (the API's default for Jobs would orphan the pod).
pub async fn delete(client: &Client, namespace: &str, job: &str) -> anyhow::Result<()> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    match jobs.delete(job, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error).with_context(|| format!("cannot delete the agent Job {job}")),
    }
}

/// Opens a port-forward to the agent pod: one WebSocket, one TCP connection to the agent.
///
/// Errors that another try cannot fix (the pod is gone or not running, the port-forward is
/// forbidden) have kind `NotFound` or `PermissionDenied`; the rest are worth retrying.
pub async fn port_forward(client: &Client, agent: &AgentPod) -> Result<PortForward, ForwardError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &agent.namespace);
    let pod = || agent.pod.clone();
    let mut forwarder = pods
        .portforward(&agent.pod, &[agent.port])
        .await
        .map_err(|source| match &source {
            kube::Error::Api(status) if status.code == 404 || status.code == 400 => {
                ForwardError::Gone { pod: pod(), source }
            }
            kube::Error::Api(status) if status.code == 401 || status.code == 403 => {
                ForwardError::Forbidden { pod: pod(), source }
            }
            _ => ForwardError::Failed { pod: pod(), source },
        })?;
    let stream = forwarder
        .take_stream(agent.port)
        .ok_or_else(|| ForwardError::NoStream { pod: pod() })?;
    if let Some(error) = forwarder.take_error(agent.port) {
        let pod = agent.pod.clone();
        tokio::spawn(async move {
            if let Some(message) = error.await {
                tracing::info!(%pod, "port-forward error: {message}");
            }
        });
    }
    Ok(PortForward {
        stream: Some(stream),
        forwarder: Some(forwarder),
    })
}

/// Why a port-forward to the agent's pod could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The pod is gone (or the API server refused the request as malformed for it).
    #[error("the agent's pod {pod} is gone")]
    Gone {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("port-forward to the agent's pod {pod} is not allowed (RBAC: pods/portforward)")]
    Forbidden {
        pod: String,
        #[source]
        source: kube::Error,
    },
    /// Anything else on the way (the network, the API server, the kubelet).
    #[error("cannot port-forward to the agent's pod {pod}")]
    Failed {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("the port-forward to the agent's pod {pod} opened no stream")]
    NoStream { pod: String },
}

impl ForwardError {
    /// Whether trying again may help: a gone pod and a forbidden port-forward stay so.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ForwardError::Failed { .. } | ForwardError::NoStream { .. }
        )
    }
}

/// A port-forward's byte stream. When it is dropped, what was written still goes out: the
/// port-forward's task gets up to [`DRAIN`] to deliver it and see the WebSocket close, then it is
/// aborted (a link given up on a dead network must not keep a task and a socket until TCP gives
/// up). [`drain_port_forwards`] waits for those that are still delivering.
pub struct PortForward {
    stream: Option<tokio::io::DuplexStream>,
    forwarder: Option<kube::api::Portforwarder>,
}

/// How long a dropped port-forward may take to deliver its last bytes.
pub const DRAIN: Duration = Duration::from_secs(2);

static DRAINING: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>> =
    std::sync::Mutex::new(Vec::new());

/// Waits (each at most [`DRAIN`]) until every dropped port-forward has delivered what was
/// written to it: a session's goodbye must reach the agent before tether exits.
pub async fn drain_port_forwards() {
    let draining = std::mem::take(&mut *DRAINING.lock().unwrap_or_else(|e| e.into_inner()));
    for task in draining {
        let _ = task.await;
    }
}

impl std::fmt::Debug for PortForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortForward").finish_non_exhaustive()
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let (Some(mut stream), Some(forwarder)) = (self.stream.take(), self.forwarder.take())
        else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            forwarder.abort();
            return;
        };
        let task = runtime.spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            // Our side is done; the task sends what is queued, then the close. The pod's side
            // ending (EOF here) means the WebSocket is closed.
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 4096];
            let _ = tokio::time::timeout(DRAIN, async {
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
            forwarder.abort();
        });
        let mut draining = DRAINING.lock().unwrap_or_else(|e| e.into_inner());
        draining.retain(|t| !t.is_finished());
        draining.push(task);
    }
}

impl tokio::io::AsyncRead for PortForward {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.stream.as_mut() {
            Some(stream) => std::pin::Pin::new(stream).poll_read(cx, buf),
            None => std::task::Poll::Ready(Ok(())),
        }
    }
}

impl tokio::io::AsyncWrite for PortForward {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.stream.as_mut() {
            Some(stream) => std::pin::Pin::new(stream).poll_write(cx, buf),
            None => std::task::Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.stream.as_mut() {
            Some(stream) => std::pin::Pin::new(stream).poll_flush(cx),
            None => std::task::Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.stream.as_mut() {
            Some(stream) => std::pin::Pin::new(stream).poll_shutdown(cx),
            None => std::task::Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
}
