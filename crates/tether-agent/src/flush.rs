//! `flush_connections`: moving connections that were open before a steal into it.
//!
//! NAT is decided on a connection's first packet, so a steal only catches new connections.
//! Deleting the conntrack entry of an open connection to the port makes the kernel decide again
//! on its next packet: it is then redirected mid-stream to the steal listener, which has no socket
//! for it and answers with a reset; the client reconnects, into the steal. Entries of connections
//! already redirected to the agent (their reply comes from the steal listener's port) are kept:
//! deleting them would break connections the session is serving.

use std::process::Stdio;

use crate::netns::Netns;

/// One conntrack entry's original tuple, and the source port of its reply direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub src: String,
    pub dst: String,
    pub sport: String,
    pub dport: String,
    pub reply_sport: String,
}

/// Parses `conntrack -L` lines (`… src=A dst=B sport=C dport=D src=… dst=… sport=E dport=…`).
pub(crate) fn parse(listing: &str) -> Vec<Entry> {
    listing
        .lines()
        .filter_map(|line| {
            let values = |key: &str| -> Vec<&str> {
                line.split_whitespace()
                    .filter_map(|w| w.strip_prefix(key))
                    .collect()
            };
            let (src, dst, sport, dport) = (
                values("src="),
                values("dst="),
                values("sport="),
                values("dport="),
            );
            Some(Entry {
                src: (*src.first()?).to_owned(),
                dst: (*dst.first()?).to_owned(),
                sport: (*sport.first()?).to_owned(),
                dport: (*dport.first()?).to_owned(),
                reply_sport: (*sport.get(1)?).to_owned(),
            })
        })
        .collect()
}

/// Closes the connections to `port` that are not already stolen; returns how many.
pub(crate) async fn flush_port(netns: &Netns, port: u16, steal_port: u16) -> usize {
    let port_text = port.to_string();
    let listing = netns
        .command("conntrack")
        .args(["-L", "-p", "tcp", "--orig-port-dst", &port_text])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .await;
    let Ok(listing) = listing else {
        tracing::warn!(
            "flush_connections: conntrack is not installed; existing connections stay where they are"
        );
        return 0;
    };
    let mut closed = 0;
    for entry in parse(&String::from_utf8_lossy(&listing.stdout)) {
        if entry.reply_sport == steal_port.to_string() || entry.dport != port_text {
            continue;
        }
        let deleted = netns
            .command("conntrack")
            .args([
                "-D",
                "-p",
                "tcp",
                "-s",
                &entry.src,
                "-d",
                &entry.dst,
                "--sport",
                &entry.sport,
                "--dport",
                &entry.dport,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if deleted.is_ok_and(|s| s.success()) {
            closed += 1;
        }
    }
    closed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_keep_the_original_tuple_and_the_reply_port() {
        let listing = "tcp      6 431999 ESTABLISHED src=10.1.0.100 dst=10.1.0.10 sport=40000 dport=80 src=10.1.0.10 dst=10.1.0.100 sport=80 dport=40000 [ASSURED] mark=0 use=1\n\
                       tcp      6 431999 ESTABLISHED src=10.1.0.100 dst=10.1.0.10 sport=40001 dport=80 src=10.1.0.10 dst=10.1.0.100 sport=38123 dport=40001 [ASSURED] mark=0 use=1\n\
                       conntrack v1.4.7 (conntrack-tools): 2 flow entries have been shown.\n";
        let entries = parse(listing);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].sport, "40000");
        assert_eq!(entries[0].reply_sport, "80", "not redirected: flushed");
        assert_eq!(
            entries[1].reply_sport, "38123",
            "redirected to the steal listener: kept"
        );
    }
}
