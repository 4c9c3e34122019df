//! The saved state of a paused process, as the stop/unwind stage produces it
//! and the transfer/rebuild stage consumes it. Plain data: no process access.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use upstare_dwarf::fdt::{Continuation, FrameTables};
use upstare_dwarf::{LinkAddr, LoadBias, Reg, RuntimeAddr};

use crate::target::ptrace::Regs;
use nix::unistd::Pid;

/// One instrumented image (the running version, or the one being loaded) in
/// the target's address space.
#[derive(Debug)]
pub struct Image {
    /// The file the image was mapped from (as /proc/PID/maps names it).
    pub path: PathBuf,
    /// Runtime address = link-time address + bias.
    pub bias: LoadBias,
    /// Its frame-description tables.
    pub tables: FrameTables,
    /// Its executable range in the target (for the running image: where a
    /// pc must lie to belong to it).
    pub text: Range<RuntimeAddr>,
    /// Every byte the image occupies in the target (all its mappings).
    pub span: Range<RuntimeAddr>,
}

impl Image {
    /// Runtime address of a link-time address of this image.
    pub fn runtime(&self, a: LinkAddr) -> RuntimeAddr {
        a.to_runtime(self.bias)
    }
    /// Link-time address of a runtime address, if it lies in the image.
    pub fn link(&self, a: RuntimeAddr) -> Option<LinkAddr> {
        self.span.contains(&a).then(|| a.to_link(self.bias))
    }
    /// Whether `a` is code of this image.
    pub fn is_code(&self, a: RuntimeAddr) -> bool {
        self.text.contains(&a)
    }
    /// Whether `a` lies in the update-point trampolines of this image
    /// (`upstare-rewrite --inline-points`).
    pub fn in_trampolines(&self, a: RuntimeAddr) -> bool {
        match &self.tables.arming {
            upstare_dwarf::fdt::Arming::Inline(i) => {
                self.runtime(i.trampolines.0) <= a && a < self.runtime(i.trampolines.1)
            }
            upstare_dwarf::fdt::Arming::Int3 => false,
        }
    }
}

/// Why a thread counts as ready to be updated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Stopped exactly at an update point (the top frame's pc).
    AtPoint,
    /// Blocked in a known-safe library call whose system call has had no
    /// effect yet; the top application frame will re-execute the call's
    /// statement from its restart address.
    Blocked {
        /// The library function called by the application (`read`).
        callee: String,
        /// The interrupted system call number (orig_rax).
        syscall: u64,
    },
    /// Waiting in a library call that is left in place (its system call
    /// restarts as it was): the library frames stay where they are and the
    /// call returns into the new version of the top application frame,
    /// which therefore must not move. Used for calls whose re-execution is
    /// not safe but whose waiting involves no data of the image
    /// (`pthread_join` waits on the joined thread's descriptor).
    InLibrary {
        /// The library function called by the application.
        callee: String,
        /// The interrupted system call number (orig_rax).
        syscall: u64,
    },
    /// Led out of a library wait through the library's own path (a
    /// `pthread_cond_wait` ended as if timed out: glibc left the condition
    /// variable's groups and re-acquired the mutex) and parked at the
    /// call's return address with rax = 0: the call returns as a spurious
    /// wake-up, into the new version of the frame at the mapped call site
    /// (or into the old one if the update does not happen).
    Returned {
        /// The library function called by the application.
        callee: String,
    },
    /// Woken from a `pthread_cond_wait` (led out or signalled) but waiting
    /// to re-acquire its mutex, which a parked thread holds: abandoned there
    /// (glibc's condition-variable state is already settled) and set at the
    /// entry of `pthread_mutex_lock(mutex)` called from the application
    /// frame's call site, so the call returns 0 with the mutex held. The
    /// mutex's user count was lowered by one for the lock to come (glibc's
    /// re-acquire does not count a user, `pthread_mutex_lock` does). The
    /// update gives `pthread_mutex_lock` NEW's mutex and NEW's return
    /// address.
    Relock {
        /// The library function called by the application.
        callee: String,
        /// The mutex (old address).
        mutex: u64,
    },
    /// Was running an application callback under library frames (a
    /// libevent callback under `event_base_loop`, a `qsort` comparator):
    /// let run until the callback returned into the library and parked
    /// there by a breakpoint, in library code with no application frame
    /// above the call into the library. Handled like [`Readiness::InLibrary`]:
    /// the library frames and registers stay where they are and the call
    /// returns into the new version of the top application frame, which
    /// must not move.
    CallbackReturned {
        /// The library function called by the application.
        callee: String,
    },
    /// The context a signal interrupted, under a handler's frames (see
    /// [`ThreadState::below`]): in a library call (`pause`,
    /// `select`) when the signal came. Its registers are in the signal
    /// frame, which stays, with the library frames, where they are; the
    /// call returns into the new version of the top application frame
    /// (which must not move) when the handler returns.
    UnderSignal {
        /// The library function called by the application.
        callee: String,
    },
    /// The application frames under a callback (see
    /// [`ThreadState::below`]): in the library call that called back
    /// (`qsort`, `event_base_loop`). The library frames stay where they
    /// are; the call returns into the new version of the top application
    /// frame (which must not move) when the callback returns.
    UnderCallback {
        /// The library function called by the application.
        callee: String,
    },
}

