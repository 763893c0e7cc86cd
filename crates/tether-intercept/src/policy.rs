//! What stays local and what goes to the target: files by path, outgoing traffic by destination,
//! names by name. Safe code, unit-tested without preloading.
//!
//! Files (`feature.fs`), first match wins:
//! 1. `not_found` → the file does not exist for the process;
//! 2. `local` → local; `read_write` → target; `read_only` → target for reading, local for writing;
//! 3. the local defaults (the machine's own runtime: `/proc`, `/sys`, `/dev`, `/usr`, `/lib*`,
//!    `/bin`, `/sbin`, `/opt`, `/nix`, `/snap`, temp dirs, `$HOME`, the working directory, the
//!    executable's directory, and the machine files of `/etc` such as TLS roots, `passwd` and
//!    `nsswitch.conf`; `/etc/hosts` and `/etc/resolv.conf` too when names are not resolved in
//!    the target) → local;
//! 4. the mode: `read` → target for reading, local for writing; `write` → target;
//!    `local`/`localwithoverrides` → local.
//!
//! Relative paths stay local (they name the local working directory).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Component, Path, PathBuf},
};

use regex::RegexSet;

use crate::channel::{self, PolicySpec, Transport};

/// Where one file operation goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsRoute {
    Local,
    Remote,
    /// The file does not exist for the process (ENOENT).
    NotFound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Local,
    Read,
    Write,
}

/// Machine files under `/etc` that describe the local machine, not the target.
const LOCAL_ETC: &[&str] = &[
    "alternatives",
    "ca-certificates",
    "crypto-policies",
    "default",
    "fonts",
    "gai.conf",
    "group",
    "host.conf",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "locale.conf",
    "locale.gen",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "passwd",
    "pki",
    "protocols",
    "services",
    "shadow",
    "ssl",
    "terminfo",
    "timezone",
    "zoneinfo",
    "debian_version",
    "lsb-release",
    "python3",
    "gitconfig",
    "npmrc",
    "pip.conf",
    "selinux",
    "environment",
    "profile",
];

/// Top-level directories that are the local machine's own runtime.
const LOCAL_TOP: &[&str] = &[
    "proc", "sys", "dev", "usr", "lib", "lib32", "lib64", "libx32", "bin", "sbin", "opt", "nix",
    "snap", "tmp", "boot",
];

#[derive(Debug)]
pub struct Policy {
    fs_mode: Mode,
    not_found: RegexSet,
    local: RegexSet,
    read_write: RegexSet,
    read_only: RegexSet,
    /// Directories whose contents stay local (home, working directory, executable's).
    local_dirs: Vec<PathBuf>,
    outgoing_tcp: bool,
    outgoing_udp: bool,
    ignore_localhost: bool,
    outgoing: Option<(Vec<Entry>, bool)>,
    dns_enabled: bool,
    dns: Option<(Vec<Entry>, bool)>,
}

/// The process's own places, which stay local.
#[derive(Debug, Default, Clone)]
pub struct LocalPlaces {
    pub home: Option<PathBuf>,
    pub cwd: Option<PathBuf>,
    pub exe: Option<PathBuf>,
    pub tmpdir: Option<PathBuf>,
}

impl LocalPlaces {
    /// This process's.
    pub fn current() -> LocalPlaces {
        LocalPlaces {
            home: std::env::var_os("HOME").map(PathBuf::from),
            cwd: std::env::current_dir().ok(),
            exe: std::env::current_exe().ok(),
            tmpdir: std::env::var_os("TMPDIR").map(PathBuf::from),
        }
    }
}

impl Policy {
    /// Compiles the proxy's spec. Invalid regexes were refused when the config was loaded; one
    /// that still fails here matches nothing.
    pub fn new(spec: &PolicySpec, places: &LocalPlaces) -> Policy {
        let set =
            |patterns: &[String]| RegexSet::new(patterns).unwrap_or_else(|_| RegexSet::empty());
        let mut local_dirs = Vec::new();
        local_dirs.extend(places.home.iter().filter(|h| h.as_os_str() != "/").cloned());
        local_dirs.extend(places.cwd.iter().filter(|c| c.as_os_str() != "/").cloned());
        local_dirs.extend(places.tmpdir.iter().cloned());
        if let Some(dir) = places.exe.as_deref().and_then(Path::parent) {
            // An install prefix (`…/bin/prog` → `…`) holds the runtime's libraries.
            let prefix = if dir.ends_with("bin") {
                dir.parent().unwrap_or(dir)
            } else {
                dir
            };
            if prefix.as_os_str() != "/" {
                local_dirs.push(prefix.to_path_buf());
            }
        }
        let filter =
            |remote: &Option<Vec<String>>, local: &Option<Vec<String>>| match (remote, local) {
                (Some(list), _) => {
                    Some((list.iter().filter_map(|e| Entry::parse(e)).collect(), true))
                }
                (None, Some(list)) => {
                    Some((list.iter().filter_map(|e| Entry::parse(e)).collect(), false))
                }
                (None, None) => None,
            };
        Policy {
            fs_mode: match spec.fs_mode {
                channel::FsMode::Write => Mode::Write,
                channel::FsMode::Local | channel::FsMode::LocalWithOverrides => Mode::Local,
                channel::FsMode::Read => Mode::Read,
            },
            not_found: set(&spec.fs_not_found),
            local: set(&spec.fs_local),
            read_write: set(&spec.fs_read_write),
            read_only: set(&spec.fs_read_only),
            local_dirs,
            outgoing_tcp: spec.outgoing_tcp,
            outgoing_udp: spec.outgoing_udp,
            ignore_localhost: spec.outgoing_ignore_localhost,
            outgoing: filter(&spec.outgoing_remote, &spec.outgoing_local),
            dns_enabled: spec.dns_enabled,
            dns: filter(&spec.dns_remote, &spec.dns_local),
        }
    }

