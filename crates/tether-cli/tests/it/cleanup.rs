//! `tether cleanup --target`: removes what dead agents left, keeps what live ones hold.

use predicates::prelude::*;
use tether_agent::rules::Owner;
use tether_testkit::{Network, require_root};

use crate::tether;

#[test]
fn cleanup_removes_rules_of_dead_agents_only() {
    if !require_root("cleanup_removes_rules_of_dead_agents_only") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0);
    // A table whose owner cannot be running (start time 1 matches no live process) and one owned
    // by this very test process.
    let dead = "tether_3fffff_1_deadbeef";
    let live = format!("tether_{}_cafe", Owner::current());
    for table in [dead, live.as_str()] {
        net.exec_ok(&pod.netns, &["nft", "add", "table", "ip", table]);
    }
    tether()
        .args(["cleanup", "--target", &format!("netns/{}", pod.netns)])
        .assert()
        .success()
        .stderr(predicate::str::contains(
            "removed 1 table(s)/chain(s); kept 1 of running agents",
        ));
    let tables = net.exec_ok(&pod.netns, &["nft", "list", "tables"]);
    assert!(!tables.contains(dead) && tables.contains(&live), "{tables}");
}

#[test]
fn cleanup_of_an_unknown_target_says_how_to_find_one() {
    tether()
        .args(["cleanup", "-t", "netns/tether-no-such-ns"])
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("does not exist")
                .and(predicate::str::contains("ip netns list")),
        );
}
