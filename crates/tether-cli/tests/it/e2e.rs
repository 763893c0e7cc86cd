//! Against a real cluster: run only with `TETHER_E2E_KUBECONFIG` (skipped, visibly, without).
//!
//! ```text
//! TETHER_E2E_KUBECONFIG=~/.kube/config   # the cluster (its current context, or:)
//! TETHER_E2E_CONTEXT=kind-tether         # optional
//! TETHER_E2E_NAMESPACE=shop              # where the target lives (default: default)
//! TETHER_E2E_TARGET=deploy/api           # a workload with a running, ready pod
//! TETHER_E2E_AGENT_IMAGE=…               # optional: an agent image the nodes can pull or have
//! cargo test -p tether --test it e2e -- --test-threads 1
//! ```
//!
//! What they check is what a user sees: `tether doctor` finds every permission, `tether ls`
//! lists the target, and a command run with `tether exec` gets the pod's environment, files and
//! DNS, and exits with its own code, with the agent Job removed afterwards.

use std::{
    io::Write as _,
    process::{Command, Output},
};

struct Cluster {
    kubeconfig: String,
    context: Option<String>,
    namespace: String,
    target: String,
    image: Option<String>,
}

/// The cluster to test against, or `None` (after a visible SKIPPED line).
fn cluster(test: &str) -> Option<Cluster> {
    let Some(kubeconfig) = std::env::var("TETHER_E2E_KUBECONFIG")
        .ok()
        .filter(|v| !v.is_empty())
    else {
        // Straight to stderr, past libtest's capture of `eprintln!`: the skip shows in every run.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: set TETHER_E2E_KUBECONFIG (and TETHER_E2E_TARGET) to run it against a real cluster"
        );
        return None;
    };
    Some(Cluster {
        kubeconfig,
        context: std::env::var("TETHER_E2E_CONTEXT").ok(),
        namespace: std::env::var("TETHER_E2E_NAMESPACE").unwrap_or_else(|_| "default".into()),
        target: std::env::var("TETHER_E2E_TARGET").unwrap_or_else(|_| "deploy/api".into()),
        image: std::env::var("TETHER_E2E_AGENT_IMAGE").ok(),
    })
}

impl Cluster {
    fn tether(&self, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
        command
            .args(args)
            .env_remove("TETHER_CONFIG")
            .env("KUBECONFIG", &self.kubeconfig);
        if let Some(context) = &self.context {
            command.env("TETHER_KUBE_CONTEXT", context);
        }
        if let Some(image) = &self.image {
            command.env("TETHER_AGENT__IMAGE", image);
        }
        command.output().unwrap()
    }
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn e2e_doctor_finds_every_permission() {
    let Some(cluster) = cluster("e2e_doctor_finds_every_permission") else {
        return;
    };
    let output = cluster.tether(&["doctor", "-n", &cluster.namespace]);
    let said = text(&output);
    assert!(
        said.contains("✓ Kubernetes cluster"),
        "doctor reached the cluster: {said}"
    );
    assert!(!said.contains(": missing"), "{said}");
}

#[test]
fn e2e_ls_lists_the_target() {
    let Some(cluster) = cluster("e2e_ls_lists_the_target") else {
        return;
    };
    let output = cluster.tether(&["ls", "-n", &cluster.namespace]);
    assert!(output.status.success(), "{}", text(&output));
    let listed = String::from_utf8_lossy(&output.stdout);
    let kind_and_name = cluster.target.replacen("deployment/", "deploy/", 1);
    assert!(listed.contains(&kind_and_name), "{listed}");
}

#[test]
fn e2e_a_command_gets_the_pod_s_environment_files_and_names() {
    let Some(cluster) = cluster("e2e_a_command_gets_the_pod_s_environment_files_and_names") else {
        return;
    };
    // HOSTNAME is the pod's name; /etc/hostname is the pod's file; the service account's
    // namespace file exists only in the pod; kubernetes.default resolves through the pod's DNS.
    let script = "import os, socket; \
        print(os.environ.get('HOSTNAME', '')); \
        print(open('/etc/hostname').read().strip()); \
        print(socket.gethostbyname('kubernetes.default.svc')); \
        raise SystemExit(7)";
    let output = cluster.tether(&[
        "exec",
        "--target",
        &cluster.target,
        "-n",
        &cluster.namespace,
        "--",
        "python3",
        "-c",
        script,
    ]);
    let said = text(&output);
    assert_eq!(
        output.status.code(),
        Some(7),
        "the command's own exit code: {said}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{said}");
    let name = cluster.target.rsplit('/').next().unwrap();
    assert!(
        lines[0].starts_with(name),
        "HOSTNAME is the pod's name: {said}"
    );
    assert_eq!(lines[0], lines[1], "/etc/hostname is the pod's: {said}");
    assert!(lines[2].parse::<std::net::Ipv4Addr>().is_ok(), "{said}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("agent Job tether-agent-") && stderr.contains(" deleted"),
        "the agent Job is deleted: {said}"
    );
}
