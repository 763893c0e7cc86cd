//! The `tether` binary as users run it.

mod boundaries;
mod cleanup;
mod config;
mod context;
mod e2e;
mod exec;
mod follow;
mod http_filter;
mod image;
mod kube;
mod link;
mod mesh;
mod syscall;
mod usage;

use assert_cmd::Command;

fn tether() -> Command {
    let mut cmd = Command::cargo_bin("tether").unwrap();
    // Tests must not pick up the developer's own settings.
    cmd.env_remove("TETHER_CONFIG").env_remove("RUST_LOG");
    cmd
}
