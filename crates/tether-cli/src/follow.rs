//! Following a Kubernetes target for the whole session. Pods are replaced all the time
//! (rollouts, evictions, crashes, autoscaling); a session on `deploy/api` keeps working across
//! that without the developer doing anything:
//!
//! - the target's pods are watched (the workload's selector, or the one pod of `pod/NAME`);
//! - when the pod of the primary session goes (deleted, terminating, finished), a ready pod of
//!   the workload is chosen, an agent started for it, every port subscribed again with the same
//!   modes and filters, and the session (incoming, outgoing, names, files) moved to it; the old
//!   pod's agent is deleted. One line tells the user;
//! - a `pod/NAME` target (or `job/NAME`) cannot follow: its deletion ends the run's session,
//!   which then stops the command or lets it run on, per `on_link_lost`;
//! - with `mirror_all_replicas`, every other ready pod gets an agent that only mirrors, added
//!   and removed as pods come and go.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tether_config::{Config, KubeKind, KubeTarget};
use tether_kube::{
    Client,
    pods::{self, Pod, PodWatch},
};
use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    kube_agent::{self, KubeAgent},
    proxy::{self, Event, Lost, Opened, Proxy},
    ui::Ui,
};

/// How long the end of the primary session waits for the watch to say its pod went away,
/// before it counts as the end of the run's session.
const LOST_WAIT: Duration = Duration::from_secs(5);

/// After a failed move or a failed mirror start, the next try.
const RETRY: Duration = Duration::from_secs(2);

/// A wait for a ready pod to move to is said once it lasts this long (a replica being replaced
/// usually has its successor ready sooner: then the move is all the user hears of).
const WAIT_SAY: Duration = Duration::from_secs(3);

/// A pod whose agent failed to start is passed over this long when another is ready.
const FAILED_FOR: Duration = Duration::from_secs(30);

/// Follows the target until stopped; holds every agent it started.
pub(crate) struct Follower {
    /// `None` once halted.
    task: Option<tokio::task::JoinHandle<()>>,
    client: Client,
    agents: Arc<Mutex<Agents>>,
}

/// The agents of the run, by the uid of the pod they serve, and the ones being deleted.
#[derive(Debug, Default)]
struct Agents {
    by_uid: BTreeMap<String, KubeAgent>,
    removing: JoinSet<String>,
    /// Jobs created by starts still under way (namespace, name): a start abandoned when the run
    /// ends must not leave its Job.
    starting: BTreeSet<(String, String)>,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

impl Agents {
    /// Keeps `agent` for pod `uid`; one it replaces is deleted.
    fn keep(&mut self, uid: String, agent: KubeAgent) {
        if let Some(job) = &agent.pod.job {
            self.starting
                .remove(&(agent.pod.namespace.clone(), job.clone()));
        }
        if let Some(old) = self.by_uid.insert(uid, agent) {
            self.removing.spawn(async move { old.remove().await });
        }
    }

    /// Deletes the agent of pod `uid` in the background (its session is over).
    fn retire(&mut self, uid: &str) {
        if let Some(agent) = self.by_uid.remove(uid) {
            self.removing.spawn(async move { agent.remove().await });
        }
    }
}

impl Follower {
    /// Starts following `target`, whose first agent (`first`) the proxy's session runs on.
    pub(crate) async fn start(
        first: &KubeAgent,
        target: &KubeTarget,
        config: &Config,
        proxy: &Proxy,
        ui: Ui,
    ) -> Follower {
        let agents = Arc::new(Mutex::new(Agents::default()));
        let Some(pod) = first.target.clone() else {
            // Targetless: nothing to follow; the follower only owns the agent.
            agents
                .lock()
                .expect("agents lock")
                .by_uid
                .insert(String::new(), first.clone());
            return Follower {
                task: None,
                client: first.client.clone(),
                agents,
            };
        };
        agents
            .lock()
            .expect("agents lock")
            .by_uid
            .insert(pod.uid.clone(), first.clone());
        let follows = matches!(
            target.kind,
            KubeKind::Deployment | KubeKind::StatefulSet | KubeKind::ReplicaSet
        );
        let mirror_all = config.feature.network.incoming.mirror_all_replicas;
        let selector = if follows {
            tether_kube::target::workload_selector(
                &first.client,
                &first.namespace,
                target.kind,
                &target.name,
            )
            .await
            .inspect_err(|error| {
                ui.warn(&format!(
                    "cannot follow {}/{}: {error:#}; the session stays with pod {}",
                    target.kind.as_str(),
                    target.name,
                    pod.pod
                ));
            })
            .ok()
        } else {
            if mirror_all {
                ui.warn(&format!(
                    "mirror_all_replicas applies to deploy/, statefulset/ and replicaset/ \
                     targets; mirroring pod {} only",
                    pod.pod
                ));
            }
            None
        };
        let watch = match &selector {
            Some(selector) => PodWatch::selector(&first.client, &first.namespace, selector),
            None => PodWatch::named(&first.client, &first.namespace, &pod.pod),
        };
        let (handle, lost) = proxy.follow();
        let follow = Follow {
            client: first.client.clone(),
            namespace: first.namespace.clone(),
            config: config.clone(),
            ui,
            proxy: handle,
            workload: selector
                .is_some()
                .then(|| format!("{}/{}", target.kind.as_str(), target.name)),
            container: target.container.clone(),
            primary: pod.pod.clone(),
            primary_uid: pod.uid.clone(),
            mirror_all: mirror_all && selector.is_some(),
            agents: Arc::clone(&agents),
            moving_since: None,
            waiting_said: false,
            lost: None,
            move_retry_at: None,
            mirror_retry_at: None,
            failed: BTreeMap::new(),
            say_wait_at: None,
        };
        Follower {
            task: Some(tokio::spawn(follow.run(watch, lost))),
            client: first.client.clone(),
            agents,
        }
    }

