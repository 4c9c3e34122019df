//! Rebuilding every paused thread's stack for the new version.
//!
//! From the bottom frame (main or a thread's start routine, whose CFA stays
//! put) upward, each old frame is mapped to the new version's function and
//! continuation; its new CFA follows from the caller's stack depth at the
//! mapped call site. A frame whose layout did not change is copied byte for
//! byte (undescribed temporaries and stack arguments included); a frame whose
//! layout changed is rebuilt variable by variable. Return addresses, saved
//! rbp and saved callee-saved registers are rewritten; the top frame resumes
//! at its update point or re-executes its blocked call's statement.
//!
//! Everything is computed from reads into a list of writes and final
//! registers; nothing is written here. Planning runs in two steps so pointer
//! remapping knows where every old frame went before any value is remapped:
//! [`place_frames`] then [`frame_writes`].

use std::collections::HashMap;
use upstare_dwarf::fdt::{CallSite, Continuation, FrameTables, FunctionTable, UpdatePoint};
use upstare_dwarf::model::{type_size, VarLocation, Variable};
use upstare_dwarf::{Reg, RuntimeAddr};
use upstare_patcher::{
    CallShape, ContinuationMapping, FunctionMapping, SiteKind, UpdatePlan, VarSource,
};

use crate::engine::convert::convert;
use crate::engine::pointers::{RebuiltFrame, Remapper, StackMove};
use crate::engine::state::{AppFrame, CalleeSavedValues, Image, Readiness, ThreadState};
use crate::engine::Write;
use crate::memory::{MemError, TargetMemory};
use crate::target::ptrace::Regs;
use nix::unistd::Pid;
use upstare_patcher::review::{spec_line, SpecKey};

/// Largest frame rebuilt (bytes between its lowest byte and its CFA).
pub const MAX_FRAME_SIZE: i64 = 16 << 20;
/// Callee-saved registers other than rbp, which is the frame chain.
const CALLEE_SAVED: [Reg; 5] = [Reg::Rbx, Reg::R12, Reg::R13, Reg::R14, Reg::R15];

/// Why a thread's stack cannot be rebuilt for the new version.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("thread {tid}: function {function} is active on the stack but no longer exists in the new version")]
    FunctionRemoved { tid: Pid, function: String },
    #[error("thread {tid}: function {function} of {file} is active on the stack and shares its name with a static function of another file, whose mapping the plan holds; update while it is not active")]
    Homonym {
        tid: Pid,
        function: String,
        file: String,
    },
    #[error("thread {tid}: function {function} is paused at {continuation}, which the new version does not have")]
    ContinuationMissing {
        tid: Pid,
        function: String,
        continuation: Continuation,
    },
    #[error("thread {tid}: function {function} is paused at {continuation}, whose place in the new version is not sure: {why}; name it with the SPEC line: {spec_line}")]
    ContinuationUnsure {
        tid: Pid,
        function: String,
        continuation: Continuation,
        why: String,
        spec_line: String,
    },
    #[error("thread {tid}: {function} at {continuation}: the new version cannot re-execute the blocked call (no restart address)")]
    NoRestart {
        tid: Pid,
        function: String,
        continuation: Continuation,
    },
    #[error("thread {tid}: {function}: local {var} changed type {change}; it needs a SPEC line or a transformer")]
    VarTypeChanged {
        tid: Pid,
        function: String,
        var: String,
        change: Box<UnmappedChange>,
    },
    #[error("thread {tid}: {function} at {continuation}: the frame layout changed but {why}")]
    Unmappable {
        tid: Pid,
        function: String,
        continuation: Continuation,
        why: String,
    },
    #[error("thread {tid}: {function}: frame of {size} bytes is too large")]
    FrameTooLarge {
        tid: Pid,
        function: String,
        size: i64,
    },
    #[error("thread {tid}: {function}: new local {var} was already initialized by the running code with a computed value; give it in the SPEC: values.locals.\"{function}\".\"{var}\" = ...")]
    NeedsValue {
        tid: Pid,
        function: String,
        var: String,
    },
    #[error("thread {tid}: no application frames")]
    NoFrames { tid: Pid },
    #[error("thread {tid}: {function}: {source}")]
    Memory {
        tid: Pid,
        function: String,
        #[source]
        source: MemError,
    },
}

/// A change of type no default rule maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmappedChange {
    pub old: String,
    pub new: String,
    pub why: String,
}

impl std::fmt::Display for UnmappedChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "from {} to {} and no default rule maps it ({})",
            self.old, self.new, self.why
        )
    }
}

fn needs_value(tid: Pid, function: &str, var: &str) -> RebuildError {
    RebuildError::NeedsValue {
        tid,
        function: function.to_string(),
        var: var.to_string(),
    }
}

