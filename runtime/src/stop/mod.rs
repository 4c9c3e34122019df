//! Stopping the world: bring every thread of a seized process to a state
//! the update can start from, within a time limit.
//!
//! A thread is ready when it is
//! - at an update point of the running image (its rbp chain unwinds through
//!   call sites of the tables down to `main` or its start routine), or
//! - blocked in a known-safe library call (read, accept, nanosleep,
//!   pthread_mutex_lock ...) whose system call was interrupted before it had
//!   any effect, called from a statement the tables say can be re-executed,
//!   or waiting in a call left in place (pthread_join, libevent's loop), or
//! - led out of a condition wait (`pthread_cond_wait`): its futex wait is
//!   ended with -ETIMEDOUT so that glibc cancels the waiting itself; it is
//!   parked at the call's return with the mutex, or, when a parked thread
//!   holds the mutex, set at the entry of `pthread_mutex_lock(mutex)`
//!   returning to the call site (see `Readiness::Returned`, `Relock`).
//!
//! Every other thread runs on with `int3` armed at every update point until
//! it hits one or blocks in a safe call (running threads are interrupted
//! every few milliseconds to look). Signals that arrive meanwhile are held
//! back and queued again at the end; threads created meanwhile are caught
//! and classified too; forked children get the original bytes back and are
//! let go. The breakpoints are always removed before returning, and every
//! thread of the process is left in a ptrace-stop with no interrupt or trap
//! pending.
//!
//! Where things go:
//! - `policy.rs`: the table of known blocking calls (a new blocking call is
//!   one line in `KNOWN_CALLS`), how the kernel's return values and signals
//!   are read.
//! - `classify.rs`: one stopped thread → ready, or a [`NotReadyReason`] (a
//!   new reason is a variant there, its text in its `Display`).
//! - `stopper.rs`: the event loop (interrupt, arm, wait, new threads,
//!   forks, signals held back, the final halt).
//! - `diagnostics.rs`: [`NotReadyThread`], [`Location`] and [`StopError`],
//!   the words of a refusal.
//!
//! `int3` handling shared with other tracers (stepping over, traps still
//! pending, forked children) lives in [`crate::target::breakpoint`].

mod classify;
mod diagnostics;
pub mod lazy;
mod policy;
mod stopper;

pub use classify::NotReadyReason;
pub use diagnostics::{Location, NotReadyThread, StopError};
pub use policy::syscall_name;
pub use stopper::BeforeArming;

use crate::engine::state::{Image, ThreadState};
use crate::load::libraries::Libraries;
use crate::target::breakpoint::InlineTraps;
use crate::target::ptrace::{Sig, Tracee};
use std::sync::Arc;
use std::time::Duration;
use upstare_dwarf::fdt::Arming;
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
    /// What arming writes, worked out before the pause
    /// ([`ArmingPlan::of`]); `None`: worked out when arming.
    pub arming: Option<Arc<ArmingPlan>>,
    /// The process's maps, read since it was seized and before any of its
    /// threads ran again (the seize's own check); `None`: read here.
    pub maps: Option<Arc<Vec<crate::target::procfs::MemoryMap>>>,
}

/// What arming the update points of an image takes: the points armed with
/// `int3` (every one, or those a binary rewritten with `--inline-points`
/// could not detour), and the flag byte of the detoured ones with their
/// lookups. Depends on the image alone: made before the process is paused.
#[derive(Debug, Default)]
pub struct ArmingPlan {
    /// Update points armed with `int3`, in the tables' order.
    pub int3: Vec<RuntimeAddr>,
    /// The flag byte and the detoured points it arms.
    pub inline: Option<(RuntimeAddr, Arc<InlineTraps>)>,
    /// How to arm only the `int3` points threads can reach next; `None`:
    /// every point at once.
    pub lazy: Option<lazy::LazyArming>,
}

/// Whether the update point at `point` of `image` is armed with `int3`:
/// always, unless a binary rewritten with `--inline-points` detours it.
fn takes_int3(image: &Image, point: LinkAddr) -> bool {
    match &image.tables.arming {
        Arming::Inline(inline) => inline.detour_at(point).is_none(),
        Arming::Int3 => true,
    }
}

impl ArmingPlan {
    /// The arming of `image`'s update points.
    pub fn of(image: &Image) -> ArmingPlan {
        let inline = match &image.tables.arming {
            Arming::Inline(inline) => Some(inline),
            Arming::Int3 => None,
        };
        let int3 = image
            .tables
            .functions
            .iter()
            .flat_map(|f| f.update_points.iter())
            .filter(|p| takes_int3(image, p.addr))
            .map(|p| image.runtime(p.addr))
            .collect();
        let inline = inline.map(|i| {
            let detours = i
                .detours
                .iter()
                .map(|d| (image.runtime(d.point), image.runtime(d.trap)));
            (image.runtime(i.flag), Arc::new(InlineTraps::new(detours)))
        });
        ArmingPlan {
            int3,
            inline,
            lazy: None,
        }
    }

    /// [`ArmingPlan::of`], arming lazily when `image` has at least
    /// [`lazy::LAZY_FROM_POINTS`] `int3` points: the functions whose
    /// address is taken are found in its file's bytes `elf`.
    pub fn lazy_of(image: &Image, elf: &[u8]) -> ArmingPlan {
        let mut plan = ArmingPlan::of(image);
        if plan.int3.len() >= lazy::LAZY_FROM_POINTS {
            plan.lazy = Some(lazy::LazyArming::new(image, elf, |p| takes_int3(image, p)));
        }
        plan
    }
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
            arming: None,
            maps: None,
        }
    }
}

/// Where the time went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StopTimings {
    /// Classifying the threads as seized (unwinding included).
    pub classify: Duration,
    /// Installing the rescue handler (the remote session that maps it and
    /// takes SIGTRAP), when it happens in the stop.
    pub rescue: Duration,
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
    /// The process's maps as the stop last read them, with the
    /// [`Tracee::maps_epoch`] they were read at.
    pub maps: (Vec<crate::target::procfs::MemoryMap>, u64),
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
    stopper::stop(tracee, image, libs, opts, &mut |_, _| Ok(()))
}

/// [`stop_the_world`], running `before_arming` once the threads are
/// classified and only if update points must be armed (some thread is not
/// ready yet): what arming needs (the rescue handler) is then paid for only
/// when it happens. An error of `before_arming` ends the stop with nothing
/// armed.
pub fn stop_the_world_armed_by(
    tracee: &mut Tracee,
    image: &Image,
    libs: &mut Libraries,
    opts: &StopOptions,
    before_arming: &mut BeforeArming<'_>,
) -> Result<Stopped, StopError> {
    stopper::stop(tracee, image, libs, opts, before_arming)
}
