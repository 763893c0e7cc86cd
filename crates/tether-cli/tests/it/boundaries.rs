//! The lines the architecture draws: what the `tether` executable exports, which crate may
//! depend on which.

use std::path::Path;

use object::{Object as _, ObjectSymbol as _};

/// Names of the dynamic symbols `file` defines (exports).
fn exported(file: &Path) -> std::collections::BTreeSet<String> {
    let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let elf = object::File::parse(&*data).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    elf.dynamic_symbols()
        .filter(|symbol| symbol.is_definition())
        .filter_map(|symbol| symbol.name().ok().map(str::to_owned))
        .collect()
}

/// The C library this test runs with (the one `tether` loads too).
fn libc_path() -> std::path::PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            Path::new(path)
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("libc.so"))
        })
        .expect("this test process maps libc")
        .into()
}

#[test]
fn tether_exports_no_symbol_that_libc_defines() {
    // Were it to (it did, while it linked the preloaded library), the CLI's own libc calls would
    // go through tether's hooks and the dynamic loader would hand tether's `open` to every library
    // tether loads.
    let libc = exported(&libc_path());
    assert!(libc.contains("open"), "libc's exports were read");
    let tether = exported(Path::new(env!("CARGO_BIN_EXE_tether")));
    let shared: Vec<_> = tether.intersection(&libc).collect();
    assert!(
        shared.is_empty(),
        "tether exports libc's symbols: {shared:?}"
    );
}

#[test]
fn only_the_cli_depends_on_the_agent_and_nothing_links_the_preloaded_library() {
    // The agent crate is what runs next to the target; the CLI links it only to run as
    // `tether agent`. What both ends share lives in tether-session and tether-intercept.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut edges = Vec::new();
    for package in metadata["packages"].as_array().unwrap() {
        for dependency in package["dependencies"].as_array().unwrap() {
            let (from, to) = (
                package["name"].as_str().unwrap(),
                dependency["name"].as_str().unwrap(),
            );
            edges.push((from.to_owned(), to.to_owned()));
        }
    }
    assert!(
        edges
            .iter()
            .any(|(from, to)| from == "tether" && to == "tether-session"),
        "the dependency graph was read"
    );
    let wrong: Vec<_> = edges
        .iter()
        .filter(|(from, to)| (to == "tether-agent" && from != "tether") || to == "tether-layer")
        .collect();
    assert!(wrong.is_empty(), "crates across the line: {wrong:?}");
}
