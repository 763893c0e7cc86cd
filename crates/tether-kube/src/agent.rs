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
    api::{DeleteParams, ListParams, PostParams, PropagationPolicy},
    runtime::watcher,
};

use crate::manifest::{AGENT_PORT, AgentSpec, SESSION_LABEL};

/// A running agent pod.
#[derive(Debug, Clone)]
pub struct AgentPod {
    pub namespace: String,
    pub job: String,
    pub pod: String,
    pub port: u16,
}

/// Waiting reasons that will not fix themselves while we wait.
const HOPELESS: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
];

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
            job,
            pod,
            port: AGENT_PORT,
        }),
        Err(error) => {
            let _ = delete(client, &spec.namespace, &job).await;
            Err(error)
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
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        let next = match tokio::time::timeout(left, stream.try_next()).await {
            Ok(next) => next.context("lost the watch on the agent pod")?,
            Err(_) => bail!(
                "the agent pod did not start within {} s (agent.startup_timeout); last seen: {last_seen}",
                timeout.as_secs()
            ),
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
            bail!(
                "the agent pod {name} cannot start: {reason}\n{}",
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
            format!(
                "exit {}: {}",
                t.exit_code,
                t.reason.clone().unwrap_or_default()
            )
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
pub async fn port_forward(
    client: &Client,
    agent: &AgentPod,
) -> std::io::Result<tokio::io::DuplexStream> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &agent.namespace);
    let mut forwarder = pods
        .portforward(&agent.pod, &[agent.port])
        .await
        .map_err(|e| std::io::Error::other(format!("port-forward to {}: {e}", agent.pod)))?;
    let stream = forwarder.take_stream(agent.port).ok_or_else(|| {
        std::io::Error::other(format!("port-forward to {}: no stream", agent.pod))
    })?;
    if let Some(error) = forwarder.take_error(agent.port) {
        let pod = agent.pod.clone();
        tokio::spawn(async move {
            if let Some(message) = error.await {
                tracing::warn!(%pod, "port-forward error: {message}");
            }
        });
    }
    Ok(stream)
}
