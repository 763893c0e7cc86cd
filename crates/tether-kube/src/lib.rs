//! Kubernetes for tether: the cluster client, targets, the agent pod and the port-forward that
//! carries a session to it.
//!
//! - [`client`]: a client found as kubectl finds one (kubeconfig, context, in-cluster).
//! - [`target`]: `deploy/api` → one running, ready pod and its app container.
//! - [`manifest`]: the agent's Job as data (what tether creates, testable without a cluster).
//! - [`agent`]: create the Job, wait for its pod with a watch, port-forward, delete.
//! - [`image`]: the agent image, built without a container engine, written as a tarball.
//! - [`registry`]: pushing the agent image to an OCI registry; is an image there.
//! - [`access`]: the permissions tether needs, checked with SelfSubjectAccessReview.
//! - [`pods`]: the target's pods kept current with a watch, to follow a replaced pod.

pub mod access;
pub mod agent;
pub mod client;
pub mod image;
pub mod manifest;
pub mod pods;
pub mod registry;
pub mod target;

pub use kube::Client;
