//! Checks a value against the configuration's JSON Schema and reports every problem, not only the
//! first: unknown keys (with the closest valid key), wrong types, values outside an enum or range.
//!
//! The schema is the one schemars generates from the types in `model.rs`, so this walker only needs
//! the keywords schemars emits for them: `$ref`, `type`, `enum`, `const`, `anyOf`/`oneOf`,
//! `properties`, `additionalProperties`, `required`, `items`, `minItems`/`maxItems`,
//! `minimum`/`maximum`. A unit test fails if the schema starts using another keyword.

use serde_json::{Map, Value};

use crate::source::escape_segment;

/// A problem at a JSON pointer, before it is located in a file, variable or flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Issue {
    pub pointer: String,
    /// Point at the key rather than the value (unknown keys).
    pub at_key: bool,
    pub message: String,
    pub label: String,
    pub help: Option<String>,
    /// For an unknown key: the closest valid key at that level.
    pub suggestion: Option<String>,
    /// A byte range inside a string value (e.g. the position of a regex error).
    pub within: Option<std::ops::Range<usize>>,
}

impl Issue {
    pub(crate) fn new(
        pointer: impl Into<String>,
        message: impl Into<String>,
        label: impl Into<String>,
    ) -> Issue {
        Issue {
            pointer: pointer.into(),
            at_key: false,
            message: message.into(),
            label: label.into(),
            help: None,
            suggestion: None,
            within: None,
        }
    }

    pub(crate) fn help(mut self, help: impl Into<String>) -> Issue {
        self.help = Some(help.into());
        self
    }
}

/// The keywords the walker understands; anything else in the schema is documentation only.
#[cfg(test)]
pub(crate) const KNOWN_KEYWORDS: &[&str] = &[
    "$ref",
    "$defs",
    "$schema",
    "type",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "properties",
    "additionalProperties",
    "required",
    "items",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "format",
    "description",
    "default",
    "title",
];

pub(crate) fn check(schema: &Value, value: &Value) -> Vec<Issue> {
    let mut walker = Walker {
        root: schema,
        issues: Vec::new(),
    };
    walker.check(schema, value, "");
    walker.issues
}

struct Walker<'s> {
    root: &'s Value,
    issues: Vec<Issue>,
}

impl<'s> Walker<'s> {
    fn resolve(&self, mut schema: &'s Value) -> &'s Value {
        while let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            let Some(name) = reference.strip_prefix("#/$defs/") else {
                break;
            };
            match self.root.get("$defs").and_then(|d| d.get(name)) {
                Some(target) => schema = target,
                None => break,
            }
        }
        schema
    }

    fn check(&mut self, schema: &'s Value, value: &Value, pointer: &str) {
        let schema = self.resolve(schema);
        if let Some(branches) = schema
            .get("anyOf")
            .or_else(|| schema.get("oneOf"))
            .and_then(Value::as_array)
        {
            match self.pick_branch(branches, value) {
                Some(branch) => self.check(branch, value, pointer),
                None => {
                    let expected = branches
                        .iter()
                        .map(|b| self.describe(b))
                        .collect::<Vec<_>>()
                        .join(" or ");
                    self.issues.push(wrong_type(pointer, &expected, value));
                }
            }
            return;
        }
        if let Some(types) = schema.get("type")
            && !type_matches(types, value)
        {
            let expected = self.describe(schema);
            self.issues.push(wrong_type(pointer, &expected, value));
            return;
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            let names: Vec<String> = allowed.iter().map(show).collect();
            let mut issue = Issue::new(
                pointer,
                format!(
                    "{} cannot be {}: use one of {}",
                    key_name(pointer),
                    show(value),
                    names.join(", ")
                ),
                format!("one of {}", names.join(", ")),
            );
            if let Some(text) = value.as_str() {
                let candidates = allowed.iter().filter_map(Value::as_str);
                if let Some(best) = closest(text, candidates) {
                    issue = issue.help(format!("did you mean \"{best}\"?"));
                }
            }
            self.issues.push(issue);
            return;
        }
        if let Some(constant) = schema.get("const")
            && constant != value
        {
            self.issues.push(Issue::new(
                pointer,
                format!("{} must be {}", key_name(pointer), show(constant)),
                format!("expected {}", show(constant)),
            ));
            return;
        }
        if let (Some("duration"), Some(text)) =
            (schema.get("format").and_then(Value::as_str), value.as_str())
            && let Err(e) = humantime::parse_duration(text)
        {
            self.issues.push(
                    Issue::new(pointer, format!("{} is not a duration: {e}", key_name(pointer)), "not a duration")
                        .help("write a number of seconds, or a string with units such as \"500ms\", \"5s\", \"10m\""),
                );
        }
        match value {
            Value::Number(number) => self.check_range(schema, number, pointer),
            Value::Array(items) => self.check_array(schema, items, pointer),
            Value::Object(members) => self.check_object(schema, members, pointer),
            _ => {}
        }
    }

