//! The test kit's Go program (`apps/go_app/main.go`), built once per test process with
//! Debian's `golang-go`: a static build (`CGO_ENABLED=0`, Go's default for Linux services) and a
//! cgo build (dynamically linked against libc; its network and file calls are still raw system
//! calls).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

/// How the Go program is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoBuild {
    Static,
    Cgo,
}

/// The built program; panics naming the package when Go is missing.
pub fn go_app(build: GoBuild) -> &'static Path {
    static STATIC: OnceLock<PathBuf> = OnceLock::new();
    static CGO: OnceLock<PathBuf> = OnceLock::new();
    let (cell, name, cgo) = match build {
        GoBuild::Static => (&STATIC, "go_app_static", "0"),
        GoBuild::Cgo => (&CGO, "go_app_cgo", "1"),
    };
    cell.get_or_init(|| {
        let source = crate::netns::apps_dir().join("go_app/main.go");
        let dir = std::env::temp_dir().join(format!("tether-go-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join(name);
        let built = Command::new("go")
            .arg("build")
            .arg("-o")
            .arg(&out)
            .arg(&source)
            .env("CGO_ENABLED", cgo)
            // A cache of its own: tests may run without a usable $HOME.
            .env("GOCACHE", std::env::temp_dir().join("tether-go-cache"))
            .env("GOFLAGS", "-buildvcs=false")
            .output()
            .unwrap_or_else(|e| panic!("cannot run `go` ({e}): install Debian's golang-go"));
        assert!(
            built.status.success(),
            "go build failed: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        out
    })
}
