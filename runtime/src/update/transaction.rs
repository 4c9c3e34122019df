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

/// Writes `state` into the target, recording what it replaces. On failure
/// everything already written is put back and the error says what failed.
pub fn commit(
    state: &PreparedState,
    mem: &mut impl TargetMemory,
    regs: &mut impl ThreadRegisters,
) -> Result<UndoLog, CommitError> {
    let mut undo = UndoLog {
        memory: Vec::with_capacity(state.writes.len()),
        regs: Vec::with_capacity(state.regs.len()),
    };
    for w in &state.writes {
        crate::update::signals::checkpoint(crate::update::signals::Phase::Commit);
        let saved = mem.read_vec(w.addr, w.bytes.len() as u64, usize::MAX);
        let result = saved.and_then(|saved| {
            mem.write(w.addr, &w.bytes)?;
            Ok(saved)
        });
        match result {
            Ok(saved) => undo.memory.push((w.addr, saved)),
            Err(source) => {
                undo.roll_back(mem, regs);
                return Err(CommitError::Memory {
                    what: w.what.clone(),
                    source,
                });
            }
        }
    }
    for (tid, new) in &state.regs {
        let result = regs
            .thread_regs(*tid)
            .and_then(|old| regs.set_thread_regs(*tid, new).map(|()| old));
        match result {
            Ok(old) => undo.regs.push((*tid, old)),
            Err(source) => {
                undo.roll_back(mem, regs);
                return Err(CommitError::Registers { tid: *tid, source });
            }
        }
    }
    Ok(undo)
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
