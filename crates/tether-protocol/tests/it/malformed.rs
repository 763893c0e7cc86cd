//! Truncated, oversized and garbage input gives errors (or "need more"), never a panic or an
//! unbounded allocation.

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use tether_protocol::{
    Body, DecodeError, EncodeError, Frame, MAX_FRAME_LEN, Preface, PrefaceError, StreamData,
    decode_frame, encode_frame,
};

use crate::encode;

#[test]
fn a_truncated_frame_waits_for_more_bytes() {
    let whole = encode(&Frame {
        seq: 1,
        ack: 0,
        body: Some(Body::Ping(Default::default())),
    });
    for cut in 0..whole.len() {
        let mut partial = BytesMut::from(&whole[..cut]);
        assert!(
            decode_frame(&mut partial).unwrap().is_none(),
            "cut at {cut}"
        );
        assert_eq!(partial.len(), cut, "a partial frame must not be consumed");
    }
}

#[test]
fn an_oversized_length_is_refused_without_allocating() {
    let mut buf = BytesMut::new();
    buf.put_u32(u32::MAX);
    buf.put_slice(b"xx");
    let capacity = buf.capacity();
    match decode_frame(&mut buf) {
        Err(DecodeError::TooLarge { len, max }) => {
            assert_eq!(len, u32::MAX as usize);
            assert_eq!(max, MAX_FRAME_LEN);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(buf.capacity(), capacity);

    let mut just_over = BytesMut::new();
    just_over.put_u32(MAX_FRAME_LEN as u32 + 1);
    assert!(matches!(
        decode_frame(&mut just_over),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn an_oversized_frame_is_refused_by_the_encoder() {
    let frame = Frame {
        seq: 1,
        ack: 0,
        body: Some(Body::StreamData(StreamData {
            stream_id: 1,
            data: vec![0; MAX_FRAME_LEN].into(),
        })),
    };
    let mut buf = BytesMut::new();
    assert!(matches!(
        encode_frame(&frame, &mut buf),
        Err(EncodeError::TooLarge { .. })
    ));
    assert!(buf.is_empty());
}

/// Regression (found by the `frame_roundtrip` fuzz target): a filter nested ~50 levels deep
/// encoded fine but the receiver refused it (protobuf recursion limit), killing the link.
#[test]
fn a_filter_too_deep_for_the_receiver_is_refused_by_the_sender() {
    use tether_protocol::{
        HttpFilter, HttpFilterList, MAX_FILTER_DEPTH, PortSubscribe, Request, http_filter::Rule,
        request::Op,
    };
    let nested = |depth: usize| {
        let mut filter = HttpFilter {
            rule: Some(Rule::Header("x".into())),
        };
        for _ in 1..depth {
            filter = HttpFilter {
                rule: Some(Rule::AllOf(HttpFilterList {
                    filters: vec![filter],
                })),
            };
        }
        Frame {
            seq: 1,
            ack: 0,
            body: Some(Body::Request(Request {
                id: 1,
                op: Some(Op::PortSubscribe(PortSubscribe {
                    http_filter: Some(filter),
                    ..Default::default()
                })),
            })),
        }
    };
    let deepest = nested(MAX_FILTER_DEPTH);
    assert_eq!(crate::decode_one(encode(&deepest)), deepest);
    let mut buf = BytesMut::new();
    let err = encode_frame(&nested(MAX_FILTER_DEPTH + 1), &mut buf).unwrap_err();
    assert!(
        matches!(err, EncodeError::FilterTooDeep { depth: 33, max: 32 }),
        "{err}"
    );
    assert!(buf.is_empty());
    // And what the fuzzer built: 60 levels.
    assert!(encode_frame(&nested(60), &mut buf).is_err());
}

#[test]
fn garbage_payloads_are_errors() {
    for payload in [&[0xff_u8; 8][..], &[0x0a, 0x05, 0x01], &[0x82, 0x01]] {
        let mut buf = BytesMut::new();
        buf.put_u32(payload.len() as u32);
        buf.put_slice(payload);
        assert!(
            matches!(decode_frame(&mut buf), Err(DecodeError::Malformed { .. })),
            "payload {payload:?} was accepted"
        );
    }
}

#[test]
fn a_foreign_peer_is_named() {
    let err = Preface::decode(b"HTTP/1.1 400 Bad Request").unwrap_err();
    assert!(matches!(err, PrefaceError::BadMagic { .. }));
    assert!(err.to_string().contains("speaks HTTP"), "{err}");
    // A wrong first byte is an error at once, without waiting for all eight.
    assert!(Preface::decode(b"X").is_err());
    assert_eq!(Preface::decode(b"TTH").unwrap(), None);
    let newer = Preface { major: 2, minor: 0 };
    let err = Preface::CURRENT.check_compatible(newer).unwrap_err();
    assert!(
        err.to_string().contains("1.0") && err.to_string().contains("2.0"),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5000))]

    /// Any byte string: decoding returns frames, "need more" or an error, and never reserves
    /// more than one maximum-sized frame.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decode_frame(&mut buf) {}
        prop_assert!(buf.capacity() <= MAX_FRAME_LEN + 4 + bytes.len());
    }

    #[test]
    fn random_prefaces_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
        let _ = Preface::decode(&bytes);
    }
}
