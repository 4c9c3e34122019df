//! Why the kernel refused to let us trace a process (`EPERM` from
//! `PTRACE_SEIZE`), in words: the process is ourselves, a zombie, a kernel
//! thread, already traced by another process, another user's, or Yama's
//! `ptrace_scope` forbids it.

use nix::unistd::Pid;

/// What the diagnosis looks at, read from `/proc` (plain data, so that the
/// wording is tested without such processes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// The process asked about.
    pub pid: i32,
    /// Our own process id.
    pub our_pid: i32,
    /// Our real and effective user ids.
    pub our_uid: u32,
    pub our_euid: u32,
    /// `/proc/PID/status` text (empty if unreadable).
    pub status: String,
    /// `/proc/PID/stat` text (empty if unreadable).
    pub stat: String,
    /// `/proc/sys/kernel/yama/ptrace_scope`, if present.
    pub ptrace_scope: Option<u32>,
    /// The command name of the tracer, when there is one.
    pub tracer_name: Option<String>,
}

/// `PF_KTHREAD` in the flags field of `/proc/PID/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

/// The flags field (9th) of a `/proc/PID/stat` line.
fn stat_flags(stat: &str) -> Option<u64> {
    // Fields after the command name, which ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // state, ppid, pgrp, session, tty_nr, tpgid, flags.
    rest.split_whitespace().nth(6)?.parse().ok()
}

/// The reason, in words; `None` when none of the known causes applies.
pub fn reason(f: &Facts) -> Option<String> {
    if f.pid == f.our_pid {
        return Some("it is upstare-apply itself".into());
    }
    if status_field(&f.status, "Tgid:").and_then(|t| t.parse::<i32>().ok()) == Some(f.our_pid) {
        return Some("it is a thread of upstare-apply itself".into());
    }
    if let Some(state) = status_field(&f.status, "State:") {
        if state.starts_with('Z') || state.starts_with('X') {
            return Some(
                "it is a zombie: it has exited and waits for its parent to collect its status"
                    .into(),
            );
        }
    }
    let kthread = status_field(&f.status, "Kthread:") == Some("1")
        || stat_flags(&f.stat).is_some_and(|fl| fl & PF_KTHREAD != 0);
    if kthread {
        return Some("it is a kernel thread, which cannot be traced".into());
    }
    if let Some(tracer) = status_field(&f.status, "TracerPid:").and_then(|t| t.parse::<i32>().ok())
    {
        if tracer != 0 {
            let name = f
                .tracer_name
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            return Some(format!(
                "it is already traced by process {tracer}{name}; a process can have one tracer only"
            ));
        }
    }
    if let Some(uids) = status_field(&f.status, "Uid:") {
        let ids: Vec<u32> = uids
            .split_whitespace()
            .filter_map(|u| u.parse().ok())
            .collect();
        if f.our_euid != 0 && ids.iter().any(|&u| u != f.our_uid) {
            return Some(format!(
                "it runs as uid {} (real, effective, saved, filesystem: {}) and upstare-apply as uid {}; run upstare-apply as that user or as root",
                ids.get(1).copied().unwrap_or(0),
                ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
                f.our_uid
            ));
        }
    }
    match f.ptrace_scope {
        Some(1) if f.our_euid != 0 => Some(
            "kernel.yama.ptrace_scope is 1: only a process's ancestors may trace it; run upstare-apply as root or set it to 0"
                .into(),
        ),
        Some(2) if f.our_euid != 0 => Some(
            "kernel.yama.ptrace_scope is 2: only root (CAP_SYS_PTRACE) may trace".into(),
        ),
        Some(3) => Some("kernel.yama.ptrace_scope is 3: no process may be traced".into()),
        _ => None,
    }
}

/// The facts about process `pid`, read now.
pub fn facts(pid: Pid) -> Facts {
    let read = |p: String| std::fs::read_to_string(p).unwrap_or_default();
    let status = read(format!("/proc/{pid}/status"));
    // TracerPid names the tracing *thread*: report its process.
    let tracer = status_field(&status, "TracerPid:")
        .and_then(|t| t.parse::<i32>().ok())
        .filter(|&t| t != 0);
    let tracer_status = tracer
        .map(|t| read(format!("/proc/{t}/status")))
        .unwrap_or_default();
    // The process's name, not its tracing thread's.
    let tracer_name = status_field(&tracer_status, "Tgid:")
        .map(|tgid| read(format!("/proc/{tgid}/comm")).trim().to_string())
        .filter(|n| !n.is_empty());
    let status = match status_field(&tracer_status, "Tgid:") {
        Some(tgid) => {
            // The process id in place of the thread id, for the message.
            let mut s = String::with_capacity(status.len());
            for l in status.lines() {
                if l.starts_with("TracerPid:") {
                    s.push_str(&format!("TracerPid:\t{tgid}\n"));
                } else {
                    s.push_str(l);
                    s.push('\n');
                }
            }
            s
        }
        None => status,
    };
    // Our own ids from /proc too (real and effective: the first two).
    let ours = read("/proc/self/status".into());
    let our_ids: Vec<u32> = status_field(&ours, "Uid:")
        .map(|u| {
            u.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    Facts {
        pid: pid.as_raw(),
        our_pid: std::process::id() as i32,
        our_uid: our_ids.first().copied().unwrap_or(u32::MAX),
        our_euid: our_ids.get(1).copied().unwrap_or(u32::MAX),
        stat: read(format!("/proc/{pid}/stat")),
        ptrace_scope: read("/proc/sys/kernel/yama/ptrace_scope".into())
            .trim()
            .parse()
            .ok(),
        status,
        tracer_name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(status: &str) -> Facts {
        Facts {
            pid: 100,
            our_pid: 50,
            our_uid: 1000,
            our_euid: 1000,
            status: status.into(),
            stat: "100 (x) S 1 100 100 0 -1 4194304 0 0".into(),
            ptrace_scope: Some(0),
            tracer_name: None,
        }
    }

    #[test]
    fn each_cause_in_words() {
        let mut f = facts("State:\tS (sleeping)\nTracerPid:\t0\nUid:\t1000\t1000\t1000\t1000\n");
        assert_eq!(reason(&f), None);
        f.pid = 50;
        assert!(reason(&f).is_some_and(|r| r.contains("itself")));
        let f = facts("State:\tZ (zombie)\nTracerPid:\t0\n");
        assert!(reason(&f).is_some_and(|r| r.contains("zombie")));
        let mut f = facts("State:\tS (sleeping)\nTracerPid:\t0\n");
        f.stat = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0".into();
        assert!(reason(&f).is_some_and(|r| r.contains("kernel thread")));
        let mut f = facts("State:\tS (sleeping)\nTracerPid:\t77\n");
        f.tracer_name = Some("gdb".into());
        assert_eq!(
            reason(&f).as_deref(),
            Some("it is already traced by process 77 (gdb); a process can have one tracer only")
        );
        let f = facts("State:\tS (sleeping)\nTracerPid:\t0\nUid:\t0\t0\t0\t0\n");
        assert!(reason(&f).is_some_and(|r| r.contains("uid 0") && r.contains("as uid 1000")));
        let mut f = facts("State:\tS (sleeping)\nTracerPid:\t0\nUid:\t1000\t1000\t1000\t1000\n");
        f.ptrace_scope = Some(1);
        assert!(reason(&f).is_some_and(|r| r.contains("ptrace_scope is 1")));
    }
}
