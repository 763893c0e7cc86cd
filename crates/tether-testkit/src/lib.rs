//! Test support shared by tether's integration tests.
//!
//! - [`netns`]: network-namespace "pods", a client namespace, and the programs running in them.
//! - [`agent`]: the real agent binary started for a target, and a session client that speaks the
//!   protocol to it as the local proxy will.
//! - [`registry`]: an OCI registry on loopback, for pushes and the simulator's pulls.
//! - `apps/`: small real apps (a Python HTTP app and client) run inside the namespaces.
//!
//! Tests that need root call [`require_root`] first: without root they print a visible SKIPPED
//! line and return (CI runs as root, so they run there).

pub mod agent;
pub mod cgroup;
pub mod cluster;
pub mod cutter;
pub mod go;
pub mod netns;
pub mod registry;

pub use netns::{Network, Pod};

/// True when the test may run; prints a visible skip line otherwise.
pub fn require_root(test: &str) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    if !root {
        eprintln!("SKIPPED {test}: needs root (network namespaces and iptables)");
    }
    root
}
