//! Which HTTP requests a filtered steal takes. Pure: compiled from the protocol's filter tree,
//! unit-tested on request heads.
//!
//! - `header`: a regex over each header as `Name: value`; the name matches case-insensitively
//!   (tried as sent on the wire by HTTP/2, lower case, and as `Title-Case`).
//! - `path`: a regex over the path, then over path and query.
//! - `method`: a regex over the method.
//! - `all_of` / `any_of`: every / any inner rule.
//!
//! Kubelet probes (`User-Agent: kube-probe/…`) are never stolen unless the subscription says so.

use http::{HeaderMap, Method, Uri};
use regex::Regex;
use tether_protocol::{HttpFilter, http_filter::Rule as WireRule};

#[derive(Debug)]
enum Rule {
    Header(Regex),
    Path(Regex),
    Method(Regex),
    AllOf(Vec<Rule>),
    AnyOf(Vec<Rule>),
}

/// How a stolen port's HTTP requests are routed.
#[derive(Debug)]
pub(crate) struct Route {
    /// `None`: every request (a whole-port steal that turned out to be HTTP).
    filter: Option<Rule>,
    steal_probes: bool,
}

impl Route {
    pub(crate) fn new(filter: Option<&HttpFilter>, steal_probes: bool) -> Result<Route, String> {
        Ok(Route {
            filter: filter.map(compile).transpose()?,
            steal_probes,
        })
    }

    pub(crate) fn is_filtered(&self) -> bool {
        self.filter.is_some()
    }

    /// True when the request goes to the local process.
    pub(crate) fn takes(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        if !self.steal_probes && is_probe(headers) {
            return false;
        }
        self.filter
            .as_ref()
            .is_none_or(|rule| rule.matches(method, uri, headers))
    }
}

fn compile(filter: &HttpFilter) -> Result<Rule, String> {
    let regex = |pattern: &str| {
        Regex::new(pattern).map_err(|e| format!("invalid filter regex {pattern:?}: {e}"))
    };
    match &filter.rule {
        Some(WireRule::Header(p)) => Ok(Rule::Header(regex(p)?)),
        Some(WireRule::Path(p)) => Ok(Rule::Path(regex(p)?)),
        Some(WireRule::Method(p)) => Ok(Rule::Method(regex(p)?)),
        Some(WireRule::AllOf(list)) => Ok(Rule::AllOf(
            list.filters.iter().map(compile).collect::<Result<_, _>>()?,
        )),
        Some(WireRule::AnyOf(list)) => Ok(Rule::AnyOf(
            list.filters.iter().map(compile).collect::<Result<_, _>>()?,
        )),
        None => Err("an HTTP filter without a rule (from a newer client?)".into()),
    }
}

impl Rule {
    fn matches(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        match self {
            Rule::Header(regex) => headers.iter().any(|(name, value)| {
                let Ok(value) = value.to_str() else {
                    return false;
                };
                let lower = name.as_str();
                regex.is_match(&format!("{lower}: {value}"))
                    || regex.is_match(&format!("{}: {value}", title_case(lower)))
            }),
            Rule::Path(regex) => {
                regex.is_match(uri.path())
                    || uri
                        .path_and_query()
                        .is_some_and(|pq| regex.is_match(pq.as_str()))
            }
            Rule::Method(regex) => regex.is_match(method.as_str()),
            Rule::AllOf(rules) => rules.iter().all(|r| r.matches(method, uri, headers)),
            Rule::AnyOf(rules) => rules.iter().any(|r| r.matches(method, uri, headers)),
        }
    }
}

/// `x-dev-name` → `X-Dev-Name`.
fn title_case(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// A kubelet probe, which must keep reaching the original app (field notes §2).
pub(crate) fn is_probe(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|agent| agent.starts_with("kube-probe/"))
}

#[cfg(test)]
mod tests {
    use tether_protocol::HttpFilterList;

    use super::*;

    fn rule(r: WireRule) -> HttpFilter {
        HttpFilter { rule: Some(r) }
    }

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> (Method, Uri, HeaderMap) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        (method.parse().unwrap(), uri.parse().unwrap(), map)
    }

    fn takes(route: &Route, method: &str, uri: &str, headers: &[(&str, &str)]) -> bool {
        let (m, u, h) = request(method, uri, headers);
        route.takes(&m, &u, &h)
    }

    #[test]
    fn a_header_filter_matches_whatever_the_name_case() {
        for pattern in ["^X-Dev: alice$", "^x-dev: alice$"] {
            let route = Route::new(Some(&rule(WireRule::Header(pattern.into()))), false).unwrap();
            assert!(
                takes(&route, "GET", "/", &[("X-DEV", "alice")]),
                "{pattern}"
            );
            assert!(!takes(&route, "GET", "/", &[("x-dev", "bob")]), "{pattern}");
            assert!(!takes(&route, "GET", "/", &[]), "{pattern}");
        }
    }

    #[test]
    fn path_matches_path_then_path_and_query_and_method_matches_method() {
        let route = Route::new(Some(&rule(WireRule::Path("^/api/".into()))), false).unwrap();
        assert!(takes(&route, "GET", "/api/orders?x=1", &[]));
        assert!(!takes(&route, "GET", "/health", &[]));
        let route = Route::new(Some(&rule(WireRule::Path("dev=1".into()))), false).unwrap();
        assert!(
            takes(&route, "GET", "/x?dev=1", &[]),
            "the query counts in the second try"
        );
        let route =
            Route::new(Some(&rule(WireRule::Method("^(POST|PUT)$".into()))), false).unwrap();
        assert!(takes(&route, "POST", "/", &[]) && !takes(&route, "GET", "/", &[]));
    }

    #[test]
    fn all_of_and_any_of_combine() {
        let both = HttpFilterList {
            filters: vec![
                rule(WireRule::Header("^x-dev: a$".into())),
                rule(WireRule::Path("^/api".into())),
            ],
        };
        let all = Route::new(Some(&rule(WireRule::AllOf(both.clone()))), false).unwrap();
        let any = Route::new(Some(&rule(WireRule::AnyOf(both))), false).unwrap();
        assert!(takes(&all, "GET", "/api", &[("x-dev", "a")]));
        assert!(!takes(&all, "GET", "/api", &[]));
        assert!(takes(&any, "GET", "/api", &[]));
        assert!(!takes(&any, "GET", "/other", &[]));
    }

    #[test]
    fn probes_stay_with_the_app_unless_asked_for() {
        let whole = Route::new(None, false).unwrap();
        assert!(takes(&whole, "GET", "/", &[]));
        assert!(!takes(
            &whole,
            "GET",
            "/healthz",
            &[("user-agent", "kube-probe/1.30")]
        ));
        let filtered =
            Route::new(Some(&rule(WireRule::Header("^x-dev: a$".into()))), false).unwrap();
        assert!(!takes(
            &filtered,
            "GET",
            "/",
            &[("x-dev", "a"), ("user-agent", "kube-probe/1.30")]
        ));
        let probes_too = Route::new(None, true).unwrap();
        assert!(takes(
            &probes_too,
            "GET",
            "/healthz",
            &[("user-agent", "kube-probe/1.30")]
        ));
    }

    #[test]
    fn a_bad_regex_or_an_empty_rule_is_refused() {
        assert!(Route::new(Some(&rule(WireRule::Header("(".into()))), false).is_err());
        assert!(Route::new(Some(&HttpFilter { rule: None }), false).is_err());
    }
}
