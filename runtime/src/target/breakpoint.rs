//! Software breakpoints (`int3`) as guards that put the original byte back,
//! stepping a thread over one, taking a trap that is still pending, and
//! letting go of a child forked while they are armed.

use crate::memory::{MemError, TargetMemory};
use crate::target::procfs::{self, ProcError};
use crate::target::ptrace::{PtraceError, Sig, Stop, Tracee};
use crate::target::ProcessMemory;
use nix::libc;
use nix::unistd::Pid;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use upstare_dwarf::RuntimeAddr;

/// The `int3` opcode.
pub const INT3: u8 = 0xcc;
/// A step over a breakpoint gives up after this many intermediate stops.
const MAX_STEP_STOPS: usize = 64;

/// Why a breakpoint operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BreakpointError {
    #[error("breakpoint at {addr}: {source}")]
    Mem {
        addr: RuntimeAddr,
        #[source]
        source: MemError,
    },
    #[error(
        "breakpoint at {addr}: expected int3 before restoring {original:#04x}, found {found:#04x} \
         (the code was changed underneath; left as is)"
    )]
    Clobbered {
        addr: RuntimeAddr,
        original: u8,
        found: u8,
    },
    #[error("no breakpoint is armed at {addr}")]
    NotArmed { addr: RuntimeAddr },
    #[error("stepping thread {tid} over the breakpoint at {addr}: {source}")]
    Ptrace {
        tid: Pid,
        addr: RuntimeAddr,
        #[source]
        source: PtraceError,
    },
    #[error("stepping thread {tid} over the breakpoint at {addr}: more than {limit} stops")]
    TooManyStops {
        tid: Pid,
        addr: RuntimeAddr,
        limit: usize,
    },
    #[error("taking the pending trap of thread {tid} at the breakpoint at {addr}: {source}")]
    PendingTrap {
        tid: Pid,
        addr: RuntimeAddr,
        #[source]
        source: PtraceError,
    },
    #[error("taking the pending trap of thread {tid} at the breakpoint at {addr}: more than {limit} stops")]
    PendingTrapStops {
        tid: Pid,
        addr: RuntimeAddr,
        limit: usize,
    },
    #[error("thread {tid}: {source}")]
    Proc {
        tid: Pid,
        #[source]
        source: ProcError,
    },
    #[error("letting go of forked child {child}: {source}")]
    Child {
        child: i32,
        #[source]
        source: PtraceError,
    },
}

fn mem_err(addr: RuntimeAddr) -> impl FnOnce(MemError) -> BreakpointError {
    move |source| BreakpointError::Mem { addr, source }
}

/// Write `int3` at `addr`, returning the byte it replaced.
fn plant(mem: &mut impl TargetMemory, addr: RuntimeAddr) -> Result<u8, BreakpointError> {
    let original = mem.read_u8(addr).map_err(mem_err(addr))?;
    mem.write(addr, &[INT3]).map_err(mem_err(addr))?;
    Ok(original)
}

/// Put `original` back at `addr`, provided our `int3` is still there.
fn unplant(
    mem: &mut impl TargetMemory,
    addr: RuntimeAddr,
    original: u8,
) -> Result<(), BreakpointError> {
    let found = mem.read_u8(addr).map_err(mem_err(addr))?;
    if found != INT3 {
        return Err(BreakpointError::Clobbered {
            addr,
            original,
            found,
        });
    }
    mem.write(addr, &[original]).map_err(mem_err(addr))
}

/// One `int3` breakpoint that owns its memory handle and restores the
/// original byte when disarmed or dropped.
pub struct Breakpoint<M: TargetMemory> {
    mem: M,
    addr: RuntimeAddr,
    original: u8,
    armed: bool,
}

impl<M: TargetMemory> Breakpoint<M> {
    /// Write `int3` at `addr` in `mem`.
    pub fn arm(mut mem: M, addr: RuntimeAddr) -> Result<Self, BreakpointError> {
        let original = plant(&mut mem, addr)?;
        Ok(Breakpoint {
            mem,
            addr,
            original,
            armed: true,
        })
    }
    /// Where the breakpoint is.
    pub fn addr(&self) -> RuntimeAddr {
        self.addr
    }
    /// The byte the `int3` replaced.
    pub fn original_byte(&self) -> u8 {
        self.original
    }
    /// Whether the `int3` is in place.
    pub fn is_armed(&self) -> bool {
        self.armed
    }
    /// Restore the original byte now (idempotent).
    pub fn disarm(&mut self) -> Result<(), BreakpointError> {
        if self.armed {
            unplant(&mut self.mem, self.addr, self.original)?;
            self.armed = false;
        }
        Ok(())
    }
    /// Put the `int3` back after [`Breakpoint::disarm`] (idempotent).
    pub fn rearm(&mut self) -> Result<(), BreakpointError> {
        if !self.armed {
            let found = plant(&mut self.mem, self.addr)?;
            if found != self.original {
                // Restore what we found rather than keep a stale original.
                self.original = found;
            }
            self.armed = true;
        }
        Ok(())
    }
    /// The memory handle.
    pub fn memory(&self) -> &M {
        &self.mem
    }
}

impl<M: TargetMemory> Drop for Breakpoint<M> {
    fn drop(&mut self) {
        // Nothing useful to do with an error here: the target may be gone.
        let _ = self.disarm();
    }
}

