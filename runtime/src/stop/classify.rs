//! Classifying one stopped thread: ready (with its state and frames) or a
//! typed reason why not.
//!
//! A new reason is a variant of [`NotReadyReason`], with its text in the
//! `Display` impl; the policy it applies lives in [`super::policy`].

use super::policy::{self, eintr_on_stop, OnUpdate, EINTR, ERESTARTNOHAND, ETIMEDOUT, NO_EFFECT};
use super::stopper::Stopper;
use super::{syscall_name, StopError};
use crate::engine::state::{Image, Readiness, ThreadState};
use crate::engine::unwind::{InterruptKind, StackSnapshot, Top, UnwindError, Unwinder, Unwound};
use crate::load::libraries::Libraries;
use crate::memory::TargetMemory;
use crate::target::breakpoint::BreakpointSet;
use crate::target::procfs::{self, MemoryMap};
use crate::target::ptrace::Regs;
use crate::target::ProcessMemory;
use nix::libc;
use nix::unistd::Pid;
use std::fmt;
use std::ops::Range;
use std::time::{Duration, Instant};
use upstare_dwarf::fdt::Callee;
use upstare_dwarf::{Reg, RuntimeAddr};

/// Why a thread is not ready (yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotReadyReason {
    /// Created while stopping, not looked at yet.
    JustCreated,
    /// Blocked in a known-safe call and let run meanwhile (ready if still
    /// blocked when every other thread is).
    BlockedInSafeCall,
    /// Held at an update point, let run again because the others made no
    /// progress (one of them may wait for it).
    LetRunForOthers,
    /// Letting update-point hits pass before stopping.
    SkippingHits,
    /// In the image's code, but in no function its tables describe.
    OutsideTables,
    /// Running in the image, not at an update point.
    NotAtPoint,
    /// At an update point, but its stack cannot be taken as it is (a
    /// signal handler, a callback from a library...): the unwinder's words.
    Unwind { message: String },
    /// In a system call that was not interrupted before it had an effect.
    SyscallWithEffect { syscall: i64 },
    /// Running library code, not in a system call.
    RunningLibraryCode,
    /// Blocked in a system call, but the stack could not be unwound.
    BlockedUnwind { syscall: i64, message: String },
    /// Blocked, but the top frame is not library code.
    NotInLibrary,
    /// Blocked under a call that is not a library import.
    NotAnImport { syscall: i64, callee: String },
    /// Blocked in a library call that is not in the policy's table.
    NotKnownSafe { syscall: i64, callee: String },
    /// Waiting in a call the thread is led out of (`pthread_cond_wait`),
    /// not led out yet; it is parked at `resume_at`, the call's return.
    WaitToLeave {
        callee: String,
        resume_at: RuntimeAddr,
    },
    /// Inside a call it is led out of, but not in the wait itself (the
    /// mutex or an internal lock, whose waits must not end early): it runs
    /// on.
    WaitInternals { callee: String },
    /// Woken from `callee` and waiting to re-acquire `mutex`: to be set
    /// at the entry of `pthread_mutex_lock(mutex)` returning to
    /// `return_slot`'s address (see `Readiness::Relock`).
    MutexRelock {
        callee: String,
        mutex: u64,
        return_slot: RuntimeAddr,
    },
    /// Led out of its wait, running through the library's own path to the
    /// call's return (re-acquiring the mutex).
    LeavingWait {
        callee: String,
        /// Where it was last seen: the system call it blocks in, or the
        /// library function it runs.
        at: String,
    },
    /// Running an application callback under library frames (the
    /// unwinder's words in `message`): let run until its outermost callback
    /// frame returns to `return_to` in the library with rsp at
    /// `return_rsp`, where a breakpoint parks it.
    /// The thread runs a signal handler and the context the signal
    /// interrupted cannot be kept (`message` says why).
    UnderSignal { message: String },
    InCallback {
        message: String,
        return_to: RuntimeAddr,
        return_rsp: RuntimeAddr,
    },
}

