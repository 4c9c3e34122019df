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
    Planned, UpdateError, UpdateReport,
};
use crate::load::image::running_image;
use crate::target::procfs::{self, MemoryMap};
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
    let done = std::thread::scope(|scope| -> Result<Vec<Finished>, UpdateError> {
        let mut crew = Crew::new();
        let stopped = (|| -> Result<(), UpdateError> {
            for round in 0..=FORK_ROUNDS {
                // Every process of this round is planned while it runs, then
                // all are seized and stopped at once, each by its own
                // thread: none waits paused for the others' plans or stops.
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
                        Err(_) if p != root && procfs::has_ended(p) => {
                            report.exited.push(p.as_raw())
                        }
                        Err(e) => return Err(e),
                    }
                }
                let first = crew.members.len();
                for pl in planned {
                    crew.spawn(scope, pl, opts, new_path, &new_bytes);
                }
                for (i, result) in crew.gather(first, Step::Stopped) {
                    let p = crew.members[i].pid;
                    match result {
                        Ok(()) if round > 0 => report.forked.push(p.as_raw()),
                        Ok(()) => {}
                        Err(_) if p != root && procfs::has_ended(p) => {
                            crew.members[i].gone = true;
                            report.exited.push(p.as_raw());
                        }
                        Err(e) => return Err(e),
                    }
                }
                // Every process known is stopped and cannot fork: any new
                // one was forked before its parent stopped.
                let again: Vec<Pid> = std::iter::once(root)
                    .chain(procfs::descendants(root))
                    .filter(|p| !known.contains(p))
                    .collect();
                if again.is_empty() {
                    break;
                }
                candidates = again;
            }
            Ok(())
        })();
        if let Err(e) = stopped {
            crew.release_all();
            return Err(e);
        }
        update_members(&mut crew, opts, &mut report)
    })?;
    // Each process's report is its own: its resume ended its clock.
    for (r, leftovers) in done {
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

/// What the coordinating thread tells a member's thread.
enum Order {
    /// Load NEW and compute the process's new state.
    Compute,
    /// Commit (`fail`: the test-only injected failure, see
    /// [`injected_commit_failure`]).
    Commit { fail: bool },
    /// The whole tree committed (or a dry run ends): finish and resume.
    Keep,
    /// Another process failed: put everything back and resume.
    Release,
}

/// How far a member's thread has got.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Step {
    Stopped,
    Computed,
    Committed,
}

/// A member's report that it finished `Step` (or failed there).
type Event = (usize, Step, Result<(), UpdateError>);

/// A process's report, its resume timed, and what is left to free.
type Finished = (UpdateReport, Leftovers);

/// One process of the tree, updated by its own thread: ptrace takes a
/// tracee's requests from the thread that seized it only, and the
/// processes' stops, loads and computes then overlap instead of adding up
/// (each process stays stopped until the whole tree has committed).
struct Crewman<'s> {
    pid: Pid,
    orders: std::sync::mpsc::Sender<Order>,
    thread: std::thread::ScopedJoinHandle<'s, Option<Finished>>,
    /// Failed or ended: sent no more orders but the last.
    gone: bool,
}

/// The members' threads and the channel they report on.
struct Crew<'s> {
    members: Vec<Crewman<'s>>,
    events_tx: std::sync::mpsc::Sender<Event>,
    events: std::sync::mpsc::Receiver<Event>,
}

impl<'s> Crew<'s> {
    fn new() -> Self {
        let (events_tx, events) = std::sync::mpsc::channel();
        Crew {
            members: Vec::new(),
            events_tx,
            events,
        }
    }

    /// Starts the thread that seizes and stops `planned`'s process.
    fn spawn<'e: 's>(
        &mut self,
        scope: &'s std::thread::Scope<'s, 'e>,
        planned: Planned,
        opts: &'s ApplyOptions,
        new_path: &'s Path,
        new_bytes: &'s [u8],
    ) {
        let index = self.members.len();
        let pid = Pid::from_raw(planned.pid);
        let (orders, inbox) = std::sync::mpsc::channel();
        let events = self.events_tx.clone();
        let thread = scope.spawn(move || {
            member_thread(index, planned, opts, new_path, new_bytes, &inbox, &events)
        });
        self.members.push(Crewman {
            pid,
            orders,
            thread,
            gone: false,
        });
    }

