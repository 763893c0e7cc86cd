//! `tether exec` against a Kubernetes target: find the pod, start the agent pod on its node,
//! and reach it through port-forwards.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tether_config::{
    Config, KubeTarget,
    model::{IncomingMode, PullPolicy},
};
use tether_kube::{
    Client,
    agent::AgentPod,
    manifest::{AGENT_PORT, AgentSpec, AgentTarget, DEFAULT_IMAGE, EPHEMERAL_PORTS},
    target::TargetPod,
};
use tether_protocol::TokenDigest;
use tether_session::carrier::Io;

use backon::Retryable as _;
use tether_protocol::Welcome;
use tether_session::carrier::Link;

use crate::{
    proxy::link::{Connect, ConnectError, DialError, Dialer, StillThere},
    ui::Ui,
};

/// A running agent pod and how to reach it.
#[derive(Clone)]
pub(crate) struct KubeAgent {
    pub(crate) client: Client,
    pub(crate) pod: AgentPod,
    /// `None` for a targetless session.
    pub(crate) target: Option<TargetPod>,
    /// `agent.ttl`, for saying when an ephemeral agent ends.
    pub(crate) ttl: tether_config::ConfigDuration,
    pub(crate) token: String,
    /// The target's namespace.
    pub(crate) namespace: String,
}

impl std::fmt::Debug for KubeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAgent")
            .field("pod", &self.pod)
            .finish_non_exhaustive()
    }
}

/// The cluster client for `config`, and the namespace to work in.
pub(crate) async fn client(config: &Config) -> anyhow::Result<(Client, String)> {
    let settings = tether_kube::client::Settings {
        kubeconfig: config.kubeconfig.as_ref().map(Into::into),
        context: config.kube_context.clone(),
        accept_invalid_certificates: config.accept_invalid_certificates,
    };
    let (client, context_namespace) = tether_kube::client::connect(&settings).await?;
    let namespace = config.target.namespace.clone().unwrap_or(context_namespace);
    Ok((client, namespace))
}

/// Resolves the target, starts its agent and waits until it runs; each phase is a step.
pub(crate) async fn start(
    config: &Config,
    target: Option<&KubeTarget>,
    ui: Ui,
) -> anyhow::Result<KubeAgent> {
    let (client, namespace) = match client(config).await {
        Ok(found) => found,
        Err(error) => {
            ui.step("connecting to the cluster")
                .fail(&format!("{error:#}"));
            return Err(error);
        }
    };
    let pod = match target {
        Some(target) => Some(find(&client, &namespace, target, config, ui).await?),
        None => {
            ui.info(&format!(
                "targetless: outgoing connections and names go through an agent pod in \
                 namespace {namespace}; incoming traffic, files and environment stay local"
            ));
            None
        }
    };
    start_for(&client, &namespace, config, pod, ui, &|_, _| {}).await
}

