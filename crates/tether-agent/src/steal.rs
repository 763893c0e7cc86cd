//! Steal: the listener redirected connections arrive at, and handing them to their session.
//!
//! One listener per agent, in the target namespace. The rules send every stolen port there; the
//! original destination comes from `SO_ORIGINAL_DST`. A connection whose port no session holds
//! (a race with unsubscribe) goes to the original destination instead: nothing is blackholed.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
};

use nix::sys::socket::{getsockopt, sockopt::OriginalDst};
use socket2::{Domain, Socket, Type};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::mpsc,
};

use crate::{netns::Netns, rules::AGENT_MARK};

/// A redirected connection, for its session.
#[derive(Debug)]
pub(crate) struct Stolen {
    pub(crate) stream: TcpStream,
    pub(crate) original: SocketAddrV4,
    pub(crate) peer: SocketAddr,
}

/// Which session holds which stolen port.
#[derive(Debug, Clone)]
pub(crate) struct PortClaim {
    pub(crate) session: String,
    pub(crate) tx: mpsc::Sender<Stolen>,
}

pub(crate) type PortTable = Arc<Mutex<HashMap<u16, PortClaim>>>;

/// Binds the steal listener on all addresses of the namespace, on a free port.
pub(crate) async fn bind(netns: &Netns) -> std::io::Result<TcpListener> {
    let std_listener = netns
        .run_in(|| {
            let listener = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .await?;
    TcpListener::from_std(std_listener)
}

/// Accepts redirected connections forever.
pub(crate) async fn accept_loop(listener: TcpListener, ports: PortTable, netns: Netns) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "steal listener: accept failed");
                continue;
            }
        };
        // Stolen traffic is request/response: never let Nagle wait for the client's delayed ACK.
        let _ = stream.set_nodelay(true);
        let original = match original_destination(&stream) {
            Ok(original) => original,
            Err(error) => {
                tracing::warn!(%peer, %error, "a connection reached the steal listener without a redirect");
                continue;
            }
        };
        let claim = ports
            .lock()
            .expect("port table lock")
            .get(&original.port())
            .cloned();
        let stolen = Stolen {
            stream,
            original,
            peer,
        };
        let unclaimed = match claim {
            Some(claim) => match claim.tx.try_send(stolen) {
                Ok(()) => None,
                Err(mpsc::error::TrySendError::Full(s) | mpsc::error::TrySendError::Closed(s)) => {
                    Some(s)
                }
            },
            None => Some(stolen),
        };
        if let Some(stolen) = unclaimed {
            tokio::spawn(passthrough(stolen, netns.clone()));
        }
    }
}

fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddrV4> {
    let raw = getsockopt(stream, OriginalDst).map_err(std::io::Error::from)?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr)),
        u16::from_be(raw.sin_port),
    ))
}

/// Sends a connection no session wants to where it was going.
pub(crate) async fn passthrough(mut stolen: Stolen, netns: Netns) {
    match connect_marked(&netns, SocketAddr::V4(stolen.original)).await {
        Ok(mut upstream) => {
            let _ = tokio::io::copy_bidirectional(&mut stolen.stream, &mut upstream).await;
        }
        Err(error) => {
            tracing::warn!(original = %stolen.original, %error, "pass-through to the original destination failed")
        }
    }
}

/// Connects from inside the namespace with the agent's mark, so the rules let it through.
/// The source address connections to the original app come from, under a mesh whose rules let
/// only its sidecar's inbound source through (Istio: 127.0.0.6). Set once, when the agent starts
/// (one agent serves one target).
static PASSTHROUGH_SOURCE: std::sync::OnceLock<std::net::Ipv4Addr> = std::sync::OnceLock::new();

pub(crate) fn set_passthrough_source(source: std::net::Ipv4Addr) {
    let _ = PASSTHROUGH_SOURCE.set(source);
}

pub(crate) async fn connect_marked(netns: &Netns, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let source = PASSTHROUGH_SOURCE.get().copied();
    let socket = netns
        .run_in(move || {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            socket.set_mark(AGENT_MARK)?;
            if let (Some(source), true) = (source, addr.is_ipv4()) {
                // The port is picked by `connect`, from the whole 4-tuple: `bind` to port 0 would
                // search for one free for every destination, which gets slow once many
                // recently closed connections hold ports. (Without the option: slower, correct.)
                let _ = nix::sys::socket::setsockopt(
                    &socket,
                    nix::sys::socket::sockopt::IpBindAddressNoPort,
                    &true,
                );
                socket.bind(&SocketAddr::new(source.into(), 0).into())?;
            }
            socket.set_nonblocking(true)?;
            Ok(socket)
        })
        .await?;
    let stream = TcpSocket::from_std_stream(socket.into())
        .connect(addr)
        .await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
