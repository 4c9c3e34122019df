//! Frame-description tables (FDT): what the rewriter stores in the `.upstare`
//! section of an instrumented binary and what the patcher and the runtime read
//! back. This module is the single encoder and the single decoder.
//!
//! Layout of the section:
//! ```text
//!   magic "UPSTFDT\0" | version u16 LE | reserved u16 | payload length u32 LE
//!   | tables SHA-256 (32) | code SHA-256 (32) | payload
//! ```
//! The payload is the [`FrameTables`] value in the postcard format (varints,
//! length-prefixed sequences). The tables' SHA-256 covers every other byte
//! of the section (header, code digest, payload): a section changed after
//! the rewriter wrote it is refused as a whole. The code SHA-256 is the
//! [`crate::section::code_digest`] of the binary the tables describe: its
//! loaded bytes, checked by [`crate::read_tables`] against the file the
//! section is found in, so tables are never used with another binary. The decoder never panics on hostile bytes and
//! never allocates more than the input can justify: postcard reads sequences
//! element by element and serde caps pre-allocation; the whole section is
//! capped at [`MAX_SECTION_SIZE`].

use crate::addr::{CfaOffset, LinkAddr, Reg};
use crate::model::{FrameBaseKind, Global, SavedReg, Type, Variable};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;

/// Name of the non-allocated ELF section that carries the tables.
pub const SECTION_NAME: &str = ".upstare";
/// First bytes of the section.
pub const MAGIC: &[u8; 8] = b"UPSTFDT\0";
/// Format version written by this encoder and the only one this decoder reads.
///
/// Version 3 added the checksums (version 2 tables are refused: instrument
/// the binary again); version 4 the arming mode ([`Arming`]).
pub const VERSION: u16 = 4;
/// Larger sections are refused before any parsing.
pub const MAX_SECTION_SIZE: usize = 256 << 20;
/// Fixed fields before the digests.
const FIXED_LEN: usize = 16;
/// Bytes before the payload: fixed fields and the two digests.
pub const HEADER_LEN: usize = FIXED_LEN + 64;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// A decoded section: the tables and the digest of the code and data of
/// the binary they were made for.
#[derive(Clone, Debug, PartialEq)]
pub struct Section {
    pub tables: FrameTables,
    /// [`crate::section::code_digest`] of the binary the rewriter read.
    pub code_digest: Digest,
}

/// All tables of one binary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FrameTables {
    pub binary: BinaryInfo,
    /// Source file names, indexed by `file` fields.
    pub files: Vec<String>,
    /// Types, indexed by [`crate::model::TypeId`].
    pub types: Vec<Type>,
    /// Globals and static locals.
    pub globals: Vec<Global>,
    /// Per-function tables, sorted by `low`.
    pub functions: Vec<FunctionTable>,
    /// How update points are armed in this binary.
    pub arming: Arming,
}

/// How the runtime arms the update points of a binary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arming {
    /// `int3` written at every update point (the default: the code is the
    /// compiler's, byte for byte).
    #[default]
    Int3,
    /// `upstare-rewrite --inline-points`: detoured points test one flag
    /// byte in a trampoline; the others are armed with `int3`.
    Inline(InlinePoints),
}

/// The trampolines of a binary rewritten with `--inline-points`.
///
/// Each detoured update point starts with a `jmp rel32` to its trampoline:
/// ```text
///   cmp byte [rip + flag], 0 ; je resume ; trap: int3
///   resume: the displaced instructions, relocated ; jmp point + displaced
/// ```
/// A thread that traps there (rip = `trap + 1`) is where it would be had
/// it hit an `int3` at the point: flags are dead at every update point and
/// none of the displaced instructions has run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InlinePoints {
    /// The flag byte: non-zero arms every detoured point at once.
    pub flag: LinkAddr,
    /// The trampolines' code: `[start, end)`.
    pub trampolines: (LinkAddr, LinkAddr),
    /// Detoured points, sorted by `point` (every other update point is
    /// armed with `int3`).
    pub detours: Vec<Detour>,
}

/// One detoured update point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detour {
    /// The update point (where the `jmp rel32` is).
    pub point: LinkAddr,
    /// The `int3` in its trampoline.
    pub trap: LinkAddr,
    /// How many bytes of the point's instructions the `jmp` displaced
    /// (5 or more: whole instructions).
    pub displaced: u8,
}

impl InlinePoints {
    /// Shortest `jmp rel32`.
    pub const JMP_LEN: u8 = 5;

