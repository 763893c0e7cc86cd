//! Pinned encodings. If one of these fails, the wire format changed: that breaks every deployed
//! agent. Change the expected bytes only together with a protocol major version bump.

use bytes::Bytes;
use tether_protocol::{Body, Frame, Hello, LinkOptions, Preface, Resume, StreamData};

use crate::{decode_one, encode};

#[test]
fn preface_bytes() {
    assert_eq!(Preface::CURRENT.encode(), *b"TTHR\x00\x01\x00\x00");
}

#[test]
fn stream_data_frame_bytes() {
    let frame = Frame {
        seq: 1,
        ack: 2,
        body: Some(Body::StreamData(StreamData {
            stream_id: 7,
            data: Bytes::from_static(b"hi"),
        })),
    };
    let expected: &[u8] = &[
        0, 0, 0, 13, // payload length
        0x08, 0x01, // seq = 1
        0x10, 0x02, // ack = 2
        0x8a, 0x02, 0x06, // field 33 (stream_data), 6 bytes
        0x08, 0x07, // stream_id = 7
        0x12, 0x02, b'h', b'i', // data = "hi"
    ];
    assert_eq!(&encode(&frame)[..], expected);
    assert_eq!(decode_one(expected.into()), frame);
}

#[test]
fn hello_frame_bytes() {
    let frame = Frame {
        seq: 0,
        ack: 0,
        body: Some(Body::Hello(Hello {
            token: "t0k".into(),
            client: "c".into(),
            resume: None,
            capabilities: vec!["resume".into()],
            link: None,
        })),
    };
    let expected: &[u8] = &[
        0, 0, 0, 18, // payload length
        0x52, 0x10, // field 10 (hello), 16 bytes
        0x0a, 0x03, b't', b'0', b'k', // token
        0x12, 0x01, b'c', // client
        0x22, 0x06, b'r', b'e', b's', b'u', b'm', b'e', // capabilities[0]
    ];
    assert_eq!(&encode(&frame)[..], expected);
    assert_eq!(decode_one(expected.into()), frame);
}

#[test]
fn hello_with_link_options_bytes() {
    let frame = Frame {
        seq: 0,
        ack: 0,
        body: Some(Body::Hello(Hello {
            token: "t".into(),
            client: String::new(),
            resume: Some(Resume {
                session_id: "s".into(),
                received: 7,
            }),
            capabilities: Vec::new(),
            link: Some(LinkOptions {
                keepalive_interval_ms: 5000,
                keepalive_timeout_ms: 0,
                grace_ms: 600_000,
                buffer_bytes: 0,
            }),
        })),
    };
    let expected: &[u8] = &[
        0, 0, 0, 21, // payload length
        0x52, 0x13, // field 10 (hello), 19 bytes
        0x0a, 0x01, b't', // token
        0x1a, 0x05, 0x0a, 0x01, b's', 0x10, 0x07, // resume { session_id, received }
        0x2a, 0x07, // link, 7 bytes
        0x08, 0x88, 0x27, // keepalive_interval_ms 5000
        0x18, 0xc0, 0xcf, 0x24, // grace_ms 600000
    ];
    assert_eq!(&encode(&frame)[..], expected);
    assert_eq!(decode_one(expected.into()), frame);
}
