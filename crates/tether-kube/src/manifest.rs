//! The agent's Job, built as data: no cluster needed to see or test what tether creates.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::{
        batch::v1::{Job, JobSpec},
        core::v1::{
            Capabilities, Container, ContainerPort, EnvVar, EphemeralContainer, PodSpec,
            PodTemplateSpec, ResourceRequirements, SeccompProfile, SecurityContext, Toleration,
        },
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};

/// The agent image of this tether version.
pub const DEFAULT_IMAGE: &str = concat!(
    "ghcr.io/tether-dev/tether-agent:",
    env!("CARGO_PKG_VERSION")
);

/// The agent's port inside its own pod. It listens on loopback only: the kubelet's port-forward
/// dials `localhost` in the pod's namespace, and nothing else in the cluster can reach it.
pub const AGENT_PORT: u16 = 44128;

/// Ports for ephemeral agents, which share the target pod's network (with its app, and with
/// the ephemeral agents of earlier sessions, which live on until idle): one per session, below
/// the kernel's ephemeral range (32768–60999) so no outgoing connection holds it.
pub const EPHEMERAL_PORTS: std::ops::RangeInclusive<u16> = 20000..=29999;

/// The label every agent pod and Job carries, with the session id.
pub const SESSION_LABEL: &str = "tether.dev/session";

/// Capabilities the agent asks for (not `privileged`): rules (NET_ADMIN), raw capture
/// (NET_RAW), entering the target's namespaces (SYS_ADMIN), reading another process's root and
/// environment (SYS_PTRACE).
pub const CAPABILITIES: [&str; 4] = ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"];

/// The pod the agent works for.
#[derive(Debug, Clone)]
pub struct AgentTarget {
    /// The target pod's node.
    pub node: String,
    /// The target pod (for the label; the agent finds it by container id).
    pub pod: String,
    /// `containerd://…` of the target container.
    pub container_id: String,
}

/// Everything the agent's Job depends on.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// The session id (lowercase hex); names the Job.
    pub session: String,
    pub namespace: String,
    /// The target, or `None` for a targetless session: then the agent runs in a pod of its own
    /// wherever the scheduler puts it, without `hostPID` or capabilities.
    pub target: Option<AgentTarget>,
    pub image: String,
    pub pull_policy: Option<String>,
    /// SHA-256 of the session token, in hex.
    pub token_sha256: String,
    /// The port the agent listens on (loopback): [`AGENT_PORT`] in its own pod, one of
    /// [`EPHEMERAL_PORTS`] as an ephemeral container.
    pub port: u16,
    /// The agent exits after this long without a session.
    pub idle_exit: Duration,
    pub privileged: bool,
    /// Who started it (a label value).
    pub user: String,
    /// The agent's `RUST_LOG`.
    pub log_level: String,
    /// Force the rules backend.
    pub nftables: Option<bool>,
}

/// How long an agent Job may run at most: a safety net should the agent outlive everything
/// else (it exits on its own when idle).
pub const ACTIVE_DEADLINE: Duration = Duration::from_secs(24 * 3600);
/// How long a finished agent Job stays, for `kubectl describe`.
pub const TTL_AFTER_FINISHED: i32 = 60;

impl AgentSpec {
    pub fn job_name(&self) -> String {
        format!(
            "tether-agent-{}",
            &self.session[..self.session.len().min(12)]
        )
    }

