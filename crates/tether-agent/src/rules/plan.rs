//! What the redirect rules look like, without running anything: names, nft scripts, iptables
//! argument lists. Pure, so it is unit-tested without root.
//!
//! Both backends redirect a TCP connection to the agent's steal listener when its destination is
//! a local address of the target and a subscribed port, unless the connection carries the agent's
//! own mark ([`AGENT_MARK`]). The `fib daddr type local` / `addrtype LOCAL` match keeps the pod's
//! connections to *other* hosts on the same port untouched.
//!
//! Only a connection's opening SYN is redirected. Conntrack starts in a namespace when the first
//! NAT table appears there; a connection opened before that has no entry, and with
//! `nf_conntrack_tcp_loose` its next packet would be tracked as NEW and redirected mid-stream to a
//! listener that knows nothing of it (a reset). Matching the SYN keeps every open connection with
//! the original app.

use std::{collections::BTreeSet, fmt};

/// `SO_MARK` on the agent's own sockets; rules never redirect marked connections.
pub const AGENT_MARK: u32 = 0x5454_4852; // "TTHR"

/// How long a redirected port stays redirected without a refresh (nft backend): if every agent
/// process dies at once, traffic flows to the original app again after this.
pub const PORT_TIMEOUT_SECS: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A native nftables table; ports held in a set whose elements expire.
    Nft,
    /// `iptables-legacy` chains in the nat table (no expiry: no fail-open layer).
    Legacy,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Nft => "nftables",
            Backend::Legacy => "iptables-legacy",
        })
    }
}

/// A service mesh found in the target: its sidecar owns the nat table and holds the plaintext.
///
/// Under a mesh the client's bytes that reach the pod are the mesh's (mTLS); the plaintext exists
/// only on the sidecar's hop to the app, over `lo`, sent by the sidecar's user. So the steal
/// rules catch that hop in nat OUTPUT (`-o lo`, the sidecar's uid) instead of PREROUTING, and the
/// agent hands requests it leaves to the app from the sidecar's own source address, so the mesh's
/// rules let them through as they let the sidecar's. Under Istio the hop is also told by its
/// source, 127.0.0.6: Envoy's *outbound* connections to the pod itself (a call to its own
/// Service) also leave on `lo` as uid 1337, but carry mTLS and must reach Envoy's inbound side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mesh {
    pub kind: MeshKind,
    /// The sidecar's user, from the mesh's own `--uid-owner N -j RETURN` rule (the mesh's
    /// default when the listing does not show one).
    pub proxy_uid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshKind {
    /// Istio sidecar (REDIRECT mode): Envoy (uid 1337 by default) hands inbound to the app from
    /// 127.0.0.6.
    Istio,
    /// Linkerd: the proxy (uid 2102 by default); proxy-init lets all `lo` traffic through.
    Linkerd,
}

impl Mesh {
    /// Istio with its default sidecar uid.
    pub fn istio() -> Mesh {
        Mesh {
            kind: MeshKind::Istio,
            proxy_uid: 1337,
        }
    }

    /// Linkerd with its default proxy uid.
    pub fn linkerd() -> Mesh {
        Mesh {
            kind: MeshKind::Linkerd,
            proxy_uid: 2102,
        }
    }

    /// The sidecar's user.
    pub fn proxy_uid(self) -> u32 {
        self.proxy_uid
    }

    /// The source address the sidecar hands inbound connections to the app from, when the
    /// mesh's rules let only that through untouched.
    pub fn inbound_source(self) -> Option<std::net::Ipv4Addr> {
        match self.kind {
            MeshKind::Istio => Some(std::net::Ipv4Addr::new(127, 0, 0, 6)),
            MeshKind::Linkerd => None,
        }
    }
}

impl fmt::Display for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.kind {
            MeshKind::Istio => "Istio",
            MeshKind::Linkerd => "Linkerd",
        };
        write!(f, "{name} (sidecar uid {})", self.proxy_uid)
    }
}