impl fmt::Display for NotReadyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use NotReadyReason::*;
        match self {
            JustCreated => f.write_str("just created"),
            BlockedInSafeCall => f.write_str("blocked in a safe call"),
            LetRunForOthers => f.write_str("let run while the others get ready"),
            SkippingHits => f.write_str("letting update-point hits pass"),
            OutsideTables => {
                f.write_str("in code of the image outside every function of its tables")
            }
            NotAtPoint => f.write_str("running, not at an update point"),
            Unwind { message } => f.write_str(message),
            SyscallWithEffect { syscall } => write!(
                f,
                "in system call {} (not interrupted before it had an effect)",
                syscall_name(*syscall)
            ),
            RunningLibraryCode => f.write_str("running library code"),
            BlockedUnwind { syscall, message } => write!(
                f,
                "blocked in system call {}, but {message}",
                syscall_name(*syscall)
            ),
            NotInLibrary => f.write_str("not in library code"),
            NotAnImport { syscall, callee } => write!(
                f,
                "blocked in system call {} under a call to {callee} that is not a library import",
                syscall_name(*syscall)
            ),
            NotKnownSafe { syscall, callee } => write!(
                f,
                "blocked in system call {} inside {callee}, which is not a known-safe call",
                syscall_name(*syscall)
            ),
            WaitToLeave { callee, .. } => write!(f, "waiting in {callee}, not led out of it yet"),
            MutexRelock { callee, .. } => {
                write!(f, "woken from {callee}, waiting to re-acquire its mutex")
            }
            WaitInternals { callee } => write!(
                f,
                "inside {callee}, waiting for its mutex or internal lock (not the condition itself)"
            ),
            LeavingWait { callee, at } => write!(
                f,
                "led out of {callee}, still on its way to the call's return (last seen {at})"
            ),
            UnderSignal { message } => write!(f, "it runs a signal handler: {message}"),
            InCallback { message, .. } => write!(
                f,
                "{message}; let run for the callback to return into the library, it has not"
            ),
        }
    }
}

/// Why a thread could not be unwound: the unwinder's words (without the
/// thread prefix) and, when it runs a callback under library frames, where
/// that callback returns into the library and rsp there.
pub(super) struct UnwindFailure {
    message: String,
    callback_return: Option<(RuntimeAddr, RuntimeAddr)>,
}

impl UnwindFailure {
    /// The reason a thread is not ready: `other` with the message, or
    /// [`NotReadyReason::InCallback`] when it runs a callback.
    fn reason(self, other: impl FnOnce(String) -> NotReadyReason) -> NotReadyReason {
        match self.callback_return {
            Some((return_to, return_rsp)) => NotReadyReason::InCallback {
                message: self.message,
                return_to,
                return_rsp,
            },
            None => other(self.message),
        }
    }
}

/// A timed wait a thread was seen in, to restart it with what is left.
pub(super) struct TimedWait {
    rip: u64,
    nr: i64,
    since: Instant,
    timeout: Duration,
    /// The timeout register's value it was last restarted with (the
    /// milliseconds, or the address of the timespec we wrote).
    last_set: u64,
}

impl Stopper<'_, '_> {
    /// A thread the ptrace stop itself made fail with EINTR (epoll_wait)
    /// gets the restart code the kernel would have used for a signal without
    /// handler, so that resuming it restarts the call rather than showing
    /// the program an EINTR (the tracer sets it at each interrupt stop
    /// already), and a timed wait what is left of its timeout.
    pub(super) fn undo_eintr(&mut self, tid: Pid, mut regs: Regs) -> Result<Regs, StopError> {
        let (nr, rax) = (regs.0.orig_rax as i64, regs.0.rax as i64);
        if nr >= 0 && (rax == EINTR || rax == ERESTARTNOHAND) && eintr_on_stop(nr) {
            regs.0.rax = ERESTARTNOHAND as u64;
            if let Some(ms) = policy::timeout_ms(nr, &regs) {
                let left = self.remaining(tid, nr, &regs, ms as u64, || {
                    Some(Duration::from_millis(ms as u64))
                });
                if let Some(left) = left {
                    // 0 makes the call return at once, as its timeout would.
                    regs.0.r10 = left.as_millis().min(i32::MAX as u128) as u64;
                    self.note_set(tid, regs.0.r10);
                }
            } else if let Some(reg) = policy::timespec_arg(nr) {
                if let Some(at) = self.restart_timespec(tid, nr, &regs, reg) {
                    regs.set(reg, at);
                }
            }
            self.tracee.set_regs(tid, &regs)?;
        }
        Ok(regs)
    }

