//! Machine-code analysis of one `-O0` function: decoding (iced-x86), the CFG
//! with switch jump tables, dominators and natural loops, stack depth,
//! register liveness, update points and call sites. The result is the
//! function's [`FunctionTable`] for the frame-description tables.
//!
//! Entry point: [`analyze_function`]. The binary-wide facts it needs (jump
//! tables in `.rodata`, call target names, PLT stubs) come from a
//! [`CodeView`].
//!
//! What is verified rather than assumed:
//! - every update point and restart address is at a line-table row that
//!   starts a new source line and where no general-purpose register (rsp and
//!   rbp aside) and no flag is live, by a liveness analysis over the CFG;
//! - the stack depth is computed by abstract interpretation and must agree
//!   at every join;
//! - callee-saved registers and undescribed stack slots live across each call
//!   come from liveness, not from patterns.
//!
//! Why liveness and not the line table alone: a row that starts a new line
//! is usually register-free at -O0, but not always. gcc keeps the dimension
//! of a VLA-typed parameter (`double m[n][n]`) in ecx (or rbx when the body
//! calls) for the whole function, and a statement spanning several lines
//! gets new-line rows in the middle of its evaluation with rax/rbx/r12 live.
//! Loops whose body is all on the condition's line (`while (f()) ;`) have no
//! new-line row inside and get no update point.

mod calls;
mod cfg;
mod codeview;
mod decode;
mod detour;
mod dom;
mod frame;
mod inits;
mod liveness;
mod points;
mod pure;
mod slots;
mod stack;

pub use calls::NORETURN_IMPORTS;
pub use codeview::{CodeView, MAX_PLT_STUBS};
pub use detour::{KeptInt3, PointDetour};

use decode::{Insn, RegSet};
use std::collections::BTreeMap;
use upstare_dwarf::fdt::FunctionTable;
use upstare_dwarf::model::{Function, Program, VarLocation};
use upstare_dwarf::{CfaOffset, LinkAddr};

/// The stack depth recorded for a call whose depth is only known at run
/// time (the table format's own sentinel).
pub const DYNAMIC_DEPTH: CfaOffset = upstare_dwarf::fdt::CallSite::DYNAMIC_DEPTH;

/// Most instructions analyzed in one function.
pub const MAX_INSNS: usize = 1 << 20;

/// Why a function cannot be analyzed (or does not meet the target contract).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnalysisError {
    #[error("function {function}: {got} bytes of code given for the range {low}..{high}")]
    CodeSize {
        function: String,
        low: LinkAddr,
        high: LinkAddr,
        got: usize,
    },
    #[error("function {function}: has no code")]
    Empty { function: String },
    #[error("function {function}: more than {MAX_INSNS} instructions")]
    TooLarge { function: String },
    #[error("function {function}: cannot decode the instruction at {addr}")]
    Decode { function: String, addr: LinkAddr },
    #[error("function {function}: no frame-pointer prologue (push rbp; mov rbp,rsp) at {addr}")]
    NoFramePointer { function: String, addr: LinkAddr },
    #[error("function {function}: realigns its stack at {addr} ({what}), which is not supported")]
    Realigned {
        function: String,
        addr: LinkAddr,
        what: String,
    },
    #[error("function {function}: looks optimized at {addr}: {what}")]
    OptimizedCode {
        function: String,
        addr: LinkAddr,
        what: String,
    },
    #[error("function {function}: branch at {addr} to {target} does not land on an instruction of the function")]
    BadBranch {
        function: String,
        addr: LinkAddr,
        target: LinkAddr,
    },
    #[error("function {function}: indirect jump at {addr} is not a recognized switch table")]
    UnknownIndirectJump { function: String, addr: LinkAddr },
    #[error("function {function}: switch at {addr}: bad jump table at {table}: {reason}")]
    BadJumpTable {
        function: String,
        addr: LinkAddr,
        table: LinkAddr,
        reason: String,
    },
    #[error(
        "function {function}: conflicting stack depths {a} and {b} where paths join at {addr}"
    )]
    StackConflict {
        function: String,
        addr: LinkAddr,
        a: CfaOffset,
        b: CfaOffset,
    },
    #[error("function {function}: stack depth after the prologue is unknown at {addr}")]
    UnknownBodyDepth { function: String, addr: LinkAddr },
    #[error("function {function}: call at {addr} targets {target}, which is neither a function nor a PLT stub")]
    UnknownCallTarget {
        function: String,
        addr: LinkAddr,
        target: LinkAddr,
    },
    #[error("section {section}: cannot read its contents: {reason}")]
    Section { section: String, reason: String },
    #[error("section {section}: more than {MAX_PLT_STUBS} PLT stubs")]
    TooManyStubs { section: String },
    #[error("function {function}: too complex: {what}")]
    TooComplex { function: String, what: String },
}

