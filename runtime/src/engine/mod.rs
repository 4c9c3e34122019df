//! The update engine: pure computation over any
//! [`crate::memory::TargetMemory`] (a live process or a byte buffer in
//! tests). It turns a stopped process's memory into the saved state and the
//! saved state into the list of writes and registers of the new state;
//! nothing here writes to a process.
//!
//! - [`state`]: the saved state (images, threads, frames) as plain data.
//! - [`unwind`]: one paused thread's stack into application frames.
//! - [`transfer`]: globals and heap objects, pointer remapping.
//! - [`rebuild`]: every thread's stack for the new version.

pub mod rebuild;
pub mod state;
pub mod transfer;
pub mod unwind;
