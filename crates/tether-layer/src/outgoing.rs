//! Outgoing traffic: `connect` (TCP and UDP), and `sendto`/`sendmsg`/`recvfrom`/`recvmsg` on
//! unconnected UDP sockets.
//!
//! A destination that goes through the target is opened by the agent first (so a refused or
//! unreachable destination fails `connect` with the errno the target saw); the process's own
//! socket is then bound to loopback and connected to the proxy, which carries its bytes to the
//! agent's socket. The process keeps a real socket (poll, non-blocking connect, `SO_ERROR` all
//! work); `getpeername` reports the destination. UDP datagrams go to a per-destination relay
//! socket of the proxy, and what comes back from a relay is reported as coming from the
//! destination.

// The hooks are exported by symbol name (`no_mangle`), not by Rust path.
#![allow(unreachable_pub)]

use std::{
    ffi::{c_int, c_void},
    net::{IpAddr, SocketAddr},
};

use libc::{sockaddr, socklen_t};

use crate::{
    Answer, Request, TRACKING, addr, channel::Transport, enter, local_addr, policy, real,
    set_errno, state, track,
};

fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

fn sock_int(fd: c_int, option: c_int) -> Option<c_int> {
    let mut value: c_int = 0;
    let mut len = size_of::<c_int>() as socklen_t;
    // SAFETY: `value` is a c_int-sized out-buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// The socket's transport and address family, for IP sockets.
fn kind(fd: c_int) -> Option<(Transport, c_int)> {
    let domain = sock_int(fd, libc::SO_DOMAIN)?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return None;
    }
    match sock_int(fd, libc::SO_TYPE)? {
        libc::SOCK_STREAM => Some((Transport::Tcp, domain)),
        libc::SOCK_DGRAM => Some((Transport::Udp, domain)),
        _ => None,
    }
}

/// An IPv4-mapped IPv6 address as plain IPv4.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Whether `remote` goes through the target, with the name it was resolved from.
fn goes_remote(transport: Transport, remote: SocketAddr) -> Option<Option<String>> {
    let policy = policy()?;
    let known = crate::resolve::name_of(remote.ip());
    let (name, remote_name) = match &known {
        Some((name, remote)) => (Some(name.as_str()), *remote),
        None => (None, false),
    };
    policy
        .outgoing(transport, remote, name, remote_name)
        .then(|| known.map(|(name, _)| name))
}

/// Opens `remote` through the proxy for the socket `fd`; returns the proxy address the socket
/// must send to instead, and the stream behind it.
fn open_remote(
    fd: c_int,
    transport: Transport,
    family: c_int,
    remote: SocketAddr,
    hostname: Option<String>,
) -> Result<(SocketAddr, u64), c_int> {
    let loopback = crate::channel::loopback_for(family, remote);
    let mut local = local_addr(fd).filter(|a| a.port() != 0);
    if local.is_none() {
        let (storage, len) = addr::encode(SocketAddr::new(loopback, 0), family);
        // SAFETY: `storage` holds a valid address of `len` bytes.
        if unsafe { real::bind(fd, (&raw const storage).cast(), len) } != 0 {
            return Err(errno());
        }
        local = local_addr(fd);
    }
    let local = local.ok_or(libc::EINVAL)?;
    let request = Request::Connect {
        transport,
        remote: unmapped(remote),
        from: crate::channel::connect_source(local, loopback),
        hostname,
    };
    match crate::ask(&request)? {
        Answer::Connected { via, stream, .. } => Ok((via, stream)),
        Answer::Errno { errno, .. } => Err(errno),
        _ => Err(libc::ECONNREFUSED),
    }
}

/// # Safety
/// As libc's `connect`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn connect(fd: c_int, address: *const sockaddr, len: socklen_t) -> c_int {
    if let Some(entered) = enter()
        // SAFETY: `address` points to `len` bytes, per connect's contract.
        && let Some(remote) = unsafe { addr::read(address, len) }
        // Loopback (kept local by default) is decided before asking the socket anything.
        && policy().is_some_and(|p| p.may_go_remote(remote))
        && let Some((transport, family)) = kind(fd)
        && let Some(hostname) = goes_remote(transport, remote)
    {
        // A repeated connect (polling a non-blocking one, or re-connecting the same socket to
        // the same destination) goes to where the first one went; a new socket that got the
        // number of one closed behind the hooks' back is not a repeat.
        crate::revalidate(&entered, fd);
        let previous = state::with(|t| {
            (t.peers.get(&fd) == Some(&remote))
                .then(|| t.vias.get(&fd).copied())
                .flatten()
        });
        let (via, stream) = match previous {
            Some(via) => (via, None),
            None => match open_remote(fd, transport, family, remote, hostname) {
                Ok((via, stream)) => (via, Some(stream)),
                Err(errno) => {
                    set_errno(errno);
                    return -1;
                }
            },
        };
        let (storage, via_len) = addr::encode(via, family);
        // SAFETY: `storage` holds a valid address of `via_len` bytes.
        let rc = unsafe { real::connect(fd, (&raw const storage).cast(), via_len) };
        let saved = errno();
        if let (Some(stream), true) = (stream, rc == 0 || saved == libc::EINPROGRESS) {
            track(fd, |t| {
                t.peers.insert(fd, remote);
                match transport {
                    Transport::Tcp => {
                        t.vias.insert(fd, via);
                    }
                    Transport::Udp => t.relays.entry(fd).or_default().push(state::Relay {
                        via,
                        remote,
                        stream,
                    }),
                }
            });
        }
        set_errno(saved);
        return rc;
    }
    // SAFETY: arguments passed through.
    unsafe { real::connect(fd, address, len) }
}

