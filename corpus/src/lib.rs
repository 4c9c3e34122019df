//! upstare-corpus: the C programs upstare is tested on, and the harness that
//! builds them with the real compilers and runs them.
//!
//! - [`programs`]: small deterministic programs (`corpus/programs/*.c`), each
//!   tagged with the [`Feature`]s it exercises.
//! - [`version_pairs`]: long-running programs in two versions
//!   (`corpus/versions/<name>/v1.c`, `v2.c`) for cross-version update tests.
//! - [`build`]: compile a program with a toolchain into a cache under the
//!   target directory.
//! - [`real`]: real programs from Debian's source packages, fetched, built
//!   and instrumented at test time, cached under the target directory.
//!
//! The toolchains, the compile step and the process guard are
//! `upstare-testkit`'s: they serve every crate's tests, and this crate is one
//! of their users (one copy of each, with the dependency pointing from the
//! programs to the generic kit).

#![forbid(unsafe_code)]

mod catalog;
mod compile;
pub mod real;

pub use catalog::{
    program, programs, version_pair, version_pairs, Control, Feature, Program, VersionPair,
};
pub use compile::{build, cache_dir};
