//! What happens to one file operation, decided from what the program asked (Linux's flags and
//! numbers) and the [`Policy`], before anything is carried out. An interceptor turns a plan into
//! system calls and requests; it never decides by itself.
//!
//! Nothing here allocates when the answer is "local": the preloaded layer asks on every `open`
//! of the program, most of which stay local.

use std::path::Path;

use tether_protocol::open_flags;

use crate::policy::{FsRoute, Policy};

/// Files opened read-only up to this size are copied whole into a local stand-in at `open`: the
/// program then reads a real file (any read path works, `mmap` included).
pub const SNAPSHOT_MAX: u64 = 16 << 20;

/// An `open` as the program asked it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open {
    /// `O_*` flags, as passed to `open(2)`.
    pub flags: i32,
    /// The mode argument (meaningful only with `O_CREAT`).
    pub mode: u32,
}

/// Where an open goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenPlan {
    /// The program's own `open`.
    Local,
    /// The file does not exist for the program: `ENOENT`.
    NotFound,
    /// Opened in the target; see [`Open::remote`] for how.
    Remote,
}

/// How to open a file in the target, and what the program gets for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteOpen {
    /// `FsOpen.flags` ([`open_flags`] bits).
    pub flags: u32,
    /// `FsOpen.mode`: the permission bits with `O_CREAT`, else 0 (without it the variadic mode
    /// argument is whatever was in the register).
    pub mode: u32,
    /// Writes go to the end.
    pub append: bool,
    /// The stand-in the program gets closes on `exec`.
    pub cloexec: bool,
    /// A read-only open of a file: copy it whole when it is small (see [`snapshot_fits`]).
    pub snapshot: bool,
}

impl Open {
    /// True when the open may change the file (the policy routes writes on their own).
    pub fn writes(self) -> bool {
        self.flags & libc::O_ACCMODE != libc::O_RDONLY
            || self.flags & (libc::O_CREAT | libc::O_TRUNC) != 0
    }

    /// Where this open of `path` goes. `relative_to_dirfd`: an `openat` whose directory fd is not
    /// `AT_FDCWD` (a relative path then names something under that directory: local).
    pub fn plan(self, policy: Option<&Policy>, path: &Path, relative_to_dirfd: bool) -> OpenPlan {
        if relative_to_dirfd && !path.is_absolute() {
            return OpenPlan::Local;
        }
        // An unnamed temporary file is the machine's own.
        if self.flags & libc::O_TMPFILE == libc::O_TMPFILE {
            return OpenPlan::Local;
        }
        match policy.map_or(FsRoute::Local, |p| p.file(path, self.writes())) {
            FsRoute::Local => OpenPlan::Local,
            FsRoute::NotFound => OpenPlan::NotFound,
            FsRoute::Remote => OpenPlan::Remote,
        }
    }

    /// How to carry out a [`OpenPlan::Remote`].
    pub fn remote(self) -> RemoteOpen {
        let flags = self.flags;
        let mut portable = match flags & libc::O_ACCMODE {
            libc::O_WRONLY => open_flags::WRITE,
            libc::O_RDWR => open_flags::READ | open_flags::WRITE,
            _ => open_flags::READ,
        };
        for (flag, bit) in [
            (libc::O_CREAT, open_flags::CREATE),
            (libc::O_TRUNC, open_flags::TRUNCATE),
            (libc::O_APPEND, open_flags::APPEND),
            (libc::O_EXCL, open_flags::EXCLUSIVE),
            (libc::O_DIRECTORY, open_flags::DIRECTORY),
            (libc::O_NOFOLLOW, open_flags::NOFOLLOW),
        ] {
            if flags & flag != 0 {
                portable |= bit;
            }
        }
        RemoteOpen {
            flags: portable,
            mode: if flags & libc::O_CREAT != 0 {
                self.mode & 0o7777
            } else {
                0
            },
            append: flags & libc::O_APPEND != 0,
            cloexec: flags & libc::O_CLOEXEC != 0,
            snapshot: !self.writes() && flags & libc::O_DIRECTORY == 0,
        }
    }