/// The relay to send to for `remote` on the UDP socket `fd`, opened on first use; `None` when
/// `remote` stays local.
fn udp_relay(
    entered: &crate::Entered,
    fd: c_int,
    remote: SocketAddr,
) -> Option<Result<SocketAddr, c_int>> {
    let (Transport::Udp, family) = kind(fd)? else {
        return None;
    };
    crate::revalidate(entered, fd);
    if TRACKING.load(std::sync::atomic::Ordering::Relaxed)
        && let Some(via) = state::with(|t| {
            t.relays
                .get(&fd)
                .and_then(|r| r.iter().find(|r| r.remote == remote).map(|r| r.via))
        })
    {
        return Some(Ok(via));
    }
    let hostname = goes_remote(Transport::Udp, remote)?;
    Some(
        open_remote(fd, Transport::Udp, family, remote, hostname).map(|(via, stream)| {
            track(fd, |t| {
                t.relays.entry(fd).or_default().push(state::Relay {
                    via,
                    remote,
                    stream,
                })
            });
            via
        }),
    )
}

/// # Safety
/// As libc's `sendto`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: libc::size_t,
    flags: c_int,
    address: *const sockaddr,
    len: socklen_t,
) -> libc::ssize_t {
    if let Some(entered) = enter()
        // SAFETY: `address` is null or points to `len` bytes, per sendto's contract.
        && let Some(remote) = unsafe { addr::read(address, len) }
        && let Some(relay) = udp_relay(&entered, fd, remote)
    {
        let via = match relay {
            Ok(via) => via,
            Err(errno) => {
                set_errno(errno);
                return -1;
            }
        };
        let family = kind(fd).map_or(libc::AF_INET, |(_, f)| f);
        let (storage, via_len) = addr::encode(via, family);
        // SAFETY: the caller's buffer, and our valid address.
        return unsafe { real::sendto(fd, buf, n, flags, (&raw const storage).cast(), via_len) };
    }
    // SAFETY: arguments passed through.
    unsafe { real::sendto(fd, buf, n, flags, address, len) }
}

/// # Safety
/// As libc's `sendmsg`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmsg(
    fd: c_int,
    msg: *const libc::msghdr,
    flags: c_int,
) -> libc::ssize_t {
    if !msg.is_null()
        && let Some(entered) = enter()
        // SAFETY: `msg` is a valid msghdr per sendmsg's contract; its name is null or
        // `msg_namelen` bytes.
        && let Some(remote) = unsafe { addr::read((*msg).msg_name.cast(), (*msg).msg_namelen) }
        && let Some(relay) = udp_relay(&entered, fd, remote)
    {
        let via = match relay {
            Ok(via) => via,
            Err(errno) => {
                set_errno(errno);
                return -1;
            }
        };
        let family = kind(fd).map_or(libc::AF_INET, |(_, f)| f);
        let (mut storage, via_len) = addr::encode(via, family);
        // SAFETY: a copy of the caller's header; only its name is replaced.
        let mut copy = unsafe { *msg };
        copy.msg_name = (&raw mut storage).cast();
        copy.msg_namelen = via_len;
        // SAFETY: `copy` is valid: the caller's buffers and our address.
        return unsafe { real::sendmsg(fd, &copy, flags) };
    }
    // SAFETY: arguments passed through.
    unsafe { real::sendmsg(fd, msg, flags) }
}