    /// What is left of the timeout of the timed wait `tid` is in (`set`:
    /// the timeout register's value now; `first`: the timeout, read when
    /// the wait is first seen in this call). The time before it was first
    /// seen is not known, so it may wait a little longer than without us,
    /// never the full timeout again at every interruption.
    fn remaining(
        &mut self,
        tid: Pid,
        nr: i64,
        regs: &Regs,
        set: u64,
        first: impl FnOnce() -> Option<Duration>,
    ) -> Option<Duration> {
        let now = Instant::now();
        let same = self
            .timed
            .get(&tid)
            .is_some_and(|w| w.rip == regs.0.rip && w.nr == nr && w.last_set == set);
        if !same {
            let timeout = first()?;
            self.timed.insert(
                tid,
                TimedWait {
                    rip: regs.0.rip,
                    nr,
                    since: now,
                    timeout,
                    last_set: set,
                },
            );
        }
        let w = self.timed.get(&tid)?;
        Some(w.timeout.saturating_sub(now.duration_since(w.since)))
    }

    fn note_set(&mut self, tid: Pid, set: u64) {
        if let Some(w) = self.timed.get_mut(&tid) {
            w.last_set = set;
        }
    }

    /// A timed wait whose relative timeout is a `struct timespec` the
    /// call reads at every start (rt_sigtimedwait, epoll_pwait2): restarted
    /// with what is left, written below the thread's red zone (unused
    /// while the thread is in the system call; the program's own timespec
    /// stays as it is). The address to put in the timeout register, or
    /// `None` to leave the call as it is (no timeout, unreadable, invalid).
    fn restart_timespec(&mut self, tid: Pid, nr: i64, regs: &Regs, reg: Reg) -> Option<u64> {
        const RED_ZONE: u64 = 128;
        let ptr = regs.get(reg);
        if ptr == 0 {
            return None;
        }
        let scratch = regs.rsp().0.checked_sub(RED_ZONE + 16)? & !15;
        let mem = self.mem.clone();
        let read = |at: u64| -> Option<Duration> {
            let mut b = [0u8; 16];
            mem.read(RuntimeAddr(at), &mut b).ok()?;
            let sec = i64::from_le_bytes(b[..8].try_into().ok()?);
            let nsec = i64::from_le_bytes(b[8..].try_into().ok()?);
            (sec >= 0 && (0..1_000_000_000).contains(&nsec))
                .then(|| Duration::new(sec as u64, nsec as u32))
        };
        let left = self.remaining(tid, nr, regs, ptr, || read(ptr))?;
        let mut ts = [0u8; 16];
        ts[..8].copy_from_slice(&(left.as_secs() as i64).to_le_bytes());
        ts[8..].copy_from_slice(&i64::from(left.subsec_nanos()).to_le_bytes());
        let mut mem = self.mem.clone();
        mem.write(RuntimeAddr(scratch), &ts).ok()?;
        self.note_set(tid, scratch);
        Some(scratch)
    }

    pub(super) fn stack_of(&mut self, rsp: RuntimeAddr) -> Option<Range<RuntimeAddr>> {
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
        self.maps_epoch = self.tracee.maps_epoch();
        find(&self.maps)
    }

    /// The system call a thread is blocked in: the one first seen rather
    /// than restart_syscall, which continues it after a resume.
    pub(super) fn syscall_seen(&mut self, tid: Pid, nr: i64) -> i64 {
        if nr == libc::SYS_restart_syscall {
            return self.syscalls.get(&tid).copied().unwrap_or(nr);
        }
        self.syscalls.insert(tid, nr);
        nr
    }