/// Where a frame resumes in the new version.
#[derive(Clone, Copy, Debug)]
enum Site<'a> {
    /// The top frame at an update point.
    Point(&'a UpdatePoint),
    /// A frame below the top, paused in a call.
    Call(&'a CallSite),
    /// The top application frame of a blocked thread: re-execute the call's
    /// statement from its restart address.
    Restart(&'a CallSite),
}

/// How one frame is placed in the rebuilt stack.
#[derive(Clone, Debug)]
pub struct Placement {
    /// Index into the thread's old frames (top first).
    pub old_index: usize,
    pub function: String,
    pub continuation: Continuation,
    pub new_cfa: RuntimeAddr,
    /// Copied byte for byte (layout unchanged) or rebuilt per variable.
    pub copied: bool,
    /// Lowest byte of the rebuilt frame, relative to its new CFA.
    new_low: i64,
    /// Lowest byte of the old frame, relative to its old CFA.
    old_low: i64,
}

/// The placement of every frame of one thread, bottom first.
#[derive(Clone, Debug)]
pub struct ThreadLayout {
    pub tid: Pid,
    pub frames: Vec<Placement>,
}

/// The result for one thread: bytes to write and its final registers.
#[derive(Clone, Debug)]
pub struct ThreadPlan {
    pub tid: Pid,
    pub writes: Vec<Write>,
    pub regs: Regs,
    /// `function@continuation` per frame, top first, for the report.
    pub frames: Vec<String>,
    pub warnings: Vec<String>,
    /// Locals converted to a changed type, in words.
    pub converted: Vec<String>,
}

/// A frame's function in both versions, with the plan's mapping of it.
struct Mapped<'a> {
    plan: &'a FunctionMapping,
    old: &'a FunctionTable,
    new: &'a FunctionTable,
}

/// The plan's mapping of the function of frame `f` and its tables.
fn lookup<'a>(
    tid: Pid,
    plan: &'a UpdatePlan,
    old: &'a FrameTables,
    new: &'a FrameTables,
    f: &AppFrame,
) -> Result<Mapped<'a>, RebuildError> {
    let removed = || RebuildError::FunctionRemoved {
        tid,
        function: f.function.clone(),
    };
    let fm = plan.function(&f.function).ok_or_else(removed)?;
    let planned = old.functions.get(fm.old).ok_or_else(removed)?;
    // Static functions of one name in several units: the plan maps the
    // first by name; the frame's own is found by its address. Another
    // unit's copy of the same header function shares the plan; a
    // function of another file does not.
    let of = old.frame_function(&f.function, f.pc).unwrap_or(planned);
    if of.low != planned.low && !old.same_declaration(of, planned) {
        return Err(RebuildError::Homonym {
            tid,
            function: f.function.clone(),
            file: of
                .decl_file
                .and_then(|i| old.files.get(i as usize))
                .cloned()
                .unwrap_or_default(),
        });
    }
    let nf = fm
        .new
        .and_then(|j| new.functions.get(j))
        .and_then(|named| new.counterpart(&named.name, of, old))
        .ok_or_else(removed)?;
    Ok(Mapped {
        plan: fm,
        old: of,
        new: nf,
    })
}

/// How the top application frame of a thread resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopMode {
    /// At its update point.
    Point,
    /// Re-executing its blocked call's statement.
    Restart,
    /// Returning from a library call left in place.
    InPlace,
    /// At the return address of a call that has returned.
    Returned,
    /// About to call `pthread_mutex_lock`, returning to a call site.
    Relock,
}

fn top_mode(r: &Readiness) -> TopMode {
    match r {
        Readiness::AtPoint => TopMode::Point,
        Readiness::Blocked { .. } => TopMode::Restart,
        Readiness::InLibrary { .. }
        | Readiness::CallbackReturned { .. }
        | Readiness::UnderSignal { .. }
        | Readiness::UnderCallback { .. } => TopMode::InPlace,
        Readiness::Returned { .. } => TopMode::Returned,
        Readiness::Relock { .. } => TopMode::Relock,
    }
}

/// The mapped continuation of a frame, and where it is paused in each
/// version.
struct Sites<'a> {
    mapping: &'a ContinuationMapping,
    old: Site<'a>,
    new: Site<'a>,
}

impl Sites<'_> {
    /// Whether the plan copies the frame byte for byte when paused here.
    fn copied(&self) -> bool {
        match self.new {
            Site::Restart(_) => self.mapping.copy_restarted,
            Site::Point(_) | Site::Call(_) => self.mapping.copy_paused,
        }
    }
}