/// Starts an agent for `pod` (or a targetless one) and waits until it runs; each phase is a
/// step. `creating` hears the namespace and name of the Job just before it is created (whoever
/// may abandon this start must delete it).
pub(crate) async fn start_for(
    client: &Client,
    namespace: &str,
    config: &Config,
    pod: Option<TargetPod>,
    ui: Ui,
    creating: &(dyn Fn(&str, &str) + Sync),
) -> anyhow::Result<KubeAgent> {
    let client = client.clone();
    let namespace = namespace.to_owned();
    let ephemeral = config.agent.ephemeral && pod.is_some();
    if let Some(pod) = pod
        .as_ref()
        .filter(|p| ephemeral && p.shares_process_namespace)
    {
        let message = format!(
            "agent.ephemeral cannot serve pod {}: it shares one PID namespace between its \
             containers (shareProcessNamespace), so the agent could not tell the target's \
             process; use the default Job agent",
            pod.pod
        );
        // Every failure of this start is shown as a failed step (exec prints nothing more).
        ui.step("choosing how to run the agent").fail(&message);
        anyhow::bail!(message);
    }
    let token: String = rand::random::<[u8; 16]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let session: String = rand::random::<[u8; 8]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let spec = AgentSpec {
        session,
        // An ephemeral agent lives in the target pod; a targetless one is the session's own
        // foothold in the namespace: only a Job for a target may run elsewhere.
        namespace: match (&pod, ephemeral) {
            (Some(_), false) => config
                .agent
                .namespace
                .clone()
                .unwrap_or_else(|| namespace.clone()),
            _ => namespace.clone(),
        },
        target: pod.as_ref().map(|pod| AgentTarget {
            node: pod.node.clone(),
            pod: pod.pod.clone(),
            container_id: pod.container_id.clone(),
        }),
        image: config
            .agent
            .image
            .clone()
            .unwrap_or_else(|| DEFAULT_IMAGE.to_owned()),
        pull_policy: config.agent.image_pull_policy.map(|policy| {
            match policy {
                PullPolicy::Always => "Always",
                PullPolicy::IfNotPresent => "IfNotPresent",
                PullPolicy::Never => "Never",
            }
            .to_owned()
        }),
        token_sha256: TokenDigest::of(&token).to_hex(),
        port: if ephemeral {
            rand::random_range(EPHEMERAL_PORTS)
        } else {
            AGENT_PORT
        },
        idle_exit: config.agent.ttl.get(),
        privileged: config.agent.privileged,
        user: std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
        log_level: config.agent.log_level.clone(),
        nftables: config.agent.nftables,
    };
    if config.agent.ephemeral && pod.is_none() {
        ui.warn("agent.ephemeral needs a target pod; a targetless session starts a Job");
    }
    if config.agent.namespace.is_some() && (ephemeral || pod.is_none()) {
        ui.warn("agent.namespace applies only to a Job agent for a target; ignored");
    }
    let step = ui.step(&match &pod {
        Some(pod) if ephemeral => {
            format!("adding the agent to pod {} (ephemeral container)", pod.pod)
        }
        Some(pod) => format!("starting the agent on node {}", pod.node),
        None => format!("starting the agent in namespace {}", spec.namespace),
    });
    let started = std::time::Instant::now();
    let progress = |state: &str| tracing::info!("agent pod: {state}");
    let timeout = config.agent.startup_timeout.get();
    if !ephemeral {
        creating(&spec.namespace, &spec.job_name());
    }
    let starting = async {
        match &pod {
            Some(pod) if ephemeral => {
                tether_kube::agent::start_ephemeral(
                    &client,
                    &spec,
                    &pod.pod,
                    &pod.container,
                    timeout,
                    &progress,
                )
                .await
            }
            _ => tether_kube::agent::start(&client, &spec, timeout, &progress).await,
        }
    };
    // Ctrl-C (or SIGTERM) while the pod starts: remove the Job, as on any failure.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let started_or_stopped = tokio::select! {
        result = starting => result,
        _ = interrupt.recv() => Err(anyhow::anyhow!("interrupted")),
        _ = terminate.recv() => Err(anyhow::anyhow!("terminated")),
    };
    if started_or_stopped.is_err() && !ephemeral {
        // Deleting what may not exist yet is harmless; not deleting what does would leave it.
        // Bounded: a lost cluster must not hang the exit.
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            tether_kube::agent::delete(&client, &spec.namespace, &spec.job_name()),
        )
        .await;
    }
    match started_or_stopped {
        Ok(agent) => {
            step.done(&format!(
                "pod {} ready in {:.1} s",
                agent.pod,
                started.elapsed().as_secs_f64()
            ));
            Ok(KubeAgent {
                client,
                ttl: config.agent.ttl,
                pod: agent,
                target: pod,
                token,
                namespace,
            })
        }
        Err(error) => {
            step.fail(&format!("{error:#}"));
            Err(error.context("the agent did not start"))
        }
    }
}

