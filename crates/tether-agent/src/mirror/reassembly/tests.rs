use super::*;

fn key() -> FlowKey {
    FlowKey {
        client: "10.0.0.1:40000".parse().unwrap(),
        server: "10.0.0.2:80".parse().unwrap(),
    }
}

fn seg(seq: u32, data: &str) -> Segment {
    Segment {
        key: key(),
        seq,
        syn: false,
        fin: false,
        rst: false,
        payload: Bytes::copy_from_slice(data.as_bytes()),
    }
}

fn run(segments: Vec<Segment>) -> (String, Vec<Event>) {
    let mut r = Reassembler::new(1 << 20, 16);
    let mut events = Vec::new();
    for s in segments {
        r.on_segment(s, &mut events);
    }
    let text = events
        .iter()
        .filter_map(|e| match e {
            Event::Data(_, d) => Some(String::from_utf8_lossy(d).into_owned()),
            _ => None,
        })
        .collect();
    (text, events)
}

fn syn(seq: u32) -> Segment {
    Segment {
        syn: true,
        ..seg(seq, "")
    }
}

fn fin(seq: u32, data: &str) -> Segment {
    Segment {
        fin: true,
        ..seg(seq, data)
    }
}

#[test]
fn in_order_segments_become_one_stream_with_open_and_close() {
    let (text, events) = run(vec![
        syn(100),
        seg(101, "GET / "),
        seg(107, "HTTP/1.1"),
        fin(115, ""),
    ]);
    assert_eq!(text, "GET / HTTP/1.1");
    assert_eq!(events.first(), Some(&Event::Open(key())));
    assert_eq!(events.last(), Some(&Event::Close(key())));
}

#[test]
fn out_of_order_segments_wait_for_the_gap() {
    let (text, _) = run(vec![syn(0), seg(5, "world"), seg(1, "hell"), seg(10, "!")]);
    assert_eq!(text, "hellworld!");
}

#[test]
fn retransmissions_and_overlaps_deliver_each_byte_once() {
    let (text, _) = run(vec![
        syn(0),
        seg(1, "abc"),
        seg(1, "abc"),
        seg(2, "bcdef"),
        seg(4, "def"),
        seg(7, "g"),
    ]);
    assert_eq!(text, "abcdefg");
}

#[test]
fn a_connection_open_before_capture_starts_at_its_next_data() {
    let (text, events) = run(vec![
        seg(5000, ""),
        seg(5000, "second request"),
        fin(5014, ""),
    ]);
    assert_eq!(text, "second request");
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Open(_)))
            .count(),
        1
    );
}

#[test]
fn fin_waits_for_missing_bytes_and_rst_closes_at_once() {
    let (text, events) = run(vec![syn(0), fin(4, "d"), seg(1, "abc")]);
    assert_eq!(text, "abcd");
    assert_eq!(events.last(), Some(&Event::Close(key())));
    let (_, events) = run(vec![
        syn(0),
        seg(1, "a"),
        Segment {
            rst: true,
            ..seg(2, "")
        },
    ]);
    assert_eq!(events.last(), Some(&Event::Close(key())));
}

#[test]
fn sequence_numbers_wrap() {
    let (text, _) = run(vec![
        syn(u32::MAX - 2),
        seg(u32::MAX - 1, "ab"),
        seg(0, "cd"),
        seg(2, "e"),
    ]);
    assert_eq!(text, "abcde");
}

#[test]
fn a_gap_that_never_fills_is_skipped_within_the_bound() {
    let mut r = Reassembler::new(8, 16);
    let mut events = Vec::new();
    r.on_segment(syn(0), &mut events);
    r.on_segment(seg(11, "12345"), &mut events);
    assert!(!events.iter().any(|e| matches!(e, Event::Gap(..))));
    r.on_segment(seg(16, "6789"), &mut events);
    assert!(events.contains(&Event::Gap(key(), 10)), "{events:?}");
    let text: String = events
        .iter()
        .filter_map(|e| match e {
            Event::Data(_, d) => Some(String::from_utf8_lossy(d).into_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(text, "123456789");
}

#[test]
fn bare_acks_of_unknown_flows_are_ignored_and_flows_are_bounded() {
    let mut r = Reassembler::new(1024, 1);
    let mut events = Vec::new();
    r.on_segment(seg(1, ""), &mut events);
    assert!(events.is_empty());
    r.on_segment(syn(0), &mut events);
    let other = FlowKey {
        client: "10.0.0.9:1".parse().unwrap(),
        ..key()
    };
    r.on_segment(
        Segment {
            key: other,
            ..syn(0)
        },
        &mut events,
    );
    assert_eq!(r.open_flows(), 1);
}