    pub fn job(&self) -> Job {
        let labels = BTreeMap::from([
            (
                "app.kubernetes.io/name".to_owned(),
                "tether-agent".to_owned(),
            ),
            (
                "app.kubernetes.io/managed-by".to_owned(),
                "tether".to_owned(),
            ),
            (SESSION_LABEL.to_owned(), self.session.clone()),
            ("tether.dev/user".to_owned(), label_value(&self.user)),
            (
                "tether.dev/target-pod".to_owned(),
                self.target
                    .as_ref()
                    .map_or_else(|| "none".to_owned(), |t| label_value(&t.pod)),
            ),
        ]);
        // field-notes.md §4: no sidecar in the agent pod.
        let annotations = BTreeMap::from([
            ("sidecar.istio.io/inject".to_owned(), "false".to_owned()),
            ("linkerd.io/inject".to_owned(), "disabled".to_owned()),
        ]);
        let container = self.container(
            self.target
                .as_ref()
                .map(|t| format!("container/{}", t.container_id)),
        );
        Job {
            metadata: ObjectMeta {
                name: Some(self.job_name()),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(JobSpec {
                backoff_limit: Some(0),
                ttl_seconds_after_finished: Some(TTL_AFTER_FINISHED),
                active_deadline_seconds: Some(ACTIVE_DEADLINE.as_secs() as i64),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        annotations: Some(annotations),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        // On the target's node, without the scheduler: the agent must share its
                        // kernel to enter the target's namespaces.
                        node_name: self.target.as_ref().map(|t| t.node.clone()),
                        host_pid: self.target.as_ref().map(|_| true),
                        restart_policy: Some("Never".into()),
                        automount_service_account_token: Some(false),
                        termination_grace_period_seconds: Some(10),
                        // Whatever the node's taints, the agent runs there.
                        // Pinned to the target's node, whatever its taints; a targetless agent
                        // goes where the scheduler puts ordinary pods.
                        tolerations: self.target.as_ref().map(|_| {
                            vec![Toleration {
                                operator: Some("Exists".into()),
                                ..Toleration::default()
                            }]
                        }),
                        containers: vec![container],
                        ..PodSpec::default()
                    }),
                },
                ..JobSpec::default()
            }),
            status: None,
        }
    }

    /// The agent container; `target` is its `--target` argument (none: targetless).
    fn container(&self, target: Option<String>) -> Container {
        let with_target = target.is_some();
        let mut args = Vec::new();
        if let Some(target) = target {
            args.extend(["--target".to_owned(), target]);
        }
        args.extend([
            "--listen".to_owned(),
            format!("127.0.0.1:{}", self.port),
            "--token-sha256".to_owned(),
            self.token_sha256.clone(),
            "--idle-exit".to_owned(),
            format!("{}s", self.idle_exit.as_secs().max(1)),
        ]);
        if let Some(nft) = self.nftables {
            args.extend(["--nftables".to_owned(), nft.to_string()]);
        }
        Container {
            name: "agent".into(),
            image: Some(self.image.clone()),
            image_pull_policy: self.pull_policy.clone(),
            command: Some(vec!["/tether-agent".into()]),
            args: Some(args),
            env: Some(vec![EnvVar {
                name: "RUST_LOG".into(),
                value: Some(self.log_level.clone()),
                ..EnvVar::default()
            }]),
            ports: Some(vec![ContainerPort {
                name: Some("tether".into()),
                container_port: i32::from(self.port),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }]),
            security_context: Some(if with_target {
                SecurityContext {
                    privileged: self.privileged.then_some(true),
                    capabilities: Some(Capabilities {
                        add: Some(CAPABILITIES.iter().map(|c| (*c).to_owned()).collect()),
                        drop: None,
                    }),
                    run_as_user: Some(0),
                    ..SecurityContext::default()
                }
            } else {
                // Targetless, the agent only connects and resolves: nothing but an ordinary
                // user (Pod Security's `restricted` level).
                SecurityContext {
                    capabilities: Some(Capabilities {
                        add: None,
                        drop: Some(vec!["ALL".into()]),
                    }),
                    run_as_non_root: Some(true),
                    run_as_user: Some(65534),
                    allow_privilege_escalation: Some(false),
                    seccomp_profile: Some(SeccompProfile {
                        type_: "RuntimeDefault".into(),
                        localhost_profile: None,
                    }),
                    ..SecurityContext::default()
                }
            }),
            // A failing agent's last log lines show up in the pod's status (and in tether's
            // error), without `pods/log` permission.
            termination_message_policy: Some("FallbackToLogsOnError".into()),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_owned(), Quantity("10m".into())),
                    ("memory".to_owned(), Quantity("32Mi".into())),
                ])),
                ..ResourceRequirements::default()
            }),
            ..Container::default()
        }
    }

    /// The agent as an ephemeral container of the target pod (`agent.ephemeral`): it shares the
    /// pod's network and, through `targetContainerName`, the PID namespace of the target
    /// container, whose main process is PID 1 there. It cannot be removed once added; it ends
    /// on its own once idle.
    pub fn ephemeral_container(&self, target_container: &str) -> EphemeralContainer {
        let mut c = self.container(Some("pid/1".to_owned()));
        // It sees only the container's processes: other agents' rules are not its to judge.
        c.args
            .get_or_insert_with(Vec::new)
            .push("--no-sweep".into());
        EphemeralContainer {
            name: self.job_name(),
            image: c.image,
            image_pull_policy: c.image_pull_policy,
            command: c.command,
            args: c.args,
            env: c.env,
            security_context: c.security_context,
            termination_message_policy: c.termination_message_policy,
            target_container_name: Some(target_container.to_owned()),
            ..EphemeralContainer::default()
        }
    }

    /// The Job as YAML, as `kubectl apply -f` would take it.
    pub fn yaml(&self) -> String {
        serde_saphyr::to_string(&self.job()).expect("a Job always serialises")
    }
}