    /// The detour whose trampoline `int3` is at `trap`.
    pub fn detour_trapping_at(&self, trap: LinkAddr) -> Option<&Detour> {
        self.detours.iter().find(|d| d.trap == trap)
    }
    /// The detour at update point `point`.
    pub fn detour_at(&self, point: LinkAddr) -> Option<&Detour> {
        let i = self.detours.partition_point(|d| d.point < point);
        self.detours.get(i).filter(|d| d.point == point)
    }
}

/// Facts about the binary the tables describe.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinaryInfo {
    /// Position-independent executable (ET_DYN).
    pub pie: bool,
    /// `DW_AT_producer` of the first compilation unit.
    pub producer: String,
    /// GNU build id of the original binary, if it has one.
    pub build_id: Vec<u8>,
    /// Link-time address and size of `.text`.
    pub text_addr: LinkAddr,
    pub text_size: u64,
}

/// Frame description of one function.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FunctionTable {
    pub name: String,
    pub low: LinkAddr,
    pub high: LinkAddr,
    pub decl_file: Option<u32>,
    pub decl_line: u32,
    pub frame_base: FrameBaseKind,
    pub external: bool,
    /// Registers saved by the prologue and where, including rbp at CFA-16.
    pub saved_regs: Vec<SavedReg>,
    /// rsp relative to the CFA once the prologue has run.
    pub body_depth: CfaOffset,
    /// Lowest CFA offset any part of the frame uses (locals in the red zone
    /// included): the frame occupies `[CFA + extent, CFA)`.
    pub extent: CfaOffset,
    /// Parameters (first, in declaration order) and locals.
    pub vars: Vec<Variable>,
    /// Update points in address order.
    pub update_points: Vec<UpdatePoint>,
    /// Call sites in address order.
    pub call_sites: Vec<CallSite>,
    /// Where locals declared with an initializer get it, in `vars` order.
    pub var_inits: Vec<VarInit>,
}

/// The store that initializes a local at its declaration (the first store
/// to the local's slot on its declaration line). A frame paused after it,
/// in a version that added the local, must give the local that value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VarInit {
    /// Index into the function's `vars`.
    pub var: u32,
    /// Address of the store.
    pub addr: LinkAddr,
    /// The bytes stored, when the store writes a constant covering the
    /// whole local (`long seen = 0;`); `None` for a computed value.
    pub constant: Option<Vec<u8>>,
}

/// Which kind of update point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PointKind {
    /// After the prologue, all parameters spilled.
    Entry,
    /// Inside the k-th loop (0-based, loops in address order of their header).
    Loop(u32),
}

/// A place where a thread may be paused with no state in registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdatePoint {
    pub kind: PointKind,
    pub addr: LinkAddr,
    pub file: u32,
    pub line: u32,
    /// rsp relative to the CFA at this point.
    pub stack_depth: CfaOffset,
}

/// Who a call calls.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Callee {
    /// A function of this binary.
    Direct(String),
    /// An import through the PLT (`read`, `printf`).
    Plt(String),
    /// Through a register or memory operand.
    Indirect,
}

impl Callee {
    /// Name used in continuation ids: the symbol, or `*` for indirect calls.
    pub fn id_name(&self) -> &str {
        match self {
            Callee::Direct(n) | Callee::Plt(n) => n,
            Callee::Indirect => "*",
        }
    }
}

/// A stack slot that DWARF does not describe but that holds a value across a
/// call (written before the call, read after it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TempSlot {
    pub offset: CfaOffset,
    pub size: u32,
}

/// One `call` instruction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallSite {
    pub call_addr: LinkAddr,
    /// The address after the call: what the callee's frame holds at CFA-8.
    pub return_addr: LinkAddr,
    pub callee: Callee,
    /// 0-based index among the calls to the same callee in this function.
    pub ordinal: u32,
    /// rsp relative to the CFA just before the call executes (stack-passed
    /// arguments included). The callee's CFA equals the caller's CFA plus
    /// this value. [`CallSite::DYNAMIC_DEPTH`] when rsp is only known at run
    /// time (a VLA or `alloca` moved it); see [`CallSite::fixed_depth`].
    pub stack_depth: CfaOffset,
    /// Callee-saved registers holding values live across the call.
    pub live_regs: Vec<Reg>,
    /// Undescribed stack slots live across the call.
    pub temp_slots: Vec<TempSlot>,
    /// Start of the call's statement when re-executing it from there is free
    /// of side effects (only loads and stores to the call's own temporaries
    /// before the call); `None` otherwise.
    pub restart: Option<LinkAddr>,
    pub file: u32,
    pub line: u32,
}

/// Identity of a place a frame can resume at, stable across versions:
/// `entry`, `loop#k`, `call:NAME#k`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Continuation {
    Entry,
    Loop(u32),
    Call { callee: String, ordinal: u32 },
}

