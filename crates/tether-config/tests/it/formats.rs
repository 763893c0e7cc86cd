//! The same settings in JSON, YAML and TOML, and mirrord's short forms.

use tether_config::model::{FsMode, IncomingMode, InnerFilter};

use crate::load;

const MIRRORD_JSON: &str = r#"{
  // mirrord.json files may carry comments
  "target": { "path": "deployment/api", "namespace": "shop" },
  "feature": {
    "network": {
      "incoming": {
        "mode": "steal",
        "http_filter": { "header_filter": "^X-Dev: alice$" },
        "port_mapping": [[8080, 80]],
        "ignore_ports": [9999]
      },
      "outgoing": { "filter": { "local": ["127.0.0.1/8", "tcp://db.internal:5432"] } },
      "dns": false
    },
    "fs": { "mode": "write", "read_only": ".+\\.json" },
    "env": { "include": "DB_*;API_KEY", "override": { "MODE": "dev" } }
  },
  "agent": { "ttl": 30, "flush_connections": true, "startup_timeout": 120 },
  "kube_context": "staging",
}"#;

#[test]
fn a_mirrord_json_file_with_a_header_filtered_steal_loads() {
    let config = load("mirrord.json", MIRRORD_JSON).expect("valid").config;
    assert_eq!(config.target.path.as_deref(), Some("deployment/api"));
    assert_eq!(config.target.namespace.as_deref(), Some("shop"));
    let incoming = &config.feature.network.incoming;
    assert_eq!(incoming.mode, IncomingMode::Steal);
    assert_eq!(
        incoming.http_filter.header_filter.as_deref(),
        Some("^X-Dev: alice$")
    );
    assert_eq!(incoming.port_mapping, vec![[8080, 80]]);
    assert_eq!(
        config
            .feature
            .network
            .outgoing
            .filter
            .local
            .as_ref()
            .unwrap()
            .len(),
        2
    );
    assert!(!config.feature.network.dns.enabled);
    assert_eq!(config.feature.fs.mode, FsMode::Write);
    assert_eq!(config.feature.fs.read_only, vec![".+\\.json".to_owned()]);
    assert_eq!(
        config.feature.env.include,
        Some(vec!["DB_*".to_owned(), "API_KEY".to_owned()])
    );
    assert_eq!(config.feature.env.overrides["MODE"], "dev");
    assert_eq!(config.agent.ttl.get().as_secs(), 30);
    assert_eq!(config.agent.startup_timeout.get().as_secs(), 120);
    assert_eq!(config.kube_context.as_deref(), Some("staging"));
}

#[test]
fn yaml_and_toml_say_the_same_thing() {
    let yaml = r#"
target: deploy/api
feature:
  network:
    incoming:
      mode: steal
      http_filter:
        all_of:
          - header: "^X-Dev: alice$"
          - path: "^/api/"
keepalive:
  interval: 2s
  timeout: 10s
"#;
    let toml = r#"
target = "deploy/api"

[feature.network.incoming]
mode = "steal"
http_filter.all_of = [{ header = "^X-Dev: alice$" }, { path = "^/api/" }]

[keepalive]
interval = "2s"
timeout = "10s"
"#;
    let from_yaml = load("c.yaml", yaml).expect("valid yaml").config;
    let from_toml = load("c.toml", toml).expect("valid toml").config;
    assert_eq!(from_yaml, from_toml);
    assert_eq!(
        from_yaml.feature.network.incoming.http_filter.all_of,
        Some(vec![
            InnerFilter::Header("^X-Dev: alice$".into()),
            InnerFilter::Path("^/api/".into())
        ])
    );
    assert_eq!(from_yaml.keepalive.interval.get().as_secs(), 2);
}

#[test]
fn short_forms_expand() {
    let config = load("c.json", r#"{ "target": "pod/x", "feature": { "network": { "incoming": "off" }, "fs": "local", "env": false } }"#)
        .expect("valid")
        .config;
    assert_eq!(config.target.path.as_deref(), Some("pod/x"));
    assert_eq!(config.feature.network.incoming.mode, IncomingMode::Off);
    assert_eq!(config.feature.fs.mode, FsMode::Local);
    assert!(!config.feature.env.enabled);
}

#[test]
fn an_empty_file_gives_the_defaults() {
    for (name, text) in [("c.json", "{}"), ("c.yaml", ""), ("c.toml", "")] {
        let config = load(name, text).expect("valid").config;
        assert_eq!(config, tether_config::Config::default(), "{name}");
    }
    let defaults = tether_config::Config::default();
    assert_eq!(defaults.feature.network.incoming.mode, IncomingMode::Mirror);
    assert_eq!(defaults.keepalive.interval.get().as_secs(), 5);
    assert_eq!(defaults.reconnect.grace.get().as_secs(), 600);
    assert!(!defaults.probes.steal);
}
