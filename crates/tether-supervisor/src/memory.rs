//! The supervised program's memory (`process_vm_readv`/`process_vm_writev`) and the C values
//! read from it: paths and socket addresses.

use std::{
    ffi::OsStr,
    io::{self, IoSlice, IoSliceMut},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::unix::ffi::OsStrExt as _,
    path::PathBuf,
};

use nix::{
    sys::uio::{RemoteIoVec, process_vm_readv, process_vm_writev},
    unistd::Pid,
};

/// Paths longer than this are refused by the kernel anyway (`PATH_MAX`).
const PATH_MAX: usize = 4096;
const PAGE: usize = 4096;

/// The memory of the thread `tid` (threads share their process's memory), for one trapped call:
/// writes are made only while the call still waits for its answer (`valid`), so a thread id
/// reused meanwhile never gets them.
#[derive(Clone)]
pub(crate) struct Memory {
    pub(crate) tid: u32,
    pub(crate) valid: Option<std::sync::Arc<dyn Fn() -> bool + Send + Sync>>,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("tid", &self.tid)
            .finish_non_exhaustive()
    }
}

impl Memory {
    /// Whether the call is still waited for (not interrupted, its thread alive).
    pub(crate) fn still_waited(&self) -> bool {
        self.valid.as_ref().is_none_or(|valid| valid())
    }

    /// `len` bytes at `addr`.
    pub(crate) fn read(&self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buffer = vec![0; len];
        let n = process_vm_readv(
            Pid::from_raw(self.tid as i32),
            &mut [IoSliceMut::new(&mut buffer)],
            &[RemoteIoVec {
                base: addr as usize,
                len,
            }],
        )?;
        if n != len {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        Ok(buffer)
    }

    /// Writes `bytes` at `addr`.
    pub(crate) fn write(&self, addr: u64, bytes: &[u8]) -> io::Result<()> {
        if self.valid.as_ref().is_some_and(|valid| !valid()) {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        let n = process_vm_writev(
            Pid::from_raw(self.tid as i32),
            &[IoSlice::new(bytes)],
            &[RemoteIoVec {
                base: addr as usize,
                len: bytes.len(),
            }],
        )?;
        if n != bytes.len() {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        Ok(())
    }

    /// The NUL-terminated string at `addr`, read a page at a time (the next page may not be
    /// mapped). `ENAMETOOLONG` past `PATH_MAX`.
    pub(crate) fn path(&self, addr: u64) -> io::Result<PathBuf> {
        if addr == 0 {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        let mut text = Vec::new();
        let mut at = addr;
        while text.len() < PATH_MAX {
            let chunk = PAGE - (at as usize % PAGE);
            let bytes = self.read(at, chunk)?;
            if let Some(end) = bytes.iter().position(|b| *b == 0) {
                text.extend_from_slice(&bytes[..end]);
                return Ok(PathBuf::from(OsStr::from_bytes(&text)));
            }
            text.extend_from_slice(&bytes);
            at += chunk as u64;
        }
        Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG))
    }

    /// A `socklen_t` (u32) at `addr`.
    pub(crate) fn socklen(&self, addr: u64) -> io::Result<u32> {
        let bytes = self.read(addr, 4)?;
        Ok(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// Fills a `sockaddr` out-buffer and its `socklen_t` as `accept`/`getpeername` do: at most
    /// the buffer's length is written, the length is set to the address's full size.
    pub(crate) fn write_sockaddr(&self, addr: u64, len_at: u64, bytes: &[u8]) -> io::Result<()> {
        if addr == 0 || len_at == 0 {
            return Ok(());
        }
        let room = self.socklen(len_at)? as usize;
        self.write(addr, &bytes[..room.min(bytes.len())])?;
        self.write(len_at, &(bytes.len() as u32).to_ne_bytes())
    }
}

/// An IPv4 or IPv6 `sockaddr`; `None` for other families or a short buffer.
pub(crate) fn decode_sockaddr(bytes: &[u8]) -> Option<SocketAddr> {
    let family = i32::from(u16::from_ne_bytes([*bytes.first()?, *bytes.get(1)?]));
    let port = u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]);
    match family {
        libc::AF_INET => {
            let ip: [u8; 4] = bytes.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        libc::AF_INET6 => {
            let flow = u32::from_be_bytes(bytes.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = bytes.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(bytes.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flow,
                scope,
            )))
        }
        _ => None,
    }
}

/// `addr` as a `sockaddr` of `family` (an IPv4 address on an IPv6 socket is IPv4-mapped).
pub(crate) fn encode_sockaddr(addr: SocketAddr, family: i32) -> Vec<u8> {
    let (ip, port) = (addr.ip(), addr.port());
    if family == libc::AF_INET
        && let IpAddr::V4(v4) = ip
    {
        let mut bytes = vec![0; 16];
        bytes[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        bytes[2..4].copy_from_slice(&port.to_be_bytes());
        bytes[4..8].copy_from_slice(&v4.octets());
        return bytes;
    }
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut bytes = vec![0; 28];
    bytes[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
    bytes[2..4].copy_from_slice(&port.to_be_bytes());
    bytes[8..24].copy_from_slice(&v6.octets());
    bytes
}

/// An IPv4-mapped IPv6 address as plain IPv4.
pub(crate) fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_round_trip_and_odd_input_is_refused() {
        let v4: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        assert_eq!(
            decode_sockaddr(&encode_sockaddr(v4, libc::AF_INET)),
            Some(v4)
        );
        let mapped = decode_sockaddr(&encode_sockaddr(v4, libc::AF_INET6)).unwrap();
        assert_eq!(unmapped(mapped), v4);
        let v6: SocketAddr = "[fd00::1]:53".parse().unwrap();
        assert_eq!(
            decode_sockaddr(&encode_sockaddr(v6, libc::AF_INET6)),
            Some(v6)
        );
        assert_eq!(decode_sockaddr(&[]), None);
        assert_eq!(
            decode_sockaddr(&encode_sockaddr(v4, libc::AF_INET)[..6]),
            None
        );
        let mut unix = vec![0u8; 16];
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(decode_sockaddr(&unix), None);
    }

    #[test]
    fn a_path_is_read_across_pages_from_a_live_process() {
        // This process reads itself: a string that straddles a page boundary.
        let mut page = vec![b'x'; PAGE * 3];
        let boundary = PAGE - (page.as_ptr() as usize % PAGE) + PAGE;
        let start = boundary - 3;
        page[start..start + 6].copy_from_slice(b"/a/bc\0");
        let memory = Memory {
            tid: std::process::id(),
            valid: None,
        };
        let addr = page.as_ptr() as u64 + start as u64;
        assert_eq!(memory.path(addr).unwrap(), PathBuf::from("/a/bc"));
        assert!(memory.path(0).is_err());
    }
}
