//! Line-table rows of a function and the choice of update points.

use super::decode::{describe, RegSet, FRAME_REGS, TRACKED};
use super::Ctx;
use upstare_dwarf::fdt::{PointKind, UpdatePoint};
use upstare_dwarf::model::{Program, VarLocation};
use upstare_dwarf::LinkAddr;

/// The row in effect at one address (the last of the rows at that address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Row {
    pub addr: LinkAddr,
    pub file: u32,
    pub line: u32,
    pub is_stmt: bool,
    /// `is_stmt` and a different (file, line) from the row before it: the
    /// start of a new source line. gcc's per-column rows are not.
    pub new_line: bool,
    pub prologue_end: bool,
}

/// The rows in effect in `[low, high)`, one per address, in address order.
pub(crate) fn rows(program: &Program, low: LinkAddr, high: LinkAddr) -> Vec<Row> {
    let mut out: Vec<Row> = Vec::new();
    for r in program.rows_in(low, high) {
        if r.end_sequence {
            continue;
        }
        let row = Row {
            addr: r.addr,
            file: r.file,
            line: r.line,
            is_stmt: r.is_stmt,
            new_line: false,
            prologue_end: r.prologue_end,
        };
        match out.last_mut() {
            Some(last) if last.addr == r.addr => {
                let pe = last.prologue_end || r.prologue_end;
                *last = Row {
                    prologue_end: pe,
                    ..row
                };
            }
            _ => out.push(row),
        }
    }
    let mut prev: Option<(u32, u32)> = None;
    for r in &mut out {
        r.new_line = r.is_stmt && prev != Some((r.file, r.line));
        prev = Some((r.file, r.line));
    }
    out
}

/// The row in effect at `addr`.
pub(crate) fn row_at(rows: &[Row], addr: LinkAddr) -> Option<&Row> {
    let i = rows.partition_point(|r| r.addr <= addr);
    rows.get(i.checked_sub(1)?)
}

impl Ctx<'_> {
    /// Why instruction `i` is not a safe place to pause (`None`: it is).
    pub(crate) fn unsafe_reason(&self, i: usize) -> Option<String> {
        let insn = &self.insns[i];
        if i < self.prologue.end {
            return Some("inside the prologue".into());
        }
        match self.stack.depth(i) {
            None => return Some("unreachable".into()),
            Some(super::stack::Depth::Dynamic) => {
                return Some("dynamic stack depth (VLA or alloca)".into())
            }
            Some(_) => {}
        }
        let live: RegSet = self.live[i] & TRACKED & !FRAME_REGS;
        if live != 0 {
            return Some(format!("live {}", describe(live)));
        }
        let in_scope = |v: &&upstare_dwarf::model::Variable| {
            v.scope
                .iter()
                .any(|&(a, b)| a <= insn.addr && insn.addr < b)
        };
        if let Some(v) = self
            .f
            .params
            .iter()
            .chain(&self.f.locals)
            .filter(in_scope)
            .find(|v| {
                matches!(
                    v.location,
                    VarLocation::CfaIndirect(_) | VarLocation::Complex(_)
                )
            })
        {
            return Some(format!(
                "in the scope of {} (VLA or complex location)",
                v.name
            ));
        }
        None
    }

    fn point(&self, kind: PointKind, row: &Row, i: usize) -> Option<UpdatePoint> {
        Some(UpdatePoint {
            kind,
            addr: row.addr,
            file: row.file,
            line: row.line,
            stack_depth: self.stack.depth(i)?.known()?,
        })
    }

    /// The entry point: the first row after the parameter spills (clang's
    /// `prologue_end` row, otherwise the function's second row).
    pub(crate) fn entry_point(&self, notes: &mut Vec<String>) -> Option<UpdatePoint> {
        let row = self
            .rows
            .iter()
            .find(|r| r.prologue_end)
            .or_else(|| self.rows.get(1));
        let Some(row) = row else {
            notes.push("entry: the function has a single line-table row".into());
            return None;
        };
        let Some(i) = super::cfg::index_of(&self.insns, row.addr) else {
            notes.push(format!(
                "entry: row {} is not an instruction start",
                row.addr
            ));
            return None;
        };
        if let Some(why) = self.unsafe_reason(i) {
            notes.push(format!("entry: {} rejected: {why}", row.addr));
            return None;
        }
        self.point(PointKind::Entry, row, i)
    }

    /// The update point of loop `k`, if it has one.
    pub(crate) fn loop_point(&self, k: usize, notes: &mut Vec<String>) -> Option<UpdatePoint> {
        let l = &self.loops[k];
        let mut cands: Vec<usize> = l
            .blocks
            .iter()
            .copied()
            .filter(|&b| l.latches.iter().all(|&s| self.dom.dominates(b, s)))
            .collect();
        // The header first (gcc's condition block), then by address.
        cands.sort_by_key(|&b| (b != l.header, self.cfg.blocks[b].first));
        let mut why_not = Vec::new();
        for b in cands {
            let blk = &self.cfg.blocks[b];
            let (lo, hi) = (self.insns[blk.first].addr, self.insns[blk.end - 1].next);
            for row in self.rows.iter().filter(|r| r.addr >= lo && r.addr < hi) {
                if !row.new_line {
                    continue;
                }
                if self.last_line == Some((row.file, row.line)) {
                    why_not.push(format!("{}: closing line", row.addr));
                    continue;
                }
                let Some(i) = super::cfg::index_of(&self.insns, row.addr) else {
                    continue;
                };
                match self.unsafe_reason(i) {
                    None => {
                        return self.point(PointKind::Loop(k as u32), row, i);
                    }
                    Some(w) => why_not.push(format!("{}: {w}", row.addr)),
                }
            }
        }
        notes.push(format!(
            "loop#{k} (header {}): no update point{}{}",
            self.insns[self.cfg.blocks[l.header].first].addr,
            if why_not.is_empty() { "" } else { ": " },
            why_not.join("; ")
        ));
        None
    }
}