    /// For `anyOf`/`oneOf`: the branch whose type fits the value; among several object branches,
    /// the one whose required keys the value has.
    fn pick_branch(&self, branches: &'s [Value], value: &Value) -> Option<&'s Value> {
        let fitting: Vec<&'s Value> = branches
            .iter()
            .map(|b| self.resolve(b))
            .filter(|b| self.branch_accepts_type(b, value))
            .collect();
        // An enum with documented variants is one `const` branch per variant: the value's own
        // branch, or none (the error then lists every allowed value).
        if fitting.iter().any(|b| b.get("const").is_some()) {
            return fitting
                .iter()
                .find(|b| b.get("const").is_none_or(|c| c == value))
                .copied();
        }
        if let (Value::Object(members), true) = (value, fitting.len() > 1) {
            let with_keys = fitting.iter().find(|b| {
                b.get("required")
                    .and_then(Value::as_array)
                    .is_some_and(|req| {
                        req.iter()
                            .filter_map(Value::as_str)
                            .all(|k| members.contains_key(k))
                    })
            });
            if let Some(branch) = with_keys {
                return Some(branch);
            }
        }
        fitting.first().copied()
    }

    fn branch_accepts_type(&self, branch: &Value, value: &Value) -> bool {
        if let Some(types) = branch.get("type") {
            return type_matches(types, value);
        }
        if let Some(allowed) = branch.get("enum").and_then(Value::as_array) {
            return allowed.iter().any(|a| same_type(a, value));
        }
        if let Some(constant) = branch.get("const") {
            return same_type(constant, value);
        }
        if let Some(inner) = branch
            .get("anyOf")
            .or_else(|| branch.get("oneOf"))
            .and_then(Value::as_array)
        {
            return inner
                .iter()
                .any(|b| self.branch_accepts_type(self.resolve(b), value));
        }
        branch.get("properties").is_some() && value.is_object()
    }

    fn check_range(&mut self, schema: &Value, number: &serde_json::Number, pointer: &str) {
        let Some(n) = number.as_f64() else { return };
        let min = schema.get("minimum").and_then(Value::as_f64);
        let max = schema.get("maximum").and_then(Value::as_f64);
        if min.is_some_and(|m| n < m) || max.is_some_and(|m| n > m) {
            let range = match (min, max) {
                (Some(lo), Some(hi)) => format!("from {lo} to {hi}"),
                (Some(lo), None) => format!("at least {lo}"),
                (None, Some(hi)) => format!("at most {hi}"),
                (None, None) => unreachable!(),
            };
            self.issues.push(Issue::new(
                pointer,
                format!("{} must be {range}, not {number}", key_name(pointer)),
                format!("must be {range}"),
            ));
        }
    }

    fn check_array(&mut self, schema: &'s Value, items: &[Value], pointer: &str) {
        let min = schema.get("minItems").and_then(Value::as_u64);
        let max = schema.get("maxItems").and_then(Value::as_u64);
        let len = items.len() as u64;
        if min.is_some_and(|m| len < m) || max.is_some_and(|m| len > m) {
            let expected = match (min, max) {
                (Some(lo), Some(hi)) if lo == hi => format!("exactly {lo} items"),
                (Some(lo), Some(hi)) => format!("{lo} to {hi} items"),
                (Some(lo), None) => format!("at least {lo} items"),
                (None, Some(hi)) => format!("at most {hi} items"),
                (None, None) => unreachable!(),
            };
            self.issues.push(Issue::new(
                pointer,
                format!("{} must have {expected}, not {len}", key_name(pointer)),
                format!("expected {expected}"),
            ));
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                self.check(item_schema, item, &format!("{pointer}/{i}"));
            }
        }
    }

