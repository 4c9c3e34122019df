//! Backward liveness of general-purpose registers and flags.
//!
//! iced-x86 gives each instruction's register and flag reads and writes. Two
//! kinds of instructions need an ABI model on top:
//! - a `call` reads the argument registers the callee takes and clobbers the
//!   caller-saved registers and the flags. How many arguments a callee takes
//!   is known from DWARF for a non-varargs function of this binary; for the
//!   others (imports, indirect and varargs calls) every argument register is
//!   assumed read. Either way, a register counts as an argument only if, on
//!   every path since the previous call (or the function's entry), it was
//!   written and not read after that write: a real argument always is (the
//!   previous call clobbered it, -O0 code reloads parameters from their
//!   slots, and an argument's final value is set for the call alone), and
//!   this keeps scratch values from looking live at every call of unknown
//!   arity. The gdb oracle test checks the result. A call reads al
//!   (the vector count of varargs calls) when al is set in the few
//!   instructions right before it, where both compilers put `mov eax,0` /
//!   `mov al,N`;
//! - `ret` reads the return-value registers of the function's return type.

use super::cfg::Cfg;
use super::decode::{bit, Insn, RegSet, AL, CALLER_SAVED, CALL_INPUTS, FRAME_REGS};
use super::dom::Dominators;
use upstare_dwarf::model::{BaseEncoding, Program, Type, TypeId};
use upstare_dwarf::Reg;

/// Registers each instruction reads and kills once calls and returns are
/// modelled (frame registers removed).
pub(crate) struct Effects {
    pub uses: Vec<RegSet>,
    pub kills: Vec<RegSet>,
}

/// Argument registers written on every path since the last call (or the
/// function's entry) and not read since, before every instruction (forward
/// must-analysis).
fn written_since_call(insns: &[Insn], cfg: &Cfg, dom: &Dominators) -> Vec<RegSet> {
    let nb = cfg.blocks.len();
    // Top (everything) for blocks not yet reached; the entry has nothing.
    let mut block_in: Vec<Option<RegSet>> = vec![None; nb];
    block_in[0] = Some(0);
    let transfer = |insn: &Insn, s: RegSet| -> RegSet {
        if insn.is_call() {
            0
        } else {
            (s & !insn.uses) | (insn.writes & CALL_INPUTS)
        }
    };
    let mut changed = true;
    // Monotone: sets only shrink once reached.
    while changed {
        changed = false;
        for &b in &dom.rpo {
            let blk = &cfg.blocks[b];
            let Some(mut s) = block_in[b] else { continue };
            for insn in &insns[blk.first..blk.end] {
                s = transfer(insn, s);
            }
            for &succ in &blk.succs {
                let new = block_in[succ].map_or(s, |old| old & s);
                if block_in[succ] != Some(new) {
                    block_in[succ] = Some(new);
                    changed = true;
                }
            }
        }
    }
    let mut out = vec![0; insns.len()];
    for (b, blk) in cfg.blocks.iter().enumerate() {
        let mut s = block_in[b].unwrap_or(0);
        for (i, insn) in insns.iter().enumerate().take(blk.end).skip(blk.first) {
            out[i] = s;
            s = transfer(insn, s);
        }
    }
    out
}

/// How close before a call the compilers set al for a varargs call
/// (`mov eax,0` / `mov al,0` is the last step of the argument setup).
const AL_WINDOW: usize = 3;

/// Whether al is written within [`AL_WINDOW`] instructions before call `i`,
/// in the same block and after any earlier call.
fn sets_al(insns: &[Insn], cfg: &Cfg, i: usize) -> bool {
    let first = cfg.blocks[cfg.block_of[i]].first;
    for j in (first.max(i.saturating_sub(AL_WINDOW))..i).rev() {
        if insns[j].is_call() {
            return false;
        }
        if insns[j].kills & AL != 0 {
            return true;
        }
    }
    false
}

/// Strips typedefs and qualifiers.
fn resolve(program: &Program, mut id: TypeId) -> Option<&Type> {
    for _ in 0..64 {
        match program.ty(id)? {
            Type::Typedef { target, .. } | Type::Qualified { target, .. } => id = (*target)?,
            t => return Some(t),
        }
    }
    None
}

/// Number of integer registers a value of type `id` takes as an argument
/// (SysV classification, conservative: unknown or mixed aggregates count as
/// integer).
fn int_regs(program: &Program, id: TypeId) -> u32 {
    match resolve(program, id) {
        Some(Type::Base {
            encoding: BaseEncoding::Float | BaseEncoding::Complex,
            ..
        }) => 0,
        Some(Type::Struct { .. } | Type::Union { .. }) => match program.type_size(id) {
            Some(s) if s > 16 => 0,
            Some(s) if s > 8 => 2,
            Some(_) => 1,
            None => 2,
        },
        Some(Type::Base { size, .. }) if *size > 8 => 2,
        _ => 1,
    }
}

/// Registers holding the return value of a function returning `ret`.
pub(crate) fn return_regs(program: &Program, ret: Option<TypeId>) -> RegSet {
    let Some(id) = ret else { return 0 };
    let rax = bit(Reg::Rax);
    let rdx = bit(Reg::Rdx);
    match resolve(program, id) {
        Some(Type::Void) => 0,
        Some(Type::Base {
            encoding: BaseEncoding::Float | BaseEncoding::Complex,
            ..
        }) => 0,
        Some(Type::Base { size, .. }) => {
            if *size > 8 {
                rax | rdx
            } else {
                rax
            }
        }
        Some(Type::Struct { .. } | Type::Union { .. }) => match program.type_size(id) {
            // In memory: rax returns the buffer's address.
            Some(s) if s > 16 => rax,
            Some(s) if s <= 8 => rax,
            _ => rax | rdx,
        },
        Some(_) => rax,
        None => rax | rdx,
    }
}