/// Where frame `f` (the top one when `top`) is paused in both versions, as
/// the plan maps its continuation.
fn find_sites<'a>(
    tid: Pid,
    m: &Mapped<'a>,
    continuation: &Continuation,
    top: bool,
    mode: TopMode,
) -> Result<Sites<'a>, RebuildError> {
    let missing = || RebuildError::ContinuationMissing {
        tid,
        function: m.old.name.clone(),
        continuation: continuation.clone(),
    };
    let kind = if top && mode == TopMode::Point {
        SiteKind::Point
    } else {
        SiteKind::Call
    };
    let cm = m
        .plan
        .continuation(continuation, kind)
        .ok_or_else(missing)?;
    if let (None, Some(why)) = (cm.new_site, &cm.unsure) {
        return Err(RebuildError::ContinuationUnsure {
            tid,
            function: m.old.name.clone(),
            continuation: continuation.clone(),
            why: why.clone(),
            spec_line: spec_line(SpecKey::Continuation {
                function: &m.old.name,
                continuation: &continuation.to_string(),
            }),
        });
    }
    let new_site = cm.new_site.ok_or_else(missing)?;
    if kind == SiteKind::Point {
        let op = m.old.update_points.get(cm.old_site).ok_or_else(missing)?;
        let np = m.new.update_points.get(new_site).ok_or_else(missing)?;
        return Ok(Sites {
            mapping: cm,
            old: Site::Point(op),
            new: Site::Point(np),
        });
    }
    let oc = m.old.call_sites.get(cm.old_site).ok_or_else(missing)?;
    let nc = m.new.call_sites.get(new_site).ok_or_else(missing)?;
    if top && mode == TopMode::Restart {
        if !cm.restartable {
            return Err(RebuildError::NoRestart {
                tid,
                function: m.new.name.clone(),
                continuation: continuation.clone(),
            });
        }
        return Ok(Sites {
            mapping: cm,
            old: Site::Restart(oc),
            new: Site::Restart(nc),
        });
    }
    Ok(Sites {
        mapping: cm,
        old: Site::Call(oc),
        new: Site::Call(nc),
    })
}

/// The stack depth of each call of OLD's function to the `setjmp` family
/// and of the same call in NEW as the plan maps it: a `jmp_buf` saved there
/// holds the caller's rsp as the call returns.
fn setjmp_depths(m: &Mapped<'_>) -> Vec<(i64, Option<i64>)> {
    m.old
        .call_sites
        .iter()
        .filter(|c| crate::engine::sweep::saves_mangled_return(c.callee.id_name()))
        .filter_map(|c| {
            let old = c.fixed_depth()?.0;
            let new = m
                .plan
                .continuation(&c.continuation(), SiteKind::Call)
                .and_then(|cm| m.new.call_sites.get(cm.new_site?))
                .and_then(|nc| nc.fixed_depth())
                .map(|d| d.0);
            Some((old, new))
        })
        .collect()
}

/// rsp relative to the CFA where the frame is paused (for a call: before
/// the call executes), `None` when only known at run time.
fn site_depth(ft: &FunctionTable, site: Site<'_>) -> Option<i64> {
    match site {
        Site::Point(p) => Some(p.stack_depth.0),
        Site::Call(c) => c.fixed_depth().map(|d| d.0),
        // The analysis only gives a restart address where the statement
        // starts at the body's depth.
        Site::Restart(_) => Some(ft.body_depth.0),
    }
}

/// Decides the new CFA and the copy mode of every frame of `thread`, and
/// tells `remap` where each old frame goes.
pub fn place_frames(
    thread: &ThreadState,
    plan: &UpdatePlan,
    old: &Image,
    new: &Image,
    remap: &mut Remapper<'_>,
) -> Result<ThreadLayout, RebuildError> {
    let tid = thread.tid;
    let n = thread.frames.len();
    if n == 0 {
        return Err(RebuildError::NoFrames { tid });
    }
    let mode = top_mode(&thread.readiness);
    let mut out = Vec::with_capacity(n);
    let mut caller_new_cfa: Option<(RuntimeAddr, i64)> = None; // (cfa, depth of the caller's call)
    for idx in (0..n).rev() {
        let f = &thread.frames[idx];
        let top = idx == 0;
        let m = lookup(tid, plan, &old.tables, &new.tables, f)?;
        let sites = find_sites(tid, &m, &f.continuation, top, mode)?;
        let (of, nf, os, ns) = (m.old, m.new, sites.old, sites.new);
        let copied = sites.copied();
        // The new CFA: the bottom frame stays; the others sit at the caller's
        // rsp at the mapped call. A dynamic depth (VLA in the caller) keeps
        // the old distance, which is exact because such a caller is copied.
        let new_cfa = match caller_new_cfa {
            None => f.cfa,
            Some((cfa, depth)) => {
                cfa.checked_offset(depth)
                    .ok_or_else(|| RebuildError::Memory {
                        tid,
                        function: f.function.clone(),
                        source: MemError::Overflow {
                            op: crate::memory::MemOp::Write,
                            addr: cfa,
                            len: 0,
                        },
                    })?
            }
        };
        let old_depth = match site_depth(of, os) {
            Some(d) => d,
            None => measured_depth(thread, idx)?,
        };
        let new_depth = match site_depth(nf, ns) {
            Some(d) => d,
            None if copied => old_depth,
            None => {
                return Err(RebuildError::Unmappable {
                    tid,
                    function: f.function.clone(),
                    continuation: f.continuation.clone(),
                    why: "the call's stack depth is dynamic (VLA)".into(),
                })
            }
        };
        let old_low = old_depth.min(of.extent.0).min(-16);
        let new_low = new_depth.min(nf.extent.0).min(-16);
        for (low, ft) in [(old_low, of), (new_low, nf)] {
            // Compared without negating: depths come from the tables and
            // the target's memory, and may be i64::MIN.
            if low < -MAX_FRAME_SIZE {
                return Err(RebuildError::FrameTooLarge {
                    tid,
                    function: ft.name.clone(),
                    size: low.saturating_neg(),
                });
            }
        }
        let old_range = f.cfa.checked_offset(old_low).unwrap_or(f.cfa)..f.cfa;
        if copied {
            remap.add_stack_move(StackMove::Shift {
                old: old_range,
                delta: new_cfa.distance_from(f.cfa),
            });
        } else {
            remap.add_rebuilt_frame(RebuiltFrame {
                old: old_range.clone(),
                old_cfa: f.cfa,
                new_cfa,
                setjmp_depths: setjmp_depths(&m),
            });
            for (k, v) in nf.vars.iter().enumerate() {
                let (ov, conversion) = match m.plan.vars.get(k) {
                    Some(VarSource::Old(i)) => (of.vars.get(*i), None),
                    Some(VarSource::Convert { old, change }) => {
                        (of.vars.get(*old), Some(change.conversion.clone()))
                    }
                    _ => (None, None),
                };
                if let (VarLocation::Cfa(no), Some(ov)) = (&v.location, ov) {
                    if let VarLocation::Cfa(oo) = ov.location {
                        let size = type_size(&old.tables.types, ov.ty).unwrap_or(0);
                        let (Some(start), Some(new_start)) =
                            (f.cfa.checked_offset(oo.0), new_cfa.checked_offset(no.0))
                        else {
                            continue;
                        };
                        remap.add_stack_move(StackMove::Var {
                            old: start..start.checked_add(size).unwrap_or(start),
                            new_start,
                            conversion,
                        });
                    }
                }
            }
        }
        if top && mode == TopMode::InPlace && (new_cfa != f.cfa || new_depth != old_depth) {
            return Err(RebuildError::Unmappable {
                tid,
                function: f.function.clone(),
                continuation: f.continuation.clone(),
                why: "the frame waits in a library call left in place, whose frames would have to move"
                    .into(),
            });
        }
        caller_new_cfa = Some((new_cfa, new_depth));
        out.push(Placement {
            old_index: idx,
            function: f.function.clone(),
            continuation: f.continuation.clone(),
            new_cfa,
            copied,
            new_low,
            old_low,
        });
    }
    Ok(ThreadLayout { tid, frames: out })
}