    /// Whether `pc` is an update point of the image.
    pub(super) fn at_update_point(&self, pc: RuntimeAddr) -> bool {
        self.image
            .link(pc)
            .and_then(|l| self.image.tables.function_at(l).map(|f| (f, l)))
            .is_some_and(|(f, l)| f.update_point_at(l).is_some())
    }

    /// Ready state of a stopped thread, or why it is not ready.
    pub(super) fn classify(
        &mut self,
        tid: Pid,
        regs: &Regs,
    ) -> Result<ThreadState, NotReadyReason> {
        let rip = regs.rip();
        let stack = self.stack_of(regs.rsp());
        let unwind = |me: &mut Self, regs: &Regs| me.unwind_refreshing(tid, stack.clone(), regs);
        if let Some(callee) = self.returned.get(&tid).cloned() {
            let u = self
                .unwind_returned(tid, stack, regs)
                .map_err(|message| NotReadyReason::Unwind { message })?;
            return self.state(tid, regs, Readiness::Returned { callee }, u);
        }
        if self.out_of_callback.contains(&tid) {
            let u = unwind(self, regs)
                .map_err(|e| e.reason(|message| NotReadyReason::Unwind { message }))?;
            let Top::InLibrary { call, .. } = &u.top else {
                return Err(NotReadyReason::NotInLibrary);
            };
            return self.state(
                tid,
                regs,
                Readiness::CallbackReturned {
                    callee: call.callee.id_name().to_string(),
                },
                u,
            );
        }
        if let Some((callee, mutex)) = self.relocking.get(&tid).cloned() {
            let u =
                unwind(self, regs).map_err(|e| NotReadyReason::Unwind { message: e.message })?;
            return self.state(tid, regs, Readiness::Relock { callee, mutex }, u);
        }
        if let Some((_, callee)) = self.leaving.get(&tid).cloned() {
            if self.image.is_code(rip) {
                // Past the call's return without being parked there (its
                // breakpoint was lifted to step another thread over it):
                // an ordinary thread again.
                self.leaving.remove(&tid);
            } else {
                // On its way out: only a wait for its mutex is of
                // interest, or a new wait it went into after all.
                return match self.classify_blocked(tid, regs) {
                    Err(r @ NotReadyReason::MutexRelock { .. }) => Err(r),
                    Err(r @ NotReadyReason::WaitToLeave { .. }) => {
                        self.leaving.remove(&tid);
                        Err(r)
                    }
                    _ => Err(NotReadyReason::LeavingWait {
                        callee,
                        at: self.whereabouts(regs),
                    }),
                };
            }
        }
        if self.image.in_trampolines(rip) {
            // On its way through a detour: it reaches code of its function
            // within a few instructions.
            return Err(NotReadyReason::NotAtPoint);
        }
        if self.image.is_code(rip) {
            let Some(f) = self
                .image
                .link(rip)
                .and_then(|l| self.image.tables.function_at(l))
            else {
                return Err(NotReadyReason::OutsideTables);
            };
            if f.update_point_at(rip.to_link(self.image.bias)).is_none() {
                return Err(NotReadyReason::NotAtPoint);
            }
            let u = unwind(self, regs)
                .map_err(|e| e.reason(|message| NotReadyReason::Unwind { message }))?;
            return self.state(tid, regs, Readiness::AtPoint, u);
        }
        self.classify_blocked(tid, regs)
    }

