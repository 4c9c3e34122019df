//! Classifying one stopped thread: ready (with its state and frames) or a
//! typed reason why not.
//!
//! A new reason is a variant of [`NotReadyReason`], with its text in the
//! `Display` impl; the policy it applies lives in [`super::policy`].

use super::policy::{self, eintr_on_stop, OnUpdate, EINTR, ERESTARTNOHAND, ETIMEDOUT, NO_EFFECT};
use super::stopper::Stopper;
use super::{syscall_name, StopError};
use crate::engine::state::{Image, Readiness, ThreadState};
use crate::engine::unwind::{StackSnapshot, Top, UnwindError, Unwinder, Unwound};
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
use std::time::Instant;
use upstare_dwarf::fdt::Callee;
use upstare_dwarf::RuntimeAddr;

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
    /// Blocked in a known-safe call from a statement with effects before
    /// the call, so it cannot run again.
    NotReexecutable { callee: String },
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
    LeavingWait { callee: String },
    /// Running an application callback under library frames (the
    /// unwinder's words in `message`): let run until its outermost callback
    /// frame returns to `return_to` in the library with rsp at
    /// `return_rsp`, where a breakpoint parks it.
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
            NotReexecutable { callee } => write!(
                f,
                "blocked in {callee}, but its statement cannot be re-executed (it has effects before the call)"
            ),
            WaitToLeave { callee, .. } => write!(f, "waiting in {callee}, not led out of it yet"),
            MutexRelock { callee, .. } => {
                write!(f, "woken from {callee}, waiting to re-acquire its mutex")
            }
            WaitInternals { callee } => write!(
                f,
                "inside {callee}, waiting for its mutex or internal lock (not the condition itself)"
            ),
            LeavingWait { callee } => write!(
                f,
                "led out of {callee}, still on its way to the call's return (re-acquiring the mutex)"
            ),
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
    timeout_ms: i32,
    /// The timeout it was last restarted with.
    last_set: i32,
}

impl Stopper<'_> {
    /// A thread the ptrace stop itself made fail with EINTR (epoll_wait)
    /// gets the restart code the kernel would have used for a signal without
    /// handler, so that resuming it restarts the call rather than showing
    /// the program an EINTR (the tracer sets it at each interrupt stop
    /// already), and a timed wait what is left of its timeout.
    pub(super) fn undo_eintr(&mut self, tid: Pid, mut regs: Regs) -> Result<Regs, StopError> {
        let (nr, rax) = (regs.0.orig_rax as i64, regs.0.rax as i64);
        if nr >= 0 && (rax == EINTR || rax == ERESTARTNOHAND) && eintr_on_stop(nr) {
            regs.0.rax = ERESTARTNOHAND as u64;
            if let Some(ms) = self.remaining_ms(tid, nr, &regs) {
                regs.0.r10 = ms as u64;
            }
            self.tracee.set_regs(tid, &regs)?;
        }
        Ok(regs)
    }

    /// The timeout a restarted timed wait of `tid` gets: what is left of
    /// the one it had when first seen in this call (the time before that
    /// is not known, so it may wait a little longer than without us, never
    /// the full timeout again at every interruption).
    fn remaining_ms(&mut self, tid: Pid, nr: i64, regs: &Regs) -> Option<i32> {
        let ms = policy::timeout_ms(nr, regs)?;
        let now = Instant::now();
        let same = self
            .timed
            .get(&tid)
            .is_some_and(|w| w.rip == regs.0.rip && w.nr == nr && w.last_set == ms);
        if !same {
            self.timed.insert(
                tid,
                TimedWait {
                    rip: regs.0.rip,
                    nr,
                    since: now,
                    timeout_ms: ms,
                    last_set: ms,
                },
            );
        }
        let w = self.timed.get_mut(&tid)?;
        let spent = i32::try_from(now.duration_since(w.since).as_millis()).unwrap_or(i32::MAX);
        // 0 would make the call return at once, as its timeout would have.
        let left = w.timeout_ms.saturating_sub(spent).max(0);
        w.last_set = left;
        Some(left)
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
        let t = tid.as_raw();
        if let Some(callee) = self.returned.get(&tid).cloned() {
            let u = self
                .unwind_returned(tid, stack, regs)
                .map_err(|message| NotReadyReason::Unwind { message })?;
            return Ok(ThreadState {
                tid,
                regs: *regs,
                readiness: Readiness::Returned { callee },
                frames: u.frames,
            });
        }
        if self.out_of_callback.contains(&tid) {
            let u = unwind(self, regs)
                .map_err(|e| e.reason(|message| NotReadyReason::Unwind { message }))?;
            let Top::InLibrary { call, .. } = &u.top else {
                return Err(NotReadyReason::NotInLibrary);
            };
            return Ok(ThreadState {
                tid,
                regs: *regs,
                readiness: Readiness::CallbackReturned {
                    callee: call.callee.id_name().to_string(),
                },
                frames: u.frames,
            });
        }
        if let Some((callee, mutex)) = self.relocking.get(&tid).cloned() {
            let u =
                unwind(self, regs).map_err(|e| NotReadyReason::Unwind { message: e.message })?;
            return Ok(ThreadState {
                tid,
                regs: *regs,
                readiness: Readiness::Relock { callee, mutex },
                frames: u.frames,
            });
        }
        if let Some((_, callee)) = self.leaving.get(&tid).cloned() {
            // On its way out: only a wait for its mutex is of interest.
            return match self.classify_blocked(tid, regs) {
                Err(r @ NotReadyReason::MutexRelock { .. }) => Err(r),
                _ => Err(NotReadyReason::LeavingWait { callee }),
            };
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
            return Ok(ThreadState {
                tid: Pid::from_raw(t),
                regs: *regs,
                readiness: Readiness::AtPoint,
                frames: u.frames,
            });
        }
        self.classify_blocked(tid, regs)
    }

    /// Ready state of a stopped thread outside the image's code (in a
    /// library call), or why it is not ready.
    fn classify_blocked(&mut self, tid: Pid, regs: &Regs) -> Result<ThreadState, NotReadyReason> {
        let stack = self.stack_of(regs.rsp());
        let unwind = |me: &mut Self, regs: &Regs| me.unwind_refreshing(tid, stack.clone(), regs);
        let t = tid.as_raw();
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
            return Ok(ThreadState {
                tid: Pid::from_raw(t),
                regs: *regs,
                readiness: Readiness::InLibrary {
                    callee,
                    syscall: self.syscall_seen(tid, nr) as u64,
                },
                frames: u.frames,
            });
        }
        let safe = waits_in(OnUpdate::Reexecute);
        let continued = nr == libc::SYS_restart_syscall && !safe.is_empty();
        if !continued && !safe.contains(&nr) {
            return Err(NotReadyReason::NotKnownSafe {
                syscall: nr,
                callee,
            });
        }
        if call.restart.is_none() {
            return Err(NotReadyReason::NotReexecutable { callee });
        }
        Ok(ThreadState {
            tid: Pid::from_raw(t),
            regs: *regs,
            readiness: Readiness::Blocked {
                callee,
                syscall: self.syscall_seen(tid, nr) as u64,
            },
            frames: u.frames,
        })
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
        bps.arm(resume_at)?;
        let mut regs = self.tracee.regs(tid)?;
        regs.0.rax = ETIMEDOUT as u64;
        regs.0.orig_rax = u64::MAX;
        self.tracee.set_regs(tid, &regs)?;
        self.leaving.insert(tid, (resume_at, callee));
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
        bps.arm(return_to)?;
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
