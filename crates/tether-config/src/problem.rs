//! What can be wrong with a configuration, located where the user wrote it.

use std::{ops::Range, path::PathBuf, sync::Arc};

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceCode};
use serde::Serialize;

/// Where a setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A config file; `span` is a byte range in `text`.
    File {
        path: PathBuf,
        text: Arc<str>,
        span: Range<usize>,
    },
    /// An environment variable.
    Env { var: String },
    /// A command-line flag.
    Flag { flag: String },
    /// Nowhere in particular (e.g. a check across several settings without a single place).
    Unknown,
}

impl Origin {
    /// 1-based line and column of the start of the span, for files.
    pub fn line_column(&self) -> Option<(usize, usize)> {
        let Origin::File { text, span, .. } = self else {
            return None;
        };
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Some((line, column))
    }

    fn describe(&self) -> String {
        match self {
            Origin::File { path, .. } => match self.line_column() {
                Some((line, column)) => format!("{}:{line}:{column}", path.display()),
                None => path.display().to_string(),
            },
            Origin::Env { var } => format!("environment variable {var}"),
            Origin::Flag { flag } => format!("flag {flag}"),
            Origin::Unknown => "configuration".to_owned(),
        }
    }
}

/// A setting accepted but not used (a mirrord setting that only tunes mirrord), said once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The setting, as a dotted path.
    pub key: String,
    pub message: String,
    pub origin: Origin,
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.origin.describe(), self.message)
    }
}

/// One problem with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The setting, as a dotted path (`feature.network.incoming.mode`); empty for the whole file.
    pub key: String,
    pub message: String,
    /// What to do about it, e.g. "did you mean `mode`?".
    pub help: Option<String>,
    /// The label under the snippet.
    pub label: String,
    pub origin: Origin,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.origin {
            Origin::Unknown => f.write_str(&self.message),
            _ => write!(f, "{}: {}", self.origin.describe(), self.message),
        }
    }
}

impl std::error::Error for Problem {}

impl Diagnostic for Problem {
    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn std::fmt::Display>)
    }

    // The source comes from `to_report`, which names the file; a source here would hide it.
    fn source_code(&self) -> Option<&dyn SourceCode> {
        None
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let Origin::File { span, .. } = &self.origin else {
            return None;
        };
        let label = LabeledSpan::new_with_span(Some(self.label.clone()), span.clone());
        Some(Box::new(std::iter::once(label)))
    }
}

impl Problem {
    /// The problem with its file's name attached, for rendering with a snippet.
    pub fn to_report(&self) -> miette::Report {
        match &self.origin {
            Origin::File { path, text, .. } => miette::Report::new(self.clone()).with_source_code(
                NamedSource::new(path.display().to_string(), text.to_string()),
            ),
            _ => miette::Report::new(self.clone()),
        }
    }

    /// A machine-readable form (`--output json`).
    pub fn to_json(&self) -> ProblemJson {
        let (file, line, column, env, flag) = match &self.origin {
            Origin::File { path, .. } => {
                let (line, column) = self.origin.line_column().unwrap_or((0, 0));
                (
                    Some(path.display().to_string()),
                    Some(line),
                    Some(column),
                    None,
                    None,
                )
            }
            Origin::Env { var } => (None, None, None, Some(var.clone()), None),
            Origin::Flag { flag } => (None, None, None, None, Some(flag.clone())),
            Origin::Unknown => (None, None, None, None, None),
        };
        ProblemJson {
            key: self.key.clone(),
            message: self.message.clone(),
            help: self.help.clone(),
            file,
            line,
            column,
            env,
            flag,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ProblemJson {
    pub key: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flag: Option<String>,
}

/// Every problem found; loading fails with this when the list is not empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the configuration has {} problem{}", .0.len(), if .0.len() == 1 { "" } else { "s" })]
pub struct Problems(pub Vec<Problem>);
