//! Checks that need more than the schema: regexes compile, exclusive settings, the target parses.

use std::ops::Range;

use crate::{
    model::{Config, HttpFilterConfig, IncomingMode, InnerFilter, TrafficFilterConfig},
    target::{TARGET_FORMS, Target},
    validate::Issue,
};

pub(crate) fn check(config: &Config) -> Vec<Issue> {
    let mut issues = Vec::new();
    if let Some(path) = &config.target.path
        && let Err(e) = path.parse::<Target>()
    {
        issues.push(
            Issue::new("/target/path", e.to_string(), "not a target")
                .help(format!("targets look like: {TARGET_FORMS}")),
        );
    }
    let incoming = &config.feature.network.incoming;
    http_filter(
        &incoming.http_filter,
        "/feature/network/incoming/http_filter",
        &mut issues,
    );
    for (list, name) in [
        (incoming.ports.as_deref().unwrap_or_default(), "ports"),
        (&incoming.ignore_ports[..], "ignore_ports"),
        (
            incoming.http_filter.ports.as_deref().unwrap_or_default(),
            "http_filter/ports",
        ),
    ] {
        for (i, port) in list.iter().enumerate() {
            if *port == 0 {
                issues.push(Issue::new(
                    format!("/feature/network/incoming/{name}/{i}"),
                    "port 0 is not a port that can be subscribed",
                    "port 0",
                ));
            }
        }
    }
    if incoming.mirror_all_replicas && incoming.mode != IncomingMode::Mirror {
        issues.push(
            Issue::new(
                "/feature/network/incoming/mirror_all_replicas",
                "mirror_all_replicas needs `mode: mirror`: a steal takes the traffic of one pod",
                "needs mode: mirror",
            )
            .help("set feature.network.incoming.mode to mirror, or drop mirror_all_replicas"),
        );
    }
    for (i, pair) in incoming.port_mapping.iter().enumerate() {
        if pair.contains(&0) {
            issues.push(
                Issue::new(
                    format!("/feature/network/incoming/port_mapping/{i}"),
                    "a port mapping cannot use port 0",
                    "port 0",
                )
                .help("write pairs as [local, remote], e.g. [8080, 80]"),
            );
        }
    }
    exclusive(
        &config.feature.network.outgoing.filter,
        "/feature/network/outgoing/filter",
        &mut issues,
    );
    exclusive(
        &config.feature.network.dns.filter,
        "/feature/network/dns/filter",
        &mut issues,
    );
    let env = &config.feature.env;
    if env.include.is_some() && env.exclude.is_some() {
        issues.push(Issue::new("/feature/env/exclude", "`include` and `exclude` cannot both be set", "conflicts with `include`")
            .help("`include` imports only the listed variables; `exclude` imports all but the listed ones: pick one"));
    }
    let fs = &config.feature.fs;
    for (list, name) in [
        (&fs.read_write, "read_write"),
        (&fs.read_only, "read_only"),
        (&fs.local, "local"),
        (&fs.not_found, "not_found"),
    ] {
        for (i, pattern) in list.iter().enumerate() {
            regex(pattern, &format!("/feature/fs/{name}/{i}"), &mut issues);
        }
    }
    if config.keepalive.timeout <= config.keepalive.interval {
        issues.push(Issue::new("/keepalive/timeout", format!("the keepalive timeout ({}) must be longer than the interval ({})", config.keepalive.timeout, config.keepalive.interval), "not longer than the interval")
            .help("a link is declared dead after `timeout` without frames; with pings every `interval`, make it at least twice as long"));
    }
    if config.reconnect.initial > config.reconnect.max_delay {
        issues.push(Issue::new(
            "/reconnect/initial",
            format!(
                "the first reconnect delay ({}) is longer than the maximum ({})",
                config.reconnect.initial, config.reconnect.max_delay
            ),
            "longer than `max_delay`",
        ));
    }
    issues
}

