//! Sockets: `connect` to the target, `bind`/`listen` for the target's traffic, `accept` and
//! `getpeername` reporting the addresses the program would see in the pod.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    sync::Arc,
};

use socket2::{Domain, SockRef, Type};
use tether_intercept::channel::{Answer, Request, Transport};
use tether_sys::seccomp::Reply;

use crate::{
    Answered, Call, Outcome, Shared, errno_of, inode,
    memory::{Memory, decode_sockaddr, encode_sockaddr, unmapped},
};

/// The longest `sockaddr` read (`sockaddr_storage`).
const SOCKADDR_MAX: usize = 128;

/// An IP socket's transport and family.
pub(crate) fn kind(socket: &OwnedFd) -> Option<(Transport, i32)> {
    let socket = SockRef::from(socket);
    let domain = socket.domain().ok()?;
    let family = if domain == Domain::IPV4 {
        libc::AF_INET
    } else if domain == Domain::IPV6 {
        libc::AF_INET6
    } else {
        return None;
    };
    match socket.r#type().ok()? {
        Type::STREAM => Some((Transport::Tcp, family)),
        Type::DGRAM => Some((Transport::Udp, family)),
        _ => None,
    }
}

/// Waits until the program's `socket` is readable (a connection to accept, a datagram), in
/// slices, and gives up with `EINTR` once the call is no longer waited for (a signal interrupted
/// it): nothing is taken from the socket for a call that can no longer get it.
pub(crate) fn wait_readable(socket: &OwnedFd, memory: &Memory) -> Result<(), i32> {
    use std::os::fd::AsFd as _;

    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        if !memory.still_waited() {
            return Err(libc::EINTR);
        }
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => return Ok(()),
            Err(errno) => return Err(errno as i32),
        }
    }
}

/// Whether the program's socket blocks (its open file has no `O_NONBLOCK`).
fn blocking(socket: &OwnedFd) -> bool {
    nix::fcntl::fcntl(socket, nix::fcntl::FcntlArg::F_GETFL)
        .is_ok_and(|flags| flags & libc::O_NONBLOCK == 0)
}

fn local_addr(socket: &OwnedFd) -> Option<SocketAddr> {
    SockRef::from(socket).local_addr().ok()?.as_socket()
}

