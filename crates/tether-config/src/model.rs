//! The configuration's canonical shape: what the rest of tether reads after loading.
//!
//! Key names follow mirrord's where the concept is the same, so a `mirrord.json` keeps working.
//! Shorthand forms (`"incoming": "steal"`, `"fs": "read"`, …) are expanded before these types see
//! the value; see `shorthand.rs`. Doc comments here become the JSON Schema's descriptions, which
//! editors show: write them for users.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::ConfigDuration;

/// tether's configuration (`.tether/config.json`, `.yaml` or `.toml`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// What to run against. A string is short for `{ "path": … }`.
    pub target: TargetConfig,
    /// Which parts of the target's context the local process gets.
    pub feature: FeatureConfig,
    /// How the agent runs.
    pub agent: AgentConfig,
    /// Path of the kubeconfig file (default: `$KUBECONFIG`, then `~/.kube/config`).
    pub kubeconfig: Option<String>,
    /// kubeconfig context to use (default: the current context).
    pub kube_context: Option<String>,
    /// Accept the API server's certificate without checking it. Only for test clusters.
    pub accept_invalid_certificates: bool,
    /// Keepalive pings on the link to the agent.
    pub keepalive: KeepaliveConfig,
    /// Reconnecting when the link to the agent drops.
    pub reconnect: ReconnectConfig,
    /// Resuming a session after a reconnect.
    pub resume: ResumeConfig,
    /// Kubelet probes on stolen ports.
    pub probes: ProbesConfig,
    /// What happens to the local process when the link cannot be restored within
    /// `reconnect.grace`.
    pub on_link_lost: OnLinkLost,
    /// How the local process is intercepted: `auto` (the preloaded library, or the syscall
    /// supervisor for programs it cannot enter: Go programs and static executables), `preload`
    /// (always the library), `syscall` (always the supervisor: seccomp user notification,
    /// Linux 5.14+, x86_64).
    pub interception: Interception,
}

/// The target: a pod or workload in Kubernetes, or a local network namespace or process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TargetConfig {
    /// `netns/NAME`, `pid/PID`, `pod/NAME`, `deploy/NAME` (or `deployment/`), `statefulset/NAME`,
    /// `replicaset/NAME`, `job/NAME`, each Kubernetes form optionally followed by
    /// `/container/NAME`; or `targetless`.
    pub path: Option<String>,
    /// Kubernetes namespace of the target (default: the context's namespace).
    pub namespace: Option<String>,
}

/// Which parts of the target's context the local process gets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct FeatureConfig {
    pub network: NetworkConfig,
    /// Files. A string is short for `{ "mode": … }`.
    pub fs: FsConfig,
    /// Environment variables. A boolean is short for `{ "enabled": … }`.
    pub env: EnvConfig,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Traffic arriving at the target. A string is short for `{ "mode": … }`.
    pub incoming: IncomingConfig,
    /// Connections the local process opens.
    pub outgoing: OutgoingConfig,
    /// Name resolution. A boolean is short for `{ "enabled": … }`.
    pub dns: DnsConfig,
}

/// Traffic arriving at the target's ports that the local process listens on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct IncomingConfig {
    /// `mirror` copies the traffic (the target keeps answering), `steal` takes it (the local
    /// process answers), `off` leaves it alone.
    pub mode: IncomingMode,
    /// Steal (or mirror) only the HTTP requests that match; everything else, including kubelet
    /// probes, keeps going to the target's app.
    pub http_filter: HttpFilterConfig,
    /// Pairs `[local, remote]`: the local process listening on `local` gets the traffic of the
    /// target's port `remote`.
    pub port_mapping: Vec<[u16; 2]>,
    /// Only these local ports are subscribed (default: every port the process listens on).
    pub ports: Option<Vec<u16>>,
    /// Local ports never subscribed.
    pub ignore_ports: Vec<u16>,
    /// Keep listeners bound to loopback only (127.0.0.1, ::1) local.
    pub ignore_localhost: bool,
    /// Mirror every ready replica of a workload target (`deploy/`, `statefulset/`,
    /// `replicaset/`), not only the pod tether chose: one agent per pod, their traffic merged
    /// into the local process, following pods as they come and go. Needs `mode: mirror`.
    pub mirror_all_replicas: bool,
}

