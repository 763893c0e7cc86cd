//! What protocol a stolen connection speaks, from its first bytes (read with `peek`, so nothing is
//! consumed). Pure.

/// The HTTP/2 prior-knowledge connection preface.
pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sniff {
    Http1,
    Http2,
    Other,
    /// Too few bytes to tell yet.
    NeedMore,
}

/// At most this many bytes are needed to decide.
pub(crate) const DECIDING_BYTES: usize = H2_PREFACE.len();

pub(crate) fn sniff(bytes: &[u8]) -> Sniff {
    let prefix_of = |pattern: &[u8]| pattern.starts_with(&bytes[..bytes.len().min(pattern.len())]);
    if bytes.len() >= H2_PREFACE.len() && bytes.starts_with(H2_PREFACE) {
        return Sniff::Http2;
    }
    if METHODS.iter().any(|m| bytes.starts_with(m)) && !bytes.starts_with(b"PRI ") {
        return Sniff::Http1;
    }
    if prefix_of(H2_PREFACE) || METHODS.iter().any(|m| prefix_of(m)) {
        return if bytes.len() >= DECIDING_BYTES {
            Sniff::Other
        } else {
            Sniff::NeedMore
        };
    }
    Sniff::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_prefaces_and_other_bytes_are_told_apart() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniff::Http1);
        assert_eq!(sniff(b"DELETE /x"), Sniff::Http1);
        assert_eq!(sniff(H2_PREFACE), Sniff::Http2);
        assert_eq!(
            sniff(b"\x16\x03\x01\x02\x00"),
            Sniff::Other,
            "a TLS ClientHello"
        );
        assert_eq!(sniff(b"SSH-2.0-OpenSSH"), Sniff::Other);
        assert_eq!(sniff(b"GE"), Sniff::NeedMore);
        assert_eq!(sniff(b"PRI * HTTP/2"), Sniff::NeedMore);
        assert_eq!(sniff(b""), Sniff::NeedMore);
        assert_eq!(sniff(b"GETX"), Sniff::Other);
    }
}
