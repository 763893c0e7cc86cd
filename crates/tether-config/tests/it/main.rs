//! Integration tests of configuration loading, as a user meets it: files on disk, variables, flags.

mod formats;
mod layers;
mod mirrord;
mod problems;
mod schema;

use std::path::PathBuf;

use tether_config::{Loaded, Loader, Problem, Problems};

/// A config file in a temporary directory.
struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn write(name: &str, text: &str) -> ConfigFile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    ConfigFile { _dir: dir, path }
}

fn load(name: &str, text: &str) -> Result<Loaded, Problems> {
    let file = write(name, text);
    Loader::new().file(&file.path).load()
}

fn problems(name: &str, text: &str) -> Vec<Problem> {
    match load(name, text) {
        Ok(loaded) => panic!("expected problems, loaded {:#?}", loaded.config),
        Err(Problems(list)) => list,
    }
}

/// `(line, column)` of a problem in its file.
fn at(problem: &Problem) -> (usize, usize) {
    problem
        .origin
        .line_column()
        .expect("a problem located in a file")
}
