//! Datagrams on unconnected sockets: `sendto`/`sendmsg`/`sendmmsg` to a destination in the
//! target go to a relay of the proxy (one per socket and destination, as the layer's), and what
//! comes back from a relay is reported by `recvfrom`/`recvmsg` as coming from the destination.
//! The supervisor sends and receives on the program's own socket; the data is copied from and
//! into the program's buffers.

use std::{io, net::SocketAddr, os::fd::OwnedFd, sync::Arc};

use tether_intercept::channel::Transport;
use tether_sys::seccomp::Reply;

use crate::{
    Call, Outcome, Shared, errno_of, inode,
    memory::{Memory, decode_sockaddr, encode_sockaddr, unmapped},
    net::kind,
};

/// The largest datagram handled (an IPv4 UDP payload's limit).
const DATAGRAM_MAX: usize = 65_536;
/// At most this many iovecs per message (`UIO_MAXIOV`).
const IOV_MAX: usize = 1024;
/// `struct msghdr` and `struct mmsghdr` on x86_64.
const MSGHDR: usize = 56;
const MMSGHDR: usize = 64;

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// One datagram received for the program.
#[derive(Debug)]
struct Received {
    data: Vec<u8>,
    /// The call's result: the bytes received, or with `MSG_TRUNC` the datagram's length.
    result: usize,
    source: Option<SocketAddr>,
    flags: i32,
}

/// A `struct msghdr` read from the program.
#[derive(Debug, Clone, Copy)]
struct MsgHdr {
    /// Where it lives in the program (fields are written back there).
    at: u64,
    name: u64,
    namelen: u32,
    iov: u64,
    iovlen: usize,
    controllen: u64,
}

impl MsgHdr {
    fn read(memory: &Memory, at: u64) -> io::Result<MsgHdr> {
        let bytes = memory.read(at, MSGHDR)?;
        let iovlen = u64_at(&bytes, 24) as usize;
        if iovlen > IOV_MAX {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        Ok(MsgHdr {
            at,
            name: u64_at(&bytes, 0),
            namelen: u32_at(&bytes, 8),
            iov: u64_at(&bytes, 16),
            iovlen,
            controllen: u64_at(&bytes, 40),
        })
    }

    /// The destination or source address buffer's content, decoded.
    fn address(&self, memory: &Memory) -> io::Result<Option<SocketAddr>> {
        if self.name == 0 || self.namelen as usize > 128 {
            return Ok(None);
        }
        Ok(decode_sockaddr(
            &memory.read(self.name, self.namelen as usize)?,
        ))
    }

    /// The (base, len) of each iovec.
    fn iovecs(&self, memory: &Memory) -> io::Result<Vec<(u64, usize)>> {
        if self.iovlen == 0 {
            return Ok(Vec::new());
        }
        let bytes = memory.read(self.iov, self.iovlen * 16)?;
        Ok(bytes
            .chunks_exact(16)
            .map(|iov| (u64_at(iov, 0), u64_at(iov, 8) as usize))
            .collect())
    }

    /// The bytes the iovecs hold, for sending.
    fn gather(&self, memory: &Memory) -> io::Result<Vec<u8>> {
        let mut data = Vec::new();
        for (base, len) in self.iovecs(memory)? {
            if data.len() + len > DATAGRAM_MAX {
                return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
            }
            if len > 0 {
                data.extend_from_slice(&memory.read(base, len)?);
            }
        }
        Ok(data)
    }
}

impl Shared {
    /// The relay for `remote` on the socket (opened on first use).
    fn relay(&self, socket: &OwnedFd, family: i32, remote: SocketAddr) -> Result<SocketAddr, i32> {
        let id = inode(socket).map_err(|e| errno_of(&e))?;
        if let Some(via) = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .relays
            .get(&id)
            .and_then(|relays| relays.iter().find(|(r, _)| *r == remote))
            .map(|(_, via)| *via)
        {
            return Ok(via);
        }
        let via = self.open_stream(socket, Transport::Udp, family, remote)?;
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .relays
            .entry(id)
            .or_default()
            .push((remote, via));
        Ok(via)
    }

