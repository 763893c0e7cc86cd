//! Target paths: what `--target` and `target.path` name.

use std::{fmt, str::FromStr};

/// What tether runs against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A named network namespace on this host (`ip netns`): `netns/NAME`.
    Netns(String),
    /// A process on this host, whose namespaces are used: `pid/PID`.
    Pid(u32),
    /// A Kubernetes pod or workload: `deploy/api`, `pod/api-7d9c/container/app`, …
    Kube(KubeTarget),
    /// No target: outgoing traffic, DNS and files from an agent in the namespace, no incoming.
    Targetless,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeTarget {
    pub kind: KubeKind,
    pub name: String,
    pub container: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeKind {
    Pod,
    Deployment,
    StatefulSet,
    ReplicaSet,
    Job,
}

impl KubeKind {
    fn parse(word: &str) -> Option<KubeKind> {
        Some(match word {
            "pod" | "po" => KubeKind::Pod,
            "deploy" | "deployment" => KubeKind::Deployment,
            "statefulset" | "sts" => KubeKind::StatefulSet,
            "replicaset" | "rs" => KubeKind::ReplicaSet,
            "job" => KubeKind::Job,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KubeKind::Pod => "pod",
            KubeKind::Deployment => "deploy",
            KubeKind::StatefulSet => "statefulset",
            KubeKind::ReplicaSet => "replicaset",
            KubeKind::Job => "job",
        }
    }
}

/// The forms a target can take, for error messages and `--help`.
pub const TARGET_FORMS: &str = "netns/NAME, pid/PID, pod/NAME, deploy/NAME, statefulset/NAME, \
replicaset/NAME, job/NAME (Kubernetes forms may end in /container/NAME), or targetless";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{given}` is not a target: {reason}")]
pub struct TargetError {
    pub given: String,
    pub reason: String,
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(given: &str) -> Result<Target, TargetError> {
        let fail = |reason: String| TargetError {
            given: given.to_owned(),
            reason,
        };
        if given == "targetless" {
            return Ok(Target::Targetless);
        }
        let parts: Vec<&str> = given.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(fail(format!("a part is empty; use one of {TARGET_FORMS}")));
        }
        match parts.as_slice() {
            ["netns", name] => Ok(Target::Netns((*name).to_owned())),
            ["pid", pid] => pid
                .parse()
                .ok()
                .filter(|p| *p > 0)
                .map(Target::Pid)
                .ok_or_else(|| fail(format!("`{pid}` is not a process id"))),
            [kind, rest @ ..] => {
                let kind = KubeKind::parse(kind).ok_or_else(|| {
                    fail(format!(
                        "`{kind}` is not a kind of target; use one of {TARGET_FORMS}"
                    ))
                })?;
                let (name, container) = match rest {
                    [name] => (*name, None),
                    [name, "container", container] => (*name, Some((*container).to_owned())),
                    _ => {
                        return Err(fail(format!(
                            "expected {}/NAME optionally followed by /container/NAME",
                            kind.as_str()
                        )));
                    }
                };
                Ok(Target::Kube(KubeTarget {
                    kind,
                    name: name.to_owned(),
                    container,
                }))
            }
            [] => Err(fail(format!("use one of {TARGET_FORMS}"))),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Netns(name) => write!(f, "netns/{name}"),
            Target::Pid(pid) => write!(f, "pid/{pid}"),
            Target::Targetless => f.write_str("targetless"),
            Target::Kube(k) => k.fmt(f),
        }
    }
}

impl fmt::Display for KubeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.as_str(), self.name)?;
        if let Some(container) = &self.container {
            write!(f, "/container/{container}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_and_prints_back() {
        for text in [
            "netns/pod-a",
            "pid/42",
            "pod/api-7d9c",
            "deploy/api",
            "statefulset/db",
            "replicaset/api-5f",
            "job/migrate",
            "deploy/api/container/app",
            "targetless",
        ] {
            let target: Target = text.parse().unwrap();
            assert_eq!(target.to_string(), text);
        }
        assert_eq!(
            "deployment/api".parse::<Target>().unwrap().to_string(),
            "deploy/api"
        );
    }

    #[test]
    fn bad_targets_say_what_is_wrong() {
        for (text, needle) in [
            ("deploy", "expected deploy/NAME"),
            ("pid/abc", "not a process id"),
            ("pid/0", "not a process id"),
            ("service/api", "not a kind of target"),
            ("deploy/api/sidecar/x", "/container/NAME"),
            ("deploy//x", "empty"),
            ("", "empty"),
        ] {
            let err = text.parse::<Target>().unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
