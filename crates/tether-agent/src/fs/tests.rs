use std::os::unix::fs::symlink;

use tether_protocol::{FsOpen, FsPath, FsRead, FsStat};

use super::*;

/// A root with `srv/data/config.txt`, and a secret next to (outside) the root.
fn fixture() -> (tempfile::TempDir, Root) {
    let outer = tempfile::tempdir().unwrap();
    std::fs::write(outer.path().join("secret"), "outside").unwrap();
    let root = outer.path().join("root");
    std::fs::create_dir_all(root.join("srv/data")).unwrap();
    std::fs::write(root.join("srv/data/config.txt"), "inside").unwrap();
    let opened = Root::open(&root).unwrap();
    (outer, opened)
}

fn open(files: &Files, root: &Root, path: &str) -> Result<u64, ErrorInfo> {
    let op = Op::Open(FsOpen {
        path: path.into(),
        flags: open_flags::READ,
        mode: 0,
    });
    match files.run(root, op).result?.result {
        Some(FsResult::Opened(h)) => Ok(h.handle),
        other => panic!("unexpected {other:?}"),
    }
}

fn read_all(files: &Files, root: &Root, handle: u64) -> Vec<u8> {
    let op = Op::Read(FsRead {
        handle,
        len: 4096,
        offset: Some(0),
    });
    match files.run(root, op).result.unwrap().result {
        Some(FsResult::Data(d)) => d.data.to_vec(),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn reads_a_file_under_the_root() {
    let (_outer, root) = fixture();
    let files = Files::default();
    let handle = open(&files, &root, "/srv/data/config.txt").unwrap();
    assert_eq!(read_all(&files, &root, handle), b"inside");
    // `..` that stays inside is fine.
    let handle = open(&files, &root, "/srv/data/../data/config.txt").unwrap();
    assert_eq!(read_all(&files, &root, handle), b"inside");
}

#[test]
fn dot_dot_above_the_root_is_refused_with_eacces_and_a_warning() {
    let (_outer, root) = fixture();
    let files = Files::default();
    let outcome = files.run(
        &root,
        Op::Open(FsOpen {
            path: "/srv/data/../../../secret".into(),
            flags: open_flags::READ,
            mode: 0,
        }),
    );
    let error = outcome.result.unwrap_err();
    assert_eq!(error.errno, libc::EACCES);
    assert!(
        outcome
            .warning
            .unwrap()
            .contains("outside the target's root")
    );
}

#[test]
fn symlinks_pointing_outside_are_refused() {
    let (outer, root) = fixture();
    let files = Files::default();
    let data = outer.path().join("root/srv/data");
    // Absolute: would be the agent's own file if followed naively.
    symlink(outer.path().join("secret"), data.join("absolute")).unwrap();
    symlink("../../../secret", data.join("relative")).unwrap();
    symlink("loop", data.join("loop")).unwrap();
    for link in ["absolute", "relative"] {
        let error = open(&files, &root, &format!("/srv/data/{link}")).unwrap_err();
        assert_eq!(error.errno, libc::EACCES, "{link}");
        let stat = files.run(
            &root,
            Op::Stat(FsStat {
                path: format!("/srv/data/{link}"),
                handle: 0,
                follow_symlinks: true,
            }),
        );
        assert_eq!(stat.result.unwrap_err().errno, libc::EACCES, "stat {link}");
        let real = files.run(
            &root,
            Op::RealPath(FsPath {
                path: format!("/srv/data/{link}"),
            }),
        );
        assert_eq!(
            real.result.unwrap_err().errno,
            libc::EACCES,
            "realpath {link}"
        );
    }
    let error = open(&files, &root, "/srv/data/loop").unwrap_err();
    assert_eq!(error.errno, libc::ELOOP);
}

#[test]
fn relative_symlinks_inside_the_root_work_and_realpath_folds_them() {
    let (outer, root) = fixture();
    let files = Files::default();
    symlink("data/config.txt", outer.path().join("root/srv/link")).unwrap();
    let handle = open(&files, &root, "/srv/link").unwrap();
    assert_eq!(read_all(&files, &root, handle), b"inside");
    let real = files
        .run(
            &root,
            Op::RealPath(FsPath {
                path: "/srv/./link".into(),
            }),
        )
        .result
        .unwrap();
    assert_eq!(
        real.result,
        Some(FsResult::Path("/srv/data/config.txt".into()))
    );
}

#[test]
fn relative_paths_and_missing_files_get_errnos() {
    let (_outer, root) = fixture();
    let files = Files::default();
    assert_eq!(
        open(&files, &root, "srv/data/config.txt")
            .unwrap_err()
            .errno,
        libc::EINVAL
    );
    let missing = open(&files, &root, "/srv/nope").unwrap_err();
    assert_eq!(missing.errno, libc::ENOENT);
    assert_eq!(missing.code(), ErrorCode::NotFound);
}
