//! Call-frame information (`.eh_frame`) evaluation.
//!
//! One implementation serves two users: the reader (where each function's
//! prologue saved the callee-saved registers) and the runtime (unwinding
//! through library frames, which have no frame pointer: libc is -O2).
//!
//! The index is built from the FDEs themselves rather than from the
//! `.eh_frame_hdr` search table, so that a missing or inconsistent header
//! cannot mislead a lookup, and so that every FDE is parsed (and a corrupt
//! section refused) up front.

use crate::addr::{LinkAddr, Reg};
use gimli::{BaseAddresses, EhFrame, LittleEndian, UnwindContext, UnwindSection};
use object::{Object, ObjectSection};
use thiserror::Error;

/// Upper bound on the FDEs of one object, far above glibc's (~3,000).
const MAX_FDES: usize = 1 << 22;

/// Errors of building or querying an [`EhFrameIndex`].
#[derive(Debug, Error)]
pub enum CfiError {
    /// The bytes are not an ELF file `object` can parse.
    #[error("not a readable ELF file: {0}")]
    Elf(String),
    /// The ELF file has no `.eh_frame` section.
    #[error("no .eh_frame section (built with -fno-asynchronous-unwind-tables?)")]
    NoEhFrame,
    /// A section could not be read (compressed beyond the cap, out of bounds).
    #[error("cannot read section {section}: {reason}")]
    Section {
        section: &'static str,
        reason: String,
    },
    /// The `.eh_frame` section does not parse.
    #[error("corrupt .eh_frame: {0}")]
    Corrupt(gimli::Error),
    /// One FDE (at this section offset) does not parse.
    #[error("corrupt .eh_frame: FDE at section offset {offset:#x}: {err}")]
    CorruptFde { offset: u64, err: gimli::Error },
    /// More FDEs than the cap (4M, far above glibc's few thousand).
    #[error("too many FDEs in .eh_frame (more than {0})")]
    TooManyFdes(usize),
    /// Evaluating the CFI program of the FDE covering `pc` failed.
    #[error("corrupt .eh_frame: cannot evaluate the CFI row for pc {pc}: {err}")]
    Eval { pc: LinkAddr, err: gimli::Error },
    /// The CFA is defined relative to a register that is not a general
    /// purpose register.
    #[error(".eh_frame: CFA at pc {pc} is based on DWARF register {reg}, not a general purpose register")]
    BadCfaRegister { pc: LinkAddr, reg: u16 },
    /// A register rule x86-64 compilers never emit (architectural, constant).
    #[error(".eh_frame: unsupported rule {rule} for DWARF register {reg} at pc {pc}")]
    UnsupportedRule {
        pc: LinkAddr,
        reg: u16,
        rule: &'static str,
    },
}

/// How to compute the canonical frame address (the caller's rsp before the
/// `call`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CfaRule {
    /// CFA = register + offset.
    RegOffset(Reg, i64),
    /// CFA = value of this DWARF expression (raw bytes), e.g. DRAP frames
    /// (`DW_OP_breg6 -8; DW_OP_deref`) or glibc's `__restore_rt`.
    Expression(Vec<u8>),
}

/// How to recover a register of the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegRule {
    /// Not recoverable.
    Undefined,
    /// Unchanged by this frame.
    SameValue,
    /// Saved in memory at CFA + n.
    Offset(i64),
    /// The value is CFA + n.
    ValOffset(i64),
    /// The value is in another register.
    Register(Reg),
    /// Saved at the address computed by this DWARF expression (raw bytes).
    Expression(Vec<u8>),
    /// The value is computed by this DWARF expression (raw bytes).
    ValExpression(Vec<u8>),
}

