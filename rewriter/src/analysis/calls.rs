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

/// Library functions that never return. Imports are known by name: clang
/// describes no declaration of them, and gcc only those it saw declared
/// `noreturn`.
pub const NORETURN_IMPORTS: &[&str] = &[
    "exit",
    "_exit",
    "_Exit",
    "quick_exit",
    "abort",
    "__assert_fail",
    "__assert_perror_fail",
    "__assert",
    "longjmp",
    "_longjmp",
    "siglongjmp",
    "__longjmp_chk",
    "pthread_exit",
    "thrd_exit",
    "__stack_chk_fail",
    "__chk_fail",
    "__fortify_fail",
    "err",
    "errx",
    "verr",
    "verrx",
];

/// Whether the call at `insn` never returns: its callee is defined here and
/// declared `noreturn` in DWARF, or is an import declared so or known to
/// the C library as such. An indirect call through a function pointer is
/// assumed to return.
pub(crate) fn never_returns(
    insn: &super::decode::Insn,
    program: &Program,
    view: &CodeView,
) -> bool {
    let ins = &insn.ins;
    let import = |n: &str| {
        NORETURN_IMPORTS.contains(&n) || program.noreturn_declarations.iter().any(|d| d == n)
    };
    if ins.flow_control() == FlowControl::IndirectCall {
        return ins.op0_kind() == OpKind::Memory
            && ins.is_ip_rel_memory_operand()
            && view
                .got_import_at(LinkAddr(ins.ip_rel_memory_address()))
                .is_some_and(import);
    }
    if ins.flow_control() != FlowControl::Call {
        return false;
    }
    let target = LinkAddr(ins.near_branch_target());
    if let Some(n) = view.plt_import_at(target) {
        return import(n);
    }
    if program.function_at(target).is_some_and(|f| f.low == target) {
        return program.noreturn_functions.binary_search(&target).is_ok();
    }
    // A function without DWARF (a statically linked library's).
    view.function_name_at(target).is_some_and(import)
}

/// How many line starts before a call are tried as its restart address.
const MAX_RESTART_ROWS: usize = 8;

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
            let restart = match self.restart(i, view) {
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
    /// undescribed frame slots and stack arguments, and calls nothing but
    /// pure leaves of this binary (`ppoll(fds, n, get_tsp(&t), mask)`).
    ///
    /// A statement written over several lines has line starts in the middle
    /// of its evaluation (clang: `n = read(fd,\n buf, ...)` has a row of the
    /// second line between the arguments, with registers live): the nearest
    /// line start that passes every check is taken, going back at most
    /// [`MAX_RESTART_ROWS`] rows and never past another call.
    fn restart(&self, c: usize, view: &CodeView) -> Result<LinkAddr, String> {
        let call_addr = self.insns[c].addr;
        let mut first_err: Option<String> = None;
        for row in self
            .rows
            .iter()
            .rev()
            .filter(|r| r.new_line && r.addr <= call_addr)
            .take(MAX_RESTART_ROWS)
        {
            match self.restart_from(c, row, view) {
                Ok(a) => return Ok(a),
                Err((why, go_on)) => {
                    let stop = !go_on;
                    first_err.get_or_insert(why);
                    if stop {
                        break;
                    }
                }
            }
        }
        Err(first_err.unwrap_or_else(|| "no line start before the call".into()))
    }

    /// [`Ctx::restart`] from the line-table row `row`; the error says why
    /// and whether an earlier row may still do.
    fn restart_from(
        &self,
        c: usize,
        row: &super::points::Row,
        view: &CodeView,
    ) -> Result<LinkAddr, (String, bool)> {
        let r = super::cfg::index_of(&self.insns, row.addr).ok_or((
            "the statement's row is not an instruction start".to_string(),
            true,
        ))?;
        // Every way to the call passes the restart address (within one
        // block, the row comes first: it is at or before the call).
        let (rb, cb) = (self.cfg.block_of[r], self.cfg.block_of[c]);
        if rb != cb && !self.dom.dominates(rb, cb) {
            return Err((
                format!("statement start {} does not dominate the call", row.addr),
                true,
            ));
        }
        if let Some(why) = self.unsafe_reason(r) {
            return Err((format!("statement start {}: {why}", row.addr), true));
        }
        // Resuming at the restart address uses the body's stack depth.
        if self.stack.depth(r).and_then(|d| d.known()) != Some(self.prologue.body_depth) {
            return Err((
                "stack depth at the statement start is not the body depth".into(),
                true,
            ));
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
            return Err((
                "the call is not reached from the statement start".into(),
                true,
            ));
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
            if insn.is_call() && !super::pure::calls_pure_leaf(insn, self.program, view) {
                return Err((format!("another call at {}", insn.addr), false));
            }
            if matches!(
                insn.ins.flow_control(),
                FlowControl::Interrupt | FlowControl::Exception | FlowControl::XbeginXabortXend
            ) || insn.ins.has_lock_prefix()
                || insn.ins.op0_kind() == OpKind::Register
                    && matches!(insn.ins.op0_register(), Register::FS | Register::GS)
            {
                return Err((format!("side effect at {}", insn.addr), false));
            }
            for m in insn.mem.iter().filter(|m| m.write) {
                match resolve(&self.stack, j, m) {
                    Access::Frame { off, size } => {
                        let end = off.saturating_add(i64::from(size));
                        if self.desc.iter().any(|&(lo, hi)| lo < end && off < hi) {
                            return Err((format!("store to a variable at {}", insn.addr), false));
                        }
                    }
                    Access::Unknown => {
                        return Err((format!("store through a pointer at {}", insn.addr), false))
                    }
                }
            }
        }
        Ok(row.addr)
    }
}