impl fmt::Display for Continuation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Continuation::Entry => f.write_str("entry"),
            Continuation::Loop(k) => write!(f, "loop#{k}"),
            Continuation::Call { callee, ordinal } => write!(f, "call:{callee}#{ordinal}"),
        }
    }
}

impl UpdatePoint {
    /// The continuation id of this point.
    pub fn continuation(&self) -> Continuation {
        match self.kind {
            PointKind::Entry => Continuation::Entry,
            PointKind::Loop(k) => Continuation::Loop(k),
        }
    }
}

impl CallSite {
    /// The `stack_depth` of a call whose depth is only known at run time.
    pub const DYNAMIC_DEPTH: CfaOffset = CfaOffset(i64::MIN);

    /// The stack depth at the call, `None` when it is only known at run time.
    pub fn fixed_depth(&self) -> Option<CfaOffset> {
        (self.stack_depth != Self::DYNAMIC_DEPTH).then_some(self.stack_depth)
    }

    /// The continuation id of a frame paused in this call.
    pub fn continuation(&self) -> Continuation {
        Continuation::Call {
            callee: self.callee.id_name().to_string(),
            ordinal: self.ordinal,
        }
    }
}

impl FrameTables {
    /// The function table whose code contains `addr`.
    pub fn function_at(&self, addr: LinkAddr) -> Option<&FunctionTable> {
        let i = self.functions.partition_point(|f| f.low <= addr);
        let f = self.functions.get(i.checked_sub(1)?)?;
        (addr < f.high).then_some(f)
    }
    /// The function table named `name`.
    pub fn function(&self, name: &str) -> Option<&FunctionTable> {
        self.functions.iter().find(|f| f.name == name)
    }

    /// The function of these tables named `name` that is `of`, a function
    /// of `from` (the tables of another build of the program). Static
    /// functions of one name in several units (PostgreSQL has a
    /// `check_role` in `hba.c` and another in `variable.c`) are told apart
    /// by the file that declares them: the candidate whose path ends with
    /// the most components of `of`'s. Copies of one `static inline`
    /// function of a header (one per unit that uses it, the same code)
    /// share a file: the first is taken. `None` when several candidates
    /// remain and none is declared in a file of `of`'s name.
    pub fn counterpart(
        &self,
        name: &str,
        of: &FunctionTable,
        from: &FrameTables,
    ) -> Option<&FunctionTable> {
        let mut candidates = self.functions.iter().filter(|f| f.name == name);
        let first = candidates.next()?;
        let Some(second) = candidates.next() else {
            return Some(first);
        };
        let path = of
            .decl_file
            .and_then(|i| from.files.get(i as usize))
            .map(|p| normal_components(p))?;
        let score = |f: &FunctionTable| {
            f.decl_file
                .and_then(|i| self.files.get(i as usize))
                .map_or(0, |p| {
                    normal_components(p)
                        .iter()
                        .rev()
                        .zip(path.iter().rev())
                        .take_while(|(a, b)| a == b)
                        .count()
                })
        };
        let mut best: Option<(&FunctionTable, usize)> = None;
        for f in [first, second].into_iter().chain(candidates) {
            let s = score(f);
            if s > best.map_or(0, |(_, b)| b) {
                best = Some((f, s));
            }
        }
        best.map(|(f, _)| f)
    }
}

impl FrameTables {
    /// The function named `name` that a frame paused at `pc` runs: the one
    /// containing `pc` (or, for a return address that ends its function,
    /// `pc - 1`) when it has that name, else the first of that name.
    pub fn frame_function(&self, name: &str, pc: LinkAddr) -> Option<&FunctionTable> {
        let named = |a: LinkAddr| self.function_at(a).filter(|f| f.name == name);
        named(pc)
            .or_else(|| pc.0.checked_sub(1).and_then(|a| named(LinkAddr(a))))
            .or_else(|| self.function(name))
    }

    /// Whether functions `a` and `b` of these tables are declared in the
    /// same file (two units' copies of one `static inline` function of a
    /// header).
    pub fn same_declaration(&self, a: &FunctionTable, b: &FunctionTable) -> bool {
        let path = |f: &FunctionTable| {
            f.decl_file
                .and_then(|i| self.files.get(i as usize))
                .map(|p| normal_components(p))
        };
        a.decl_line == b.decl_line && path(a).is_some() && path(a) == path(b)
    }
}