/// The mesh whose chains appear in a listing: `iptables-save` (`:ISTIO_OUTPUT - [0:0]`, `-j
/// ISTIO_OUTPUT`) or `nft list ruleset` (`chain ISTIO_OUTPUT {`, for rules made by iptables-nft).
pub fn detect_mesh(listing: &str) -> Option<Mesh> {
    let words = || {
        listing
            .split_whitespace()
            .map(|w| w.trim_start_matches(':'))
    };
    let (mut mesh, chain) =
        if words().any(|w| matches!(w, "ISTIO_INBOUND" | "ISTIO_OUTPUT" | "ISTIO_IN_REDIRECT")) {
            (Mesh::istio(), "ISTIO_OUTPUT")
        } else if words().any(|w| matches!(w, "PROXY_INIT_REDIRECT" | "PROXY_INIT_OUTPUT")) {
            (Mesh::linkerd(), "PROXY_INIT_OUTPUT")
        } else {
            return None;
        };
    // The sidecar's own exemption: `-A ISTIO_OUTPUT -m owner --uid-owner N -j RETURN`.
    let uid = listing
        .lines()
        .filter(|line| line.starts_with(&format!("-A {chain} ")) && line.ends_with("-j RETURN"))
        .find_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "--uid-owner")?;
            (words[at - 1] != "!").then(|| words.get(at + 1)?.parse().ok())?
        });
    if let Some(uid) = uid {
        mesh.proxy_uid = uid;
    }
    Some(mesh)
}

/// A process's pid in its own (innermost) PID namespace, from `/proc/PID/status` (`NSpid:` lists
/// it in every namespace from this one inwards).
pub fn innermost_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// Identifies an agent instance: its guard's pid and start time (clock ticks after boot, from
/// `/proc/PID/stat`), both in hex. Together they never repeat while the machine is up, so a sweep
/// can tell a dead owner from a live one even after pid reuse.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub pid: u32,
    pub start_time: u64,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}_{:x}", self.pid, self.start_time)
    }
}

impl std::str::FromStr for Owner {
    type Err = ();

    fn from_str(text: &str) -> Result<Owner, ()> {
        let (pid, start) = text.split_once('_').ok_or(())?;
        Ok(Owner {
            pid: u32::from_str_radix(pid, 16).map_err(drop)?,
            start_time: u64::from_str_radix(start, 16).map_err(drop)?,
        })
    }
}

/// The rules of one session in one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRules {
    pub backend: Backend,
    pub owner: Owner,
    /// A short form of the session id (hex).
    pub session: String,
    /// The steal listener's port in the target.
    pub listen_port: u16,
    /// The mesh in the target, if any: the rules then catch its sidecar's hop to the app.
    pub mesh: Option<Mesh>,
}

const NFT_PREFIX: &str = "tether_";
const LEGACY_PREFIX: &str = "TTH_";

impl SessionRules {
    /// The nft table or iptables chain holding this session's rules. iptables chain names are
    /// limited to 28 characters: `TTH_` + owner (≤ 15) + `_` + 6 = at most 26.
    pub fn name(&self) -> String {
        match self.backend {
            Backend::Nft => format!("{NFT_PREFIX}{}_{}", self.owner, self.session),
            Backend::Legacy => {
                let short: String = self.session.chars().take(6).collect();
                format!("{LEGACY_PREFIX}{}_{short}", self.owner)
            }
        }
    }