/// The unwind rules in force at one pc. Registers that do not appear in
/// `regs` keep their value (the usual x86-64 convention for callee-saved
/// registers); the return address is the rule of [`Reg::Rip`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnwindRow {
    /// How to compute the CFA at this pc.
    pub cfa: CfaRule,
    /// Rules for general purpose registers and rip, sorted by register.
    /// Rules for other registers (xmm, flags) are omitted.
    pub regs: Vec<(Reg, RegRule)>,
    /// The FDE's CIE has the `S` augmentation: the frame is a signal
    /// trampoline (`__restore_rt`), its pc is not a return address.
    pub is_signal_frame: bool,
}

impl UnwindRow {
    /// The rule of `reg`, if the row mentions it.
    pub fn rule(&self, reg: Reg) -> Option<&RegRule> {
        self.regs
            .iter()
            .find(|(r, _)| *r == reg)
            .map(|(_, rule)| rule)
    }
}

#[derive(Clone, Copy, Debug)]
struct FdeEntry {
    start: u64,
    end: u64,
    offset: usize,
}

/// An index of the FDEs of one ELF object's `.eh_frame`, answering "which
/// unwind rules apply at this link-time pc". Owns a copy of the section so
/// it can outlive the file bytes.
#[derive(Clone, Debug)]
pub struct EhFrameIndex {
    eh_frame: Vec<u8>,
    bases: BaseAddresses,
    /// Sorted by `start`, non-empty ranges only.
    fdes: Vec<FdeEntry>,
}

fn section_bytes<'a>(
    file: &object::File<'a>,
    name: &'static str,
) -> Result<Option<(u64, &'a [u8])>, CfiError> {
    let Some(sec) = file.section_by_name(name) else {
        return Ok(None);
    };
    // .eh_frame is never compressed (it is loaded); refuse rather than
    // inflate untrusted data here.
    let data = sec.data().map_err(|e| CfiError::Section {
        section: name,
        reason: e.to_string(),
    })?;
    Ok(Some((sec.address(), data)))
}

impl EhFrameIndex {
    /// Builds the index from the bytes of an ELF file.
    pub fn from_elf(elf: &[u8]) -> Result<EhFrameIndex, CfiError> {
        let file = object::File::parse(elf).map_err(|e| CfiError::Elf(e.to_string()))?;
        EhFrameIndex::from_object(&file)
    }

    /// Builds the index from an already parsed object file.
    pub fn from_object(file: &object::File<'_>) -> Result<EhFrameIndex, CfiError> {
        let (eh_addr, eh_data) = section_bytes(file, ".eh_frame")?.ok_or(CfiError::NoEhFrame)?;
        // Only the addresses of these matter (bases of relative pointer
        // encodings), not their contents.
        let addr_of = |name| file.section_by_name(name).map(|s| s.address());
        let mut bases = BaseAddresses::default().set_eh_frame(eh_addr);
        if let Some(addr) = addr_of(".eh_frame_hdr") {
            bases = bases.set_eh_frame_hdr(addr);
        }
        if let Some(addr) = addr_of(".text") {
            bases = bases.set_text(addr);
        }
        if let Some(addr) = addr_of(".got") {
            bases = bases.set_got(addr);
        }
        EhFrameIndex::new(eh_data, bases)
    }

    fn new(eh_data: &[u8], bases: BaseAddresses) -> Result<EhFrameIndex, CfiError> {
        let section = EhFrame::new(eh_data, LittleEndian);
        let mut fdes = Vec::new();
        let mut entries = section.entries(&bases);
        // Bounded: every entry consumes at least 4 bytes of the section.
        while let Some(entry) = entries.next().map_err(CfiError::Corrupt)? {
            if let gimli::CieOrFde::Fde(partial) = entry {
                let fde = partial.parse(EhFrame::cie_from_offset).map_err(|err| {
                    CfiError::CorruptFde {
                        offset: partial.offset() as u64,
                        err,
                    }
                })?;
                let start = fde.initial_address();
                let end = start.saturating_add(fde.len());
                if end > start {
                    if fdes.len() >= MAX_FDES {
                        return Err(CfiError::TooManyFdes(MAX_FDES));
                    }
                    fdes.push(FdeEntry {
                        start,
                        end,
                        offset: fde.offset(),
                    });
                }
            }
        }
        fdes.sort_by_key(|f| (f.start, f.end));
        Ok(EhFrameIndex {
            eh_frame: eh_data.to_vec(),
            bases,
            fdes,
        })
    }