    /// Ready state of a stopped thread outside the image's code (in a
    /// library call), or why it is not ready.
    fn classify_blocked(&mut self, tid: Pid, regs: &Regs) -> Result<ThreadState, NotReadyReason> {
        let stack = self.stack_of(regs.rsp());
        let unwind = |me: &mut Self, regs: &Regs| me.unwind_refreshing(tid, stack.clone(), regs);
        let (nr, rax) = (regs.0.orig_rax as i64, regs.0.rax as i64);
        if nr < 0 || !NO_EFFECT.contains(&rax) {
            return Err(if nr >= 0 {
                NotReadyReason::SyscallWithEffect { syscall: nr }
            } else {
                NotReadyReason::RunningLibraryCode
            });
        }
        let u = unwind(self, regs).map_err(|e| {
            e.reason(|message| NotReadyReason::BlockedUnwind {
                syscall: nr,
                message,
            })
        })?;
        let Top::InLibrary { call, .. } = &u.top else {
            return Err(NotReadyReason::NotInLibrary);
        };
        let callee = match &call.callee {
            Callee::Plt(n) => n.clone(),
            other => {
                return Err(NotReadyReason::NotAnImport {
                    syscall: nr,
                    callee: other.id_name().to_string(),
                })
            }
        };
        // A call resumed after -ERESTART_RESTARTBLOCK (nanosleep, poll, a
        // futex wait) continues as restart_syscall: the callee's own.
        let known = policy::known_call(&callee);
        let leave = known.filter(|c| c.on_update == OnUpdate::LeaveWait);
        if leave.is_some_and(|c| c.syscalls.contains(&nr) || nr == libc::SYS_restart_syscall) {
            if !policy::is_condvar_wait(regs) {
                let lib_cfa = match &u.top {
                    Top::InLibrary { frames, .. } => frames.last().map(|f| f.cfa),
                    _ => None,
                };
                let relock = policy::relock_futex(regs)
                    .filter(|&m| self.is_held_mutex(tid, m))
                    .zip(lib_cfa.and_then(|c| c.checked_offset(-8)));
                return Err(match relock {
                    Some((mutex, return_slot)) => NotReadyReason::MutexRelock {
                        callee,
                        mutex,
                        return_slot,
                    },
                    None => NotReadyReason::WaitInternals { callee },
                });
            }
            return Err(NotReadyReason::WaitToLeave {
                callee,
                resume_at: self.image.runtime(call.return_addr),
            });
        }
        let waits_in = |on_update| {
            known
                .filter(|c| c.on_update == on_update)
                .map_or(&[][..], |c| c.syscalls)
        };
        let in_place = waits_in(OnUpdate::InPlace);
        if in_place.contains(&nr) || (nr == libc::SYS_restart_syscall && !in_place.is_empty()) {
            let syscall = self.syscall_seen(tid, nr) as u64;
            return self.state(tid, regs, Readiness::InLibrary { callee, syscall }, u);
        }
        let safe = waits_in(OnUpdate::Reexecute);
        let continued = nr == libc::SYS_restart_syscall && !safe.is_empty();
        if !continued && !safe.contains(&nr) {
            return Err(NotReadyReason::NotKnownSafe {
                syscall: nr,
                callee,
            });
        }
        let syscall = self.syscall_seen(tid, nr) as u64;
        // A statement with effects before the call cannot run again: the
        // call is left in place instead and returns into NEW's frame (its
        // pointers into the frames are checked by the rebuild, what it
        // holds of the old image is remapped by the sweep, and the
        // interrupted system call restarts with the remapped registers).
        let readiness = if call.restart.is_none() {
            Readiness::InLibrary { callee, syscall }
        } else {
            Readiness::Blocked { callee, syscall }
        };
        self.state(tid, regs, readiness, u)
    }