impl AnalysisError {
    /// The kind of refusal in a few words, the same for every function
    /// refused for it (for grouping refusals).
    pub fn reason(&self) -> &'static str {
        match self {
            AnalysisError::CodeSize { .. } => "code size differs from its DWARF range",
            AnalysisError::Empty { .. } => "no code",
            AnalysisError::TooLarge { .. } => "too many instructions",
            AnalysisError::Decode { .. } => "undecodable instruction",
            AnalysisError::NoFramePointer { .. } => "no frame-pointer prologue",
            AnalysisError::Realigned { .. } => "stack realignment",
            AnalysisError::OptimizedCode { .. } => "optimized code",
            AnalysisError::BadBranch { .. } => "branch outside the function",
            AnalysisError::UnknownIndirectJump { .. } => "unrecognized indirect jump",
            AnalysisError::BadJumpTable { .. } => "bad jump table",
            AnalysisError::StackConflict { .. } => "conflicting stack depths where paths join",
            AnalysisError::UnknownBodyDepth { .. } => "unknown stack depth after the prologue",
            AnalysisError::UnknownCallTarget { .. } => "call to an unknown target",
            AnalysisError::Section { .. } => "unreadable section",
            AnalysisError::TooManyStubs { .. } => "too many PLT stubs",
            AnalysisError::TooComplex { .. } => "too complex",
        }
    }
}

/// Shape facts of an analyzed function, for diagnostics and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Details {
    /// Start of every basic block, in address order.
    pub block_starts: Vec<LinkAddr>,
    /// Natural loops in address order of their header (the numbering of
    /// `PointKind::Loop`).
    pub loops: Vec<LoopInfo>,
    /// Recognized switch jump tables.
    pub jump_tables: Vec<JumpTableInfo>,
    /// Why a loop has no update point, why a call has no restart address.
    pub notes: Vec<String>,
    /// Per update point, what a detour would displace or why it keeps
    /// `int3` (`--inline-points`).
    pub detours: Vec<PointDetour>,
}

/// One natural loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopInfo {
    pub header: LinkAddr,
    /// Start addresses of the loop's blocks.
    pub blocks: Vec<LinkAddr>,
}

/// One recognized switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JumpTableInfo {
    /// The indirect `jmp`.
    pub jmp: LinkAddr,
    /// Link-time address of the table; 0 for a computed `goto *`, whose
    /// targets are the function's labels.
    pub table: LinkAddr,
    pub entries: u64,
    /// Distinct targets in table order.
    pub targets: Vec<LinkAddr>,
}

/// Everything the sub-analyses share.
pub(crate) struct Ctx<'a> {
    pub name: &'a str,
    pub f: &'a Function,
    pub program: &'a Program,
    pub insns: Vec<Insn>,
    pub cfg: cfg::Cfg,
    pub dom: dom::Dominators,
    pub loops: Vec<dom::Loop>,
    pub stack: stack::StackInfo,
    /// Live registers and flags before each instruction.
    pub live: Vec<RegSet>,
    pub rows: Vec<points::Row>,
    /// (file, line) of the function's last row: its closing `}`.
    pub last_line: Option<(u32, u32)>,
    pub prologue: frame::Prologue,
    /// Frame byte ranges DWARF describes (CFA offsets).
    pub desc: Vec<(i64, i64)>,
    pub temps: slots::TempInfo,
}

