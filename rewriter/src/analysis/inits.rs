//! Where each local declared with an initializer gets it: the first store to
//! the local's whole slot on its declaration line, and the constant it
//! stores when it is one (`long seen = 0;` compiles to `mov qword [rbp-X],
//! 0` at -O0). An update that adds a local to a frame paused after that
//! store must give the local its initial value, which the running code has
//! already passed.

use super::slots::{resolve, Access};
use super::Ctx;
use iced_x86::{Mnemonic, OpKind};
use upstare_dwarf::fdt::VarInit;
use upstare_dwarf::model::VarLocation;

impl Ctx<'_> {
    /// The initializing store of every local that has one, in `vars` order
    /// (parameters first, as the tables list them).
    pub(crate) fn var_inits(&self) -> Vec<VarInit> {
        let mut out = Vec::new();
        for (k, v) in self.f.params.iter().chain(&self.f.locals).enumerate() {
            if v.is_param || v.decl_line == 0 {
                continue;
            }
            let VarLocation::Cfa(off) = v.location else {
                continue;
            };
            let Some(size) = self.program.type_size(v.ty).filter(|s| *s > 0) else {
                continue;
            };
            let in_scope = |a: upstare_dwarf::LinkAddr| {
                v.scope.is_empty() || v.scope.iter().any(|&(lo, hi)| lo <= a && a < hi)
            };
            let found = self.insns.iter().enumerate().find_map(|(i, insn)| {
                if !in_scope(insn.addr) || self.line_at(insn.addr) != Some(v.decl_line) {
                    return None;
                }
                let writes_start = insn.mem.iter().any(|m| {
                    m.write
                        && matches!(resolve(&self.stack, i, m), Access::Frame { off: o, .. } if o == off.0)
                });
                writes_start.then(|| (insn, constant(&insn.ins, size)))
            });
            if let (Some((insn, constant)), Ok(var)) = (found, u32::try_from(k)) {
                out.push(VarInit {
                    var,
                    addr: insn.addr,
                    constant,
                });
            }
        }
        out
    }

    /// The source line of the row that covers `addr`.
    fn line_at(&self, addr: upstare_dwarf::LinkAddr) -> Option<u32> {
        let i = self.rows.partition_point(|r| r.addr <= addr);
        self.rows.get(i.checked_sub(1)?).map(|r| r.line)
    }
}

/// The bytes a `mov [mem], imm` stores, when it covers all `size` bytes of
/// the local.
fn constant(ins: &iced_x86::Instruction, size: u64) -> Option<Vec<u8>> {
    if ins.mnemonic() != Mnemonic::Mov || ins.op_count() != 2 || ins.op0_kind() != OpKind::Memory {
        return None;
    }
    let width = u64::try_from(ins.memory_size().size()).ok()?;
    if width != size || width > 8 {
        return None;
    }
    let imm = match ins.op1_kind() {
        OpKind::Immediate8
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate64
        | OpKind::Immediate8to16
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => ins.immediate(1),
        _ => return None,
    };
    Some(imm.to_le_bytes()[..width as usize].to_vec())
}