    /// Whether a datagram to `remote` on `socket` goes through the target; the socket's family.
    fn datagram_goes_remote(&self, socket: &OwnedFd, remote: SocketAddr) -> Option<i32> {
        match kind(socket) {
            Some((Transport::Udp, family))
                if self.policy.may_go_remote(remote)
                    && self.policy.outgoing_by_address(Transport::Udp, remote) =>
            {
                Some(family)
            }
            _ => None,
        }
    }

    fn send_via(
        &self,
        socket: &OwnedFd,
        family: i32,
        remote: SocketAddr,
        data: &[u8],
        flags: i32,
    ) -> Reply {
        let via = match self.relay(socket, family, remote) {
            Ok(via) => via,
            Err(errno) => return Reply::Errno(errno),
        };
        let via = match (family, via) {
            (libc::AF_INET6, SocketAddr::V4(v4)) => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            _ => via,
        };
        match socket2::SockRef::from(socket).send_to_with_flags(data, &via.into(), flags) {
            Ok(n) => Reply::Value(n as i64),
            Err(error) => Reply::Errno(errno_of(&error)),
        }
    }

    /// A message with control data (GSO segments, TOS, …) cannot be relayed as it is: it fails
    /// with `EIO` (QUIC stacks then retry without them), said once.
    fn refuse_control(&self) -> Outcome {
        self.warn_once(
            "cmsg",
            "a datagram to the target carried control messages (e.g. UDP GSO), which the syscall \
             supervisor cannot relay: it failed with EIO",
        );
        Outcome::Now(Reply::Errno(libc::EIO))
    }

    /// The program's socket (argument 0) and its family, when a datagram to `remote` on it goes
    /// through the target (loopback is decided from the address alone, first).
    fn remote_datagram(
        &self,
        call: &Call,
        remote: SocketAddr,
    ) -> io::Result<Option<(OwnedFd, i32)>> {
        if !self.policy.may_go_remote(remote) {
            return Ok(None);
        }
        let socket = call.fd(0)?;
        Ok(self
            .datagram_goes_remote(&socket, remote)
            .map(|family| (socket, family)))
    }

    /// `sendto(fd, buf, len, flags, dest, addrlen)`, trapped only with a destination.
    pub(crate) fn sendto(&self, call: &Call) -> io::Result<Outcome> {
        let len = call.arg(5) as u32 as usize;
        if len > 128 {
            return Ok(Outcome::Now(Reply::Continue));
        }
        let memory = call.memory();
        let Some(remote) = decode_sockaddr(&memory.read(call.arg(4), len)?).map(unmapped) else {
            return Ok(Outcome::Now(Reply::Continue));
        };
        let Some((socket, family)) = self.remote_datagram(call, remote)? else {
            return Ok(Outcome::Now(Reply::Continue));
        };
        let size = call.arg(2) as usize;
        if size > DATAGRAM_MAX {
            return Ok(Outcome::Now(Reply::Errno(libc::EMSGSIZE)));
        }
        let data = memory.read(call.arg(1), size)?;
        let flags = call.arg(3) as i32;
        Ok(Outcome::Later(Box::new(move |shared: &Arc<Shared>| {
            shared
                .send_via(&socket, family, remote, &data, flags)
                .into()
        })))
    }

    /// `sendmsg(fd, msg, flags)`: a message with a destination in the target.
    pub(crate) fn sendmsg(&self, call: &Call) -> io::Result<Outcome> {
        let memory = call.memory();
        let header = MsgHdr::read(&memory, call.arg(1))?;
        let Some(remote) = header.address(&memory)?.map(unmapped) else {
            return Ok(Outcome::Now(Reply::Continue));
        };
        let Some((socket, family)) = self.remote_datagram(call, remote)? else {
            return Ok(Outcome::Now(Reply::Continue));
        };
        if header.controllen != 0 {
            return Ok(self.refuse_control());
        }
        let data = header.gather(&memory)?;
        let flags = call.arg(2) as i32;
        Ok(Outcome::Later(Box::new(move |shared: &Arc<Shared>| {
            shared
                .send_via(&socket, family, remote, &data, flags)
                .into()
        })))
    }