impl Default for IncomingConfig {
    fn default() -> Self {
        IncomingConfig {
            mode: IncomingMode::Mirror,
            http_filter: HttpFilterConfig::default(),
            port_mapping: Vec::new(),
            ports: None,
            ignore_ports: Vec::new(),
            ignore_localhost: true,
            mirror_all_replicas: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IncomingMode {
    #[default]
    Mirror,
    Steal,
    Off,
}

/// An HTTP request filter. Set one of `header_filter`, `path_filter`, `method_filter`, `all_of`,
/// `any_of`. Regexes use Rust `regex` syntax.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct HttpFilterConfig {
    /// Regex matched against each header as `Name: value`, e.g. `^X-Dev: alice$`.
    pub header_filter: Option<String>,
    /// Regex matched against the path, then against path and query.
    pub path_filter: Option<String>,
    /// Regex matched against the method, e.g. `^(POST|PUT)$`.
    pub method_filter: Option<String>,
    /// A request matches when every filter in the list matches.
    pub all_of: Option<Vec<InnerFilter>>,
    /// A request matches when any filter in the list matches.
    pub any_of: Option<Vec<InnerFilter>>,
    /// Filter only these ports; other stolen ports are stolen whole (default: every port).
    pub ports: Option<Vec<u16>>,
}

impl HttpFilterConfig {
    pub fn is_set(&self) -> bool {
        self.header_filter.is_some()
            || self.path_filter.is_some()
            || self.method_filter.is_some()
            || self.all_of.is_some()
            || self.any_of.is_some()
    }
}

/// One filter inside `all_of` / `any_of`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum InnerFilter {
    /// Regex over `Name: value` of each header.
    Header(String),
    /// Regex over the path (then path and query).
    Path(String),
    /// Regex over the method.
    Method(String),
}

/// Connections the local process opens: through the target's network, or locally.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct OutgoingConfig {
    /// Send TCP connections through the target.
    pub tcp: bool,
    /// Send UDP traffic through the target.
    pub udp: bool,
    /// Keep connections to loopback addresses local.
    pub ignore_localhost: bool,
    /// Which destinations go through the target. Set `remote` or `local`, not both.
    pub filter: TrafficFilterConfig,
}

impl Default for OutgoingConfig {
    fn default() -> Self {
        OutgoingConfig {
            tcp: true,
            udp: true,
            ignore_localhost: true,
            filter: TrafficFilterConfig::default(),
        }
    }
}

/// Destinations as `[tcp://|udp://]host|ip|cidr[:port]`. A string is short for a one-item list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TrafficFilterConfig {
    /// Only these go through the target; everything else stays local.
    pub remote: Option<Vec<String>>,
    /// These stay local; everything else goes through the target.
    pub local: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Resolve names as the target does (its resolv.conf and hosts file).
    pub enabled: bool,
    /// Which names are resolved in the target. Set `remote` or `local`, not both.
    pub filter: TrafficFilterConfig,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: true,
            filter: TrafficFilterConfig::default(),
        }
    }
}

/// Files: which are read (and written) in the target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct FsConfig {
    /// `read` (default): remote reads, local writes; `write`: remote reads and writes; `local`:
    /// everything local; `localwithoverrides`: local except the lists below.
    pub mode: FsMode,
    /// Regexes of paths read and written in the target.
    pub read_write: Vec<String>,
    /// Regexes of paths read in the target, written locally.
    pub read_only: Vec<String>,
    /// Regexes of paths kept local.
    pub local: Vec<String>,
    /// Regexes of paths that do not exist for the process.
    pub not_found: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FsMode {
    Local,
    #[default]
    Read,
    Write,
    LocalWithOverrides,
}

