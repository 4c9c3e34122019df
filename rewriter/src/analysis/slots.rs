//! Frame slots: memory operands normalized to CFA offsets, which bytes of the
//! frame DWARF describes, and liveness of the undescribed bytes (call
//! temporaries that gcc or clang spill to anonymous slots).

use super::cfg::Cfg;
use super::decode::{Insn, MemRef};
use super::dom::Dominators;
use super::stack::StackInfo;
use super::AnalysisError;
use upstare_dwarf::fdt::TempSlot;
use upstare_dwarf::model::{Function, Program, VarLocation};
use upstare_dwarf::CfaOffset;

/// Most undescribed frame bytes tracked per function.
pub(crate) const MAX_TEMP_BYTES: usize = 1 << 14;

/// A memory access resolved against the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// `[CFA+off, CFA+off+size)`.
    Frame { off: i64, size: u32 },
    /// Through a pointer, a global or an index: anywhere.
    Unknown,
}

/// Resolves `m` with the stack state before instruction `i`.
pub(crate) fn resolve(stack: &StackInfo, i: usize, m: &MemRef) -> Access {
    if m.indexed {
        return Access::Unknown;
    }
    let Some(st) = stack.before.get(i).and_then(|s| s.as_ref()) else {
        return Access::Unknown;
    };
    match st.cfa_of(m.base, m.disp) {
        Some(off) => Access::Frame { off, size: m.size },
        None => Access::Unknown,
    }
}

/// Byte ranges `[lo, hi)` (CFA offsets) that DWARF or the ABI describe: every
/// variable of the function, the saved registers, and everything from CFA-16
/// up (saved rbp, return address, the caller's frame).
pub(crate) fn described(f: &Function, program: &Program) -> Vec<(i64, i64)> {
    let mut v = vec![(-16, i64::MAX)];
    for var in f.params.iter().chain(&f.locals) {
        match &var.location {
            VarLocation::Cfa(CfaOffset(o)) => {
                // Unknown sizes (incomplete types) cover at least one word.
                let size = program
                    .type_size(var.ty)
                    .and_then(|s| i64::try_from(s).ok())
                    .unwrap_or(8)
                    .max(1);
                v.push((*o, o.saturating_add(size)));
            }
            VarLocation::CfaIndirect(CfaOffset(o)) => v.push((*o, o.saturating_add(8))),
            _ => {}
        }
    }
    for s in &f.saved_regs {
        v.push((s.offset.0, s.offset.0.saturating_add(8)));
    }
    v
}

fn is_described(desc: &[(i64, i64)], b: i64) -> bool {
    desc.iter().any(|&(lo, hi)| lo <= b && b < hi)
}

/// A fixed-size bit set.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
    fn get(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    fn union_with(&mut self, o: &Bits) -> bool {
        let mut changed = false;
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            let n = *a | *b;
            changed |= n != *a;
            *a = n;
        }
        changed
    }
}

/// Reads and writes of undescribed bytes per instruction, as indices into
/// the universe.
struct SlotEffects {
    reads: Vec<Vec<usize>>,
    writes: Vec<Vec<usize>>,
}

/// Liveness of undescribed frame bytes.
pub(crate) struct TempInfo {
    /// CFA offsets of the tracked bytes, sorted.
    universe: Vec<i64>,
    /// Whether some access starts at the byte (slot boundaries).
    starts: Vec<bool>,
    live_in: Vec<Bits>,
    written_before: Vec<Bits>,
}