/// Analyzes function `f` of `program`: `code` holds the bytes of
/// `[f.low, f.high)`, `text` gives access to the rest of the binary.
///
/// Refuses (with an error naming the function) code without a frame-pointer
/// prologue, realigned stacks, optimized-looking code, undecodable bytes,
/// unrecognized indirect jumps and inconsistent stack depths. A loop without
/// a safe place to pause simply gets no update point (numbering stays
/// stable); likewise the entry point is left out when the row after the
/// spills is not safe.
pub fn analyze_function(
    f: &Function,
    program: &Program,
    code: &[u8],
    text: &CodeView,
) -> Result<FunctionTable, AnalysisError> {
    analyze_function_detailed(f, program, code, text).map(|(t, _)| t)
}

/// [`analyze_function`], also returning the CFG facts and notes.
pub fn analyze_function_detailed(
    f: &Function,
    program: &Program,
    code: &[u8],
    text: &CodeView,
) -> Result<(FunctionTable, Details), AnalysisError> {
    let name = f.name.as_str();
    let want = f.high.offset_from(f.low);
    if want != Some(code.len() as u64) {
        return Err(AnalysisError::CodeSize {
            function: name.to_string(),
            low: f.low,
            high: f.high,
            got: code.len(),
        });
    }
    // An instruction is at least one byte: the cap bounds every later vector.
    if code.len() > MAX_INSNS.saturating_mul(4) {
        return Err(AnalysisError::TooLarge {
            function: name.to_string(),
        });
    }
    let insns = decode::decode_function(name, f.low, code)?;
    if insns.len() > MAX_INSNS {
        return Err(AnalysisError::TooLarge {
            function: name.to_string(),
        });
    }
    let prologue = frame::check(name, &insns)?;
    let never_returns = |insn: &Insn| calls::never_returns(insn, program, text);
    let outside = cfg::Outside {
        view: text,
        never_returns: &never_returns,
        labels: &program.code_labels,
    };
    let cfg = cfg::build(name, &insns, &outside)?;
    let dom = dom::dominators(&cfg);
    let loops = dom::natural_loops(&cfg, &dom);
    let stack = stack::analyze(name, &insns, &cfg, &dom)?;
    let body_at = insns.get(prologue.end).map_or(f.high, |i| i.addr);
    if stack.depth(prologue.end).and_then(|d| d.known()) != Some(prologue.body_depth)
        && prologue.end < insns.len()
    {
        return Err(AnalysisError::UnknownBodyDepth {
            function: name.to_string(),
            addr: body_at,
        });
    }

    // Registers: what calls read from the callee's signature, what `ret`
    // reads from the return type.
    let call_inputs = |i: usize| -> RegSet {
        let ins = &insns[i].ins;
        if ins.flow_control() == iced_x86::FlowControl::Call {
            let target = LinkAddr(ins.near_branch_target());
            liveness::signature_inputs(program, target)
                .or_else(|| text.plt_import_at(target).and_then(liveness::import_inputs))
                .unwrap_or(decode::CALL_INPUTS)
        } else {
            decode::CALL_INPUTS
        }
    };
    let ret_regs = liveness::return_regs(program, f.return_type);
    let eff = liveness::effects(&insns, &cfg, &dom, &call_inputs, ret_regs);
    let live = liveness::live_in(&insns, &cfg, &eff);

    let desc = slots::described(f, program);
    let temps = slots::TempInfo::analyze(name, &insns, &cfg, &dom, &stack, &desc)?;
    let rows = points::rows(program, f.low, f.high);
    let last_line = rows.last().map(|r| (r.file, r.line));

    let ctx = Ctx {
        name,
        f,
        program,
        insns,
        cfg,
        dom,
        loops,
        stack,
        live,
        rows,
        last_line,
        prologue,
        desc,
        temps,
    };
    let mut notes = Vec::new();
    let mut update_points = Vec::new();
    if let Some(p) = ctx.entry_point(&mut notes) {
        update_points.push(p);
    }
    for k in 0..ctx.loops.len() {
        if let Some(p) = ctx.loop_point(k, &mut notes) {
            update_points.push(p);
        }
    }
    update_points.sort_by_key(|p| p.addr);
    let call_sites = ctx.call_sites(text, &mut notes)?;
    let extent = ctx.extent();

    let details = Details {
        block_starts: ctx
            .cfg
            .blocks
            .iter()
            .map(|b| ctx.insns[b.first].addr)
            .collect(),
        loops: ctx
            .loops
            .iter()
            .map(|l| LoopInfo {
                header: ctx.insns[ctx.cfg.blocks[l.header].first].addr,
                blocks: l
                    .blocks
                    .iter()
                    .map(|&b| ctx.insns[ctx.cfg.blocks[b].first].addr)
                    .collect(),
            })
            .collect(),
        jump_tables: ctx
            .cfg
            .tables
            .iter()
            .map(|t| JumpTableInfo {
                jmp: ctx.insns[t.jmp].addr,
                table: t.table,
                entries: t.entries,
                targets: t.targets.clone(),
            })
            .collect(),
        notes,
        detours: Vec::new(),
    };
    let mut details = details;
    let table = FunctionTable {
        name: f.name.clone(),
        low: f.low,
        high: f.high,
        decl_file: f.decl_file,
        decl_line: f.decl_line,
        frame_base: f.frame_base,
        external: f.external,
        saved_regs: f.saved_regs.clone(),
        body_depth: ctx.prologue.body_depth,
        extent,
        vars: f.params.iter().chain(&f.locals).cloned().collect(),
        update_points,
        call_sites,
        var_inits: ctx.var_inits(),
    };
    details.detours = ctx.detours(&table);
    Ok((table, details))
}