    /// Waits until every member from `first` on that is not gone has
    /// reported `step`: their results in member order. A thread that ends
    /// without reporting (it panicked) counts as failed.
    fn gather(&mut self, first: usize, step: Step) -> Vec<(usize, Result<(), UpdateError>)> {
        let mut waiting: Vec<usize> = (first..self.members.len())
            .filter(|&i| !self.members[i].gone)
            .collect();
        let mut out: Vec<(usize, Result<(), UpdateError>)> = Vec::new();
        while !waiting.is_empty() {
            match self
                .events
                .recv_timeout(std::time::Duration::from_millis(50))
            {
                Ok((i, s, r)) if s == step && waiting.contains(&i) => {
                    waiting.retain(|&w| w != i);
                    out.push((i, r));
                }
                Ok(_) => {}
                Err(_) => {
                    let lost: Vec<usize> = waiting
                        .iter()
                        .copied()
                        .filter(|&i| self.members[i].thread.is_finished())
                        .collect();
                    for i in lost {
                        waiting.retain(|&w| w != i);
                        self.members[i].gone = true;
                        out.push((
                            i,
                            Err(UpdateError::MemberThread {
                                pid: self.members[i].pid.as_raw(),
                                what: "the thread updating it ended early".into(),
                            }),
                        ));
                    }
                }
            }
        }
        out.sort_by_key(|(i, _)| *i);
        out
    }

    /// Sends `order` to every member not gone.
    fn tell(&self, order: impl Fn(usize) -> Order) {
        for (i, m) in self.members.iter().enumerate() {
            if !m.gone {
                let _ = m.orders.send(order(i));
            }
        }
    }

    /// Every member puts back what it did and resumes its process; waits
    /// for all.
    fn release_all(&mut self) {
        self.end_all(false);
    }

    /// Sends every member its last order (`Keep` when `keep`, else
    /// `Release`) and waits for all: each one's pid, whether it was gone,
    /// and its thread's result.
    fn end_all(&mut self, keep: bool) -> Vec<(Pid, bool, std::thread::Result<Option<Finished>>)> {
        let members = std::mem::take(&mut self.members);
        for m in &members {
            let _ = m
                .orders
                .send(if keep { Order::Keep } else { Order::Release });
        }
        members
            .into_iter()
            .map(|m| (m.pid, m.gone, m.thread.join()))
            .collect()
    }
}

