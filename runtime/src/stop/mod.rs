//! Stopping the world: bring every thread of a seized process to a state
//! the update can start from, within a time limit.
//!
//! A thread is ready when it is
//! - at an update point of the running image (its rbp chain unwinds through
//!   call sites of the tables down to `main` or its start routine), or
//! - blocked in a known-safe library call (read, accept, nanosleep,
//!   pthread_mutex_lock ...) whose system call was interrupted before it had
//!   any effect, called from a statement the tables say can be re-executed.
//!
//! Every other thread runs on with `int3` armed at every update point until
//! it hits one or blocks in a safe call (running threads are interrupted
//! every few milliseconds to look). Signals that arrive meanwhile are held
//! back and queued again at the end; threads created meanwhile are caught
//! and classified too; forked children get the original bytes back and are
//! let go. The breakpoints are always removed before returning, and every
//! thread of the process is left in a ptrace-stop with no interrupt pending.

use crate::engine::state::{Image, Readiness, ThreadState};
use crate::engine::unwind::{StackSnapshot, Top, UnwindError, Unwinder, Unwound};
use crate::load::image::Libraries;
use crate::target::breakpoint::{
    release_forked_child, BreakpointError, BreakpointSet, ChildMemory, PendingTrap, StepEnd,
};
use crate::target::procfs::{self, MemoryMap, ProcError};
use crate::target::ptrace::{PtraceError, Regs, Sig, Stop, Tracee};
use crate::target::ProcessMemory;
use nix::libc;
use nix::unistd::Pid;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::time::{Duration, Instant};
use upstare_dwarf::fdt::{Callee, FrameTables, FunctionTable};
use upstare_dwarf::{LinkAddr, RuntimeAddr};

/// How to stop the world.
#[derive(Clone, Debug)]
pub struct StopOptions {
    /// Longest time the threads may take to become ready.
    pub timeout: Duration,
    /// How often a thread running towards an update point is interrupted to
    /// see whether it blocked in a safe call meanwhile.
    pub poll_interval: Duration,
    /// Let this many update-point hits pass before stopping (every thread
    /// runs until then; used to update at the k-th hit of a run). The time
    /// limit counts from the last skipped hit.
    pub skip_hits: u64,
    /// Bound on the time spent letting those hits pass.
    pub skip_timeout: Duration,
    /// Refuse processes with more threads than this.
    pub max_threads: usize,
    /// Bound on each wait for a single thread to stop when asked to.
    pub stop_wait: Duration,
    /// How long threads held at update points wait for the others to make
    /// progress before they are let run for a while: a thread that is not
    /// ready may need one of them (to signal its condition variable).
    pub breath: Duration,
}

impl Default for StopOptions {
    fn default() -> Self {
        StopOptions {
            timeout: Duration::from_millis(500),
            poll_interval: Duration::from_millis(15),
            skip_hits: 0,
            skip_timeout: Duration::from_secs(120),
            max_threads: 4096,
            stop_wait: Duration::from_secs(2),
            breath: Duration::from_millis(50),
        }
    }
}

/// Where the time went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StopTimings {
    /// Classifying the threads as seized (unwinding included).
    pub classify: Duration,
    /// Writing `int3` at every update point.
    pub arm: Duration,
    /// Letting the threads that were not ready run to a point.
    pub run: Duration,
    /// Stopping what still ran, removing the breakpoints, requeueing
    /// signals.
    pub finish: Duration,
    /// The whole call.
    pub total: Duration,
}

/// The world, stopped.
#[derive(Clone, Debug)]
pub struct Stopped {
    /// Every thread of the process, ready, sorted by thread id.
    pub threads: Vec<ThreadState>,
    /// Update-point breakpoints taken (skipped hits included).
    pub breakpoints_hit: u64,
    /// Breakpoints armed (0 when every thread was ready as seized).
    pub breakpoints_armed: usize,
    /// Times a running thread was interrupted to be looked at.
    pub interrupts: u64,
    /// Times the threads held at update points were let run again because
    /// the others made no progress.
    pub breaths: u64,
    /// Signals that arrived while stopping, held back and queued again on
    /// their thread (they are received when it runs again).
    pub signals_requeued: Vec<(i32, Sig)>,
    /// Child processes forked while stopping: given their original code
    /// bytes back and detached (they are not updated).
    pub children_released: Vec<i32>,
    pub timings: StopTimings,
}

/// Where a thread that is not ready is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// In a function of the image.
    App {
        function: String,
        /// Nearest preceding source position the tables know.
        file: String,
        line: u32,
    },
    /// In library code (or the image's PLT).
    Library {
        library: String,
        symbol: Option<String>,
        /// The first application frame below, if the library frames could
        /// be unwound: function, file, line of its call.
        called_from: Option<(String, String, u32)>,
    },
    /// Nowhere known.
    Unknown,
}

/// One thread that did not become ready in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReadyThread {
    pub tid: i32,
    pub rip: RuntimeAddr,
    pub location: Location,
    /// Why it is not ready (the last classification).
    pub reason: String,
}

impl fmt::Display for NotReadyThread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "thread {} ", self.tid)?;
        match &self.location {
            Location::App {
                function,
                file,
                line,
            } => write!(f, "in {function} ({file}:{line})")?,
            Location::Library {
                library,
                symbol,
                called_from,
            } => {
                let lib = short(library);
                match symbol {
                    Some(s) => write!(f, "in {s} ({lib})")?,
                    None => write!(f, "in {lib}")?,
                }
                if let Some((func, file, line)) = called_from {
                    write!(f, " called from {func} ({file}:{line})")?;
                }
            }
            Location::Unknown => f.write_str("at an unknown place")?,
        }
        write!(f, " at {}: {}", self.rip, self.reason)
    }
}

