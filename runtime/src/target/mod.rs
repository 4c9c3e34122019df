//! Everything that touches a live process: ptrace, its memory, `/proc`,
//! remote calls, breakpoints.
//!
//! - [`ptrace`]: seizing, stopping, resuming threads; registers.
//! - [`process_memory`]: [`ProcessMemory`], a live process's memory.
//! - [`procfs`]: `/proc` (maps, tasks).
//! - [`remote`]: calling functions inside the target.
//! - [`breakpoint`]: `int3` guards and stepping over them.

pub mod breakpoint;
pub mod process_memory;
pub mod procfs;
pub mod ptrace;
pub mod remote;

pub use process_memory::ProcessMemory;
