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