/// Resolves the target pod, as a step the user sees.
async fn find(
    client: &Client,
    namespace: &str,
    target: &KubeTarget,
    config: &Config,
    ui: Ui,
) -> anyhow::Result<TargetPod> {
    let step = ui.step(&format!("finding {target} in namespace {namespace}"));
    let pod = match tether_kube::target::resolve(client, namespace, target).await {
        Ok(pod) => {
            // The notes name the pod when tether chose it.
            let mut detail = pod.notes.clone();
            if !detail.iter().any(|n| n.contains(&pod.pod)) {
                detail.insert(0, format!("pod {}", pod.pod));
            }
            detail.push(format!("container {}", pod.container));
            step.done(&detail.join(", "));
            pod
        }
        Err(error) => {
            step.fail(&format!("{error:#}"));
            return Err(error.context("no target"));
        }
    };
    if let Some(mesh) = pod.mesh {
        ui.info(&format!(
            "{mesh} sidecar found: steals take its plaintext hop to the app"
        ));
    }
    warn_about_probes(config, &pod, ui);
    Ok(pod)
}

/// A whole-port steal takes every connection of the port, the kubelet's TCP and gRPC probes
/// included (HTTP probes are recognised and left to the app).
fn warn_about_probes(config: &Config, pod: &TargetPod, ui: Ui) {
    let incoming = &config.feature.network.incoming;
    if incoming.mode != IncomingMode::Steal {
        return;
    }
    for probe in &pod.probes {
        let filtered = incoming.http_filter.is_set()
            && incoming
                .http_filter
                .ports
                .as_ref()
                .is_none_or(|ports| ports.contains(&probe.port));
        if probe.protocol != "http" && !filtered {
            ui.warn(&format!(
                "the pod's {} probe checks port {} over {}: stealing that port whole takes the \
                 kubelet's probe connections too, and a failing probe gets the pod restarted",
                probe.kind, probe.port, probe.protocol
            ));
        }
    }
}

/// Opens a session with a Kubernetes agent that was just started. Its pod runs, but the agent
/// may not listen yet: a port-forward dialled too early gets "connection refused" inside the pod.
/// Retried within the startup timeout.
pub(crate) async fn open_session(
    dialer: &Dialer,
    config: &Config,
) -> Result<(Link, Welcome), DialError> {
    let retry = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(1))
        .with_total_delay(Some(config.agent.startup_timeout.get()))
        .without_max_times();
    (|| dialer.open())
        .retry(retry)
        .when(DialError::retryable)
        .await
}

impl KubeAgent {
    /// How to reach this agent now and after every drop.
    pub(crate) fn dialer(&self, config: &Config) -> Dialer {
        let there: StillThere = Arc::new(|| Ok(()));
        Dialer::new(config, self.connect(), self.token.clone(), there)
    }

    /// A new port-forward to the agent for each link.
    pub(crate) fn connect(&self) -> Connect {
        let client = self.client.clone();
        let pod = self.pod.clone();
        Arc::new(move || {
            let client = client.clone();
            let pod = pod.clone();
            Box::pin(async move {
                const WITHIN: Duration = Duration::from_secs(10);
                let stream =
                    tokio::time::timeout(WITHIN, tether_kube::agent::port_forward(&client, &pod))
                        .await
                        .map_err(|_| ConnectError::TimedOut(WITHIN))??;
                Ok(Box::new(stream) as Box<dyn Io>)
            })
        })
    }

    /// Deletes the agent's Job and pod (bounded: a lost cluster must not hang the exit). An
    /// ephemeral agent cannot be removed: it ends on its own once idle (`agent.ttl`). Says what
    /// became of the agent.
    pub(crate) async fn stop(&self) -> String {
        // The session's goodbye first: an agent that never hears it keeps the session (and its
        // rules) for the whole reconnect grace.
        tether_kube::agent::drain_port_forwards().await;
        self.remove().await
    }

    /// Deletes the agent's Job (its session is over); says what became of the agent.
    pub(crate) async fn remove(&self) -> String {
        let Some(job) = &self.pod.job else {
            return format!(
                "the ephemeral agent in pod {} ends on its own in {}",
                self.pod.pod, self.ttl
            );
        };
        let deleted = tokio::time::timeout(
            Duration::from_secs(10),
            tether_kube::agent::delete(&self.client, &self.pod.namespace, job),
        )
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))
        .flatten()
        .context("the agent Job stays; it ends on its own once idle");
        match deleted {
            Ok(()) => format!("agent Job {job} deleted"),
            Err(error) => {
                tracing::warn!("{error:#}");
                format!("cannot delete the agent Job {job}: {error:#}")
            }
        }
    }
}
