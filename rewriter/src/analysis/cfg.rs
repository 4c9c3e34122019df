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

/// Builds the CFG of `insns` (the whole function, in address order).
pub(crate) fn build(name: &str, insns: &[Insn], view: &CodeView) -> Result<Cfg, AnalysisError> {
    let n = insns.len();
    if n == 0 {
        return Err(AnalysisError::Empty {
            function: name.to_string(),
        });
    }
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
        let succs: Option<Vec<usize>> = match insn.ins.flow_control() {
            FlowControl::Next
            | FlowControl::Call
            | FlowControl::IndirectCall
            | FlowControl::Interrupt
            | FlowControl::XbeginXabortXend => None,
            FlowControl::UnconditionalBranch => Some(vec![target_index(
                insn,
                LinkAddr(insn.ins.near_branch_target()),
            )?]),
            FlowControl::ConditionalBranch => {
                let t = target_index(insn, LinkAddr(insn.ins.near_branch_target()))?;
                Some(fall.into_iter().chain([t]).collect())
            }
            FlowControl::IndirectBranch => {
                let jt = jump_table(name, insns, i, view)?;
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
    // Walk back through the straight-line code before the jump.
    let mut bound: Option<u64> = None;
    let lo = j.saturating_sub(SWITCH_WINDOW);
    let mut k = j;
    while k > lo {
        k -= 1;
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
        if fc != FlowControl::Next {
            break;
        }
        if table.is_none() {
            let ins = &insn.ins;
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
    let ((base, enc), entries) = match (table, bound) {
        (Some(t), Some(b)) => (t, b),
        _ => return Err(unknown()),
    };
    if entries == 0 || entries > MAX_TABLE_ENTRIES {
        return Err(AnalysisError::BadJumpTable {
            function: name.to_string(),
            addr: jmp.addr,
            table: base,
            reason: format!("{entries} entries"),
        });
    }
    let width: u64 = if enc == Encoding::Abs64 { 8 } else { 4 };
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
        let t = match enc {
            Encoding::Rel32 => {
                let v = i32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                base.0.checked_add_signed(i64::from(v))
            }
            Encoding::Abs32 => Some(u64::from(u32::from_le_bytes([
                chunk[0], chunk[1], chunk[2], chunk[3],
            ]))),
            Encoding::Abs64 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(chunk);
                Some(u64::from_le_bytes(b))
            }
        };
        let t = t.map(LinkAddr).ok_or_else(|| AnalysisError::BadJumpTable {
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
