//! The update engine: pure computation over any
//! [`crate::memory::TargetMemory`] (a live process or a byte buffer in
//! tests). It turns a stopped process's memory into the saved state and the
//! saved state into the list of writes and registers of the new state;
//! nothing here writes to a process.
//!
//! - [`state`]: the saved state (images, threads, frames) as plain data.
//! - [`unwind`]: one paused thread's stack into application frames.
//! - [`pointers`]: pointers inside typed values and where each goes.
//! - [`transfer`]: globals, as the update plan maps them.
//! - [`heap`]: objects reached through typed pointers, their pointers
//!   remapped.
//! - [`rebuild`]: every thread's stack for the new version.
//! - [`sweep`]: all live writable memory scanned for values still pointing
//!   into the retired image, after the typed walk.
//! - [`transform`]: the calls of the SPEC's C transformers, as data.
//!
//! The output is a list of [`Write`]s and final registers that the update's
//! transaction commits.

use upstare_dwarf::RuntimeAddr;

pub mod convert;
pub mod heap;
pub mod pointers;
pub mod rebuild;
pub mod state;
pub mod sweep;
pub mod transfer;
pub mod transform;
pub mod unwind;

/// A pending write of the commit stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub addr: RuntimeAddr,
    pub bytes: Vec<u8>,
    /// What it is, for diagnostics (`global counter`).
    pub what: String,
}