impl TempInfo {
    pub fn analyze(
        name: &str,
        insns: &[Insn],
        cfg: &Cfg,
        dom: &Dominators,
        stack: &StackInfo,
        desc: &[(i64, i64)],
    ) -> Result<TempInfo, AnalysisError> {
        // The universe: undescribed bytes some instruction reads or writes
        // directly.
        let mut universe: Vec<i64> = Vec::new();
        let mut per_insn: Vec<Vec<(i64, u32, bool, bool)>> = Vec::with_capacity(insns.len());
        for (i, insn) in insns.iter().enumerate() {
            let mut v = Vec::new();
            for m in &insn.mem {
                if let Access::Frame { off, size } = resolve(stack, i, m) {
                    if !(m.read || m.write) {
                        continue;
                    }
                    for b in off..off.saturating_add(i64::from(size)) {
                        if !is_described(desc, b) {
                            universe.push(b);
                            if universe.len() > MAX_TEMP_BYTES * 8 {
                                universe.sort_unstable();
                                universe.dedup();
                            }
                        }
                    }
                    v.push((off, size, m.read, m.write));
                }
            }
            per_insn.push(v);
        }
        universe.sort_unstable();
        universe.dedup();
        if universe.len() > MAX_TEMP_BYTES {
            return Err(AnalysisError::TooComplex {
                function: name.to_string(),
                what: format!("{} undescribed frame bytes", universe.len()),
            });
        }
        let idx = |b: i64| universe.binary_search(&b).ok();
        let mut eff = SlotEffects {
            reads: Vec::with_capacity(insns.len()),
            writes: Vec::with_capacity(insns.len()),
        };
        for v in &per_insn {
            let (mut r, mut w) = (Vec::new(), Vec::new());
            for &(off, size, read, write) in v {
                for b in off..off.saturating_add(i64::from(size)) {
                    if let Some(k) = idx(b) {
                        if read {
                            r.push(k);
                        }
                        if write {
                            w.push(k);
                        }
                    }
                }
            }
            eff.reads.push(r);
            eff.writes.push(w);
        }
        let n = universe.len();
        let mut starts = vec![false; n];
        for v in &per_insn {
            for &(off, _, _, _) in v {
                if let Some(k) = idx(off) {
                    starts[k] = true;
                }
            }
        }
        let nb = cfg.blocks.len();

        // Backward liveness.
        let mut block_in = vec![Bits::new(n); nb];
        let through_back = |b: usize, s: &mut Bits, out: Option<&mut Vec<Bits>>| {
            let blk = &cfg.blocks[b];
            let mut out = out;
            for i in (blk.first..blk.end).rev() {
                for &k in &eff.writes[i] {
                    s.clear(k);
                }
                for &k in &eff.reads[i] {
                    s.set(k);
                }
                if let Some(o) = out.as_deref_mut() {
                    o[i] = s.clone();
                }
            }
        };
        let mut changed = true;
        while changed {
            changed = false;
            for b in (0..nb).rev() {
                let mut s = Bits::new(n);
                for &x in &cfg.blocks[b].succs {
                    s.union_with(&block_in[x]);
                }
                through_back(b, &mut s, None);
                if s != block_in[b] {
                    block_in[b] = s;
                    changed = true;
                }
            }
        }
        let mut live_in = vec![Bits::new(n); insns.len()];
        for b in 0..nb {
            let mut s = Bits::new(n);
            for &x in &cfg.blocks[b].succs {
                s.union_with(&block_in[x]);
            }
            through_back(b, &mut s, Some(&mut live_in));
        }

        // Forward "may have been written".
        let mut fin = vec![Bits::new(n); nb];
        let mut changed = true;
        while changed {
            changed = false;
            for &b in &dom.rpo {
                let blk = &cfg.blocks[b];
                let mut s = fin[b].clone();
                for i in blk.first..blk.end {
                    for &k in &eff.writes[i] {
                        s.set(k);
                    }
                }
                for &x in &blk.succs {
                    changed |= fin[x].union_with(&s);
                }
            }
        }
        let mut written_before = vec![Bits::new(n); insns.len()];
        for (b, blk) in cfg.blocks.iter().enumerate() {
            let mut s = fin[b].clone();
            for (i, wb) in written_before
                .iter_mut()
                .enumerate()
                .take(blk.end)
                .skip(blk.first)
            {
                *wb = s.clone();
                for &k in &eff.writes[i] {
                    s.set(k);
                }
            }
        }
        Ok(TempInfo {
            universe,
            starts,
            live_in,
            written_before,
        })
    }

    /// Undescribed slots written before instruction `call` and live before
    /// instruction `after` (the return address): runs of such bytes, split
    /// where an access starts.
    pub fn temps_across(&self, call: usize, after: Option<usize>) -> Vec<TempSlot> {
        let Some(after) = after else {
            return Vec::new();
        };
        let (live, wr) = (&self.live_in[after], &self.written_before[call]);
        let mut out: Vec<TempSlot> = Vec::new();
        for (k, &b) in self.universe.iter().enumerate() {
            if !(live.get(k) && wr.get(k)) {
                continue;
            }
            match out.last_mut() {
                Some(t)
                    if t.offset.0.checked_add(i64::from(t.size)) == Some(b) && !self.starts[k] =>
                {
                    t.size = t.size.saturating_add(1)
                }
                _ => out.push(TempSlot {
                    offset: CfaOffset(b),
                    size: 1,
                }),
            }
        }
        out
    }
}
