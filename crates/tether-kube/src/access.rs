//! The permissions tether needs, each checked with a SelfSubjectAccessReview.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::{Api, Client, api::PostParams};

/// One permission: `verb` on `group`/`resource`[`/subresource`], and what needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permission {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: &'static str,
    pub why: &'static str,
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            String::new()
        } else {
            format!(".{}", self.group)
        };
        let sub = if self.subresource.is_empty() {
            String::new()
        } else {
            format!("/{}", self.subresource)
        };
        write!(f, "{} {}{group}{sub}", self.verb, self.resource)
    }
}

const fn p(
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    subresource: &'static str,
    why: &'static str,
) -> Permission {
    Permission {
        verb,
        group,
        resource,
        subresource,
        why,
    }
}

/// What `deploy/rbac.yaml` grants, in the order a session uses it.
pub const NEEDED: [Permission; 15] = [
    p("get", "", "pods", "", "find the target pod"),
    p("list", "", "pods", "", "find a workload's pods; tether ls"),
    p("watch", "", "pods", "", "wait for the agent pod"),
    p("get", "apps", "deployments", "", "deploy/ targets"),
    p("list", "apps", "deployments", "", "tether ls"),
    p("get", "apps", "statefulsets", "", "statefulset/ targets"),
    p("list", "apps", "statefulsets", "", "tether ls"),
    p("get", "apps", "replicasets", "", "replicaset/ targets"),
    p("create", "batch", "jobs", "", "start the agent"),
    p("get", "batch", "jobs", "", "job/ targets"),
    p("delete", "batch", "jobs", "", "remove the agent"),
    p("get", "", "pods", "portforward", "reach the agent"),
    p(
        "create",
        "",
        "pods",
        "portforward",
        "reach the agent (WebSocket, Kubernetes 1.35+)",
    ),
    p(
        "patch",
        "",
        "pods",
        "ephemeralcontainers",
        "agent.ephemeral",
    ),
    p(
        "list",
        "",
        "events",
        "",
        "explain an agent pod that does not start",
    ),
];

/// Asks the API server whether the current user may do `permission` in `namespace`.
pub async fn check(
    client: &Client,
    namespace: &str,
    permission: &Permission,
) -> kube::Result<bool> {
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_owned()),
                verb: Some(permission.verb.to_owned()),
                group: Some(permission.group.to_owned()),
                resource: Some(permission.resource.to_owned()),
                subresource: (!permission.subresource.is_empty())
                    .then(|| permission.subresource.to_owned()),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let answer = api.create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::rbac::v1::Role;

    use super::*;

    /// The Role users apply grants exactly what `tether doctor` checks.
    #[test]
    fn the_shipped_role_grants_exactly_what_is_checked() {
        let text = include_str!("../../../deploy/rbac.yaml");
        let role: Role = serde_saphyr::from_str(text).unwrap();
        let mut granted: Vec<String> = Vec::new();
        for rule in role.rules.unwrap_or_default() {
            for group in rule.api_groups.unwrap_or_default() {
                for resource in rule.resources.clone().unwrap_or_default() {
                    for verb in &rule.verbs {
                        granted.push(format!("{verb} {group}/{resource}"));
                    }
                }
            }
        }
        let mut needed: Vec<String> = NEEDED
            .iter()
            .map(|p| {
                let sub = if p.subresource.is_empty() {
                    String::new()
                } else {
                    format!("/{}", p.subresource)
                };
                format!("{} {}/{}{sub}", p.verb, p.group, p.resource)
            })
            .collect();
        granted.sort();
        needed.sort();
        assert_eq!(granted, needed);
    }
}
