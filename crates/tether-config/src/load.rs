//! Loading: a config file, then `TETHER_*` environment variables, then command-line flags, each
//! overriding the one before; then validation, all problems at once.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use serde_json::{Map, Value};

use crate::{
    checks, mirrord,
    model::Config,
    problem::{Notice, Origin, Problem, Problems},
    shorthand,
    source::{Format, Parsed},
    validate::{self, Issue, dotted},
};

/// The default config file names, looked up in `.tether/` of the working directory.
pub const DEFAULT_FILES: &[&str] = &["config.json", "config.yaml", "config.yml", "config.toml"];

/// Environment variables that start with `TETHER_` but are not settings.
const NOT_SETTINGS: &[&str] = &["TETHER_CONFIG", "TETHER_LOG"];
const NOT_SETTINGS_PREFIXES: &[&str] = &[
    "TETHER_E2E_",
    "TETHER_LAYER_",
    "TETHER_INTERNAL_",
    "TETHER_TEST_",
];

/// A loaded, valid configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// The config file used, if any.
    pub file: Option<PathBuf>,
    /// Settings accepted but not used (mirrord's own machinery), to tell the user once.
    pub notices: Vec<Notice>,
}

#[derive(Debug)]
enum LayerSource {
    File {
        path: PathBuf,
        text: Arc<str>,
        parsed: Parsed,
    },
    Env {
        var: String,
    },
    Flag {
        flag: String,
    },
}

#[derive(Debug)]
struct Layer {
    source: LayerSource,
    /// This layer's settings, shorthands expanded.
    value: Value,
}

/// Collects the layers of a configuration, lowest precedence first, then loads it.
#[derive(Debug, Default)]
pub struct Loader {
    layers: Vec<Layer>,
    problems: Vec<Problem>,
    notices: Vec<Notice>,
    file: Option<PathBuf>,
}

impl Loader {
    pub fn new() -> Loader {
        Loader::default()
    }

    /// Adds a config file; its format follows its extension.
    pub fn file(mut self, path: &Path) -> Loader {
        self.file = Some(path.to_owned());
        let fail = |message: String, help: &str| Problem {
            key: String::new(),
            message,
            help: Some(help.to_owned()),
            label: String::new(),
            origin: Origin::Flag {
                flag: path.display().to_string(),
            },
        };
        let Some(format) = Format::from_path(path) else {
            self.problems.push(fail(
                format!("cannot tell the format of {}", path.display()),
                "name the file with .json, .yaml, .yml or .toml",
            ));
            return self;
        };
        let text: Arc<str> = match std::fs::read_to_string(path) {
            Ok(text) => text.into(),
            Err(e) => {
                self.problems.push(fail(
                    format!("cannot read {}: {e}", path.display()),
                    "check the path given with -f",
                ));
                return self;
            }
        };
        match format.parse(&text) {
            Ok(mut parsed) => {
                if !parsed.value.is_object() {
                    self.problems.push(Problem {
                        key: String::new(),
                        message: "the file must hold a table of settings at the top level".into(),
                        help: None,
                        label: "not a table".into(),
                        origin: Origin::File {
                            path: path.to_owned(),
                            text: text.clone(),
                            span: parsed.spans.get("").map_or(0..0, |s| s.value.clone()),
                        },
                    });
                    return self;
                }
                let mut value = std::mem::take(&mut parsed.value);
                shorthand::expand(&mut value);
                mirrord::normalize(&mut value);
                for adapted in mirrord::adapt(&mut value) {
                    let origin = Origin::File {
                        path: path.to_owned(),
                        text: text.clone(),
                        span: parsed
                            .locate(&adapted.pointer)
                            .map_or(0..0, |s| s.key.clone().unwrap_or_else(|| s.value.clone())),
                    };
                    if adapted.refused {
                        self.problems.push(Problem {
                            key: adapted.key,
                            message: adapted.message,
                            help: Some("remove it to run without it".into()),
                            label: "needs mirrord's operator".into(),
                            origin,
                        });
                    } else {
                        self.notices.push(Notice {
                            key: adapted.key,
                            message: adapted.message,
                            origin,
                        });
                    }
                }
                self.layers.push(Layer {
                    source: LayerSource::File {
                        path: path.to_owned(),
                        text,
                        parsed,
                    },
                    value,
                });
            }
            Err(e) => self.problems.push(Problem {
                key: String::new(),
                message: format!("syntax error: {}", e.message),
                help: None,
                label: e.message.clone(),
                origin: Origin::File {
                    path: path.to_owned(),
                    text,
                    span: e.span,
                },
            }),
        }
        self
    }

