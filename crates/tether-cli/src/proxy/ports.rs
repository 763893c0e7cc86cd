//! Which of the process's listeners get the target's traffic, and from which target port. Pure:
//! the configuration's `ports`, `ignore_ports`, `port_mapping` and `ignore_localhost` applied to
//! one `listen`.

use std::net::SocketAddr;

use tether_config::model::{IncomingConfig, IncomingMode};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Subscribe `remote_port` in the target; deliver its connections to the listener.
    Remote { remote_port: u16, steal: bool },
    /// Leave the listener alone.
    Local(String),
}

pub(crate) fn decide(incoming: &IncomingConfig, addr: SocketAddr, requested_port: u16) -> Decision {
    let port = addr.port();
    if incoming.mode == IncomingMode::Off {
        return Decision::Local("incoming traffic is off (feature.network.incoming.mode)".into());
    }
    if requested_port == 0 {
        return Decision::Local(format!(
            "port {port} was picked by the kernel (bind to port 0)"
        ));
    }
    if incoming.ignore_localhost && addr.ip().is_loopback() {
        return Decision::Local(format!(
            "{addr} listens on loopback only (ignore_localhost)"
        ));
    }
    if incoming.ignore_ports.contains(&port) {
        return Decision::Local(format!("port {port} is in ignore_ports"));
    }
    if let Some(ports) = &incoming.ports
        && !ports.contains(&port)
    {
        return Decision::Local(format!("port {port} is not in ports"));
    }
    let remote_port = incoming
        .port_mapping
        .iter()
        .find(|[local, _]| *local == port)
        .map_or(port, |[_, remote]| *remote);
    Decision::Remote {
        remote_port,
        steal: incoming.mode == IncomingMode::Steal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(mode: IncomingMode) -> IncomingConfig {
        IncomingConfig {
            mode,
            ..IncomingConfig::default()
        }
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn every_port_is_mirrored_by_default() {
        assert_eq!(
            decide(&IncomingConfig::default(), addr("0.0.0.0:80"), 80),
            Decision::Remote {
                remote_port: 80,
                steal: false
            }
        );
    }

    #[test]
    fn mapping_steal_and_filters_apply() {
        let mut config = incoming(IncomingMode::Steal);
        config.port_mapping = vec![[8080, 80]];
        assert_eq!(
            decide(&config, addr("0.0.0.0:8080"), 8080),
            Decision::Remote {
                remote_port: 80,
                steal: true
            }
        );
        config.ignore_ports = vec![9000];
        assert!(matches!(
            decide(&config, addr("0.0.0.0:9000"), 9000),
            Decision::Local(_)
        ));
        config.ports = Some(vec![8080]);
        assert!(matches!(
            decide(&config, addr("[::]:7000"), 7000),
            Decision::Local(_)
        ));
        assert!(matches!(
            decide(&config, addr("[::]:8080"), 8080),
            Decision::Remote { .. }
        ));
    }

    #[test]
    fn loopback_port_zero_and_off_stay_local() {
        let config = IncomingConfig::default();
        assert!(
            matches!(decide(&config, addr("127.0.0.1:80"), 80), Decision::Local(r) if r.contains("loopback"))
        );
        assert!(
            matches!(decide(&config, addr("0.0.0.0:41234"), 0), Decision::Local(r) if r.contains("port 0"))
        );
        let mut keep = config.clone();
        keep.ignore_localhost = false;
        assert!(matches!(
            decide(&keep, addr("127.0.0.1:80"), 80),
            Decision::Remote { .. }
        ));
        assert!(matches!(
            decide(&incoming(IncomingMode::Off), addr("0.0.0.0:80"), 80),
            Decision::Local(_)
        ));
    }
}

/// The configured HTTP filter as the protocol carries it, for `remote_port` (`http_filter.ports`
/// limits filtering to some ports; the others are stolen whole).
pub(crate) fn wire_filter(
    config: &tether_config::model::HttpFilterConfig,
    remote_port: u16,
) -> Option<tether_protocol::HttpFilter> {
    use tether_config::model::InnerFilter;
    use tether_protocol::{HttpFilter, HttpFilterList, http_filter::Rule};
    if !config.is_set()
        || config
            .ports
            .as_ref()
            .is_some_and(|ports| !ports.contains(&remote_port))
    {
        return None;
    }
    let inner = |filters: &[InnerFilter]| HttpFilterList {
        filters: filters
            .iter()
            .map(|f| HttpFilter {
                rule: Some(match f {
                    InnerFilter::Header(p) => Rule::Header(p.clone()),
                    InnerFilter::Path(p) => Rule::Path(p.clone()),
                    InnerFilter::Method(p) => Rule::Method(p.clone()),
                }),
            })
            .collect(),
    };
    let rule = if let Some(p) = &config.header_filter {
        Rule::Header(p.clone())
    } else if let Some(p) = &config.path_filter {
        Rule::Path(p.clone())
    } else if let Some(p) = &config.method_filter {
        Rule::Method(p.clone())
    } else if let Some(list) = &config.all_of {
        Rule::AllOf(inner(list))
    } else {
        Rule::AnyOf(inner(config.any_of.as_deref().unwrap_or_default()))
    };
    Some(HttpFilter { rule: Some(rule) })
}

#[cfg(test)]
mod filter_tests {
    use tether_config::model::{HttpFilterConfig, InnerFilter};
    use tether_protocol::http_filter::Rule;

    use super::wire_filter;

    #[test]
    fn the_configured_filter_reaches_the_wire_for_its_ports_only() {
        assert!(wire_filter(&HttpFilterConfig::default(), 80).is_none());
        let header = HttpFilterConfig {
            header_filter: Some("^x-dev: a$".into()),
            ports: Some(vec![80]),
            ..Default::default()
        };
        assert_eq!(
            wire_filter(&header, 80).unwrap().rule,
            Some(Rule::Header("^x-dev: a$".into()))
        );
        assert!(
            wire_filter(&header, 81).is_none(),
            "port 81 is not filtered: stolen whole"
        );
        let all = HttpFilterConfig {
            all_of: Some(vec![
                InnerFilter::Path("^/api".into()),
                InnerFilter::Method("GET".into()),
            ]),
            ..Default::default()
        };
        let Some(Rule::AllOf(list)) = wire_filter(&all, 80).unwrap().rule else {
            panic!()
        };
        assert_eq!(list.filters.len(), 2);
    }
}
