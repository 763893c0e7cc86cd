//! Whether a process lives, read from `/proc/PID/stat`: the one answer every part of tether uses.
//!
//! A zombie (state `Z`: exited, not yet reaped by its parent) or a dying process (`X`) has a
//! `/proc` entry and a readable start time, but runs nothing and holds nothing: it counts as dead.

use std::path::Path;

/// What `/proc/PID/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// The state letter (`R`, `S`, `D`, `Z`, `X`, …).
    pub state: char,
    /// Field 22: clock ticks since boot when it started (the same in every PID namespace).
    pub start_time: u64,
}

impl Stat {
    /// True unless the process has exited (zombie or dead).
    pub fn running(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// The process's stat, or `None` if there is no such process.
pub fn stat(pid: u32) -> Option<Stat> {
    let text =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    parse_stat(&text)
}

/// Parses one `/proc/PID/stat` line.
pub fn parse_stat(text: &str) -> Option<Stat> {
    // The command name (field 2) may hold spaces and parentheses; fields after it are plain.
    let mut fields = text[text.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 3 is the state, so the start time (field 22) is 19 fields further on.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(Stat { state, start_time })
}

/// True while `pid` names a process that has not exited.
pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.running())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLEEPING: &str = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
    const ZOMBIE: &str = "4243 (agent) Z 1 4243 4243 0 -1 4227084 100 0 0 0 1 2 0 0 20 0 1 0 987655 0 0 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn a_sleeping_process_is_alive_and_a_zombie_is_not() {
        let sleeping = parse_stat(SLEEPING).unwrap();
        assert_eq!(
            sleeping,
            Stat {
                state: 'S',
                start_time: 987_654
            }
        );
        assert!(sleeping.running());
        let zombie = parse_stat(ZOMBIE).unwrap();
        assert_eq!(zombie.start_time, 987_655);
        assert!(!zombie.running());
    }

    #[test]
    fn an_unreaped_child_is_a_zombie_and_counts_as_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        assert!(alive(std::process::id()));
        // Wait for the exit without reaping it (WNOWAIT): the child stays a zombie.
        use nix::sys::wait::{Id, WaitPidFlag, waitid};
        waitid(
            Id::Pid(nix::unistd::Pid::from_raw(pid as i32)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        )
        .unwrap();
        assert!(stat(pid).is_some(), "unreaped: its /proc entry stays");
        assert!(!alive(pid));
        child.wait().unwrap();
    }
}
