//! `container/RUNTIME://ID` targets: the agent finds the container's process through real cgroup
//! directories, as it does on a node with `hostPID`.

use std::time::Duration;

use tether_protocol::SubscriptionMode;
use tether_testkit::{Network, agent::AgentProcess, cgroup::Container, require_root};
use tokio::task::block_in_place;

use crate::agent_bin;

#[tokio::test(flavor = "multi_thread")]
async fn a_container_target_is_the_network_of_the_process_in_that_cgroup() {
    if !require_root("a_container_target_is_the_network_of_the_process_in_that_cgroup") {
        return;
    }
    let net = Network::new(2);
    let (pod, other) = (net.pod(0).clone(), net.pod(1).clone());
    net.start_http_app(&pod, "original", &[80]);
    net.start_http_app(&other, "other", &[80]);
    // The container's process: a sleeper in the pod's namespace, moved into a cgroup named
    // like a containerd container. A process of the other pod gets a container of its own, so a
    // lookup that took any kubepods process would pick the wrong namespace half the time.
    let sleeper = net.spawn_pod_process(&pod, "true", &[]);
    let container = Container::adopt(sleeper);
    let _decoy = Container::adopt(net.spawn_pod_process(&other, "true", &[]));

    let agent = AgentProcess::start(agent_bin(), &format!("container/{}", container.id), &[]);
    let mut session = agent.session().await;
    session
        .subscribe(80, SubscriptionMode::Steal)
        .await
        .expect("steal port 80 of the container's pod");
    let _server = session.serve_http(|port| format!("stolen {port}"));

    let answers = block_in_place(|| net.http_requests(&format!("http://{}:80/", pod.ip), 5, false));
    assert!(answers.iter().all(|a| a == "stolen 80"), "{answers:?}");
    let untouched =
        block_in_place(|| net.http_requests(&format!("http://{}:80/", other.ip), 3, false));
    assert!(
        untouched.iter().all(|a| a.starts_with("other 80")),
        "{untouched:?}"
    );
}

#[test]
fn an_unknown_container_is_a_clear_error() {
    if !require_root("an_unknown_container_is_a_clear_error") {
        return;
    }
    let id = "containerd://00000000000000000000000000000000000000000000000000000000deadbeef";
    let (code, stderr) = AgentProcess::start_failing(agent_bin(), &format!("container/{id}"));
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains(&format!("no process of container {id} runs on this host")),
        "{stderr}"
    );
    let (code, stderr) = AgentProcess::start_failing(agent_bin(), "container/abc");
    assert_ne!(code, Some(0));
    assert!(stderr.contains("`abc` is not a container id"), "{stderr}");
}

#[test]
fn an_agent_with_idle_exit_ends_on_its_own_when_no_session_comes() {
    // Needs no root: no target, no rules.
    let mut agent = AgentProcess::start_untargeted(agent_bin(), &["--idle-exit", "1s"]);
    assert_eq!(
        agent.wait(Duration::from_secs(20)),
        Some(0),
        "the agent did not exit 1 s after starting with no session"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_idle_exit_stays_while_a_session_lives() {
    let mut agent = AgentProcess::start_untargeted(agent_bin(), &["--idle-exit", "1s"]);
    let session = agent.session().await;
    // Three idle periods with a session open: still running.
    assert_eq!(
        agent.wait(Duration::from_secs(3)),
        None,
        "exited during a session"
    );
    drop(session);
    assert_eq!(
        agent.wait(Duration::from_secs(20)),
        Some(0),
        "the agent did not exit 1 s after its session ended"
    );
}
