//! The command line: every subcommand, flag and help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const ABOUT: &str = "Run a local process as if it lived inside a pod: its incoming traffic mirrored \
or stolen, its outgoing connections, DNS, files and environment taken from the target.";

const EXAMPLES: &str = "\
Examples:
  tether demo                                  see it work on a local demo target (needs root)
  tether exec --target deploy/api -- cargo run  run your app inside deploy/api's context
  tether exec -t netns/staging --steal -- python3 -m http.server 80
  tether config check                          validate .tether/config.{json,yaml,toml}
  tether config schema > tether.schema.json    JSON Schema for editor completion

Configuration comes from a file (-f FILE, default .tether/config.json|yaml|toml), then
TETHER_* environment variables (TETHER_FEATURE__NETWORK__INCOMING__MODE=steal), then flags.";

#[derive(Debug, Parser)]
#[command(name = "tether", version, about = ABOUT, after_help = EXAMPLES, propagate_version = true)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub(crate) struct GlobalArgs {
    /// Config file (JSON, YAML or TOML, by extension). Default: .tether/config.{json,yaml,toml}.
    #[arg(
        short = 'f',
        long = "config",
        global = true,
        value_name = "FILE",
        env = "TETHER_CONFIG"
    )]
    pub config: Option<PathBuf>,
    /// More log output (-v: info, -vv: debug, -vvv: trace). RUST_LOG overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Output for people (text) or for programs (json: one object per line). For
    /// `agent-image`: the tarball to write.
    #[arg(long, global = true, value_name = "text|json", default_value = "text", value_parser = parse_output)]
    pub output: Output,
}

/// `--output`: a format, or (only for `agent-image`) a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Output {
    Format(OutputFormat),
    File(PathBuf),
}

fn parse_output(value: &str) -> Result<Output, String> {
    Ok(match value {
        "text" => Output::Format(OutputFormat::Text),
        "json" => Output::Format(OutputFormat::Json),
        "" => return Err("give text or json (or, for agent-image, a file)".into()),
        path => Output::File(PathBuf::from(path)),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a command with the target's traffic, network, files and environment.
    #[command(after_help = "\
Examples:
  tether exec --target deploy/api -n shop -- npm start
  tether exec -t netns/demo --steal -- python3 -m http.server 8080
  tether exec -t pid/4242 -- python3 app.py      # a process on this host: its network, files, env
  tether exec -f .tether/alice.json -- cargo run

What the command gets from the target (each part configurable under `feature`):
  incoming   its listening ports mirror (default) or steal the target's traffic
  outgoing   connections and UDP to non-loopback addresses leave from the target
  dns        names resolve with the target's resolv.conf and hosts
  env        the target process's variables (not PATH, HOME, LD_*, …) are merged in
  fs         files are read in the target (writes stay local; `fs.mode: write` sends them too),
             except the machine's own: /usr, /lib, /proc, /tmp, $HOME, the working directory, …

tether's exit code is the command's exit code; Ctrl-C stops the command and cleans up.")]
    Exec(ExecArgs),
    /// Try tether on a local demo target: no cluster needed (needs root for network namespaces).
    Demo,
    /// Check that this machine (and, with a cluster, your permissions) can run tether.
    #[command(after_help = "\
Without a subcommand: the programs local targets need, then, when a cluster is configured
(kubeconfig, --context, or inside a pod), every permission tether uses in the namespace, each
asked of the API server (SelfSubjectAccessReview). A missing one is named with what needs it;
deploy/rbac.yaml grants them all.

Exit code: 0 when everything checked is there, 1 otherwise.

Examples:
  tether doctor -n shop
  tether doctor --context staging -n shop
  tether doctor latency")]
    Doctor {
        #[command(subcommand)]
        check: Option<DoctorCheck>,
        /// Namespace to check permissions in (default: target.namespace, then the context's).
        #[arg(short, long, value_name = "NAMESPACE")]
        namespace: Option<String>,
        /// kubeconfig context. Overrides `kube_context`.
        #[arg(long, value_name = "CONTEXT")]
        context: Option<String>,
    },
    /// List what --target can name in a Kubernetes namespace: workloads and pods, with readiness.
    #[command(after_help = "\
Examples:
  tether ls -n shop
  tether ls --context staging -n shop --output json   # one object per line

tether's own agent pods are not listed.")]
    Ls {
        /// The namespace (default: target.namespace, then the context's).
        #[arg(short, long, value_name = "NAMESPACE")]
        namespace: Option<String>,
        /// kubeconfig context. Overrides `kube_context`.
        #[arg(long, value_name = "CONTEXT")]
        context: Option<String>,
    },
    /// Show the running sessions: target, link state, round trip, reconnects, buffered bytes.
    #[command(after_help = "\
Every `tether exec` on this machine answers (through a socket in $XDG_RUNTIME_DIR/tether, or
/run/tether for root). With --output json: one object per session.

Example:
  sudo tether status")]
    Status,
    /// Remove redirect rules left in a local target by tether agents that no longer run.
    #[command(after_help = "\
Agents remove their own rules when they stop, even when killed (their guard process does it), and
with nftables the redirects expire 3 s after every agent process is gone. This command is the
third layer: it removes leftover tables and chains by hand. Rules of running agents are kept.

Example:
  sudo tether cleanup --target netns/staging")]
    Cleanup {
        /// The local target: netns/NAME or pid/PID.
        #[arg(short, long, value_name = "TARGET")]
        target: String,
    },
    /// Validate the configuration or print its JSON Schema.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Build the agent image: push it to a registry, or write it as a tarball.
    #[command(
        name = "agent-image",
        after_help = "\
The image holds the agent, the programs it runs (iptables in both backends with their extensions,
nft, nsenter, ss, conntrack) and their libraries, taken from this machine. It is built without a
container engine.

Push it to any OCI registry your cluster pulls from (credentials as docker and podman keep them:
~/.docker/config.json, credential helpers, podman's auth.json; a registry on localhost or
127.0.0.1 is spoken to in plain HTTP):
  tether agent-image --push registry.example.com/team/tether-agent:0.1.0
Then set agent.image to the reference it printed.

Or write a tarball for clusters without a registry (both an OCI image layout and a docker-archive):
  tether agent-image --output agent.tar
  sudo ctr -n k8s.io images import agent.tar      # on each node (containerd)
  docker load -i agent.tar                         # Docker; `kind load image-archive agent.tar`
Then set agent.image to the name it printed and agent.image_pull_policy: IfNotPresent."
    )]
    AgentImage {
        /// The agent binary. Default: the static build of this workspace if there is one
        /// (RUSTFLAGS='-C target-feature=+crt-static' cargo build --release
        /// --target x86_64-unknown-linux-gnu -p tether-agent), which depends on no library of
        /// this machine; else the tether-agent next to this tether, packed with its libraries.
        #[arg(long, value_name = "PATH")]
        agent: Option<PathBuf>,
        /// The image's name in the tarball (with --output).
        #[arg(long, value_name = "NAME:TAG", default_value = tether_kube::manifest::DEFAULT_IMAGE)]
        name: String,
        /// Push the image to a registry under this reference.
        #[arg(long, value_name = "REGISTRY/REPOSITORY:TAG")]
        push: Option<String>,
        /// Speak plain HTTP to the registry (only for a registry you trust on your own network;
        /// loopback registries need no flag).
        #[arg(long, requires = "push")]
        plain_http: bool,
    },
    /// Run the agent (started by tether itself, or by the agent pod).
    #[command(hide = true)]
    Agent(tether_agent::AgentArgs),
    /// A small built-in HTTP service (the demo's apps): answers `NAME PORT METHOD PATH`.
    #[command(hide = true)]
    ServeHttp {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "0.0.0.0")]
        bind: std::net::IpAddr,
        /// Keep the number of requests served in this file (rewritten every 100 ms), for
        /// benchmarks.
        #[arg(long)]
        count_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum DoctorCheck {
    /// Measure the round trip to the agent over a running session (pings on its link).
    Latency {
        /// The session's tether pid (see `tether status`); needed when several run.
        #[arg(long)]
        pid: Option<u32>,
        /// How many pings, one after the other.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        count: u32,
    },
}

