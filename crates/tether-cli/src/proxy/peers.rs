//! Connections the proxy makes to the app on behalf of a remote client, registered so the app's
//! `accept` and `getpeername` report that client.

use super::*;

/// A connection the proxy made to the app, as the app's `accept` sees it: (its peer, its local
/// address).
pub(super) type PeerKey = (SocketAddr, SocketAddr);

/// One registration in `Shared::peers`.
#[derive(Debug, Clone, Copy)]
pub(super) struct PeerMark {
    key: PeerKey,
    number: u64,
}

impl Shared {
    /// Connects to `listener` from a socket whose address is registered as standing for `remote`
    /// before the connection exists, so the process's `accept` always finds it.
    ///
    /// The source port is picked by `connect` (`IP_BIND_ADDRESS_NO_PORT`), not by `bind`: with
    /// a new connection per request, `bind(127.0.0.1:0)` has to search an ephemeral range
    /// crowded with recently closed connections for a port free for *every* destination, which
    /// took the proxy to a full core and the app to a third of its requests per second after some
    /// 25,000 connections. `connect` needs only a 4-tuple no other socket has.
    pub(super) async fn connect_for(
        &self,
        listener: SocketAddr,
        remote: SocketAddr,
    ) -> std::io::Result<(TcpStream, PeerMark)> {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let source: IpAddr = if listener.is_ipv4() {
            Ipv4Addr::LOCALHOST.into()
        } else {
            Ipv6Addr::LOCALHOST.into()
        };
        // A listener on every address is reached on loopback.
        let target = if listener.ip().is_unspecified() {
            SocketAddr::new(source, listener.port())
        } else {
            listener
        };
        let socket = Socket::new(
            Domain::for_address(target),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_nonblocking(true)?;
        // (An IPv6 socket takes this IP-level option too. A kernel without it only makes `bind`
        // pick the port: slower, still correct.)
        let _ = nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        );
        socket.bind(&SocketAddr::new(source, 0).into())?;
        // The port exists once `connect` is called; it is registered before the lock is let go,
        // and the process's `Peer` question takes the same lock, so it cannot come first.
        let mark = {
            let mut peers = self.peers.lock().expect("peers lock");
            match socket.connect(&SockAddr::from(target)) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e),
            }
            let ours = socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| std::io::Error::other("a TCP socket without an IP address"))?;
            let mark = PeerMark {
                key: (ours, target),
                number: self.peer_marks.fetch_add(1, Ordering::Relaxed),
            };
            peers.insert(mark.key, (remote, mark.number));
            mark
        };
        let connected = async {
            let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
            stream.writable().await?;
            if let Some(error) = stream.take_error()? {
                return Err(error);
            }
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        .await;
        match connected {
            Ok(stream) => Ok((stream, mark)),
            Err(error) => {
                self.forget_peer(mark);
                Err(error)
            }
        }
    }

    /// Drops a registration of [`connect_for`](Self::connect_for), unless its 4-tuple already
    /// belongs to a newer connection (the socket may have closed before this runs).
    pub(super) fn forget_peer(&self, mark: PeerMark) {
        let mut peers = self.peers.lock().expect("peers lock");
        if peers.get(&mark.key).is_some_and(|(_, n)| *n == mark.number) {
            peers.remove(&mark.key);
        }
    }
}