/// The components of `path` with `.` and `dir/..` pairs resolved
/// lexically (DWARF names a header as `unit-dir/../../include/x.h`).
fn normal_components(path: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

impl FunctionTable {
    /// The update point at exactly `addr`.
    pub fn update_point_at(&self, addr: LinkAddr) -> Option<&UpdatePoint> {
        self.update_points.iter().find(|p| p.addr == addr)
    }
    /// The call site whose return address is `ret`.
    pub fn call_site_returning_to(&self, ret: LinkAddr) -> Option<&CallSite> {
        self.call_sites.iter().find(|c| c.return_addr == ret)
    }
    /// Variables in scope at `pc`.
    pub fn vars_at(&self, pc: LinkAddr) -> impl Iterator<Item = &Variable> {
        self.vars
            .iter()
            .filter(move |v| v.scope.iter().any(|&(a, b)| a <= pc && pc < b))
    }
}

/// Why a section could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame tables: section too short ({0} bytes)")]
    TooShort(usize),
    #[error("frame tables: section of {0} bytes exceeds the {MAX_SECTION_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("frame tables: bad magic (not an upstare section)")]
    BadMagic,
    #[error("frame tables: version {0} is not supported (this build reads version {VERSION}): instrument the binary again with upstare-rewrite")]
    UnsupportedVersion(u16),
    #[error("frame tables: payload length {declared} does not match the {actual} bytes present")]
    LengthMismatch { declared: u64, actual: u64 },
    #[error("frame tables do not match their checksum: the {SECTION_NAME} section was changed or corrupted after upstare-rewrite")]
    TablesChecksum,
    #[error("frame tables: corrupt payload: {0}")]
    Corrupt(String),
    #[error("frame tables: {0}")]
    Invalid(String),
}

/// Why tables could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("frame tables: cannot encode: {0}")]
    Serialize(String),
    #[error("frame tables: encoded size {0} exceeds the {MAX_SECTION_SIZE}-byte limit")]
    TooLarge(usize),
}

/// Encodes `tables`, made for the binary whose
/// [`crate::section::code_digest`] is `code`, into section bytes.
pub fn encode(tables: &FrameTables, code: &Digest) -> Result<Vec<u8>, EncodeError> {
    let payload =
        postcard::to_allocvec(tables).map_err(|e| EncodeError::Serialize(e.to_string()))?;
    let total = payload.len() + HEADER_LEN;
    if total > MAX_SECTION_SIZE {
        return Err(EncodeError::TooLarge(total));
    }
    let len = u32::try_from(payload.len()).map_err(|_| EncodeError::TooLarge(total))?;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    let sum = tables_digest(&out, code, &payload);
    out.extend_from_slice(&sum);
    out.extend_from_slice(code);
    out.extend_from_slice(&payload);
    Ok(out)
}

/// The tables' checksum: SHA-256 of the fixed fields, the code digest and
/// the payload (every byte of the section but itself).
fn tables_digest(fixed: &[u8], code: &[u8], payload: &[u8]) -> Digest {
    let mut h = Sha256::new();
    h.update(fixed);
    h.update(code);
    h.update(payload);
    h.finalize().into()
}