impl<M: TargetMemory> fmt::Debug for Breakpoint<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breakpoint")
            .field("addr", &self.addr)
            .field("original", &format_args!("{:#04x}", self.original))
            .field("armed", &self.armed)
            .finish()
    }
}

/// A signal that arrived while stepping and was held back, to be delivered
/// (with its original `siginfo`) when the thread is resumed.
#[derive(Clone, Copy)]
pub struct DeferredSignal {
    pub sig: Sig,
    pub info: libc::siginfo_t,
}

impl fmt::Debug for DeferredSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DeferredSignal({}, code {})",
            self.sig, self.info.si_code
        )
    }
}

/// How a step over a breakpoint ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepEnd {
    /// The instruction executed; the thread is stopped after it (in a
    /// SIGTRAP signal-delivery stop, so a signal can be injected on resume).
    Stepped,
    /// A synchronous signal (a fault of the instruction, or the trap of an
    /// `int3` that was the original byte) stopped the thread in its
    /// signal-delivery stop; resume with `sig` to deliver it.
    Signal(Sig),
    /// The thread ended (this is its final stop).
    Ended(Stop),
    /// The instruction was an `execve` that succeeded: the address space is
    /// new, every breakpoint of the set was forgotten (not restored).
    Exec(Stop),
}

/// The result of [`BreakpointSet::step_over`].
#[derive(Debug)]
pub struct StepOutcome {
    pub end: StepEnd,
    /// Asynchronous signals held back during the step, oldest first.
    pub deferred: Vec<DeferredSignal>,
    /// ptrace events the thread reported during the step (clone, fork,
    /// vfork, ...): the tracer must act on them (the new tasks are traced).
    pub events: Vec<Stop>,
}

/// What [`BreakpointSet::take_pending_trap`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingTrap {
    /// No trap of ours was pending on the thread.
    None,
    /// The trap was taken and suppressed: the thread is in an interrupt
    /// stop (no interrupt left pending) with rip rewound to the breakpoint
    /// at `addr`, as if it had stopped just before it.
    Taken { addr: RuntimeAddr },
    /// The thread ended meanwhile; this is its final stop.
    Ended(Stop),
}

/// The result of [`BreakpointSet::take_pending_trap`].
#[derive(Debug)]
pub struct PendingTrapOutcome {
    /// Whether a trap of ours was pending, and what became of the thread.
    pub trap: PendingTrap,
    /// Signals reported meanwhile, held back, oldest first (a `SIGTRAP`
    /// pending for another reason than our `int3` is among them).
    pub deferred: Vec<DeferredSignal>,
}

/// The mask bit of `sig` in a `/proc` signal set.
fn signal_bit(sig: Sig) -> u64 {
    1u64.checked_shl(sig.0.wrapping_sub(1) as u32).unwrap_or(0)
}

/// How a forked child shares the `int3`s of its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildMemory {
    /// A copy (`fork`): it holds our `int3`s, to be replaced by the
    /// original bytes before it goes.
    Copied,
    /// The parent's own (`vfork`): restoring would remove the parent's
    /// breakpoints too, so nothing is written.
    Shared,
}

/// What became of a forked child handed to [`release_forked_child`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildRelease {
    /// Its code is its own again and it runs untraced (with the signal it
    /// stopped for first, if any, delivered).
    Detached,
    /// It ended before it could be let go.
    Ended,
}

/// Let go of `child`, a process forked by a traced thread while the
/// breakpoints of `bps` were armed: wait (up to `timeout`) for its first
/// stop, give it its original code bytes back (unless it shares its
/// parent's memory) and detach it.
///
/// When it does not stop in time its code is restored all the same (so it
/// never meets one of our `int3`s) before the error is returned.
pub fn release_forked_child<M: TargetMemory>(
    tracee: &mut Tracee,
    bps: &BreakpointSet<M>,
    child: Pid,
    memory: ChildMemory,
    timeout: Duration,
) -> Result<ChildRelease, BreakpointError> {
    let child_err = |source| BreakpointError::Child {
        child: child.as_raw(),
        source,
    };
    let restore = || match memory {
        ChildMemory::Copied => bps.remove_from(&mut ProcessMemory::open(child)),
        ChildMemory::Shared => Ok(()),
    };
    // Its first stop (an EventStop, or a signal that came first) may
    // already be there or follow.
    let signal = match tracee.wait_stop(child, timeout) {
        Ok(Stop::Signal { sig, .. }) => Some(sig),
        Ok(stop) if stop.is_terminal() => return Ok(ChildRelease::Ended),
        Ok(_) => None,
        Err(PtraceError::Gone { .. }) => return Ok(ChildRelease::Ended),
        Err(source) => {
            restore()?;
            return Err(child_err(source));
        }
    };
    restore()?;
    match tracee.detach_thread(child, signal) {
        Ok(()) => Ok(ChildRelease::Detached),
        Err(PtraceError::Gone { .. }) => Ok(ChildRelease::Ended),
        Err(source) => Err(child_err(source)),
    }
}

/// Whether a signal stop is a synchronous consequence of the instruction
/// (re-executing would raise it again) rather than a signal from outside.
fn is_synchronous(sig: Sig, code: i32) -> bool {
    let fault = [
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
        libc::SIGTRAP,
    ];
    // si_code <= 0 means sent by a process (SI_USER, SI_TKILL, SI_QUEUE...).
    fault.contains(&sig.0) && code > 0
}

/// Largest range read and written at once for close breakpoints.
const MAX_CLUSTER_BYTES: u64 = 1 << 20;

