//! Stack depth (rsp relative to the CFA) at every instruction, by abstract
//! interpretation over the CFG.
//!
//! The abstract state tracks the depth, and which registers and 8-byte frame
//! slots hold a stack address `CFA + k` (rbp after `mov rbp,rsp`, the saved
//! stack pointer of a VLA scope in rbx or in clang's `[rbp-0x10]`). Dynamic
//! allocations (`sub rsp,rax` for VLAs and alloca) make the depth
//! [`Depth::Dynamic`] until rsp is restored from a tracked value or by
//! `leave`/`lea rsp,[rbp-N]`.

use super::cfg::Cfg;
use super::decode::{gpr, Insn};
use super::dom::Dominators;
use super::AnalysisError;
use iced_x86::{Mnemonic, OpKind, Register};
use std::collections::BTreeMap;
use upstare_dwarf::{CfaOffset, Reg};

/// rsp relative to the CFA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Depth {
    Known(i64),
    /// Depends on a run-time amount (VLA, alloca).
    Dynamic,
}

impl Depth {
    pub fn known(self) -> Option<CfaOffset> {
        match self {
            Depth::Known(d) => Some(CfaOffset(d)),
            Depth::Dynamic => None,
        }
    }
}

/// The state before one instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct State {
    pub depth: Depth,
    /// `regs[r] = Some(k)`: register `r` (DWARF number) holds `CFA + k`.
    regs: [Option<i64>; 16],
    /// Frame slots (by CFA offset) holding `CFA + k`.
    slots: BTreeMap<i64, i64>,
}

impl State {
    fn entry() -> State {
        // The call pushed the return address: rsp = CFA - 8.
        State {
            depth: Depth::Known(-8),
            regs: [None; 16],
            slots: BTreeMap::new(),
        }
    }
    /// The value of rbp as a CFA offset, if it is a known stack address.
    pub fn rbp(&self) -> Option<i64> {
        self.regs[Reg::Rbp as usize]
    }
    fn reg(&self, r: Reg) -> Option<i64> {
        if r == Reg::Rsp {
            match self.depth {
                Depth::Known(d) => Some(d),
                Depth::Dynamic => None,
            }
        } else {
            self.regs.get(r as usize).copied().flatten()
        }
    }
    fn set(&mut self, r: Reg, v: Option<i64>) {
        if r == Reg::Rsp {
            self.depth = v.map_or(Depth::Dynamic, Depth::Known);
        } else if let Some(slot) = self.regs.get_mut(r as usize) {
            *slot = v;
        }
    }
    /// CFA offset of a `[base+disp]` operand without index, if the base is a
    /// known stack address.
    pub fn cfa_of(&self, base: Option<Reg>, disp: i64) -> Option<i64> {
        self.reg(base?)?.checked_add(disp)
    }
}

/// Result: the state before every instruction (`None`: unreachable).
pub(crate) struct StackInfo {
    pub before: Vec<Option<State>>,
}

impl StackInfo {
    pub fn depth(&self, i: usize) -> Option<Depth> {
        self.before.get(i)?.as_ref().map(|s| s.depth)
    }
}

fn join(name: &str, at: &Insn, old: &State, new: &State) -> Result<State, AnalysisError> {
    let depth = match (old.depth, new.depth) {
        (Depth::Known(a), Depth::Known(b)) if a != b => {
            return Err(AnalysisError::StackConflict {
                function: name.to_string(),
                addr: at.addr,
                a: CfaOffset(a),
                b: CfaOffset(b),
            })
        }
        (Depth::Known(a), Depth::Known(_)) => Depth::Known(a),
        _ => Depth::Dynamic,
    };
    let mut regs = [None; 16];
    for (i, r) in regs.iter_mut().enumerate() {
        if old.regs[i] == new.regs[i] {
            *r = old.regs[i];
        }
    }
    let slots = old
        .slots
        .iter()
        .filter(|(k, v)| new.slots.get(k) == Some(v))
        .map(|(k, v)| (*k, *v))
        .collect();
    Ok(State { depth, regs, slots })
}

