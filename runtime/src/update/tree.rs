//! An application of several processes updated as one: the process given
//! and every descendant that runs the same image (a pre-forking server's
//! workers, a fork-per-connection server's sessions). Every process is
//! stopped before anything changes, every one is planned, loaded and
//! computed, then all commit or none does: when a commit fails, the
//! processes already committed are rolled back from their undo logs and
//! the load's commit steps undone, and every process resumes as it was.
//!
//! A process forked while the others are being stopped is seized and
//! included: once every process known is stopped (so none can fork any
//! more) the tree is listed again, until no new process appears. One that
//! ends while the update runs is dropped. Descendants that run another
//! program (after an exec) are left alone and named.
//!
//! "The same image" is the file the given process runs now, or the file it
//! was started from (`/proc/PID/exe`): a server that re-executes itself for
//! each connection (sshd's rexec: fork, then exec of its own path) runs that
//! file in its children, also after the parent was updated to another file.
//! Such a child runs another version than its parent: each version's
//! processes get their own plan (made once per version). A descendant under
//! a seccomp filter (sshd's pre-authentication child) is refused before
//! any process is stopped.

use super::{
    check_not_sandboxed, commit_ready, compute, interrupted, plan_unseized, read_new, revert_ready,
    seize_planned, signals, stop_process, ApplyOptions, CommitWindow, Leftovers, PhaseClock,
    Planned, Ready, UpdateError, UpdateReport,
};
use crate::engine::state::ThreadState;
use crate::load::image::running_image;
use crate::target::procfs::{self, MemoryMap};
use crate::target::ptrace::{PtraceError, Tracee};
use nix::unistd::Pid;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Rounds of listing the tree again for processes forked meanwhile.
const FORK_ROUNDS: usize = 8;

/// A descendant left alone because it runs another program.
#[derive(Clone, Debug, Serialize)]
pub struct OtherProgram {
    pub pid: i32,
    /// Its executable (`/proc/PID/exe`).
    pub exe: PathBuf,
}

/// What an update of a process tree did.
#[derive(Clone, Debug, Serialize)]
pub struct TreeReport {
    /// Each process updated (or, in a dry run, that would be), the one
    /// given first, with its threads.
    pub processes: Vec<UpdateReport>,
    /// Descendants running another program, left alone.
    pub other_programs: Vec<OtherProgram>,
    /// Processes that ended during the update (dropped from it).
    pub exited: Vec<i32>,
    /// Processes forked during the update and included.
    pub forked: Vec<i32>,
    /// From the first ptrace call to the last process resumed.
    pub total_us: u64,
}

/// The running image's file as `(device major, minor, inode)` of its
/// executable mappings in `maps`.
fn image_identity(maps: &[MemoryMap], path: &Path) -> Option<(u32, u32, u64)> {
    maps.iter()
        .find(|m| m.perms.exec && m.file() == Some(path))
        .map(|m| (m.dev_major, m.dev_minor, m.inode))
}

/// A file as `(device major, minor, inode)`.
type FileId = (u32, u32, u64);

/// The file process `pid` was started from (`/proc/PID/exe`, which names it
/// even when it was replaced or deleted since).
fn exe_identity(pid: Pid) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
    let dev = meta.dev();
    let major = u32::try_from(nix::sys::stat::major(dev)).ok()?;
    let minor = u32::try_from(nix::sys::stat::minor(dev)).ok()?;
    Some((major, minor, meta.ino()))
}

/// Which of the files `ids` process `pid` maps executable (the first in
/// the order of `ids`), if any.
fn runs_image(pid: Pid, ids: &[FileId]) -> Option<FileId> {
    let maps = procfs::read_maps(pid).ok()?;
    ids.iter().copied().find(|&id| {
        maps.iter()
            .any(|m| m.perms.exec && (m.dev_major, m.dev_minor, m.inode) == id)
    })
}

/// One process of the tree while it is being updated.
struct Member {
    tracee: Tracee,
    /// Taken by the computation.
    planned: Option<Planned>,
    threads: Vec<ThreadState>,
    safety_retries: u32,
}

