//! Callees that can be called again without anyone noticing: a statement
//! blocked in a system call can be re-executed from its start when the
//! calls before the blocking one only compute values (sshd's
//! `ret = ppoll(fds, n, ptimeout_get_tsp(&timeout), sigmask)`).

use super::codeview::CodeView;
use super::decode::{decode_function, Insn};
use super::frame;
use iced_x86::{FlowControl, OpKind, Register};
use upstare_dwarf::model::Program;
use upstare_dwarf::{LinkAddr, Reg};

/// Callees larger than this are not examined (a value-computing helper is
/// small; the bound keeps the check cheap on every call site).
const MAX_PURE_BYTES: u64 = 2048;

/// Whether the direct call at `insn` calls a function of this binary that
/// has no effect but on registers and its own frame: a `-O0` leaf with a
/// frame-pointer prologue that makes no call, no system call, no locked or
/// string instruction, no indirect jump, and stores only at negative
/// offsets from its frame pointer. Calling it again from the same memory
/// computes the same value and changes nothing.
pub(crate) fn calls_pure_leaf(insn: &Insn, program: &Program, view: &CodeView) -> bool {
    if insn.ins.flow_control() != FlowControl::Call {
        return false;
    }
    let target = LinkAddr(insn.ins.near_branch_target());
    let Some(f) = program.function_at(target).filter(|f| f.low == target) else {
        return false;
    };
    if f.high.offset_from(f.low).is_none_or(|n| n > MAX_PURE_BYTES) {
        return false;
    }
    let Some(code) = view.code(f.low, f.high) else {
        return false;
    };
    let Ok(insns) = decode_function(&f.name, f.low, code) else {
        return false;
    };
    // rbp is the frame pointer from the prologue on and never moves in the
    // body: `[rbp - k]` is the callee's own frame.
    if frame::check(&f.name, &insns).is_err() {
        return false;
    }
    insns.iter().all(only_own_frame)
}

/// One instruction of a candidate pure leaf: nothing outside registers and
/// the frame below the saved rbp.
fn only_own_frame(i: &Insn) -> bool {
    let ins = &i.ins;
    let flow_ok = matches!(
        ins.flow_control(),
        FlowControl::Next
            | FlowControl::UnconditionalBranch
            | FlowControl::ConditionalBranch
            | FlowControl::Return
    );
    let string_op = (0..ins.op_count()).any(|k| {
        matches!(
            ins.op_kind(k),
            OpKind::MemorySegSI
                | OpKind::MemorySegESI
                | OpKind::MemorySegRSI
                | OpKind::MemorySegDI
                | OpKind::MemorySegEDI
                | OpKind::MemorySegRDI
                | OpKind::MemoryESDI
                | OpKind::MemoryESEDI
                | OpKind::MemoryESRDI
        )
    });
    let segment_write = ins.op0_kind() == OpKind::Register
        && matches!(ins.op0_register(), Register::FS | Register::GS);
    let stores_ok = i
        .mem
        .iter()
        .filter(|m| m.write)
        .all(|m| m.base == Some(Reg::Rbp) && !m.indexed && m.disp < 0);
    flow_ok && !string_op && !segment_write && !ins.has_lock_prefix() && stores_ok
}