    /// nft: the table with an empty port set. Legacy: the chain and the jumps to it. Without a
    /// mesh, connections are caught where they enter (prerouting) and where local clients open
    /// them (output); under a mesh, only on the sidecar's hop to the app (output, `lo`, its uid).
    pub fn setup(&self) -> Plan {
        let name = self.name();
        match self.backend {
            Backend::Nft => {
                let redirect = format!(
                    "fib daddr type local tcp dport @ports tcp flags & (syn | ack) == syn redirect to :{}",
                    self.listen_port
                );
                let mark = format!("meta mark != {AGENT_MARK:#x}");
                let (prerouting, output) = match self.mesh {
                    None => (Some(redirect.clone()), format!("{mark} {redirect}")),
                    Some(mesh) => (
                        None,
                        format!(
                            "{mark} oifname \"lo\" meta skuid {}{} {redirect}",
                            mesh.proxy_uid(),
                            mesh.inbound_source()
                                .map(|s| format!(" ip saddr {s}"))
                                .unwrap_or_default()
                        ),
                    ),
                };
                // Declared over a flushed table: applying it twice leaves one copy of each rule
                // (the port set and its elements stay).
                let mut script = format!(
                    "add table ip {name}\nflush table ip {name}\ntable ip {name} {{\n\x20 set ports {{ type inet_service; flags timeout; }}\n"
                );
                if let Some(rule) = prerouting {
                    script.push_str(&format!(
                        "\x20 chain prerouting {{\n\x20   type nat hook prerouting priority -101; policy accept;\n\x20   {rule}\n\x20 }}\n"
                    ));
                }
                script.push_str(&format!(
                    "\x20 chain output {{\n\x20   type nat hook output priority -101; policy accept;\n\x20   {output}\n\x20 }}\n}}\n"
                ));
                Plan::Nft(script)
            }
            Backend::Legacy => {
                let mut commands = vec![args(&["-t", "nat", "-N", &name])];
                match self.mesh {
                    None => {
                        commands.push(args(&["-t", "nat", "-I", "PREROUTING", "1", "-j", &name]));
                        commands.push(args(&["-t", "nat", "-I", "OUTPUT", "1", "-j", &name]));
                    }
                    Some(mesh) => {
                        let uid = mesh.proxy_uid().to_string();
                        let mut jump = args(&["-t", "nat", "-I", "OUTPUT", "1"]);
                        if let Some(source) = mesh.inbound_source() {
                            jump.extend(args(&["-s", &format!("{source}/32")]));
                        }
                        jump.extend(args(&[
                            "-o",
                            "lo",
                            "-m",
                            "owner",
                            "--uid-owner",
                            &uid,
                            "-j",
                            &name,
                        ]));
                        commands.push(jump);
                    }
                }
                Plan::Iptables(commands)
            }
        }
    }

    /// Starts redirecting `port`.
    pub fn add_port(&self, port: u16) -> Plan {
        match self.backend {
            Backend::Nft => Plan::Nft(format!(
                "add element ip {} ports {{ {port} timeout {PORT_TIMEOUT_SECS}s }}\n",
                self.name()
            )),
            Backend::Legacy => Plan::Iptables(vec![self.legacy_port_rule("-A", port)]),
        }
    }

    /// Stops redirecting `port` (for new connections; redirected ones keep going).
    pub fn remove_port(&self, port: u16) -> Plan {
        match self.backend {
            Backend::Nft => Plan::Nft(format!(
                "delete element ip {} ports {{ {port} }}\n",
                self.name()
            )),
            Backend::Legacy => Plan::Iptables(vec![self.legacy_port_rule("-D", port)]),
        }
    }

