//! Linear decoding of one function with iced-x86 and the register, flag and
//! memory effects of every instruction, in the form the data-flow analyses use.

use super::AnalysisError;
use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register, RflagsBits,
};
use upstare_dwarf::{LinkAddr, Reg};

/// A set of general-purpose registers and status flags. Each register has two
/// bits, so that byte-sized accesses are not mistaken for whole-register
/// ones (`mov dl,al; mov [rax+rcx],dl` leaves rdx's upper bytes dead): its
/// low byte (bit `n`, DWARF numbering) and the rest (bit `32+n`). Flags are
/// bits 16..23.
pub(crate) type RegSet = u64;

const FLAG_SHIFT: u32 = 16;
/// The status flags and DF, as iced `RflagsBits` (OF SF ZF AF CF PF DF).
const FLAG_MASK: u32 = RflagsBits::OF
    | RflagsBits::SF
    | RflagsBits::ZF
    | RflagsBits::AF
    | RflagsBits::CF
    | RflagsBits::PF
    | RflagsBits::DF;
/// Every tracked flag.
pub(crate) const FLAGS: RegSet = (FLAG_MASK as RegSet) << FLAG_SHIFT;
/// Every general-purpose register (both parts).
pub(crate) const GPRS: RegSet = 0xffff | (0xffff << 32);
/// Everything liveness tracks.
pub(crate) const TRACKED: RegSet = GPRS | FLAGS;

/// The low byte of one register.
pub(crate) const fn lo(r: Reg) -> RegSet {
    1 << (r as u8)
}
/// Bits 8..64 of one register.
pub(crate) const fn hi(r: Reg) -> RegSet {
    1 << (32 + r as u8)
}
/// The whole register.
pub(crate) const fn bit(r: Reg) -> RegSet {
    lo(r) | hi(r)
}
/// al: what a varargs call reads as the number of vector registers used, so
/// that `mov al,0; call printf` leaves rax's upper bytes dead.
pub(crate) const AL: RegSet = lo(Reg::Rax);

/// Registers a call may clobber (SysV): rax rcx rdx rsi rdi r8-r11, flags.
pub(crate) const CALLER_SAVED: RegSet = bit(Reg::Rax)
    | bit(Reg::Rcx)
    | bit(Reg::Rdx)
    | bit(Reg::Rsi)
    | bit(Reg::Rdi)
    | bit(Reg::R8)
    | bit(Reg::R9)
    | bit(Reg::R10)
    | bit(Reg::R11)
    | FLAGS;
/// Integer argument registers in order.
pub(crate) const ARG_REGS: [Reg; 6] = [Reg::Rdi, Reg::Rsi, Reg::Rdx, Reg::Rcx, Reg::R8, Reg::R9];
/// The integer argument registers of a call.
pub(crate) const CALL_INPUTS: RegSet =
    bit(Reg::Rdi) | bit(Reg::Rsi) | bit(Reg::Rdx) | bit(Reg::Rcx) | bit(Reg::R8) | bit(Reg::R9);
/// The callee-saved registers other than rbp, whose liveness across calls is
/// recorded.
pub(crate) const CALLEE_SAVED: [Reg; 5] = [Reg::Rbx, Reg::R12, Reg::R13, Reg::R14, Reg::R15];
/// Registers whose liveness is never reported: the frame and stack pointers.
pub(crate) const FRAME_REGS: RegSet = bit(Reg::Rsp) | bit(Reg::Rbp);

/// Registers of `set` (either part) in DWARF order.
pub(crate) fn regs_of(set: RegSet) -> Vec<Reg> {
    (0u16..16)
        .filter(|n| set & ((1 << n) | (1 << (32 + n))) != 0)
        .filter_map(Reg::from_dwarf)
        .collect()
}