    /// `fopen`'s mode string (`"r"`, `"w+"`, `"ae"`, …) as an open; `None` for one libc refuses.
    pub fn from_fopen(mode: &[u8]) -> Option<Open> {
        let mut flags = match mode.first()? {
            b'r' => libc::O_RDONLY,
            b'w' => libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
            b'a' => libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
            _ => return None,
        };
        for c in &mode[1..] {
            match c {
                b'+' => flags = (flags & !libc::O_ACCMODE) | libc::O_RDWR,
                b'e' => flags |= libc::O_CLOEXEC,
                b'x' => flags |= libc::O_EXCL,
                _ => {}
            }
        }
        // fopen creates with 0666 (less the umask, applied where the file is created).
        Some(Open { flags, mode: 0o666 })
    }
}

impl RemoteOpen {
    /// A directory opened to list it.
    pub fn directory() -> RemoteOpen {
        RemoteOpen {
            flags: open_flags::READ | open_flags::DIRECTORY,
            mode: 0,
            append: false,
            cloexec: true,
            snapshot: false,
        }
    }
}

/// Whether a file opened for a snapshot (its target metadata: `st_mode`, size) is copied whole.
pub fn snapshot_fits(st_mode: u32, size: u64) -> bool {
    st_mode & libc::S_IFMT == libc::S_IFREG && size <= SNAPSHOT_MAX
}

/// Where a `rename` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenamePlan {
    Local,
    Remote,
    /// Fails with this errno: a name that does not exist for the program, or one side local
    /// and the other in the target (as across two file systems).
    Fail(i32),
}

/// Where `rename(from, to)` goes.
pub fn rename(policy: Option<&Policy>, from: &Path, to: &Path) -> RenamePlan {
    let route = |path| policy.map_or(FsRoute::Local, |p: &Policy| p.file(path, true));
    match (route(from), route(to)) {
        (FsRoute::Local, FsRoute::Local) => RenamePlan::Local,
        (FsRoute::Remote, FsRoute::Remote) => RenamePlan::Remote,
        (FsRoute::NotFound, _) | (_, FsRoute::NotFound) => RenamePlan::Fail(libc::ENOENT),
        _ => RenamePlan::Fail(libc::EXDEV),
    }
}

