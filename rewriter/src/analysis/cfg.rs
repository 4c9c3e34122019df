//! Basic blocks and control-flow edges of one function, including the
//! targets of switch jump tables read from `.rodata`.

use super::codeview::CodeView;
use super::decode::Insn;
use super::AnalysisError;
use iced_x86::{FlowControl, Mnemonic, OpKind, Register};
use std::collections::BTreeSet;
use upstare_dwarf::LinkAddr;

/// Most entries a jump table may have (a cap on untrusted bounds).
pub(crate) const MAX_TABLE_ENTRIES: u64 = 1 << 16;
/// How far back from an indirect `jmp` the switch pattern is searched.
const SWITCH_WINDOW: usize = 16;

/// A basic block: instructions `first..end` of the function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Block {
    pub first: usize,
    pub end: usize,
    pub succs: Vec<usize>,
    pub preds: Vec<usize>,
}

/// A recognized switch jump: the `jmp` instruction and its table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct JumpTable {
    pub jmp: usize,
    /// The table's address; 0 for a computed `goto *`.
    pub table: LinkAddr,
    pub entries: u64,
    /// Distinct targets in table order.
    pub targets: Vec<LinkAddr>,
}

/// The control-flow graph. Block 0 is the entry block.
#[derive(Clone, Debug)]
pub(crate) struct Cfg {
    pub blocks: Vec<Block>,
    /// Block index of every instruction.
    pub block_of: Vec<usize>,
    pub tables: Vec<JumpTable>,
}

impl Cfg {
    /// Successor instructions of instruction `i` within the CFG.
    pub fn insn_succs(&self, i: usize) -> Vec<usize> {
        let b = &self.blocks[self.block_of[i]];
        if i + 1 < b.end {
            vec![i + 1]
        } else {
            b.succs.iter().map(|&s| self.blocks[s].first).collect()
        }
    }
    /// Predecessor instructions of instruction `i` within the CFG.
    pub fn insn_preds(&self, i: usize) -> Vec<usize> {
        let b = &self.blocks[self.block_of[i]];
        if i > b.first {
            vec![i - 1]
        } else {
            b.preds.iter().map(|&p| self.blocks[p].end - 1).collect()
        }
    }
}

/// Index of the instruction starting at `addr`.
pub(crate) fn index_of(insns: &[Insn], addr: LinkAddr) -> Option<usize> {
    insns.binary_search_by_key(&addr, |i| i.addr).ok()
}

fn err_branch(name: &str, insn: &Insn, target: LinkAddr) -> AnalysisError {
    AnalysisError::BadBranch {
        function: name.to_string(),
        addr: insn.addr,
        target,
    }
}

/// What the CFG needs to know beyond the function's instructions.
pub(crate) struct Outside<'a> {
    pub view: &'a CodeView<'a>,
    /// Whether the call instruction never returns (a noreturn callee).
    pub never_returns: &'a dyn Fn(&Insn) -> bool,
    /// Source labels of the whole binary (DWARF), sorted: the targets a
    /// computed `goto *` may have.
    pub labels: &'a [LinkAddr],
}

