//! `upstare-dwarf`: reads one x86-64 ELF binary (its DWARF, line table and
//! CFI) into a plain model, and owns the frame-description table format shared
//! by the rewriter, the patcher and the runtime.
//!
//! No I/O beyond the bytes it is given; no knowledge of processes.

#![forbid(unsafe_code)]

pub mod addr;
pub mod cfi;
pub mod compare;
pub mod elf;
pub mod fdt;
pub mod model;
pub mod read;
pub mod resolve;
pub mod section;

pub use addr::{CfaOffset, FileOffset, LinkAddr, LoadBias, Reg, RuntimeAddr};
pub use cfi::{CfaRule, CfiError, EhFrameIndex, RegRule, UnwindRow};
pub use read::{after_prologue, read_program, ReadError};
pub use section::{check_code, code_digest, read_tables, TablesError};
