//! Distinct types for the distinct address spaces upstare deals with, so that a
//! link-time address can never be used where a runtime address is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! addr_type {
    ($(#[$doc:meta])* $name:ident, $inner:ty, $fmt:literal) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "(", $fmt, ")"), self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }
    };
}

addr_type!(
    /// Offset of a byte inside an ELF file.
    FileOffset, u64, "{:#x}"
);
addr_type!(
    /// Virtual address as linked (what DWARF, symbols and the FDT contain).
    LinkAddr, u64, "{:#x}"
);
addr_type!(
    /// Address inside the address space of a running target process.
    RuntimeAddr, u64, "{:#x}"
);
addr_type!(
    /// Signed offset from a frame's canonical frame address (CFA). The CFA is
    /// the value of rsp just before the `call` that created the frame, so the
    /// return address lives at CFA-8 and (after the prologue) rbp = CFA-16.
    CfaOffset, i64, "{}"
);

impl LinkAddr {
    /// `self + delta`, `None` on overflow.
    pub fn checked_add(self, delta: u64) -> Option<LinkAddr> {
        self.0.checked_add(delta).map(LinkAddr)
    }
    /// Distance from `base` to `self`, `None` if `self < base`.
    pub fn offset_from(self, base: LinkAddr) -> Option<u64> {
        self.0.checked_sub(base.0)
    }
    /// The runtime address of this link-time address in an image loaded with
    /// `bias`.
    pub fn to_runtime(self, bias: LoadBias) -> RuntimeAddr {
        RuntimeAddr(self.0.wrapping_add(bias.0))
    }
}

impl RuntimeAddr {
    /// `self + delta` (signed), `None` on overflow.
    pub fn checked_offset(self, delta: i64) -> Option<RuntimeAddr> {
        self.0.checked_add_signed(delta).map(RuntimeAddr)
    }
    /// `self + n`, `None` on overflow.
    pub fn checked_add(self, n: u64) -> Option<RuntimeAddr> {
        self.0.checked_add(n).map(RuntimeAddr)
    }
    /// How far `self` lies above `base`, `None` when below it.
    pub fn offset_from(self, base: RuntimeAddr) -> Option<u64> {
        self.0.checked_sub(base.0)
    }
    /// `self - other` as a signed distance (wrapping: addresses of one
    /// process are far below 2^63 apart).
    pub fn distance_from(self, other: RuntimeAddr) -> i64 {
        self.0.wrapping_sub(other.0) as i64
    }
    /// The link-time address of this runtime address in an image loaded with
    /// `bias`.
    pub fn to_link(self, bias: LoadBias) -> LinkAddr {
        LinkAddr(self.0.wrapping_sub(bias.0))
    }
}

/// Difference between runtime and link-time addresses of one loaded image
/// (0 for non-PIE executables).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct LoadBias(pub u64);

/// An x86-64 general purpose register, numbered as in DWARF.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[repr(u8)]
pub enum Reg {
    Rax = 0,
    Rdx = 1,
    Rcx = 2,
    Rbx = 3,
    Rsi = 4,
    Rdi = 5,
    Rbp = 6,
    Rsp = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
    /// The return address column.
    Rip = 16,
}

impl Reg {
    /// All registers in DWARF order.
    pub const ALL: [Reg; 17] = [
        Reg::Rax,
        Reg::Rdx,
        Reg::Rcx,
        Reg::Rbx,
        Reg::Rsi,
        Reg::Rdi,
        Reg::Rbp,
        Reg::Rsp,
        Reg::R8,
        Reg::R9,
        Reg::R10,
        Reg::R11,
        Reg::R12,
        Reg::R13,
        Reg::R14,
        Reg::R15,
        Reg::Rip,
    ];
    /// Registers the SysV ABI asks a callee to preserve (rsp aside).
    pub const CALLEE_SAVED: [Reg; 6] = [Reg::Rbx, Reg::Rbp, Reg::R12, Reg::R13, Reg::R14, Reg::R15];

    /// The register with DWARF number `n`.
    pub fn from_dwarf(n: u16) -> Option<Reg> {
        Reg::ALL.get(usize::from(n)).copied()
    }
    /// DWARF register number.
    pub fn dwarf(self) -> u16 {
        self as u16
    }
    /// Lower-case assembler name.
    pub fn name(self) -> &'static str {
        match self {
            Reg::Rax => "rax",
            Reg::Rdx => "rdx",
            Reg::Rcx => "rcx",
            Reg::Rbx => "rbx",
            Reg::Rsi => "rsi",
            Reg::Rdi => "rdi",
            Reg::Rbp => "rbp",
            Reg::Rsp => "rsp",
            Reg::R8 => "r8",
            Reg::R9 => "r9",
            Reg::R10 => "r10",
            Reg::R11 => "r11",
            Reg::R12 => "r12",
            Reg::R13 => "r13",
            Reg::R14 => "r14",
            Reg::R15 => "r15",
            Reg::Rip => "rip",
        }
    }
    /// Whether the SysV ABI makes this register callee-saved.
    pub fn is_callee_saved(self) -> bool {
        Reg::CALLEE_SAVED.contains(&self)
    }
}

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
