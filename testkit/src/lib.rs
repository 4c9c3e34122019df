//! upstare-testkit: what the tests of every upstare crate share, kept out of
//! the production crates' API. A dev-dependency only (and the dependency of
//! `upstare-corpus`, itself a test harness).
//!
//! - [`TempDir`]: a private directory removed on drop.
//! - [`ChildGuard`], [`spawn`], [`run`]: a child process (and its group)
//!   killed by pid on drop, with its output captured; runs are bounded.
//! - [`Toolchain`], [`compile_c`], [`compile_files`]: the real compilers
//!   with the target contract's flags; [`require_tool`] fails a test that
//!   lacks gcc, clang, gdb or strip, naming it, rather than skipping.
//! - [`compile_instrumented`], [`instrument`], [`instrument_to`]: C built
//!   and then rewritten by the rewriter library.
//! - [`driver`]: [`run_with_breakpoints`], a program run under ptrace with
//!   `int3` breakpoints and a callback at every hit.

#![forbid(unsafe_code)]

mod compile;
pub mod driver;
mod instrument;
mod process;
mod rng;
mod tempdir;

pub use compile::{
    command_line, compile_c, compile_files, have_tool, require_tool, target_dir, workspace_root,
    write_atomic, BuildError, CSource, Toolchain, BASE_CFLAGS, LINK_FLAGS,
};
pub use driver::{
    run_with_breakpoints, DriverError, Exit, HitAction, HitContext, RunLimits, RunReport,
};
pub use instrument::{
    compile_instrumented, instrument, instrument_to, instrument_to_with, instrument_with,
    write_exe, PointsMode,
};
pub use process::{run, run_command, spawn, ChildGuard, ExitStatus, Output, RunError};
pub use rng::Rng;
pub use tempdir::TempDir;
