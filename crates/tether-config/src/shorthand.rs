//! mirrord-style shorthand forms, in one table: `"incoming": "steal"` for
//! `"incoming": {"mode": "steal"}`, a string where a list is expected, mirrord's on/off switches
//! (`"outgoing": true`, `"network": false`, `"fs": false`), and so on.
//!
//! The same table expands values before validation ([`expand`]) and widens the published JSON
//! Schema so editors accept the short forms too ([`widen_schema`]).

use serde_json::{Map, Value, json};

enum Expand {
    /// A boolean switches the whole section on (its defaults) or off, as mirrord's do.
    Toggle {
        on: fn() -> Value,
        off: fn() -> Value,
    },
    /// A scalar `s` stands for `{ key: s }`.
    Into(&'static str),
    /// A string stands for a list: split at the separator, or a one-item list.
    List { separator: Option<char> },
}

struct Shorthand {
    path: &'static [&'static str],
    expand: Expand,
    /// The schema of the short form, for editors.
    short: fn() -> Value,
}

fn string() -> Value {
    json!({ "type": "string" })
}
fn boolean() -> Value {
    json!({ "type": "boolean" })
}
fn incoming_mode() -> Value {
    json!({ "$ref": "#/$defs/IncomingMode" })
}
fn fs_mode() -> Value {
    json!({ "$ref": "#/$defs/FsMode" })
}

const fn list(path: &'static [&'static str]) -> Shorthand {
    Shorthand {
        path,
        expand: Expand::List { separator: None },
        short: string,
    }
}

/// Parents come before their children: expanding `feature.fs` first lets `feature.fs.read_write`
/// be found inside the expanded object. A switch comes before another short form of the same
/// setting (it only rewrites booleans).
const SHORTHANDS: &[Shorthand] = &[
    Shorthand {
        path: &["feature", "network"],
        // Explicit values both ways, so a switch in a higher layer overrides a lower one.
        expand: Expand::Toggle {
            on: || {
                json!({
                    "incoming": { "mode": "mirror" },
                    "outgoing": { "tcp": true, "udp": true },
                    "dns": { "enabled": true },
                })
            },
            off: || {
                json!({
                    "incoming": { "mode": "off" },
                    "outgoing": { "tcp": false, "udp": false },
                    "dns": { "enabled": false },
                })
            },
        },
        short: boolean,
    },
    Shorthand {
        path: &["feature", "network", "incoming"],
        expand: Expand::Toggle {
            on: || json!({ "mode": "mirror" }),
            off: || json!({ "mode": "off" }),
        },
        short: boolean,
    },
    Shorthand {
        path: &["feature", "network", "outgoing"],
        expand: Expand::Toggle {
            on: || json!({ "tcp": true, "udp": true }),
            off: || json!({ "tcp": false, "udp": false }),
        },
        short: boolean,
    },
    Shorthand {
        path: &["feature", "fs"],
        expand: Expand::Toggle {
            on: || json!({ "mode": "read" }),
            off: || json!({ "mode": "local" }),
        },
        short: boolean,
    },
    Shorthand {
        path: &["target"],
        expand: Expand::Into("path"),
        short: string,
    },
    Shorthand {
        path: &["feature", "network", "incoming"],
        expand: Expand::Into("mode"),
        short: incoming_mode,
    },
    Shorthand {
        path: &["feature", "network", "dns"],
        expand: Expand::Into("enabled"),
        short: boolean,
    },
    Shorthand {
        path: &["feature", "fs"],
        expand: Expand::Into("mode"),
        short: fs_mode,
    },
    Shorthand {
        path: &["feature", "env"],
        expand: Expand::Into("enabled"),
        short: boolean,
    },
    list(&["feature", "fs", "read_write"]),
    list(&["feature", "fs", "read_only"]),
    list(&["feature", "fs", "local"]),
    list(&["feature", "fs", "not_found"]),
    Shorthand {
        path: &["feature", "env", "include"],
        expand: Expand::List {
            separator: Some(';'),
        },
        short: string,
    },
    Shorthand {
        path: &["feature", "env", "exclude"],
        expand: Expand::List {
            separator: Some(';'),
        },
        short: string,
    },
    list(&["feature", "network", "outgoing", "filter", "remote"]),
    list(&["feature", "network", "outgoing", "filter", "local"]),
    list(&["feature", "network", "dns", "filter", "remote"]),
    list(&["feature", "network", "dns", "filter", "local"]),
];

