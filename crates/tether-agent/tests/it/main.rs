//! The agent as a client meets it: over a real TCP socket.

mod bad_input;
mod carrier;
mod cleanup;
mod container;
mod handshake;
mod mirror;
mod steal;

use std::net::SocketAddr;

use tether_agent::{Agent, netns::Netns, rules::Owner};
use tokio::net::{TcpListener, TcpStream};

pub(crate) const TOKEN: &str = "f00dfeedf00dfeedf00dfeedf00dfeed";

/// Starts an agent (in this process, in its own namespace) on a loopback port; it stops with the
/// test's runtime. Needs no root: nothing here touches rules.
pub(crate) async fn start_agent() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let agent = Agent::start(
        tether_protocol::TokenDigest::of(TOKEN),
        Netns::current(),
        Owner::current(),
        Some(true),
    )
    .await
    .unwrap();
    tokio::spawn(tether_agent::serve(listener, agent));
    addr
}

pub(crate) async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// The agent binary built by this package.
pub(crate) fn agent_bin() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_tether-agent"))
}

/// The rules tether has in a namespace, in both backends (empty when there are none).
pub(crate) fn tether_rules(net: &tether_testkit::Network, netns: &str) -> String {
    let nft = net.exec_ok(netns, &["nft", "list", "ruleset"]);
    let legacy = net.exec_ok(netns, &["iptables-legacy-save"]);
    nft.lines()
        .chain(legacy.lines())
        .filter(|l| l.contains("tether_") || l.contains("TTH_"))
        .collect::<Vec<_>>()
        .join("\n")
}