/// The test-only fault: `UPSTARE_TEST_FAIL_COMMIT=last` (debug builds)
/// makes the commit of the last process fail once it has written
/// everything, so that every process must be rolled back.
fn injected_commit_failure(index: usize, count: usize) -> bool {
    cfg!(debug_assertions)
        && std::env::var("UPSTARE_TEST_FAIL_COMMIT").is_ok_and(|v| v == "last")
        && index + 1 == count
}

/// Updates process `pid` and every descendant running the same image to
/// NEW (`new_path`) as one transaction (see the module doc). With no such
/// descendant this is [`super::apply`].
pub fn apply_tree(
    pid: i32,
    new_path: &Path,
    opts: &ApplyOptions,
) -> Result<TreeReport, UpdateError> {
    if pid <= 0 || !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(UpdateError::NoProcess { pid });
    }
    let root = Pid::from_raw(pid);
    let descendants = procfs::descendants(root);
    let single = |pid| -> Result<TreeReport, UpdateError> {
        let report = super::apply(pid, new_path, opts)?;
        let total_us = report.timings.total_us;
        Ok(TreeReport {
            processes: vec![report],
            other_programs: Vec::new(),
            exited: Vec::new(),
            forked: Vec::new(),
            total_us,
        })
    };
    if descendants.is_empty() {
        return single(pid);
    }
    let start = Instant::now();
    let new_bytes = read_new(new_path)?;
    signals::set_target(pid);
    interrupted(pid)?;
    let maps = procfs::read_maps(root).map_err(|source| UpdateError::Proc { pid, source })?;
    let old = running_image(root, &maps)?;
    let Some(id) = image_identity(&maps, &old.path) else {
        // No file to compare the descendants with: PID alone (its own
        // update reports what it finds).
        return single(pid);
    };
    // The running image first: a process mapping it shares PID's plan.
    let mut ids = vec![id];
    if let Some(exe) = exe_identity(root).filter(|&e| e != id) {
        ids.push(exe);
    }
    let mut report = TreeReport {
        processes: Vec::new(),
        other_programs: Vec::new(),
        exited: Vec::new(),
        forked: Vec::new(),
        total_us: 0,
    };
    let mut members: Vec<Member> = Vec::new();
    let mut known: Vec<Pid> = Vec::new();
    // The offline plan is the same for every process of one version: made
    // once (for the first), then given to the others; each process's state
    // is its own.
    let mut shared: Vec<(FileId, ApplyOptions)> = Vec::new();
    let mut candidates: Vec<Pid> = std::iter::once(root).chain(descendants).collect();
    // A sandboxed process is refused before any process is stopped.
    for &p in &candidates {
        if p == root || runs_image(p, &ids).is_some() {
            check_not_sandboxed(p)?;
        }
    }
    for round in 0..=FORK_ROUNDS {
        // Every process of this round is planned while it runs, then each
        // is seized and stopped: none waits paused for the others' plans.
        let mut planned: Vec<Planned> = Vec::new();
        for &p in &candidates {
            if known.contains(&p) {
                continue;
            }
            known.push(p);
            let runs = if p == root {
                Some(id)
            } else {
                runs_image(p, &ids)
            };
            let Some(image) = runs else {
                if procfs::has_ended(p) {
                    report.exited.push(p.as_raw());
                } else {
                    report.other_programs.push(OtherProgram {
                        pid: p.as_raw(),
                        exe: procfs::exe_path(p).unwrap_or_default(),
                    });
                }
                continue;
            };
            let k = match shared.iter().position(|(f, _)| *f == image) {
                Some(k) => k,
                None => {
                    shared.push((image, opts.clone()));
                    shared.len() - 1
                }
            };
            match plan_member(p, new_path, &new_bytes, &mut shared[k].1) {
                Ok(pl) => planned.push(pl),
                Err(_) if p != root && procfs::has_ended(p) => report.exited.push(p.as_raw()),
                Err(e) => return Err(e),
            }
        }
        for pl in planned {
            let p = Pid::from_raw(pl.pid);
            match stop_member(pl, opts) {
                Ok(m) => {
                    if round > 0 {
                        report.forked.push(p.as_raw());
                    }
                    members.push(m);
                }
                Err(_) if p != root && procfs::has_ended(p) => report.exited.push(p.as_raw()),
                Err(e) => return Err(e),
            }
        }
        // Every process known is stopped and cannot fork: any new one was
        // forked before its parent stopped.
        let again: Vec<Pid> = std::iter::once(root)
            .chain(procfs::descendants(root))
            .filter(|p| !known.contains(p))
            .collect();
        if again.is_empty() {
            break;
        }
        candidates = again;
    }
    let result = update_members(&mut members, new_path, &new_bytes, opts, &mut report);
    // Whatever happened, every process runs on.
    let mut detached: Result<(), PtraceError> = Ok(());
    for m in members {
        let r = m.tracee.detach();
        if detached.is_ok() {
            detached = r;
        }
    }
    let done = result?;
    detached?;
    // Each process's report is its own: its resume ends its clock.
    for (mut r, mut clock, leftovers) in done {
        r.timings.finish(&mut clock);
        report.processes.push(r);
        drop(leftovers);
    }
    report.total_us = super::us(start.elapsed());
    Ok(report)
}