    /// Stops following (the agents stay).
    pub(crate) async fn halt(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Stops following and removes every agent of the run; says what became of them.
    pub(crate) async fn stop(mut self) -> String {
        self.halt().await;
        // The sessions' goodbyes first: an agent that never hears its goodbye keeps its session
        // (and its rules) for the whole reconnect grace.
        tether_kube::agent::drain_port_forwards().await;
        let (agents, mut removing, starting) = {
            let mut all = self.agents.lock().expect("agents lock");
            (
                std::mem::take(&mut all.by_uid),
                std::mem::take(&mut all.removing),
                std::mem::take(&mut all.starting),
            )
        };
        // Starts abandoned when following stopped: their Jobs exist, or are about to.
        for (namespace, job) in starting {
            let client = self.client.clone();
            removing.spawn(async move {
                match tokio::time::timeout(
                    Duration::from_secs(10),
                    tether_kube::agent::delete(&client, &namespace, &job),
                )
                .await
                {
                    Ok(Ok(())) => format!("agent Job {job} deleted"),
                    Ok(Err(error)) => format!("cannot delete the agent Job {job}: {error:#}"),
                    Err(_) => format!("cannot delete the agent Job {job}: timed out"),
                }
            });
        }
        let mut said: Vec<String> =
            futures_util::future::join_all(agents.values().map(KubeAgent::remove)).await;
        // Agents of replaced pods still being deleted: their fate is news only if it failed.
        while let Some(done) = removing.join_next().await {
            if let Ok(message) = done
                && message.starts_with("cannot")
            {
                said.push(message);
            }
        }
        // Failures first: the caller shows the whole as failed when it starts so.
        said.sort_by_key(|m| !m.starts_with("cannot"));
        said.join("; ")
    }
}

/// The follower's task.
struct Follow {
    client: Client,
    namespace: String,
    config: Config,
    ui: Ui,
    proxy: proxy::Handle,
    /// `deploy/api` when the target is a workload (then pods are followed), `None` for
    /// `pod/NAME` and `job/NAME`.
    workload: Option<String>,
    /// The container the user named (`…/container/NAME`).
    container: Option<String>,
    /// The pod of the primary session: its name and uid.
    primary: String,
    primary_uid: String,
    mirror_all: bool,
    agents: Arc<Mutex<Agents>>,
    /// When the primary's pod was seen going (the move's clock).
    moving_since: Option<Instant>,
    waiting_said: bool,
    /// The primary session ended on its own: why, and until when its pod may still be reported
    /// gone (then it was a replacement, not a loss).
    lost: Option<(String, Instant)>,
    /// After a failed move, or a failed (or ended) mirroring session: the next try.
    move_retry_at: Option<Instant>,
    mirror_retry_at: Option<Instant>,
    /// Pods whose agent failed to start, left alone until then.
    failed: BTreeMap<String, Instant>,
    /// When to say that the move waits for a ready pod.
    say_wait_at: Option<Instant>,
}

impl Follow {
    async fn run(mut self, mut watch: PodWatch, mut lost: mpsc::UnboundedReceiver<Lost>) {
        loop {
            let now = Instant::now();
            let wake = [
                self.lost.as_ref().map(|l| l.1),
                self.move_retry_at,
                self.mirror_retry_at,
                self.say_wait_at,
            ]
            .into_iter()
            .flatten()
            .filter(|at| *at > now)
            .min();
            tokio::select! {
                changed = watch.changed() => {
                    if changed.is_none() {
                        return;
                    }
                }
                Some(ended) = lost.recv() => {
                    let mut agents = self.agents.lock().expect("agents lock");
                    if ended.key == self.primary_uid {
                        self.lost = Some((ended.reason, Instant::now() + LOST_WAIT));
                    } else if agents.by_uid.contains_key(&ended.key) {
                        // A mirroring session that ended on its own: its agent goes, and the
                        // pod, if still there, is mirrored again shortly. (The end of a session
                        // the run already left is no news.)
                        agents.retire(&ended.key);
                        self.mirror_retry_at = Some(Instant::now() + RETRY);
                    }
                }
                () = sleep_until(wake) => {}
            }
            // Nothing is known of the pods before the first list; a lost session still counts.
            if !watch.listed() {
                if let Some((reason, deadline)) = &self.lost
                    && Instant::now() >= *deadline
                {
                    self.proxy.event(Event::SessionLost {
                        reason: reason.clone(),
                    });
                    return;
                }
                continue;
            }
            let pods = watch.pods().clone();
            if !self.reconcile(&pods).await {
                return;
            }
        }
    }

