//! upstare-corpus: the C programs upstare is tested on, and the harness that
//! builds them with the real compilers and runs them.
//!
//! - [`programs`]: small deterministic programs (`corpus/programs/*.c`), each
//!   tagged with the [`Feature`]s it exercises.
//! - [`version_pairs`]: long-running programs in two versions
//!   (`corpus/versions/<name>/v1.c`, `v2.c`) for cross-version update tests.
//! - [`build`] / [`compile_c`]: compile with a [`Toolchain`] into a cache under
//!   the target directory.
//! - [`run`] / [`spawn`] / [`ChildGuard`]: run a binary with a time limit; the
//!   guard kills the child (and its process group) by pid on drop.

#![forbid(unsafe_code)]

mod catalog;
mod compile;
mod process;

pub use catalog::{
    program, programs, version_pair, version_pairs, Control, Feature, Program, VersionPair,
};
pub use compile::{
    build, cache_dir, compile_c, have_tool, target_dir, workspace_root, BuildError, CSource,
    Toolchain, BASE_CFLAGS, LINK_FLAGS,
};
pub use process::{run, run_command, spawn, ChildGuard, ExitStatus, Output, RunError};