    /// Adds the default file `.tether/config.{json,yaml,yml,toml}` under `dir`, if there is one.
    pub fn default_file(self, dir: &Path) -> Loader {
        let found: Vec<PathBuf> = DEFAULT_FILES
            .iter()
            .map(|name| dir.join(".tether").join(name))
            .filter(|p| p.is_file())
            .collect();
        match found.as_slice() {
            [] => self,
            [one] => self.file(one),
            [first, ..] => {
                let mut loader = self.file(first);
                loader.problems.push(Problem {
                    key: String::new(),
                    message: format!(
                        "more than one default config file: {}",
                        found
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    help: Some("keep one of them, or pick one with -f".into()),
                    label: String::new(),
                    origin: Origin::Unknown,
                });
                loader
            }
        }
    }

    /// Adds the `TETHER_*` variables among `vars`: `TETHER_` plus the key path in capitals, `__`
    /// between levels (`TETHER_FEATURE__NETWORK__INCOMING__MODE=steal`). Values are read as JSON
    /// when they parse as JSON (`true`, `8080`, `["a","b"]`), as a string otherwise.
    pub fn env(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Loader {
        let mut vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(name, _)| name.starts_with("TETHER_") && is_setting(name))
            .collect();
        vars.sort();
        for (var, raw) in vars {
            let path: Vec<String> = var["TETHER_".len()..]
                .split("__")
                .map(str::to_ascii_lowercase)
                .collect();
            if path.iter().any(String::is_empty) {
                self.problems.push(Problem {
                    key: String::new(),
                    message: format!("`{var}` is not a setting name"),
                    help: Some("write TETHER_ plus the key path in capitals, with __ between levels, e.g. TETHER_FEATURE__NETWORK__INCOMING__MODE".into()),
                    label: String::new(),
                    origin: Origin::Env { var },
                });
                continue;
            }
            let leaf = serde_json::from_str::<Value>(&raw).unwrap_or(Value::String(raw));
            let mut value = nest(&path, leaf);
            shorthand::expand(&mut value);
            self.layers.push(Layer {
                source: LayerSource::Env { var },
                value,
            });
        }
        self
    }

    /// Adds a command-line flag's setting at `pointer` (e.g. `/feature/network/incoming/mode`).
    pub fn flag(mut self, flag: &str, pointer: &str, leaf: Value) -> Loader {
        let path: Vec<String> = pointer.split('/').skip(1).map(str::to_owned).collect();
        let mut value = nest(&path, leaf);
        shorthand::expand(&mut value);
        self.layers.push(Layer {
            source: LayerSource::Flag {
                flag: flag.to_owned(),
            },
            value,
        });
        self
    }

    /// Merges the layers and validates the result, reporting every problem found.
    pub fn load(self) -> Result<Loaded, Problems> {
        let Loader {
            layers,
            mut problems,
            notices,
            file,
        } = self;
        let mut merged = Value::Object(Map::new());
        for layer in &layers {
            merge(&mut merged, layer.value.clone());
        }
        let schema = crate::canonical_schema();
        let issues = validate::check(&schema, &merged);
        // With shape problems, the checks that need typed settings still run on what is left once
        // the offending values are dropped, so one run reports everything it can.
        let mut usable = merged;
        for issue in &issues {
            drop_setting(&mut usable, &issue.pointer);
        }
        problems.extend(issues.iter().cloned().map(|issue| locate(&layers, issue)));
        match serde_path_to_error::deserialize::<_, Config>(&usable) {
            Ok(config) => {
                let semantic = checks::check(&config);
                problems.extend(semantic.into_iter().map(|issue| locate(&layers, issue)));
                if problems.is_empty() {
                    return Ok(Loaded {
                        config,
                        file,
                        notices,
                    });
                }
            }
            Err(e) if issues.is_empty() => {
                let pointer = path_to_pointer(e.path());
                let issue = Issue::new(pointer, e.inner().to_string(), "invalid value");
                problems.push(locate(&layers, issue));
            }
            Err(_) => {} // already explained by the shape problems
        }
        Err(Problems(problems))
    }
}

/// Removes the setting at `pointer`; inside a list, the whole list (indices must not shift).
fn drop_setting(value: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    match value.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.remove(&last.replace("~1", "/").replace("~0", "~"));
        }
        Some(Value::Array(_)) => drop_setting(value, parent),
        _ => {}
    }
}

