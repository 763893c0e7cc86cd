//! `flush_connections`: moving connections that were open before a steal into it.
//!
//! A steal redirects only new connections (their SYN). To move a long-lived connection, the agent
//! closes the original app's side of it with `ss -K` (the kernel's socket-destroy): the client gets
//! a reset on its next packet and reconnects, into the steal. Connections already redirected to
//! the agent are never touched: their sockets belong to the steal listener's port, not to the
//! stolen one. No conntrack entry is deleted (deleting the entry of a redirected connection
//! would break its original-destination lookup, field-notes §3).
//!
//! The trade-off: every client of the port sees one reset, at once, which is why this is off by
//! default.

use std::process::Stdio;

use crate::netns::Netns;

/// Closes the established connections of the app listening on `port`; returns how many.
pub(crate) async fn flush_port(netns: &Netns, port: u16) -> usize {
    let filter = format!("( sport = :{port} )");
    let output = netns
        .command("ss")
        .args(["-K", "-H", "-tn", "state", "established", &filter])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await;
    match output {
        Ok(output) if output.status.success() => {
            // `ss -K` lists the sockets it closed, one per line.
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .count()
        }
        Ok(output) => {
            tracing::warn!(port, stderr = %String::from_utf8_lossy(&output.stderr).trim(), "flush_connections: ss -K failed; existing connections stay where they are");
            0
        }
        Err(error) => {
            tracing::warn!(port, %error, "flush_connections: cannot run ss (iproute2); existing connections stay where they are");
            0
        }
    }
}