    /// Where an operation on `path` goes; `write` for opens that may write and for changes.
    pub fn file(&self, path: &Path, write: bool) -> FsRoute {
        if !path.is_absolute() {
            return FsRoute::Local;
        }
        // The common case, a plain path (no `.`, `..` or `//`), is matched as it is, without
        // allocating: this runs on every `open` of the process.
        let bytes = path.as_os_str().as_encoded_bytes();
        let plain = !bytes.windows(2).any(|w| w == b"//")
            && !bytes.split(|b| *b == b'/').any(|c| c == b"." || c == b"..");
        let normalized;
        let path = if plain {
            path
        } else {
            normalized = normalize(path);
            normalized.as_path()
        };
        let lists = [
            &self.not_found,
            &self.local,
            &self.read_write,
            &self.read_only,
        ];
        if lists.iter().any(|set| !set.is_empty()) {
            let text = path.to_string_lossy();
            // (An empty set is skipped: matching one still takes a regex cache from a pool.)
            let hit = |set: &RegexSet| !set.is_empty() && set.is_match(&text);
            if hit(&self.not_found) {
                return FsRoute::NotFound;
            }
            if hit(&self.local) {
                return FsRoute::Local;
            }
            if hit(&self.read_write) {
                return FsRoute::Remote;
            }
            if hit(&self.read_only) {
                return if write {
                    FsRoute::Local
                } else {
                    FsRoute::Remote
                };
            }
        }
        if self.is_local_default(path) {
            return FsRoute::Local;
        }
        // A program that resolves names itself reads these: they are the target's only when
        // names are.
        if !self.dns_enabled
            && (path == Path::new("/etc/hosts") || path == Path::new("/etc/resolv.conf"))
        {
            return FsRoute::Local;
        }
        match (self.fs_mode, write) {
            (Mode::Write, _) | (Mode::Read, false) => FsRoute::Remote,
            _ => FsRoute::Local,
        }
    }

    /// `path` is absolute and plain (no `.`, `..`, `//`).
    fn is_local_default(&self, path: &Path) -> bool {
        let bytes = path.as_os_str().as_encoded_bytes();
        let rest = bytes.strip_prefix(b"/").unwrap_or(bytes);
        if rest.is_empty() {
            return true; // `/` itself
        }
        let (top, after) = match rest.iter().position(|b| *b == b'/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &b""[..]),
        };
        fn first(name: &[u8]) -> &[u8] {
            name.split(|b| *b == b'/').next().unwrap_or_default()
        }
        let is_local = match top {
            b"etc" => {
                let name = first(after);
                LOCAL_ETC.iter().any(|local| {
                    let local = local.as_bytes();
                    name == local
                        || (name.starts_with(local) && name.get(local.len()) == Some(&b'.'))
                })
            }
            b"var" => first(after) == b"tmp",
            b"run" => first(after) == b"user",
            top => LOCAL_TOP.iter().any(|t| t.as_bytes() == top),
        };
        is_local || self.local_dirs.iter().any(|dir| path.starts_with(dir))
    }

    /// False when no connection to `addr` can go through the target (loopback kept local, the
    /// unspecified address): a check that needs nothing but the address.
    pub fn may_go_remote(&self, addr: SocketAddr) -> bool {
        (self.outgoing_tcp || self.outgoing_udp)
            && !addr.ip().is_unspecified()
            && !(self.ignore_localhost && is_loopback(addr.ip()))
    }

    /// Whether a connection to `addr` goes through the target. `hostname`: the name it was
    /// resolved from, if known; `remote_name`: that name was resolved in the target.
    pub fn outgoing(
        &self,
        transport: Transport,
        addr: SocketAddr,
        hostname: Option<&str>,
        remote_name: bool,
    ) -> bool {
        let enabled = match transport {
            Transport::Tcp => self.outgoing_tcp,
            Transport::Udp => self.outgoing_udp,
        };
        if !enabled || addr.ip().is_unspecified() {
            return false;
        }
        if self.ignore_localhost && is_loopback(addr.ip()) {
            return false;
        }
        let Some((entries, remote_list)) = &self.outgoing else {
            return true;
        };
        let by_name = |e: &Entry| e.matches_name(transport, addr.port(), hostname);
        let by_ip = |e: &Entry| e.matches_ip(transport, addr);
        if *remote_list {
            remote_name || entries.iter().any(|e| by_name(e) || by_ip(e))
        } else if entries.iter().any(by_name) {
            false
        } else {
            // Names resolved in the target connect through it even when the address matches.
            remote_name || !entries.iter().any(by_ip)
        }
    }

