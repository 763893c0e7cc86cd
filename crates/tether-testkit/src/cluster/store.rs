//! The simulator's objects and their history: what list, get and watch read.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// A resource the simulator serves: its plural name, API group/version and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Resource {
    pub(crate) plural: &'static str,
    /// `""` for the core group.
    pub(crate) group: &'static str,
    pub(crate) version: &'static str,
    pub(crate) kind: &'static str,
}

pub(crate) const PODS: Resource = Resource {
    plural: "pods",
    group: "",
    version: "v1",
    kind: "Pod",
};
pub(crate) const EVENTS: Resource = Resource {
    plural: "events",
    group: "",
    version: "v1",
    kind: "Event",
};
pub(crate) const DEPLOYMENTS: Resource = Resource {
    plural: "deployments",
    group: "apps",
    version: "v1",
    kind: "Deployment",
};
pub(crate) const REPLICASETS: Resource = Resource {
    plural: "replicasets",
    group: "apps",
    version: "v1",
    kind: "ReplicaSet",
};
pub(crate) const STATEFULSETS: Resource = Resource {
    plural: "statefulsets",
    group: "apps",
    version: "v1",
    kind: "StatefulSet",
};
pub(crate) const JOBS: Resource = Resource {
    plural: "jobs",
    group: "batch",
    version: "v1",
    kind: "Job",
};

pub(crate) const ALL: [Resource; 6] = [PODS, EVENTS, DEPLOYMENTS, REPLICASETS, STATEFULSETS, JOBS];

impl Resource {
    pub(crate) fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub(crate) fn find(group: &str, version: &str, plural: &str) -> Option<Resource> {
        ALL.into_iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key {
    pub(crate) resource: Resource,
    pub(crate) namespace: String,
    pub(crate) name: String,
}

/// One entry of the history a watch replays: `ADDED`, `MODIFIED` or `DELETED`.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub(crate) version: u64,
    pub(crate) key: Key,
    pub(crate) kind: &'static str,
    pub(crate) object: Value,
}

#[derive(Debug, Default)]
pub(crate) struct Store {
    version: u64,
    objects: BTreeMap<Key, Value>,
    changes: Vec<Change>,
}

impl Store {
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    pub(crate) fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key)
    }

    /// Objects of `resource` in `namespace` (all namespaces for `None`).
    pub(crate) fn list(&self, resource: Resource, namespace: Option<&str>) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|(k, _)| k.resource == resource && namespace.is_none_or(|ns| k.namespace == ns))
            .map(|(_, v)| v)
            .collect()
    }

    /// Creates or replaces an object, stamping what the API server stamps.
    pub(crate) fn put(&mut self, resource: Resource, mut object: Value) -> Value {
        self.version += 1;
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .expect("objects have names")
            .to_owned();
        let key = Key {
            resource,
            namespace: namespace.clone(),
            name,
        };
        let existing = self.objects.get(&key);
        let kind = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let uid = existing
            .and_then(|e| e["metadata"]["uid"].as_str().map(str::to_owned))
            .or_else(|| object["metadata"]["uid"].as_str().map(str::to_owned))
            .unwrap_or_else(new_uid);
        let created = existing
            .and_then(|e| {
                e["metadata"]["creationTimestamp"]
                    .as_str()
                    .map(str::to_owned)
            })
            .unwrap_or_else(now);
        object["apiVersion"] = json!(resource.api_version());
        object["kind"] = json!(resource.kind);
        let meta = &mut object["metadata"];
        meta["namespace"] = json!(namespace);
        meta["uid"] = json!(uid);
        meta["resourceVersion"] = json!(self.version.to_string());
        meta["creationTimestamp"] = json!(created);
        self.objects.insert(key.clone(), object.clone());
        self.changes.push(Change {
            version: self.version,
            key,
            kind,
            object: object.clone(),
        });
        object
    }

    pub(crate) fn delete(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        self.version += 1;
        object["metadata"]["resourceVersion"] = json!(self.version.to_string());
        self.changes.push(Change {
            version: self.version,
            key: key.clone(),
            kind: "DELETED",
            object: object.clone(),
        });
        Some(object)
    }

    /// Changes after `version`, oldest first.
    pub(crate) fn changes_after(&self, version: u64) -> impl Iterator<Item = &Change> {
        let start = self.changes.partition_point(|c| c.version <= version);
        self.changes[start..].iter()
    }
}

