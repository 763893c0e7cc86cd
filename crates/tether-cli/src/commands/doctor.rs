//! `tether doctor`: can this machine run tether against local targets, and may this user run it
//! against the configured cluster?

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
        "steal with rules that expire on their own if the agent dies; without it, iptables-legacy",
    ),
    ("conntrack", "conntrack", "flush_connections"),
];

pub(crate) fn run(
    namespace: Option<String>,
    context: Option<String>,
    config_file: Option<&Path>,
    ui: Ui,
) -> i32 {
    let local = local_checks(ui) + kernel_checks(ui);
    let mut loader = crate::commands::config::loader(config_file);
    if let Some(context) = &context {
        loader = loader.flag("--context", "/kube_context", serde_json::json!(context));
    }
    if let Some(namespace) = &namespace {
        loader = loader.flag(
            "--namespace",
            "/target/namespace",
            serde_json::json!(namespace),
        );
    }
    let config = match loader.load() {
        Ok(loaded) => loaded.config,
        Err(problems) => {
            eprint!("{}", crate::commands::config::render(&problems));
            return 1;
        }
    };
    let problems = if cluster_configured(&config) {
        if local > 0 {
            ui.info("(the local checks above matter only for netns/ and pid/ targets)");
        }
        crate::run_async(cluster_checks(&config, ui))
    } else {
        ui.info("no cluster configured (no kubeconfig, not in a pod): permission checks skipped");
        local
    };
    if problems == 0 {
        if !ui.is_json() {
            println!("Everything tether needs is here.");
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

/// A kubeconfig to read (named in the config, `KUBECONFIG`, `~/.kube/config`, or a context
/// asked for), or a pod's service account.
fn cluster_configured(config: &tether_config::Config) -> bool {
    config.kubeconfig.is_some()
        || config.kube_context.is_some()
        || std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("HOME")
            .is_some_and(|home| Path::new(&home).join(".kube/config").is_file())
}

/// Every permission a session uses, asked of the API server, in the target's namespace and (if
/// it differs) in `agent.namespace`. Returns how many are missing (or 1 more when the cluster
/// cannot be asked).
async fn cluster_checks(config: &tether_config::Config, ui: Ui) -> anyhow::Result<i32> {
    let step = ui.step("Kubernetes cluster");
    let (client, namespace) = match crate::kube_agent::client(config).await {
        Ok(found) => found,
        Err(error) => {
            step.fail(&format!("{error:#}"));
            return Ok(1);
        }
    };
    step.done(&format!("namespace {namespace}"));
    let mut namespaces = vec![namespace.clone()];
    if let Some(agents) = config.agent.namespace.as_ref().filter(|a| **a != namespace) {
        namespaces.push(agents.clone());
    }
    let mut missing = 0;
    for namespace in &namespaces {
        let suffix = if namespaces.len() > 1 {
            format!(" in {namespace}")
        } else {
            String::new()
        };
        for permission in &tether_kube::access::NEEDED {
            let step = ui.step(&format!("may {permission}{suffix} ({})", permission.why));
            match tether_kube::access::check(&client, namespace, permission).await {
                Ok(true) => step.done("yes"),
                Ok(false) => {
                    step.fail("missing: deploy/rbac.yaml grants it");
                    missing += 1;
                }
                Err(error) => {
                    step.fail(&format!("cannot ask the API server: {error}"));
                    return Ok(missing + 1);
                }
            }
        }
    }
    Ok(missing + image_check(config, ui).await)
}

/// Whether the agent image is in its registry, asked from this machine with its credentials.
/// The default image is published nowhere: it works only once loaded on the nodes, which this
/// machine cannot see, so it is a warning. A configured image the registry does not have is a
/// problem; one whose registry this machine cannot reach is a warning (the nodes may reach it).
async fn image_check(config: &tether_config::Config, ui: Ui) -> i32 {
    let ways_out = "push one (tether agent-image --push REGISTRY/REPOSITORY:TAG) and set agent.image to it, \
                    or load it on the nodes (tether agent-image --output agent.tar)";
    let Some(image) = &config.agent.image else {
        ui.warn(&format!(
            "agent.image is not set, and the default {} is not published in any registry: {ways_out}",
            tether_kube::manifest::DEFAULT_IMAGE
        ));
        return 0;
    };
    if config.agent.image_pull_policy == Some(tether_config::model::PullPolicy::Never) {
        ui.info(&format!(
            "agent image {image}: image_pull_policy Never, so it must be on the nodes already"
        ));
        return 0;
    }
    let step = ui.step(&format!("agent image {image} in its registry"));
    match tether_kube::registry::manifest_digest(image, false).await {
        Ok(digest) => {
            step.done(&digest);
            0
        }
        Err(error) if error.unreachable() => {
            step.done(&format!(
                "cannot tell: this machine cannot reach its registry ({:#}); the nodes may",
                anyhow::Error::from(error)
            ));
            0
        }
        Err(error) => {
            step.fail(&format!("{:#}; {ways_out}", anyhow::Error::from(error)));
            1
        }
    }
}

/// The kernel features tether's agent uses on this machine (local targets); how many are missing.
fn kernel_checks(ui: Ui) -> i32 {
    let mut problems = 0;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version: Vec<u32> = release
        .trim()
        .split(['.', '-'])
        .take(2)
        .filter_map(|part| part.parse().ok())
        .collect();
    let step = ui.step("kernel 5.6 or later (openat2: file access confined to the target's root)");
    match version.as_slice() {
        [major, minor] if (*major, *minor) >= (5, 6) => step.done(release.trim()),
        _ => {
            step.fail(&format!(
                "{}: files of the target cannot be read safely here",
                release.trim()
            ));
            problems += 1;
        }
    }
    // Optional: without it, Go programs and static executables cannot be intercepted (tether
    // says so when it runs one), everything else works.
    let step = ui.step(
        "syscall supervisor for Go and static programs (seccomp user notification, pidfd_getfd, Linux 5.14)",
    );
    match tether_supervisor::support() {
        tether_supervisor::Support::Available => step.done("available"),
        missing => step.done(&format!(
            "not available: {}; Go programs and static executables will run without interception",
            missing
        )),
    }
    if is_root() && find_in_path("nft").is_some() {
        let step = ui.step("nftables in the kernel (nft list tables)");
        match std::process::Command::new("nft")
            .args(["list", "tables"])
            .output()
        {
            Ok(output) if output.status.success() => step.done("yes"),
            Ok(output) => {
                step.fail(&format!(
                    "{} (load the nf_tables module: modprobe nf_tables)",
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
                problems += 1;
            }
            Err(error) => {
                step.fail(&format!("cannot run nft: {error}"));
                problems += 1;
            }
        }
    }
    problems
}

/// Root and the programs local targets need; how many are missing.
fn local_checks(ui: Ui) -> i32 {
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
    problems
}

fn is_root() -> bool {
    // The effective uid is the owner of this process's /proc entry.
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// `tool` as `execvp` finds it: a path as given, else the first executable of that name in
/// `PATH` (then `/usr/sbin`, `/sbin`, which a user's `PATH` may lack).
pub(crate) fn find_in_path(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        return Some(PathBuf::from(tool)).filter(|p| is_executable(p));
    }
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