/// Argument registers a direct call to the function at `target` can read,
/// from its DWARF signature; `None` when unknown (imports, varargs).
pub(crate) fn signature_inputs(
    program: &Program,
    target: upstare_dwarf::LinkAddr,
) -> Option<RegSet> {
    let f = program.function_at(target).filter(|f| f.low == target)?;
    if f.is_varargs {
        return None;
    }
    // A struct returned in memory passes its buffer in rdi.
    let sret = f.return_type.is_some_and(|t| {
        matches!(
            resolve(program, t),
            Some(Type::Struct { .. } | Type::Union { .. })
        ) && program.type_size(t).is_none_or(|s| s > 16)
    });
    let mut n = u32::from(sret);
    for p in &f.params {
        n = n.saturating_add(int_regs(program, p.ty));
    }
    let mut set = 0;
    for r in super::decode::ARG_REGS.iter().take(n.min(6) as usize) {
        set |= bit(*r);
    }
    Some(set)
}

/// Integer argument count of common C library functions (none varargs), so
/// that a call through the PLT does not count every argument register as
/// read. The blocking calls a paused thread may re-execute are all here: a
/// register left over from an earlier statement then is not "live" at the
/// statement's start.
const IMPORT_ARITY: &[(&str, u32)] = &[
    ("accept", 3),
    ("accept4", 4),
    ("clock_nanosleep", 4),
    ("close", 1),
    ("connect", 3),
    ("epoll_pwait", 5),
    ("epoll_wait", 4),
    ("fflush", 1),
    ("free", 1),
    ("malloc", 1),
    ("nanosleep", 2),
    ("pause", 0),
    ("poll", 3),
    ("ppoll", 4),
    ("pselect", 6),
    ("pthread_cond_signal", 1),
    ("pthread_cond_timedwait", 3),
    ("pthread_cond_wait", 2),
    ("pthread_join", 2),
    ("pthread_mutex_lock", 1),
    ("pthread_mutex_unlock", 1),
    ("puts", 1),
    ("read", 3),
    ("readv", 3),
    ("recv", 4),
    ("recvfrom", 6),
    ("recvmsg", 3),
    ("select", 5),
    ("send", 4),
    ("sigsuspend", 1),
    ("sleep", 1),
    ("usleep", 1),
    ("wait", 1),
    ("waitpid", 3),
    ("write", 3),
];

/// Argument registers a call to the import `name` can read, if known.
pub(crate) fn import_inputs(name: &str) -> Option<RegSet> {
    let (_, n) = IMPORT_ARITY.iter().find(|(f, _)| *f == name)?;
    Some(
        super::decode::ARG_REGS
            .iter()
            .take(*n as usize)
            .fold(0, |acc, r| acc | bit(*r)),
    )
}

/// Computes the modelled effects. `call_inputs[i]` gives, for a call, the
/// argument registers its callee may read (see [`signature_inputs`]).
pub(crate) fn effects(
    insns: &[Insn],
    cfg: &Cfg,
    dom: &Dominators,
    call_inputs: &dyn Fn(usize) -> RegSet,
    ret_regs: RegSet,
) -> Effects {
    let written = written_since_call(insns, cfg, dom);
    let mut uses = Vec::with_capacity(insns.len());
    let mut kills = Vec::with_capacity(insns.len());
    for (i, insn) in insns.iter().enumerate() {
        let (u, k) = if insn.is_call() {
            let al = if sets_al(insns, cfg, i) { AL } else { 0 };
            (
                insn.uses | (call_inputs(i) & written[i] & CALL_INPUTS) | al,
                CALLER_SAVED,
            )
        } else if insn.is_ret() {
            (insn.uses | ret_regs, insn.kills)
        } else {
            (insn.uses, insn.kills)
        };
        uses.push(u & !FRAME_REGS & !bit(Reg::Rip));
        kills.push(k & !FRAME_REGS);
    }
    Effects { uses, kills }
}

/// Live registers and flags before every instruction.
pub(crate) fn live_in(insns: &[Insn], cfg: &Cfg, eff: &Effects) -> Vec<RegSet> {
    let nb = cfg.blocks.len();
    let mut block_in = vec![0 as RegSet; nb];
    let through = |b: usize, out: RegSet| -> RegSet {
        let blk = &cfg.blocks[b];
        let mut s = out;
        for i in (blk.first..blk.end).rev() {
            s = (s & !eff.kills[i]) | eff.uses[i];
        }
        s
    };
    let mut changed = true;
    // Monotone: sets only grow.
    while changed {
        changed = false;
        for b in (0..nb).rev() {
            let out = cfg.blocks[b]
                .succs
                .iter()
                .fold(0, |acc, &s| acc | block_in[s]);
            let inn = through(b, out);
            if inn != block_in[b] {
                block_in[b] = inn;
                changed = true;
            }
        }
    }
    let mut out = vec![0; insns.len()];
    for (b, blk) in cfg.blocks.iter().enumerate() {
        let mut s = blk.succs.iter().fold(0, |acc, &x| acc | block_in[x]);
        for i in (blk.first..blk.end).rev() {
            s = (s & !eff.kills[i]) | eff.uses[i];
            out[i] = s;
        }
        let _ = b;
    }
    out
}