/// The life of one process in a tree update, on its own thread: seize and
/// stop, then compute, commit and finish as the coordinator orders; any
/// failure is reported and the thread waits for the last order before it
/// puts everything back, so that no process resumes before the tree's
/// outcome is known. Ends with its process detached.
fn member_thread(
    index: usize,
    mut planned: Planned,
    opts: &ApplyOptions,
    new_path: &Path,
    new_bytes: &[u8],
    inbox: &std::sync::mpsc::Receiver<Order>,
    events: &std::sync::mpsc::Sender<Event>,
) -> Option<Finished> {
    let say = |step: Step, r: Result<(), UpdateError>| {
        let _ = events.send((index, step, r));
    };
    let mut tracee = match seize_planned(&mut planned) {
        Ok(t) => t,
        Err(e) => {
            say(Step::Stopped, Err(e));
            return None;
        }
    };
    let stopped = stop_process(&mut tracee, &mut planned, opts);
    let finished = (|| {
        let (threads, safety_retries) = match stopped {
            Ok(s) => {
                say(Step::Stopped, Ok(()));
                s
            }
            Err(e) => {
                say(Step::Stopped, Err(e));
                let _ = inbox.recv();
                return None;
            }
        };
        if !matches!(inbox.recv(), Ok(Order::Compute)) {
            return None;
        }
        // Stopped since its own stop ended: the other processes' stops.
        planned.timings.tree_wait_us += planned.clock.lap();
        let mut ready = match compute(
            &mut tracee,
            planned,
            threads,
            safety_retries,
            new_path,
            new_bytes,
            opts,
        ) {
            Ok(r) => {
                say(Step::Computed, Ok(()));
                r
            }
            Err(e) => {
                say(Step::Computed, Err(e));
                let _ = inbox.recv();
                return None;
            }
        };
        let fail = match inbox.recv() {
            Ok(Order::Keep) if opts.dry_run => {
                let (report, clock, leftovers) = ready.dry_finish();
                return Some((report, clock, leftovers));
            }
            Ok(Order::Commit { fail }) => fail,
            _ => return None,
        };
        // Since its own compute: the others' computes.
        ready.lap_tree_wait();
        let pid = ready.report.pid;
        let undo = match commit_ready(&mut ready, false) {
            Ok(undo) if fail => {
                revert_ready(&mut ready, undo);
                say(Step::Committed, Err(UpdateError::InjectedFault { pid }));
                let _ = inbox.recv();
                return None;
            }
            Ok(undo) => {
                ready.lap_commit();
                say(Step::Committed, Ok(()));
                undo
            }
            Err(e) => {
                say(Step::Committed, Err(e));
                let _ = inbox.recv();
                return None;
            }
        };
        match inbox.recv() {
            Ok(Order::Keep) => Some(ready.finish()),
            _ => {
                revert_ready(&mut ready, undo);
                None
            }
        }
    })();
    // Whatever happened, the process runs on; its resume ends its clock.
    let (detached, released) = tracee.detach_timed();
    let (mut report, mut clock, leftovers) = finished?;
    if let Err(e) = detached {
        report.warnings.push(format!("resuming the process: {e}"));
    }
    report.timings.finish_at(&mut clock, released);
    Some((report, leftovers))
}

/// Compute every member, then commit all or none; each process's report
/// (its resume timed) and what is left to free once it runs again.
fn update_members(
    crew: &mut Crew<'_>,
    opts: &ApplyOptions,
    report: &mut TreeReport,
) -> Result<Vec<Finished>, UpdateError> {
    let outcome = (|| -> Result<(), UpdateError> {
        crew.tell(|_| Order::Compute);
        for (i, result) in crew.gather(0, Step::Computed) {
            match result {
                Ok(()) => {}
                Err(_) if procfs::has_ended(crew.members[i].pid) => {
                    crew.members[i].gone = true;
                    report.exited.push(crew.members[i].pid.as_raw());
                }
                Err(e) => return Err(e),
            }
        }
        if opts.dry_run {
            return Ok(());
        }
        let _window = CommitWindow::open();
        let live: Vec<usize> = (0..crew.members.len())
            .filter(|&i| !crew.members[i].gone)
            .collect();
        let count = live.len();
        crew.tell(|i| Order::Commit {
            fail: injected_commit_failure(live.iter().position(|&l| l == i).unwrap_or(0), count),
        });
        let results = crew.gather(0, Step::Committed);
        let committed = results.iter().filter(|(_, r)| r.is_ok()).count();
        if let Some((i, Err(source))) = results.into_iter().find(|(_, r)| r.is_err()) {
            return Err(UpdateError::TreeRolledBack {
                pid: crew.members[i].pid.as_raw(),
                committed,
                source: Box::new(source),
            });
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        crew.release_all();
        return Err(e);
    }
    let mut done = Vec::new();
    let mut lost = None;
    for (pid, gone, joined) in crew.end_all(true) {
        match joined {
            Ok(Some(f)) => done.push(f),
            Ok(None) if gone => {}
            _ => {
                lost.get_or_insert(pid);
            }
        }
    }
    if let Some(pid) = lost {
        return Err(UpdateError::MemberThread {
            pid: pid.as_raw(),
            what: "the thread updating it ended without a report".into(),
        });
    }
    Ok(done)
}