/// A label value: at most 63 of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn label_value(raw: &str) -> String {
    let cleaned: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    cleaned
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> AgentSpec {
        AgentSpec {
            session: "5f2b9c0d1e3a4b6c".into(),
            namespace: "shop".into(),
            target: Some(AgentTarget {
                node: "node-a".into(),
                pod: "api-7d9c5b-x2k4q".into(),
                container_id: format!("containerd://{}", "ab".repeat(32)),
            }),
            image: DEFAULT_IMAGE.into(),
            pull_policy: Some("IfNotPresent".into()),
            token_sha256: "0f".repeat(32),
            port: AGENT_PORT,
            idle_exit: Duration::from_secs(30),
            privileged: false,
            user: "dev@example.com".into(),
            log_level: "info".into(),
            nftables: None,
        }
    }

    #[test]
    fn the_job_yaml_is_what_tether_creates() {
        let yaml = spec().yaml().replace(env!("CARGO_PKG_VERSION"), "VERSION");
        let expected = include_str!("../tests/agent-job.yaml");
        if yaml != expected {
            // Update with TETHER_BLESS=1 after checking the change is wanted.
            if std::env::var_os("TETHER_BLESS").is_some() {
                std::fs::write(
                    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/agent-job.yaml"),
                    &yaml,
                )
                .unwrap();
            }
            panic!("the agent Job changed; new YAML:\n{yaml}");
        }
    }

    #[test]
    fn the_job_runs_on_the_target_s_node_with_host_pid_four_capabilities_no_mesh_and_a_ttl() {
        let job = spec().job();
        let job_spec = job.spec.as_ref().unwrap();
        assert_eq!(job_spec.backoff_limit, Some(0));
        assert_eq!(
            job_spec.ttl_seconds_after_finished,
            Some(TTL_AFTER_FINISHED)
        );
        assert!(job_spec.active_deadline_seconds.is_some());
        let template = &job_spec.template;
        let pod = template.spec.as_ref().unwrap();
        assert_eq!(pod.node_name.as_deref(), Some("node-a"));
        assert_eq!(pod.host_pid, Some(true));
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        let agent = &pod.containers[0];
        let security = agent.security_context.as_ref().unwrap();
        assert_eq!(security.privileged, None, "not privileged unless asked");
        let mut added = security.capabilities.as_ref().unwrap().add.clone().unwrap();
        added.sort();
        assert_eq!(added, ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"]);
        let annotations = template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap();
        assert_eq!(annotations["sidecar.istio.io/inject"], "false");
        assert_eq!(annotations["linkerd.io/inject"], "disabled");
        let labels = template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert_eq!(labels[SESSION_LABEL], "5f2b9c0d1e3a4b6c");
        assert_eq!(labels["tether.dev/user"], "dev_example.com");
        // The token itself is never in the spec.
        let args = agent.args.as_ref().unwrap().join(" ");
        assert!(args.contains("--token-sha256"), "{args}");
        assert!(!args.contains("--token-file"), "{args}");
        assert!(args.contains(&format!("127.0.0.1:{AGENT_PORT}")), "{args}");

        let privileged = AgentSpec {
            privileged: true,
            ..spec()
        }
        .job();
        let pod = privileged.spec.unwrap().template.spec.unwrap();
        let security = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(security.privileged, Some(true));
    }

    #[test]
    fn a_targetless_agent_runs_anywhere_without_host_pid_or_capabilities() {
        let job = AgentSpec {
            target: None,
            ..spec()
        }
        .job();
        let pod = job.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.node_name, None);
        assert_eq!(pod.host_pid, None);
        assert_eq!(pod.tolerations, None);
        let agent = &pod.containers[0];
        let security = agent.security_context.as_ref().unwrap();
        assert_eq!(security.capabilities.as_ref().unwrap().add, None);
        assert_eq!(
            security.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_owned()][..])
        );
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.privileged, None);
        let args = agent.args.as_ref().unwrap().join(" ");
        assert!(!args.contains("--target"), "{args}");
    }

    #[test]
    fn the_ephemeral_agent_targets_pid_1_of_the_target_container() {
        let container = AgentSpec {
            port: 41234,
            ..spec()
        }
        .ephemeral_container("app");
        assert_eq!(container.target_container_name.as_deref(), Some("app"));
        let args = container.args.unwrap().join(" ");
        assert!(
            args.starts_with("--target pid/1 --listen 127.0.0.1:41234"),
            "{args}"
        );
        let mut caps = container
            .security_context
            .unwrap()
            .capabilities
            .unwrap()
            .add
            .unwrap();
        caps.sort();
        assert_eq!(caps, CAPABILITIES);
        assert!(
            container.ports.is_none(),
            "ephemeral containers may not declare ports"
        );
    }

    #[test]
    fn label_values_are_valid() {
        assert_eq!(label_value("dev@example.com"), "dev_example.com");
        assert_eq!(label_value("-x-"), "x");
        assert_eq!(label_value(&"a".repeat(80)).len(), 63);
    }
}
