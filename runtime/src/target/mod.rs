//! Everything that touches a live process: ptrace control of its threads,
//! its memory, what `/proc` says about it, system and function calls run
//! inside it, and `int3` breakpoints. Every other module works on plain data
//! or on any [`crate::memory::TargetMemory`].
//!
//! - [`ptrace`]: [`Tracee`] (spawn or seize, registers, resume, bounded
//!   waits), [`ChildGuard`]; the crate's only `unsafe` code.
//! - [`process_memory`]: [`ProcessMemory`], `/proc/PID/mem` with a ptrace
//!   fallback.
//! - [`procfs`]: `/proc/PID/maps`, `auxv`, tasks and the load bias.
//! - [`remote`]: [`remote::RemoteCalls`], system and function calls executed
//!   by a stopped thread, restored exactly afterwards.
//! - [`breakpoint`]: `int3` breakpoints as RAII guards, stepping over them.
//! - [`permission`]: why the kernel refused to let us trace a process.
//! - [`rescue`]: the SIGTRAP handler that makes armed breakpoints harmless
//!   if the updater dies.

pub mod breakpoint;
pub mod permission;
pub mod process_memory;
pub mod procfs;
pub mod ptrace;
pub mod remote;
pub mod rescue;

pub use process_memory::ProcessMemory;
pub use ptrace::{ChildGuard, Tracee};