    /// Brings the sessions in line with the pods; `false` when there is nothing more to follow.
    async fn reconcile(&mut self, pods: &BTreeMap<String, Pod>) -> bool {
        let now = Instant::now();
        if let Some(why) = pods::gone(pods, &self.primary, &self.primary_uid) {
            // Its session's end, if it came, was the pod's going.
            self.lost = None;
            let Some(workload) = self.workload.clone() else {
                let reason = format!(
                    "target pod {} {why}; a pod/NAME or job/NAME target cannot follow its \
                     replacement (target the workload, e.g. deploy/NAME, to follow it)",
                    self.primary
                );
                self.proxy.end(reason).await;
                return false;
            };
            if self.move_retry_at.is_none_or(|at| at <= now) {
                self.move_retry_at = None;
                self.move_primary(pods, why, &workload).await;
            }
        } else if let Some((reason, deadline)) = &self.lost
            && Instant::now() >= *deadline
        {
            // The session ended while its pod is still there: that is the run's session lost.
            self.proxy.event(Event::SessionLost {
                reason: reason.clone(),
            });
            return false;
        }
        if self.mirror_all && self.mirror_retry_at.is_none_or(|at| at <= now) {
            self.mirror_retry_at = None;
            self.follow_replicas(pods).await;
        }
        true
    }

    /// The primary's pod is going: moves the session to another ready pod (one that already
    /// mirrors, if any: that is instant), or waits for one.
    async fn move_primary(&mut self, pods: &BTreeMap<String, Pod>, why: &str, workload: &str) {
        let since = *self.moving_since.get_or_insert_with(Instant::now);
        let mirrored: BTreeSet<String> = self.proxy.mirrored().into_iter().map(|m| m.0).collect();
        let candidates: Vec<&Pod> = pods::ready(pods)
            .into_iter()
            .filter(|p| pods::uid(p) != self.primary_uid)
            .collect();
        // A pod whose agent just failed to start is tried again only when no other is ready.
        let now = Instant::now();
        self.failed.retain(|_, until| *until > now);
        let fresh: Vec<&Pod> = candidates
            .iter()
            .copied()
            .filter(|p| !self.failed.contains_key(&pods::uid(p)))
            .collect();
        let candidates = if fresh.is_empty() { candidates } else { fresh };
        let choice = candidates
            .iter()
            .find(|p| mirrored.contains(&pods::uid(p)))
            .or(candidates.first());
        let Some(pod) = choice else {
            if since.elapsed() < WAIT_SAY {
                self.say_wait_at = Some(since + WAIT_SAY);
            } else if !self.waiting_said {
                self.ui.warn(&format!(
                    "target pod {} {why}; waiting for a ready pod of {workload} to move the \
                     session to",
                    self.primary
                ));
                self.waiting_said = true;
            }
            return;
        };
        let (name, uid) = (pods::name(pod), pods::uid(pod));
        let moved = if mirrored.contains(&uid) {
            self.proxy.replace_primary(None, &uid).await
        } else {
            match self.open(pod).await {
                Ok(opened) => self.proxy.replace_primary(Some(opened), &uid).await,
                Err(error) => Err(error),
            }
        };
        match moved {
            Ok(()) => {
                let old = std::mem::replace(&mut self.primary, name.clone());
                let old_uid = std::mem::replace(&mut self.primary_uid, uid);
                self.agents.lock().expect("agents lock").retire(&old_uid);
                let took = since.elapsed().as_secs_f64();
                self.ui.info(&if old == name {
                    format!(
                        "target pod {old} was recreated (a new pod with the same name); session \
                         moved in {took:.1} s"
                    )
                } else {
                    format!("target pod {old} replaced by {name}; session moved in {took:.1} s")
                });
                self.moving_since = None;
                self.waiting_said = false;
                self.say_wait_at = None;
                self.lost = None;
            }
            Err(error) => {
                self.agents.lock().expect("agents lock").retire(&uid);
                self.failed.insert(uid, Instant::now() + FAILED_FOR);
                self.ui.warn(&format!(
                    "cannot move the session to pod {name}: {error}; trying again in {} s",
                    RETRY.as_secs()
                ));
                self.move_retry_at = Some(Instant::now() + RETRY);
            }
        }
    }