    fn check_object(&mut self, schema: &'s Value, members: &Map<String, Value>, pointer: &str) {
        let properties = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        for (key, member) in members {
            let child = format!("{pointer}/{}", escape_segment(key));
            if let Some(property) = properties.and_then(|p| p.get(key)) {
                self.check(property, member, &child);
            } else if let Some(extra @ Value::Object(_)) = additional {
                self.check(extra, member, &child);
            } else if additional == Some(&Value::Bool(false)) {
                let valid = properties
                    .map(|p| p.keys().map(String::as_str).collect::<Vec<_>>())
                    .unwrap_or_default();
                let suggestion = closest(key, valid.iter().copied()).map(str::to_owned);
                let place = if pointer.is_empty() {
                    "at the top level".to_owned()
                } else {
                    format!("in `{}`", dotted(pointer))
                };
                let mut issue = Issue::new(
                    &child,
                    format!("unknown key `{key}` {place}"),
                    "unknown key",
                );
                issue.at_key = true;
                issue.help = Some(match &suggestion {
                    Some(best) => format!("did you mean `{best}`?"),
                    None => format!("valid keys here: {}", valid.join(", ")),
                });
                issue.suggestion = suggestion;
                self.issues.push(issue);
            }
        }
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for key in required.iter().filter_map(Value::as_str) {
                if !members.contains_key(key) {
                    self.issues.push(Issue::new(
                        pointer,
                        format!("{} needs the key `{key}`", key_name(pointer)),
                        format!("`{key}` missing"),
                    ));
                }
            }
        }
    }

    /// A short description of what a schema accepts ("a boolean", "one of mirror, steal, off").
    fn describe(&self, schema: &Value) -> String {
        let schema = self.resolve(schema);
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            return format!(
                "one of {}",
                allowed.iter().map(show).collect::<Vec<_>>().join(", ")
            );
        }
        if let Some(constant) = schema.get("const") {
            return show(constant);
        }
        if let Some(branches) = schema
            .get("anyOf")
            .or_else(|| schema.get("oneOf"))
            .and_then(Value::as_array)
        {
            let constants: Option<Vec<String>> = branches
                .iter()
                .map(|b| self.resolve(b).get("const").map(show))
                .collect();
            if let Some(constants) = constants {
                return format!("one of {}", constants.join(", "));
            }
            return branches
                .iter()
                .map(|b| self.describe(b))
                .collect::<Vec<_>>()
                .join(" or ");
        }
        if let (Some(Value::Object(_)), Some(required)) = (
            schema.get("properties"),
            schema.get("required").and_then(Value::as_array),
        ) && let [Value::String(only)] = required.as_slice()
        {
            return format!("{{ \"{only}\": … }}");
        }
        match schema.get("type") {
            Some(Value::String(t)) => type_name(t).to_owned(),
            Some(Value::Array(types)) => types
                .iter()
                .filter_map(Value::as_str)
                .filter(|t| *t != "null")
                .map(type_name)
                .collect::<Vec<_>>()
                .join(" or "),
            _ => "a valid value".to_owned(),
        }
    }
}

fn wrong_type(pointer: &str, expected: &str, value: &Value) -> Issue {
    Issue::new(
        pointer,
        format!(
            "{} must be {expected}, not {}",
            key_name(pointer),
            describe_value(value)
        ),
        format!("expected {expected}"),
    )
}

fn type_name(t: &str) -> &'static str {
    match t {
        "string" => "a string",
        "integer" => "a whole number",
        "number" => "a number",
        "boolean" => "true or false",
        "array" => "a list",
        "object" => "a table of keys",
        "null" => "null",
        _ => "a value",
    }
}

fn type_matches(types: &Value, value: &Value) -> bool {
    let one = |t: &str| match t {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        "number" => value.is_number(),
        "integer" => value.is_i64() || value.is_u64(),
        _ => true,
    };
    match types {
        Value::String(t) => one(t),
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).any(one),
        _ => true,
    }
}

fn same_type(a: &Value, b: &Value) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

fn describe_value(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("the string \"{s}\""),
        Value::Array(_) => "a list".to_owned(),
        Value::Object(_) => "a table".to_owned(),
    }
}

fn show(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `/feature/network/incoming` → `feature.network.incoming`; list indices as `[i]`.
pub(crate) fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&segment);
        }
    }
    out
}

fn key_name(pointer: &str) -> String {
    if pointer.is_empty() {
        "the configuration".to_owned()
    } else {
        format!("`{}`", dotted(pointer))
    }
}

/// The candidate closest to `word`, when it is close enough to be a plausible typo.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    candidates
        .map(|c| (strsim::jaro_winkler(&word, &c.to_ascii_lowercase()), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}