/// `sorted` (ascending, distinct) cut into runs whose neighbours are less
/// than a page apart and whose span stays under [`MAX_CLUSTER_BYTES`].
fn clusters(sorted: &[RuntimeAddr]) -> Vec<&[RuntimeAddr]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=sorted.len() {
        let cut = i == sorted.len()
            || sorted[i].0 - sorted[i - 1].0 >= 4096
            || sorted[i].0 - sorted[start].0 >= MAX_CLUSTER_BYTES;
        if cut {
            out.push(&sorted[start..i]);
            start = i;
        }
    }
    out
}

/// Update points armed in one store: the flag byte tested by the
/// trampolines of a binary rewritten with `upstare-rewrite --inline-points`
/// (see `upstare_dwarf::fdt::InlinePoints`).
struct InlineFlag {
    flag: RuntimeAddr,
    /// Whether the flag is set (cleared on disarm and drop).
    set: bool,
    traps: Arc<InlineTraps>,
}

/// The detoured update points of a binary rewritten with
/// `--inline-points`, sorted both ways for the lookups of a stop: built
/// once (before the pause) and shared by every stop of an update.
#[derive(Debug, Default)]
pub struct InlineTraps {
    /// (trampoline's `int3`, its update point), sorted by the first: two
    /// sorted vectors rather than maps, as lookups are rare (one per hit).
    traps: Vec<(RuntimeAddr, RuntimeAddr)>,
    /// (detoured update point, its trampoline's `int3`), sorted by the
    /// first.
    points: Vec<(RuntimeAddr, RuntimeAddr)>,
}

impl InlineTraps {
    /// From each detoured point with its trampoline's `int3`.
    pub fn new(detours: impl IntoIterator<Item = (RuntimeAddr, RuntimeAddr)>) -> InlineTraps {
        let mut points: Vec<(RuntimeAddr, RuntimeAddr)> = detours.into_iter().collect();
        points.sort_unstable();
        let mut traps: Vec<(RuntimeAddr, RuntimeAddr)> =
            points.iter().map(|&(point, trap)| (trap, point)).collect();
        traps.sort_unstable();
        InlineTraps { traps, points }
    }

    /// How many detoured points.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

/// The second of the pair whose first is `key` in `sorted`.
fn lookup(sorted: &[(RuntimeAddr, RuntimeAddr)], key: RuntimeAddr) -> Option<RuntimeAddr> {
    let i = sorted.binary_search_by_key(&key, |&(k, _)| k).ok()?;
    Some(sorted[i].1)
}

/// Many breakpoints in one address space, restored on drop.
pub struct BreakpointSet<M: TargetMemory> {
    mem: M,
    /// Armed address -> original byte.
    armed: BTreeMap<RuntimeAddr, u8>,
    /// Every address ever armed (to recognise traps taken just before a
    /// breakpoint was removed).
    ever: BTreeSet<RuntimeAddr>,
    /// Detoured update points, armed by their flag byte.
    inline: Option<InlineFlag>,
}

impl<M: TargetMemory> BreakpointSet<M> {
    /// An empty set over `mem`.
    pub fn new(mem: M) -> Self {
        BreakpointSet {
            mem,
            armed: BTreeMap::new(),
            ever: BTreeSet::new(),
            inline: None,
        }
    }

    /// Arm every detoured update point at once: set the flag byte at
    /// `flag` that their trampolines test. `detours` gives each point
    /// with its trampoline's `int3`, so that a trap there is taken as a
    /// hit at the point ([`BreakpointSet::trap_site`]). Cleared again by
    /// [`BreakpointSet::disarm_all`] and on drop.
    pub fn arm_inline(
        &mut self,
        flag: RuntimeAddr,
        detours: impl IntoIterator<Item = (RuntimeAddr, RuntimeAddr)>,
    ) -> Result<(), BreakpointError> {
        self.arm_inline_with(flag, Arc::new(InlineTraps::new(detours)))
    }

    /// [`BreakpointSet::arm_inline`] with the detours' lookups built
    /// beforehand.
    pub fn arm_inline_with(
        &mut self,
        flag: RuntimeAddr,
        traps: Arc<InlineTraps>,
    ) -> Result<(), BreakpointError> {
        self.mem.write(flag, &[1]).map_err(mem_err(flag))?;
        self.inline = Some(InlineFlag {
            flag,
            set: true,
            traps,
        });
        Ok(())
    }

    /// Clear the flag of the detoured points (idempotent).
    fn disarm_inline(&mut self) -> Result<(), BreakpointError> {
        let Some(inline) = self.inline.as_mut().filter(|i| i.set) else {
            return Ok(());
        };
        let flag = inline.flag;
        // Not retried on drop: a flag that cannot be written is in a
        // process that is gone.
        inline.set = false;
        self.mem.write(flag, &[0]).map_err(mem_err(flag))
    }

    /// The update point a trap whose `int3` is at `at` stands for: `at`
    /// itself for an `int3` of ours, the detoured point for a trampoline's
    /// `int3`; `None` for an `int3` that is not ours. A thread stopped
    /// there is put at the returned address, as if it had stopped just
    /// before the instruction (for a trampoline: none of the displaced
    /// instructions has run).
    pub fn trap_site(&self, at: RuntimeAddr) -> Option<RuntimeAddr> {
        if self.was_armed(at) {
            return Some(at);
        }
        lookup(&self.inline.as_ref()?.traps.traps, at)
    }

