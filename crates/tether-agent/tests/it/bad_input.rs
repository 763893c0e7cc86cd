//! Bad targets, taken ports, missing tools: clear errors, and the agent keeps serving.

use tether_protocol::{ErrorCode, SubscriptionMode};
use tether_testkit::{Network, agent::AgentProcess, require_root};

use crate::agent_bin;

#[test]
fn an_unknown_target_is_refused_at_start_with_a_clear_message() {
    let (code, stderr) = AgentProcess::start_failing(agent_bin(), "netns/tether-no-such-namespace");
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("netns/tether-no-such-namespace does not exist")
            && stderr.contains("ip netns list"),
        "{stderr}"
    );
    let (code, stderr) = AgentProcess::start_failing(agent_bin(), "deploy/api");
    assert_eq!(code, Some(1));
    assert!(stderr.contains("not a local target"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_stolen_by_another_session_is_refused_and_both_sessions_keep_working() {
    if !require_root("a_port_stolen_by_another_session_is_refused_and_both_sessions_keep_working") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80, 81]);
    let agent = AgentProcess::start(agent_bin(), &format!("netns/{}", pod.netns), &[]);
    let mut first = agent.session().await;
    let mut second = agent.session().await;
    first.subscribe(80, SubscriptionMode::Steal).await.unwrap();
    let refused = second
        .subscribe(80, SubscriptionMode::Steal)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), ErrorCode::PortInUse);
    assert!(
        refused.message.contains(&format!(
            "port 80 is already stolen by session {}",
            first.session_id
        )),
        "{}",
        refused.message
    );
    let again = first
        .subscribe(80, SubscriptionMode::Steal)
        .await
        .unwrap_err();
    assert!(again.message.contains("this session"), "{}", again.message);
    second
        .subscribe(81, SubscriptionMode::Steal)
        .await
        .expect("the refused session keeps working");
    let bad = second
        .subscribe(0, SubscriptionMode::Steal)
        .await
        .unwrap_err();
    assert_eq!(bad.code(), ErrorCode::BadRequest);
    let modeless = second
        .subscribe(82, SubscriptionMode::Unspecified)
        .await
        .unwrap_err();
    assert_eq!(modeless.code(), ErrorCode::BadRequest);
    let not_mine = second.unsubscribe(80).await.unwrap_err();
    assert_eq!(not_mine.code(), ErrorCode::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_that_disappears_gets_a_target_gone_error() {
    if !require_root("a_target_that_disappears_gets_a_target_gone_error") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    let agent = AgentProcess::start(agent_bin(), &format!("netns/{}", pod.netns), &[]);
    let mut session = agent.session().await;
    let deleted = std::process::Command::new("ip")
        .args(["netns", "del", &pod.netns])
        .status()
        .unwrap();
    assert!(deleted.success());
    let gone = session
        .subscribe(80, SubscriptionMode::Steal)
        .await
        .unwrap_err();
    assert_eq!(gone.code(), ErrorCode::TargetGone);
    assert!(gone.message.contains(&pod.netns), "{}", gone.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_iptables_is_a_clear_error_and_the_session_goes_on() {
    if !require_root("missing_iptables_is_a_clear_error_and_the_session_goes_on") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    // A PATH without /usr/sbin: no iptables, no nft (nsenter stays reachable in /usr/bin).
    let agent = AgentProcess::start_with_env(
        agent_bin(),
        &format!("netns/{}", pod.netns),
        &["--nftables", "false"],
        &[("PATH", "/usr/bin:/bin")],
    );
    let mut session = agent.session().await;
    let missing = session
        .subscribe(80, SubscriptionMode::Steal)
        .await
        .unwrap_err();
    assert_eq!(missing.code(), ErrorCode::Internal);
    assert!(
        missing
            .message
            .contains("`iptables-legacy` is not installed"),
        "{}",
        missing.message
    );
    session
        .subscribe(80, SubscriptionMode::Mirror)
        .await
        .expect("mirror needs no iptables");
    let answers = tokio::task::block_in_place(|| {
        net.http_requests(&format!("http://{}:80/", pod.ip), 2, false)
    });
    assert!(
        answers.iter().all(|a| a.starts_with("original 80")),
        "a failed steal must not touch traffic: {answers:?}"
    );
}