/// Human-readable list of the registers and flags of `set`.
pub(crate) fn describe(set: RegSet) -> String {
    let mut parts: Vec<String> = regs_of(set)
        .iter()
        .map(|&r| {
            if set & bit(r) == lo(r) {
                format!("{}(low byte)", r.name())
            } else {
                r.name().to_string()
            }
        })
        .collect();
    if set & FLAGS != 0 {
        parts.push("flags".into());
    }
    parts.join(",")
}

/// The 64-bit GPR that `r` is part of, as a DWARF register.
pub(crate) fn gpr(r: Register) -> Option<Reg> {
    Some(match r.full_register() {
        Register::RAX => Reg::Rax,
        Register::RCX => Reg::Rcx,
        Register::RDX => Reg::Rdx,
        Register::RBX => Reg::Rbx,
        Register::RSP => Reg::Rsp,
        Register::RBP => Reg::Rbp,
        Register::RSI => Reg::Rsi,
        Register::RDI => Reg::Rdi,
        Register::R8 => Reg::R8,
        Register::R9 => Reg::R9,
        Register::R10 => Reg::R10,
        Register::R11 => Reg::R11,
        Register::R12 => Reg::R12,
        Register::R13 => Reg::R13,
        Register::R14 => Reg::R14,
        Register::R15 => Reg::R15,
        _ => return None,
    })
}

/// One explicit memory operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MemRef {
    /// Base register; `None` for absolute or rip-relative addresses.
    pub base: Option<Reg>,
    /// Whether an index register is used (the address is then not a fixed
    /// offset from the base).
    pub indexed: bool,
    /// Displacement (for rip-relative operands: the absolute address).
    pub disp: i64,
    /// Access size in bytes (0 when unknown).
    pub size: u32,
    pub read: bool,
    pub write: bool,
}

/// A decoded instruction with its effects.
#[derive(Clone, Debug)]
pub(crate) struct Insn {
    pub ins: Instruction,
    pub addr: LinkAddr,
    /// Address of the next instruction.
    pub next: LinkAddr,
    /// Registers and flags read.
    pub uses: RegSet,
    /// Registers and flags completely overwritten (32/64-bit register writes,
    /// unconditional flag writes).
    pub kills: RegSet,
    /// Registers written in whole or in part (8/16-bit writes included).
    pub writes: RegSet,
    /// Explicit memory operands (implicit stack accesses of push/pop/call
    /// are not listed).
    pub mem: Vec<MemRef>,
}

impl Insn {
    pub fn is_call(&self) -> bool {
        matches!(
            self.ins.flow_control(),
            FlowControl::Call | FlowControl::IndirectCall
        )
    }
    pub fn is_ret(&self) -> bool {
        self.ins.flow_control() == FlowControl::Return
    }
    /// Register operand `i`'s 64-bit register, if operand `i` is a register.
    pub fn reg_op(&self, i: u32) -> Option<Reg> {
        (self.ins.op_kind(i) == OpKind::Register)
            .then(|| gpr(self.ins.op_register(i)))
            .flatten()
    }
    /// Immediate operand `i` as a signed value, if it is an immediate.
    pub fn imm_op(&self, i: u32) -> Option<i64> {
        match self.ins.op_kind(i) {
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => self.ins.try_immediate(i).ok().map(|v| v as i64),
            _ => None,
        }
    }
    /// Whether operand `i` is the full 64-bit register `r`.
    pub fn is_reg64(&self, i: u32, r: Register) -> bool {
        self.ins.op_kind(i) == OpKind::Register && self.ins.op_register(i) == r
    }
}

/// Decodes `code` (the bytes of `[low, low+len)`) of function `name`.
pub(crate) fn decode_function(
    name: &str,
    low: LinkAddr,
    code: &[u8],
) -> Result<Vec<Insn>, AnalysisError> {
    let mut dec = Decoder::with_ip(64, code, low.0, DecoderOptions::NONE);
    let mut factory = InstructionInfoFactory::new();
    let mut out = Vec::new();
    while dec.can_decode() {
        let ins = dec.decode();
        if ins.is_invalid() {
            return Err(AnalysisError::Decode {
                function: name.to_string(),
                addr: LinkAddr(ins.ip()),
            });
        }
        out.push(effects(&mut factory, ins));
    }
    Ok(out)
}

