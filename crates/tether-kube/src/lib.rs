//! Kubernetes support for tether: resolving `deploy/…`-style targets to pods, running the agent pod,
//! and carrying the session over a WebSocket port-forward.
//!
//! Empty until the Kubernetes issue lands; the crate exists so the workspace shape is final.
