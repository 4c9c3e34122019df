//! The event loop that stops the world: interrupting the threads, arming
//! `int3` at every update point, waiting for threads to reach one or block
//! in a safe call, catching new threads and forks, holding signals back,
//! and leaving every thread stopped with nothing pending.

use super::classify::NotReadyReason;
use super::policy::{is_fault, is_job_control};
use super::{StopError, StopOptions, StopTimings, Stopped};
use crate::engine::state::{Image, ThreadState};
use crate::load::libraries::Libraries;
use crate::memory::TargetMemory;
use crate::target::breakpoint::{
    release_forked_child, BreakpointError, BreakpointSet, ChildMemory, PendingTrap, StepEnd,
};
use crate::target::procfs::{self, MemoryMap};
use crate::target::ptrace::{PtraceError, Sig, Stop, Tracee};
use crate::target::ProcessMemory;
use nix::libc;
use nix::unistd::Pid;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use upstare_dwarf::RuntimeAddr;

/// A signal held back from a thread.
struct Held {
    tid: Pid,
    sig: Sig,
    info: libc::siginfo_t,
}

/// A thread that is not ready yet.
pub(super) struct Waiting {
    running: bool,
    /// Blocked in a safe call, let run so that what it waits for can
    /// happen: ready if still blocked when every other thread is.
    blocked: bool,
    last_kick: Instant,
    pub(super) reason: NotReadyReason,
    /// Why the update points it reached did not make it ready (a signal
    /// handler, a callback): more telling than where it was last seen.
    pub(super) at_point: Option<NotReadyReason>,
}

impl Waiting {
    fn new(running: bool, reason: NotReadyReason) -> Waiting {
        Waiting {
            running,
            blocked: false,
            last_kick: Instant::now(),
            reason,
            at_point: None,
        }
    }
}

/// What must be done to the stopped process before breakpoints are armed
/// (given the tracee): called with no breakpoint once, before the first is
/// armed (every thread stopped), then with each batch of breakpoints about
/// to be armed, each at its address over the byte it covers (update
/// points, a condition wait's return, a callback's return into a
/// library), so that the rescue handler restores them too.
pub type BeforeArming<'a> =
    dyn FnMut(&mut Tracee, &[(RuntimeAddr, u8)]) -> Result<(), StopError> + 'a;

pub(super) struct Stopper<'a, 'b> {
    pub(super) tracee: &'a mut Tracee,
    /// Run once the threads are classified, only if update points must be
    /// armed (every thread stopped).
    pub(super) before_arming: &'a mut BeforeArming<'b>,
    pub(super) image: &'a Image,
    pub(super) libs: &'a mut Libraries,
    opts: &'a StopOptions,
    pub(super) pid: Pid,
    pub(super) mem: ProcessMemory,
    pub(super) maps: Vec<MemoryMap>,
    /// The [`Tracee::maps_epoch`] `maps` were read at.
    pub(super) maps_epoch: u64,
    ready: BTreeMap<Pid, ThreadState>,
    pub(super) waiting: BTreeMap<Pid, Waiting>,
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
    /// The arming of the update points, once armed.
    arming: Option<std::sync::Arc<super::ArmingPlan>>,
    /// With lazy arming: when every update point gets armed if threads
    /// still run (see [`super::lazy`]).
    escalate_at: Option<Instant>,
    /// Every thread not ready is blocked in a safe call: they are being
    /// interrupted one last time to confirm it.
    final_check: bool,
    /// The system call each thread was last seen blocked in.
    pub(super) syscalls: BTreeMap<Pid, i64>,
    /// When a thread last became ready (or blocked in a safe call).
    last_progress: Instant,
    breaths: u64,
    /// Threads led out of a wait, running to the call's return (where a
    /// breakpoint parks them), with the callee.
    pub(super) leaving: BTreeMap<Pid, (RuntimeAddr, String)>,
    /// Threads parked at the return of a wait they were led out of.
    pub(super) returned: BTreeMap<Pid, String>,
    /// Threads set at the entry of `pthread_mutex_lock` to re-acquire the
    /// mutex of their condition wait (callee, mutex); never let run while
    /// stopping (their mutex's user count is already lowered).
    pub(super) relocking: BTreeMap<Pid, (String, u64)>,
    /// The timed wait each thread was last restarted in.
    pub(super) timed: BTreeMap<Pid, super::classify::TimedWait>,
    /// Threads running a callback under library frames, let run until it
    /// returns into the library: where (a breakpoint there parks them) and
    /// rsp once returned.
    pub(super) in_callback: BTreeMap<Pid, (RuntimeAddr, RuntimeAddr)>,
    /// Threads parked where their callback returned into the library.
    pub(super) out_of_callback: BTreeSet<Pid>,
}

