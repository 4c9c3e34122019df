//! Call sites: callee identity, stack depth, live callee-saved registers,
//! temporaries in undescribed slots, and the restart address.

use super::codeview::CodeView;
use super::decode::{regs_of, CALLEE_SAVED};
use super::slots::{resolve, Access};
use super::{AnalysisError, Ctx, DYNAMIC_DEPTH};
use iced_x86::{FlowControl, OpKind, Register};
use std::collections::HashMap;
use upstare_dwarf::fdt::{CallSite, Callee};
use upstare_dwarf::model::Program;
use upstare_dwarf::LinkAddr;

/// Who the call at `insn` calls.
pub(crate) fn callee(
    name: &str,
    insn: &super::decode::Insn,
    program: &Program,
    view: &CodeView,
) -> Result<Callee, AnalysisError> {
    let ins = &insn.ins;
    if ins.flow_control() == FlowControl::IndirectCall {
        // `call [rip+GOT slot]` (-fno-plt) is still a call to an import.
        if ins.op0_kind() == OpKind::Memory && ins.is_ip_rel_memory_operand() {
            if let Some(n) = view.got_import_at(LinkAddr(ins.ip_rel_memory_address())) {
                return Ok(Callee::Plt(n.to_string()));
            }
        }
        return Ok(Callee::Indirect);
    }
    let target = LinkAddr(ins.near_branch_target());
    if let Some(n) = view.plt_import_at(target) {
        return Ok(Callee::Plt(n.to_string()));
    }
    if let Some(f) = program.function_at(target).filter(|f| f.low == target) {
        return Ok(Callee::Direct(f.name.clone()));
    }
    if let Some(n) = view.function_name_at(target) {
        return Ok(Callee::Direct(n.to_string()));
    }
    Err(AnalysisError::UnknownCallTarget {
        function: name.to_string(),
        addr: insn.addr,
        target,
    })
}

impl Ctx<'_> {
    /// Every reachable call, in address order.
    pub(crate) fn call_sites(
        &self,
        view: &CodeView,
        notes: &mut Vec<String>,
    ) -> Result<Vec<CallSite>, AnalysisError> {
        let mut out = Vec::new();
        let mut ordinals: HashMap<String, u32> = HashMap::new();
        for (i, insn) in self.insns.iter().enumerate() {
            if !insn.is_call() || self.stack.depth(i).is_none() {
                continue;
            }
            let callee = callee(self.name, insn, self.program, view)?;
            let ord = ordinals.entry(callee.id_name().to_string()).or_insert(0);
            let ordinal = *ord;
            *ord += 1;
            let after = (i + 1 < self.insns.len()).then_some(i + 1);
            let live = after.map_or(0, |a| self.live[a]);
            let live_regs = regs_of(live)
                .into_iter()
                .filter(|r| CALLEE_SAVED.contains(r))
                .collect();
            let stack_depth = self
                .stack
                .depth(i)
                .and_then(|d| d.known())
                .unwrap_or(DYNAMIC_DEPTH);
            let restart = match self.restart(i) {
                Ok(a) => Some(a),
                Err(why) => {
                    notes.push(format!("call at {}: no restart: {why}", insn.addr));
                    None
                }
            };
            let row = super::points::row_at(&self.rows, insn.addr);
            out.push(CallSite {
                call_addr: insn.addr,
                return_addr: insn.next,
                callee,
                ordinal,
                stack_depth,
                live_regs,
                temp_slots: self.temps.temps_across(i, after),
                restart,
                file: row.map_or(0, |r| r.file),
                line: row.map_or(0, |r| r.line),
            });
        }
        Ok(out)
    }

    /// The restart address of call `c`: the start of its statement, if
    /// re-executing from there up to the call only writes registers,
    /// undescribed frame slots and stack arguments.
    fn restart(&self, c: usize) -> Result<LinkAddr, String> {
        let call_addr = self.insns[c].addr;
        let row = self
            .rows
            .iter()
            .rev()
            .find(|r| r.new_line && r.addr <= call_addr)
            .ok_or("no line start before the call")?;
        let r = super::cfg::index_of(&self.insns, row.addr)
            .ok_or("the statement's row is not an instruction start")?;
        if let Some(why) = self.unsafe_reason(r) {
            return Err(format!("statement start {}: {why}", row.addr));
        }
        // Resuming at the restart address uses the body's stack depth.
        if self.stack.depth(r).and_then(|d| d.known()) != Some(self.prologue.body_depth) {
            return Err("stack depth at the statement start is not the body depth".into());
        }
        // The window: instructions on a path from r to c.
        let n = self.insns.len();
        let mut fwd = vec![false; n];
        let mut work = vec![r];
        fwd[r] = true;
        while let Some(x) = work.pop() {
            if x == c {
                continue;
            }
            for s in self.cfg.insn_succs(x) {
                if !fwd[s] {
                    fwd[s] = true;
                    work.push(s);
                }
            }
        }
        if !fwd[c] {
            return Err("the call is not reached from the statement start".into());
        }
        let mut back = vec![false; n];
        let mut work = vec![c];
        back[c] = true;
        while let Some(x) = work.pop() {
            if x == r {
                continue;
            }
            for p in self.cfg.insn_preds(x) {
                if !back[p] {
                    back[p] = true;
                    work.push(p);
                }
            }
        }
        for j in (0..n).filter(|&j| fwd[j] && back[j] && j != c) {
            let insn = &self.insns[j];
            if insn.is_call() {
                return Err(format!("another call at {}", insn.addr));
            }
            if matches!(
                insn.ins.flow_control(),
                FlowControl::Interrupt | FlowControl::Exception | FlowControl::XbeginXabortXend
            ) || insn.ins.has_lock_prefix()
                || insn.ins.op0_kind() == OpKind::Register
                    && matches!(insn.ins.op0_register(), Register::FS | Register::GS)
            {
                return Err(format!("side effect at {}", insn.addr));
            }
            for m in insn.mem.iter().filter(|m| m.write) {
                match resolve(&self.stack, j, m) {
                    Access::Frame { off, size } => {
                        let end = off.saturating_add(i64::from(size));
                        if self.desc.iter().any(|&(lo, hi)| lo < end && off < hi) {
                            return Err(format!("store to a variable at {}", insn.addr));
                        }
                    }
                    Access::Unknown => {
                        return Err(format!("store through a pointer at {}", insn.addr))
                    }
                }
            }
        }
        Ok(row.addr)
    }
}