/// Rewrites every short form in `value` into the canonical form.
pub(crate) fn expand(value: &mut Value) {
    for shorthand in SHORTHANDS {
        let Some(slot) = lookup_mut(value, shorthand.path) else {
            continue;
        };
        match (&shorthand.expand, &*slot) {
            (Expand::Toggle { on, off }, Value::Bool(switch)) => {
                *slot = if *switch { on() } else { off() };
            }
            (Expand::Into(key), Value::String(_) | Value::Bool(_)) => {
                let short = slot.take();
                *slot = Value::Object(Map::from_iter([((*key).to_owned(), short)]));
            }
            (Expand::List { separator }, Value::String(text)) => {
                let items: Vec<Value> = match separator {
                    Some(sep) => text
                        .split(*sep)
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| Value::String(s.to_owned()))
                        .collect(),
                    None => vec![Value::String(text.clone())],
                };
                *slot = Value::Array(items);
            }
            _ => {}
        }
    }
}

fn lookup_mut<'v>(value: &'v mut Value, path: &[&str]) -> Option<&'v mut Value> {
    path.iter()
        .try_fold(value, |v, key| v.as_object_mut()?.get_mut(*key))
}

/// Lets the schema accept every short form next to the canonical one.
pub(crate) fn widen_schema(schema: &mut Value) {
    // Children first: a widened parent no longer leads to its definition through a plain `$ref`.
    for shorthand in SHORTHANDS.iter().rev() {
        let Some(property) = schema_property_mut(schema, shorthand.path) else {
            panic!("shorthand path {:?} is not in the schema", shorthand.path);
        };
        let mut canonical = property.take();
        // Keep the documentation on the outside, where editors look for it.
        let mut outer = Map::new();
        if let Some(object) = canonical.as_object_mut() {
            for meta in ["description", "default", "title"] {
                if let Some(v) = object.remove(meta) {
                    outer.insert(meta.to_owned(), v);
                }
            }
        }
        outer.insert("anyOf".to_owned(), json!([(shorthand.short)(), canonical]));
        *property = Value::Object(outer);
    }
}

/// The schema of the property at `path`, following `$ref`s into `$defs`.
fn schema_property_mut<'s>(schema: &'s mut Value, path: &[&str]) -> Option<&'s mut Value> {
    // Find which definition holds the parent, by name, then borrow mutably once.
    let mut holder: Option<String> = None; // None: the root schema
    for (i, key) in path.iter().enumerate() {
        let object = match &holder {
            None => &*schema,
            Some(name) => schema.get("$defs")?.get(name)?,
        };
        let property = object.get("properties")?.get(*key)?;
        if i + 1 == path.len() {
            break;
        }
        holder = Some(definition_name(property)?);
    }
    let last = path.last()?;
    let object = match holder {
        None => schema,
        Some(name) => schema.get_mut("$defs")?.get_mut(&name)?,
    };
    object.get_mut("properties")?.get_mut(*last)
}

/// The `$defs` name a property schema refers to (directly, or through `anyOf` for optionals).
fn definition_name(property: &Value) -> Option<String> {
    if let Some(reference) = property.get("$ref").and_then(Value::as_str) {
        return reference.strip_prefix("#/$defs/").map(str::to_owned);
    }
    property
        .get("anyOf")?
        .as_array()?
        .iter()
        .find_map(definition_name)
}
