//! Helpers shared by the rewriter's integration tests.
pub mod gen;
