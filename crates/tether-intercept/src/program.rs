//! Whether the preloaded layer can reach a program at all, read from its executable before it
//! runs: a static executable never loads the layer, the loader ignores `LD_PRELOAD` for a
//! set-user-ID or set-group-ID one, and Go makes raw system calls for network and files even
//! when it links libc. No run may silently fall back to local: `tether exec` and the layer's
//! `execve` hook say so in one line.

use std::{os::unix::fs::PermissionsExt as _, path::Path};

/// The set-user-ID and set-group-ID bits of a file's mode (`S_ISUID`, `S_ISGID`).
const SET_UID: u32 = 0o4000;
const SET_GID: u32 = 0o2000;

/// What the layer cannot do for a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// No program interpreter (`PT_INTERP`): nothing is preloaded into it.
    Static,
    /// Set-user-ID or set-group-ID: the loader drops `LD_PRELOAD`.
    SetId,
    /// A Go program (`.go.buildinfo`) that loads libc: its network and file calls are raw
    /// system calls the hooks never see.
    Go,
}

impl Unreachable {
    /// What the program is, for a line that names it ("is a Go program").
    pub fn what(self) -> &'static str {
        match self {
            Unreachable::Static => "is statically linked",
            Unreachable::SetId => "is set-user-ID or set-group-ID",
            Unreachable::Go => "is a Go program",
        }
    }

    /// One line for the user, naming what does not reach the target.
    pub fn explain(self, program: &str) -> String {
        let why = match self {
            Unreachable::Static => "is statically linked, so the preloaded layer cannot enter it",
            Unreachable::SetId => {
                "is set-user-ID or set-group-ID, so the dynamic loader ignores the preloaded layer"
            }
            Unreachable::Go => {
                "is a Go program, whose network and file calls are raw system calls the preloaded layer does not see"
            }
        };
        format!(
            "{program} {why}: its incoming traffic, outgoing connections, name lookups and file reads stay on this machine \
             (only the environment comes from the target)"
        )
    }
}

/// What stops the layer from reaching the executable at `path`; `None` when nothing does (or
/// it is not an ELF executable this can read: a script runs its interpreter, checked when that
/// is executed).
pub fn unreachable(path: &Path) -> Option<Unreachable> {
    use object::{
        Object as _, ObjectSection as _,
        read::elf::{ElfFile64, ProgramHeader as _},
    };
    // Only a regular file is opened (opening a FIFO would block).
    let metadata = std::fs::metadata(path).ok().filter(|m| m.is_file())?;
    let file = std::fs::File::open(path).ok()?;
    let cache = object::ReadCache::new(file);
    let elf = ElfFile64::<object::Endianness, _>::parse(&cache).ok()?;
    let endian = elf.endian();
    let interpreted = elf
        .elf_program_headers()
        .iter()
        .any(|header| header.p_type(endian) == object::elf::PT_INTERP);
    // Set-id first: neither the library nor the supervisor may take such a program (the
    // supervisor's filter would drop its privileges, `PR_SET_NO_NEW_PRIVS`, without root).
    if metadata.permissions().mode() & (SET_UID | SET_GID) != 0 {
        return Some(Unreachable::SetId);
    }
    // A Go program is one whether or not it is static (Go's default on Linux).
    if elf
        .section_by_name(".go.buildinfo")
        .is_some_and(|section| section.size() > 0)
    {
        return Some(Unreachable::Go);
    }
    (!interpreted).then_some(Unreachable::Static)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_setid_and_ordinary_programs_are_told_apart() {
        // Debian's ldconfig is static-pie; coreutils are dynamic; su is set-user-ID.
        assert_eq!(
            unreachable(Path::new("/sbin/ldconfig")),
            Some(Unreachable::Static)
        );
        assert_eq!(unreachable(Path::new("/usr/bin/true")), None);
        if Path::new("/usr/bin/su").exists() {
            assert_eq!(
                unreachable(Path::new("/usr/bin/su")),
                Some(Unreachable::SetId)
            );
        }
        // Not ELF: a script, or nothing at all.
        assert_eq!(unreachable(Path::new("/etc/hostname")), None);
        assert_eq!(unreachable(Path::new("/no/such/program")), None);
    }
}