/// rsp - CFA at the call of frame `idx`, measured as the callee's CFA.
fn measured_depth(thread: &ThreadState, idx: usize) -> Result<i64, RebuildError> {
    let f = &thread.frames[idx];
    match (idx, top_mode(&thread.readiness)) {
        // Its call has returned: rsp is back where it was before the call.
        (0, TopMode::Returned) => return Ok(thread.regs.rsp().0.wrapping_sub(f.cfa.0) as i64),
        // At a callee's entry: rsp points at the return address.
        (0, TopMode::Relock) => {
            return Ok(thread.regs.rsp().0.wrapping_add(8).wrapping_sub(f.cfa.0) as i64)
        }
        _ => {}
    }
    let callee = idx
        .checked_sub(1)
        .and_then(|i| thread.frames.get(i))
        .ok_or_else(|| RebuildError::Unmappable {
            tid: thread.tid,
            function: f.function.clone(),
            continuation: f.continuation.clone(),
            why: "the top frame's depth is dynamic".into(),
        })?;
    Ok(callee.cfa.0.wrapping_sub(f.cfa.0) as i64)
}

/// Computes the bytes of every rebuilt frame of one thread and its final
/// registers. Call after [`place_frames`] has run for every thread (and the
/// globals' stack pointers were registered), so remapping is complete.
pub fn frame_writes(
    mem: &impl TargetMemory,
    thread: &ThreadState,
    layout: &ThreadLayout,
    plan: &UpdatePlan,
    old: &Image,
    new: &Image,
    remap: &mut Remapper<'_>,
) -> Result<ThreadPlan, RebuildError> {
    let tid = thread.tid;
    let mode = top_mode(&thread.readiness);
    let mut writes = Vec::new();
    let mut warnings = Vec::new();
    let mut converted = Vec::new();
    // A bottom frame that returns into library code (a callback) gives
    // that code back the callee-saved registers it had: the library is its
    // caller's view.
    let mut caller_view: Option<CalleeSavedValues> = thread.library_view.clone();
    let mut caller_site_ret: Option<RuntimeAddr> = None;
    let mut caller_cfa: Option<RuntimeAddr> = None;
    let mut final_regs = thread.regs;
    let mut report = Vec::new();
    let nframes = layout.frames.len();
    let pinned = if mode == TopMode::InPlace {
        pinned_pointers(mem, thread, layout)
    } else {
        Vec::new()
    };
    for (pos, p) in layout.frames.iter().enumerate() {
        let f = &thread.frames[p.old_index];
        let top = p.old_index == 0;
        let m = lookup(tid, plan, &old.tables, &new.tables, f)?;
        let sites = find_sites(tid, &m, &f.continuation, top, mode)?;
        let (of, nf, os, ns) = (m.old, m.new, sites.old, sites.new);
        check_pinned(tid, &pinned, f, p, &m, old, &thread.readiness)?;
        let mem_err = |source| RebuildError::Memory {
            tid,
            function: f.function.clone(),
            source,
        };
        let old_base = f
            .cfa
            .checked_offset(p.old_low)
            .ok_or_else(|| mem_err(overflow(f.cfa)))?;
        let old_bytes = mem
            .read_vec(old_base, (-p.old_low) as u64, MAX_FRAME_SIZE as usize)
            .map_err(mem_err)?;
        let new_len = (-p.new_low) as usize;
        let mut bytes = vec![0u8; new_len];
        // A frame paused in a call is inside the call's statement: probe
        // scopes just before the return address (a call can end a block).
        let probe = match os {
            Site::Point(_) => f.pc,
            _ => upstare_dwarf::LinkAddr(f.pc.0.saturating_sub(1)),
        };
        let in_scope = |v: &Variable| {
            v.scope.is_empty() || v.scope.iter().any(|&(a, b)| a <= probe && probe < b)
        };
        if p.copied {
            bytes.copy_from_slice(&old_bytes);
            // Same layout: the old variables (and old pc) describe the bytes.
            for v in of.vars.iter().filter(|v| in_scope(v)) {
                if let VarLocation::Cfa(o) = v.location {
                    let size = type_size(&old.tables.types, v.ty).unwrap_or(0);
                    if let Some(r) = slot(new_len, o.0, size) {
                        let site = || format!("thread {tid}: {}: local {}", f.function, v.name);
                        remap.remap_value_at(&old.tables.types, v.ty, &mut bytes[r], &site);
                    }
                }
            }
        } else {
            // Saved rbp and return address of the bottom frame are not ours
            // to change; keep them.
            bytes[new_len - 16..].copy_from_slice(&old_bytes[old_bytes.len() - 16..]);
            let unmappable = |why: String| RebuildError::Unmappable {
                tid,
                function: f.function.clone(),
                continuation: f.continuation.clone(),
                why,
            };
            for (k, v) in nf.vars.iter().enumerate() {
                let (ov, change) = match m.plan.vars.get(k) {
                    Some(VarSource::Old(i)) => (
                        of.vars.get(*i).ok_or_else(|| {
                            unmappable(format!("the plan names no old variable for {}", v.name))
                        })?,
                        None,
                    ),
                    Some(VarSource::Convert { old, change }) => (
                        of.vars.get(*old).ok_or_else(|| {
                            unmappable(format!("the plan names no old variable for {}", v.name))
                        })?,
                        Some(change),
                    ),
                    Some(VarSource::Zero) => {
                        let passed = sites.mapping.passed_inits.iter().find(|p| p.var == k);
                        match passed.and_then(|p| p.value.as_ref()) {
                            // Its declaration already ran in NEW's terms:
                            // the constant it stores.
                            Some(value) => {
                                let VarLocation::Cfa(no) = v.location else {
                                    return Err(unmappable(format!(
                                        "variable {} has no stack slot",
                                        v.name
                                    )));
                                };
                                let Some(to) = slot(new_len, no.0, value.len() as u64) else {
                                    return Err(unmappable(format!(
                                        "variable {} lies outside its frame",
                                        v.name
                                    )));
                                };
                                bytes[to].copy_from_slice(value);
                            }
                            None if passed.is_some() => {
                                return Err(needs_value(tid, &f.function, &v.name));
                            }
                            None => warnings.push(format!(
                                "thread {tid}: {}: new local {} starts as zero",
                                f.function, v.name
                            )),
                        }
                        continue;
                    }
                    Some(VarSource::Value(value)) => {
                        let VarLocation::Cfa(no) = v.location else {
                            return Err(unmappable(format!(
                                "variable {} has no stack slot",
                                v.name
                            )));
                        };
                        match slot(new_len, no.0, value.len() as u64) {
                            Some(to) => bytes[to].copy_from_slice(value),
                            None => {
                                return Err(unmappable(format!(
                                    "variable {} lies outside its frame",
                                    v.name
                                )))
                            }
                        }
                        continue;
                    }
                    Some(VarSource::NotInFrame) => continue,
                    // Starts as zero; the C transformer fills it after.
                    Some(VarSource::Transformed { .. }) => continue,
                    Some(VarSource::TypeChanged {
                        old_type,
                        new_type,
                        why,
                        ..
                    }) => {
                        return Err(RebuildError::VarTypeChanged {
                            tid,
                            function: f.function.clone(),
                            var: v.name.clone(),
                            change: Box::new(UnmappedChange {
                                old: old_type.clone(),
                                new: new_type.clone(),
                                why: why.clone(),
                            }),
                        })
                    }
                    Some(VarSource::Unmovable { why }) => return Err(unmappable(why.clone())),
                    None => {
                        return Err(unmappable(format!(
                            "the plan does not map variable {}",
                            v.name
                        )))
                    }
                };
                let (VarLocation::Cfa(no), VarLocation::Cfa(oo)) = (&v.location, &ov.location)
                else {
                    return Err(unmappable(format!("variable {} has no stack slot", v.name)));
                };
                let new_size = type_size(&new.tables.types, v.ty).unwrap_or(0);
                let old_size = match change {
                    Some(_) => type_size(&old.tables.types, ov.ty).unwrap_or(0),
                    None => new_size,
                };
                let (Some(to), Some(from)) = (
                    slot(new_len, no.0, new_size),
                    slot(old_bytes.len(), oo.0, old_size),
                ) else {
                    return Err(unmappable(format!(
                        "variable {} lies outside its frame",
                        v.name
                    )));
                };
                let mut val = old_bytes[from].to_vec();
                match change {
                    None => {
                        let site = || format!("thread {tid}: {}: local {}", f.function, v.name);
                        remap.remap_value_at(&new.tables.types, v.ty, &mut val, &site);
                        bytes[to].copy_from_slice(&val);
                    }
                    Some(change) => {
                        // Pointers are remapped in the old value, with the
                        // old type; the conversion then moves bytes only.
                        let site = || format!("thread {tid}: {}: local {}", f.function, v.name);
                        remap.remap_value_at(&old.tables.types, ov.ty, &mut val, &site);
                        convert(&change.conversion, &val, &mut bytes[to]).map_err(|e| {
                            unmappable(format!(
                                "local {} ({} → {}): {e}",
                                v.name, change.old_type, change.new_type
                            ))
                        })?;
                        converted.push(format!(
                            "thread {tid}: {}: local {}: {} → {}",
                            f.function, v.name, change.old_type, change.new_type
                        ));
                        for member in &change.new_members {
                            warnings.push(format!(
                                "thread {tid}: {}: new member {member} starts as zero",
                                f.function
                            ));
                        }
                    }
                }
            }
            for v in m.plan.removed_vars.iter().filter_map(|&i| of.vars.get(i)) {
                warnings.push(format!(
                    "thread {tid}: {}: local {} was removed; its value is dropped",
                    f.function, v.name
                ));
            }
            // Call temporaries and stack arguments must have the same shape.
            if let (Site::Call(oc), Site::Call(nc)) = (os, ns) {
                let n = match &sites.mapping.call_shape {
                    CallShape::Same { stack_args } => *stack_args,
                    CallShape::Different { why } => return Err(unmappable(why.clone())),
                    CallShape::NotApplicable => {
                        return Err(unmappable("the plan gives the call no shape".into()))
                    }
                };
                for (ot, nt) in oc.temp_slots.iter().zip(&nc.temp_slots) {
                    let n = u64::from(nt.size);
                    match (
                        slot(new_len, nt.offset.0, n),
                        slot(old_bytes.len(), ot.offset.0, n),
                    ) {
                        (Some(to), Some(from)) if ot.size == nt.size => {
                            bytes[to].copy_from_slice(&old_bytes[from]);
                        }
                        (Some(_), Some(_)) => {
                            return Err(unmappable("a call temporary changed size".into()))
                        }
                        _ => {
                            return Err(unmappable(
                                "a call temporary lies outside its frame".into(),
                            ))
                        }
                    }
                }
                if n > 0 {
                    match (
                        slot(new_len, nc.stack_depth.0, n),
                        slot(old_bytes.len(), oc.stack_depth.0, n),
                    ) {
                        (Some(to), Some(from)) => bytes[to].copy_from_slice(&old_bytes[from]),
                        _ => {
                            return Err(unmappable(
                                "the stack arguments lie outside the frame".into(),
                            ))
                        }
                    }
                }
            }
        }
        // The new view of callee-saved registers: the frame's own values where
        // the new function saves (and may use) the register, else what its
        // caller sees.
        let saves = |r: Reg| nf.saved_regs.iter().find(|s| s.reg == r).map(|s| s.offset);
        let mut view = CalleeSavedValues::new();
        for r in CALLEE_SAVED {
            let own = f.callee_saved.get(&r).copied();
            let inherited = caller_view.as_ref().and_then(|v| v.get(&r).copied());
            let value = if caller_view.is_none() || saves(r).is_some() {
                own
            } else {
                inherited
            };
            if let Some(value) = value.or(own) {
                view.insert(r, value);
            }
        }
        if let (Some(cv), Some(ret), Some(ccfa)) = (&caller_view, caller_site_ret, caller_cfa) {
            // Not the bottom frame: link it to its caller.
            bytes[new_len - 8..].copy_from_slice(&ret.0.to_le_bytes());
            bytes[new_len - 16..new_len - 8]
                .copy_from_slice(&(ccfa.0.wrapping_sub(16)).to_le_bytes());
            for s in nf.saved_regs.iter().filter(|s| s.reg != Reg::Rbp) {
                if let (Some(v), Some(r)) = (cv.get(&s.reg), slot(new_len, s.offset.0, 8)) {
                    bytes[r].copy_from_slice(&v.to_le_bytes());
                }
            }
        } else if let (Some(cv), 0) = (&caller_view, pos) {
            // The bottom frame called back from the library: its link (the
            // last 16 bytes) stays; its saved registers are the library's.
            for s in nf.saved_regs.iter().filter(|s| s.reg != Reg::Rbp) {
                if let (Some(v), Some(r)) = (cv.get(&s.reg), slot(new_len, s.offset.0, 8)) {
                    bytes[r].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
        let base = p
            .new_cfa
            .checked_offset(p.new_low)
            .ok_or_else(|| mem_err(overflow(p.new_cfa)))?;
        writes.push(Write {
            addr: base,
            bytes,
            what: format!("thread {tid} frame {}", f.function),
        });
        report.push(format!("{}@{}", f.function, f.continuation));
        if pos + 1 == nframes && mode == TopMode::InPlace {
            // The library call stays as it is (registers included, so its
            // system call restarts); only where it returns to changes. The
            // frame did not move (checked when placing it).
            if let Site::Call(c) = ns {
                let slot = p
                    .new_cfa
                    .checked_offset(c.stack_depth.0.saturating_sub(8))
                    .ok_or_else(|| mem_err(overflow(p.new_cfa)))?;
                writes.push(Write {
                    addr: slot,
                    bytes: new.runtime(c.return_addr).0.to_le_bytes().to_vec(),
                    what: format!("thread {tid} return address into {}", f.function),
                });
            }
        } else if pos + 1 == nframes {
            // The top frame: final registers.
            let r = &mut final_regs.0;
            for reg in [
                &mut r.rax, &mut r.rcx, &mut r.rdx, &mut r.rsi, &mut r.rdi, &mut r.r8, &mut r.r9,
                &mut r.r10, &mut r.r11,
            ] {
                *reg = 0;
            }
            for (reg, v) in &view {
                final_regs.set(*reg, *v);
            }
            let (pc, depth) = match ns {
                Site::Point(pt) => (pt.addr, pt.stack_depth.0),
                Site::Restart(c) => (c.restart.unwrap_or(c.call_addr), nf.body_depth.0),
                // A dynamic depth (VLA) is kept: such a frame is copied.
                Site::Call(c) => match c.fixed_depth() {
                    Some(d) => (c.return_addr, d.0),
                    None => (c.return_addr, measured_depth(thread, p.old_index)?),
                },
            };
            let r = &mut final_regs.0;
            r.rbp = p.new_cfa.0.wrapping_sub(16);
            r.rsp = p.new_cfa.0.wrapping_add_signed(depth);
            r.rip = new.runtime(pc).0;
            // No system call restart: the thread resumes in application code.
            r.orig_rax = u64::MAX;
            if let Readiness::Relock { mutex, .. } = thread.readiness {
                // pthread_mutex_lock(NEW's mutex), returning to the call site.
                let slot = RuntimeAddr(r.rsp.wrapping_sub(8));
                r.rsp = slot.0;
                r.rip = thread.regs.0.rip;
                r.rdi = remap.remap(RuntimeAddr(mutex)).0;
                writes.push(Write {
                    addr: slot,
                    bytes: new.runtime(pc).0.to_le_bytes().to_vec(),
                    what: format!("thread {tid} return address into {}", f.function),
                });
            }
        } else if let Site::Call(c) = ns {
            caller_site_ret = Some(new.runtime(c.return_addr));
        }
        caller_view = Some(view);
        caller_cfa = Some(p.new_cfa);
    }
    report.reverse();
    Ok(ThreadPlan {
        tid,
        writes,
        regs: final_regs,
        frames: report,
        warnings,
        converted,
    })
}

/// The `n` bytes at CFA-relative offset `off` in a frame buffer of `len`
/// bytes that ends at the CFA, if they lie inside it (offsets come from the
/// tables of a file: checked, never trusted).
/// Largest span of library frames read for [`pinned_pointers`].
const MAX_LIBRARY_SPAN: u64 = 1 << 20;

/// A value the library code left in place holds (in a register or in its
/// own frames) that points into the thread's application frames: the call
/// will write or read there when it goes on.
struct Pinned {
    /// Where the value is held (`register rsi`, `stack 0x7ffc…`).
    held_in: String,
    addr: u64,
}

/// The values of a thread left in library code that point into its
/// application frames: its general registers and the words of the library
/// frames above the top application frame (bounded).
fn pinned_pointers(
    mem: &impl TargetMemory,
    thread: &ThreadState,
    layout: &ThreadLayout,
) -> Vec<Pinned> {
    let lows = layout
        .frames
        .iter()
        .filter_map(|p| thread.frames.get(p.old_index).map(|f| (f, p)));
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    for (f, p) in lows {
        lo = lo.min(f.cfa.0.wrapping_add_signed(p.old_low));
        hi = hi.max(f.cfa.0);
    }
    if lo >= hi {
        return Vec::new();
    }
    let inside = |v: u64| lo <= v && v < hi;
    let mut out = Vec::new();
    for reg in Reg::ALL {
        if matches!(reg, Reg::Rip | Reg::Rsp | Reg::Rbp) {
            continue;
        }
        let v = thread.regs.get(reg);
        if inside(v) {
            out.push(Pinned {
                held_in: format!("register {reg}"),
                addr: v,
            });
        }
    }
    let sp = thread.regs.rsp().0;
    let span = lo.saturating_sub(sp).min(MAX_LIBRARY_SPAN);
    if span >= 8 {
        if let Ok(bytes) = mem.read_vec(RuntimeAddr(sp), span, MAX_LIBRARY_SPAN as usize) {
            for (i, w) in bytes.chunks_exact(8).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(w);
                let v = u64::from_le_bytes(b);
                if inside(v) {
                    out.push(Pinned {
                        held_in: format!("stack {:#x}", sp + 8 * i as u64),
                        addr: v,
                    });
                }
            }
        }
    }
    out
}

/// A library call left in place goes on with the pointers it holds into
/// the application frames: each one into a variable of frame `f` must
/// find the same variable, of the same type, at the same address in the
/// rebuilt frame; else the call would write or read what is no longer that
/// variable, and the update is refused naming it. Pointers to no variable
/// (saved registers, the frame link) are the frames' own bookkeeping.
fn check_pinned(
    tid: Pid,
    pinned: &[Pinned],
    f: &AppFrame,
    p: &Placement,
    m: &Mapped<'_>,
    old: &Image,
    readiness: &Readiness,
) -> Result<(), RebuildError> {
    let base = f.cfa.0.wrapping_add_signed(p.old_low);
    for pin in pinned.iter().filter(|x| base <= x.addr && x.addr < f.cfa.0) {
        if p.copied && p.new_cfa == f.cfa {
            continue;
        }
        let off = pin.addr.wrapping_sub(f.cfa.0) as i64;
        let held = m
            .old
            .vars
            .iter()
            .enumerate()
            .find(|(_, v)| match v.location {
                VarLocation::Cfa(o) => {
                    let size = type_size(&old.tables.types, v.ty).unwrap_or(0) as i64;
                    o.0 <= off && off < o.0.saturating_add(size.max(1))
                }
                _ => false,
            });
        let Some((i, ov)) = held else { continue };
        let stays = m.plan.vars.iter().zip(&m.new.vars).any(|(src, nv)| {
            matches!(src, VarSource::Old(j) if *j == i)
                && matches!((&nv.location, &ov.location),
                    (VarLocation::Cfa(no), VarLocation::Cfa(oo))
                        if p.new_cfa.0.wrapping_add_signed(no.0) == f.cfa.0.wrapping_add_signed(oo.0))
        });
        if !stays {
            let call = match readiness {
                Readiness::InLibrary { callee, .. }
                | Readiness::CallbackReturned { callee }
                | Readiness::UnderSignal { callee }
                | Readiness::UnderCallback { callee } => callee.as_str(),
                _ => "its library call",
            };
            return Err(RebuildError::Unmappable {
                tid,
                function: f.function.clone(),
                continuation: f.continuation.clone(),
                why: format!(
                    "{call}, left in place, holds a pointer ({}) to local {}, which moves or \
                     changes type in the new frame",
                    pin.held_in, ov.name
                ),
            });
        }
    }
    Ok(())
}

fn slot(len: usize, off: i64, n: u64) -> Option<std::ops::Range<usize>> {
    let start = i64::try_from(len).ok()?.checked_add(off)?;
    let start = usize::try_from(start).ok()?;
    let end = start.checked_add(usize::try_from(n).ok()?)?;
    (end <= len).then_some(start..end)
}

fn overflow(addr: RuntimeAddr) -> MemError {
    MemError::Overflow {
        op: crate::memory::MemOp::Write,
        addr,
        len: 0,
    }
}

/// Checks, with the plan and the tables alone, that every paused frame
/// maps onto the new version (functions, continuations, variable types).
/// Runs before anything is loaded so a refusal changes nothing.
pub fn check_frames(
    threads: &[ThreadState],
    plan: &UpdatePlan,
    old: &FrameTables,
    new: &FrameTables,
) -> Result<(), RebuildError> {
    for t in threads {
        let mode = top_mode(&t.readiness);
        for (idx, f) in t.frames.iter().enumerate() {
            let tid = t.tid;
            let m = lookup(tid, plan, old, new, f)?;
            let sites = find_sites(tid, &m, &f.continuation, idx == 0, mode)?;
            if let Some(p) = sites
                .mapping
                .passed_inits
                .iter()
                .find(|p| p.value.is_none())
            {
                let name = m
                    .new
                    .vars
                    .get(p.var)
                    .map(|v| v.name.as_str())
                    .unwrap_or("?");
                return Err(needs_value(tid, &f.function, name));
            }
            for (k, source) in m.plan.vars.iter().enumerate() {
                if let VarSource::TypeChanged {
                    old_type,
                    new_type,
                    why,
                    ..
                } = source
                {
                    return Err(RebuildError::VarTypeChanged {
                        tid,
                        function: f.function.clone(),
                        var: m
                            .new
                            .vars
                            .get(k)
                            .map(|v| v.name.clone())
                            .unwrap_or_default(),
                        change: Box::new(UnmappedChange {
                            old: old_type.clone(),
                            new: new_type.clone(),
                            why: why.clone(),
                        }),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Frames per function name, for reports.
pub fn frame_counts(threads: &[ThreadState]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for t in threads {
        for f in &t.frames {
            *m.entry(f.function.clone()).or_insert(0) += 1;
        }
    }
    m
}
