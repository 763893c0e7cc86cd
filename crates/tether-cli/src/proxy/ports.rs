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
