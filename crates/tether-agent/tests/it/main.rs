//! The agent as a client meets it: over a real TCP socket.

mod handshake;

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};

pub(crate) const TOKEN: &str = "f00dfeedf00dfeedf00dfeedf00dfeed";

/// Starts an agent on a loopback port; it stops with the test's runtime.
pub(crate) async fn start_agent() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tether_agent::serve(listener, Arc::from(TOKEN)));
    addr
}

pub(crate) async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}
