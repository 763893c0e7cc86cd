//! Conversions between the wire [`SocketAddr`] and `std::net`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::Bytes;

use crate::SocketAddr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    #[error("an IP address must be 4 or 16 bytes, got {0}")]
    IpLength(usize),
    #[error("port {0} is out of range")]
    Port(u32),
}

impl From<std::net::SocketAddr> for SocketAddr {
    fn from(addr: std::net::SocketAddr) -> Self {
        SocketAddr {
            ip: ip_to_bytes(addr.ip()),
            port: u32::from(addr.port()),
        }
    }
}

impl TryFrom<&SocketAddr> for std::net::SocketAddr {
    type Error = AddrError;

    fn try_from(addr: &SocketAddr) -> Result<Self, AddrError> {
        let port = u16::try_from(addr.port).map_err(|_| AddrError::Port(addr.port))?;
        Ok(std::net::SocketAddr::new(ip_from_bytes(&addr.ip)?, port))
    }
}

/// An IP address as 4 or 16 network-order bytes.
pub fn ip_to_bytes(ip: IpAddr) -> Bytes {
    match ip {
        IpAddr::V4(v4) => Bytes::copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => Bytes::copy_from_slice(&v6.octets()),
    }
}

/// Reads an IP address from 4 or 16 network-order bytes.
pub fn ip_from_bytes(bytes: &[u8]) -> Result<IpAddr, AddrError> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        Ok(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        Ok(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        Err(AddrError::IpLength(bytes.len()))
    }
}
