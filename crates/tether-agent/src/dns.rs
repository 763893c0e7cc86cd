//! Names resolved as the target resolves them: its `/etc/resolv.conf` and `/etc/hosts` (read
//! under the target's root), queries sent from its network namespace, by hickory-resolver.
//!
//! The resolver lives on one thread that entered the target's namespace, with its own
//! single-threaded runtime: every socket hickory opens is created on that thread, so in the
//! target's namespace (`setns` moves one thread only; see `netns`).

use std::{net::IpAddr, sync::Arc, time::Duration};

use hickory_resolver::{
    Hosts, TokioResolver,
    config::{ResolveHosts, ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
};
use tether_protocol::{AddressFamily, DnsAnswer, ErrorCode, ErrorInfo};
use tokio::sync::{mpsc, oneshot};

use crate::{fs::Root, netns::Netns};

type Reply = oneshot::Sender<Result<DnsAnswer, ErrorInfo>>;

/// What the resolver thread is asked.
#[derive(Debug)]
enum Query {
    /// A name's addresses.
    Forward { name: String, family: AddressFamily },
    /// An address's name.
    Reverse(IpAddr),
}

/// A handle to the resolver thread.
#[derive(Debug, Clone)]
pub(crate) struct Dns {
    requests: mpsc::UnboundedSender<(Query, Reply)>,
}

impl Dns {
    /// Reads the target's resolver files and starts the resolver thread in `netns`.
    pub(crate) fn start(
        netns: &Netns,
        root: &Root,
        etc_override: Option<&std::path::Path>,
    ) -> std::io::Result<Dns> {
        let read = |name: &str| -> Option<Vec<u8>> {
            // `ip netns exec` shows /etc/netns/NAME/* as /etc/*: do the same for such targets.
            if let Some(dir) = etc_override
                && let Ok(bytes) = std::fs::read(dir.join(name))
            {
                return Some(bytes);
            }
            root.read(&format!("/etc/{name}")).ok()
        };
        let (config, mut options) = match read("resolv.conf")
            .map(hickory_resolver::system_conf::parse_resolv_conf)
        {
            Some(Ok(parsed)) => parsed,
            Some(Err(error)) => {
                tracing::warn!(%error, "the target's /etc/resolv.conf has no usable name server; only its hosts file answers");
                (ResolverConfig::default(), ResolverOpts::default())
            }
            None => (ResolverConfig::default(), ResolverOpts::default()),
        };
        let mut hosts = Hosts::default();
        if let Some(bytes) = read("hosts") {
            hosts.read_hosts_conf(bytes.as_slice())?;
        }
        // The target's hosts file, never the agent's own.
        options.use_hosts_file = ResolveHosts::Never;
        options.timeout = options.timeout.min(Duration::from_secs(3));
        options.attempts = options.attempts.min(2);
        let hosts = Arc::new(hosts);

        let (tx, mut rx) = mpsc::unbounded_channel::<(Query, Reply)>();
        let path = netns.path.clone();
        let enter = !netns.is_current();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("tether-dns".into())
            .spawn(move || {
                let started = (|| {
                    if enter {
                        crate::netns::enter(&path)?;
                    }
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                })();
                let runtime = match started {
                    Ok(runtime) => {
                        let _ = ready_tx.send(Ok(()));
                        runtime
                    }
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let mut resolver =
                        TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
                            .with_options(options)
                            .build()
                            .expect("a resolver without TLS always builds");
                    resolver.set_hosts(Arc::clone(&hosts));
                    while let Some((query, reply)) = rx.recv().await {
                        let (name, family) = match query {
                            Query::Forward { name, family } => (name, family),
                            Query::Reverse(ip) => {
                                // The hosts file first, as glibc's `files` before `dns`.
                                if let Some(answer) = reverse_from_hosts(&hosts, ip) {
                                    let _ = reply.send(Ok(answer));
                                    continue;
                                }
                                let resolver = resolver.clone();
                                tokio::spawn(async move {
                                    let _ = reply.send(reverse(&resolver, ip).await);
                                });
                                continue;
                            }
                        };
                        // The hosts file answers first, for the name as given, as glibc's
                        // `files` before `dns` does: no search domain, no query.
                        if let Some(answer) = from_hosts(&hosts, &name, family) {
                            let _ = reply.send(Ok(answer));
                            continue;
                        }
                        let resolver = resolver.clone();
                        tokio::spawn(async move {
                            let _ = reply.send(lookup(&resolver, &name, family).await);
                        });
                    }
                });
            })?;
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("the resolver thread died"))??;
        Ok(Dns { requests: tx })
    }

    pub(crate) async fn lookup(
        &self,
        name: String,
        family: AddressFamily,
    ) -> Result<DnsAnswer, ErrorInfo> {
        let (tx, rx) = oneshot::channel();
        let gone = || ErrorInfo {
            code: ErrorCode::Internal as i32,
            message: "the resolver thread stopped".into(),
            ..Default::default()
        };
        self.requests
            .send((Query::Forward { name, family }, tx))
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// The name of `ip` in the target: its hosts file, then a PTR query. The answer names it
    /// (`canonical_name`) and lists `ip`.
    pub(crate) async fn reverse(&self, ip: IpAddr) -> Result<DnsAnswer, ErrorInfo> {
        let (tx, rx) = oneshot::channel();
        let gone = || ErrorInfo {
            code: ErrorCode::Internal as i32,
            message: "the resolver thread stopped".into(),
            ..Default::default()
        };
        self.requests
            .send((Query::Reverse(ip), tx))
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

fn from_hosts(hosts: &Hosts, name: &str, family: AddressFamily) -> Option<DnsAnswer> {
    use hickory_resolver::proto::{
        op::Query,
        rr::{Name, RData, RecordType},
    };
    let mut fqdn = Name::from_str_relaxed(name).ok()?;
    fqdn.set_fqdn(true);
    let kinds: &[RecordType] = match family {
        AddressFamily::Ipv4 => &[RecordType::A],
        AddressFamily::Ipv6 => &[RecordType::AAAA],
        AddressFamily::Any => &[RecordType::A, RecordType::AAAA],
    };
    let mut addresses = Vec::new();
    for kind in kinds {
        if let Some(found) = hosts.lookup_static_host(&Query::query(fqdn.clone(), *kind)) {
            for record in found.answers() {
                match &record.data {
                    RData::A(a) => addresses.push(bytes::Bytes::copy_from_slice(&a.0.octets())),
                    RData::AAAA(aaaa) => {
                        addresses.push(bytes::Bytes::copy_from_slice(&aaaa.0.octets()))
                    }
                    _ => {}
                }
            }
        }
    }
    (!addresses.is_empty()).then(|| DnsAnswer {
        addresses,
        canonical_name: name.trim_end_matches('.').to_owned(),
    })
}

fn ip_bytes(ip: IpAddr) -> bytes::Bytes {
    match ip {
        IpAddr::V4(v4) => bytes::Bytes::copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => bytes::Bytes::copy_from_slice(&v6.octets()),
    }
}

fn reverse_from_hosts(hosts: &Hosts, ip: IpAddr) -> Option<DnsAnswer> {
    use hickory_resolver::proto::{
        op::Query,
        rr::{Name, RData, RecordType},
    };
    let found = hosts.lookup_static_host(&Query::query(Name::from(ip), RecordType::PTR))?;
    found
        .answers()
        .iter()
        .find_map(|record| match &record.data {
            RData::PTR(name) => Some(DnsAnswer {
                addresses: vec![ip_bytes(ip)],
                canonical_name: name.0.to_utf8().trim_end_matches('.').to_owned(),
            }),
            _ => None,
        })
}

async fn reverse(resolver: &TokioResolver, ip: IpAddr) -> Result<DnsAnswer, ErrorInfo> {
    let found = resolver.reverse_lookup(ip).await.map_err(|error| {
        let not_found = error.is_no_records_found() || error.is_nx_domain();
        ErrorInfo {
            code: if not_found {
                ErrorCode::NotFound
            } else {
                ErrorCode::Temporary
            } as i32,
            message: format!("cannot find the name of {ip} in the target: {error}"),
            ..Default::default()
        }
    })?;
    let name = found
        .answers()
        .iter()
        .find_map(|record| match &record.data {
            hickory_resolver::proto::rr::RData::PTR(ptr) => Some(ptr.0.to_utf8()),
            _ => None,
        })
        .ok_or_else(|| ErrorInfo {
            code: ErrorCode::NotFound as i32,
            message: format!("{ip} has no name in the target"),
            ..Default::default()
        })?;
    Ok(DnsAnswer {
        addresses: vec![ip_bytes(ip)],
        canonical_name: name.trim_end_matches('.').to_owned(),
    })
}

async fn lookup(
    resolver: &TokioResolver,
    name: &str,
    family: AddressFamily,
) -> Result<DnsAnswer, ErrorInfo> {
    // A fully qualified query: search domains apply as resolv.conf says (hickory does ndots).
    let found = resolver.lookup_ip(name).await.map_err(|error| {
        let not_found = error.is_no_records_found() || error.is_nx_domain();
        ErrorInfo {
            code: if not_found {
                ErrorCode::NotFound
            } else {
                ErrorCode::Temporary
            } as i32,
            message: format!("cannot resolve {name} in the target: {error}"),
            ..Default::default()
        }
    })?;
    let addresses: Vec<bytes::Bytes> = found
        .iter()
        .filter(|ip| match family {
            AddressFamily::Any => true,
            AddressFamily::Ipv4 => ip.is_ipv4(),
            AddressFamily::Ipv6 => ip.is_ipv6(),
        })
        .map(|ip| match ip {
            IpAddr::V4(v4) => bytes::Bytes::copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => bytes::Bytes::copy_from_slice(&v6.octets()),
        })
        .collect();
    if addresses.is_empty() {
        return Err(ErrorInfo {
            code: ErrorCode::NotFound as i32,
            message: format!("{name} has no address of the asked family in the target"),
            ..Default::default()
        });
    }
    Ok(DnsAnswer {
        addresses,
        canonical_name: found
            .query()
            .name()
            .to_utf8()
            .trim_end_matches('.')
            .to_owned(),
    })
}