    /// `mirror_all_replicas`: a mirroring session per other ready pod, none for pods gone.
    async fn follow_replicas(&mut self, pods: &BTreeMap<String, Pod>) {
        let workload = self.workload.clone().unwrap_or_default();
        let mirrored = self.proxy.mirrored();
        for (uid, name) in &mirrored {
            if let Some(why) = pods::gone(pods, name, uid) {
                self.proxy.remove_mirror(uid).await;
                self.agents.lock().expect("agents lock").retire(uid);
                self.ui.info(&format!(
                    "pod {name} of {workload} {why}: no longer mirrored ({} pods are)",
                    self.proxy.mirrored().len() + 1
                ));
            }
        }
        let mirrored: BTreeSet<String> = mirrored.into_iter().map(|m| m.0).collect();
        let wanted: Vec<&Pod> = pods::ready(pods)
            .into_iter()
            .filter(|p| {
                let uid = pods::uid(p);
                uid != self.primary_uid && !mirrored.contains(&uid)
            })
            .collect();
        if wanted.is_empty() {
            return;
        }
        {
            // A mirroring session that ended on its own left its agent behind: replace it.
            let mut agents = self.agents.lock().expect("agents lock");
            for pod in &wanted {
                agents.retire(&pods::uid(pod));
            }
        }
        let opening = wanted
            .iter()
            .map(|pod| async { (pods::name(pod), pods::uid(pod), self.open(pod).await) });
        for (name, uid, opened) in futures_util::future::join_all(opening).await {
            let added = match opened {
                Ok(opened) => self.proxy.add_mirror(opened).await,
                Err(error) => Err(error),
            };
            match added {
                Ok(()) => self.ui.info(&format!(
                    "mirroring pod {name} of {workload} too ({} pods are mirrored)",
                    self.proxy.mirrored().len() + 1
                )),
                Err(error) => {
                    self.agents.lock().expect("agents lock").retire(&uid);
                    self.ui.warn(&format!(
                        "cannot mirror pod {name}: {error}; trying again in {} s",
                        RETRY.as_secs()
                    ));
                    self.mirror_retry_at = Some(Instant::now() + RETRY);
                }
            }
        }
    }

    /// Starts an agent for `pod` and opens a session with it.
    async fn open(&self, pod: &Pod) -> Result<Opened, String> {
        let (name, uid) = (pods::name(pod), pods::uid(pod));
        let target = tether_kube::target::target_pod(
            pod,
            &self.namespace,
            self.container.as_deref(),
            &mut Vec::new(),
        )
        .map_err(|e| format!("{e:#}"))?;
        let created = Mutex::new(None);
        let creating = |namespace: &str, job: &str| {
            let job = (namespace.to_owned(), job.to_owned());
            let mut agents = self.agents.lock().expect("agents lock");
            agents.starting.insert(job.clone());
            *created.lock().expect("created lock") = Some(job);
        };
        let started = kube_agent::start_for(
            &self.client,
            &self.namespace,
            &self.config,
            Some(target),
            Ui::quiet(),
            &creating,
        )
        .await;
        let agent = match started {
            Ok(agent) => agent,
            Err(error) => {
                // A failed start deletes its own Job.
                if let Some(job) = created.lock().expect("created lock").take() {
                    self.agents
                        .lock()
                        .expect("agents lock")
                        .starting
                        .remove(&job);
                }
                return Err(format!("{error:#}"));
            }
        };
        let dialer = Arc::new(agent.dialer(&self.config));
        self.agents
            .lock()
            .expect("agents lock")
            .keep(uid.clone(), agent);
        let (link, welcome) = kube_agent::open_session(&dialer, &self.config)
            .await
            .map_err(|e| e.describe())?;
        Ok(Opened {
            dialer,
            link,
            welcome,
            pod: name,
            key: uid,
        })
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