/// Stop every thread of the seized `tracee` at an update point of `image`
/// or in a known-safe blocking call, within `opts.timeout`.
///
/// `libs` supplies the CFI of library frames; it is refreshed first (in
/// case the process loaded libraries since it was built). On success every
/// thread is ready and stopped; on [`StopError::NotReady`] each thread that
/// was not ready is named with where it is. In both cases the breakpoints
/// are removed and every thread is left stopped (detach or resume it).
pub(super) fn stop(
    tracee: &mut Tracee,
    image: &Image,
    libs: &mut Libraries,
    opts: &StopOptions,
    before_arming: &mut BeforeArming<'_>,
) -> Result<Stopped, StopError> {
    let t0 = Instant::now();
    let pid = tracee.pid();
    crate::update::signals::checkpoint(crate::update::signals::Phase::Stop);
    let maps = match &opts.maps {
        Some(m) => m.to_vec(),
        None => procfs::read_maps(pid)?,
    };
    // A library loaded since `libs` was built is only needed for blocked
    // threads inside it.
    libs.refresh_with(pid, &maps);
    let mem = tracee.memory();
    let maps_epoch = tracee.maps_epoch();
    let mut s = Stopper {
        tracee,
        before_arming,
        image,
        libs,
        opts,
        pid,
        mem: mem.clone(),
        maps,
        maps_epoch,
        ready: BTreeMap::new(),
        waiting: BTreeMap::new(),
        kicked: BTreeSet::new(),
        held: Vec::new(),
        hits: 0,
        interrupts: 0,
        released: Vec::new(),
        resuming: false,
        armed: 0,
        arming: None,
        escalate_at: None,
        final_check: false,
        syscalls: BTreeMap::new(),
        last_progress: Instant::now(),
        breaths: 0,
        leaving: BTreeMap::new(),
        returned: BTreeMap::new(),
        relocking: BTreeMap::new(),
        timed: BTreeMap::new(),
        in_callback: BTreeMap::new(),
        out_of_callback: BTreeSet::new(),
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
            status: None,
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
        maps: (std::mem::take(&mut s.maps), s.maps_epoch),
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

impl Stopper<'_, '_> {
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
                    .insert(tid, self.new_waiting(true, NotReadyReason::JustCreated));
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
        (self.before_arming)(self.tracee, &[])?;
        timings.rescue = t.elapsed();
        let t = Instant::now();
        let arming = match &self.opts.arming {
            Some(a) => a.clone(),
            None => std::sync::Arc::new(super::ArmingPlan::of(self.image)),
        };
        self.arming = Some(arming.clone());
        // Every thread is stopped: the points are armed a cluster of
        // close ones at a time; lazily, those the threads can reach next
        // first (not when counting hits: every point counts).
        match (&arming.lazy, skipping) {
            (Some(lazy), false) => {
                let active = self.active_functions(lazy);
                let mut first = lazy.first(&active);
                if super::lazy::first_points_withheld() {
                    first.clear();
                }
                self.arm_points(bps, &first)?;
                self.escalate_at = Some(Instant::now() + super::lazy::ESCALATE_AFTER);
            }
            _ => self.arm_points(bps, &arming.int3)?,
        }
        if let Some((flag, traps)) = &arming.inline {
            // One store arms every detoured point.
            bps.arm_inline_with(*flag, traps.clone())?;
        }
        timings.arm = t.elapsed();
        self.armed = bps.len();
        crate::update::signals::checkpoint(crate::update::signals::Phase::Stop);
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
            let mut w = self.new_waiting(false, NotReadyReason::BlockedInSafeCall);
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
                        how: format!("thread {tid}: {stop}"),
                        status: stop.exit(),
                    })
                }
                // Not expected of a stopped thread; it stays stopped.
                Ok(Some(_)) => {}
                Err(PtraceError::Gone { .. }) => {
                    return Err(StopError::Gone {
                        pid: self.pid.as_raw(),
                        how: format!("thread {tid} is gone"),
                        status: None,
                    })
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn new_waiting(&self, running: bool, reason: NotReadyReason) -> Waiting {
        Waiting::new(running, reason)
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
                tid,
                waited: self.opts.stop_wait,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Arms the update points `addrs` (those not armed yet), told to the
    /// `before_arming` hook first.
    fn arm_points(
        &mut self,
        bps: &mut BreakpointSet<ProcessMemory>,
        addrs: &[RuntimeAddr],
    ) -> Result<(), StopError> {
        let (hook, tracee) = (&mut self.before_arming, &mut *self.tracee);
        bps.arm_all_told(addrs, |told| hook(tracee, told))
    }

    /// The functions active in some thread, for lazy arming: the function
    /// at each thread's pc and every function a return address on its
    /// stack (the first [`super::lazy::STACK_SCAN_BYTES`] above its stack
    /// pointer) returns into. Threads are all stopped.
    fn active_functions(&mut self, lazy: &super::lazy::LazyArming) -> BTreeSet<usize> {
        let mut active = BTreeSet::new();
        for tid in self.tracee.traced() {
            let Ok(regs) = self.tracee.regs(tid) else {
                continue;
            };
            active.extend(lazy.function_at(regs.rip()));
            let rsp = regs.rsp();
            let Some(stack) = self.stack_of(rsp) else {
                continue;
            };
            let end = stack
                .end
                .0
                .min(rsp.0.saturating_add(super::lazy::STACK_SCAN_BYTES));
            let start = rsp.0 & !7;
            let Ok(bytes) =
                self.mem
                    .read_vec(RuntimeAddr(start), end.saturating_sub(start), 1 << 20)
            else {
                continue;
            };
            for w in bytes.chunks_exact(8) {
                let word = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
                active.extend(lazy.returns_into(word));
            }
        }
        active
    }

    /// With lazy arming, once threads ran long enough with the first
    /// points: every point armed (threads may be running: see
    /// [`BreakpointSet::arm_all`]).
    fn escalate(&mut self, bps: &mut BreakpointSet<ProcessMemory>) -> Result<(), StopError> {
        if self.escalate_at.is_none_or(|at| Instant::now() < at) {
            return Ok(());
        }
        self.escalate_at = None;
        if let Some(arming) = self.arming.clone() {
            self.arm_points(bps, &arming.int3)?;
            self.armed = bps.len();
        }
        Ok(())
    }

    fn wait_loop(&mut self, bps: &mut BreakpointSet<ProcessMemory>) -> Result<(), StopError> {
        let start = Instant::now();
        let skip = self.opts.skip_hits;
        let mut deadline = (skip == 0).then(|| start + self.opts.timeout);
        let mut pause = Duration::from_micros(20);
        let mut quiet_since = Instant::now();
        while !self.waiting.is_empty() {
            crate::update::signals::checkpoint(crate::update::signals::Phase::Stop);
            if let Some(sig) = crate::update::signals::interruption() {
                return Err(StopError::Interrupted {
                    pid: self.pid.as_raw(),
                    sig,
                });
            }
            let now = Instant::now();
            // A thread led out of a wait is given time to reach its
            // return (the mutex holder may have to run first): left on its
            // way, it would return ETIMEDOUT to a plain pthread_cond_wait.
            let grace = if self.leaving.is_empty() {
                Duration::ZERO
            } else {
                self.opts.stop_wait
            };
            match deadline {
                Some(d) if now >= d + grace => return Ok(()),
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
            self.escalate(bps)?;
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
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() < crate::target::ptrace::WAIT_SPIN {
                // A running thread mostly reaches its point within
                // microseconds; the shortest sleep costs tens of them in
                // timer slack, and the backoff hundreds.
                std::thread::yield_now();
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
        // Threads led out of a condition wait stay: one set to re-acquire
        // a mutex holds nothing, one parked at the return holds a mutex
        // that the others re-acquire the same way; let run, it would wait
        // and be led out again.
        let held: Vec<(Pid, bool)> = self
            .ready
            .iter()
            .filter(|(t, _)| !self.relocking.contains_key(t) && !self.returned.contains_key(t))
            .map(|(t, s)| (*t, s.readiness.is_blocked()))
            .collect();
        for (tid, blocked) in held {
            self.ready.remove(&tid);
            let mut w = self.new_waiting(false, NotReadyReason::LetRunForOthers);
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
                status: None,
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
                let Some(at) = bps.trap_site(RuntimeAddr(regs.rip().0.wrapping_sub(1))) else {
                    // The program's own int3: its SIGTRAP is its business.
                    return self.cont(tid, Some(Sig::TRAP));
                };
                regs.set_rip(at);
                self.tracee.set_regs(tid, &regs)?;
                self.on_breakpoint(bps, tid, at)
            }
            Stop::EventStop { .. } => {
                self.kicked.remove(&tid);
                match self.take_pending_trap(bps, tid)? {
                    // A breakpoint hit reported after our interrupt: the
                    // same as one reported first (a thread at the return
                    // of a wait it was led out of is parked there).
                    PendingTrap::Taken { addr } => self.on_breakpoint(bps, tid, addr),
                    PendingTrap::None => self.look_at(bps, tid, self.hits < self.opts.skip_hits),
                    PendingTrap::Ended(stop) => self.handle(bps, tid, stop),
                }
            }
            Stop::Signal { sig, code } if is_fault(sig, code) => self.cont(tid, Some(sig)),
            // A thread running towards an update point gets its signals at
            // once, as without us: `raise()` must run the handler before it
            // returns, and two raises of one signal must not merge. Only
            // job-control stops are held (they would stop the whole group).
            Stop::Signal { sig, .. } if sig.0 == nix::libc::SIGCONT => {
                // A continue discards the stops sent before it (as the
                // kernel does with pending ones): drop those held back.
                self.held.retain(|h| !is_job_control(h.sig));
                self.tracee.saw_continue();
                self.cont(tid, Some(sig))
            }
            Stop::Signal { sig, .. } if !is_job_control(sig) => self.cont(tid, Some(sig)),
            Stop::Signal { sig, .. } => {
                self.hold_current(tid, sig)?;
                self.cont(tid, None)
            }
            Stop::Clone { new } => {
                // Auto-attached; its first stop comes as an EventStop.
                self.waiting
                    .insert(new, self.new_waiting(true, NotReadyReason::JustCreated));
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
                        how: format!("thread {tid}: {stop}"),
                        status: stop.exit(),
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

    /// Thread `tid` stopped at armed breakpoint `at` (its rip set back
    /// there): parked at a wait's or a callback's return, a hit to skip,
    /// or an update point to look at.
    fn on_breakpoint(
        &mut self,
        bps: &mut BreakpointSet<ProcessMemory>,
        tid: Pid,
        at: RuntimeAddr,
    ) -> Result<(), StopError> {
        if self.arrived(tid, at)? {
            return self.look_at(bps, tid, false);
        }
        if self.in_callback.contains_key(&tid) && self.hits >= self.opts.skip_hits {
            // On its way out of the callback: the update points it
            // passes cannot make it ready.
            return self.resume(bps, tid);
        }
        if !self.at_update_point(at) {
            // Another thread's way out of a callback or a wait (or a
            // deeper call of this one): not an update point.
            return self.look_at(bps, tid, self.hits < self.opts.skip_hits);
        }
        self.hits += 1;
        if self.hits <= self.opts.skip_hits {
            return self.resume(bps, tid);
        }
        self.look_at(bps, tid, false)
    }

    /// The registers of stopped thread `tid`; one stopped at the return
    /// of the wait it was led out of before that breakpoint's int3 ran
    /// has arrived all the same (parked there, the call returning 0).
    fn regs_on_arrival(&mut self, tid: Pid) -> Result<crate::target::ptrace::Regs, StopError> {
        let regs = self.tracee.regs(tid)?;
        if self
            .leaving
            .get(&tid)
            .is_some_and(|(r, _)| *r == regs.rip())
        {
            self.arrived(tid, regs.rip())?;
            return Ok(self.tracee.regs(tid)?);
        }
        Ok(regs)
    }

    /// Whether thread `tid`, stopped at breakpoint `at`, arrived where it
    /// was sent: the return of the wait it was led out of (the call
    /// returns 0, a spurious wake-up) or the return of its callback into
    /// the library. It is parked there.
    fn arrived(&mut self, tid: Pid, at: RuntimeAddr) -> Result<bool, StopError> {
        let mut regs = self.tracee.regs(tid)?;
        if let Some(callee) = self.parked_at_return(tid, at) {
            regs.0.rax = 0;
            self.tracee.set_regs(tid, &regs)?;
            self.returned.insert(tid, callee);
            self.last_progress = Instant::now();
            return Ok(true);
        }
        if self.in_callback.get(&tid) == Some(&(at, regs.rsp())) {
            self.in_callback.remove(&tid);
            self.out_of_callback.insert(tid);
            self.last_progress = Instant::now();
            return Ok(true);
        }
        Ok(false)
    }

    /// The callee of the wait `tid` was led out of, if `at` is that call's
    /// return: the thread is no longer leaving, it is parked there.
    fn parked_at_return(&mut self, tid: Pid, at: RuntimeAddr) -> Option<String> {
        if self.leaving.get(&tid).is_none_or(|(r, _)| *r != at) {
            return None;
        }
        let (_, callee) = self.leaving.remove(&tid)?;
        Some(callee)
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
        let regs = self.regs_on_arrival(tid)?;
        let regs = self.undo_eintr(tid, regs)?;
        let at_point = self.at_update_point(regs.rip());
        let classified = match self.classify(tid, &regs) {
            Err(NotReadyReason::WaitToLeave { callee, resume_at }) if !keep_running => {
                self.lead_out(bps, tid, callee.clone(), resume_at)?;
                Err(NotReadyReason::LeavingWait {
                    callee,
                    at: "at the end of its wait".to_string(),
                })
            }
            Err(NotReadyReason::MutexRelock {
                callee,
                mutex,
                return_slot,
            }) if !keep_running => {
                self.leaving.remove(&tid);
                if self.set_relock(tid, callee.clone(), mutex, return_slot)? {
                    let regs = self.tracee.regs(tid)?;
                    self.classify(tid, &regs)
                } else {
                    Err(NotReadyReason::WaitInternals { callee })
                }
            }
            Err(NotReadyReason::InCallback {
                message,
                return_to,
                return_rsp,
            }) if !keep_running => {
                self.return_from_callback(bps, tid, return_to, return_rsp)?;
                Err(NotReadyReason::InCallback {
                    message,
                    return_to,
                    return_rsp,
                })
            }
            other => other,
        };
        match classified {
            Ok(state) if !keep_running => {
                self.last_progress = Instant::now();
                let blocked = state.readiness.is_blocked();
                if blocked && self.resuming && !self.final_check {
                    // Ready while it stays blocked; let it run meanwhile.
                    let w = self
                        .waiting
                        .entry(tid)
                        .or_insert_with(|| Waiting::new(false, NotReadyReason::BlockedInSafeCall));
                    w.blocked = true;
                    w.reason = NotReadyReason::BlockedInSafeCall;
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
                    Ok(_) => NotReadyReason::SkippingHits,
                };
                let w = self
                    .waiting
                    .entry(tid)
                    .or_insert_with(|| Waiting::new(false, reason.clone()));
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

    /// Resume a stopped, not-ready thread, first stepping it over the
    /// breakpoint it sits on, if any.
    fn resume(
        &mut self,
        bps: &mut BreakpointSet<ProcessMemory>,
        tid: Pid,
    ) -> Result<(), StopError> {
        // Let run, a thread parked at a wait's return goes on from there.
        self.returned.remove(&tid);
        self.out_of_callback.remove(&tid);
        let mut regs = self.tracee.regs(tid)?;
        let rip = regs.rip();
        if let Some(past_trap) = bps.inline_resume(rip) {
            // At a detoured point while the flag is set: go on in its
            // trampoline past the int3, which runs what the point would.
            regs.set_rip(past_trap);
            self.tracee.set_regs(tid, &regs)?;
            return self.cont(tid, None);
        }
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
                            .insert(new, self.new_waiting(true, NotReadyReason::JustCreated));
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
                end @ (Stop::Exited { .. } | Stop::Killed { .. }) => {
                    return Err(StopError::Gone {
                        pid: self.pid.as_raw(),
                        how: format!("thread {tid}: {end}"),
                        status: end.exit(),
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
            tid,
            waited: self.opts.stop_wait,
        })
    }

    fn wait_stopped(&mut self, tid: Pid) -> Result<Stop, StopError> {
        match self.tracee.wait_stop(tid, self.opts.stop_wait) {
            Ok(s) => Ok(s),
            Err(PtraceError::Timeout { .. }) => Err(StopError::NoStop {
                pid: self.pid.as_raw(),
                tid,
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
        Ok(out.trap)
    }

    /// Thread `tid` ended while being brought to a halt: an error if it was
    /// the main thread.
    fn ended_while_halting(&mut self, tid: Pid, stop: Stop) -> Result<(), StopError> {
        self.waiting.remove(&tid);
        if tid == self.pid {
            return Err(StopError::Gone {
                pid: self.pid.as_raw(),
                how: stop.to_string(),
                status: stop.exit(),
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
        if self.held.iter().any(|h| h.sig.0 == nix::libc::SIGCONT) {
            // Held by a single-step: it reached the process all the same.
            self.tracee.saw_continue();
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
                        tid,
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
                    match self.take_pending_trap(bps, tid)? {
                        PendingTrap::Ended(stop) => return self.ended_while_halting(tid, stop),
                        PendingTrap::Taken { addr } => {
                            if !self.arrived(tid, addr)? && self.at_update_point(addr) {
                                self.hits += 1;
                            }
                        }
                        PendingTrap::None => {}
                    }
                    let regs = self.regs_on_arrival(tid)?;
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
                    let site = bps.trap_site(RuntimeAddr(regs.rip().0.wrapping_sub(1)));
                    if let Some(at) = site {
                        regs.set_rip(at);
                        self.tracee.set_regs(tid, &regs)?;
                        if !self.arrived(tid, at)? && self.at_update_point(at) {
                            self.hits += 1;
                        }
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
                        .insert(new, self.new_waiting(true, NotReadyReason::JustCreated));
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
            tid,
            waited: self.opts.stop_wait,
        })
    }
}
