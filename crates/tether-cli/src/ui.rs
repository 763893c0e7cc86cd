//! What the user sees: live steps on a terminal, plain lines otherwise, JSON events for programs.
//!
//! Every long step goes through [`Ui::step`], so `tether exec` and `tether demo` show the same
//! progress whatever the output mode. Logs (tracing) go to stderr and never mix with this output.

use std::{io::IsTerminal as _, time::Duration};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::cli::OutputFormat;

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Spinners that turn into ✓/✗ lines.
    Live,
    /// One line per finished step.
    Plain,
    /// One JSON object per event on stdout.
    Json,
    /// Nothing (debug logs only): for work the user hears about in one line of its own.
    Quiet,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Ui {
    mode: Mode,
}

impl Ui {
    pub(crate) fn new(output: OutputFormat) -> Ui {
        let mode = match output {
            OutputFormat::Json => Mode::Json,
            OutputFormat::Text if std::io::stderr().is_terminal() => Mode::Live,
            OutputFormat::Text => Mode::Plain,
        };
        Ui { mode }
    }

    /// A `Ui` that shows nothing.
    pub(crate) fn quiet() -> Ui {
        Ui { mode: Mode::Quiet }
    }

    pub(crate) fn is_json(self) -> bool {
        matches!(self.mode, Mode::Json)
    }

    /// Starts a step; finish it with [`Step::done`] or [`Step::fail`].
    pub(crate) fn step(self, name: &str) -> Step {
        let spinner = match self.mode {
            Mode::Live => {
                let bar = ProgressBar::new_spinner().with_message(name.to_owned());
                bar.set_style(
                    ProgressStyle::with_template("{spinner:.cyan} {msg}").expect("valid template"),
                );
                bar.enable_steady_tick(Duration::from_millis(80));
                Some(bar)
            }
            Mode::Plain | Mode::Quiet => None,
            Mode::Json => {
                emit(json!({ "event": "step_started", "step": name }));
                None
            }
        };
        Step {
            ui: self,
            name: name.to_owned(),
            spinner,
        }
    }

    /// A line of information (not a step), e.g. a port that is now stolen.
    pub(crate) fn info(self, message: &str) {
        match self.mode {
            Mode::Json => emit(json!({ "event": "info", "message": message })),
            Mode::Quiet => tracing::debug!("{message}"),
            _ => eprintln!("  {message}"),
        }
    }

    /// A warning the user must see, even without -v.
    pub(crate) fn warn(self, message: &str) {
        match self.mode {
            Mode::Json => emit(json!({ "event": "warning", "message": message })),
            Mode::Quiet => tracing::debug!("{message}"),
            _ => eprintln!("warning: {message}"),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Step {
    ui: Ui,
    name: String,
    spinner: Option<ProgressBar>,
}

impl Step {
    pub(crate) fn done(self, detail: &str) {
        self.finish(true, detail);
    }

    pub(crate) fn fail(self, detail: &str) {
        self.finish(false, detail);
    }

    fn finish(self, ok: bool, detail: &str) {
        let mark = if ok { "✓" } else { "✗" };
        let line = if detail.is_empty() {
            format!("{mark} {}", self.name)
        } else {
            format!("{mark} {}: {detail}", self.name)
        };
        match (self.ui.mode, self.spinner) {
            (Mode::Live, Some(bar)) => bar.finish_with_message(line),
            (Mode::Json, _) => emit(
                json!({ "event": "step_finished", "step": self.name, "ok": ok, "detail": detail }),
            ),
            (Mode::Quiet, _) => tracing::debug!("{line}"),
            _ => eprintln!("{line}"),
        }
    }
}

/// One JSON object per line on stdout.
pub(crate) fn emit(value: serde_json::Value) {
    println!("{value}");
}
