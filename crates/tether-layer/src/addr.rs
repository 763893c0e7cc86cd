//! Converting between C socket addresses and `std::net::SocketAddr`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use libc::{
    AF_INET, AF_INET6, sa_family_t, sockaddr, sockaddr_in, sockaddr_in6, sockaddr_storage,
    socklen_t,
};

/// Reads a C socket address of `len` bytes.
///
/// # Safety
/// `addr` must be null or point to at least `len` readable bytes.
pub(crate) unsafe fn read(addr: *const sockaddr, len: socklen_t) -> Option<SocketAddr> {
    if addr.is_null() || (len as usize) < size_of::<sa_family_t>() {
        return None;
    }
    // SAFETY: non-null and at least the family's size, per the caller's contract.
    let family = i32::from(unsafe { (*addr).sa_family });
    match family {
        AF_INET if len as usize >= size_of::<sockaddr_in>() => {
            // SAFETY: the caller's buffer holds a whole sockaddr_in; read_unaligned copes with any
            // alignment.
            let v4 = unsafe { std::ptr::read_unaligned(addr.cast::<sockaddr_in>()) };
            let ip = Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(v4.sin_port),
            )))
        }
        AF_INET6 if len as usize >= size_of::<sockaddr_in6>() => {
            // SAFETY: as above, for a whole sockaddr_in6.
            let v6 = unsafe { std::ptr::read_unaligned(addr.cast::<sockaddr_in6>()) };
            let ip = Ipv6Addr::from(v6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(v6.sin6_port),
                v6.sin6_flowinfo,
                v6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Encodes `addr` as a C socket address of `family` (an IPv4 address becomes IPv4-mapped for an
/// IPv6 socket).
pub(crate) fn encode(addr: SocketAddr, family: i32) -> (sockaddr_storage, socklen_t) {
    let addr = match (addr, family) {
        (SocketAddr::V4(v4), AF_INET6) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        (other, _) => other,
    };
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid (empty) value.
    let mut storage: sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let c = sockaddr_in {
                sin_family: AF_INET as sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for every sockaddr type.
            unsafe { std::ptr::write((&raw mut storage).cast::<sockaddr_in>(), c) };
            size_of::<sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let c = sockaddr_in6 {
                sin6_family: AF_INET6 as sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&raw mut storage).cast::<sockaddr_in6>(), c) };
            size_of::<sockaddr_in6>()
        }
    };
    (storage, len as socklen_t)
}

/// Writes `addr` into the caller's buffer the way the kernel does: at most `*len` bytes, and
/// `*len` set to the full size.
///
/// # Safety
/// `buf` must be null or point to `*len` writable bytes; `len` must be null or valid.
pub(crate) unsafe fn write(addr: SocketAddr, family: i32, buf: *mut sockaddr, len: *mut socklen_t) {
    if buf.is_null() || len.is_null() {
        return;
    }
    let (storage, full) = encode(addr, family);
    // SAFETY: `len` is valid per the contract.
    let room = unsafe { *len } as usize;
    let n = room.min(full as usize);
    // SAFETY: `buf` has `room` ≥ `n` writable bytes; `storage` has `full` ≥ `n` readable bytes;
    // they cannot overlap (one is on our stack).
    unsafe {
        std::ptr::copy_nonoverlapping((&raw const storage).cast::<u8>(), buf.cast::<u8>(), n)
    };
    // SAFETY: as above.
    unsafe { *len = full };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_c_form() {
        for text in ["10.1.2.3:80", "[fd00::1]:8080"] {
            let addr: SocketAddr = text.parse().unwrap();
            let family = if addr.is_ipv4() { AF_INET } else { AF_INET6 };
            let (storage, len) = encode(addr, family);
            // SAFETY: `storage` holds `len` initialised bytes.
            let back = unsafe { read((&raw const storage).cast(), len) };
            assert_eq!(back, Some(addr));
        }
    }

    #[test]
    fn an_ipv4_peer_of_an_ipv6_socket_is_mapped() {
        let (storage, len) = encode("10.0.0.1:5".parse().unwrap(), AF_INET6);
        // SAFETY: as above.
        let back = unsafe { read((&raw const storage).cast(), len) }.unwrap();
        assert_eq!(back, "[::ffff:10.0.0.1]:5".parse().unwrap());
    }

    #[test]
    fn a_short_buffer_is_filled_partly_and_told_the_full_size() {
        let mut buf = [0u8; 4];
        let mut len: socklen_t = 4;
        // SAFETY: `buf` has `len` writable bytes.
        unsafe {
            write(
                "10.0.0.1:5".parse().unwrap(),
                AF_INET,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        assert_eq!(len as usize, size_of::<sockaddr_in>());
        assert_eq!(u16::from_ne_bytes([buf[0], buf[1]]), AF_INET as u16);
    }
}