    /// Where a thread at detoured update point `rip` goes on without
    /// trapping while the flag is set: its trampoline after the `int3`
    /// (which runs the point's displaced instructions and jumps back).
    /// `None` when `rip` is no detoured point or the flag is clear.
    pub fn inline_resume(&self, rip: RuntimeAddr) -> Option<RuntimeAddr> {
        let inline = self.inline.as_ref().filter(|i| i.set)?;
        lookup(&inline.traps.points, rip).map(|trap| RuntimeAddr(trap.0.wrapping_add(1)))
    }

    /// Write `int3` at `addr` (no effect if already armed).
    pub fn arm(&mut self, addr: RuntimeAddr) -> Result<(), BreakpointError> {
        if self.armed.contains_key(&addr) {
            return Ok(());
        }
        let original = plant(&mut self.mem, addr)?;
        self.armed.insert(addr, original);
        self.ever.insert(addr);
        Ok(())
    }

    /// Write `int3` at every address of `addrs` (those already armed are
    /// left alone): addresses close together (less than a page apart, so no
    /// page without a breakpoint is written) are read and written as one
    /// range, one read and one write per range instead of two system calls
    /// per breakpoint. The bytes between them are written back as read:
    /// code nobody changes (the breakpoints among them are this set's,
    /// read as `int3` and written back so), so a thread running meanwhile
    /// finds each byte either as it was or, at a breakpoint, `int3`. A
    /// range that fails part-way keeps every `int3` that did land in the
    /// set, so that it is restored.
    pub fn arm_all(&mut self, addrs: &[RuntimeAddr]) -> Result<(), BreakpointError> {
        self.arm_all_told(addrs, |_| Ok(()))
    }

