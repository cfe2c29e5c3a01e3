//! Looking at and signalling server processes through `/proc` and `kill(1)`.
//!
//! This module owns the low-level facts the cluster needs about processes: the
//! postmaster pid from `postmaster.pid`, whether a pid is really running (a zombie
//! is not: in containers whose init does not reap, a SIGKILLed postmaster stays a
//! zombie forever), and whether any member of its process group (the postmaster
//! and its backends; pg_ctl starts it with `setsid`) is still alive. Signals go
//! through the `kill` command so the crate stays free of `unsafe`. It must never
//! signal a process it cannot tie to a cluster's data directory. Linux-only.

use std::path::Path;
use std::process::{Command, Stdio};

/// The postmaster pid recorded on the first line of `<data_dir>/postmaster.pid`.
pub fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// Fields of `/proc/<pid>/stat` after the command name: `(state, pgrp)`.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<(char, u32)> {
    // The command name may contain spaces and parentheses; it ends at the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Whether `pid` exists and is not a zombie (or dead).
pub fn is_running(pid: u32) -> bool {
    matches!(stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// Whether `pid` is a running process whose command line mentions `postgres`.
pub fn is_postgres(pid: u32) -> bool {
    is_running(pid)
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("postgres"))
            .unwrap_or(false)
}

/// Whether any running (non-zombie) process belongs to process group `pgid`.
pub fn group_alive(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
            .and_then(stat)
            .is_some_and(|(state, pgrp)| pgrp == pgid && state != 'Z' && state != 'X')
    })
}

/// Send `signal` (e.g. `"KILL"`) to `pid`; with `group`, to its whole process
/// group. Returns whether `kill` reported success.
pub fn signal(pid: u32, signal: &str, group: bool) -> bool {
    let target = if group {
        format!("-{pid}")
    } else {
        pid.to_string()
    };
    Command::new("kill")
        .args([format!("-{signal}"), "--".to_string(), target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "4884 (postgres: a) b) Zs 1 4884 4884 0 -1 4194560";
        assert_eq!(parse_stat(line), Some(('Z', 4884)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn sees_itself_running() {
        assert!(is_running(std::process::id()));
    }
}
