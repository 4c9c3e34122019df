//! The frame contract: a frame-pointer prologue, no stack realignment, rbp
//! fixed in the body.

use super::decode::Insn;
use super::AnalysisError;
use iced_x86::{Mnemonic, OpKind, Register};
use upstare_dwarf::{CfaOffset, LinkAddr};

/// What the prologue does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Prologue {
    /// Index of the instruction after `mov rbp,rsp`.
    pub after_frame: usize,
    /// Index of the first instruction after the callee-saved pushes and the
    /// `sub rsp,N`.
    pub end: usize,
    /// rsp relative to the CFA at `end`.
    pub body_depth: CfaOffset,
}

fn is_callee_saved_push(i: &Insn) -> bool {
    i.ins.mnemonic() == Mnemonic::Push
        && i.ins.op0_kind() == OpKind::Register
        && matches!(
            i.ins.op0_register(),
            Register::RBX | Register::R12 | Register::R13 | Register::R14 | Register::R15
        )
}

/// Checks the code shape and finds the prologue.
pub(crate) fn check(name: &str, insns: &[Insn]) -> Result<Prologue, AnalysisError> {
    let err_at = |addr: LinkAddr| AnalysisError::NoFramePointer {
        function: name.to_string(),
        addr,
    };
    let realigned = |i: &Insn, what: &str| AnalysisError::Realigned {
        function: name.to_string(),
        addr: i.addr,
        what: what.to_string(),
    };
    // Stack realignment anywhere: `and rsp,-N`; DRAP: `lea r10,[rsp+8]`
    // before the frame is set up.
    for i in insns {
        if i.ins.mnemonic() == Mnemonic::And && i.is_reg64(0, Register::RSP) {
            return Err(realigned(i, "and rsp"));
        }
    }
    let mut k = 0;
    if insns
        .first()
        .is_some_and(|i| i.ins.mnemonic() == Mnemonic::Endbr64)
    {
        k = 1;
    }
    let Some(first) = insns.get(k) else {
        return Err(err_at(insns.last().map_or(LinkAddr(0), |i| i.next)));
    };
    if first.ins.mnemonic() == Mnemonic::Lea
        && first.ins.memory_base() == Register::RSP
        && first.ins.op0_kind() == OpKind::Register
    {
        return Err(realigned(first, "dynamic realignment (DRAP)"));
    }
    if !(first.ins.mnemonic() == Mnemonic::Push && first.is_reg64(0, Register::RBP)) {
        return Err(err_at(first.addr));
    }
    let Some(second) = insns.get(k + 1) else {
        return Err(err_at(first.next));
    };
    if !(second.ins.mnemonic() == Mnemonic::Mov
        && second.is_reg64(0, Register::RBP)
        && second.is_reg64(1, Register::RSP))
    {
        return Err(err_at(second.addr));
    }
    let after_frame = k + 2;
    let mut end = after_frame;
    let mut depth: i64 = -16;
    while insns.get(end).is_some_and(is_callee_saved_push) {
        depth -= 8;
        end += 1;
    }
    if let Some(i) = insns.get(end) {
        // `sub rsp,N`; gcc writes a 128-byte frame as `add rsp,-128`, whose
        // immediate fits in one byte where +128 does not.
        let frame_size = match i.ins.mnemonic() {
            Mnemonic::Sub if i.is_reg64(0, Register::RSP) => i.imm_op(1),
            Mnemonic::Add if i.is_reg64(0, Register::RSP) => {
                i.imm_op(1).filter(|n| *n < 0).and_then(i64::checked_neg)
            }
            _ => None,
        };
        if let Some(n) = frame_size {
            depth = depth.checked_sub(n).ok_or_else(|| err_at(i.addr))?;
            end += 1;
        }
    }
    // rbp must stay the frame pointer: written only by the prologue's mov
    // and by the epilogue (`pop rbp`, `leave`).
    for (idx, i) in insns.iter().enumerate() {
        if idx == k + 1 || i.writes & super::decode::bit(upstare_dwarf::Reg::Rbp) == 0 {
            continue;
        }
        let epilogue = matches!(i.ins.mnemonic(), Mnemonic::Leave)
            || (i.ins.mnemonic() == Mnemonic::Pop && i.is_reg64(0, Register::RBP));
        if !epilogue {
            return Err(AnalysisError::OptimizedCode {
                function: name.to_string(),
                addr: i.addr,
                what: "rbp is written in the body".into(),
            });
        }
    }
    Ok(Prologue {
        after_frame,
        end,
        body_depth: CfaOffset(depth),
    })
}