impl Ctx<'_> {
    /// The lowest CFA offset the frame uses: variables, saved registers,
    /// every frame memory operand, every known stack depth (which covers
    /// pushed stack arguments).
    fn extent(&self) -> CfaOffset {
        let mut lo = self.prologue.body_depth.0;
        for v in self.f.params.iter().chain(&self.f.locals) {
            if let VarLocation::Cfa(o) | VarLocation::CfaIndirect(o) = v.location {
                lo = lo.min(o.0);
            }
        }
        for s in &self.f.saved_regs {
            lo = lo.min(s.offset.0);
        }
        for (i, insn) in self.insns.iter().enumerate() {
            if let Some(d) = self.stack.depth(i).and_then(|d| d.known()) {
                lo = lo.min(d.0);
            }
            for m in &insn.mem {
                if let slots::Access::Frame { off, .. } = slots::resolve(&self.stack, i, m) {
                    lo = lo.min(off);
                }
            }
        }
        CfaOffset(lo)
    }
}

/// Block starts by address, for callers that want to map addresses to
/// blocks without re-running the analysis.
pub fn block_map(details: &Details) -> BTreeMap<LinkAddr, usize> {
    details
        .block_starts
        .iter()
        .enumerate()
        .map(|(i, a)| (*a, i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use upstare_dwarf::model::FrameBaseKind;

    fn function(code_len: usize) -> Function {
        Function {
            name: "fuzzed".into(),
            low: LinkAddr(0x1000),
            high: LinkAddr(0x1000 + code_len as u64),
            decl_file: None,
            decl_line: 0,
            frame_base: FrameBaseKind::Cfa,
            return_type: None,
            is_varargs: false,
            external: true,
            params: Vec::new(),
            locals: Vec::new(),
            saved_regs: Vec::new(),
        }
    }

    /// Hostile code never panics: random bytes after a valid prologue, and
    /// with random prologue-like prefixes.
    #[test]
    fn random_code_is_an_error_or_a_table_never_a_panic() {
        let program = Program::default();
        let view = CodeView::default();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // Instructions that steer the analyses: stack ops, branches, calls.
        let pieces: &[&[u8]] = &[
            &[0x55],                   // push rbp
            &[0x48, 0x89, 0xe5],       // mov rbp,rsp
            &[0x48, 0x83, 0xec, 0x20], // sub rsp,0x20
            &[0x48, 0x29, 0xc4],       // sub rsp,rax
            &[0x48, 0x89, 0xc4],       // mov rsp,rax
            &[0x48, 0x89, 0xe0],       // mov rax,rsp
            &[0x5d],                   // pop rbp
            &[0xc9],                   // leave
            &[0xc3],                   // ret
            &[0x6a, 0x07],             // push 7
            &[0x75, 0x02],             // jne +2
            &[0xeb, 0xfe],             // jmp self
            &[0xe8, 0, 0, 0, 0],       // call next
            &[0xff, 0xd0],             // call rax
            &[0xff, 0xe0],             // jmp rax
            &[0x8b, 0x45, 0xfc],       // mov eax,[rbp-4]
            &[0x89, 0x45, 0xf8],       // mov [rbp-8],eax
            &[0x48, 0x8d, 0x65, 0xf0], // lea rsp,[rbp-0x10]
            &[0x83, 0x7d, 0xec, 0x09], // cmp dword [rbp-0x14],9
            &[0x77, 0x00],             // ja +0
        ];
        for round in 0..3000 {
            let mut code = vec![0x55, 0x48, 0x89, 0xe5];
            let n = (next() % 40) as usize;
            for _ in 0..n {
                if round % 3 == 0 {
                    code.push(next() as u8);
                } else {
                    code.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
                }
            }
            let f = function(code.len());
            let _ = analyze_function(&f, &program, &code, &view);
        }
        // Wrong code length is an error naming the function.
        let f = function(10);
        let e = analyze_function(&f, &program, &[0x55], &view).unwrap_err();
        assert!(e.to_string().starts_with("function fuzzed:"), "{e}");
    }

    #[test]
    fn prologue_shapes() {
        let program = Program::default();
        let view = CodeView::default();
        let run = |code: &[u8]| analyze_function(&function(code.len()), &program, code, &view);
        // push rbp; mov rbp,rsp; push rbx; sub rsp,0x18; ...; mov rbx,[rbp-8]; leave; ret
        let t = run(&[
            0x55, 0x48, 0x89, 0xe5, 0x53, 0x48, 0x83, 0xec, 0x18, 0x90, 0x48, 0x8b, 0x5d, 0xf8,
            0xc9, 0xc3,
        ])
        .expect("valid");
        assert_eq!(t.body_depth, CfaOffset(-48));
        assert_eq!(t.extent, CfaOffset(-48));
        // A 128-byte frame: gcc writes `add rsp,-128` (imm8).
        let t = run(&[
            0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xc4, 0x80, 0x90, 0xc9, 0xc3,
        ])
        .expect("add rsp,-128");
        assert_eq!(t.body_depth, CfaOffset(-144));
        // `add rsp,+N` is no frame allocation.
        let t = run(&[
            0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xc4, 0x10, 0x90, 0xc9, 0xc3,
        ]);
        assert!(t.map_or(true, |t| t.body_depth == CfaOffset(-16)));
        // endbr64 first is accepted.
        let t = run(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5, 0x5d, 0xc3]).expect("ibt");
        assert_eq!(t.body_depth, CfaOffset(-16));
        // No frame pointer.
        assert!(matches!(
            run(&[0x8d, 0x47, 0x01, 0xc3]),
            Err(AnalysisError::NoFramePointer { .. })
        ));
        // DRAP: lea r10,[rsp+8]; and rsp,-32
        assert!(matches!(
            run(&[0x4c, 0x8d, 0x54, 0x24, 0x08, 0x48, 0x83, 0xe4, 0xe0, 0xc3]),
            Err(AnalysisError::Realigned { .. })
        ));
        // rbp written in the body.
        assert!(matches!(
            run(&[0x55, 0x48, 0x89, 0xe5, 0x48, 0x89, 0xc5, 0x5d, 0xc3]),
            Err(AnalysisError::OptimizedCode { .. })
        ));
        // Paths joining with different depths: push on one branch only.
        let e = run(&[
            0x55, 0x48, 0x89, 0xe5, // prologue
            0x75, 0x02, // jne +2
            0x6a, 0x07, // push 7
            0x90, // join
            0xc9, 0xc3,
        ])
        .unwrap_err();
        assert!(matches!(e, AnalysisError::StackConflict { .. }), "{e}");
        // An indirect jump that is not a switch.
        assert!(matches!(
            run(&[0x55, 0x48, 0x89, 0xe5, 0xff, 0xe0]),
            Err(AnalysisError::UnknownIndirectJump { .. })
        ));
    }
}