#[derive(Debug, Args)]
pub(crate) struct TargetArgs {
    /// What to run against: deploy/NAME, pod/NAME, statefulset/NAME, job/NAME, netns/NAME, pid/PID,
    /// or targetless. Overrides `target.path`.
    #[arg(short, long, value_name = "TARGET")]
    pub target: Option<String>,
    /// Kubernetes namespace of the target. Overrides `target.namespace`.
    #[arg(short, long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// kubeconfig context. Overrides `kube_context`.
    #[arg(long, value_name = "CONTEXT")]
    pub context: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Steal incoming traffic instead of mirroring it (same as feature.network.incoming.mode=steal).
    #[arg(long)]
    pub steal: bool,
    /// How the command is intercepted: `auto` preloads tether's library into ordinary programs
    /// and supervises the system calls of those it cannot enter (Go programs, static
    /// executables); `preload` and `syscall` force one way (config: interception).
    #[arg(long, value_name = "HOW", value_parser = ["auto", "preload", "syscall"])]
    pub interception: Option<String>,
    /// Use an agent that is already running (`tether agent --listen ADDR --token-file FILE`)
    /// instead of starting one. The target still says what kind of target it serves.
    #[arg(
        long,
        value_name = "ADDR",
        requires = "agent_token_file",
        help_heading = "Advanced"
    )]
    pub agent_addr: Option<std::net::SocketAddr>,
    /// The session token of the agent given with --agent-addr.
    #[arg(
        long,
        value_name = "FILE",
        requires = "agent_addr",
        help_heading = "Advanced"
    )]
    pub agent_token_file: Option<PathBuf>,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Check a config file (and TETHER_* variables): every problem, with line and column.
    #[command(after_help = "\
Exit code: 0 when the configuration is valid, 1 when it has problems.
With --output json: {\"valid\": …, \"file\": …, \"problems\": [{\"key\", \"message\", \"help\", \"line\", \"column\", …}]}")]
    Check {
        /// The file to check (default: -f, then .tether/config.{json,yaml,toml}).
        file: Option<PathBuf>,
    },
    /// Print the configuration's JSON Schema (for editor completion and validation).
    #[command(after_help = "\
VS Code: save it, then add to .vscode/settings.json:
  \"json.schemas\": [{ \"fileMatch\": [\".tether/config.json\"], \"url\": \"./tether.schema.json\" }]")]
    Schema,
}