fn is_setting(var: &str) -> bool {
    !NOT_SETTINGS.contains(&var) && !NOT_SETTINGS_PREFIXES.iter().any(|p| var.starts_with(p))
}

fn nest(path: &[String], leaf: Value) -> Value {
    path.iter().rev().fold(leaf, |inner, key| {
        Value::Object(Map::from_iter([(key.clone(), inner)]))
    })
}

/// Tables merge key by key; anything else replaces what was there.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(slot) => merge(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (slot, over) => *slot = over,
    }
}

fn path_to_pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|segment| match segment {
            Segment::Seq { index } => Some(format!("/{index}")),
            Segment::Map { key } | Segment::Enum { variant: key } => Some(format!("/{key}")),
            Segment::Unknown => None,
        })
        .collect()
}

/// Finds where the setting at the issue's pointer came from: the highest layer that sets it (or,
/// failing that, its nearest ancestor).
fn locate(layers: &[Layer], issue: Issue) -> Problem {
    let mut pointer = issue.pointer.as_str();
    let origin = loop {
        if let Some(layer) = layers
            .iter()
            .rev()
            .find(|l| l.value.pointer(pointer).is_some())
        {
            break match &layer.source {
                LayerSource::File { path, text, parsed } => {
                    let spans = parsed.locate(pointer);
                    let span = match spans {
                        Some(s) if issue.at_key => s.key.clone().unwrap_or(s.value.clone()),
                        Some(s) => match &issue.within {
                            Some(within) if pointer == issue.pointer => {
                                checks::shift_into_value(s.value.clone(), text, within.clone())
                            }
                            _ => s.value.clone(),
                        },
                        None => 0..0,
                    };
                    Origin::File {
                        path: path.clone(),
                        text: text.clone(),
                        span,
                    }
                }
                LayerSource::Env { var } => Origin::Env { var: var.clone() },
                LayerSource::Flag { flag } => Origin::Flag { flag: flag.clone() },
            };
        }
        match pointer.rfind('/') {
            Some(cut) => pointer = &pointer[..cut],
            None => break Origin::Unknown,
        }
    };
    let help = match (&origin, &issue.suggestion) {
        (Origin::Env { var }, Some(best)) => {
            let prefix = var.rsplit_once("__").map_or("TETHER", |(p, _)| p);
            Some(format!(
                "did you mean {prefix}{}{}?",
                if prefix == "TETHER" { "_" } else { "__" },
                best.to_ascii_uppercase()
            ))
        }
        _ => issue.help,
    };
    Problem {
        key: dotted(&issue.pointer),
        message: issue.message,
        help,
        label: issue.label,
        origin,
    }
}
