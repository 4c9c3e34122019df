//! `upstare-runtime`: executes an update of a live process.
//!
//! Where things live:
//! - [`target`]: everything that touches a live process (ptrace, its memory,
//!   `/proc`, remote calls, breakpoints).
//! - [`memory`]: the [`TargetMemory`] trait the engine works through, and
//!   [`ByteBuffer`], a target made of plain bytes for tests.
//! - [`stop`]: stopping the world (which threads are ready, and why not).
//! - [`engine`]: saved state, unwinding, state transfer, stack rebuilding —
//!   computation only, on any [`TargetMemory`].
//! - [`load`]: loading the new version into the process, and the commit
//!   steps that hand the process over to it.
//! - [`update`]: one update end to end, as a transaction.
//!
//! The harness the tests run programs with (breakpoints, callbacks at hits)
//! is `upstare-testkit`'s `driver`, outside this crate's API.

#![deny(unsafe_code)]

pub mod engine;
pub mod load;
pub mod memory;
pub mod stop;
pub mod target;
pub mod update;

pub use memory::{ByteBuffer, MemError, TargetMemory};
pub use target::breakpoint::{
    Breakpoint, BreakpointError, BreakpointSet, DeferredSignal, StepEnd, StepOutcome,
};
pub use target::procfs::{MemoryMap, ProcError};
pub use target::ptrace::{
    ChildGuard, ExtRegs, PtraceError, Regs, Sig, SpawnedStdio, Stop, ThreadState, Tracee,
};
pub use target::ProcessMemory;
