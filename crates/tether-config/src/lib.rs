//! tether's configuration: one schema for the config file, `TETHER_*` environment variables and
//! command-line flags, in that order of precedence.
//!
//! - [`model`]: the canonical types the rest of tether reads.
//! - [`Loader`]: file → environment → flags, merged, then validated; every problem is reported
//!   at once, located at the key or value in the file (line and column), the variable or the flag.
//! - [`schema`]: the JSON Schema editors use (short forms included).
//! - [`Target`]: parsing of target paths (`deploy/api`, `netns/NAME`, …).
//!
//! Files may be JSON (comments and trailing commas allowed), YAML or TOML. mirrord's key names
//! and short forms are accepted where the concept is the same.
//!
//! Architecture Invariant: this crate does no IO beyond reading the config file it is given.

mod checks;
mod duration;
mod load;
mod mirrord;
pub mod model;
mod problem;
mod shorthand;
mod source;
mod target;
mod validate;

pub use duration::ConfigDuration;
pub use load::{DEFAULT_FILES, Loaded, Loader};
pub use model::Config;
pub use problem::{Notice, Origin, Problem, ProblemJson, Problems};
pub use target::{KubeKind, KubeTarget, TARGET_FORMS, Target, TargetError};

use serde_json::Value;

/// The schema of the canonical form, which validation walks.
pub(crate) fn canonical_schema() -> Value {
    schemars::schema_for!(Config).to_value()
}

/// The JSON Schema of the config file, for editors: the canonical form plus the short forms.
pub fn schema() -> Value {
    let mut schema = canonical_schema();
    shorthand::widen_schema(&mut schema);
    if let Some(object) = schema.as_object_mut() {
        object.insert("title".into(), "tether configuration".into());
    }
    schema
}

/// The schema as committed in the repository and printed by `tether config schema`.
pub fn schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&schema()).expect("a schema serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// The validation walker understands only some JSON Schema keywords; if schemars starts
    /// emitting another one for our types, validation would silently skip it.
    #[test]
    fn the_walker_understands_every_keyword_in_the_schema() {
        fn visit(value: &Value, in_properties: bool, unknown: &mut Vec<String>) {
            match value {
                Value::Object(map) => {
                    for (key, child) in map {
                        if !in_properties
                            && !crate::validate::KNOWN_KEYWORDS.contains(&key.as_str())
                        {
                            unknown.push(key.clone());
                        }
                        let is_map_of_schemas = matches!(key.as_str(), "properties" | "$defs");
                        if key != "default" && key != "enum" && key != "const" {
                            visit(child, is_map_of_schemas, unknown);
                        }
                    }
                }
                Value::Array(items) => items.iter().for_each(|i| visit(i, false, unknown)),
                _ => {}
            }
        }
        let mut unknown = Vec::new();
        visit(&super::canonical_schema(), false, &mut unknown);
        assert!(
            unknown.is_empty(),
            "keywords the walker ignores: {unknown:?}"
        );
    }
}
