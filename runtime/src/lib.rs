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
//! - [`driver`]: [`run_with_breakpoints`], the harness the verification
//!   tests use to run a real program with breakpoints.

#![deny(unsafe_code)]

pub mod driver;
pub mod engine;
pub mod load;
pub mod memory;
pub mod stop;
pub mod target;
pub mod update;

pub use driver::{
    run_with_breakpoints, DriverError, Exit, HitAction, HitContext, RunLimits, RunReport,
};
pub use memory::{ByteBuffer, MemError, TargetMemory};
pub use target::breakpoint::{
    Breakpoint, BreakpointError, BreakpointSet, DeferredSignal, StepEnd, StepOutcome,
};
pub use target::procfs::{MemoryMap, ProcError};
pub use target::ptrace::{
    ChildGuard, ExtRegs, PtraceError, Regs, Sig, SpawnedStdio, Stop, ThreadState, Tracee,
};
pub use target::ProcessMemory;
