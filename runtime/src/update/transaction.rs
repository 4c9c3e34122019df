//! The commit of one process's update as a transaction: every byte and
//! register set of the new state is prepared first ([`PreparedState`]);
//! committing writes them while recording what they replace
//! ([`UndoLog`]); a failure part-way rolls back what was written, in
//! reverse order, so the process is as it was.
//!
//! Commit and rollback work on any [`TargetMemory`] and any
//! [`ThreadRegisters`], so they are tested on byte buffers too; a
//! multi-process update keeps one undo log per process and rolls back the
//! committed ones when a later one fails.

use std::collections::BTreeMap;
use upstare_dwarf::RuntimeAddr;

use crate::engine::Write;
use crate::memory::{MemError, TargetMemory};
use crate::target::ptrace::{PtraceError, Regs, Tracee};
use nix::unistd::Pid;

/// Reading and setting the general registers of a target's threads.
pub trait ThreadRegisters {
    /// The registers of thread `tid`.
    fn thread_regs(&mut self, tid: Pid) -> Result<Regs, RegsError>;
    /// Sets the registers of thread `tid`.
    fn set_thread_regs(&mut self, tid: Pid, regs: &Regs) -> Result<(), RegsError>;
}

/// Why a thread's registers could not be read or set.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("{0}")]
    Ptrace(#[from] PtraceError),
    #[error("thread {tid} is not part of the target")]
    NoSuchThread { tid: Pid },
}

impl ThreadRegisters for Tracee {
    fn thread_regs(&mut self, tid: Pid) -> Result<Regs, RegsError> {
        Ok(self.regs(tid)?)
    }
    fn set_thread_regs(&mut self, tid: Pid, regs: &Regs) -> Result<(), RegsError> {
        Ok(self.set_regs(tid, regs)?)
    }
}

/// Registers of threads kept in memory, for tests of the commit on buffers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RegisterFile {
    pub threads: BTreeMap<Pid, Regs>,
}

impl ThreadRegisters for RegisterFile {
    fn thread_regs(&mut self, tid: Pid) -> Result<Regs, RegsError> {
        self.threads
            .get(&tid)
            .copied()
            .ok_or(RegsError::NoSuchThread { tid })
    }
    fn set_thread_regs(&mut self, tid: Pid, regs: &Regs) -> Result<(), RegsError> {
        match self.threads.get_mut(&tid) {
            Some(r) => {
                *r = *regs;
                Ok(())
            }
            None => Err(RegsError::NoSuchThread { tid }),
        }
    }
}

/// Everything the commit writes: memory, then each thread's registers.
#[derive(Clone, Debug, Default)]
pub struct PreparedState {
    pub writes: Vec<Write>,
    /// Final registers per thread.
    pub regs: Vec<(Pid, Regs)>,
}

impl PreparedState {
    /// Bytes written to memory by the commit.
    pub fn bytes(&self) -> usize {
        self.writes.iter().map(|w| w.bytes.len()).sum()
    }
}

/// What a commit replaced, to put it back.
#[derive(Debug, Default)]
pub struct UndoLog {
    memory: Vec<(RuntimeAddr, Vec<u8>)>,
    regs: Vec<(Pid, Regs)>,
}

/// Why a commit failed. The commit has been rolled back.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("commit failed and was rolled back: {what}: {source}")]
    Memory {
        what: String,
        #[source]
        source: MemError,
    },
    #[error("commit failed and was rolled back: registers of thread {tid}: {source}")]
    Registers {
        tid: Pid,
        #[source]
        source: RegsError,
    },
}

/// How the commit reaches the target's memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CommitMode {
    /// Writes merged into contiguous ranges; what they replace read, and the
    /// ranges written, in as few operations as the target allows; registers
    /// set only in threads whose registers change.
    #[default]
    Batched,
    /// One read and one write per [`Write`], every thread's registers set:
    /// the former path, kept as the benchmark's baseline.
    OneByOne,
}