/// Builds the CFG of `insns` (the whole function, in address order).
///
/// A call that never returns ends its path, and so does a branch to the
/// function's very end: gcc drops the epilogue after a noreturn call or
/// `__builtin_unreachable()` and leaves the jumps that led to it pointing at
/// the next function's first byte; they are never taken.
pub(crate) fn build(name: &str, insns: &[Insn], out: &Outside) -> Result<Cfg, AnalysisError> {
    let n = insns.len();
    if n == 0 {
        return Err(AnalysisError::Empty {
            function: name.to_string(),
        });
    }
    let fn_end = insns[n - 1].next;
    // Successor instruction indices of block-ending instructions.
    let mut ends: Vec<Option<Vec<usize>>> = vec![None; n];
    let mut tables = Vec::new();
    let mut leaders = BTreeSet::new();
    leaders.insert(0usize);
    let target_index = |insn: &Insn, t: LinkAddr| -> Result<usize, AnalysisError> {
        index_of(insns, t).ok_or_else(|| err_branch(name, insn, t))
    };
    for (i, insn) in insns.iter().enumerate() {
        let fall = (i + 1 < n).then_some(i + 1);
        let branch_target = LinkAddr(insn.ins.near_branch_target());
        let succs: Option<Vec<usize>> = match insn.ins.flow_control() {
            FlowControl::Call | FlowControl::IndirectCall if (out.never_returns)(insn) => {
                Some(Vec::new())
            }
            FlowControl::Next
            | FlowControl::Call
            | FlowControl::IndirectCall
            | FlowControl::Interrupt
            | FlowControl::XbeginXabortXend => None,
            FlowControl::UnconditionalBranch if branch_target == fn_end => Some(Vec::new()),
            FlowControl::UnconditionalBranch => Some(vec![target_index(insn, branch_target)?]),
            FlowControl::ConditionalBranch if branch_target == fn_end => {
                Some(fall.into_iter().collect())
            }
            FlowControl::ConditionalBranch => {
                let t = target_index(insn, branch_target)?;
                Some(fall.into_iter().chain([t]).collect())
            }
            FlowControl::IndirectBranch => {
                let jt = match jump_table(name, insns, i, out.view) {
                    Err(AnalysisError::UnknownIndirectJump { .. }) => {
                        computed_goto(name, insns, i, out)?
                    }
                    other => other?,
                };
                let mut v = Vec::new();
                for &t in &jt.targets {
                    v.push(target_index(insn, t)?);
                }
                tables.push(jt);
                Some(v)
            }
            FlowControl::Return | FlowControl::Exception => Some(Vec::new()),
        };
        if let Some(s) = succs {
            leaders.extend(s.iter().copied());
            if let Some(f) = fall {
                leaders.insert(f);
            }
            ends[i] = Some(s);
        }
    }
    let starts: Vec<usize> = leaders.into_iter().collect();
    let mut block_of = vec![0usize; n];
    let mut blocks: Vec<Block> = Vec::with_capacity(starts.len());
    for (bi, &first) in starts.iter().enumerate() {
        let end = starts.get(bi + 1).copied().unwrap_or(n);
        for slot in &mut block_of[first..end] {
            *slot = bi;
        }
        blocks.push(Block {
            first,
            end,
            succs: Vec::new(),
            preds: Vec::new(),
        });
    }
    for bi in 0..blocks.len() {
        let last = blocks[bi].end - 1;
        let succ_insns: Vec<usize> = match &ends[last] {
            Some(s) => s.clone(),
            None => (last + 1 < n).then_some(last + 1).into_iter().collect(),
        };
        let mut succs: Vec<usize> = Vec::new();
        for s in succ_insns {
            let sb = block_of[s];
            if !succs.contains(&sb) {
                succs.push(sb);
            }
        }
        for &s in &succs {
            blocks[s].preds.push(bi);
        }
        blocks[bi].succs = succs;
    }
    Ok(Cfg {
        blocks,
        block_of,
        tables,
    })
}

/// How the entries of a jump table encode their targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    /// Signed 32-bit offsets from the table's own address (PIE, and what
    /// gcc/clang also emit with `-no-pie` here).
    Rel32,
    /// Absolute 64-bit addresses (`jmp [idx*8+T]`, `mov rax,[idx*8+T]`).
    Abs64,
    /// Absolute 32-bit addresses (`mov eax,[idx*4+T]` in non-PIE code).
    Abs32,
}