    /// Number of FDEs (functions with CFI).
    pub fn len(&self) -> usize {
        self.fdes.len()
    }

    /// Whether the section describes no code at all.
    pub fn is_empty(&self) -> bool {
        self.fdes.is_empty()
    }

    /// The address range `[start, end)` of the FDE covering `pc`.
    pub fn fde_range(&self, pc: LinkAddr) -> Option<(LinkAddr, LinkAddr)> {
        self.find(pc.0)
            .map(|f| (LinkAddr(f.start), LinkAddr(f.end)))
    }

    fn find(&self, pc: u64) -> Option<FdeEntry> {
        let i = self.fdes.partition_point(|f| f.start <= pc);
        let f = *self.fdes.get(i.checked_sub(1)?)?;
        (pc < f.end).then_some(f)
    }

    /// The unwind rules at link-time address `pc`; `None` when no FDE covers
    /// it (PLT stubs without CFI, data, other objects).
    pub fn unwind_row(&self, pc: LinkAddr) -> Result<Option<UnwindRow>, CfiError> {
        let Some(entry) = self.find(pc.0) else {
            return Ok(None);
        };
        let section = EhFrame::new(&self.eh_frame, LittleEndian);
        let eval = |err| CfiError::Eval { pc, err };
        let fde = section
            .fde_from_offset(
                &self.bases,
                gimli::EhFrameOffset(entry.offset),
                EhFrame::cie_from_offset,
            )
            .map_err(eval)?;
        let mut ctx = Box::new(UnwindContext::new());
        let row = fde
            .unwind_info_for_address(&section, &self.bases, &mut ctx, pc.0)
            .map_err(eval)?;
        let expr_bytes = |e: &gimli::UnwindExpression<usize>| -> Result<Vec<u8>, CfiError> {
            Ok(e.get(&section).map_err(eval)?.0.slice().to_vec())
        };
        let cfa = match row.cfa() {
            gimli::CfaRule::RegisterAndOffset { register, offset } => {
                let reg = Reg::from_dwarf(register.0).ok_or(CfiError::BadCfaRegister {
                    pc,
                    reg: register.0,
                })?;
                CfaRule::RegOffset(reg, *offset)
            }
            gimli::CfaRule::Expression(e) => CfaRule::Expression(expr_bytes(e)?),
        };
        let mut regs = Vec::new();
        for (register, rule) in row.registers() {
            // xmm and other non-GPR columns are of no use to a GPR unwinder.
            let Some(reg) = Reg::from_dwarf(register.0) else {
                continue;
            };
            let unsupported = |rule| CfiError::UnsupportedRule {
                pc,
                reg: register.0,
                rule,
            };
            let r = match rule {
                gimli::RegisterRule::Undefined => RegRule::Undefined,
                gimli::RegisterRule::SameValue => RegRule::SameValue,
                gimli::RegisterRule::Offset(n) => RegRule::Offset(*n),
                gimli::RegisterRule::ValOffset(n) => RegRule::ValOffset(*n),
                gimli::RegisterRule::Register(other) => {
                    RegRule::Register(Reg::from_dwarf(other.0).ok_or(unsupported("register"))?)
                }
                gimli::RegisterRule::Expression(e) => RegRule::Expression(expr_bytes(e)?),
                gimli::RegisterRule::ValExpression(e) => RegRule::ValExpression(expr_bytes(e)?),
                gimli::RegisterRule::Architectural => return Err(unsupported("architectural")),
                gimli::RegisterRule::Constant(_) => return Err(unsupported("constant")),
            };
            regs.push((reg, r));
        }
        regs.sort_by_key(|(r, _)| *r);
        Ok(Some(UnwindRow {
            cfa,
            regs,
            is_signal_frame: fde.is_signal_trampoline(),
        }))
    }
}
