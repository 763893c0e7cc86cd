//! TCP reassembly for mirrored connections: turns captured client → server segments into ordered
//! byte streams. Pure: no sockets, unit-tested with hand-made segments.
//!
//! - A SYN opens a flow at its sequence number + 1. A data segment of a flow never seen opens it
//!   at that segment (the connection was open before mirroring began).
//! - Retransmitted bytes (before the next expected sequence number) are dropped; a segment that
//!   overlaps delivers only its new tail.
//! - Out-of-order segments wait (bounded per flow) until the gap is filled. If the bound is hit,
//!   the gap is skipped: the stream is then incomplete, which is logged, instead of stalling or
//!   growing without limit.
//! - FIN closes the flow once every byte before it arrived; RST closes it at once.
//! - Sequence numbers wrap: comparisons are modulo 2^32.

use std::{collections::HashMap, net::SocketAddrV4};

use bytes::Bytes;

/// One direction of a TCP connection: client → server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FlowKey {
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
}

/// The parts of a captured segment reassembly needs.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub key: FlowKey,
    pub seq: u32,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    Open(FlowKey),
    Data(FlowKey, Bytes),
    Close(FlowKey),
    /// Bytes were lost (the out-of-order bound was hit); the stream continues after a gap.
    Gap(FlowKey, u32),
}

#[derive(Debug)]
struct Flow {
    next: u32,
    /// Out-of-order segments by sequence number.
    pending: Vec<(u32, Bytes)>,
    pending_bytes: usize,
    fin_at: Option<u32>,
}

/// Reassembles every mirrored flow of one capture.
#[derive(Debug)]
pub(crate) struct Reassembler {
    flows: HashMap<FlowKey, Flow>,
    max_pending_bytes: usize,
    max_flows: usize,
}

/// `a` comes before `b` in sequence space.
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

impl Reassembler {
    pub(crate) fn new(max_pending_bytes: usize, max_flows: usize) -> Reassembler {
        Reassembler {
            flows: HashMap::new(),
            max_pending_bytes,
            max_flows,
        }
    }

    #[cfg(test)]
    pub(crate) fn open_flows(&self) -> usize {
        self.flows.len()
    }

    pub(crate) fn on_segment(&mut self, segment: Segment, events: &mut Vec<Event>) {
        let Segment {
            key,
            seq,
            syn,
            fin,
            rst,
            payload,
        } = segment;
        if rst {
            if self.flows.remove(&key).is_some() {
                events.push(Event::Close(key));
            }
            return;
        }
        let data_seq = if syn { seq.wrapping_add(1) } else { seq };
        if !self.flows.contains_key(&key) {
            if !syn && payload.is_empty() {
                return; // a bare ACK (or FIN) of a flow we never saw carries nothing to mirror
            }
            if self.flows.len() >= self.max_flows {
                return;
            }
            self.flows.insert(
                key,
                Flow {
                    next: data_seq,
                    pending: Vec::new(),
                    pending_bytes: 0,
                    fin_at: None,
                },
            );
            events.push(Event::Open(key));
        }
        let flow = self.flows.get_mut(&key).expect("inserted above");
        if fin {
            flow.fin_at = Some(data_seq.wrapping_add(payload.len() as u32));
        }
        if !payload.is_empty() {
            flow.accept(key, data_seq, payload, self.max_pending_bytes, events);
        }
        if flow.fin_at.is_some_and(|at| !before(flow.next, at)) {
            self.flows.remove(&key);
            events.push(Event::Close(key));
        }
    }
}

impl Flow {
    fn accept(
        &mut self,
        key: FlowKey,
        seq: u32,
        payload: Bytes,
        max_pending: usize,
        events: &mut Vec<Event>,
    ) {
        if before(self.next, seq) {
            // A gap: keep it for later, unless the bound says to give up on the gap.
            self.pending_bytes += payload.len();
            self.pending.push((seq, payload));
            if self.pending_bytes > max_pending {
                let earliest = self
                    .pending
                    .iter()
                    .map(|(s, _)| *s)
                    .min_by(|a, b| {
                        if before(*a, *b) {
                            std::cmp::Ordering::Less
                        } else {
                            std::cmp::Ordering::Greater
                        }
                    })
                    .expect("not empty");
                events.push(Event::Gap(key, earliest.wrapping_sub(self.next)));
                self.next = earliest;
            } else {
                return;
            }
        } else {
            self.deliver(key, seq, payload, events);
        }
        self.drain(key, events);
    }

    /// Delivers the part of `payload` at or after `next`.
    fn deliver(&mut self, key: FlowKey, seq: u32, payload: Bytes, events: &mut Vec<Event>) {
        let skip = self.next.wrapping_sub(seq) as usize;
        if skip < payload.len() {
            let fresh = payload.slice(skip..);
            self.next = self.next.wrapping_add(fresh.len() as u32);
            events.push(Event::Data(key, fresh));
        }
    }

    /// Delivers pending segments that became contiguous.
    fn drain(&mut self, key: FlowKey, events: &mut Vec<Event>) {
        while let Some(i) = self
            .pending
            .iter()
            .position(|(s, _)| !before(self.next, *s))
        {
            let (seq, payload) = self.pending.swap_remove(i);
            self.pending_bytes -= payload.len();
            self.deliver(key, seq, payload, events);
        }
    }
}

#[cfg(test)]
mod tests;
