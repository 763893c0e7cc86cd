//! `tether doctor`: can this machine run tether against local targets?
//!
//! Kubernetes permission checks arrive with the Kubernetes issue.

use std::path::{Path, PathBuf};

use crate::ui::Ui;

/// The programs local targets need, and the Debian package of each.
const TOOLS: &[(&str, &str, &str)] = &[
    ("ip", "iproute2", "network namespaces"),
    ("iptables", "iptables", "steal (iptables-nft backend)"),
    (
        "iptables-legacy",
        "iptables",
        "steal in namespaces whose rules use the legacy backend",
    ),
    (
        "nft",
        "nftables",
        "rules that expire on their own if the agent dies",
    ),
    ("conntrack", "conntrack", "flush_connections"),
];

pub(crate) fn run(ui: Ui) -> i32 {
    let mut problems = 0;
    let step = ui.step("running as root (local targets need it)");
    if is_root() {
        step.done("yes");
    } else {
        step.fail("no: run tether with sudo for netns/ and pid/ targets");
        problems += 1;
    }
    for (tool, package, why) in TOOLS {
        let step = ui.step(&format!("{tool} ({why})"));
        match find_in_path(tool) {
            Some(path) => step.done(&path.display().to_string()),
            None => {
                step.fail(&format!("missing: apt-get install {package}"));
                problems += 1;
            }
        }
    }
    if problems == 0 {
        if !ui.is_json() {
            println!("Everything tether needs for local targets is here.");
        }
        0
    } else {
        ui.warn(&format!(
            "{problems} check{} failed; see above",
            if problems == 1 { "" } else { "s" }
        ));
        1
    }
}

fn is_root() -> bool {
    // The effective uid is the owner of this process's /proc entry.
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