    /// The state of ready thread `tid` (`regs`, unwound as `u`); when its
    /// bottom frame is a signal handler's, the context the signal
    /// interrupted is classified too (nested handlers up to a bound): it
    /// must wait in a library call, which is left in place.
    fn state(
        &mut self,
        tid: Pid,
        regs: &Regs,
        readiness: Readiness,
        u: Unwound,
    ) -> Result<ThreadState, NotReadyReason> {
        const MAX_NESTED: usize = 8;
        let mut parts = vec![ThreadState {
            tid,
            regs: *regs,
            readiness,
            frames: u.frames,
            below: None,
            beneath: false,
            library_view: None,
        }];
        let mut next = u.below;
        while let Some(ctx) = next.take() {
            if parts.len() > MAX_NESTED {
                return Err(NotReadyReason::UnderSignal {
                    message: format!("more than {MAX_NESTED} nested signal handlers or callbacks"),
                });
            }
            let stack = self.stack_of(ctx.regs.rsp());
            let lower = self.unwind_refreshing(tid, stack, &ctx.regs);
            let (readiness, lower) = match (&ctx.kind, lower) {
                (InterruptKind::Signal { .. }, Err(e)) => {
                    return Err(NotReadyReason::UnderSignal { message: e.message })
                }
                (InterruptKind::Callback { location }, Err(e)) => {
                    // The frames under the callback cannot be kept: let it
                    // return into the library instead.
                    return Err(NotReadyReason::InCallback {
                        message: format!("called back from {location}: {}", e.message),
                        return_to: ctx.regs.rip(),
                        return_rsp: ctx.regs.rsp(),
                    });
                }
                (kind, Ok(lower)) => {
                    let Top::InLibrary { call, .. } = &lower.top else {
                        let at = lower.frames.first().map_or("?", |f| f.function.as_str());
                        return Err(NotReadyReason::UnderSignal {
                            message: format!(
                                "the signal interrupted {at} in its own code, where its frame cannot be mapped (not in a library call)"
                            ),
                        });
                    };
                    let callee = call.callee.id_name().to_string();
                    let readiness = match kind {
                        InterruptKind::Signal { .. } => Readiness::UnderSignal { callee },
                        InterruptKind::Callback { .. } => {
                            // The library expects its callee-saved
                            // registers back from the callback.
                            if let Some(above) = parts.last_mut() {
                                above.library_view = Some(
                                    crate::engine::unwind::TRACKED
                                        .iter()
                                        .map(|&r| (r, ctx.regs.get(r)))
                                        .collect(),
                                );
                            }
                            Readiness::UnderCallback { callee }
                        }
                    };
                    (readiness, lower)
                }
            };
            next = lower.below;
            parts.push(ThreadState {
                tid,
                regs: ctx.regs,
                readiness,
                frames: lower.frames,
                below: None,
                beneath: true,
                library_view: None,
            });
        }
        // Chain the parts, each the `below` of the one above it.
        let mut chained: Option<Box<ThreadState>> = None;
        for mut s in parts.drain(1..).rev() {
            s.below = chained.take();
            chained = Some(Box::new(s));
        }
        let mut top = parts.swap_remove(0);
        top.below = chained;
        Ok(top)
    }

    /// Where a stopped thread outside the image is, for messages: the
    /// system call it is in (a futex wait with its word, value and the
    /// owner a mutex there would name), or the library function it runs.
    pub(super) fn whereabouts(&self, regs: &Regs) -> String {
        let (nr, rip) = (regs.0.orig_rax as i64, regs.rip());
        let place = match self.libs.lookup(rip) {
            Some((lib, link)) => crate::engine::unwind::describe(lib, link),
            None => format!("{:#x}", rip.0),
        };
        if nr < 0 {
            return format!("running {place}");
        }
        if nr != libc::SYS_futex {
            return format!("in system call {} at {place}", policy::syscall_name(nr));
        }
        let word = regs.0.rdi;
        let owner = RuntimeAddr(word)
            .checked_offset(policy::MUTEX_OWNER)
            .and_then(|a| self.mem.read_u32(a).ok());
        let now = self.mem.read_u32(RuntimeAddr(word)).ok();
        format!(
            "in futex op {} for value {} on {word:#x} (holding {}; owner field {}) at {place}",
            regs.0.rsi & 0x7f,
            regs.0.rdx as u32,
            now.map_or("unreadable".to_string(), |v| v.to_string()),
            owner.map_or("unreadable".to_string(), |v| v.to_string()),
        )
    }