/// `sendmmsg` (libuv sends UDP in batches with it): each message's destination as in `sendmsg`.
///
/// # Safety
/// As libc's `sendmmsg`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmmsg(
    fd: c_int,
    msgs: *mut libc::mmsghdr,
    count: libc::c_uint,
    flags: c_int,
) -> c_int {
    if !msgs.is_null()
        && count > 0
        && let Some(entered) = enter()
        && let Some((Transport::Udp, family)) = kind(fd)
    {
        // SAFETY: `count` valid headers, per sendmmsg's contract.
        let original = unsafe { std::slice::from_raw_parts(msgs, count as usize) };
        let mut names = Vec::with_capacity(original.len());
        for message in original {
            let header = &message.msg_hdr;
            // SAFETY: each name is null or `msg_namelen` bytes.
            let remote = unsafe { addr::read(header.msg_name.cast(), header.msg_namelen) };
            let via = match remote.and_then(|remote| udp_relay(&entered, fd, remote)) {
                Some(Ok(via)) => Some(addr::encode(via, family)),
                Some(Err(errno)) => {
                    set_errno(errno);
                    return -1;
                }
                None => None,
            };
            names.push(via);
        }
        if names.iter().any(Option::is_some) {
            let mut copy: Vec<libc::mmsghdr> = original.to_vec();
            for (message, name) in copy.iter_mut().zip(names.iter_mut()) {
                if let Some((storage, len)) = name {
                    message.msg_hdr.msg_name = (&raw mut *storage).cast();
                    message.msg_hdr.msg_namelen = *len;
                }
            }
            // SAFETY: `copy` holds the caller's buffers and our addresses, alive for the call.
            let sent = unsafe { real::sendmmsg(fd, copy.as_mut_ptr(), count, flags) };
            if sent > 0 {
                // SAFETY: as above; the kernel's byte counts go back to the caller's headers.
                let original = unsafe { std::slice::from_raw_parts_mut(msgs, count as usize) };
                for (theirs, ours) in original.iter_mut().zip(&copy).take(sent as usize) {
                    theirs.msg_len = ours.msg_len;
                }
            }
            return sent;
        }
    }
    // SAFETY: arguments passed through.
    unsafe { real::sendmmsg(fd, msgs, count, flags) }
}

/// If `source` is one of `fd`'s relays, the destination it stands for.
fn relayed_source(fd: c_int, source: SocketAddr) -> Option<SocketAddr> {
    if !TRACKING.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let entered = enter()?;
    crate::revalidate(&entered, fd);
    let source = unmapped(source);
    state::with(|t| {
        t.relays
            .get(&fd)?
            .iter()
            .find(|r| unmapped(r.via) == source)
            .map(|r| r.remote)
    })
}

/// # Safety
/// As libc's `recvfrom`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: libc::size_t,
    flags: c_int,
    address: *mut sockaddr,
    len: *mut socklen_t,
) -> libc::ssize_t {
    let room = if len.is_null() {
        0
    } else {
        // SAFETY: a non-null `len` is valid, per recvfrom's contract.
        unsafe { *len }
    };
    // SAFETY: arguments passed through.
    let rc = unsafe { real::recvfrom(fd, buf, n, flags, address, len) };
    if rc >= 0 && !address.is_null() && !len.is_null() {
        let saved = errno();
        // SAFETY: the kernel wrote `*len` bytes of address (at most the caller's room).
        // (The kernel reports the full size, which may exceed the room it had.)
        if let Some(source) = unsafe { addr::read(address, (*len).min(room)) }
            && let Some(remote) = relayed_source(fd, source)
        {
            let family = kind(fd).map_or(libc::AF_INET, |(_, f)| f);
            // SAFETY: the caller's address buffer; `*len` is reset to its room first.
            unsafe {
                *len = room;
                addr::write(remote, family, address, len);
            }
        }
        set_errno(saved);
    }
    rc
}

/// # Safety
/// As libc's `recvmsg`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut libc::msghdr, flags: c_int) -> libc::ssize_t {
    let room = if msg.is_null() {
        0
    } else {
        // SAFETY: a non-null `msg` is valid, per recvmsg's contract.
        unsafe { (*msg).msg_namelen }
    };
    // SAFETY: arguments passed through.
    let rc = unsafe { real::recvmsg(fd, msg, flags) };
    if rc >= 0 && !msg.is_null() {
        let saved = errno();
        // SAFETY: `msg` is the caller's valid header; the kernel filled its name.
        unsafe {
            let name = (*msg).msg_name.cast::<sockaddr>();
            if let Some(source) = addr::read(name, (*msg).msg_namelen.min(room))
                && let Some(remote) = relayed_source(fd, source)
            {
                let family = kind(fd).map_or(libc::AF_INET, |(_, f)| f);
                (*msg).msg_namelen = room;
                addr::write(remote, family, name, &raw mut (*msg).msg_namelen);
            }
        }
        set_errno(saved);
    }
    rc
}
