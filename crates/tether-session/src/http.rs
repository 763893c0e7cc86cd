//! HTTP heads on the wire: both ends turn `http` types into the protocol's messages and back the
//! same way.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use tether_protocol::{Header, HttpVersion};

/// `Connection: upgrade` with an `Upgrade` header (a WebSocket handshake, say).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    let connection_says_upgrade = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
        });
    connection_says_upgrade && headers.contains_key(http::header::UPGRADE)
}

/// The headers as the wire carries them, in order, repeated names kept.
pub fn to_wire(headers: &HeaderMap) -> Vec<Header> {
    headers
        .iter()
        .map(|(name, value)| Header {
            name: name.as_str().to_owned(),
            value: Bytes::copy_from_slice(value.as_bytes()),
        })
        .collect()
}

/// The wire's headers; a name or value `http` refuses is dropped (the peer's parser took it).
pub fn from_wire(headers: &[Header]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(headers.len());
    for header in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(&header.value),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// The wire's version for an `http` version (HTTP/3 and 0.9 travel as HTTP/1.1).
pub fn wire_version(version: http::Version) -> HttpVersion {
    match version {
        http::Version::HTTP_10 => HttpVersion::Http10,
        http::Version::HTTP_2 => HttpVersion::Http2,
        _ => HttpVersion::Http11,
    }
}