/// Writes `state` into the target, recording what it replaces. On failure
/// everything already written is put back and the error says what failed.
pub fn commit(
    state: &PreparedState,
    mem: &mut impl TargetMemory,
    regs: &mut impl ThreadRegisters,
) -> Result<UndoLog, CommitError> {
    commit_with(state, mem, regs, CommitMode::Batched)
}

/// [`commit`] in the given mode. Both modes leave the target in the same
/// state: the writes' bytes as if applied in order (a later write wins where
/// two overlap), every thread's registers as prepared.
pub fn commit_with(
    state: &PreparedState,
    mem: &mut impl TargetMemory,
    regs: &mut impl ThreadRegisters,
    mode: CommitMode,
) -> Result<UndoLog, CommitError> {
    let mut undo = UndoLog {
        memory: Vec::with_capacity(state.writes.len()),
        regs: Vec::with_capacity(state.regs.len()),
    };
    let written = match mode {
        CommitMode::Batched => commit_batched(&state.writes, mem, &mut undo),
        CommitMode::OneByOne => commit_each(&state.writes, mem, &mut undo),
    };
    if let Err(e) = written {
        undo.roll_back(mem, regs);
        return Err(e);
    }
    for (tid, new) in &state.regs {
        let result = regs.thread_regs(*tid).and_then(|old| {
            // A thread whose registers do not change is not written (nor
            // recorded: there is nothing to put back).
            if mode == CommitMode::Batched && old == *new {
                return Ok(None);
            }
            regs.set_thread_regs(*tid, new).map(|()| Some(old))
        });
        match result {
            Ok(Some(old)) => undo.regs.push((*tid, old)),
            Ok(None) => {}
            Err(source) => {
                undo.roll_back(mem, regs);
                return Err(CommitError::Registers { tid: *tid, source });
            }
        }
    }
    Ok(undo)
}

