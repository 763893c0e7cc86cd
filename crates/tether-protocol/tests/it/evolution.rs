//! Schema evolution: what an older peer does with a newer peer's frames.

use bytes::{BufMut, BytesMut};
use prost::Message;
use tether_protocol::{Body, Frame, Ping, decode_frame};

fn framed(payload: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(payload.len() as u32);
    buf.put_slice(payload);
    buf
}

#[test]
fn an_added_optional_field_is_ignored() {
    let frame = Frame {
        seq: 5,
        ack: 4,
        body: Some(Body::Ping(Ping { nonce: 9 })),
    };
    let mut payload = frame.encode_to_vec();
    // A newer peer added field 99 (varint) to Frame …
    payload.extend_from_slice(&[0x98, 0x06, 0x2a]);
    let decoded = decode_frame(&mut framed(&payload)).unwrap().unwrap();
    assert_eq!(decoded, frame);

    // … and field 7 (length-delimited) inside Ping.
    let mut ping = Ping { nonce: 9 }.encode_to_vec();
    ping.extend_from_slice(&[0x3a, 0x03, b'n', b'e', b'w']);
    let mut payload = Frame {
        seq: 5,
        ack: 4,
        body: None,
    }
    .encode_to_vec();
    payload.push(0x6a); // field 13 (ping), length-delimited
    payload.push(ping.len() as u8);
    payload.extend_from_slice(&ping);
    let decoded = decode_frame(&mut framed(&payload)).unwrap().unwrap();
    assert_eq!(decoded, frame);
}

#[test]
fn an_unknown_message_kind_decodes_as_no_body() {
    // Field 60: a message kind this version does not know.
    let mut payload = Frame {
        seq: 3,
        ack: 0,
        body: None,
    }
    .encode_to_vec();
    payload.extend_from_slice(&[0xe2, 0x03, 0x02, 0x08, 0x01]);
    let decoded = decode_frame(&mut framed(&payload)).unwrap().unwrap();
    // The receiver keeps the sequence number (so the frame is acknowledged) and sees no body; the
    // agent then answers with an `Unsupported` error (see tether-agent's tests).
    assert_eq!(decoded.seq, 3);
    assert_eq!(decoded.body, None);
}

#[test]
fn unknown_enum_values_survive() {
    use tether_protocol::{ErrorCode, ErrorInfo};
    let info = ErrorInfo {
        code: 4242,
        message: String::new(),
        in_reply_to_seq: 0,
        errno: 0,
    };
    let decoded = ErrorInfo::decode(info.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded.code, 4242);
    assert_eq!(decoded.code(), ErrorCode::Unspecified);
}
