//! Test support shared by tether's integration tests: network-namespace "pods", small test apps,
//! a link-cutting proxy and (later) the cluster simulator.
//!
//! Grows with the issues that need it; see ARCHITECTURE.md.
