//! The 8 bytes each side sends first: magic and protocol version.

use crate::{VERSION_MAJOR, VERSION_MINOR};

/// Length of the preface on the wire.
pub const PREFACE_LEN: usize = 8;

const MAGIC: [u8; 4] = *b"TTHR";

/// Magic `TTHR`, then major and minor version as big-endian `u16`s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preface {
    pub major: u16,
    pub minor: u16,
}

impl Preface {
    /// The preface of this build of the protocol.
    pub const CURRENT: Preface = Preface {
        major: VERSION_MAJOR,
        minor: VERSION_MINOR,
    };

    pub fn encode(self) -> [u8; PREFACE_LEN] {
        let [a, b] = self.major.to_be_bytes();
        let [c, d] = self.minor.to_be_bytes();
        [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], a, b, c, d]
    }

    /// Reads a preface from the first [`PREFACE_LEN`] bytes of `bytes`.
    /// `Ok(None)` means more bytes are needed.
    pub fn decode(bytes: &[u8]) -> Result<Option<Preface>, PrefaceError> {
        let checked = bytes.len().min(MAGIC.len());
        if bytes[..checked] != MAGIC[..checked] {
            return Err(PrefaceError::BadMagic {
                found: bytes[..checked].to_vec(),
            });
        }
        let Some(head) = bytes.get(..PREFACE_LEN) else {
            return Ok(None);
        };
        Ok(Some(Preface {
            major: u16::from_be_bytes([head[4], head[5]]),
            minor: u16::from_be_bytes([head[6], head[7]]),
        }))
    }

    /// Checks that a peer's preface speaks a compatible version.
    pub fn check_compatible(self, peer: Preface) -> Result<(), PrefaceError> {
        if self.major == peer.major {
            Ok(())
        } else {
            Err(PrefaceError::VersionMismatch {
                ours: self,
                theirs: peer,
            })
        }
    }
}

impl std::fmt::Display for Preface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrefaceError {
    #[error(
        "the peer is not a tether peer: it sent {} instead of the tether preface{}",
        show(found),
        hint(found)
    )]
    BadMagic { found: Vec<u8> },
    #[error(
        "protocol version mismatch: this side speaks {ours}, the peer {theirs}; use the same tether version on both sides"
    )]
    VersionMismatch { ours: Preface, theirs: Preface },
}

fn show(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

/// Names the usual suspects when something else answers on the agent's port.
fn hint(bytes: &[u8]) -> &'static str {
    match bytes {
        [b'H', b'T', b'T', b'P', ..] | [b'G', b'E', b'T', b' ', ..] => {
            " (it speaks HTTP: is the address of a web server given instead of the agent's?)"
        }
        [0x16, 0x03, ..] => " (it speaks TLS)",
        [b'S', b'S', b'H', b'-', ..] => " (it speaks SSH)",
        _ => "",
    }
}