impl Readiness {
    /// Whether the thread waits in a system call (it may run on while the
    /// others get ready, and is ready again once confirmed still waiting).
    pub fn is_blocked(&self) -> bool {
        !matches!(
            self,
            Readiness::AtPoint
                | Readiness::Returned { .. }
                | Readiness::Relock { .. }
                | Readiness::CallbackReturned { .. }
                | Readiness::UnderSignal { .. }
                | Readiness::UnderCallback { .. }
        )
    }
}

/// Callee-saved register values as one frame sees them: what the frame finds
/// in those registers when its callee returns (or, for the top frame at an
/// update point, what the registers hold). rbp is not included (it is the
/// frame chain, rebuilt from the CFAs).
pub type CalleeSavedValues = BTreeMap<Reg, u64>;

/// One application frame of a paused thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppFrame {
    /// Function name in the image's tables.
    pub function: String,
    /// Update point address (top frame at a point) or the return address of
    /// the call the frame is paused in (every other frame, and the top
    /// application frame of a blocked thread).
    pub pc: LinkAddr,
    /// Canonical frame address: rsp before the call that created the frame.
    pub cfa: RuntimeAddr,
    /// Where the frame resumes, stable across versions.
    pub continuation: Continuation,
    /// rbx, r12-r15 in this frame's view (see [`CalleeSavedValues`]).
    pub callee_saved: CalleeSavedValues,
}

/// One paused thread.
#[derive(Clone, Debug)]
pub struct ThreadState {
    pub tid: Pid,
    /// Registers as the thread was stopped (top of the thread, possibly
    /// inside a library).
    pub regs: Regs,
    pub readiness: Readiness,
    /// Application frames, top (innermost) first; the last one is `main` or
    /// the thread's start routine, or a signal handler.
    pub frames: Vec<AppFrame>,
    /// When the bottom frame is a signal handler's, or a callback's called
    /// from library code: the context under it (the one the signal
    /// interrupted; the library's caller), a state of its own, updated with
    /// the thread.
    pub below: Option<Box<ThreadState>>,
    /// This is such a context under the thread's top part: its registers
    /// are not the thread's (they are in the signal frame, or the
    /// library's, restored when the callback returns).
    pub beneath: bool,
    /// When the bottom frame returns into library code (a callback): the
    /// callee-saved registers (rbx, r12-r15) that code expects back.
    pub library_view: Option<CalleeSavedValues>,
}

impl ThreadState {
    /// This state and the interrupted contexts under it, top first: every
    /// set of frames the update maps.
    pub fn with_interrupted(&self) -> Vec<&ThreadState> {
        let mut out = vec![self];
        let mut cur = self;
        while let Some(b) = &cur.below {
            out.push(b);
            cur = b;
        }
        out
    }
}