/// Decodes section bytes, checking the tables' checksum (the code digest
/// is returned for the caller to check against the file: see
/// [`crate::read_tables`]); never panics.
pub fn decode(bytes: &[u8]) -> Result<Section, DecodeError> {
    if bytes.len() > MAX_SECTION_SIZE {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let (header, payload) = bytes
        .split_at_checked(HEADER_LEN)
        .ok_or(DecodeError::TooShort(bytes.len()))?;
    if &header[..8] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let declared = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    if declared as usize != payload.len() {
        return Err(DecodeError::LengthMismatch {
            declared: u64::from(declared),
            actual: payload.len() as u64,
        });
    }
    let (fixed, digests) = header.split_at(FIXED_LEN);
    let (sum, code) = digests.split_at(32);
    if tables_digest(fixed, code, payload)[..] != *sum {
        return Err(DecodeError::TablesChecksum);
    }
    let mut code_digest = [0u8; 32];
    code_digest.copy_from_slice(code);
    Ok(Section {
        tables: decode_payload(payload)?,
        code_digest,
    })
}

/// Decodes and validates a payload (the part after [`HEADER_LEN`]) with no
/// checksum: what the decoder does once the checksum matched, exposed so
/// that fuzzing reaches it. Never panics.
pub fn decode_payload(payload: &[u8]) -> Result<FrameTables, DecodeError> {
    let (tables, rest): (FrameTables, &[u8]) =
        postcard::take_from_bytes(payload).map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Corrupt(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    validate(&tables)?;
    Ok(tables)
}

/// Checks the cross-references a consumer will follow, so that a decoded
/// table can be indexed without further checks.
fn validate(t: &FrameTables) -> Result<(), DecodeError> {
    let ntypes = t.types.len();
    let nfiles = t.files.len();
    let ty_ok = |id: crate::model::TypeId| (id.0 as usize) < ntypes;
    let bad = |what: String| Err(DecodeError::Invalid(what));
    for (i, ty) in t.types.iter().enumerate() {
        let refs: Vec<crate::model::TypeId> = match ty {
            Type::Pointer { pointee } => pointee.iter().copied().collect(),
            Type::Struct { members, .. } | Type::Union { members, .. } => {
                members.iter().map(|m| m.ty).collect()
            }
            Type::Array { element, .. } => vec![*element],
            Type::Enum { underlying, .. } => underlying.iter().copied().collect(),
            Type::Typedef { target, .. } | Type::Qualified { target, .. } => {
                target.iter().copied().collect()
            }
            Type::Function { ret, params, .. } => {
                ret.iter().copied().chain(params.iter().copied()).collect()
            }
            Type::Void | Type::Base { .. } => Vec::new(),
        };
        if let Some(r) = refs.into_iter().find(|r| !ty_ok(*r)) {
            return bad(format!("type {i} refers to missing type {}", r.0));
        }
    }
    for g in &t.globals {
        if !ty_ok(g.ty) {
            return bad(format!("global {} has missing type {}", g.name, g.ty.0));
        }
    }
    let mut prev_low = LinkAddr(0);
    for f in &t.functions {
        if f.low > f.high || f.low < prev_low {
            return bad(format!("function {} has a bad or unsorted range", f.name));
        }
        prev_low = f.low;
        if f.decl_file.is_some_and(|x| x as usize >= nfiles) {
            return bad(format!("function {} names a missing file", f.name));
        }
        if let Some(v) = f.vars.iter().find(|v| !ty_ok(v.ty)) {
            return bad(format!(
                "{}: variable {} has a missing type",
                f.name, v.name
            ));
        }
        let inside = |a: LinkAddr| a >= f.low && a < f.high;
        for p in &f.update_points {
            if !inside(p.addr) || (p.line != 0 && p.file as usize >= nfiles) {
                return bad(format!("{}: update point {} out of range", f.name, p.addr));
            }
        }
        for c in &f.call_sites {
            if !inside(c.call_addr) || (c.line != 0 && c.file as usize >= nfiles) {
                return bad(format!(
                    "{}: call site {} out of range",
                    f.name, c.call_addr
                ));
            }
        }
        for init in &f.var_inits {
            let var_ok = usize::try_from(init.var).is_ok_and(|v| v < f.vars.len());
            if !var_ok || !inside(init.addr) || init.constant.as_ref().is_some_and(|c| c.len() > 8)
            {
                return bad(format!(
                    "{}: initializer of variable #{} at {} out of range",
                    f.name, init.var, init.addr
                ));
            }
        }
    }
    validate_arming(t)
}

/// Every detour is at an update point, displaces whole bytes inside its
/// function, traps inside the trampolines, and the flag lies outside
/// every function's code.
fn validate_arming(t: &FrameTables) -> Result<(), DecodeError> {
    let Arming::Inline(inline) = &t.arming else {
        return Ok(());
    };
    let bad = |what: String| Err(DecodeError::Invalid(what));
    let (lo, hi) = inline.trampolines;
    if lo > hi {
        return bad(format!("trampolines {lo}..{hi}: bad range"));
    }
    if t.function_at(inline.flag).is_some() || (lo <= inline.flag && inline.flag < hi) {
        return bad(format!("arming flag {} lies in code", inline.flag));
    }
    // End of the previous detour's displaced bytes: detours never overlap.
    let mut prev_end: Option<u64> = None;
    for d in &inline.detours {
        if prev_end.is_some_and(|p| p > d.point.0) {
            return bad(format!("detour at {}: unsorted or overlapping", d.point));
        }
        prev_end = d.point.0.checked_add(u64::from(d.displaced));
        let in_function = t.function_at(d.point).is_some_and(|f| {
            f.update_point_at(d.point).is_some() && {
                let end = d.point.0.checked_add(u64::from(d.displaced));
                end.is_some_and(|e| e <= f.high.0)
            }
        });
        let trap_end = d.trap.0.checked_add(1);
        if !in_function
            || d.displaced < InlinePoints::JMP_LEN
            || d.trap < LinkAddr(lo.0)
            || trap_end.is_none_or(|e| e > hi.0)
        {
            return bad(format!("detour at {}: out of range", d.point));
        }
    }
    Ok(())
}
