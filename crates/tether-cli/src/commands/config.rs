//! `tether config check` and `tether config schema`.

use std::path::Path;

use miette::{GraphicalReportHandler, GraphicalTheme};
use serde_json::json;
use tether_config::{Config, Loaded, Loader, Problems};

use crate::ui::{self, Ui};

/// Loads the configuration as `tether exec` would (file, then environment, then `flags`).
pub(crate) fn loader(file: Option<&Path>) -> Loader {
    let loader = match file {
        Some(path) => Loader::new().file(path),
        None => Loader::new().default_file(&std::env::current_dir().unwrap_or_default()),
    };
    loader.env(std::env::vars())
}

/// Exit code 0 when valid, 1 when not.
pub(crate) fn check(file: Option<&Path>, ui: Ui) -> i32 {
    match loader(file).load() {
        Ok(loaded) => {
            let notices: Vec<String> = loaded.notices.iter().map(ToString::to_string).collect();
            if ui.is_json() {
                ui::emit(json!({
                    "valid": true,
                    "file": loaded.file,
                    "problems": [],
                    "notices": notices,
                }));
            } else {
                for notice in &notices {
                    eprintln!("{notice}");
                }
                println!("{}", summary(&loaded));
            }
            0
        }
        Err(problems) => {
            if ui.is_json() {
                let list: Vec<_> = problems.0.iter().map(|p| p.to_json()).collect();
                ui::emit(json!({ "valid": false, "file": file, "problems": list }));
            } else {
                eprint!("{}", render(&problems));
            }
            1
        }
    }
}

/// Every problem with its snippet, then a count.
pub(crate) fn render(problems: &Problems) -> String {
    use std::io::IsTerminal as _;
    let theme = if std::io::stderr().is_terminal() {
        GraphicalTheme::unicode()
    } else {
        GraphicalTheme::unicode_nocolor()
    };
    let handler = GraphicalReportHandler::new_themed(theme);
    let mut out = String::new();
    for problem in &problems.0 {
        let report = problem.to_report();
        if handler.render_report(&mut out, report.as_ref()).is_err() {
            out.push_str(&format!("{problem}\n"));
        }
        out.push('\n');
    }
    out.push_str(&format!("error: {problems}\n"));
    out
}

fn summary(loaded: &Loaded) -> String {
    let Config {
        target, feature, ..
    } = &loaded.config;
    let source = match &loaded.file {
        Some(path) => path.display().to_string(),
        None => "defaults (no config file)".to_owned(),
    };
    let incoming = &feature.network.incoming;
    let mode = format!("{:?}", incoming.mode).to_lowercase();
    let filter = if incoming.http_filter.is_set() {
        " with an HTTP filter"
    } else {
        ""
    };
    let target = target
        .path
        .as_deref()
        .unwrap_or("none (give one with --target)");
    format!("✓ {source} is valid\n  target: {target}\n  incoming: {mode}{filter}")
}

pub(crate) fn schema() -> i32 {
    print!("{}", tether_config::schema_text());
    0
}