/// Recognizes the switch pattern ending at the indirect jump `j` (facts §5):
///
/// ```text
/// [G] cmp [rbp-x],N ; ja default ; mov eax,[rbp-x] ; lea rdx,[rax*4] ;
///     lea rax,[rip+T] ; mov eax,[rdx+rax] ; cdqe ; lea rdx,[rip+T] ; add rax,rdx ; jmp rax
/// [C] sub rax,N ; ja default ; mov rax,[rbp-x] ; lea rcx,[rip+T] ;
///     movsxd rax,[rcx+rax*4] ; add rax,rcx ; jmp rax
/// non-PIE absolute: ... ja default ; mov rax,[rax*8+T] ; jmp rax   (or jmp [rax*8+T])
/// ```
/// The number of entries comes from the `cmp`/`sub` immediate that feeds the
/// `ja` (unsigned bound) right before the table code.
fn jump_table(
    name: &str,
    insns: &[Insn],
    j: usize,
    view: &CodeView,
) -> Result<JumpTable, AnalysisError> {
    let jmp = &insns[j];
    let unknown = || AnalysisError::UnknownIndirectJump {
        function: name.to_string(),
        addr: jmp.addr,
    };
    let mut table: Option<(LinkAddr, Encoding)> = None;
    if jmp.ins.op0_kind() == OpKind::Memory {
        // jmp [idx*8 + T]
        if jmp.ins.memory_base() == Register::None
            && jmp.ins.memory_index() != Register::None
            && jmp.ins.memory_index_scale() == 8
        {
            table = Some((LinkAddr(jmp.ins.memory_displacement64()), Encoding::Abs64));
        } else {
            return Err(unknown());
        }
    } else if jmp.ins.op0_kind() != OpKind::Register {
        return Err(unknown());
    }
    // Walk back along the code executed before the jump: straight-line
    // code, and through an unconditional `jmp` that is the only way into it
    // (gcc sometimes places the bounds check elsewhere and jumps to the
    // dispatch).
    let mut bound: Option<u64> = None;
    let mut adds_base = false;
    let mut k = j;
    for _ in 0..SWITCH_WINDOW {
        let Some(p) = executed_before(insns, k) else {
            break;
        };
        k = p;
        let insn = &insns[k];
        let fc = insn.ins.flow_control();
        if fc == FlowControl::ConditionalBranch {
            let extra = match insn.ins.mnemonic() {
                Mnemonic::Ja => 1,
                Mnemonic::Jae => 0,
                _ => return Err(unknown()),
            };
            // The flag setter right before the branch gives the bound.
            let setter = k.checked_sub(1).map(|p| &insns[p]).ok_or_else(unknown)?;
            let imm = match setter.ins.mnemonic() {
                Mnemonic::Cmp | Mnemonic::Sub => setter.imm_op(1).ok_or_else(unknown)?,
                _ => return Err(unknown()),
            };
            // The compare is unsigned: the bound is the low 32 bits for a
            // 32-bit compare.
            let imm = if setter.ins.op0_kind() == OpKind::Register
                && setter.ins.op0_register().size() == 8
                || setter.ins.memory_size().size() == 8
            {
                imm as u64
            } else {
                u64::from(imm as u32)
            };
            bound = Some(imm.checked_add(extra).ok_or_else(unknown)?);
            break;
        }
        if fc == FlowControl::UnconditionalBranch {
            // The jump into the dispatch code: go on before it.
            continue;
        }
        if fc != FlowControl::Next {
            break;
        }
        let ins = &insn.ins;
        if ins.mnemonic() == Mnemonic::Add
            && ins.op0_kind() == OpKind::Register
            && ins.op1_kind() == OpKind::Register
            && ins.op0_register().size() == 8
        {
            adds_base = true;
        }
        if table.is_none() {
            if ins.mnemonic() == Mnemonic::Lea && ins.is_ip_rel_memory_operand() {
                table = Some((LinkAddr(ins.ip_rel_memory_address()), Encoding::Rel32));
            } else if ins.mnemonic() == Mnemonic::Mov
                && ins.op_count() == 2
                && ins.op1_kind() == OpKind::Memory
                && ins.memory_base() == Register::None
                && ins.memory_index() != Register::None
            {
                let disp = LinkAddr(ins.memory_displacement64());
                match ins.memory_index_scale() {
                    8 => table = Some((disp, Encoding::Abs64)),
                    4 => table = Some((disp, Encoding::Abs32)),
                    _ => {}
                }
            }
        }
    }
    let Some((base, enc)) = table else {
        return Err(unknown());
    };
    let entries = match bound {
        Some(b) => b,
        // A switch over an enum whose every value has a case and whose end
        // is unreachable has no bounds check (gcc and clang at -O0). A
        // relative table must be seen added to its base, which a computed
        // goto's table of label addresses is not.
        None if enc != Encoding::Rel32 || adds_base => {
            unbounded_entries(insns, base, enc, view).ok_or_else(unknown)?
        }
        None => return Err(unknown()),
    };
    if entries == 0 || entries > MAX_TABLE_ENTRIES {
        return Err(AnalysisError::BadJumpTable {
            function: name.to_string(),
            addr: jmp.addr,
            table: base,
            reason: format!("{entries} entries"),
        });
    }
    let width = enc.width();
    let bytes =
        view.read(base, (entries * width) as usize)
            .ok_or_else(|| AnalysisError::BadJumpTable {
                function: name.to_string(),
                addr: jmp.addr,
                table: base,
                reason: format!("{entries} entries are not inside an allocated section"),
            })?;
    let mut targets = Vec::new();
    for chunk in bytes.chunks_exact(width as usize) {
        let t = entry_target(base, enc, chunk).ok_or_else(|| AnalysisError::BadJumpTable {
            function: name.to_string(),
            addr: jmp.addr,
            table: base,
            reason: "entry overflows".into(),
        })?;
        if !targets.contains(&t) {
            targets.push(t);
        }
    }
    Ok(JumpTable {
        jmp: j,
        table: base,
        entries,
        targets,
    })
}