/// Applies one instruction to the state.
pub(crate) fn step(insn: &Insn, st: &mut State) {
    let ins = &insn.ins;
    let m = ins.mnemonic();
    let old = st.clone();
    let op0_reg = insn.reg_op(0);
    let op0_is_r64 = ins.op0_kind() == OpKind::Register && ins.op0_register().size() == 8;

    // Memory writes first: a store of a tracked stack address into a frame
    // slot is remembered, any other store to the slot forgets it.
    for m_ref in insn.mem.iter().filter(|m| m.write) {
        if m_ref.indexed {
            continue;
        }
        let Some(off) = old.cfa_of(m_ref.base, m_ref.disp) else {
            continue;
        };
        let size = i64::from(m_ref.size.max(1));
        st.slots
            .retain(|&k, _| k.saturating_add(8) <= off || off.saturating_add(size) <= k);
        if m == Mnemonic::Mov && size == 8 && ins.op1_kind() == OpKind::Register {
            if let Some(v) = gpr(ins.op1_register()).and_then(|r| old.reg(r)) {
                st.slots.insert(off, v);
            }
        }
    }

    if insn.is_call() {
        for r in [
            Reg::Rax,
            Reg::Rcx,
            Reg::Rdx,
            Reg::Rsi,
            Reg::Rdi,
            Reg::R8,
            Reg::R9,
            Reg::R10,
            Reg::R11,
        ] {
            st.set(r, None);
        }
        return;
    }
    match m {
        Mnemonic::Leave => {
            // mov rsp,rbp; pop rbp
            st.depth = old
                .rbp()
                .and_then(|b| b.checked_add(8))
                .map_or(Depth::Dynamic, Depth::Known);
            st.set(Reg::Rbp, None);
            return;
        }
        Mnemonic::Push | Mnemonic::Pop | Mnemonic::Pushfq | Mnemonic::Popfq => {
            let inc = i64::from(ins.stack_pointer_increment());
            st.depth = match old.depth {
                Depth::Known(d) => d.checked_add(inc).map_or(Depth::Dynamic, Depth::Known),
                Depth::Dynamic => Depth::Dynamic,
            };
            if m == Mnemonic::Push {
                if let Depth::Known(d) = st.depth {
                    st.slots
                        .retain(|&k, _| k.saturating_add(8) <= d || d.saturating_add(8) <= k);
                    if let Some(v) = op0_reg.and_then(|r| old.reg(r)) {
                        st.slots.insert(d, v);
                    }
                }
            }
            if m == Mnemonic::Pop {
                if let Some(r) = op0_reg {
                    // The popped value: a tracked slot at the old rsp.
                    let v = old.reg(Reg::Rsp).and_then(|d| old.slots.get(&d).copied());
                    st.set(r, v);
                }
            }
            return;
        }
        _ => {}
    }
    // Writes to registers.
    let value: Option<i64> = match (m, op0_reg) {
        (Mnemonic::Mov, Some(_)) if op0_is_r64 => match ins.op1_kind() {
            OpKind::Register => gpr(ins.op1_register()).and_then(|r| old.reg(r)),
            OpKind::Memory if !insn.mem.is_empty() && !insn.mem[0].indexed => old
                .cfa_of(insn.mem[0].base, insn.mem[0].disp)
                .and_then(|off| old.slots.get(&off).copied()),
            _ => None,
        },
        (Mnemonic::Lea, Some(_)) if op0_is_r64 && ins.memory_index() == Register::None => {
            gpr(ins.memory_base())
                .and_then(|b| old.reg(b))
                .and_then(|v| v.checked_add(ins.memory_displacement64() as i64))
        }
        (Mnemonic::Add | Mnemonic::Sub, Some(r)) if op0_is_r64 => {
            match (old.reg(r), insn.imm_op(1)) {
                (Some(v), Some(k)) => {
                    if m == Mnemonic::Add {
                        v.checked_add(k)
                    } else {
                        v.checked_sub(k)
                    }
                }
                _ => None,
            }
        }
        _ => None,
    };
    for r in super::decode::regs_of(insn.writes) {
        st.set(r, None);
    }
    if let Some(r) = op0_reg {
        if insn.writes & super::decode::bit(r) != 0 {
            st.set(r, value);
        }
    }
}

/// Runs the analysis to a fixpoint.
pub(crate) fn analyze(
    name: &str,
    insns: &[Insn],
    cfg: &Cfg,
    dom: &Dominators,
) -> Result<StackInfo, AnalysisError> {
    let nb = cfg.blocks.len();
    let mut block_in: Vec<Option<State>> = vec![None; nb];
    block_in[0] = Some(State::entry());
    let mut work: Vec<usize> = dom.rpo.iter().rev().copied().collect();
    let mut queued = vec![false; nb];
    for &b in &work {
        queued[b] = true;
    }
    // The lattice has finite height (depth: known -> dynamic; register and
    // slot facts only disappear), so this terminates; the cap guards bugs.
    let cap = nb.saturating_mul(64).saturating_add(64);
    let mut steps = 0usize;
    while let Some(b) = work.pop() {
        queued[b] = false;
        steps += 1;
        if steps > cap {
            return Err(AnalysisError::TooComplex {
                function: name.to_string(),
                what: "stack depth analysis does not converge".into(),
            });
        }
        let Some(mut st) = block_in[b].clone() else {
            continue;
        };
        let blk = &cfg.blocks[b];
        for insn in &insns[blk.first..blk.end] {
            step(insn, &mut st);
        }
        for &s in &blk.succs {
            let at = &insns[cfg.blocks[s].first];
            let merged = match &block_in[s] {
                None => st.clone(),
                Some(old) => join(name, at, old, &st)?,
            };
            if block_in[s].as_ref() != Some(&merged) {
                block_in[s] = Some(merged);
                if !queued[s] {
                    queued[s] = true;
                    work.push(s);
                }
            }
        }
    }
    let mut before: Vec<Option<State>> = vec![None; insns.len()];
    for (b, blk) in cfg.blocks.iter().enumerate() {
        let Some(mut st) = block_in[b].clone() else {
            continue;
        };
        for (i, insn) in insns.iter().enumerate().take(blk.end).skip(blk.first) {
            before[i] = Some(st.clone());
            step(insn, &mut st);
        }
    }
    Ok(StackInfo { before })
}
