//! Which update points may become a detour (`upstare-rewrite
//! --inline-points`): the `jmp rel32` written at the point overwrites the
//! point's first instructions, which then run relocated in its trampoline.
//!
//! A detour is only proposed when it is provably safe:
//! - the displaced instructions are whole instructions of the function,
//!   all of them inside it (a point too close to the function's end keeps
//!   `int3`);
//! - none of them changes control flow or traps (no branch, call, return,
//!   `int`, `syscall`, `ud2`...): relocated, they do exactly what they did,
//!   with RIP-relative operands fixed by iced-x86's `BlockEncoder`;
//! - no address inside the displaced bytes but the point itself is one
//!   control can arrive at or that the runtime may set a thread to: a
//!   block start (every branch and jump-table target), a source label,
//!   another update point, a call's return or restart address.

use super::Ctx;
use iced_x86::{FlowControl, Formatter, Instruction, IntelFormatter, Mnemonic};
use std::collections::BTreeSet;
use std::fmt;
use upstare_dwarf::fdt::{FunctionTable, InlinePoints};
use upstare_dwarf::LinkAddr;

/// Why an update point keeps `int3` arming instead of a detour.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum KeptInt3 {
    /// Fewer than 5 bytes of the function's code from the point on.
    FunctionEnd,
    /// Control can arrive at `at`, inside the bytes the `jmp` would cover.
    ArrivesInside { at: LinkAddr },
    /// The instruction at `at` changes control flow or cannot run
    /// elsewhere.
    NotRelocatable { at: LinkAddr, instruction: String },
    /// The trampoline cannot be encoded or is out of `jmp rel32` reach.
    Encoding { reason: String },
}

impl fmt::Display for KeptInt3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeptInt3::FunctionEnd => f.write_str("too close to the function's end"),
            KeptInt3::ArrivesInside { at } => {
                write!(
                    f,
                    "a branch or resume target at {at} inside the displaced bytes"
                )
            }
            KeptInt3::NotRelocatable { at, instruction } => {
                write!(f, "`{instruction}` at {at} cannot be displaced")
            }
            KeptInt3::Encoding { reason } => write!(f, "trampoline: {reason}"),
        }
    }
}

/// The instructions a detour at an update point displaces, or why it
/// keeps `int3`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointDetour {
    pub point: LinkAddr,
    /// The displaced instructions (decoded at their own addresses).
    pub displaced: Result<Vec<Instruction>, KeptInt3>,
}

impl PointDetour {
    /// Bytes the `jmp` displaces (whole instructions), if detoured.
    pub fn displaced_len(&self) -> Option<u64> {
        let insns = self.displaced.as_ref().ok()?;
        Some(insns.iter().map(|i| i.len() as u64).sum())
    }
}

/// Whether `ins` runs the same anywhere once its RIP-relative operands are
/// fixed: straight-line code that cannot fault on purpose or trap.
fn relocatable(ins: &Instruction) -> bool {
    ins.flow_control() == FlowControl::Next
        && !matches!(
            ins.mnemonic(),
            Mnemonic::Syscall | Mnemonic::Int3 | Mnemonic::Int | Mnemonic::Int1
        )
}

impl Ctx<'_> {
    /// Every address control may arrive at in this function other than by
    /// falling through, and every address the tables name.
    fn arrival_points(&self, table: &FunctionTable) -> BTreeSet<LinkAddr> {
        let mut out: BTreeSet<LinkAddr> = self
            .cfg
            .blocks
            .iter()
            .map(|b| self.insns[b.first].addr)
            .collect();
        out.extend(
            self.cfg
                .tables
                .iter()
                .flat_map(|t| t.targets.iter().copied()),
        );
        out.extend(
            self.program
                .code_labels
                .iter()
                .copied()
                .filter(|a| *a >= self.f.low && *a < self.f.high),
        );
        out.extend(table.update_points.iter().map(|p| p.addr));
        for c in &table.call_sites {
            out.insert(c.call_addr);
            out.insert(c.return_addr);
            out.extend(c.restart);
        }
        // `var_inits` are not places to arrive at: the patcher only
        // compares a paused frame's pc with them.
        out
    }

    /// The detour of every update point of `table` (this function's).
    pub(super) fn detours(&self, table: &FunctionTable) -> Vec<PointDetour> {
        let arrivals = self.arrival_points(table);
        table
            .update_points
            .iter()
            .map(|p| PointDetour {
                point: p.addr,
                displaced: self.displaced_at(p.addr, &arrivals),
            })
            .collect()
    }

    fn displaced_at(
        &self,
        point: LinkAddr,
        arrivals: &BTreeSet<LinkAddr>,
    ) -> Result<Vec<Instruction>, KeptInt3> {
        let first = self
            .insns
            .binary_search_by_key(&point, |i| i.addr)
            .map_err(|_| KeptInt3::ArrivesInside { at: point })?;
        let need = u64::from(InlinePoints::JMP_LEN);
        let mut out = Vec::new();
        let mut len = 0u64;
        for insn in &self.insns[first..] {
            if len >= need {
                break;
            }
            if len > 0 && arrivals.contains(&insn.addr) {
                return Err(KeptInt3::ArrivesInside { at: insn.addr });
            }
            if !relocatable(&insn.ins) {
                let mut text = String::new();
                IntelFormatter::new().format(&insn.ins, &mut text);
                return Err(KeptInt3::NotRelocatable {
                    at: insn.addr,
                    instruction: text,
                });
            }
            len += insn.ins.len() as u64;
            out.push(insn.ins);
        }
        let end = point.0.checked_add(len);
        if len < need || end.is_none_or(|e| e > self.f.high.0) {
            return Err(KeptInt3::FunctionEnd);
        }
        Ok(out)
    }
}