pub(crate) fn new_uid() -> String {
    let a: u128 = rand::random();
    let h = format!("{a:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// RFC 3339 in UTC, seconds precision, as the API server writes timestamps.
pub(crate) fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Label selectors as the API server reads them: `a=b`, `a==b`, `a!=b`, `a`, `!a`,
/// `a in (x,y)`, `a notin (x,y)`, joined by commas. `Err` for what it cannot parse (the API
/// answers 400).
pub(crate) fn parse_labels(selector: &str) -> Result<Vec<LabelTerm>, String> {
    let mut terms = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    let bytes = selector.as_bytes();
    for i in 0..=bytes.len() {
        match bytes.get(i) {
            Some(b'(') => depth += 1,
            Some(b')') => depth -= 1,
            Some(b',') if depth == 0 => {}
            None => {}
            Some(_) => continue,
        }
        if bytes.get(i).is_some_and(|b| *b != b',') {
            continue;
        }
        let term = selector[start..i].trim();
        start = i + 1;
        if !term.is_empty() {
            terms.push(LabelTerm::parse(term)?);
        }
    }
    Ok(terms)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LabelTerm {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl LabelTerm {
    fn parse(term: &str) -> Result<LabelTerm, String> {
        let bad = || format!("unable to parse requirement: {term:?}");
        let set = |rest: &str| -> Result<Vec<String>, String> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(bad)?;
            Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
        };
        if let Some((key, rest)) = term.split_once(" notin ") {
            return Ok(LabelTerm::NotIn(key.trim().to_owned(), set(rest)?));
        }
        if let Some((key, rest)) = term.split_once(" in ") {
            return Ok(LabelTerm::In(key.trim().to_owned(), set(rest)?));
        }
        if let Some((k, v)) = term.split_once("!=") {
            return Ok(LabelTerm::NotEquals(
                k.trim().to_owned(),
                v.trim().to_owned(),
            ));
        }
        if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            return Ok(LabelTerm::Equals(k.trim().to_owned(), v.trim().to_owned()));
        }
        let valid = |k: &str| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
        };
        match term.strip_prefix('!') {
            Some(key) if valid(key.trim()) => Ok(LabelTerm::DoesNotExist(key.trim().to_owned())),
            None if valid(term) => Ok(LabelTerm::Exists(term.to_owned())),
            _ => Err(bad()),
        }
    }

    fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels[k].as_str();
        match self {
            LabelTerm::Equals(k, v) => get(k) == Some(v.as_str()),
            LabelTerm::NotEquals(k, v) => get(k) != Some(v.as_str()),
            LabelTerm::In(k, set) => get(k).is_some_and(|v| set.iter().any(|s| s == v)),
            LabelTerm::NotIn(k, set) => get(k).is_none_or(|v| set.iter().all(|s| s != v)),
            LabelTerm::Exists(k) => get(k).is_some(),
            LabelTerm::DoesNotExist(k) => get(k).is_none(),
        }
    }
}

/// True when `object` matches every term.
pub(crate) fn terms_match(terms: &[LabelTerm], object: &Value) -> bool {
    let labels = &object["metadata"]["labels"];
    terms.iter().all(|t| t.matches(labels))
}

/// [`parse_labels`] and [`terms_match`] in one; a selector that does not parse matches nothing.
pub(crate) fn labels_match(selector: &str, object: &Value) -> bool {
    parse_labels(selector).is_ok_and(|terms| terms_match(&terms, object))
}

/// Field selectors on the fields tether uses (`metadata.name`, `involvedObject.name`, …).
pub(crate) fn fields_match(selector: &str, object: &Value) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (path, want, equal) = match term.split_once("!=") {
            Some((p, v)) => (p, v, false),
            None => match term.split_once("==").or_else(|| term.split_once('=')) {
                Some((p, v)) => (p, v, true),
                None => return false,
            },
        };
        let value = path
            .split('.')
            .fold(object, |v, part| &v[part])
            .as_str()
            .unwrap_or("");
        (value == want) == equal
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        let t = now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }

    #[test]
    fn selectors() {
        let pod = json!({"metadata": {"name": "api-1", "labels": {"app": "api", "tier": "web"}}});
        assert!(labels_match("app=api", &pod));
        assert!(labels_match("app==api,tier", &pod));
        assert!(labels_match("app=api,!canary", &pod));
        assert!(!labels_match("app=db", &pod));
        assert!(!labels_match("app!=api", &pod));
        assert!(labels_match("tier in (web,edge),app", &pod));
        assert!(!labels_match("tier notin (web, edge)", &pod));
        assert!(labels_match("tier notin (edge)", &pod));
        assert!(!labels_match("tier in (edge)", &pod));
        assert!(parse_labels("app in web").is_err());
        assert!(parse_labels("a b").is_err());
        assert!(fields_match("metadata.name=api-1", &pod));
        assert!(!fields_match("metadata.name=api-2", &pod));
        assert!(fields_match("metadata.name!=api-2", &pod));
    }
}
