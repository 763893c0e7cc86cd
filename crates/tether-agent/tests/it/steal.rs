//! Steal in a real network namespace, with real iptables/nft, from a real client.

use std::time::Duration;

use tether_protocol::SubscriptionMode;
use tether_testkit::{Network, agent::AgentProcess, require_root};
use tokio::task::block_in_place;

use crate::{agent_bin, tether_rules};

async fn steal_scenario(nftables: bool) {
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80, 81]);
    let backend = if nftables { "true" } else { "false" };
    let agent = AgentProcess::start(
        agent_bin(),
        &format!("netns/{}", pod.netns),
        &["--nftables", backend],
    );
    let mut session = agent.session().await;
    session
        .subscribe(80, SubscriptionMode::Steal)
        .await
        .expect("steal port 80");
    let _server = session.serve_http(|port| format!("stolen {port}"));

    let url = |port: u16| format!("http://{}:{port}/", pod.ip);
    let stolen = block_in_place(|| net.http_requests(&url(80), 200, false));
    assert_eq!(stolen.len(), 200);
    let wrong: Vec<_> = stolen.iter().filter(|a| *a != "stolen 80").collect();
    assert!(
        wrong.is_empty(),
        "{} of 200 requests were not stolen: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );

    let untouched = block_in_place(|| net.http_requests(&url(81), 5, false));
    assert!(
        untouched.iter().all(|a| a.starts_with("original 81 GET")),
        "{untouched:?}"
    );

    let rules = tether_rules(&net, &pod.netns);
    let expected = if nftables {
        "table ip tether_"
    } else {
        ":TTH_"
    };
    assert!(rules.contains(expected), "rules in the pod: {rules}");
    drop(session);
    // Session end removes the session's rules; port 80 is the original app's again.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !tether_rules(&net, &pod.netns).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "rules left after the session ended: {}",
            tether_rules(&net, &pod.netns)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back = block_in_place(|| net.http_requests(&url(80), 3, false));
    assert!(
        back.iter().all(|a| a.starts_with("original 80")),
        "{back:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn steal_with_nftables() {
    if require_root("steal_with_nftables") {
        steal_scenario(true).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn steal_with_iptables_legacy() {
    if require_root("steal_with_iptables_legacy") {
        steal_scenario(false).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn flush_connections_moves_an_open_keepalive_connection_into_the_steal() {
    if !require_root("flush_connections_moves_an_open_keepalive_connection_into_the_steal") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    let url = format!("http://{}:80/", pod.ip);
    let mut early = net.keepalive_client(net.client(), &url);
    assert_eq!(early.get("/before"), "original 80 GET /before");

    let agent = AgentProcess::start(agent_bin(), &format!("netns/{}", pod.netns), &[]);
    let mut session = agent.session().await;
    // Without flush, an open connection stays with the original app.
    session
        .subscribe(80, SubscriptionMode::Steal)
        .await
        .unwrap();
    let _server = session.serve_http(|port| format!("stolen {port}"));
    assert_eq!(
        block_in_place(|| early.get("/still-original")),
        "original 80 GET /still-original"
    );
    let mut stolen_early = net.keepalive_client(net.client(), &url);
    assert_eq!(block_in_place(|| stolen_early.get("/a")), "stolen 80");
    drop(session);

    let mut session = agent.session().await;
    let flush = tether_protocol::PortSubscribe {
        port: 80,
        mode: SubscriptionMode::Steal as i32,
        flush_connections: true,
        ..Default::default()
    };
    session.subscribe_with(flush).await.unwrap();
    let _server = session.serve_http(|port| format!("stolen {port}"));
    // The next request on the old connection fails once; the client reconnects into the steal.
    assert_eq!(
        block_in_place(|| early.get("/after")),
        "reconnected: stolen 80"
    );
    assert_eq!(
        block_in_place(|| early.get("/again")),
        "stolen 80",
        "the new connection stays stolen"
    );
    let said = session.logs();
    assert!(
        said.iter()
            .any(|l| l.contains("closed 1 existing connection")),
        "{said:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_is_a_target_too() {
    if !require_root("a_process_is_a_target_too") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    // `ip netns exec` execs the app, so this pid is the app, inside the pod's namespace.
    let app = net.start_http_app(&pod, "original", &[80]);
    let agent = AgentProcess::start(agent_bin(), &format!("pid/{app}"), &[]);
    let mut session = agent.session().await;
    session
        .subscribe(80, SubscriptionMode::Steal)
        .await
        .expect("steal port 80 of the process's namespace");
    let _server = session.serve_http(|port| format!("stolen {port}"));
    let answers =
        block_in_place(|| net.http_requests(&format!("http://{}:80/", pod.ip), 20, false));
    assert_eq!(answers, ["stolen 80"; 20]);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_unsubscribe_stolen_connections_go_on_and_new_ones_reach_the_app() {
    if !require_root("after_unsubscribe_stolen_connections_go_on_and_new_ones_reach_the_app") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    let agent = AgentProcess::start(agent_bin(), &format!("netns/{}", pod.netns), &[]);
    let mut session = agent.session().await;
    session
        .subscribe(80, SubscriptionMode::Steal)
        .await
        .unwrap();
    let url = format!("http://{}:80/", pod.ip);
    let client = std::sync::Arc::new(std::sync::Mutex::new(
        net.keepalive_client(net.client(), &url),
    ));
    let get = |path: &'static str| {
        let client = std::sync::Arc::clone(&client);
        tokio::task::spawn_blocking(move || client.lock().unwrap().get(path))
    };

    let first = get("/one");
    let mut request = session
        .next_incoming(Duration::from_secs(5))
        .await
        .expect("the request is stolen");
    assert_eq!(request.request_line().as_deref(), Some("GET /one"));
    request.answer("kept 1").await;
    assert_eq!(first.await.unwrap(), "kept 1");

    session.unsubscribe(80).await.unwrap();
    // The stolen keep-alive connection is still the session's …
    let second = get("/two");
    let mut request = session
        .next_incoming(Duration::from_secs(5))
        .await
        .expect("still stolen");
    assert_eq!(request.request_line().as_deref(), Some("GET /two"));
    request.answer("kept 2").await;
    assert_eq!(second.await.unwrap(), "kept 2");
    // … while a new connection reaches the original app.
    let fresh = block_in_place(|| net.http_requests(&url, 1, false));
    assert_eq!(fresh, ["original 80 GET /?n=0"]);
}
