//! Integration tests of the wire protocol: one binary, one module per concern.

mod evolution;
mod golden;
mod handshake;
mod malformed;
mod roundtrip;

use bytes::BytesMut;
use tether_protocol::{Frame, decode_frame, encode_frame};

/// Encodes one frame into a fresh buffer.
fn encode(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf).expect("frame within limits");
    buf
}

/// Decodes exactly one frame and asserts nothing is left over.
fn decode_one(mut buf: BytesMut) -> Frame {
    let frame = decode_frame(&mut buf)
        .expect("valid frame")
        .expect("a whole frame");
    assert!(buf.is_empty(), "bytes left after one frame: {buf:?}");
    frame
}