fn peer_addr(socket: &OwnedFd) -> Option<SocketAddr> {
    SockRef::from(socket).peer_addr().ok()?.as_socket()
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

impl Shared {
    /// The `sockaddr` argument `addr_arg` with its length in `len_arg`.
    fn sockaddr_arg(
        call: &Call,
        addr_arg: usize,
        len_arg: usize,
    ) -> io::Result<Option<SocketAddr>> {
        // socklen_t: the kernel reads the register's low 32 bits.
        let len = call.arg(len_arg) as u32 as usize;
        if call.arg(addr_arg) == 0 || len > SOCKADDR_MAX {
            return Ok(None);
        }
        Ok(decode_sockaddr(
            &call.memory().read(call.arg(addr_arg), len)?,
        ))
    }

    pub(crate) fn connect(&self, call: &Call) -> io::Result<Outcome> {
        let Some(remote) = Self::sockaddr_arg(call, 1, 2)? else {
            return Ok(Outcome::Now(Reply::Continue));
        };
        let remote = unmapped(remote);
        // Loopback (kept local by default) is decided before the socket is asked anything.
        if !self.policy.may_go_remote(remote) {
            return Ok(Outcome::Now(Reply::Continue));
        }
        let socket = call.fd(0)?;
        let Some((transport, family)) = kind(&socket) else {
            return Ok(Outcome::Now(Reply::Continue));
        };
        if !self.policy.outgoing_by_address(transport, remote) {
            return Ok(Outcome::Now(Reply::Continue));
        }
        Ok(Outcome::Later(Box::new(move |shared: &Arc<Shared>| {
            shared
                .connect_remote(&socket, transport, family, remote)
                .into()
        })))
    }

    /// Opens `remote` in the target and connects the program's socket to the proxy's end of it.
    fn connect_remote(
        &self,
        socket: &OwnedFd,
        transport: Transport,
        family: i32,
        remote: SocketAddr,
    ) -> Reply {
        let Ok(id) = inode(socket) else {
            return Reply::Errno(libc::EBADF);
        };
        // A repeated connect (the same socket, the same destination) goes where the first went.
        let previous = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .peers
            .get(&id)
            .filter(|(reported, _)| *reported == remote)
            .map(|(_, via)| *via);
        let via = match previous {
            Some(via) => via,
            None => match self.open_stream(socket, transport, family, remote) {
                Ok(via) => via,
                Err(errno) => return Reply::Errno(errno),
            },
        };
        {
            let mut state = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            state.peers.insert(id, (remote, via));
            if transport == Transport::Udp {
                // `recvfrom`/`recvmsg` asking where a datagram came from see the destination.
                let relays = state.relays.entry(id).or_default();
                if !relays.contains(&(remote, via)) {
                    relays.push((remote, via));
                }
            }
        }
        let via_addr = socket2::SockAddr::from(match (family, via) {
            (libc::AF_INET6, SocketAddr::V4(v4)) => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            _ => via,
        });
        match SockRef::from(socket).connect(&via_addr) {
            Ok(()) => Reply::Value(0),
            Err(error) => Reply::Errno(errno_of(&error)),
        }
    }

    /// Asks the proxy for a stream to `remote` from the socket's loopback address (bound here
    /// when the program did not bind it); returns the proxy's address for it.
    pub(crate) fn open_stream(
        &self,
        socket: &OwnedFd,
        transport: Transport,
        family: i32,
        remote: SocketAddr,
    ) -> Result<SocketAddr, i32> {
        let loopback = tether_intercept::channel::loopback_for(family, remote);
        let mut local = local_addr(socket).filter(|a| a.port() != 0);
        if local.is_none() {
            SockRef::from(socket)
                .bind(&SocketAddr::new(loopback, 0).into())
                .map_err(|e| errno_of(&e))?;
            local = local_addr(socket);
        }
        let local = local.ok_or(libc::EINVAL)?;
        let request = Request::Connect {
            transport,
            remote,
            from: tether_intercept::channel::connect_source(local, loopback),
            hostname: None,
        };
        match self.proxy.ask(&request) {
            Ok(Answer::Connected { via, .. }) => Ok(via),
            Ok(Answer::Errno { errno, .. }) => Err(errno),
            Ok(_) => Err(libc::ECONNREFUSED),
            Err(_) => Err(libc::EIO),
        }
    }

    /// The address the program sees as its socket's peer: the destination in the target for a
    /// connection through the proxy, the real client for one the proxy delivered.
    pub(crate) fn getpeername(&self, call: &Call) -> io::Result<Outcome> {
        // Most programs have no such socket: nothing to look at then.
        if self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .peers
            .is_empty()
        {
            return Ok(Outcome::Now(Reply::Continue));
        }
        let socket = call.fd(0)?;
        let id = inode(&socket)?;
        let Some((reported, real)) = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .peers
            .get(&id)
            .copied()
        else {
            return Ok(Outcome::Now(Reply::Continue));
        };
        // The number may belong to a new socket now: trust the record only if the socket's real
        // peer is the one recorded.
        if peer_addr(&socket).map(unmapped) != Some(unmapped(real)) {
            self.state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .peers
                .remove(&id);
            return Ok(Outcome::Now(Reply::Continue));
        }
        let family = kind(&socket).map_or(libc::AF_INET, |(_, f)| f);
        call.memory().write_sockaddr(
            call.arg(1),
            call.arg(2),
            &encode_sockaddr(reported, family),
        )?;
        Ok(Outcome::Now(Reply::Value(0)))
    }

    /// Remembers the port the program asked for (0: the kernel's pick), as the layer does; the
    /// call itself runs as made.
    pub(crate) fn bind(&self, call: &Call) -> io::Result<Outcome> {
        if let Some(requested) = Self::sockaddr_arg(call, 1, 2)? {
            let socket = call.fd(0)?;
            let id = inode(&socket)?;
            self.state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .bound
                .insert(id, requested.port());
        }
        Ok(Outcome::Now(Reply::Continue))
    }

    /// Listens on the program's socket, then subscribes it to the target's port.
    pub(crate) fn listen(&self, call: &Call) -> io::Result<Outcome> {
        let socket = call.fd(0)?;
        if !matches!(kind(&socket), Some((Transport::Tcp, _))) {
            return Ok(Outcome::Now(Reply::Continue));
        }
        let backlog = call.arg(1) as i32;
        let tgid = call.process()?;
        Ok(Outcome::Later(Box::new(move |shared: &Arc<Shared>| {
            shared.listen_remote(&socket, backlog, tgid).into()
        })))
    }

    fn listen_remote(&self, socket: &OwnedFd, backlog: i32, tgid: u32) -> Reply {
        if let Err(error) = SockRef::from(socket).listen(backlog) {
            return Reply::Errno(errno_of(&error));
        }
        let (Some(addr), Ok(id)) = (local_addr(socket), inode(socket)) else {
            return Reply::Value(0);
        };
        let requested = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .bound
            .remove(&id)
            .unwrap_or(addr.port());
        let request = Request::Listen {
            pid: tgid,
            addr,
            requested_port: requested,
        };
        match self.proxy.ask(&request) {
            Ok(Answer::Remote { .. }) => {
                self.state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .listeners
                    .insert(id);
                Reply::Value(0)
            }
            Ok(Answer::Error { message }) => {
                (self.warn)(&format!(
                    "cannot receive the target's traffic on port {}: {message}",
                    addr.port()
                ));
                Reply::Errno(libc::EADDRNOTAVAIL)
            }
            Ok(_) => Reply::Value(0),
            Err(error) => {
                (self.warn)(&format!(
                    "the local proxy did not answer for the listener on port {}: {error}",
                    addr.port()
                ));
                Reply::Value(0)
            }
        }
    }

    /// On a listener subscribed in the target: accepts here, so the program can be told the
    /// remote client's address instead of the proxy's.
    pub(crate) fn accept(&self, call: &Call) -> io::Result<Outcome> {
        if self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .listeners
            .is_empty()
        {
            return Ok(Outcome::Now(Reply::Continue));
        }
        let socket = call.fd(0)?;
        let id = inode(&socket)?;
        if !self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .listeners
            .contains(&id)
        {
            return Ok(Outcome::Now(Reply::Continue));
        }
        let flags = if call.notification.nr == libc::SYS_accept4 {
            call.arg(3) as i32
        } else {
            0
        };
        let (addr_at, len_at) = (call.arg(1), call.arg(2));
        let memory = call.memory();
        Ok(Outcome::Later(Box::new(move |shared: &Arc<Shared>| {
            if blocking(&socket)
                && let Err(errno) = wait_readable(&socket, &memory)
            {
                return Reply::Errno(errno).into();
            }
            let listener = SockRef::from(&socket);
            let family = kind(&socket).map_or(libc::AF_INET, |(_, f)| f);
            let (accepted, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(error) => return Reply::Errno(errno_of(&error)).into(),
            };
            if flags & libc::SOCK_NONBLOCK != 0
                && let Err(error) = accepted.set_nonblocking(true)
            {
                return Reply::Errno(errno_of(&error)).into();
            }
            let accepted = OwnedFd::from(accepted);
            let peer = peer.as_socket();
            let remote = match (peer, local_addr(&accepted)) {
                (Some(peer), Some(local)) if is_loopback(peer.ip()) => {
                    match shared.proxy.ask(&Request::Peer {
                        local: unmapped(local),
                        peer: unmapped(peer),
                    }) {
                        Ok(Answer::Peer { addr: Some(remote) }) => Some(remote),
                        _ => None,
                    }
                }
                _ => None,
            };
            if let (Some(remote), Some(peer), Ok(id)) = (remote, peer, inode(&accepted)) {
                shared
                    .state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .peers
                    .insert(id, (remote, peer));
            }
            if let Some(shown) = remote.or(peer)
                && memory
                    .write_sockaddr(addr_at, len_at, &encode_sockaddr(shown, family))
                    .is_err()
            {
                return Reply::Errno(libc::EFAULT).into();
            }
            Answered::Fd {
                fd: accepted,
                cloexec: flags & libc::SOCK_CLOEXEC != 0,
            }
        })))
    }
}