    /// `sendmmsg(fd, msgvec, vlen, flags)`: when any message goes to the target, every message
    /// is sent here (in order), each to where the program meant it.
    pub(crate) fn sendmmsg(&self, call: &Call) -> io::Result<Outcome> {
        let memory = call.memory();
        let count = (call.arg(2) as usize).min(IOV_MAX);
        let mut messages = Vec::with_capacity(count);
        let mut any_remote = false;
        for i in 0..count {
            let header = MsgHdr::read(&memory, call.arg(1) + (i * MMSGHDR) as u64)?;
            let remote = header.address(&memory)?.map(unmapped);
            any_remote |= remote.is_some_and(|r| self.policy.may_go_remote(r));
            messages.push((header, remote));
        }
        if !any_remote {
            return Ok(Outcome::Now(Reply::Continue));
        }
        let socket = call.fd(0)?;
        if !matches!(kind(&socket), Some((Transport::Udp, _))) {
            return Ok(Outcome::Now(Reply::Continue));
        }
        if messages.iter().any(|(header, _)| header.controllen != 0) {
            return Ok(self.refuse_control());
        }
        let flags = call.arg(3) as i32;
        let mut datagrams = Vec::with_capacity(count);
        for (header, remote) in messages {
            datagrams.push((header, remote, header.gather(&memory)?));
        }
        Ok(Outcome::Later(Box::new(move |shared: &Arc<Shared>| {
            let mut sent = 0i64;
            for (header, remote, data) in &datagrams {
                let reply = match remote {
                    Some(remote) => match shared.datagram_goes_remote(&socket, *remote) {
                        Some(family) => shared.send_via(&socket, family, *remote, data, flags),
                        None => {
                            match socket2::SockRef::from(&socket).send_to_with_flags(
                                data,
                                &(*remote).into(),
                                flags,
                            ) {
                                Ok(n) => Reply::Value(n as i64),
                                Err(error) => Reply::Errno(errno_of(&error)),
                            }
                        }
                    },
                    None => match socket2::SockRef::from(&socket).send_with_flags(data, flags) {
                        Ok(n) => Reply::Value(n as i64),
                        Err(error) => Reply::Errno(errno_of(&error)),
                    },
                };
                match reply {
                    Reply::Value(n) => {
                        // mmsghdr.msg_len, right after the msghdr.
                        if memory
                            .write(header.at + MSGHDR as u64, &(n as u32).to_ne_bytes())
                            .is_err()
                        {
                            break;
                        }
                        sent += 1;
                    }
                    // As the kernel: an error after some messages went is not reported.
                    other if sent == 0 => return other.into(),
                    _ => break,
                }
            }
            Reply::Value(sent).into()
        })))
    }

    /// The socket's relays, when it has any: a datagram from one is shown as the destination's.
    fn relays_of(&self, socket: &OwnedFd) -> Option<Vec<(SocketAddr, SocketAddr)>> {
        let state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.relays.is_empty() {
            return None;
        }
        let id = inode(socket).ok()?;
        state.relays.get(&id).cloned()
    }

