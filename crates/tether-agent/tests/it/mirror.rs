//! Mirror in a real namespace: the pod keeps answering, the session gets exact copies.

use std::{collections::BTreeMap, time::Duration};

use tether_protocol::SubscriptionMode;
use tether_testkit::{Network, agent::AgentProcess, require_root};
use tokio::task::block_in_place;

use crate::agent_bin;

/// What python's http.client sends for `GET path` to `host` with `Connection: close`.
fn request_bytes(host: &str, path: &str, close: bool) -> String {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept-Encoding: identity\r\n{connection}\r\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn mirror_copies_every_request_byte_for_byte() {
    if !require_root("mirror_copies_every_request_byte_for_byte") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    let url = format!("http://{}:80/", pod.ip);
    // A keep-alive connection opened (and used) before mirroring starts.
    let mut early = net.keepalive_client(net.client(), &url);
    assert_eq!(early.get("/early-1"), "original 80 GET /early-1");

    let agent = AgentProcess::start(agent_bin(), &format!("netns/{}", pod.netns), &[]);
    let mut session = agent.session().await;
    session
        .subscribe(80, SubscriptionMode::Mirror)
        .await
        .expect("mirror port 80");

    assert_eq!(
        block_in_place(|| early.get("/early-2")),
        "original 80 GET /early-2"
    );
    let answers = block_in_place(|| net.http_requests(&url, 1000, false));
    assert_eq!(answers.len(), 1000);
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(
            answer,
            &format!("original 80 GET /?n={i}"),
            "the pod must keep answering"
        );
    }
    // Traffic the pod sends itself over loopback.
    let local =
        block_in_place(|| net.http_requests_from(&pod.netns, "http://127.0.0.1:80/loop", 10));
    assert!(
        local.iter().all(|a| a.starts_with("original 80")),
        "{local:?}"
    );
    drop(early); // closes the early connection, so its mirrored stream ends

    // Collect streams until all 1,000 + 10 + the early one have ended (bounded: 60 s).
    const EXPECTED: usize = 1000 + 10 + 1;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.values().sum::<usize>() < EXPECTED {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(mut stream) = session.next_incoming(remaining).await else {
            let got = seen.values().sum::<usize>();
            let odd: Vec<_> = seen.keys().filter(|k| !k.starts_with("GET /?n=")).collect();
            panic!(
                "{got} of {EXPECTED} mirrored streams arrived; the ones not from the 1,000: {odd:?}"
            );
        };
        let bytes = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end())
            .await
            .expect("stream ends");
        *seen
            .entry(String::from_utf8_lossy(&bytes).into_owned())
            .or_default() += 1;
    }
    let host = pod.ip.to_string();
    for i in 0..1000 {
        let expected = request_bytes(&host, &format!("/?n={i}"), true);
        assert_eq!(
            seen.get(&expected),
            Some(&1),
            "request {i} not mirrored exactly once"
        );
    }
    for i in 0..10 {
        let expected = request_bytes("127.0.0.1", &format!("/loop?n={i}"), true);
        assert_eq!(
            seen.get(&expected),
            Some(&1),
            "loopback request {i} not mirrored exactly once"
        );
    }
    // The early connection is mirrored from its next segment on: the second request only.
    assert_eq!(
        seen.get(&request_bytes(&host, "/early-2", false)),
        Some(&1),
        "{:?}",
        seen.keys()
            .filter(|k| k.contains("early"))
            .collect::<Vec<_>>()
    );
    assert!(!seen.keys().any(|k| k.contains("early-1")));
    assert_eq!(
        seen.values().sum::<usize>(),
        EXPECTED,
        "no stream arrived twice or extra"
    );
}
