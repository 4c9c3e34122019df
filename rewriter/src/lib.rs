//! `upstare-rewriter`: analyzes the machine code of a `-O0` x86-64 binary
//! (update points, call sites, stack depths) and writes the instrumented ELF
//! carrying the frame-description tables.

#![forbid(unsafe_code)]

pub mod analysis;
pub mod dump;
pub mod elf;
pub mod inline;
pub mod rewrite;