    /// Whether a plain (not robust, PI or PP) glibc mutex held by another
    /// thread of the process lies at `addr`, with a user count to lower.
    fn is_held_mutex(&self, tid: Pid, addr: u64) -> bool {
        let at = |off: i64| {
            RuntimeAddr(addr)
                .checked_offset(off)
                .and_then(|a| self.mem.read_u32(a).ok())
        };
        let (Some(owner), Some(nusers), Some(kind)) = (
            at(policy::MUTEX_OWNER),
            at(policy::MUTEX_NUSERS),
            at(policy::MUTEX_KIND),
        ) else {
            return false;
        };
        let owner = Pid::from_raw(owner as i32);
        owner != tid
            && self.tracee.traced().contains(&owner)
            && nusers > 0
            && kind & policy::MUTEX_SPECIAL_KINDS == 0
            && kind & 0x7f <= 3
    }

    /// Abandon thread `tid` in its wait for `mutex` (classified
    /// [`NotReadyReason::MutexRelock`]) and set it at the entry of
    /// `pthread_mutex_lock(mutex)` returning to the address in
    /// `return_slot`, lowering the mutex's user count for the lock to come.
    pub(super) fn set_relock(
        &mut self,
        tid: Pid,
        callee: String,
        mutex: u64,
        return_slot: RuntimeAddr,
    ) -> Result<bool, StopError> {
        // The C library the thread waits in.
        let rip = self.tracee.regs(tid)?.rip();
        let Some(lock) = self
            .libs
            .lookup(rip)
            .and_then(|(lib, _)| lib.function_addr("pthread_mutex_lock"))
        else {
            return Ok(false);
        };
        let Some(nusers_at) = RuntimeAddr(mutex).checked_offset(policy::MUTEX_NUSERS) else {
            return Ok(false);
        };
        let mut regs = self.tracee.regs(tid)?;
        // The library frames are dropped: the registers the application
        // frame expects back are the ones its callee must preserve.
        let stack = self.stack_of(regs.rsp());
        let Some(app) = self
            .unwind_refreshing(tid, stack, &regs)
            .ok()
            .and_then(|u| u.frames.into_iter().next())
        else {
            return Ok(false);
        };
        let mut mem = self.mem.clone();
        let lowered = mem
            .read_u32(nusers_at)
            .and_then(|n| mem.write_u32(nusers_at, n.saturating_sub(1)));
        if lowered.is_err() {
            return Ok(false);
        }
        for (reg, v) in &app.callee_saved {
            regs.set(*reg, *v);
        }
        regs.0.rbp = app.cfa.0.wrapping_sub(16);
        regs.0.rip = lock.0;
        regs.0.rsp = return_slot.0;
        regs.0.rdi = mutex;
        regs.0.rax = 0;
        regs.0.orig_rax = u64::MAX;
        self.tracee.set_regs(tid, &regs)?;
        self.relocking.insert(tid, (callee, mutex));
        Ok(true)
    }

    /// Unwind `tid`, stopped at the return address of a call of its top
    /// application frame.
    fn unwind_returned(
        &mut self,
        tid: Pid,
        stack: Option<Range<RuntimeAddr>>,
        regs: &Regs,
    ) -> Result<Unwound, String> {
        let unwinder = Unwinder::new(self.image, self.libs, &self.mem);
        let unwinder = match stack {
            Some(s) => unwinder.with_stack(s),
            None => unwinder,
        };
        unwinder
            .unwind_returned(tid, regs)
            .map_err(|e| e.to_string())
    }

    /// Lead thread `tid`, waiting in `callee` (classified
    /// [`NotReadyReason::WaitToLeave`]), out of its wait: its interrupted
    /// system call ends with -ETIMEDOUT and is not restarted (orig_rax
    /// -1), so that the library cancels the waiting itself, and a
    /// breakpoint at `resume_at` (the call's return) parks it there.
    pub(super) fn lead_out(
        &mut self,
        bps: &mut BreakpointSet<ProcessMemory>,
        tid: Pid,
        callee: String,
        resume_at: RuntimeAddr,
    ) -> Result<(), StopError> {
        self.arm_extra(bps, resume_at)?;
        let mut regs = self.tracee.regs(tid)?;
        regs.0.rax = ETIMEDOUT as u64;
        regs.0.orig_rax = u64::MAX;
        self.tracee.set_regs(tid, &regs)?;
        self.leaving.insert(tid, (resume_at, callee));
        Ok(())
    }

