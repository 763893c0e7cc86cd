//! tether's wire protocol between the local proxy (client) and the agent.
//!
//! A link starts with each side sending an 8-byte [`Preface`] (magic `TTHR` + major and minor
//! version). Then the client sends a [`Hello`] frame with the session token; the agent answers
//! [`Welcome`] or an [`ErrorInfo`] frame (and closes). After that both sides exchange [`Frame`]s
//! freely.
//!
//! A frame on the wire is a 4-byte big-endian payload length followed by the payload: one protobuf
//! [`Frame`] message. Lengths above [`MAX_FRAME_LEN`] are refused before anything is allocated.
//!
//! This crate does no IO and starts no runtime: [`codec`] turns bytes into frames and back;
//! with the `codec` feature it also implements `tokio_util::codec` for them.
//!
//! Architecture Invariant: this crate is a leaf; it depends on no other tether crate and on
//! nothing that does IO.

mod codec;
mod handshake;
mod messages;
mod preface;
mod socket_addr;

#[cfg(feature = "codec")]
pub use codec::FrameCodec;
pub use codec::{DecodeError, EncodeError, decode_frame, encode_frame};
pub use handshake::{HandshakeError, TokenDigest, check_hello, hello_error};
pub use messages::*;
pub use preface::{PREFACE_LEN, Preface, PrefaceError};
pub use socket_addr::{AddrError, ip_from_bytes, ip_to_bytes};

/// The protocol's major version. Peers with different majors refuse each other.
pub const VERSION_MAJOR: u16 = 1;
/// The protocol's minor version. Minors only add optional fields and message kinds.
pub const VERSION_MINOR: u16 = 0;

/// The largest frame payload accepted, in bytes. Senders split stream data into chunks of at most
/// [`MAX_DATA_CHUNK`] bytes, so frames stay far below this.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// The largest `data` a sender puts in one [`StreamData`], [`Datagram`] or file read.
pub const MAX_DATA_CHUNK: usize = 64 * 1024;

/// The deepest `all_of`/`any_of` nesting of an [`HttpFilter`] the encoder accepts. Deeper
/// filters would hit protobuf's decoding recursion limit (100 nested messages) at the receiver.
pub const MAX_FILTER_DEPTH: usize = 32;

/// Bytes a sender may have in flight on a new stream before the first [`WindowUpdate`].
pub const INITIAL_STREAM_WINDOW: u32 = 256 * 1024;