/// The new position of an `lseek` from `position`, or the errno it fails with. `end` gives the
/// file's size, asked only for `SEEK_END`.
pub fn seek(
    position: u64,
    offset: i64,
    whence: i32,
    end: impl FnOnce() -> Result<u64, i32>,
) -> Result<u64, i32> {
    let base = match whence {
        libc::SEEK_SET => 0,
        libc::SEEK_CUR => i64::try_from(position).map_err(|_| libc::EOVERFLOW)?,
        libc::SEEK_END => i64::try_from(end()?).map_err(|_| libc::EOVERFLOW)?,
        _ => return Err(libc::EINVAL),
    };
    match base.checked_add(offset) {
        Some(new) if new >= 0 => Ok(new as u64),
        _ => Err(libc::EINVAL),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        channel::{FsMode, PolicySpec},
        policy::LocalPlaces,
    };

    fn policy() -> Policy {
        let spec = PolicySpec {
            fs_mode: FsMode::Read,
            fs_not_found: vec!["^/srv/gone".into()],
            fs_local: vec!["^/srv/mine".into()],
            ..PolicySpec::default()
        };
        Policy::new(&spec, &LocalPlaces::default())
    }

    fn open(flags: i32) -> Open {
        Open { flags, mode: 0o644 }
    }

    #[test]
    fn opens_follow_the_policy_and_writes_stay_local_in_read_mode() {
        let policy = policy();
        let p = Some(&policy);
        let read = open(libc::O_RDONLY);
        assert_eq!(
            read.plan(p, Path::new("/srv/app.conf"), false),
            OpenPlan::Remote
        );
        assert_eq!(
            read.plan(p, Path::new("/srv/gone/x"), false),
            OpenPlan::NotFound
        );
        assert_eq!(
            read.plan(p, Path::new("/srv/mine/x"), false),
            OpenPlan::Local
        );
        assert_eq!(
            read.plan(None, Path::new("/srv/app.conf"), false),
            OpenPlan::Local
        );
        let write = open(libc::O_WRONLY | libc::O_CREAT);
        assert_eq!(
            write.plan(p, Path::new("/srv/app.conf"), false),
            OpenPlan::Local
        );
        // Relative to a directory fd, and unnamed temporary files: the machine's own.
        assert_eq!(read.plan(p, Path::new("app.conf"), true), OpenPlan::Local);
        assert_eq!(
            open(libc::O_TMPFILE | libc::O_RDWR).plan(p, Path::new("/srv"), false),
            OpenPlan::Local
        );
    }

    #[test]
    fn a_remote_open_carries_the_flags_the_target_needs() {
        let created =
            open(libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC).remote();
        assert_eq!(
            created.flags,
            open_flags::WRITE | open_flags::CREATE | open_flags::APPEND
        );
        assert_eq!(created.mode, 0o644);
        assert!(created.append && created.cloexec && !created.snapshot);
        let read = Open {
            flags: libc::O_RDONLY,
            mode: 0o7777_7777,
        }
        .remote();
        assert_eq!(
            (read.flags, read.mode),
            (open_flags::READ, 0),
            "no O_CREAT: no mode"
        );
        assert!(read.snapshot);
        assert!(!open(libc::O_RDONLY | libc::O_DIRECTORY).remote().snapshot);
    }

    #[test]
    fn fopen_modes_map_to_open_flags() {
        let flags = |m: &[u8]| Open::from_fopen(m).map(|o| o.flags);
        assert_eq!(flags(b"r"), Some(libc::O_RDONLY));
        assert_eq!(flags(b"r+e"), Some(libc::O_RDWR | libc::O_CLOEXEC));
        assert_eq!(
            flags(b"wx"),
            Some(libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL)
        );
        assert_eq!(
            flags(b"a+"),
            Some(libc::O_RDWR | libc::O_CREAT | libc::O_APPEND)
        );
        assert_eq!(flags(b"z"), None);
        assert_eq!(flags(b""), None);
    }

    #[test]
    fn renames_across_the_line_fail_as_across_file_systems() {
        let policy = Policy::new(
            &PolicySpec {
                fs_mode: FsMode::Write,
                fs_local: vec!["^/srv/mine".into()],
                fs_not_found: vec!["^/srv/gone".into()],
                ..PolicySpec::default()
            },
            &LocalPlaces::default(),
        );
        let p = Some(&policy);
        let (a, b) = (Path::new("/srv/a"), Path::new("/srv/b"));
        assert_eq!(rename(p, a, b), RenamePlan::Remote);
        assert_eq!(
            rename(p, a, Path::new("/srv/mine/b")),
            RenamePlan::Fail(libc::EXDEV)
        );
        assert_eq!(
            rename(p, Path::new("/srv/gone/a"), b),
            RenamePlan::Fail(libc::ENOENT)
        );
        assert_eq!(rename(None, a, b), RenamePlan::Local);
    }

    #[test]
    fn seeks_stay_within_the_file_s_numbers() {
        let no_end = || -> Result<u64, i32> { panic!("the size is not needed") };
        assert_eq!(seek(10, 5, libc::SEEK_SET, no_end), Ok(5));
        assert_eq!(seek(10, -3, libc::SEEK_CUR, no_end), Ok(7));
        assert_eq!(seek(10, -11, libc::SEEK_CUR, no_end), Err(libc::EINVAL));
        assert_eq!(seek(0, -1, libc::SEEK_END, || Ok(100)), Ok(99));
        assert_eq!(
            seek(0, 0, libc::SEEK_END, || Err(libc::EIO)),
            Err(libc::EIO)
        );
        assert_eq!(
            seek(0, i64::MAX, libc::SEEK_CUR, no_end),
            Ok(i64::MAX as u64)
        );
        assert_eq!(seek(1, i64::MAX, libc::SEEK_CUR, no_end), Err(libc::EINVAL));
        assert_eq!(seek(0, 0, 42, no_end), Err(libc::EINVAL));
    }
}