impl Encoding {
    /// Bytes per entry.
    fn width(self) -> u64 {
        if self == Encoding::Abs64 {
            8
        } else {
            4
        }
    }
}

/// The target of one table entry (`chunk` holds its bytes).
fn entry_target(base: LinkAddr, enc: Encoding, chunk: &[u8]) -> Option<LinkAddr> {
    let t = match enc {
        Encoding::Rel32 => {
            let v = i32::from_le_bytes(chunk.get(..4)?.try_into().ok()?);
            base.0.checked_add_signed(i64::from(v))
        }
        Encoding::Abs32 => Some(u64::from(u32::from_le_bytes(
            chunk.get(..4)?.try_into().ok()?,
        ))),
        Encoding::Abs64 => Some(u64::from_le_bytes(chunk.get(..8)?.try_into().ok()?)),
    };
    t.map(LinkAddr)
}

/// The number of entries of a table without bounds check: the entries up to
/// the first one that is not an instruction start of the function. Entries
/// read past the real table's end that happen to land on instructions only
/// add edges, which makes the analyses more cautious, never less.
fn unbounded_entries(
    insns: &[Insn],
    base: LinkAddr,
    enc: Encoding,
    view: &CodeView,
) -> Option<u64> {
    let width = enc.width();
    let mut n = 0u64;
    while n < MAX_TABLE_ENTRIES {
        let at = LinkAddr(base.0.checked_add(n.checked_mul(width)?)?);
        let Some(t) = view
            .read(at, width as usize)
            .and_then(|b| entry_target(base, enc, b))
        else {
            break;
        };
        if index_of(insns, t).is_none() {
            break;
        }
        n += 1;
    }
    (n > 0).then_some(n)
}

/// The instruction executed right before instruction `k` on the way to it:
/// the previous one if it falls through, else the only branch to `k` when
/// that is an unconditional `jmp`.
fn executed_before(insns: &[Insn], k: usize) -> Option<usize> {
    let prev = k.checked_sub(1)?;
    if matches!(
        insns[prev].ins.flow_control(),
        FlowControl::Next | FlowControl::ConditionalBranch
    ) {
        return Some(prev);
    }
    let addr = insns[k].addr;
    let mut from = insns.iter().enumerate().filter(|(_, i)| {
        matches!(
            i.ins.flow_control(),
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
        ) && i.ins.near_branch_target() == addr.0
    });
    match (from.next(), from.next()) {
        (Some((p, i)), None) if i.ins.flow_control() == FlowControl::UnconditionalBranch => Some(p),
        _ => None,
    }
}

/// A computed `goto *` (GNU labels as values): its targets are the
/// function's source labels (DWARF) and the code addresses the function
/// takes with `lea` (`&&label`). Refused when there are none.
fn computed_goto(
    name: &str,
    insns: &[Insn],
    j: usize,
    out: &Outside,
) -> Result<JumpTable, AnalysisError> {
    let low = insns[0].addr;
    let high = insns[insns.len() - 1].next;
    let from_labels = out
        .labels
        .iter()
        .copied()
        .filter(|a| low <= *a && *a < high);
    let from_leas = insns
        .iter()
        .filter(|i| i.ins.mnemonic() == Mnemonic::Lea && i.ins.is_ip_rel_memory_operand())
        .map(|i| LinkAddr(i.ins.ip_rel_memory_address()));
    let mut targets: Vec<LinkAddr> = from_labels
        .chain(from_leas)
        .filter(|a| index_of(insns, *a).is_some())
        .collect();
    targets.sort();
    targets.dedup();
    if targets.is_empty() {
        return Err(AnalysisError::UnknownIndirectJump {
            function: name.to_string(),
            addr: insns[j].addr,
        });
    }
    Ok(JumpTable {
        jmp: j,
        table: LinkAddr(0),
        entries: targets.len() as u64,
        targets,
    })
}