/// Plans the update of process `p` while it runs (`opts.plan` is set to
/// the plan made for the first process of its version).
fn plan_member(
    p: Pid,
    new_path: &Path,
    new_bytes: &[u8],
    opts: &mut ApplyOptions,
) -> Result<Planned, UpdateError> {
    let planned = plan_unseized(p, new_path, new_bytes, opts, PhaseClock::start())?;
    if opts.plan.is_none() {
        opts.plan = Some(planned.plan.clone());
        opts.transformers = planned.object.clone();
    }
    Ok(planned)
}

/// Seizes and stops a planned process (its pause starts at the seize).
fn stop_member(mut planned: Planned, opts: &ApplyOptions) -> Result<Member, UpdateError> {
    let mut tracee = seize_planned(&mut planned)?;
    let (threads, safety_retries) = stop_process(&mut tracee, &mut planned, opts)?;
    Ok(Member {
        tracee,
        planned: Some(planned),
        threads,
        safety_retries,
    })
}

/// Load and compute every member, then commit all or none: each process's
/// report (its resume not yet timed), clock and what is left to free once
/// it runs again.
fn update_members(
    members: &mut [Member],
    new_path: &Path,
    new_bytes: &[u8],
    opts: &ApplyOptions,
    report: &mut TreeReport,
) -> Result<Vec<(UpdateReport, PhaseClock, Leftovers)>, UpdateError> {
    let mut ready: Vec<Ready<'_>> = Vec::with_capacity(members.len());
    for m in members.iter_mut() {
        let pid = m.tracee.pid();
        // Moved out: compute consumes them; the tracee stays a member.
        let Some(mut planned) = m.planned.take() else {
            continue;
        };
        // Stopped since its own stop ended: the other processes' plans,
        // stops and computes.
        planned.timings.tree_wait_us += planned.clock.lap();
        let threads = std::mem::take(&mut m.threads);
        match compute(
            &mut m.tracee,
            planned,
            threads,
            m.safety_retries,
            new_path,
            new_bytes,
            opts,
        ) {
            Ok(r) => ready.push(r),
            Err(_) if procfs::has_ended(pid) => report.exited.push(pid.as_raw()),
            Err(e) => return Err(e),
        }
    }
    if opts.dry_run {
        return Ok(ready.into_iter().map(Ready::dry_finish).collect());
    }
    let _window = CommitWindow::open();
    let count = ready.len();
    let mut undos = Vec::with_capacity(count);
    for i in 0..count {
        let pid = ready[i].report.pid;
        // Since its own compute: the others' computes and commits.
        ready[i].lap_tree_wait();
        let failed = match commit_ready(&mut ready[i], false) {
            Ok(undo) if injected_commit_failure(i, count) => {
                revert_ready(&mut ready[i], undo);
                Some(UpdateError::InjectedFault { pid })
            }
            Ok(undo) => {
                ready[i].lap_commit();
                undos.push(undo);
                None
            }
            Err(e) => Some(e),
        };
        if let Some(source) = failed {
            // Put back the ones committed, last first; every guard then
            // unloads NEW from its process.
            for (j, undo) in undos.into_iter().enumerate().rev() {
                revert_ready(&mut ready[j], undo);
            }
            return Err(UpdateError::TreeRolledBack {
                pid,
                committed: i,
                source: Box::new(source),
            });
        }
    }
    Ok(ready.into_iter().map(Ready::finish).collect())
}
