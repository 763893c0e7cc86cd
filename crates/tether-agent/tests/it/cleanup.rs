//! The three cleanup layers: the guard, expiring ports (nft), and the sweep at start.

use std::time::{Duration, Instant};

use tether_protocol::SubscriptionMode;
use tether_testkit::{Network, Pod, agent::AgentProcess, require_root};
use tokio::task::block_in_place;

use crate::{agent_bin, tether_rules};

fn kill9(pids: &[u32]) {
    let mut args = vec!["-9".to_owned()];
    args.extend(pids.iter().map(u32::to_string));
    std::process::Command::new("kill")
        .args(&args)
        .status()
        .unwrap();
}

/// Polls (every 50 ms) until a new connection to `port` reaches the original app; returns how long
/// it took, or panics after `limit`.
fn until_original(net: &Network, pod: &Pod, port: u16, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let answer = net.http_requests(&format!("http://{}:{port}/", pod.ip), 1, false);
        if answer.first().is_some_and(|a| a.starts_with("original")) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "after {limit:?} port {port} still does not reach the original app: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn worker_killed(nftables: bool) {
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    let backend = if nftables { "true" } else { "false" };
    let mut agent = AgentProcess::start(
        agent_bin(),
        &format!("netns/{}", pod.netns),
        &["--nftables", backend],
    );
    let mut session = agent.session().await;
    session
        .subscribe(80, SubscriptionMode::Steal)
        .await
        .unwrap();
    let _server = session.serve_http(|_| "stolen".into());
    assert_eq!(
        block_in_place(|| net.http_requests(&format!("http://{}:80/", pod.ip), 1, false)),
        ["stolen"]
    );

    kill9(&[agent.worker_pid]);
    let took = block_in_place(|| until_original(&net, &pod, 80, Duration::from_secs(2)));
    eprintln!(
        "worker SIGKILL ({}): original app reached again after {took:?}",
        if nftables { "nft" } else { "legacy" }
    );
    assert_eq!(
        tether_rules(&net, &pod.netns),
        "",
        "the guard must remove every rule"
    );
    assert_eq!(
        block_in_place(|| agent.wait(Duration::from_secs(5))),
        Some(137),
        "the guard exits with the worker's status"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_leaves_no_rule_with_nftables() {
    if require_root("a_killed_worker_leaves_no_rule_with_nftables") {
        worker_killed(true).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_leaves_no_rule_with_iptables_legacy() {
    if require_root("a_killed_worker_leaves_no_rule_with_iptables_legacy") {
        worker_killed(false).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn when_every_agent_process_dies_nft_redirects_expire_and_the_next_agent_sweeps() {
    if !require_root("when_every_agent_process_dies_nft_redirects_expire_and_the_next_agent_sweeps")
    {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    let target = format!("netns/{}", pod.netns);
    let agent = AgentProcess::start(agent_bin(), &target, &["--nftables", "true"]);
    let mut session = agent.session().await;
    session
        .subscribe(80, SubscriptionMode::Steal)
        .await
        .unwrap();
    let _server = session.serve_http(|_| "stolen".into());
    assert_eq!(
        block_in_place(|| net.http_requests(&format!("http://{}:80/", pod.ip), 1, false)),
        ["stolen"]
    );

    kill9(&[agent.guard_pid(), agent.worker_pid]);
    let took = block_in_place(|| until_original(&net, &pod, 80, Duration::from_secs(5)));
    eprintln!(
        "guard and worker SIGKILL: original app reached again after {took:?} with nothing running"
    );
    let leftover = tether_rules(&net, &pod.netns);
    assert!(
        leftover.contains(&format!("tether_{}", agent.owner)),
        "the expired table stays until a sweep: {leftover}"
    );
    // Regression: the dead guard is still a zombie (this test, its parent, has not reaped it), as
    // it is while `tether exec` has not yet noticed. Its start time is still readable, and the
    // sweep used to count it alive and keep its table.
    assert!(
        agent.exited_unreaped(),
        "the killed guard is a zombie until it is reaped"
    );

    let _next = AgentProcess::start(agent_bin(), &target, &[]);
    assert_eq!(
        tether_rules(&net, &pod.netns),
        "",
        "the next agent's sweep removes the dead agent's table"
    );
    drop(session);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_agents_on_one_pod_keep_to_their_own_rules() {
    if !require_root("two_agents_on_one_pod_keep_to_their_own_rules") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80, 81]);
    let target = format!("netns/{}", pod.netns);
    let mut first = AgentProcess::start(agent_bin(), &target, &[]);
    let second = AgentProcess::start(agent_bin(), &target, &[]);
    let mut one = first.session().await;
    let mut two = second.session().await;
    one.subscribe(80, SubscriptionMode::Steal).await.unwrap();
    two.subscribe(81, SubscriptionMode::Steal).await.unwrap();
    let _a = one.serve_http(|port| format!("first {port}"));
    let _b = two.serve_http(|port| format!("second {port}"));
    let get = |port: u16| {
        block_in_place(|| net.http_requests(&format!("http://{}:{port}/", pod.ip), 3, false))
    };
    assert_eq!(get(80), ["first 80"; 3]);
    assert_eq!(get(81), ["second 81"; 3]);

    assert_eq!(block_in_place(|| first.stop()), Some(0));
    let rules = tether_rules(&net, &pod.netns);
    assert!(
        !rules.contains(&first.owner) && rules.contains(&second.owner),
        "{rules}"
    );
    assert!(get(80)[0].starts_with("original 80"));
    assert_eq!(get(81), ["second 81"; 3]);
}

/// Setting a session's rules up twice (and adding a port twice) adds nothing twice, with or
/// without a mesh, in both backends; the teardown leaves the nat table as it was.
#[tokio::test(flavor = "multi_thread")]
async fn setting_up_twice_adds_nothing_twice_and_teardown_restores_the_table() {
    if !require_root("setting_up_twice_adds_nothing_twice_and_teardown_restores_the_table") {
        return;
    }
    use tether_agent::{
        netns::Netns,
        rules::{self, Backend, Mesh, Owner, SessionRules},
    };
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    let netns = Netns::resolve(&format!("netns/{}", pod.netns)).unwrap();
    let listing = |backend: Backend| {
        let args: &[&str] = match backend {
            Backend::Nft => &["nft", "list", "ruleset"],
            Backend::Legacy => &["iptables-legacy-save", "-t", "nat"],
        };
        block_in_place(|| net.exec_ok(&pod.netns, args))
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.rfind(" [") {
                Some(at) if l.starts_with(':') => l[..at].to_owned(),
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
    };
    for backend in [Backend::Nft, Backend::Legacy] {
        for mesh in [None, Some(Mesh::istio())] {
            let before = listing(backend);
            let session = SessionRules {
                backend,
                owner: Owner::current(),
                session: format!("twice{}", u8::from(mesh.is_some())),
                listen_port: 41000,
                mesh,
            };
            rules::apply(&netns, &session.setup()).await.unwrap();
            rules::apply(&netns, &session.add_port(8080)).await.unwrap();
            // Set up again: the port added before is still redirected.
            rules::apply(&netns, &session.setup()).await.unwrap();
            assert!(
                listing(backend).iter().any(|l| l.contains("8080")),
                "{backend} {mesh:?}: a second setup dropped the port"
            );
            rules::apply(&netns, &session.add_port(8080)).await.unwrap();
            let after = listing(backend);
            let redirects = after.iter().filter(|l| l.contains("41000")).count();
            let jumps = after
                .iter()
                .filter(|l| l.contains(&format!("-j {}", session.name())))
                .count();
            let expected_jumps = match (backend, mesh) {
                (Backend::Nft, _) => 0,
                (Backend::Legacy, None) => 2,
                (Backend::Legacy, Some(_)) => 1,
            };
            let expected_redirects = match (backend, mesh) {
                (Backend::Nft, None) => 2, // prerouting and output
                _ => 1,
            };
            assert_eq!(
                (redirects, jumps),
                (expected_redirects, expected_jumps),
                "{backend} {mesh:?}:\n{}",
                after.join("\n")
            );
            rules::apply(&netns, &session.teardown()).await.unwrap();
            assert_eq!(listing(backend), before, "{backend} {mesh:?}");
        }
    }
}