/// Environment variables of the target's process, merged into the local process's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EnvConfig {
    /// Import the target's environment at all.
    pub enabled: bool,
    /// Only these (glob patterns, e.g. `DB_*`); a string is split at `;`. Exclusive with `exclude`.
    pub include: Option<Vec<String>>,
    /// All but these (glob patterns); a string is split at `;`. Exclusive with `include`.
    pub exclude: Option<Vec<String>>,
    /// Values that win over the target's.
    #[serde(rename = "override")]
    pub overrides: BTreeMap<String, String>,
}

impl Default for EnvConfig {
    fn default() -> Self {
        EnvConfig {
            enabled: true,
            include: None,
            exclude: None,
            overrides: BTreeMap::new(),
        }
    }
}

/// How the agent runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Namespace for the agent pod (default: the target's).
    pub namespace: Option<String>,
    /// Agent container image (default: the image matching this tether version).
    pub image: Option<String>,
    /// Kubernetes image pull policy of the agent container.
    pub image_pull_policy: Option<PullPolicy>,
    /// How long the agent waits for a client before exiting, e.g. `30s` (a number means seconds).
    pub ttl: ConfigDuration,
    /// Run the agent as an ephemeral container in the target pod instead of a Job.
    pub ephemeral: bool,
    /// Run the agent container privileged (only when its capabilities are not enough).
    pub privileged: bool,
    /// When a steal starts, close existing connections to the port so their clients reconnect
    /// into the steal. Off by default: it interrupts clients of the target.
    pub flush_connections: bool,
    /// Force the nftables (`true`) or legacy iptables (`false`) backend (default: the backend
    /// where the target's existing rules live, nftables when there are none).
    pub nftables: Option<bool>,
    /// How long to wait for the agent to start, e.g. `60s`.
    pub startup_timeout: ConfigDuration,
    /// The agent's log filter, e.g. `info` or `tether_agent=debug`.
    pub log_level: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            namespace: None,
            image: None,
            image_pull_policy: None,
            ttl: ConfigDuration::from_secs(30),
            ephemeral: false,
            privileged: false,
            flush_connections: false,
            nftables: None,
            startup_timeout: ConfigDuration::from_secs(60),
            log_level: "info".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// Keepalive pings, in both directions, on the link to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct KeepaliveConfig {
    /// Time between pings; keeps middleboxes from closing an idle link.
    pub interval: ConfigDuration,
    /// A link with no frame for this long is declared dead and reconnected.
    pub timeout: ConfigDuration,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        KeepaliveConfig {
            interval: ConfigDuration::from_secs(5),
            timeout: ConfigDuration::from_secs(15),
        }
    }
}

/// Reconnecting with capped exponential backoff and jitter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ReconnectConfig {
    /// Delay before the first retry.
    pub initial: ConfigDuration,
    /// Longest delay between retries.
    pub max_delay: ConfigDuration,
    /// How long the session survives without a link, on both sides.
    pub grace: ConfigDuration,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            initial: ConfigDuration::from_millis(100),
            max_delay: ConfigDuration::from_secs(5),
            grace: ConfigDuration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ResumeConfig {
    /// Bytes kept per session for replay after a reconnect (frames sent and not yet
    /// acknowledged). When it is full, what sends waits for the link; nothing is dropped.
    pub buffer: u64,
}

impl Default for ResumeConfig {
    fn default() -> Self {
        ResumeConfig {
            buffer: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ProbesConfig {
    /// Also steal kubelet probe requests (`User-Agent: kube-probe/…`). Off by default: a stolen
    /// probe answered wrongly gets the pod restarted.
    pub steal: bool,
}

/// How the local process is intercepted (`interception`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Interception {
    /// The preloaded library, or the syscall supervisor for programs the library cannot enter.
    #[default]
    Auto,
    /// Always the preloaded library (`LD_PRELOAD`).
    Preload,
    /// Always the syscall supervisor (seccomp user notification).
    Syscall,
}

impl Interception {
    /// The config's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Interception::Auto => "auto",
            Interception::Preload => "preload",
            Interception::Syscall => "syscall",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnLinkLost {
    /// Keep the process running without remote features.
    #[default]
    Keep,
    /// Stop the process.
    Stop,
}
