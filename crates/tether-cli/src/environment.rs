//! The target's environment merged into the command's (`feature.env`).
//!
//! Variables that describe the local machine or session (`PATH`, `HOME`, `LD_*`, …) are never
//! imported unless `include` names them literally (a wildcard such as `*` is not enough): a
//! pod's `PATH` or `LD_PRELOAD` would break the local command, or tether itself.

use globset::{Glob, GlobSet, GlobSetBuilder};
use tether_config::model::EnvConfig;

/// Never imported unless included by name.
const MACHINE: &[&str] = &[
    "PATH",
    "HOME",
    "HOSTNAME",
    "SHELL",
    "TERM",
    "USER",
    "LOGNAME",
    "PWD",
    "OLDPWD",
    "SHLVL",
    "TMPDIR",
    "_",
    "DISPLAY",
    "LANG",
    "LANGUAGE",
    "TZ",
    "MAIL",
    "COLORTERM",
];
const MACHINE_PREFIXES: &[&str] = &["LD_", "XDG_", "SSH_", "TETHER_", "LC_"];

fn is_machine(name: &str) -> bool {
    MACHINE.contains(&name) || MACHINE_PREFIXES.iter().any(|p| name.starts_with(p))
}

fn globs(patterns: &[String]) -> Result<GlobSet, globset::Error> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        set.add(Glob::new(pattern)?);
    }
    set.build()
}

/// The variables to set for the command: the target's, filtered, then the overrides.
pub(crate) fn merge(
    target: Vec<(String, String)>,
    config: &EnvConfig,
) -> Result<Vec<(String, String)>, globset::Error> {
    let mut vars = Vec::new();
    if config.enabled {
        let include = config.include.as_deref().map(globs).transpose()?;
        let exclude = globs(config.exclude.as_deref().unwrap_or_default())?;
        let named = |name: &str| {
            config
                .include
                .iter()
                .flatten()
                .any(|pattern| pattern == name)
        };
        for (name, value) in target {
            let wanted = match &include {
                Some(include) => include.is_match(&name),
                None => !exclude.is_match(&name),
            };
            if wanted && (!is_machine(&name) || named(&name)) {
                vars.push((name, value));
            }
        }
    }
    vars.retain(|(name, _)| !config.overrides.contains_key(name));
    vars.extend(config.overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Vec<(String, String)> {
        [
            ("DB_URL", "postgres://db"),
            ("DB_USER", "app"),
            ("API_KEY", "secret"),
            ("PATH", "/pod/bin"),
            ("HOME", "/root"),
            ("LD_PRELOAD", "/pod/lib.so"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn names(vars: &[(String, String)]) -> Vec<&str> {
        vars.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn everything_but_the_machine_s_variables_by_default() {
        let vars = merge(target(), &EnvConfig::default()).unwrap();
        assert_eq!(names(&vars), ["DB_URL", "DB_USER", "API_KEY"]);
    }

    #[test]
    fn include_and_exclude_globs() {
        let include = EnvConfig {
            include: Some(vec!["DB_*".into(), "*".into()]),
            ..Default::default()
        };
        // `*` matches PATH, but only a literal name imports a machine variable.
        assert_eq!(
            names(&merge(target(), &include).unwrap()),
            ["DB_URL", "DB_USER", "API_KEY"]
        );
        let literal = EnvConfig {
            include: Some(vec!["DB_URL".into(), "PATH".into()]),
            ..Default::default()
        };
        assert_eq!(
            names(&merge(target(), &literal).unwrap()),
            ["DB_URL", "PATH"]
        );
        let exclude = EnvConfig {
            exclude: Some(vec!["*_KEY".into()]),
            ..Default::default()
        };
        assert_eq!(
            names(&merge(target(), &exclude).unwrap()),
            ["DB_URL", "DB_USER"]
        );
    }

    #[test]
    fn overrides_win_and_disabled_imports_nothing_else() {
        let config = EnvConfig {
            overrides: [("DB_URL".to_owned(), "postgres://local".to_owned())].into(),
            ..Default::default()
        };
        let vars = merge(target(), &config).unwrap();
        assert!(vars.contains(&("DB_URL".into(), "postgres://local".into())));
        assert_eq!(vars.iter().filter(|(k, _)| k == "DB_URL").count(), 1);
        let off = EnvConfig {
            enabled: false,
            ..config
        };
        assert_eq!(names(&merge(target(), &off).unwrap()), ["DB_URL"]);
    }
}