fn effects(factory: &mut InstructionInfoFactory, ins: Instruction) -> Insn {
    let info = factory.info(&ins);
    let mut uses: RegSet = 0;
    let mut kills: RegSet = 0;
    let mut writes: RegSet = 0;
    for ur in info.used_registers() {
        let reg = ur.register();
        let Some(r) = gpr(reg) else {
            continue;
        };
        let high_byte = matches!(
            reg,
            Register::AH | Register::CH | Register::DH | Register::BH
        );
        // The parts an access of this width reads, and those a write of it
        // overwrites completely (32-bit writes zero the upper half).
        let (read_parts, kill_parts) = match reg.size() {
            1 if high_byte => (hi(r), 0),
            1 => (lo(r), lo(r)),
            2 => (bit(r), lo(r)),
            _ => (bit(r), bit(r)),
        };
        match ur.access() {
            OpAccess::Read | OpAccess::CondRead => uses |= read_parts,
            OpAccess::Write => {
                writes |= bit(r);
                kills |= kill_parts;
            }
            OpAccess::CondWrite => writes |= bit(r),
            OpAccess::ReadWrite | OpAccess::ReadCondWrite => {
                uses |= read_parts;
                writes |= bit(r);
            }
            OpAccess::None | OpAccess::NoMemAccess => {}
        }
    }
    // Zeroing idioms (`xor eax,eax`, `sub eax,eax`) do not read their operand.
    if matches!(ins.mnemonic(), Mnemonic::Xor | Mnemonic::Sub)
        && ins.op_count() == 2
        && ins.op0_kind() == OpKind::Register
        && ins.op1_kind() == OpKind::Register
        && ins.op0_register() == ins.op1_register()
    {
        if let Some(r) = gpr(ins.op0_register()) {
            uses &= !bit(r);
            if matches!(ins.op0_register().size(), 4 | 8) {
                kills |= bit(r);
            }
        }
    }
    uses |= RegSet::from(ins.rflags_read() & FLAG_MASK) << FLAG_SHIFT;
    let fw = RegSet::from(ins.rflags_modified() & FLAG_MASK) << FLAG_SHIFT;
    writes |= fw;
    kills |= fw;

    let mut mem = Vec::new();
    for i in 0..ins.op_count() {
        let (read, write) = match info.op_access(i) {
            OpAccess::Read | OpAccess::CondRead => (true, false),
            OpAccess::Write | OpAccess::CondWrite => (false, true),
            OpAccess::ReadWrite | OpAccess::ReadCondWrite => (true, true),
            OpAccess::None | OpAccess::NoMemAccess => (false, false),
        };
        let size = ins.memory_size().size() as u32;
        match ins.op_kind(i) {
            OpKind::Memory => {
                let base_reg = ins.memory_base();
                let (base, disp) = if base_reg == Register::RIP {
                    (None, ins.ip_rel_memory_address() as i64)
                } else {
                    (gpr(base_reg), ins.memory_displacement64() as i64)
                };
                mem.push(MemRef {
                    base,
                    indexed: ins.memory_index() != Register::None,
                    disp,
                    size,
                    read,
                    write,
                });
            }
            // String instructions (`rep stos`, `movs`): through rsi/rdi.
            OpKind::MemorySegSI | OpKind::MemorySegESI | OpKind::MemorySegRSI => mem.push(MemRef {
                base: Some(Reg::Rsi),
                indexed: true,
                disp: 0,
                size,
                read,
                write,
            }),
            OpKind::MemorySegDI
            | OpKind::MemorySegEDI
            | OpKind::MemorySegRDI
            | OpKind::MemoryESDI
            | OpKind::MemoryESEDI
            | OpKind::MemoryESRDI => mem.push(MemRef {
                base: Some(Reg::Rdi),
                indexed: true,
                disp: 0,
                size,
                read,
                write,
            }),
            _ => {}
        }
    }
    Insn {
        addr: LinkAddr(ins.ip()),
        next: LinkAddr(ins.next_ip()),
        ins,
        uses,
        kills,
        writes,
        mem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(bytes: &[u8]) -> Insn {
        let v = decode_function("t", LinkAddr(0x1000), bytes).expect("decodes");
        assert_eq!(v.len(), 1, "exactly one instruction");
        v.into_iter().next().expect("one")
    }

    #[test]
    fn register_effects() {
        // mov eax, [rbp-4]: reads rbp (frame), kills rax.
        let i = one(&[0x8b, 0x45, 0xfc]);
        assert_eq!(i.kills & GPRS, bit(Reg::Rax));
        assert_eq!(i.uses, bit(Reg::Rbp));
        assert_eq!(i.mem.len(), 1);
        assert_eq!(i.mem[0].base, Some(Reg::Rbp));
        assert_eq!(i.mem[0].disp, -4);
        assert!(i.mem[0].read && !i.mem[0].write);
        // mov al, 1: kills only the low byte.
        let i = one(&[0xb0, 0x01]);
        assert_eq!(i.kills & GPRS, lo(Reg::Rax));
        assert_eq!(i.writes & GPRS, bit(Reg::Rax));
        // mov dl, al: reads the low byte of rax, kills that of rdx.
        let i = one(&[0x88, 0xc2]);
        assert_eq!(i.uses & GPRS, lo(Reg::Rax));
        assert_eq!(i.kills & GPRS, lo(Reg::Rdx));
        // mov ah, 1: kills nothing; mov ax, 1: the low byte only.
        assert_eq!(one(&[0xb4, 0x01]).kills & GPRS, 0);
        assert_eq!(one(&[0x66, 0xb8, 0x01, 0x00]).kills & GPRS, lo(Reg::Rax));
        // xor eax, eax: zeroing idiom, no read.
        let i = one(&[0x31, 0xc0]);
        assert_eq!(i.uses & GPRS, 0);
        assert_eq!(i.kills & GPRS, bit(Reg::Rax));
        assert_ne!(i.kills & FLAGS, 0);
        // cmp eax, 9 then ja: flags written, then read.
        let i = one(&[0x83, 0xf8, 0x09]);
        assert_eq!(i.uses & GPRS, bit(Reg::Rax));
        assert_eq!(
            i.kills & FLAGS,
            FLAGS & !((RflagsBits::DF as u64) << FLAG_SHIFT)
        );
        let i = one(&[0x77, 0x10]);
        assert_ne!(i.uses & FLAGS, 0);
        // cdqe reads eax and writes rax.
        let i = one(&[0x48, 0x98]);
        assert_eq!(i.uses & GPRS, bit(Reg::Rax));
        assert_eq!(i.kills & GPRS, bit(Reg::Rax));
        // rep stosq: implicit memory write through rdi.
        let i = one(&[0xf3, 0x48, 0xab]);
        assert!(i.mem.iter().any(|m| m.write && m.base == Some(Reg::Rdi)));
        // push rbx: no explicit memory operand.
        let i = one(&[0x53]);
        assert!(i.mem.is_empty());
        assert_ne!(i.uses & bit(Reg::Rbx), 0);
    }

    #[test]
    fn invalid_bytes_are_an_error_naming_the_address() {
        // nop; then a lone 0x0f 0x0b is ud2 (valid); 0x06 is invalid in 64-bit mode.
        let err = decode_function("f", LinkAddr(0x2000), &[0x90, 0x06]).unwrap_err();
        assert_eq!(
            err.to_string(),
            AnalysisError::Decode {
                function: "f".into(),
                addr: LinkAddr(0x2001)
            }
            .to_string()
        );
        // Truncated instruction at the end.
        assert!(decode_function("f", LinkAddr(0), &[0x8b, 0x45]).is_err());
    }
}
