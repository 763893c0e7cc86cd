//! The classic BPF program attached to the mirror's packet socket: only incoming IPv4 TCP
//! segments to the subscribed ports reach user space.
//!
//! Under a service mesh only one interface is watched (`lo`, where the sidecar hands plaintext to
//! the app; what arrives on the pod's interface is the mesh's encrypted traffic).
//!
//! The socket is `SOCK_DGRAM`, so offset 0 is the IP header. Packets the namespace sends are
//! dropped by their packet type (`PACKET_OUTGOING`): on `lo` every packet is seen twice, once
//! leaving and once arriving, and only the arriving copy is kept.

use socket2::SockFilter;

// Instruction classes and modes (linux/filter.h).
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
const LD_H_ABS: u16 = 0x28; // BPF_LD | BPF_H | BPF_ABS
const LD_H_IND: u16 = 0x48; // BPF_LD | BPF_H | BPF_IND
const LDX_B_MSH: u16 = 0xb1; // BPF_LDX | BPF_B | BPF_MSH
const ALU_AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

/// `SKF_AD_OFF + SKF_AD_PKTTYPE`: the ancillary load of the packet type.
const PKTTYPE: u32 = 0xffff_f000 + 4;
/// `SKF_AD_OFF + SKF_AD_IFINDEX`: the ancillary load of the interface index.
const IFINDEX: u32 = 0xffff_f000 + 8;
/// `lo`'s index, in every network namespace.
pub(crate) const LOOPBACK_IFINDEX: u32 = 1;
const PACKET_OUTGOING: u32 = 4;
const SNAPLEN: u32 = 0x0004_0000;

/// The filter for `ports`, on every interface or only on `interface` (an index). At most 200
/// ports (jump offsets are 8-bit).
pub(crate) fn program(ports: &[u16], interface: Option<u32>) -> Vec<SockFilter> {
    assert!(!ports.is_empty() && ports.len() <= 200, "1 to 200 ports");
    let n = ports.len() as u8;
    // Layout: 2 interface instructions (if any), 11 fixed ones, one jeq per port, then `drop` and
    // `accept`. A jump offset counts the instructions to skip after the jump itself.
    let first = if interface.is_some() { 2 } else { 0 };
    let fixed = first + 11;
    let to_drop = |at: u8| fixed + n - at - 1;
    let mut program = Vec::new();
    if let Some(ifindex) = interface {
        program.push(SockFilter::new(LD_W_ABS, 0, 0, IFINDEX));
        program.push(SockFilter::new(JEQ_K, 0, to_drop(1), ifindex));
    }
    program.extend([
        SockFilter::new(LD_B_ABS, 0, 0, PKTTYPE), // +0
        SockFilter::new(JEQ_K, to_drop(first + 1), 0, PACKET_OUTGOING), // +1
        SockFilter::new(LD_B_ABS, 0, 0, 0),       // +2: version and IHL
        SockFilter::new(ALU_AND_K, 0, 0, 0xf0),   // +3
        SockFilter::new(JEQ_K, 0, to_drop(first + 4), 0x40), // +4: IPv4
        SockFilter::new(LD_B_ABS, 0, 0, 9),       // +5: protocol
        SockFilter::new(JEQ_K, 0, to_drop(first + 6), 6), // +6: TCP
        SockFilter::new(LD_H_ABS, 0, 0, 6),       // +7: fragment offset
        SockFilter::new(JSET_K, to_drop(first + 8), 0, 0x1fff), // +8: later fragments
        SockFilter::new(LDX_B_MSH, 0, 0, 0),      // +9: X = IP header length
        SockFilter::new(LD_H_IND, 0, 0, 2),       // +10: TCP destination port
    ]);
    for (i, port) in ports.iter().enumerate() {
        let at = fixed + i as u8;
        // Match: skip the remaining port checks and `drop`, landing on `accept`.
        let to_accept = n - i as u8;
        program.push(SockFilter::new(JEQ_K, to_accept, 0, u32::from(*port)));
        debug_assert_eq!(to_drop(at), n - i as u8 - 1);
    }
    program.push(SockFilter::new(RET_K, 0, 0, 0)); // drop
    program.push(SockFilter::new(RET_K, 0, 0, SNAPLEN)); // accept
    program
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_has_one_check_per_port_and_ends_in_drop_then_accept() {
        assert_eq!(program(&[80], None).len(), 14);
        assert_eq!(program(&[80, 81, 8080], None).len(), 16);
        assert_eq!(program(&[80], Some(LOOPBACK_IFINDEX)).len(), 16);
    }

    #[test]
    #[should_panic(expected = "1 to 200 ports")]
    fn no_ports_is_a_bug() {
        program(&[], None);
    }
}