    /// nft only: restarts the timeout of every port, in one atomic transaction (re-adding an
    /// element does not restart its timeout; deleting and adding it in one batch does).
    pub fn refresh(&self, ports: &BTreeSet<u16>) -> Option<Plan> {
        if self.backend != Backend::Nft || ports.is_empty() {
            return None;
        }
        let list = |timeout: bool| {
            ports
                .iter()
                .map(|p| {
                    if timeout {
                        format!("{p} timeout {PORT_TIMEOUT_SECS}s")
                    } else {
                        p.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let name = self.name();
        Some(Plan::Nft(format!(
            "delete element ip {name} ports {{ {} }}\nadd element ip {name} ports {{ {} }}\n",
            list(false),
            list(true)
        )))
    }

    /// Removes everything [`setup`](Self::setup) and [`add_port`](Self::add_port) added.
    pub fn teardown(&self) -> Plan {
        teardown(self.backend, &self.name())
    }

    fn legacy_port_rule(&self, action: &str, port: u16) -> Vec<String> {
        args(&[
            "-t",
            "nat",
            action,
            &self.name(),
            "-p",
            "tcp",
            "--syn",
            "--dport",
            &port.to_string(),
            "-m",
            "addrtype",
            "--dst-type",
            "LOCAL",
            "-m",
            "mark",
            "!",
            "--mark",
            &format!("{AGENT_MARK:#x}"),
            "-j",
            "REDIRECT",
            "--to-ports",
            &self.listen_port.to_string(),
        ])
    }
}

/// Commands for one backend: an nft script (run as one transaction) or iptables argument lists.
///
/// Both are idempotent when applied: the nft setup flushes the session's table before declaring
/// its rules, and an iptables `-N`/`-I`/`-A` is skipped when the chain or rule exists already, so
/// setting a session up twice adds nothing twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Nft(String),
    Iptables(Vec<Vec<String>>),
    /// Remove a legacy chain: every jump to it (as listed), then the chain.
    LegacyRemoveChain(String),
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn teardown(backend: Backend, name: &str) -> Plan {
    match backend {
        Backend::Nft => Plan::Nft(format!("delete table ip {name}\n")),
        Backend::Legacy => Plan::LegacyRemoveChain(name.to_owned()),
    }
}

/// The `-D` commands that remove every jump to `chain` found in an `iptables-save -t nat`
/// listing, whatever its matches (the jumps differ with and without a mesh).
pub fn legacy_jump_removals(listing: &str, chain: &str) -> Vec<Vec<String>> {
    listing
        .lines()
        .filter_map(|line| line.strip_prefix("-A "))
        .filter(|rule| {
            rule.split_whitespace()
                .collect::<Vec<_>>()
                .ends_with(&["-j", chain])
        })
        .map(|rule| {
            let mut command = args(&["-t", "nat", "-D"]);
            command.extend(rule.split_whitespace().map(str::to_owned));
            command
        })
        .collect()
}

/// A table or chain some agent left in the target, found in a ruleset listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub backend: Backend,
    pub name: String,
    pub owner: Owner,
}

impl Leftover {
    pub fn teardown(&self) -> Plan {
        teardown(self.backend, &self.name)
    }
}

/// Tether tables in `nft list tables` output.
pub fn nft_leftovers(listing: &str) -> Vec<Leftover> {
    listing
        .lines()
        .filter_map(|line| line.trim().strip_prefix("table ip "))
        .filter_map(|name| {
            let rest = name.strip_prefix(NFT_PREFIX)?;
            let (owner, _session) = rest.rsplit_once('_')?;
            Some(Leftover {
                backend: Backend::Nft,
                name: name.to_owned(),
                owner: owner.parse().ok()?,
            })
        })
        .collect()
}

/// Tether chains in `iptables-legacy-save -t nat` output.
pub fn legacy_leftovers(listing: &str) -> Vec<Leftover> {
    listing
        .lines()
        .filter_map(|line| line.strip_prefix(':'))
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| {
            let rest = name.strip_prefix(LEGACY_PREFIX)?;
            let (owner, _session) = rest.rsplit_once('_')?;
            Some(Leftover {
                backend: Backend::Legacy,
                name: name.to_owned(),
                owner: owner.parse().ok()?,
            })
        })
        .collect()
}

/// True when `iptables-legacy-save` output holds any rule: the target's rules live there, so
/// tether's must too.
pub fn legacy_has_rules(listing: &str) -> bool {
    listing.lines().any(|line| line.starts_with("-A "))
}

#[cfg(test)]
mod tests;
