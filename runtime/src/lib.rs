//! `upstare-runtime`: everything that touches a live process.
//!
//! - [`memory`]: the [`TargetMemory`] trait, a byte-buffer implementation for
//!   tests and the live [`ProcessMemory`].
//! - [`procfs`]: `/proc/PID/maps`, `auxv`, tasks and the load bias.
//! - [`ptrace`]: [`Tracee`] (spawn or seize, registers, resume, bounded
//!   waits), [`ChildGuard`].
//! - [`breakpoint`]: `int3` breakpoints as RAII guards, stepping over them.
//! - [`driver`]: [`run_with_breakpoints`], the harness the verification
//!   tests use to run a real program with breakpoints.

#![deny(unsafe_code)]

pub mod breakpoint;
pub mod driver;
pub mod image;
pub mod loader;
pub mod memory;
pub mod procfs;
pub mod ptrace;
pub mod rebuild;
pub mod remote;
pub mod state;
pub mod stop;
pub mod transfer;
pub mod unwind;

pub use breakpoint::{
    Breakpoint, BreakpointError, BreakpointSet, DeferredSignal, StepEnd, StepOutcome,
};
pub use driver::{
    run_with_breakpoints, DriverError, Exit, HitAction, HitContext, RunLimits, RunReport,
};
pub use memory::{ByteBuffer, MemError, ProcessMemory, TargetMemory};
pub use procfs::{MemoryMap, ProcError};
pub use ptrace::{
    ChildGuard, ExtRegs, PtraceError, Regs, Sig, SpawnedStdio, Stop, ThreadState, Tracee,
};
pub mod update;
