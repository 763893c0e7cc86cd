//! Every problem is reported, with the key, the place, and what to do.

use tether_config::Origin;

use crate::{at, problems};

#[test]
fn a_typo_in_a_key_is_named_with_its_line_and_a_suggestion() {
    let text = "{\n  \"feature\": {\n    \"network\": {\n      \"incoming\": {\n        \"modee\": \"steal\"\n      }\n    }\n  }\n}\n";
    let found = problems("c.json", text);
    assert_eq!(found.len(), 1, "{found:#?}");
    let problem = &found[0];
    assert_eq!(problem.key, "feature.network.incoming.modee");
    assert!(
        problem.message.contains("unknown key `modee`"),
        "{}",
        problem.message
    );
    assert_eq!(problem.help.as_deref(), Some("did you mean `mode`?"));
    assert_eq!(at(problem), (5, 9));
    assert!(problem.to_string().contains("c.json:5:9"), "{problem}");
}

#[test]
fn the_same_typo_is_located_in_yaml_and_toml() {
    let yaml = "feature:\n  network:\n    incoming:\n      modee: steal\n";
    let toml = "[feature.network.incoming]\n\nmodee = \"steal\"\n";
    for (name, text, place) in [("c.yaml", yaml, (4, 7)), ("c.toml", toml, (3, 1))] {
        let found = problems(name, text);
        assert_eq!(found.len(), 1, "{name}: {found:#?}");
        assert_eq!(at(&found[0]), place, "{name}");
        assert_eq!(
            found[0].help.as_deref(),
            Some("did you mean `mode`?"),
            "{name}"
        );
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = r#"{
  "taget": "deploy/api",
  "feature": {
    "network": { "incoming": { "mode": "stael", "ports": [80, "http"] } },
    "fs": { "mode": "read", "read_only": [1] }
  },
  "agent": { "ephemeral": "yes" },
  "on_link_lost": "restart"
}"#;
    let found = problems("c.json", text);
    let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "agent.ephemeral",
            "feature.fs.read_only[0]",
            "feature.network.incoming.mode",
            "feature.network.incoming.ports[1]",
            "on_link_lost",
            "taget",
        ],
        "{found:#?}"
    );
    let by_key = |k: &str| found.iter().find(|p| p.key == k).unwrap();
    assert_eq!(
        by_key("taget").help.as_deref(),
        Some("did you mean `target`?")
    );
    assert_eq!(
        by_key("feature.network.incoming.mode").help.as_deref(),
        Some("did you mean \"steal\"?")
    );
    assert!(
        by_key("agent.ephemeral")
            .message
            .contains("must be true or false"),
        "{:?}",
        by_key("agent.ephemeral")
    );
    assert_eq!(at(by_key("feature.network.incoming.ports[1]")), (4, 63));
}

#[test]
fn a_bad_regex_points_inside_the_string() {
    let text = "{\"feature\": {\"network\": {\"incoming\": {\"http_filter\": {\"header_filter\": \"^X-Dev: (alice\"}}}}}";
    let found = problems("c.json", text);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(
        found[0].key,
        "feature.network.incoming.http_filter.header_filter"
    );
    assert!(
        found[0].message.contains("invalid regex"),
        "{}",
        found[0].message
    );
    let Origin::File { span, .. } = &found[0].origin else {
        panic!()
    };
    assert_eq!(
        &text[span.clone()],
        "(",
        "the span should be the unclosed group"
    );
}

#[test]
fn exclusive_settings_and_bad_values_are_explained() {
    let text = r#"
target: service/api
feature:
  network:
    incoming:
      port_mapping: [[0, 80], [8080]]
      http_filter:
        header_filter: "a"
        path_filter: "b"
    outgoing:
      filter: { remote: ["a"], local: ["b"] }
  env: { include: "A", exclude: "B" }
keepalive: { interval: 10s, timeout: 5s }
agent: { ttl: "5 parsecs" }
"#;
    let found = problems("c.yaml", text);
    let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
    // Shape problems first, then the checks that need typed settings (run on what is left once
    // the badly shaped values are set aside), all in one run.
    assert_eq!(
        keys,
        [
            "agent.ttl",
            "feature.network.incoming.port_mapping[1]",
            "target.path",
            "feature.network.incoming.http_filter.path_filter",
            "feature.network.outgoing.filter.local",
            "feature.env.exclude",
            "keepalive.timeout",
        ],
        "{found:#?}"
    );
    assert!(
        found[0].message.contains("is not a duration"),
        "{}",
        found[0].message
    );
    for problem in &found {
        assert!(
            problem.origin.line_column().is_some(),
            "not located: {problem:?}"
        );
    }
    let fixed = text.replace("[[0, 80], [8080]]", "[[0, 80]]");
    let found = problems("c.yaml", &fixed);
    assert!(
        found
            .iter()
            .any(|p| p.key == "feature.network.incoming.port_mapping[0]"),
        "{found:#?}"
    );
}

#[test]
fn syntax_errors_are_located() {
    for (name, text, line) in [
        ("c.json", "{\n  \"target\": \"x\"\n  \"agent\": {}\n}", 2),
        ("c.yaml", "target: x\nagent: [\n", 3),
        ("c.toml", "target = \"x\"\nagent = {\n", 2),
        ("c.json", "{\"a\": 1, \"a\": 2}", 1),
    ] {
        let found = problems(name, text);
        assert_eq!(found.len(), 1, "{name}: {found:#?}");
        assert!(
            found[0].message.starts_with("syntax error"),
            "{:?}",
            found[0]
        );
        assert_eq!(at(&found[0]).0, line, "{name}: {text:?} → {:?}", found[0]);
    }
}

#[test]
fn an_unknown_extension_or_missing_file_is_a_clear_error() {
    let found = problems("c.ini", "x=1");
    assert!(
        found[0].message.contains("cannot tell the format"),
        "{found:?}"
    );
    let err = tether_config::Loader::new()
        .file(std::path::Path::new("/nonexistent/c.json"))
        .load()
        .unwrap_err();
    assert!(
        err.0[0].message.contains("cannot read /nonexistent/c.json"),
        "{err:?}"
    );
}

#[test]
fn every_variant_of_a_documented_enum_is_accepted_and_a_wrong_one_lists_them() {
    // schemars writes an enum whose variants carry docs as one `const` branch per variant.
    for good in ["keep", "stop"] {
        let text = format!("{{\"on_link_lost\": \"{good}\"}}");
        let config = crate::load("c.json", &text).expect("valid").config;
        assert_eq!(format!("{:?}", config.on_link_lost).to_lowercase(), good);
    }
    let found = problems("c.json", "{\"on_link_lost\": \"restart\"}");
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].message.contains("keep") && found[0].message.contains("stop"),
        "{}",
        found[0].message
    );
}