fn commit_each(
    writes: &[Write],
    mem: &mut impl TargetMemory,
    undo: &mut UndoLog,
) -> Result<(), CommitError> {
    for w in writes {
        crate::update::signals::checkpoint(crate::update::signals::Phase::Commit);
        let saved = mem.read_vec(w.addr, w.bytes.len() as u64, usize::MAX);
        let result = saved.and_then(|saved| {
            mem.write(w.addr, &w.bytes)?;
            Ok(saved)
        });
        match result {
            Ok(saved) => undo.memory.push((w.addr, saved)),
            Err(source) => {
                return Err(CommitError::Memory {
                    what: w.what.clone(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Largest gap between two writes that is filled with the bytes already
/// there so that both become one range. Only gaps whose bytes lie in pages
/// the two writes touch are filled, so a merged range never reaches a page
/// no write reaches. A page's worth: each range costs the kernel a page
/// walk of its own (redis's 19,633 writes made 5,592 ranges with 256,
/// 63 with 4096: 7.0 -> 4.9 ms).
const MAX_GAP: u64 = 4096;
const PAGE: u64 = 4096;

/// One contiguous range of the batched commit.
struct Span {
    start: u64,
    end: u64,
    /// Indices into the writes, in their order.
    writes: Vec<usize>,
}

/// The writes grouped into disjoint, sorted spans (overlapping, adjacent
/// or nearly adjacent writes share one). A write whose range wraps around
/// the address space gets a span of its own, which fails when written.
fn spans(writes: &[Write]) -> Vec<Span> {
    let mut order: Vec<usize> = (0..writes.len()).collect();
    order.sort_by_key(|&i| writes[i].addr.0);
    let mut out: Vec<Span> = Vec::new();
    for i in order {
        let w = &writes[i];
        let start = w.addr.0;
        let Some(end) = start.checked_add(w.bytes.len() as u64) else {
            out.push(Span {
                start,
                end: start,
                writes: vec![i],
            });
            continue;
        };
        if let Some(last) = out.last_mut() {
            let near = start <= last.end
                || (start - last.end <= MAX_GAP
                    && start / PAGE <= last.end.saturating_sub(1) / PAGE + 1);
            if last.end > last.start && near {
                last.end = last.end.max(end);
                last.writes.push(i);
                continue;
            }
        }
        out.push(Span {
            start,
            end,
            writes: vec![i],
        });
    }
    for s in &mut out {
        s.writes.sort_unstable();
    }
    out
}

/// The write of `span` to name in an error: the first whose own bytes
/// cannot be read, else the first.
fn culprit<'w>(span: &Span, writes: &'w [Write], mem: &impl TargetMemory) -> &'w Write {
    let first = &writes[span.writes[0]];
    span.writes
        .iter()
        .map(|&i| &writes[i])
        .find(|w| {
            mem.read_vec(w.addr, w.bytes.len() as u64, usize::MAX)
                .is_err()
        })
        .unwrap_or(first)
}

fn commit_batched(
    writes: &[Write],
    mem: &mut impl TargetMemory,
    undo: &mut UndoLog,
) -> Result<(), CommitError> {
    let spans = spans(writes);
    // What every span replaces, read in one batch: the undo log, and the
    // bytes of the gaps filled between writes.
    let mut saved: Vec<Vec<u8>> = spans
        .iter()
        .map(|s| {
            if s.end > s.start {
                vec![0u8; (s.end - s.start) as usize]
            } else {
                writes[s.writes[0]].bytes.clone()
            }
        })
        .collect();
    {
        let mut ranges: Vec<(RuntimeAddr, &mut [u8])> = spans
            .iter()
            .zip(saved.iter_mut())
            .map(|(s, b)| (RuntimeAddr(s.start), b.as_mut_slice()))
            .collect();
        if let Err((i, source)) = mem.read_ranges(&mut ranges) {
            let i = i.min(spans.len().saturating_sub(1));
            return Err(CommitError::Memory {
                what: culprit(&spans[i], writes, mem).what.clone(),
                source,
            });
        }
    }
    // The final bytes of each span: what is there, overwritten by its
    // writes in their order.
    let finals: Vec<Vec<u8>> = spans
        .iter()
        .zip(&saved)
        .map(|(s, old)| {
            let mut b = old.clone();
            for &i in &s.writes {
                let w = &writes[i];
                let at = (w.addr.0 - s.start) as usize;
                if let Some(dst) = b.get_mut(at..at + w.bytes.len()) {
                    dst.copy_from_slice(&w.bytes);
                }
            }
            b
        })
        .collect();
    // Recorded before writing: a range that fails part-way is put back too.
    for (s, old) in spans.iter().zip(saved) {
        // A moment of the commit per range, for the fault-injection hook.
        crate::update::signals::checkpoint(crate::update::signals::Phase::Commit);
        undo.memory.push((RuntimeAddr(s.start), old));
    }
    let ranges: Vec<(RuntimeAddr, &[u8])> = spans
        .iter()
        .zip(&finals)
        .map(|(s, b)| (RuntimeAddr(s.start), b.as_slice()))
        .collect();
    if let Err((i, source)) = mem.write_ranges(&ranges) {
        let i = i.min(spans.len().saturating_sub(1));
        // Only the spans possibly written are put back.
        undo.memory.truncate(i + 1);
        return Err(CommitError::Memory {
            what: culprit(&spans[i], writes, mem).what.clone(),
            source,
        });
    }
    Ok(())
}

impl UndoLog {
    /// Puts back every byte and register set the commit replaced, newest
    /// first. Best effort: a step that fails does not stop the others (the
    /// target is in the state the caller reports).
    pub fn roll_back(self, mem: &mut impl TargetMemory, regs: &mut impl ThreadRegisters) {
        for (addr, bytes) in self.memory.iter().rev() {
            let _ = mem.write(*addr, bytes);
        }
        for (tid, r) in self.regs.iter().rev() {
            let _ = regs.set_thread_regs(*tid, r);
        }
    }

    /// Number of memory ranges and register sets recorded.
    pub fn len(&self) -> usize {
        self.memory.len() + self.regs.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