fn http_filter(filter: &HttpFilterConfig, pointer: &str, issues: &mut Vec<Issue>) {
    let set: Vec<&str> = [
        ("header_filter", filter.header_filter.is_some()),
        ("path_filter", filter.path_filter.is_some()),
        ("method_filter", filter.method_filter.is_some()),
        ("all_of", filter.all_of.is_some()),
        ("any_of", filter.any_of.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, is_set)| is_set.then_some(name))
    .collect();
    if set.len() > 1 {
        issues.push(Issue::new(format!("{pointer}/{}", set[1]), format!("an http_filter takes one rule, but {} are set", set.join(" and ")), "second rule")
            .help("combine them with `all_of` (every rule must match) or `any_of`, e.g. \"all_of\": [{\"header\": \"…\"}, {\"path\": \"…\"}]".to_string()));
    }
    for (name, pattern) in [
        ("header_filter", &filter.header_filter),
        ("path_filter", &filter.path_filter),
        ("method_filter", &filter.method_filter),
    ] {
        match pattern {
            // An empty regex matches every request: almost certainly a mistake (mirrord refuses
            // it too).
            Some(pattern) if pattern.is_empty() => issues.push(
                Issue::new(format!("{pointer}/{name}"), format!("`{name}` is empty"), "empty filter")
                    .help("an empty filter would take every request (probes aside); give a regex, or use a whole-port steal (no http_filter)".to_string()),
            ),
            Some(pattern) => regex(pattern, &format!("{pointer}/{name}"), issues),
            None => {}
        }
    }
    for (name, list) in [("all_of", &filter.all_of), ("any_of", &filter.any_of)] {
        for (i, inner) in list.iter().flatten().enumerate() {
            let (kind, pattern) = match inner {
                InnerFilter::Header(p) => ("header", p),
                InnerFilter::Path(p) => ("path", p),
                InnerFilter::Method(p) => ("method", p),
            };
            if pattern.is_empty() {
                issues.push(
                    Issue::new(
                        format!("{pointer}/{name}/{i}/{kind}"),
                        format!("the `{kind}` rule is empty"),
                        "empty filter",
                    )
                    .help("an empty rule would match every request; give a regex".to_string()),
                );
            } else {
                regex(pattern, &format!("{pointer}/{name}/{i}/{kind}"), issues);
            }
        }
        if list.as_ref().is_some_and(Vec::is_empty) {
            issues.push(Issue::new(format!("{pointer}/{name}"), format!("`{name}` is empty"), "no rules").help("an empty list would match nothing (all_of: everything); remove it or add rules"));
        }
    }
}

fn exclusive(filter: &TrafficFilterConfig, pointer: &str, issues: &mut Vec<Issue>) {
    if filter.remote.is_some() && filter.local.is_some() {
        issues.push(Issue::new(format!("{pointer}/local"), "`remote` and `local` cannot both be set", "conflicts with `remote`")
            .help("`remote` lists what goes through the target (everything else stays local); `local` lists what stays local: pick one"));
    }
}

/// Reports a regex error at its position inside the pattern.
fn regex(pattern: &str, pointer: &str, issues: &mut Vec<Issue>) {
    if pattern.contains("{{") {
        issues.push(
            Issue::new(
                pointer,
                "mirrord's templates (`{{ … }}`) are not supported yet",
                "a template",
            )
            .help(
                "write the value the template stands for, e.g. the header value itself".to_string(),
            ),
        );
        return;
    }
    let mut issue = match regex_syntax::ast::parse::Parser::new().parse(pattern) {
        Err(e) => {
            let span = e.span();
            let mut issue = Issue::new(
                pointer,
                format!(
                    "invalid regex (at character {}): {}",
                    span.start.column,
                    e.kind()
                ),
                e.kind().to_string(),
            );
            issue.within = Some(span.start.offset..span.end.offset.max(span.start.offset + 1));
            issue
        }
        Ok(_) => match regex::Regex::new(pattern) {
            Ok(_) => return,
            Err(e) => Issue::new(
                pointer,
                format!("invalid regex: {}", first_line(&e.to_string())),
                "invalid regex",
            ),
        },
    };
    issue.help = Some("regexes use Rust `regex` syntax; escape special characters such as `.`, `(` or `[` with a backslash".into());
    issues.push(issue);
}

fn first_line(text: &str) -> &str {
    text.lines()
        .rfind(|l| l.starts_with("error:"))
        .unwrap_or_else(|| text.lines().next().unwrap_or(text))
}

/// Moves a range inside a string's text to the string's place in the file: past the opening quote
/// when there is one. Exact for strings without escape sequences; clamped to the value otherwise.
pub(crate) fn shift_into_value(
    value: Range<usize>,
    text: &str,
    within: Range<usize>,
) -> Range<usize> {
    let quoted = matches!(text.as_bytes().get(value.start), Some(b'"' | b'\''));
    let base = value.start + usize::from(quoted);
    let end = value.end.saturating_sub(usize::from(quoted)).max(base);
    (base + within.start).min(end)..(base + within.end).min(end.max(base + within.start + 1))
}
