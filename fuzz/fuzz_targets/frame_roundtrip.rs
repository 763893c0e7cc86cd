//! Structure-aware: any frame the types can express encodes and decodes back to itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tether_protocol::{Frame, decode_frame, encode_frame};

fuzz_target!(|frame: Frame| {
    let mut buf = BytesMut::new();
    if encode_frame(&frame, &mut buf).is_err() {
        return; // over the size cap: refused, as it must be
    }
    let decoded = decode_frame(&mut buf).expect("own encoding decodes").expect("whole frame");
    assert_eq!(decoded, frame);
    assert!(buf.is_empty());
});