    /// Receives one datagram on the program's socket (a copy of it: waiting as the program's
    /// would, unless the call stops being waited for); its data (at most `size` bytes), the
    /// call's result (the full length with `MSG_TRUNC`), where it came from as the program must
    /// see it, and the message flags.
    fn receive(
        socket: &OwnedFd,
        relays: &[(SocketAddr, SocketAddr)],
        size: usize,
        flags: i32,
        memory: &Memory,
    ) -> Result<Received, i32> {
        use std::os::fd::AsRawFd as _;
        let mut buffer = vec![0; size.min(DATAGRAM_MAX)];
        let received = loop {
            let attempt = nix::sys::socket::recvmsg::<nix::sys::socket::SockaddrStorage>(
                socket.as_raw_fd(),
                &mut [io::IoSliceMut::new(&mut buffer)],
                None,
                nix::sys::socket::MsgFlags::from_bits_retain(flags | libc::MSG_DONTWAIT),
            )
            .map(|r| (r.bytes, r.address, r.flags.bits()));
            match attempt {
                Err(nix::errno::Errno::EAGAIN) if flags & libc::MSG_DONTWAIT == 0 => {
                    crate::net::wait_readable(socket, memory)?;
                }
                Err(errno) => return Err(errno as i32),
                Ok(received) => break received,
            }
        };
        let (result, address, message_flags) = received;
        buffer.truncate(result.min(buffer.len()));
        let source = address.and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::V4((*v4).into()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())))
        });
        let shown = source.map(|source| {
            relays
                .iter()
                .find(|(_, via)| unmapped(*via) == unmapped(source))
                .map_or(source, |(remote, _)| *remote)
        });
        Ok(Received {
            data: buffer,
            result,
            source: shown,
            flags: message_flags,
        })
    }

    /// `recvfrom(fd, buf, len, flags, src, addrlen)`, trapped only with a source buffer.
    pub(crate) fn recvfrom(&self, call: &Call) -> io::Result<Outcome> {
        let socket = call.fd(0)?;
        let Some(relays) = self.relays_of(&socket) else {
            return Ok(Outcome::Now(Reply::Continue));
        };
        let family = kind(&socket).map_or(libc::AF_INET, |(_, f)| f);
        let (buffer, size, flags) = (call.arg(1), call.arg(2) as usize, call.arg(3) as i32);
        if flags & libc::MSG_ERRQUEUE != 0 {
            return Ok(Outcome::Now(Reply::Continue));
        }
        let (source_at, len_at) = (call.arg(4), call.arg(5));
        let memory = call.memory();
        Ok(Outcome::Later(Box::new(move |_: &Arc<Shared>| {
            let received = match Shared::receive(&socket, &relays, size, flags, &memory) {
                Ok(received) => received,
                Err(errno) => return Reply::Errno(errno).into(),
            };
            let written =
                memory
                    .write(buffer, &received.data)
                    .and_then(|()| match received.source {
                        Some(source) => memory.write_sockaddr(
                            source_at,
                            len_at,
                            &encode_sockaddr(source, family),
                        ),
                        None => Ok(()),
                    });
            match written {
                Ok(()) => Reply::Value(received.result as i64),
                Err(_) => Reply::Errno(libc::EFAULT),
            }
            .into()
        })))
    }

    /// `recvmsg(fd, msg, flags)` on a socket with relays.
    pub(crate) fn recvmsg(&self, call: &Call) -> io::Result<Outcome> {
        // Most programs never have a relay: nothing to look at then.
        if self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .relays
            .is_empty()
        {
            return Ok(Outcome::Now(Reply::Continue));
        }
        let socket = call.fd(0)?;
        let Some(relays) = self.relays_of(&socket) else {
            return Ok(Outcome::Now(Reply::Continue));
        };
        let family = kind(&socket).map_or(libc::AF_INET, |(_, f)| f);
        let memory = call.memory();
        let header = MsgHdr::read(&memory, call.arg(1))?;
        let iovecs = header.iovecs(&memory)?;
        let flags = call.arg(2) as i32;
        if flags & libc::MSG_ERRQUEUE != 0 {
            return Ok(Outcome::Now(Reply::Continue));
        }
        Ok(Outcome::Later(Box::new(move |_: &Arc<Shared>| {
            let room: usize = iovecs.iter().map(|(_, len)| len).sum();
            let received = match Shared::receive(&socket, &relays, room, flags, &memory) {
                Ok(received) => received,
                Err(errno) => return Reply::Errno(errno).into(),
            };
            let (data, source) = (&received.data, received.source);
            let mut written = Ok(());
            let mut rest = data.as_slice();
            for (base, len) in &iovecs {
                if rest.is_empty() {
                    break;
                }
                let (now, later) = rest.split_at((*len).min(rest.len()));
                written = written.and_then(|()| memory.write(*base, now));
                rest = later;
            }
            if header.name != 0
                && let Some(source) = source
            {
                let bytes = encode_sockaddr(source, family);
                let room = (header.namelen as usize).min(bytes.len());
                written = written
                    .and_then(|()| memory.write(header.name, &bytes[..room]))
                    .and_then(|()| {
                        memory.write(header.at + 8, &(bytes.len() as u32).to_ne_bytes())
                    });
            }
            // No control messages (cut, if there were any: MSG_CTRUNC); the message's flags.
            let message_flags = received.flags
                | if header.controllen != 0 {
                    libc::MSG_CTRUNC
                } else {
                    0
                };
            written = written
                .and_then(|()| memory.write(header.at + 40, &0u64.to_ne_bytes()))
                .and_then(|()| memory.write(header.at + 48, &message_flags.to_ne_bytes()));
            match written {
                Ok(()) => Reply::Value(received.result as i64),
                Err(_) => Reply::Errno(libc::EFAULT),
            }
            .into()
        })))
    }
}
