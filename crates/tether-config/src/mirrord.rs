//! mirrord's settings that have no counterpart in tether, in one table: those that only tune
//! mirrord's own machinery are taken out with a notice, so a mirrord user's file loads; those that
//! need services tether does not run (mirrord's operator) are refused, naming the feature. A
//! setting that changes what happens to the target or its traffic is never in the first list.

use serde_json::Value;

/// What becomes of one mirrord setting.
enum Fate {
    /// Taken out; the notice says why it does not matter here.
    Ignored(&'static str),
    /// Refused: it needs this, which tether does not have.
    Refused(&'static str),
}

/// Settings by path.
const SETTINGS: &[(&[&str], Fate)] = &[
    (&["telemetry"], Fate::Ignored("mirrord's usage reporting")),
    (
        &["internal_proxy"],
        Fate::Ignored("mirrord's local proxy process"),
    ),
    (
        &["external_proxy"],
        Fate::Ignored("mirrord's external proxy process"),
    ),
    (
        &["experimental"],
        Fate::Ignored("switches for mirrord's own layer"),
    ),
    (
        &["container"],
        Fate::Ignored("`mirrord container`'s sidecar"),
    ),
    (&["ci"], Fate::Ignored("`mirrord ci`")),
    (&["sip_binaries"], Fate::Ignored("macOS SIP patching")),
    (&["skip_sip"], Fate::Ignored("macOS SIP patching")),
    (
        &["startup_retry"],
        Fate::Ignored("mirrord's retries while its operator starts"),
    ),
    (&["key"], Fate::Ignored("sessions of mirrord's operator")),
    (
        &["agent", "json_log"],
        Fate::Ignored("the mirrord agent's log format"),
    ),
    (
        &["agent", "metrics"],
        Fate::Ignored("the mirrord agent's metrics endpoint"),
    ),
    (
        &["agent", "max_body_buffer_size"],
        Fate::Ignored("the mirrord agent's body buffering (tether streams bodies)"),
    ),
    (
        &["agent", "max_body_buffer_timeout"],
        Fate::Ignored("the mirrord agent's body buffering (tether streams bodies)"),
    ),
    (
        &["feature", "split_queues"],
        Fate::Refused("queue splitting, a service of mirrord's operator"),
    ),
    (
        &["feature", "db_branches"],
        Fate::Refused("database branches, a service of mirrord's operator"),
    ),
    (
        &["profile"],
        Fate::Refused("mirrord profiles, objects of mirrord's operator"),
    ),
];

/// Rewrites mirrord's other forms of tether's settings, with the same meaning: `target.path` as
/// an object (`{"deployment": "api", "container": "app"}`), `agent.image` as
/// `{"registry", "tag"}`, and an empty `agent.image` or `agent.image_pull_policy` (the default).
pub(crate) fn normalize(value: &mut Value) {
    /// mirrord's field names, and tether's kind for each.
    const KINDS: &[(&str, &str)] = &[
        ("pod", "pod"),
        ("deployment", "deployment"),
        ("rollout", "rollout"),
        ("job", "job"),
        ("cron_job", "cronjob"),
        ("stateful_set", "statefulset"),
        ("service", "service"),
        ("replica_set", "replicaset"),
    ];
    if let Some(path) = value.pointer_mut("/target/path")
        && let Some(object) = path.as_object()
    {
        let kind = KINDS
            .iter()
            .find_map(|(field, kind)| Some((*kind, object.get(*field)?.as_str()?)));
        let container = object.get("container").and_then(Value::as_str);
        // Exactly a kind and a name, and perhaps a container: anything else stays as it is and
        // is reported where it was written.
        let known = object.len() == 1 + usize::from(container.is_some());
        if let (Some((kind, name)), true) = (kind, known) {
            let mut text = format!("{kind}/{name}");
            if let Some(container) = container {
                text.push_str(&format!("/container/{container}"));
            }
            *path = Value::String(text);
        }
    }
    if let Some(image) = value.pointer_mut("/agent/image")
        && let Some(object) = image.as_object()
        && let (Some(Value::String(registry)), Some(Value::String(tag)), 2) =
            (object.get("registry"), object.get("tag"), object.len())
    {
        *image = Value::String(format!("{registry}:{tag}"));
    }
    if let Some(agent) = value.get_mut("agent").and_then(Value::as_object_mut) {
        for key in ["image", "image_pull_policy"] {
            if agent.get(key).and_then(Value::as_str) == Some("") {
                agent.remove(key);
            }
        }
    }
}

/// A setting taken out or refused, by JSON pointer.
#[derive(Debug)]
pub(crate) struct Adapted {
    pub(crate) pointer: String,
    /// The dotted key, for messages.
    pub(crate) key: String,
    pub(crate) refused: bool,
    pub(crate) message: String,
}

/// Takes mirrord-only settings out of `value` (a file's settings, short forms expanded).
pub(crate) fn adapt(value: &mut Value) -> Vec<Adapted> {
    let mut adapted = Vec::new();
    for (path, fate) in SETTINGS {
        let (parent_path, last) = path.split_at(path.len() - 1);
        let Some(parent) = parent_path
            .iter()
            .try_fold(&mut *value, |v, key| v.as_object_mut()?.get_mut(*key))
            .and_then(Value::as_object_mut)
        else {
            continue;
        };
        if !parent.contains_key(last[0]) {
            continue;
        }
        let key = path.join(".");
        let pointer = format!("/{}", path.join("/"));
        // Either way it is said once, here (validation would call it an unknown key).
        parent.remove(last[0]);
        match fate {
            Fate::Ignored(what) => {
                adapted.push(Adapted {
                    pointer,
                    message: format!("ignored: `{key}` tunes {what}; it has no meaning in tether"),
                    key,
                    refused: false,
                });
            }
            Fate::Refused(what) => adapted.push(Adapted {
                pointer,
                message: format!("`{key}` needs {what}, which tether does not run"),
                key,
                refused: true,
            }),
        }
    }
    // `operator`: off is what tether always is; on asks for a service tether does not run.
    // mirrord without its operator cannot target these kinds, and refuses such a file: so does
    // tether, for a file that says so (without `operator: false` they load as tether targets).
    const NEED_OPERATOR: &[&str] = &[
        "job/",
        "cronjob/",
        "statefulset/",
        "replicaset/",
        "service/",
    ];
    let target = value
        .pointer("/target/path")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if let Some(object) = value.as_object_mut()
        && let Some(operator) = object.get("operator").and_then(Value::as_bool)
    {
        object.remove("operator");
        let kind_needs_it = target
            .as_deref()
            .is_some_and(|t| NEED_OPERATOR.iter().any(|k| t.starts_with(k)));
        let message = match (operator, kind_needs_it) {
            (true, _) => {
                "`operator: true` needs mirrord's operator, which tether does not run".into()
            }
            (false, true) => format!(
                "`operator: false` with target `{}`: mirrord cannot target that without its operator (tether can: remove `operator: false`)",
                target.as_deref().unwrap_or_default()
            ),
            (false, false) => "ignored: `operator: false` is how tether always runs".into(),
        };
        adapted.push(Adapted {
            pointer: "/operator".into(),
            key: "operator".into(),
            refused: operator || kind_needs_it,
            message,
        });
    }
    adapted
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn mirrord_s_other_forms_become_tether_s() {
        let mut value = json!({
            "target": { "path": { "deployment": "api", "container": "app" } },
            "agent": { "image": { "registry": "r.example/mirrord", "tag": "1" }, "image_pull_policy": "" },
        });
        normalize(&mut value);
        assert_eq!(
            value,
            json!({
                "target": { "path": "deployment/api/container/app" },
                "agent": { "image": "r.example/mirrord:1" },
            })
        );
        let mut set = json!({ "target": { "path": { "stateful_set": "db" } } });
        normalize(&mut set);
        assert_eq!(set, json!({ "target": { "path": "statefulset/db" } }));
        let mut odd = json!({ "target": { "path": { "pod": "a", "deployment": "b" } } });
        normalize(&mut odd);
        assert!(
            odd["target"]["path"].is_object(),
            "two kinds: left to be reported"
        );
    }

    #[test]
    fn machinery_is_taken_out_and_operator_features_are_refused() {
        let mut value = json!({
            "telemetry": false,
            "agent": { "json_log": true, "ttl": 30 },
            "feature": { "split_queues": {}, "network": {} },
        });
        let adapted = adapt(&mut value);
        assert_eq!(
            value,
            json!({ "agent": { "ttl": 30 }, "feature": { "network": {} } })
        );
        let keys: Vec<_> = adapted
            .iter()
            .map(|a| (a.key.as_str(), a.refused))
            .collect();
        assert_eq!(
            keys,
            [
                ("telemetry", false),
                ("agent.json_log", false),
                ("feature.split_queues", true)
            ]
        );
        assert!(
            adapted[2].message.contains("operator"),
            "{}",
            adapted[2].message
        );
    }

    #[test]
    fn operator_off_is_how_tether_runs_and_on_is_refused() {
        for (on, refused) in [(false, false), (true, true)] {
            let mut value = json!({ "operator": on });
            let adapted = adapt(&mut value);
            assert_eq!(value, json!({}));
            assert_eq!(adapted.len(), 1);
            assert_eq!(adapted[0].refused, refused, "{}", adapted[0].message);
        }
    }
}