    /// Whether a connection to `addr` goes through the target, for an interceptor that sees
    /// addresses only (a program with its own resolver, such as Go's): traffic to port 53 is a
    /// name lookup and follows `dns`; the rest follows the outgoing settings without a name.
    pub fn outgoing_by_address(&self, transport: Transport, addr: SocketAddr) -> bool {
        if addr.port() == 53 && self.dns_enabled && !addr.ip().is_unspecified() {
            return !(self.ignore_localhost && is_loopback(addr.ip()));
        }
        self.outgoing(transport, addr, None, false)
    }

    /// Whether the target's name files (`/etc/hosts`, `/etc/resolv.conf`) are the ones a program
    /// with its own resolver reads: when names are resolved in the target.
    pub fn names_from_target(&self) -> bool {
        self.dns_enabled
    }

    /// Whether outgoing filters name hosts (which an address-only interceptor cannot apply).
    pub fn filters_by_name(&self) -> bool {
        [&self.outgoing, &self.dns]
            .into_iter()
            .flatten()
            .any(|(entries, _)| entries.iter().any(|e| matches!(e.host, Host::Name(_))))
    }

    /// Whether `name` is resolved in the target.
    pub fn dns(&self, name: &str) -> bool {
        if !self.dns_enabled
            || name.parse::<IpAddr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || name.to_ascii_lowercase().ends_with(".localhost")
        {
            return false;
        }
        match &self.dns {
            None => true,
            Some((entries, remote_list)) => {
                let hit = entries
                    .iter()
                    .any(|e| e.matches_name(Transport::Udp, 0, Some(name)));
                hit == *remote_list
            }
        }
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// `path` with `.` and `..` folded lexically (for matching only; the agent resolves for real).
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// One filter entry: `[tcp://|udp://]host|ip|cidr[:port]`.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    transport: Option<Transport>,
    host: Host,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq)]
enum Host {
    Net(ipnet::IpNet),
    Name(String),
    Any,
}

impl Entry {
    fn parse(text: &str) -> Option<Entry> {
        let (transport, rest) = match text.split_once("://") {
            Some(("tcp", rest)) => (Some(Transport::Tcp), rest),
            Some(("udp", rest)) => (Some(Transport::Udp), rest),
            Some(_) => return None,
            None => (None, text),
        };
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']')?;
            (host, after.strip_prefix(':'))
        } else if rest.matches(':').count() == 1 {
            let (host, port) = rest.split_once(':')?;
            (host, Some(port))
        } else {
            (rest, None)
        };
        let port = match port {
            Some(port) => Some(port.parse().ok()?),
            None => None,
        };
        let host = if host.is_empty() || host == "*" {
            Host::Any
        } else if let Ok(net) = host.parse::<ipnet::IpNet>() {
            Host::Net(net)
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            Host::Net(ipnet::IpNet::from(ip))
        } else {
            Host::Name(host.to_ascii_lowercase())
        };
        Some(Entry {
            transport,
            host,
            port,
        })
    }

    fn transport_and_port(&self, transport: Transport, port: u16) -> bool {
        self.transport.is_none_or(|t| t == transport)
            && self.port.is_none_or(|p| p == port || port == 0)
    }

    fn matches_ip(&self, transport: Transport, addr: SocketAddr) -> bool {
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.transport_and_port(transport, addr.port())
            && match &self.host {
                Host::Net(net) => net.contains(&ip),
                Host::Any => true,
                Host::Name(_) => false,
            }
    }

    fn matches_name(&self, transport: Transport, port: u16, name: Option<&str>) -> bool {
        let (Host::Name(host), Some(name)) = (&self.host, name) else {
            return false;
        };
        self.transport_and_port(transport, port)
            && name.trim_end_matches('.').eq_ignore_ascii_case(host)
    }
}

/// Addresses the process got from `getaddrinfo`, with their names (bounded).
#[derive(Debug, Default)]
pub struct Names {
    by_ip: HashMap<IpAddr, (String, bool)>,
}

impl Names {
    const MAX: usize = 4096;

    pub fn remember(&mut self, ip: IpAddr, name: &str, remote: bool) {
        if self.by_ip.len() >= Self::MAX {
            self.by_ip.clear();
        }
        self.by_ip.insert(ip, (name.to_owned(), remote));
    }

    /// The name `ip` came from and whether it was resolved in the target.
    pub fn get(&self, ip: IpAddr) -> Option<(&str, bool)> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.by_ip.get(&ip).map(|(n, r)| (n.as_str(), *r))
    }
}

#[cfg(test)]
mod tests;