    /// Arm a breakpoint at `addr` that is no update point, told first to
    /// `before_arming` with the byte it covers (unless already armed).
    fn arm_extra(
        &mut self,
        bps: &mut BreakpointSet<ProcessMemory>,
        addr: RuntimeAddr,
    ) -> Result<(), StopError> {
        if !bps.is_armed(addr) {
            let byte = self.mem.read_u8(addr).map_err(|source| {
                StopError::from(crate::target::breakpoint::BreakpointError::Mem { addr, source })
            })?;
            (self.before_arming)(self.tracee, &[(addr, byte)])?;
        }
        bps.arm(addr)?;
        Ok(())
    }

    /// Let thread `tid`, running a callback under library frames
    /// (classified [`NotReadyReason::InCallback`]), run until the callback
    /// returns to `return_to` in the library with rsp at `return_rsp`: a
    /// breakpoint there (removed with the others) parks it.
    pub(super) fn return_from_callback(
        &mut self,
        bps: &mut BreakpointSet<ProcessMemory>,
        tid: Pid,
        return_to: RuntimeAddr,
        return_rsp: RuntimeAddr,
    ) -> Result<(), StopError> {
        self.arm_extra(bps, return_to)?;
        self.out_of_callback.remove(&tid);
        self.in_callback.insert(tid, (return_to, return_rsp));
        Ok(())
    }

    /// Unwind `tid`; a pc in no known object means the process mapped a
    /// library since `libs` was read (a process stopped at its exec loads
    /// libc later): re-read the maps once and retry. Errors come without
    /// the thread prefix (messages name the thread already).
    pub(super) fn unwind_refreshing(
        &mut self,
        tid: Pid,
        stack: Option<Range<RuntimeAddr>>,
        regs: &Regs,
    ) -> Result<Unwound, UnwindFailure> {
        let mut r = unwind_thread(self.image, self.libs, &self.mem, stack.clone(), tid, regs);
        if matches!(r, Err(UnwindError::UnknownCode { .. })) && self.libs.refresh(self.pid).is_ok()
        {
            r = unwind_thread(self.image, self.libs, &self.mem, stack, tid, regs);
        }
        r.map_err(|e| {
            let callback_return = match &e {
                UnwindError::Callback {
                    return_to,
                    return_rsp,
                    ..
                } => Some((*return_to, *return_rsp)),
                _ => None,
            };
            let e = e.to_string();
            let prefix = format!("thread {tid}: ");
            let message = match e.strip_prefix(&prefix) {
                Some(rest) => rest.to_string(),
                None => e,
            };
            UnwindFailure {
                message,
                callback_return,
            }
        })
    }
}

/// Unwind thread `tid` from a one-read copy of its stack (`stack`, the
/// mapping holding rsp) when it can be read, else from live memory.
pub(super) fn unwind_thread(
    image: &Image,
    libs: &Libraries,
    mem: &ProcessMemory,
    stack: Option<Range<RuntimeAddr>>,
    tid: Pid,
    regs: &Regs,
) -> Result<Unwound, UnwindError> {
    let Some(s) = stack else {
        return Unwinder::new(image, libs, mem)
            .with_callbacks_below(true)
            .unwind(tid, regs);
    };
    // Frames lie at or above rsp.
    let live = regs.rsp().max(s.start)..s.end;
    match StackSnapshot::new(mem, live) {
        Ok(snap) => Unwinder::new(image, libs, &snap)
            .with_stack(s)
            .with_callbacks_below(true)
            .unwind(tid, regs),
        Err(_) => Unwinder::new(image, libs, mem)
            .with_stack(s)
            .with_callbacks_below(true)
            .unwind(tid, regs),
    }
}