    /// [`BreakpointSet::arm_all`], telling `tell` every breakpoint about
    /// to be armed with the byte it covers (read in the same pass) before
    /// any is written; an error of `tell` arms none.
    pub fn arm_all_told<E: From<BreakpointError>>(
        &mut self,
        addrs: &[RuntimeAddr],
        mut tell: impl FnMut(&[(RuntimeAddr, u8)]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut todo: Vec<RuntimeAddr> = addrs
            .iter()
            .copied()
            .filter(|a| !self.armed.contains_key(a))
            .collect();
        todo.sort_unstable();
        todo.dedup();
        if todo.is_empty() {
            return Ok(());
        }
        let mut read = Vec::new();
        for cluster in clusters(&todo) {
            let (first, last) = (cluster[0], cluster[cluster.len() - 1]);
            let len = (last.0 - first.0 + 1) as usize;
            let mut original = vec![0u8; len];
            self.mem
                .read(first, &mut original)
                .map_err(|e| E::from(mem_err(first)(e)))?;
            read.push((cluster, original));
        }
        let told: Vec<(RuntimeAddr, u8)> = read
            .iter()
            .flat_map(|(cluster, original)| {
                let first = cluster[0];
                cluster
                    .iter()
                    .map(move |&a| (a, original[(a.0 - first.0) as usize]))
            })
            .collect();
        tell(&told)?;
        for (cluster, original) in read {
            let (first, len) = (cluster[0], original.len());
            let mut planted = original.clone();
            for a in cluster {
                planted[(a.0 - first.0) as usize] = INT3;
            }
            if let Err(e) = self.mem.write(first, &planted) {
                // What landed is ours to restore.
                let mut now = vec![0u8; len];
                if self.mem.read(first, &mut now).is_ok() {
                    for &a in cluster {
                        let i = (a.0 - first.0) as usize;
                        if now[i] == INT3 && original[i] != INT3 {
                            self.armed.insert(a, original[i]);
                            self.ever.insert(a);
                        }
                    }
                }
                return Err(E::from(mem_err(first)(e)));
            }
            for &a in cluster {
                self.armed.insert(a, original[(a.0 - first.0) as usize]);
                self.ever.insert(a);
            }
        }
        Ok(())
    }

    /// Restore the original byte at `addr`. `Ok(false)` if nothing was armed
    /// there. On a [`BreakpointError::Clobbered`] error the breakpoint is
    /// dropped from the set without writing.
    pub fn disarm(&mut self, addr: RuntimeAddr) -> Result<bool, BreakpointError> {
        let Some(original) = self.armed.remove(&addr) else {
            return Ok(false);
        };
        match unplant(&mut self.mem, addr, original) {
            Ok(()) => Ok(true),
            Err(e @ BreakpointError::Clobbered { .. }) => Err(e),
            Err(e) => {
                // Could not reach memory: keep it so a retry (or drop) can.
                self.armed.insert(addr, original);
                Err(e)
            }
        }
    }

    /// Restore every breakpoint; tries all and returns the first error.
    /// Breakpoints close together are restored with one read and one write
    /// (less than a page apart, so no page without a breakpoint is written); one whose `int3` was overwritten
    /// is reported as `Clobbered` and left as found.
    pub fn disarm_all(&mut self) -> Result<(), BreakpointError> {
        let mut first_err = self.disarm_inline().err();
        let addrs: Vec<RuntimeAddr> = self.armed.keys().copied().collect();
        for cluster in clusters(&addrs) {
            let (first, last) = (cluster[0], cluster[cluster.len() - 1]);
            let len = (last.0 - first.0 + 1) as usize;
            let mut bytes = vec![0u8; len];
            let restored = self.mem.read(first, &mut bytes).and_then(|()| {
                for &a in cluster {
                    let i = (a.0 - first.0) as usize;
                    let original = self.armed.get(&a).copied().unwrap_or(bytes[i]);
                    if bytes[i] == INT3 {
                        bytes[i] = original;
                    } else {
                        first_err.get_or_insert(BreakpointError::Clobbered {
                            addr: a,
                            original,
                            found: bytes[i],
                        });
                    }
                }
                self.mem.write(first, &bytes)
            });
            if let Err(e) = restored {
                first_err.get_or_insert(mem_err(first)(e));
            }
            // Do not retry forever on drop.
            for a in cluster {
                self.armed.remove(a);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Drop every breakpoint without writing (the address space is gone or
    /// was replaced by an exec).
    pub fn forget_all(&mut self) {
        self.armed.clear();
        self.inline = None;
    }

    /// Whether `addr` holds one of our `int3`s.
    pub fn is_armed(&self, addr: RuntimeAddr) -> bool {
        self.armed.contains_key(&addr)
    }
    /// Whether `addr` was ever armed by this set.
    pub fn was_armed(&self, addr: RuntimeAddr) -> bool {
        self.ever.contains(&addr)
    }
    /// The byte under the `int3` at `addr`.
    pub fn original_byte(&self, addr: RuntimeAddr) -> Option<u8> {
        self.armed.get(&addr).copied()
    }
    /// Armed addresses, ascending.
    pub fn armed(&self) -> impl Iterator<Item = RuntimeAddr> + '_ {
        self.armed.keys().copied()
    }
    /// Number of armed breakpoints (`int3`s, and detoured points while
    /// their flag is set).
    pub fn len(&self) -> usize {
        let detoured = self
            .inline
            .as_ref()
            .filter(|i| i.set)
            .map_or(0, |i| i.traps.len());
        self.armed.len() + detoured
    }
    /// Whether no breakpoint is armed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The memory handle (reads see `int3` where breakpoints are armed; see
    /// [`BreakpointSet::read_original`]).
    pub fn memory(&self) -> &M {
        &self.mem
    }
    /// The memory handle, for writes. Writing over an armed breakpoint's
    /// byte makes its later restore fail with `Clobbered`.
    pub fn memory_mut(&mut self) -> &mut M {
        &mut self.mem
    }
    /// Replace the memory handle (after an exec, with [`forget_all`]).
    ///
    /// [`forget_all`]: BreakpointSet::forget_all
    pub fn replace_memory(&mut self, mem: M) -> M {
        std::mem::replace(&mut self.mem, mem)
    }

    /// Read memory as it would be without our breakpoints.
    pub fn read_original(&self, addr: RuntimeAddr, buf: &mut [u8]) -> Result<(), MemError> {
        self.mem.read(addr, buf)?;
        let end = addr.0.saturating_add(buf.len() as u64);
        for (a, orig) in self.armed.range(addr..RuntimeAddr(end)) {
            buf[(a.0 - addr.0) as usize] = *orig;
        }
        Ok(())
    }

    /// Write the original bytes of every armed breakpoint into `other`: a
    /// copy of this address space made by `fork`, which inherited our
    /// `int3`s but will not be traced.
    pub fn remove_from(&self, other: &mut impl TargetMemory) -> Result<(), BreakpointError> {
        for (&addr, &orig) in &self.armed {
            other.write(addr, &[orig]).map_err(mem_err(addr))?;
        }
        if let Some(inline) = self.inline.as_ref().filter(|i| i.set) {
            other
                .write(inline.flag, &[0])
                .map_err(mem_err(inline.flag))?;
        }
        Ok(())
    }

    /// Execute the original instruction under the breakpoint that thread
    /// `tid` is stopped at (its rip must equal an armed address: rewind it
    /// after the trap), then put the `int3` back.
    ///
    /// Precondition: every other thread sharing this memory is stopped, or
    /// it could run through the address while the `int3` is lifted.
    /// Asynchronous signals arriving meanwhile are held back and returned;
    /// events (clone, fork) are returned for the caller to act on.
    pub fn step_over(
        &mut self,
        tracee: &mut Tracee,
        tid: Pid,
        timeout: Duration,
    ) -> Result<StepOutcome, BreakpointError> {
        let pt = |addr| move |source| BreakpointError::Ptrace { tid, addr, source };
        let addr = tracee.regs(tid).map_err(pt(RuntimeAddr(0)))?.rip();
        let original = *self
            .armed
            .get(&addr)
            .ok_or(BreakpointError::NotArmed { addr })?;
        self.mem.write(addr, &[original]).map_err(mem_err(addr))?;
        let result = step_loop(tracee, tid, addr, timeout);
        match &result {
            Ok(StepOutcome {
                end: StepEnd::Exec(_),
                ..
            }) => self.forget_all(),
            _ => {
                // Re-arm even after an error. If the process is gone the
                // write fails; nothing else can be done then.
                if self.mem.write(addr, &[INT3]).is_err() {
                    self.armed.remove(&addr);
                }
            }
        }
        result
    }
}

fn step_loop(
    tracee: &mut Tracee,
    tid: Pid,
    addr: RuntimeAddr,
    timeout: Duration,
) -> Result<StepOutcome, BreakpointError> {
    let pt = |source| BreakpointError::Ptrace { tid, addr, source };
    let start = Instant::now();
    let mut deferred = Vec::new();
    let mut events = Vec::new();
    tracee.step(tid, None).map_err(pt)?;
    for _ in 0..MAX_STEP_STOPS {
        let left = timeout.saturating_sub(start.elapsed());
        let stop = tracee.wait_stop(tid, left).map_err(pt)?;
        let end = match stop {
            Stop::Step => Some(StepEnd::Stepped),
            Stop::Int3 => Some(StepEnd::Signal(Sig::TRAP)),
            Stop::Signal { sig, code } if is_synchronous(sig, code) => Some(StepEnd::Signal(sig)),
            Stop::Signal { sig, .. } => {
                // Hold it back: delivering it now would run a handler that
                // returns to the breakpoint and reports the hit twice.
                let info = tracee.siginfo(tid).map_err(pt)?;
                deferred.push(DeferredSignal { sig, info });
                None
            }
            Stop::Exited { .. } | Stop::Killed { .. } => Some(StepEnd::Ended(stop)),
            Stop::Exec { .. } => Some(StepEnd::Exec(stop)),
            Stop::EventStop { .. } => None,
            Stop::Clone { .. }
            | Stop::Fork { .. }
            | Stop::Vfork { .. }
            | Stop::VforkDone
            | Stop::Exiting { .. }
            | Stop::Syscall
            | Stop::OtherEvent { .. } => {
                events.push(stop);
                None
            }
        };
        if let Some(end) = end {
            return Ok(StepOutcome {
                end,
                deferred,
                events,
            });
        }
        tracee.step(tid, None).map_err(pt)?;
    }
    Err(BreakpointError::TooManyStops {
        tid,
        addr,
        limit: MAX_STEP_STOPS,
    })
}

impl<M: TargetMemory> BreakpointSet<M> {
    /// Take the trap of an `int3` of ours that thread `tid` executed but
    /// that was never reported.
    ///
    /// When a `PTRACE_INTERRUPT` lands while a thread executes an `int3`,
    /// the kernel reports the interrupt stop first and leaves the `SIGTRAP`
    /// pending, rip just past the breakpoint. Once the `int3` is removed
    /// that signal would still be delivered and kill the program. So for a
    /// thread stopped in an interrupt stop (none of ours left pending) with
    /// rip one past an address this set armed (an `int3` of ours, or a
    /// trampoline's while the flag is set) and a `SIGTRAP` pending on
    /// it: let the trap be reported (it is, before any instruction runs),
    /// suppress it, rewind rip to the breakpoint (a trampoline's: to its
    /// update point, see [`BreakpointSet::trap_site`]) and stop the thread again
    /// there. Any other thread is left untouched.
    pub fn take_pending_trap(
        &self,
        tracee: &mut Tracee,
        tid: Pid,
        timeout: Duration,
    ) -> Result<PendingTrapOutcome, BreakpointError> {
        let untouched = || PendingTrapOutcome {
            trap: PendingTrap::None,
            deferred: Vec::new(),
        };
        let pt = |addr| move |source| BreakpointError::PendingTrap { tid, addr, source };
        let rip = tracee.regs(tid).map_err(pt(RuntimeAddr(0)))?.rip();
        let Some(addr) = self.trap_site(RuntimeAddr(rip.0.wrapping_sub(1))) else {
            return Ok(untouched());
        };
        if !trap_pending(tid)? {
            return Ok(untouched());
        }
        // A signal kept while seizing must not be delivered by the resumes
        // below: put it back afterwards.
        let kept = tracee.take_pending_signal(tid);
        let result = trap_loop(tracee, tid, rip, addr, timeout);
        if kept.is_some() {
            tracee.set_pending_signal(tid, kept).map_err(pt(addr))?;
        }
        result
    }
}

/// Whether a `SIGTRAP` is pending on thread `tid` alone.
fn trap_pending(tid: Pid) -> Result<bool, BreakpointError> {
    procfs::thread_pending_signals(tid)
        .map(|mask| mask & signal_bit(Sig::TRAP) != 0)
        .map_err(|source| BreakpointError::Proc { tid, source })
}

/// Resume `tid` (stopped, a `SIGTRAP` pending) until its trap is
/// reported, then until it is in an interrupt stop with no trap pending;
/// no instruction runs meanwhile.
fn trap_loop(
    tracee: &mut Tracee,
    tid: Pid,
    rip: RuntimeAddr,
    addr: RuntimeAddr,
    timeout: Duration,
) -> Result<PendingTrapOutcome, BreakpointError> {
    let pt = |source| BreakpointError::PendingTrap { tid, addr, source };
    let start = Instant::now();
    let mut taken = false;
    let mut deferred = Vec::new();
    let mut pending = true;
    for _ in 0..MAX_STEP_STOPS {
        if !pending {
            // Stop again as soon as this stop is left.
            tracee.interrupt(tid).map_err(pt)?;
        }
        // While the trap is pending no interrupt is asked for: the
        // kernel reports one before it dequeues a signal, and the thread
        // cannot run before the trap is reported.
        tracee.cont(tid, None).map_err(pt)?;
        let left = timeout.saturating_sub(start.elapsed());
        let stop = tracee.wait_stop(tid, left).map_err(pt)?;
        match stop {
            // An interrupt asked for earlier may come before the trap.
            Stop::EventStop { .. } if !trap_pending(tid)? => {
                let trap = if taken {
                    PendingTrap::Taken { addr }
                } else {
                    PendingTrap::None
                };
                return Ok(PendingTrapOutcome { trap, deferred });
            }
            Stop::Int3 if !taken && tracee.regs(tid).map_err(pt)?.rip() == rip => {
                let mut regs = tracee.regs(tid).map_err(pt)?;
                regs.set_rip(addr);
                tracee.set_regs(tid, &regs).map_err(pt)?;
                taken = true;
            }
            Stop::Int3 | Stop::Signal { .. } => {
                let sig = match stop {
                    Stop::Signal { sig, .. } => sig,
                    _ => Sig::TRAP,
                };
                let info = tracee.siginfo(tid).map_err(pt)?;
                deferred.push(DeferredSignal { sig, info });
            }
            stop if stop.is_terminal() => {
                return Ok(PendingTrapOutcome {
                    trap: PendingTrap::Ended(stop),
                    deferred,
                })
            }
            // An earlier interrupt's stop while the trap is still pending;
            // other events need an instruction to run.
            _ => {}
        }
        pending = trap_pending(tid)?;
    }
    Err(BreakpointError::PendingTrapStops {
        tid,
        addr,
        limit: MAX_STEP_STOPS,
    })
}

impl<M: TargetMemory> Drop for BreakpointSet<M> {
    fn drop(&mut self) {
        let _ = self.disarm_all();
    }
}

impl<M: TargetMemory> fmt::Debug for BreakpointSet<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakpointSet")
            .field("armed", &self.armed.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ByteBuffer;

    fn code() -> ByteBuffer {
        ByteBuffer::with_region(RuntimeAddr(0x1000), vec![0x55, 0x48, 0x89, 0xe5, 0xc3]).unwrap()
    }

    #[test]
    fn guard_restores_on_drop_and_disarm() {
        let mut m = code();
        {
            let bp = Breakpoint::arm(&mut m, RuntimeAddr(0x1001)).unwrap();
            assert_eq!(bp.original_byte(), 0x48);
            assert_eq!(bp.memory().read_u8(RuntimeAddr(0x1001)).unwrap(), INT3);
        }
        assert_eq!(m.read_u8(RuntimeAddr(0x1001)).unwrap(), 0x48);

        let mut bp = Breakpoint::arm(&mut m, RuntimeAddr(0x1000)).unwrap();
        bp.disarm().unwrap();
        bp.disarm().unwrap();
        assert!(!bp.is_armed());
        bp.rearm().unwrap();
        drop(bp);
        assert_eq!(m.read_u8(RuntimeAddr(0x1000)).unwrap(), 0x55);
        assert!(Breakpoint::arm(&mut m, RuntimeAddr(0x2000)).is_err());
    }

    #[test]
    fn set_arms_restores_and_refuses_clobbered() {
        let mut m = code();
        {
            let mut set = BreakpointSet::new(&mut m);
            set.arm(RuntimeAddr(0x1000)).unwrap();
            set.arm(RuntimeAddr(0x1000)).unwrap();
            set.arm(RuntimeAddr(0x1004)).unwrap();
            assert_eq!(set.len(), 2);
            assert_eq!(set.original_byte(RuntimeAddr(0x1004)), Some(0xc3));
            let mut raw = [0u8; 5];
            set.memory().read(RuntimeAddr(0x1000), &mut raw).unwrap();
            assert_eq!(raw, [INT3, 0x48, 0x89, 0xe5, INT3]);
            set.read_original(RuntimeAddr(0x1000), &mut raw).unwrap();
            assert_eq!(raw, [0x55, 0x48, 0x89, 0xe5, 0xc3]);

            let mut copy = code();
            copy.write(RuntimeAddr(0x1000), &[INT3]).unwrap();
            set.remove_from(&mut copy).unwrap();
            assert_eq!(copy.read_u8(RuntimeAddr(0x1000)).unwrap(), 0x55);

            // Someone rewrote the byte: the set must not write the stale original.
            set.memory_mut()
                .write(RuntimeAddr(0x1004), &[0x90])
                .unwrap();
            assert!(matches!(
                set.disarm(RuntimeAddr(0x1004)),
                Err(BreakpointError::Clobbered { found: 0x90, .. })
            ));
            assert!(!set.is_armed(RuntimeAddr(0x1004)));
            assert!(set.was_armed(RuntimeAddr(0x1004)));
            assert!(!set.disarm(RuntimeAddr(0x1003)).unwrap());
            assert!(set.arm(RuntimeAddr(0x0fff)).is_err());
        }
        let mut all = [0u8; 5];
        m.read(RuntimeAddr(0x1000), &mut all).unwrap();
        assert_eq!(all, [0x55, 0x48, 0x89, 0xe5, 0x90]);
    }

    #[test]
    fn arm_all_batches_close_points_and_disarm_all_restores_them() {
        // Two pages of code and a far one: points less than a page apart
        // share a range, the far ones have their own.
        let text: Vec<u8> = (0..0x3000u32).map(|i| (i % 251) as u8).collect();
        let mut m = ByteBuffer::with_region(RuntimeAddr(0x10000), text.clone()).unwrap();
        let far: Vec<u8> = vec![0x90; 16];
        m.add_region(RuntimeAddr(0x80000), far.clone()).unwrap();
        let points = [0x10010u64, 0x10500, 0x10fff, 0x12ff0, 0x80003, 0x10500];
        assert_eq!(
            clusters(&[
                RuntimeAddr(0x10010),
                RuntimeAddr(0x10500),
                RuntimeAddr(0x10fff),
                RuntimeAddr(0x12ff0),
                RuntimeAddr(0x80003)
            ])
            .iter()
            .map(|c| c.len())
            .collect::<Vec<_>>(),
            [3, 1, 1]
        );
        {
            let mut set = BreakpointSet::new(&mut m);
            // One armed alone first: arm_many leaves it (and its byte) be.
            set.arm(RuntimeAddr(0x10010)).unwrap();
            let addrs: Vec<RuntimeAddr> = points.iter().map(|&a| RuntimeAddr(a)).collect();
            // Told first, once, each new point with the byte it covers.
            let mut told = Vec::new();
            set.arm_all_told(&addrs, |t| {
                told.extend_from_slice(t);
                Ok::<(), BreakpointError>(())
            })
            .unwrap();
            assert_eq!(
                told,
                [
                    (RuntimeAddr(0x10500), text[0x500]),
                    (RuntimeAddr(0x10fff), text[0xfff]),
                    (RuntimeAddr(0x12ff0), text[0x2ff0]),
                    (RuntimeAddr(0x80003), 0x90)
                ]
            );
            assert_eq!(set.len(), 5);
            for &a in &points[..4] {
                let i = (a - 0x10000) as usize;
                assert_eq!(set.original_byte(RuntimeAddr(a)), Some(text[i]), "{a:#x}");
                assert_eq!(set.memory().read_u8(RuntimeAddr(a)).unwrap(), INT3);
            }
            assert_eq!(set.original_byte(RuntimeAddr(0x80003)), Some(0x90));
            // A hook's error arms nothing.
            let refused = set.arm_all_told(&[RuntimeAddr(0x10001)], |_| {
                Err(BreakpointError::Mem {
                    addr: RuntimeAddr(0x10001),
                    source: MemError::TooLarge {
                        addr: RuntimeAddr(0x10001),
                        len: 1,
                        cap: 0,
                    },
                })
            });
            assert!(refused.is_err());
            assert!(!set.is_armed(RuntimeAddr(0x10001)));
            assert_eq!(set.memory().read_u8(RuntimeAddr(0x10001)).unwrap(), text[1]);
            // Everything between the points is as it was.
            let mut now = vec![0u8; text.len()];
            set.read_original(RuntimeAddr(0x10000), &mut now).unwrap();
            assert_eq!(now, text);
            // A point outside memory refuses, and those armed before stay.
            assert!(set.arm_all(&[RuntimeAddr(0x40000)]).is_err());
            assert_eq!(set.len(), 5);

            set.memory_mut()
                .write(RuntimeAddr(0x10fff), &[0x90])
                .unwrap();
            assert!(matches!(
                set.disarm_all(),
                Err(BreakpointError::Clobbered { found: 0x90, .. })
            ));
            assert!(set.is_empty());
        }
        let mut now = vec![0u8; text.len()];
        m.read(RuntimeAddr(0x10000), &mut now).unwrap();
        let mut expected = text.clone();
        expected[0xfff] = 0x90;
        assert_eq!(now, expected);
        let mut f = vec![0u8; 16];
        m.read(RuntimeAddr(0x80000), &mut f).unwrap();
        assert_eq!(f, far);
    }

    /// Detoured points: one flag byte arms them all; a trap in a
    /// trampoline is taken at its point; a thread at a point goes on past
    /// its trampoline's int3 while armed; disarm and drop clear the flag,
    /// a forked copy gets it cleared; int3 points beside them as before.
    #[test]
    fn inline_points_arm_with_one_byte() {
        let flag = RuntimeAddr(0x5000);
        let mut m = code();
        m.add_region(flag, vec![0; 8]).unwrap();
        let point = RuntimeAddr(0x1000);
        let trap = RuntimeAddr(0x4009);
        {
            let mut set = BreakpointSet::new(&mut m);
            assert_eq!(set.trap_site(trap), None);
            set.arm_inline(flag, [(point, trap)]).unwrap();
            set.arm(RuntimeAddr(0x1004)).unwrap();
            assert_eq!(set.len(), 2);
            assert_eq!(set.memory().read_u8(flag).unwrap(), 1);
            assert_eq!(set.trap_site(trap), Some(point));
            assert_eq!(
                set.trap_site(RuntimeAddr(0x1004)),
                Some(RuntimeAddr(0x1004))
            );
            assert_eq!(set.trap_site(RuntimeAddr(0x4008)), None);
            assert_eq!(set.inline_resume(point), Some(RuntimeAddr(0x400a)));
            assert_eq!(set.inline_resume(RuntimeAddr(0x1001)), None);
            // The code under a detoured point is never written.
            assert_eq!(set.memory().read_u8(point).unwrap(), 0x55);

            let mut child = code();
            child.add_region(flag, vec![1; 8]).unwrap();
            set.remove_from(&mut child).unwrap();
            assert_eq!(child.read_u8(flag).unwrap(), 0);

            set.disarm_all().unwrap();
            assert_eq!(set.memory().read_u8(flag).unwrap(), 0);
            assert_eq!(set.inline_resume(point), None);
            // A trap taken before the disarm is still recognised.
            assert_eq!(set.trap_site(trap), Some(point));
            set.arm_inline(flag, [(point, trap)]).unwrap();
        }
        // Dropped: the flag is clear again.
        assert_eq!(m.read_u8(flag).unwrap(), 0);
    }

    #[test]
    fn forget_all_writes_nothing() {
        let mut m = code();
        {
            let mut set = BreakpointSet::new(&mut m);
            set.arm(RuntimeAddr(0x1002)).unwrap();
            set.forget_all();
        }
        assert_eq!(m.read_u8(RuntimeAddr(0x1002)).unwrap(), INT3);
    }
}