fn short(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Why the world could not be stopped. Whatever the error, no breakpoint
/// is left in the process (unless the process is gone) and signals held
/// back are queued again.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error("process {pid}: {} thread(s) did not reach an update point or a safe blocking call within {timeout:?}:\n{}", threads.len(), lines(threads))]
    NotReady {
        pid: i32,
        timeout: Duration,
        threads: Vec<NotReadyThread>,
    },
    #[error("process {pid} has {count} threads, more than the limit of {limit}")]
    TooManyThreads {
        pid: i32,
        count: usize,
        limit: usize,
    },
    #[error("process {pid} ended while being stopped ({how})")]
    Gone { pid: i32, how: String },
    #[error("process {pid} called execve while being stopped: it runs another program now")]
    Exec { pid: i32 },
    #[error("process {pid}: {skipped} of {wanted} update-point hits passed within {waited:?}")]
    SkipTimeout {
        pid: i32,
        skipped: u64,
        wanted: u64,
        waited: Duration,
    },
    #[error("process {pid}: thread {tid} did not stop within {waited:?} when asked to")]
    NoStop {
        pid: i32,
        tid: i32,
        waited: Duration,
    },
    #[error(transparent)]
    Ptrace(#[from] PtraceError),
    #[error(transparent)]
    Breakpoint(#[from] BreakpointError),
    #[error(transparent)]
    Proc(#[from] ProcError),
}

fn lines(threads: &[NotReadyThread]) -> String {
    threads
        .iter()
        .map(|t| format!("  {t}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Return values of an interrupted system call that had no effect yet:
/// -EINTR, -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND,
/// -ERESTART_RESTARTBLOCK.
const NO_EFFECT: [i64; 5] = [-4, -512, -513, -514, -516];
const EINTR: i64 = -4;
const ERESTARTNOHAND: i64 = -514;

/// Library functions a blocked thread may be abandoned in, with the system
/// calls glibc makes for them (checked on x86-64 glibc 2.36: `nanosleep`,
/// `sleep` and `usleep` use clock_nanosleep, `recv` recvfrom, `select`
/// pselect6, `waitpid` wait4, `pthread_mutex_lock` futex).
fn safe_syscalls(callee: &str) -> &'static [i64] {
    use libc::*;
    match callee {
        "read" => &[SYS_read],
        "readv" => &[SYS_readv],
        "recv" | "recvfrom" => &[SYS_recvfrom],
        "recvmsg" => &[SYS_recvmsg],
        "accept" | "accept4" => &[SYS_accept, SYS_accept4],
        "poll" => &[SYS_poll, SYS_ppoll],
        "ppoll" => &[SYS_ppoll],
        "select" => &[SYS_select, SYS_pselect6],
        "pselect" => &[SYS_pselect6],
        "epoll_wait" => &[SYS_epoll_wait, SYS_epoll_pwait],
        "epoll_pwait" => &[SYS_epoll_pwait, SYS_epoll_pwait2],
        "nanosleep" | "clock_nanosleep" | "usleep" | "sleep" => {
            &[SYS_nanosleep, SYS_clock_nanosleep]
        }
        "pthread_mutex_lock" => &[SYS_futex],
        "waitpid" | "wait" => &[SYS_wait4, SYS_waitid],
        "pause" => &[SYS_pause, SYS_rt_sigsuspend],
        "sigsuspend" => &[SYS_rt_sigsuspend],
        _ => &[],
    }
}

/// Library calls left in place during an update (see
/// [`Readiness::InLibrary`]), with the system calls they wait in. They are
/// not safe to re-execute, but what they wait for lies outside the image,
/// so the call can simply return into the new version later.
/// `pthread_join` waits on the joined thread's descriptor (re-executing it
/// would find the join already claimed by this thread).
fn in_place_syscalls(callee: &str) -> &'static [i64] {
    match callee {
        "pthread_join" => &[libc::SYS_futex],
        _ => &[],
    }
}

/// System calls that the kernel ends with -EINTR (not a restart code) when
/// the thread is merely stopped by ptrace: resuming as is would show the
/// program an EINTR it never had.
fn eintr_on_stop(nr: i64) -> bool {
    [
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
    ]
    .contains(&nr)
}

/// Name of an x86-64 system call, for messages.
pub fn syscall_name(nr: i64) -> String {
    use libc::*;
    let known: &[(i64, &str)] = &[
        (SYS_read, "read"),
        (SYS_write, "write"),
        (SYS_readv, "readv"),
        (SYS_writev, "writev"),
        (SYS_poll, "poll"),
        (SYS_ppoll, "ppoll"),
        (SYS_select, "select"),
        (SYS_pselect6, "pselect6"),
        (SYS_nanosleep, "nanosleep"),
        (SYS_clock_nanosleep, "clock_nanosleep"),
        (SYS_futex, "futex"),
        (SYS_accept, "accept"),
        (SYS_accept4, "accept4"),
        (SYS_connect, "connect"),
        (SYS_sendto, "sendto"),
        (SYS_recvfrom, "recvfrom"),
        (SYS_sendmsg, "sendmsg"),
        (SYS_recvmsg, "recvmsg"),
        (SYS_wait4, "wait4"),
        (SYS_waitid, "waitid"),
        (SYS_pause, "pause"),
        (SYS_rt_sigsuspend, "rt_sigsuspend"),
        (SYS_rt_sigtimedwait, "rt_sigtimedwait"),
        (SYS_epoll_wait, "epoll_wait"),
        (SYS_epoll_pwait, "epoll_pwait"),
        (SYS_epoll_pwait2, "epoll_pwait2"),
        (SYS_openat, "openat"),
        (SYS_flock, "flock"),
        (SYS_fcntl, "fcntl"),
        (SYS_semop, "semop"),
        (SYS_msgrcv, "msgrcv"),
        (SYS_restart_syscall, "restart_syscall"),
    ];
    known
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, s)| s.to_string())
        .unwrap_or_else(|| format!("#{nr}"))
}

/// Whether a signal stop is the thread's own fault (re-executing the
/// instruction would raise it again), to be delivered rather than held.
fn is_fault(sig: Sig, code: i32) -> bool {
    [
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
        libc::SIGTRAP,
    ]
    .contains(&sig.0)
        && code > 0
}

/// Signals whose default action stops the process.
fn is_job_control(sig: Sig) -> bool {
    [libc::SIGSTOP, libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU].contains(&sig.0)
}

/// A signal held back from a thread.
struct Held {
    tid: Pid,
    sig: Sig,
    info: libc::siginfo_t,
}

/// A thread that is not ready yet.
struct Waiting {
    running: bool,
    /// Blocked in a safe call, let run so that what it waits for can
    /// happen: ready if still blocked when every other thread is.
    blocked: bool,
    last_kick: Instant,
    reason: String,
    /// Why the update points it reached did not make it ready (a signal
    /// handler, a callback): more telling than where it was last seen.
    at_point: Option<String>,
}

struct Stopper<'a> {
    tracee: &'a mut Tracee,
    image: &'a Image,
    libs: &'a mut Libraries,
    opts: &'a StopOptions,
    pid: Pid,
    mem: ProcessMemory,
    maps: Vec<MemoryMap>,
    ready: BTreeMap<Pid, ThreadState>,
    waiting: BTreeMap<Pid, Waiting>,
    /// Threads with an interrupt of ours whose stop was not seen yet.
    kicked: BTreeSet<Pid>,
    held: Vec<Held>,
    hits: u64,
    interrupts: u64,
    released: Vec<i32>,
    /// Whether not-ready threads are resumed as soon as classified (after
    /// the first pass, once the breakpoints are armed).
    resuming: bool,
    armed: usize,
    /// Every thread not ready is blocked in a safe call: they are being
    /// interrupted one last time to confirm it.
    final_check: bool,
    /// The system call each thread was last seen blocked in.
    syscalls: BTreeMap<Pid, i64>,
    /// When a thread last became ready (or blocked in a safe call).
    last_progress: Instant,
    breaths: u64,
}

/// Stop every thread of the seized `tracee` at an update point of `image`
/// or in a known-safe blocking call, within `opts.timeout`.
///
/// `libs` supplies the CFI of library frames; it is refreshed first (in
/// case the process loaded libraries since it was built). On success every
/// thread is ready and stopped; on [`StopError::NotReady`] each thread that
/// was not ready is named with where it is. In both cases the breakpoints
/// are removed and every thread is left stopped (detach or resume it).
pub fn stop_the_world(
    tracee: &mut Tracee,
    image: &Image,
    libs: &mut Libraries,
    opts: &StopOptions,
) -> Result<Stopped, StopError> {
    let t0 = Instant::now();
    let pid = tracee.pid();
    // A library loaded since `libs` was built is only needed for blocked
    // threads inside it; a failure here shows up there.
    let _ = libs.refresh(pid);
    let maps = procfs::read_maps(pid)?;
    let mem = tracee.memory();
    let mut s = Stopper {
        tracee,
        image,
        libs,
        opts,
        pid,
        mem: mem.clone(),
        maps,
        ready: BTreeMap::new(),
        waiting: BTreeMap::new(),
        kicked: BTreeSet::new(),
        held: Vec::new(),
        hits: 0,
        interrupts: 0,
        released: Vec::new(),
        resuming: false,
        armed: 0,
        final_check: false,
        syscalls: BTreeMap::new(),
        last_progress: Instant::now(),
        breaths: 0,
    };
    let mut timings = StopTimings::default();
    // Dropped (restoring every byte) on every path out of this function.
    let mut bps = BreakpointSet::new(mem);
    let outcome = s.run(&mut bps, &mut timings);
    let t_finish = Instant::now();
    let gone = matches!(
        outcome,
        Err(StopError::Gone { .. }) | Err(StopError::Exec { .. })
    );
    // An error of a thread that vanished means the process died under us.
    let outcome = match outcome {
        Err(e) if !gone && process_dead(pid) => Err(StopError::Gone {
            pid: pid.as_raw(),
            how: e.to_string(),
        }),
        other => other,
    };
    let gone = gone || matches!(outcome, Err(StopError::Gone { .. }));
    let finish = if gone {
        bps.forget_all();
        Ok(())
    } else {
        s.finish(&mut bps)
    };
    timings.finish = t_finish.elapsed();
    timings.total = t0.elapsed();
    drop(bps);
    outcome?;
    finish?;
    if !s.waiting.is_empty() {
        return Err(StopError::NotReady {
            pid: pid.as_raw(),
            timeout: opts.timeout,
            threads: s.diagnose(),
        });
    }
    let signals_requeued = s.held.iter().map(|h| (h.tid.as_raw(), h.sig)).collect();
    Ok(Stopped {
        threads: std::mem::take(&mut s.ready).into_values().collect(),
        breakpoints_hit: s.hits,
        breakpoints_armed: s.armed,
        interrupts: s.interrupts,
        breaths: s.breaths,
        signals_requeued,
        children_released: s.released,
        timings,
    })
}

/// Whether every task of process `pid` has ended (gone, zombie or dead),
/// or does within a short while (a process being killed takes a moment
/// to tear its threads down). Only asked on an error path.
fn process_dead(pid: Pid) -> bool {
    let ended = || {
        let Ok(tasks) = procfs::list_tasks(pid) else {
            return true;
        };
        tasks.iter().all(|t| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{t}/stat"))
                .ok()
                .and_then(|st| {
                    let i = st.rfind(')')?;
                    st[i + 1..].trim_start().chars().next()
                })
                .is_none_or(|c| matches!(c, 'Z' | 'X' | 'x'))
        })
    };
    for _ in 0..40 {
        if ended() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

impl Stopper<'_> {
    fn run(
        &mut self,
        bps: &mut BreakpointSet<ProcessMemory>,
        timings: &mut StopTimings,
    ) -> Result<(), StopError> {
        let t = Instant::now();
        let tasks: BTreeSet<Pid> = self.tracee.tasks()?.into_iter().collect();
        if tasks.len() > self.opts.max_threads {
            return Err(StopError::TooManyThreads {
                pid: self.pid.as_raw(),
                count: tasks.len(),
                limit: self.opts.max_threads,
            });
        }
        let skipping = self.opts.skip_hits > 0;
        let threads: Vec<Pid> = self
            .tracee
            .traced()
            .into_iter()
            .filter(|t| tasks.contains(t))
            .collect();
        for tid in threads {
            // Threads created while seizing may not have reported their
            // first stop yet.
            if self.tracee.state(tid) == Some(crate::target::ptrace::ThreadState::Running) {
                self.waiting
                    .insert(tid, self.new_waiting(true, "just created"));
                self.wait_first_stop(bps, tid)?;
                continue;
            }
            self.look_at(bps, tid, skipping)?;
        }
        timings.classify = t.elapsed();
        if self.waiting.is_empty() {
            return Ok(());
        }

        let t = Instant::now();
        for f in &self.image.tables.functions {
            for p in &f.update_points {
                bps.arm(self.image.runtime(p.addr))?;
            }
        }
        timings.arm = t.elapsed();
        self.armed = bps.len();
        self.resuming = true;

        let t = Instant::now();
        // Threads blocked in safe calls run on: what they wait for may be
        // what another thread needs to get ready.
        let blocked: Vec<Pid> = self
            .ready
            .iter()
            .filter(|(_, t)| t.readiness.is_blocked())
            .map(|(t, _)| *t)
            .collect();
        for tid in blocked {
            self.ready.remove(&tid);
            let mut w = self.new_waiting(false, "blocked in a safe call");
            w.blocked = true;
            self.waiting.insert(tid, w);
        }
        let stopped: Vec<Pid> = self
            .waiting
            .iter()
            .filter(|(_, w)| !w.running)
            .map(|(t, _)| *t)
            .collect();
        for tid in stopped {
            // A signal kept while seizing would be delivered by the resume.
            if let Some(sig) = self.tracee.take_pending_signal(tid) {
                self.hold_current(tid, sig)?;
            }
            self.resume(bps, tid)?;
        }
        let result = self.wait_loop(bps).and_then(|()| self.sweep_dead());
        timings.run = t.elapsed();
        result
    }

    /// Whether a ready (stopped) thread died meanwhile: stopped threads
    /// only die with their whole process (SIGKILL, exit_group), and report
    /// nothing but that death.
    fn sweep_dead(&mut self) -> Result<(), StopError> {
        let ready: Vec<Pid> = self.ready.keys().copied().collect();
        for tid in ready {
            match self.tracee.try_wait(tid) {
                Ok(None) => {}
                Ok(Some(stop)) if stop.is_terminal() => {
                    return Err(StopError::Gone {
                        pid: self.pid.as_raw(),
                        how: format!("thread {tid}: {stop:?}"),
                    })
                }
                // Not expected of a stopped thread; it stays stopped.
                Ok(Some(_)) => {}
                Err(PtraceError::Gone { .. }) => {
                    return Err(StopError::Gone {
                        pid: self.pid.as_raw(),
                        how: format!("thread {tid} is gone"),
                    })
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn new_waiting(&self, running: bool, reason: &str) -> Waiting {
        Waiting {
            running,
            blocked: false,
            last_kick: Instant::now(),
            reason: reason.to_string(),
            at_point: None,
        }
    }

    /// Wait for the first stop of a thread that was created while seizing
    /// and handle it.
    fn wait_first_stop(
        &mut self,
        bps: &mut BreakpointSet<ProcessMemory>,
        tid: Pid,
    ) -> Result<(), StopError> {
        match self.tracee.wait_stop(tid, self.opts.stop_wait) {
            Ok(stop) => self.handle(bps, tid, stop),
            Err(PtraceError::Timeout { .. }) => Err(StopError::NoStop {
                pid: self.pid.as_raw(),
                tid: tid.as_raw(),
                waited: self.opts.stop_wait,
            }),
            Err(e) => Err(e.into()),
        }
    }

    fn wait_loop(&mut self, bps: &mut BreakpointSet<ProcessMemory>) -> Result<(), StopError> {
        let start = Instant::now();
        let skip = self.opts.skip_hits;
        let mut deadline = (skip == 0).then(|| start + self.opts.timeout);
        let mut pause = Duration::from_micros(20);
        while !self.waiting.is_empty() {
            let now = Instant::now();
            match deadline {
                Some(d) if now >= d => return Ok(()),
                None if now.duration_since(start) >= self.opts.skip_timeout => {
                    return Err(StopError::SkipTimeout {
                        pid: self.pid.as_raw(),
                        skipped: self.hits,
                        wanted: skip,
                        waited: now.duration_since(start),
                    })
                }
                _ => {}
            }
            let mut progressed = false;
            let running: Vec<Pid> = self
                .waiting
                .iter()
                .filter(|(_, w)| w.running)
                .map(|(t, _)| *t)
                .collect();
            for tid in running {
                match self.tracee.try_wait(tid) {
                    Ok(Some(stop)) => {
                        progressed = true;
                        self.handle(bps, tid, stop)?;
                    }
                    Ok(None) => {}
                    Err(PtraceError::Gone { .. }) => {
                        self.waiting.remove(&tid);
                        self.check_alive()?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if deadline.is_none() && self.hits >= skip {
                deadline = Some(Instant::now() + self.opts.timeout);
                self.last_progress = Instant::now();
            }
            if deadline.is_some() {
                self.kick_running()?;
                self.confirm_or_breathe(bps)?;
            }
            if progressed {
                pause = Duration::from_micros(20);
            } else {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(1));
            }
        }
        Ok(())
    }

    /// When only threads blocked in safe calls are left, interrupt them
    /// to confirm they still are (they become ready then). When threads
    /// that are not ready made no progress for a while, let the threads
    /// held at update points run again (they are held again at their next
    /// point): one of them may be what the others wait for.
    fn confirm_or_breathe(
        &mut self,
        bps: &mut BreakpointSet<ProcessMemory>,
    ) -> Result<(), StopError> {
        let not_ready = self.waiting.values().any(|w| !w.blocked);
        if !not_ready {
            self.final_check = true;
            let unconfirmed: Vec<Pid> = self
                .waiting
                .iter()
                .filter(|(t, w)| w.running && !self.kicked.contains(t))
                .map(|(t, _)| *t)
                .collect();
            for tid in unconfirmed {
                self.interrupt(tid)?;
            }
            return Ok(());
        }
        self.final_check = false;
        if self.ready.is_empty() || self.last_progress.elapsed() < self.opts.breath {
            return Ok(());
        }
        self.breaths += 1;
        self.last_progress = Instant::now();
        let held: Vec<(Pid, bool)> = self
            .ready
            .iter()
            .map(|(t, s)| (*t, s.readiness.is_blocked()))
            .collect();
        for (tid, blocked) in held {
            self.ready.remove(&tid);
            let mut w = self.new_waiting(false, "let run while the others get ready");
            w.blocked = blocked;
            self.waiting.insert(tid, w);
            self.resume(bps, tid)?;
        }
        Ok(())
    }

    /// Interrupt the running threads not looked at for a poll interval
    /// (threads blocked in safe calls are left alone).
    fn kick_running(&mut self) -> Result<(), StopError> {
        let now = Instant::now();
        let due: Vec<Pid> = self
            .waiting
            .iter()
            .filter(|(t, w)| {
                w.running
                    && !w.blocked
                    && !self.kicked.contains(t)
                    && now.duration_since(w.last_kick) >= self.opts.poll_interval
            })
            .map(|(t, _)| *t)
            .collect();
        for tid in due {
            self.interrupt(tid)?;
            if let Some(w) = self.waiting.get_mut(&tid) {
                w.last_kick = now;
            }
        }
        Ok(())
    }

    fn interrupt(&mut self, tid: Pid) -> Result<(), StopError> {
        match self.tracee.interrupt(tid) {
            Ok(()) => {
                self.kicked.insert(tid);
                self.interrupts += 1;
                Ok(())
            }
            // It ended meanwhile: its exit is reported by the next wait.
            Err(PtraceError::Gone { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The process is gone if its leader is.
    fn check_alive(&self) -> Result<(), StopError> {
        if self.tracee.state(self.pid).is_none() {
            return Err(StopError::Gone {
                pid: self.pid.as_raw(),
                how: "its main thread is gone".into(),
            });
        }
        Ok(())
    }

    /// React to a stop of a thread that is not ready.
    fn handle(
        &mut self,
        bps: &mut BreakpointSet<ProcessMemory>,
        tid: Pid,
        stop: Stop,
    ) -> Result<(), StopError> {
        if let Some(w) = self.waiting.get_mut(&tid) {
            w.running = false;
        }
        match stop {
            Stop::Int3 => {
                let mut regs = self.tracee.regs(tid)?;
                let at = RuntimeAddr(regs.rip().0.wrapping_sub(1));
                if !bps.was_armed(at) {
                    // The program's own int3: its SIGTRAP is its business.
                    return self.cont(tid, Some(Sig::TRAP));
                }
                regs.set_rip(at);
                self.tracee.set_regs(tid, &regs)?;
                self.hits += 1;
                if self.hits <= self.opts.skip_hits {
                    return self.resume(bps, tid);
                }
                self.look_at(bps, tid, false)
            }
            Stop::EventStop { .. } => {
                self.kicked.remove(&tid);
                let keep_running = match self.take_pending_trap(bps, tid)? {
                    // Like any hit: skipped up to the k-th.
                    PendingTrap::Taken { .. } => self.hits <= self.opts.skip_hits,
                    PendingTrap::None => self.hits < self.opts.skip_hits,
                    PendingTrap::Ended(stop) => return self.handle(bps, tid, stop),
                };
                self.look_at(bps, tid, keep_running)
            }
            Stop::Signal { sig, code } if is_fault(sig, code) => self.cont(tid, Some(sig)),
            // A thread running towards an update point gets its signals at
            // once, as without us: `raise()` must run the handler before it
            // returns, and two raises of one signal must not merge. Only
            // job-control stops are held (they would stop the whole group).
            Stop::Signal { sig, .. } if !is_job_control(sig) => self.cont(tid, Some(sig)),
            Stop::Signal { sig, .. } => {
                self.hold_current(tid, sig)?;
                self.cont(tid, None)
            }
            Stop::Clone { new } => {
                // Auto-attached; its first stop comes as an EventStop.
                self.waiting
                    .insert(new, self.new_waiting(true, "just created"));
                self.cont(tid, None)
            }
            Stop::Fork { child } => {
                self.release_child(bps, child, false)?;
                self.cont(tid, None)
            }
            Stop::Vfork { child } => {
                self.release_child(bps, child, true)?;
                self.cont(tid, None)
            }
            Stop::Exec { .. } => Err(StopError::Exec {
                pid: self.pid.as_raw(),
            }),
            Stop::Exited { .. } | Stop::Killed { .. } => {
                self.waiting.remove(&tid);
                self.kicked.remove(&tid);
                if tid == self.pid || matches!(stop, Stop::Killed { sig, .. } if sig == Sig::KILL) {
                    return Err(StopError::Gone {
                        pid: self.pid.as_raw(),
                        how: format!("thread {tid}: {stop:?}"),
                    });
                }
                // A thread's end may be the whole process's (exit_group).
                self.sweep_dead()
            }
            Stop::VforkDone
            | Stop::Exiting { .. }
            | Stop::Step
            | Stop::Syscall
            | Stop::OtherEvent { .. } => self.cont(tid, None),
        }
    }

    fn cont(&mut self, tid: Pid, sig: Option<Sig>) -> Result<(), StopError> {
        match self.tracee.cont(tid, sig) {
            Ok(()) => {
                if let Some(w) = self.waiting.get_mut(&tid) {
                    w.running = true;
                }
                Ok(())
            }
            Err(PtraceError::Gone { .. }) => {
                self.waiting.remove(&tid);
                self.check_alive()
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Keep the signal `tid` is stopped for, to queue it again at the end.
    fn hold_current(&mut self, tid: Pid, sig: Sig) -> Result<(), StopError> {
        let info = self.tracee.siginfo(tid)?;
        self.held.push(Held { tid, sig, info });
        Ok(())
    }

    /// Classify stopped thread `tid`: ready threads stay stopped, the others
    /// run on (with `keep_running`, every thread runs on).
    fn look_at(
        &mut self,
        bps: &mut BreakpointSet<ProcessMemory>,
        tid: Pid,
        keep_running: bool,
    ) -> Result<(), StopError> {
        let regs = self.tracee.regs(tid)?;
        let regs = self.undo_eintr(tid, regs)?;
        let at_point = self.at_update_point(regs.rip());
        match self.classify(tid, &regs) {
            Ok(state) if !keep_running => {
                self.last_progress = Instant::now();
                let blocked = state.readiness.is_blocked();
                if blocked && self.resuming && !self.final_check {
                    // Ready while it stays blocked; let it run meanwhile.
                    let w = self.waiting.entry(tid).or_insert_with(|| Waiting {
                        running: false,
                        blocked: true,
                        last_kick: Instant::now(),
                        reason: String::new(),
                        at_point: None,
                    });
                    w.blocked = true;
                    w.reason = "blocked in a safe call".into();
                    w.running = false;
                    return self.resume(bps, tid);
                }
                self.settle(tid)?;
                self.waiting.remove(&tid);
                self.ready.insert(tid, state);
                Ok(())
            }
            other => {
                // Someone is not ready: blocked threads may run on.
                self.final_check = false;
                let reason = match other {
                    Err(r) => r,
                    Ok(_) => "letting update-point hits pass".into(),
                };
                let w = self.waiting.entry(tid).or_insert_with(|| Waiting {
                    running: false,
                    blocked: false,
                    last_kick: Instant::now(),
                    reason: String::new(),
                    at_point: None,
                });
                if at_point && !keep_running {
                    w.at_point = Some(reason.clone());
                }
                w.blocked = false;
                w.reason = reason;
                w.running = false;
                // In the first pass (before arming) nothing runs yet.
                if !self.resuming {
                    return Ok(());
                }
                self.resume(bps, tid)
            }
        }
    }

    /// A thread the ptrace stop itself made fail with EINTR (epoll_wait)
    /// gets the restart code the kernel would have used for a signal without
    /// handler, so that resuming it restarts the call rather than showing
    /// the program an EINTR.
    fn undo_eintr(&mut self, tid: Pid, mut regs: Regs) -> Result<Regs, StopError> {
        let (nr, rax) = (regs.0.orig_rax as i64, regs.0.rax as i64);
        if nr >= 0 && rax == EINTR && eintr_on_stop(nr) {
            regs.0.rax = ERESTARTNOHAND as u64;
            self.tracee.set_regs(tid, &regs)?;
        }
        Ok(regs)
    }

    fn stack_of(&mut self, rsp: RuntimeAddr) -> Option<Range<RuntimeAddr>> {
        let find = |maps: &[MemoryMap]| {
            maps.iter()
                .find(|m| m.contains(rsp) && m.perms.read && m.perms.write)
                .map(|m| m.start..m.end)
        };
        if let Some(r) = find(&self.maps) {
            return Some(r);
        }
        // A stack mapped since (a new thread): read the maps again.
        self.maps = procfs::read_maps(self.pid).ok()?;
        find(&self.maps)
    }

    /// The system call a thread is blocked in: the one first seen rather
    /// than restart_syscall, which continues it after a resume.
    fn syscall_seen(&mut self, tid: Pid, nr: i64) -> i64 {
        if nr == libc::SYS_restart_syscall {
            return self.syscalls.get(&tid).copied().unwrap_or(nr);
        }
        self.syscalls.insert(tid, nr);
        nr
    }

    /// Whether `pc` is an update point of the image.
    fn at_update_point(&self, pc: RuntimeAddr) -> bool {
        self.image
            .link(pc)
            .and_then(|l| self.image.tables.function_at(l).map(|f| (f, l)))
            .is_some_and(|(f, l)| f.update_point_at(l).is_some())
    }

    /// Ready state of a stopped thread, or why it is not ready.
    fn classify(&mut self, tid: Pid, regs: &Regs) -> Result<ThreadState, String> {
        let rip = regs.rip();
        let stack = self.stack_of(regs.rsp());
        let unwind = |me: &mut Self, regs: &Regs| me.unwind_refreshing(tid, stack.clone(), regs);
        let t = tid.as_raw();
        if self.image.is_code(rip) {
            let Some(f) = self
                .image
                .link(rip)
                .and_then(|l| self.image.tables.function_at(l))
            else {
                return Err("in code of the image outside every function of its tables".into());
            };
            if f.update_point_at(rip.to_link(self.image.bias)).is_none() {
                return Err("running, not at an update point".into());
            }
            let u = unwind(self, regs)?;
            return Ok(ThreadState {
                tid: t,
                regs: *regs,
                readiness: Readiness::AtPoint,
                frames: u.frames,
            });
        }
        let (nr, rax) = (regs.0.orig_rax as i64, regs.0.rax as i64);
        if nr < 0 || !NO_EFFECT.contains(&rax) {
            return Err(if nr >= 0 {
                format!(
                    "in system call {} (not interrupted before it had an effect)",
                    syscall_name(nr)
                )
            } else {
                "running library code".into()
            });
        }
        let name = syscall_name(nr);
        let u =
            unwind(self, regs).map_err(|e| format!("blocked in system call {name}, but {e}"))?;
        let Top::InLibrary { call, .. } = &u.top else {
            return Err("not in library code".into());
        };
        let callee = match &call.callee {
            Callee::Plt(n) => n.clone(),
            other => {
                return Err(format!(
                    "blocked in system call {name} under a call to {} that is not a library import",
                    other.id_name()
                ))
            }
        };
        // A call resumed after -ERESTART_RESTARTBLOCK (nanosleep, poll, a
        // futex wait) continues as restart_syscall: the callee's own.
        let in_place = in_place_syscalls(&callee);
        if in_place.contains(&nr) || (nr == libc::SYS_restart_syscall && !in_place.is_empty()) {
            return Ok(ThreadState {
                tid: t,
                regs: *regs,
                readiness: Readiness::InLibrary {
                    callee,
                    syscall: self.syscall_seen(tid, nr) as u64,
                },
                frames: u.frames,
            });
        }
        let continued = nr == libc::SYS_restart_syscall && !safe_syscalls(&callee).is_empty();
        if !continued && !safe_syscalls(&callee).contains(&nr) {
            return Err(format!(
                "blocked in system call {name} inside {callee}, which is not a known-safe call"
            ));
        }
        if call.restart.is_none() {
            return Err(format!(
                "blocked in {callee}, but its statement cannot be re-executed (it has effects before the call)"
            ));
        }
        Ok(ThreadState {
            tid: t,
            regs: *regs,
            readiness: Readiness::Blocked {
                callee,
                syscall: self.syscall_seen(tid, nr) as u64,
            },
            frames: u.frames,
        })
    }

    /// Unwind `tid`; a pc in no known object means the process mapped a
    /// library since `libs` was read (a process stopped at its exec loads
    /// libc later): re-read the maps once and retry. Errors come without
    /// the thread prefix (messages name the thread already).
    fn unwind_refreshing(
        &mut self,
        tid: Pid,
        stack: Option<Range<RuntimeAddr>>,
        regs: &Regs,
    ) -> Result<Unwound, String> {
        let t = tid.as_raw();
        let mut r = unwind_thread(self.image, self.libs, &self.mem, stack.clone(), t, regs);
        if matches!(r, Err(UnwindError::UnknownCode { .. })) && self.libs.refresh(self.pid).is_ok()
        {
            r = unwind_thread(self.image, self.libs, &self.mem, stack, t, regs);
        }
        r.map_err(|e| {
            let e = e.to_string();
            let prefix = format!("thread {tid}: ");
            match e.strip_prefix(&prefix) {
                Some(rest) => rest.to_string(),
                None => e,
            }
        })
    }

    /// Resume a stopped, not-ready thread, first stepping it over the
    /// breakpoint it sits on, if any.
    fn resume(
        &mut self,
        bps: &mut BreakpointSet<ProcessMemory>,
        tid: Pid,
    ) -> Result<(), StopError> {
        let rip = self.tracee.regs(tid)?.rip();
        if bps.is_armed(rip) {
            let out = bps.step_over(&mut *self.tracee, tid, self.opts.stop_wait)?;
            for d in out.deferred {
                self.held.push(Held {
                    tid,
                    sig: d.sig,
                    info: d.info,
                });
            }
            for ev in out.events {
                match ev {
                    Stop::Clone { new } => {
                        self.waiting
                            .insert(new, self.new_waiting(true, "just created"));
                    }
                    Stop::Fork { child } => self.release_child(bps, child, false)?,
                    Stop::Vfork { child } => self.release_child(bps, child, true)?,
                    _ => {}
                }
            }
            match out.end {
                StepEnd::Stepped => {}
                StepEnd::Signal(sig) => return self.cont(tid, Some(sig)),
                StepEnd::Ended(stop) => return self.handle(bps, tid, stop),
                StepEnd::Exec(_) => {
                    return Err(StopError::Exec {
                        pid: self.pid.as_raw(),
                    })
                }
            }
        }
        self.cont(tid, None)
    }

    /// Make sure stopped thread `tid` has no interrupt of ours pending (it
    /// would stop the thread again as soon as the caller resumes it): ask
    /// again, resume, and take the stop, which comes before the thread runs
    /// a single instruction.
    fn settle(&mut self, tid: Pid) -> Result<(), StopError> {
        if !self.kicked.contains(&tid) {
            return Ok(());
        }
        let before = self.tracee.regs(tid)?;
        self.tracee.interrupt(tid)?;
        self.tracee.cont(tid, None)?;
        for _ in 0..64 {
            match self.wait_stopped(tid)? {
                Stop::EventStop { .. } => {
                    self.kicked.remove(&tid);
                    let now = self.tracee.regs(tid)?;
                    if now.rip() != before.rip() {
                        // Not expected: the trap comes before any instruction.
                        self.tracee.set_regs(tid, &before)?;
                    }
                    return Ok(());
                }
                Stop::Signal { sig, .. } => {
                    self.hold_current(tid, sig)?;
                    self.tracee.cont(tid, None)?;
                }
                Stop::Exited { .. } | Stop::Killed { .. } => {
                    return Err(StopError::Gone {
                        pid: self.pid.as_raw(),
                        how: format!("thread {tid} ended"),
                    })
                }
                _ => {
                    self.tracee.set_regs(tid, &before)?;
                    self.tracee.cont(tid, None)?;
                }
            }
        }
        Err(StopError::NoStop {
            pid: self.pid.as_raw(),
            tid: tid.as_raw(),
            waited: self.opts.stop_wait,
        })
    }

    fn wait_stopped(&mut self, tid: Pid) -> Result<Stop, StopError> {
        match self.tracee.wait_stop(tid, self.opts.stop_wait) {
            Ok(s) => Ok(s),
            Err(PtraceError::Timeout { .. }) => Err(StopError::NoStop {
                pid: self.pid.as_raw(),
                tid: tid.as_raw(),
                waited: self.opts.stop_wait,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// A child forked while the breakpoints were armed: give it its original
    /// code back (a vfork child shares ours) and let it go.
    fn release_child(
        &mut self,
        bps: &mut BreakpointSet<ProcessMemory>,
        child: Pid,
        vfork: bool,
    ) -> Result<(), StopError> {
        let memory = if vfork {
            ChildMemory::Shared
        } else {
            ChildMemory::Copied
        };
        match release_forked_child(&mut *self.tracee, bps, child, memory, self.opts.stop_wait) {
            // A child that did not stop or could not be detached is not
            // the update's business: its code is its own again either way.
            Ok(_) | Err(BreakpointError::Child { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.released.push(child.as_raw());
        Ok(())
    }

    /// A thread whose `int3` trap was taken by the interrupt stop that
    /// reported it (see [`BreakpointSet::take_pending_trap`]): take it now,
    /// counting the hit and holding back what came meanwhile.
    fn take_pending_trap(
        &mut self,
        bps: &BreakpointSet<ProcessMemory>,
        tid: Pid,
    ) -> Result<PendingTrap, StopError> {
        let out = bps.take_pending_trap(&mut *self.tracee, tid, self.opts.stop_wait)?;
        for d in out.deferred {
            self.held.push(Held {
                tid,
                sig: d.sig,
                info: d.info,
            });
        }
        if let PendingTrap::Taken { .. } = out.trap {
            self.hits += 1;
        }
        Ok(out.trap)
    }

    /// Thread `tid` ended while being brought to a halt: an error if it was
    /// the main thread.
    fn ended_while_halting(&mut self, tid: Pid, stop: Stop) -> Result<(), StopError> {
        self.waiting.remove(&tid);
        if tid == self.pid {
            return Err(StopError::Gone {
                pid: self.pid.as_raw(),
                how: format!("{stop:?}"),
            });
        }
        Ok(())
    }

    /// Stop every thread still running, remove the breakpoints, queue held
    /// signals again.
    fn finish(&mut self, bps: &mut BreakpointSet<ProcessMemory>) -> Result<(), StopError> {
        let mut first_err: Option<StopError> = None;
        let running: Vec<Pid> = self
            .waiting
            .iter()
            .filter(|(_, w)| w.running)
            .map(|(t, _)| *t)
            .collect();
        for &tid in &running {
            if let Err(e) = self.interrupt(tid) {
                first_err.get_or_insert(e);
            }
        }
        let mut queue: Vec<Pid> = running;
        let mut rounds = 0usize;
        while let Some(tid) = queue.pop() {
            rounds += 1;
            if rounds > 4096 {
                break;
            }
            if let Err(e) = self.bring_to_halt(bps, tid, &mut queue) {
                first_err.get_or_insert(e);
            }
        }
        // Waiting threads that were stopped but may have been interrupted.
        let stopped: Vec<Pid> = self.waiting.keys().copied().collect();
        for tid in stopped {
            if self.kicked.contains(&tid) {
                if let Err(e) = self.settle(tid) {
                    first_err.get_or_insert(e);
                }
            }
            // The program must not see an EINTR our stop caused.
            if let Ok(regs) = self.tracee.regs(tid) {
                let _ = self.undo_eintr(tid, regs);
            }
        }
        if let Err(e) = bps.disarm_all() {
            first_err.get_or_insert(e.into());
        }
        for h in &self.held {
            if let Err(e) = self.tracee.requeue_signal(h.tid, &h.info) {
                first_err.get_or_insert(e.into());
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Wait until interrupted thread `tid` is in its interrupt stop,
    /// handling what comes first. New threads go on `queue`.
    fn bring_to_halt(
        &mut self,
        bps: &mut BreakpointSet<ProcessMemory>,
        tid: Pid,
        queue: &mut Vec<Pid>,
    ) -> Result<(), StopError> {
        for _ in 0..64 {
            let stop = match self.tracee.wait_stop(tid, self.opts.stop_wait) {
                Ok(s) => s,
                Err(PtraceError::Gone { .. }) => {
                    self.waiting.remove(&tid);
                    return Ok(());
                }
                Err(PtraceError::Timeout { .. }) => {
                    return Err(StopError::NoStop {
                        pid: self.pid.as_raw(),
                        tid: tid.as_raw(),
                        waited: self.opts.stop_wait,
                    })
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(w) = self.waiting.get_mut(&tid) {
                w.running = false;
            }
            match stop {
                Stop::EventStop { .. } => {
                    self.kicked.remove(&tid);
                    if let PendingTrap::Ended(stop) = self.take_pending_trap(bps, tid)? {
                        return self.ended_while_halting(tid, stop);
                    }
                    let regs = self.tracee.regs(tid)?;
                    let regs = self.undo_eintr(tid, regs)?;
                    // Last look: stopped where it is, it may be ready.
                    match self.classify(tid, &regs) {
                        Ok(state) => {
                            self.waiting.remove(&tid);
                            self.ready.insert(tid, state);
                        }
                        Err(reason) => {
                            if let Some(w) = self.waiting.get_mut(&tid) {
                                w.reason = reason;
                            }
                        }
                    }
                    return Ok(());
                }
                Stop::Int3 => {
                    let mut regs = self.tracee.regs(tid)?;
                    let at = RuntimeAddr(regs.rip().0.wrapping_sub(1));
                    if bps.was_armed(at) {
                        regs.set_rip(at);
                        self.tracee.set_regs(tid, &regs)?;
                        self.hits += 1;
                        // Our interrupt is pending: the thread stops again
                        // before executing the int3.
                        self.tracee.cont(tid, None)?;
                    } else {
                        self.tracee.cont(tid, Some(Sig::TRAP))?;
                    }
                }
                Stop::Signal { sig, code } if is_fault(sig, code) => {
                    self.tracee.cont(tid, Some(sig))?;
                }
                Stop::Signal { sig, .. } => {
                    self.hold_current(tid, sig)?;
                    self.tracee.cont(tid, None)?;
                }
                Stop::Clone { new } => {
                    self.waiting
                        .insert(new, self.new_waiting(true, "just created"));
                    // Its first stop is an EventStop of its own.
                    self.kicked.insert(new);
                    queue.push(new);
                    self.tracee.cont(tid, None)?;
                }
                Stop::Fork { child } => {
                    self.release_child(bps, child, false)?;
                    self.tracee.cont(tid, None)?;
                }
                Stop::Vfork { child } => {
                    self.release_child(bps, child, true)?;
                    self.tracee.cont(tid, None)?;
                }
                Stop::Exited { .. } | Stop::Killed { .. } => {
                    return self.ended_while_halting(tid, stop);
                }
                Stop::Exec { .. } => {
                    bps.forget_all();
                    return Err(StopError::Exec {
                        pid: self.pid.as_raw(),
                    });
                }
                _ => self.tracee.cont(tid, None)?,
            }
        }
        Err(StopError::NoStop {
            pid: self.pid.as_raw(),
            tid: tid.as_raw(),
            waited: self.opts.stop_wait,
        })
    }

    /// Where each thread that is not ready is, and why.
    fn diagnose(&mut self) -> Vec<NotReadyThread> {
        let tids: Vec<Pid> = self.waiting.keys().copied().collect();
        let mut out = Vec::new();
        for tid in tids {
            let reason = self
                .waiting
                .get(&tid)
                .map(|w| w.at_point.clone().unwrap_or_else(|| w.reason.clone()))
                .unwrap_or_default();
            let Ok(regs) = self.tracee.regs(tid) else {
                out.push(NotReadyThread {
                    tid: tid.as_raw(),
                    rip: RuntimeAddr(0),
                    location: Location::Unknown,
                    reason,
                });
                continue;
            };
            let location = self.locate(tid, &regs);
            out.push(NotReadyThread {
                tid: tid.as_raw(),
                rip: regs.rip(),
                location,
                reason,
            });
        }
        out
    }

    fn locate(&mut self, tid: Pid, regs: &Regs) -> Location {
        let rip = regs.rip();
        let tables = &self.image.tables;
        if let Some(f) = self.image.link(rip).and_then(|l| tables.function_at(l)) {
            let (file, line) = nearest_line(tables, f, rip.to_link(self.image.bias));
            return Location::App {
                function: f.name.clone(),
                file,
                line,
            };
        }
        let Some((lib, link)) = self.libs.lookup(rip) else {
            return Location::Unknown;
        };
        let symbol = lib.symbol_at(link).map(|(s, _)| s.to_string());
        let library = lib.name().to_string();
        let stack = self.stack_of(regs.rsp());
        let called_from =
            unwind_thread(self.image, self.libs, &self.mem, stack, tid.as_raw(), regs)
                .ok()
                .and_then(|u| match u.top {
                    Top::InLibrary { call, .. } => {
                        let f = u.frames.first()?;
                        Some((f.function.clone(), file_name(tables, call.file), call.line))
                    }
                    Top::AtPoint => None,
                });
        Location::Library {
            library,
            symbol,
            called_from,
        }
    }
}

/// Unwind thread `tid` from a one-read copy of its stack (`stack`, the
/// mapping holding rsp) when it can be read, else from live memory.
fn unwind_thread(
    image: &Image,
    libs: &Libraries,
    mem: &ProcessMemory,
    stack: Option<Range<RuntimeAddr>>,
    tid: i32,
    regs: &Regs,
) -> Result<Unwound, UnwindError> {
    let Some(s) = stack else {
        return Unwinder::new(image, libs, mem).unwind(tid, regs);
    };
    // Frames lie at or above rsp.
    let live = regs.rsp().max(s.start)..s.end;
    match StackSnapshot::new(mem, live) {
        Ok(snap) => Unwinder::new(image, libs, &snap)
            .with_stack(s)
            .unwind(tid, regs),
        Err(_) => Unwinder::new(image, libs, mem)
            .with_stack(s)
            .unwind(tid, regs),
    }
}

fn file_name(tables: &FrameTables, file: u32) -> String {
    tables
        .files
        .get(file as usize)
        .map(|f| short(f).to_string())
        .unwrap_or_else(|| "?".into())
}

/// The source position of the last update point or call site at or before
/// `pc` in `f` (the function's declaration line if none).
fn nearest_line(tables: &FrameTables, f: &FunctionTable, pc: LinkAddr) -> (String, u32) {
    let points = f
        .update_points
        .iter()
        .filter(|p| p.line != 0)
        .map(|p| (p.addr, p.file, p.line));
    let calls = f
        .call_sites
        .iter()
        .filter(|c| c.line != 0)
        .map(|c| (c.call_addr, c.file, c.line));
    let best = points
        .chain(calls)
        .filter(|(a, _, _)| *a <= pc)
        .max_by_key(|(a, _, _)| *a);
    match best {
        Some((_, file, line)) => (file_name(tables, file), line),
        None => (
            f.decl_file
                .map(|d| file_name(tables, d))
                .unwrap_or_else(|| "?".into()),
            f.decl_line,
        ),
    }
}
