//! C transformers: functions the user writes (against the declarations of
//! `upstare-patch --header`) that finish the value of something after the
//! default conversion has computed it. The SPEC names them:
//!
//! ```toml
//! [transformers]
//! source = "transform.c"              # relative to the SPEC file
//! "struct session" = "xf_session"     # every value of this type
//! "global counter" = "xf_counter"     # one global (or a static: "global f::x")
//! "main" = "xf_main_frame"            # every active frame of main (NEW's name)
//! [transformers.globals]
//! stats = "xf_stats"                  # the same as "global stats"
//! ```
//!
//! Each is `int f(const OLD *old, NEW *new)`, returning 0 (anything else
//! refuses the update): for a type, OLD is `struct session__old` when the
//! type changed, else `struct session`; for a global, OLD's and NEW's type
//! of the global; for a frame, `struct main__frame__old` and
//! `struct main__frame__new` (one pointer per local, see [`frame_slots`]).
//!
//! This module reads the table, checks it against both versions, decides
//! where each transformer is called ([`TransformerPlan`], part of the update
//! plan), and builds the shared object ([`build`]) with the system compiler.
//! The runtime loads it into the process and makes the calls.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use upstare_dwarf::fdt::{FrameTables, FunctionTable};
use upstare_dwarf::model::{type_size, ArrayDim, Type, TypeId, VarLocation};

use crate::plan::{GlobalAction, UpdatePlan, VarSource};
use crate::spec::{self, Spec, SpecError};

/// Name of the generated header a transformer source includes
/// (`#include "upstare_transformers.h"`).
pub const HEADER_NAME: &str = "upstare_transformers.h";
/// Largest shared object carried in a PATCH.
pub const MAX_OBJECT_SIZE: u64 = 64 << 20;
/// Largest transformer source compiled.
pub const MAX_SOURCE_SIZE: u64 = 4 << 20;
/// Bound on the places one type transformer is called in one value (array
/// elements): beyond, the plan would be larger than any sane update.
pub const MAX_SITES: usize = 1 << 16;
/// Deepest nesting of types followed when looking for a type's values.
const MAX_DEPTH: u32 = 32;

/// `[transformers]` of a SPEC, sorted by kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, RawEntry>",
    into = "BTreeMap<String, RawEntry>"
)]
pub struct Transformers {
    /// The C file, relative to the SPEC file.
    pub source: Option<String>,
    /// `"struct NAME"` / `"union NAME"` → function.
    pub types: BTreeMap<String, String>,
    /// Global key (`name`, `function::name`) → function.
    pub globals: BTreeMap<String, String>,
    /// NEW's function name → frame transformer.
    pub frames: BTreeMap<String, String>,
}

/// One entry of the table as written: a function name, or a sub-table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawEntry {
    Name(String),
    Table(BTreeMap<String, String>),
}

impl TryFrom<BTreeMap<String, RawEntry>> for Transformers {
    type Error = String;
    fn try_from(raw: BTreeMap<String, RawEntry>) -> Result<Self, String> {
        let mut t = Transformers::default();
        for (k, v) in raw {
            match (k.as_str(), v) {
                ("source", RawEntry::Name(s)) => t.source = Some(s),
                ("globals", RawEntry::Table(m)) => t.globals.extend(m),
                ("types", RawEntry::Table(m)) => t.types.extend(m),
                ("frames", RawEntry::Table(m)) => t.frames.extend(m),
                (_, RawEntry::Table(_)) => {
                    return Err(format!(
                        "[transformers] \"{k}\": only globals, types and frames are sub-tables"
                    ))
                }
                (_, RawEntry::Name(f)) => {
                    if let Some(g) = k.strip_prefix("global ") {
                        t.globals.insert(g.trim().to_string(), f);
                    } else if k.starts_with("struct ") || k.starts_with("union ") {
                        t.types.insert(k, f);
                    } else {
                        t.frames.insert(k, f);
                    }
                }
            }
        }
        Ok(t)
    }
}

impl From<Transformers> for BTreeMap<String, RawEntry> {
    fn from(t: Transformers) -> Self {
        let mut m = BTreeMap::new();
        if let Some(s) = t.source {
            m.insert("source".into(), RawEntry::Name(s));
        }
        for (k, v) in [
            ("globals", t.globals),
            ("types", t.types),
            ("frames", t.frames),
        ] {
            if !v.is_empty() {
                m.insert(k.into(), RawEntry::Table(v));
            }
        }
        m
    }
}

impl Transformers {
    /// Whether no transformer is named.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty() && self.globals.is_empty() && self.frames.is_empty()
    }

    /// Every function named, each once.
    pub fn functions(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .types
            .values()
            .chain(self.globals.values())
            .chain(self.frames.values())
            .cloned()
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Checks every key against OLD and NEW (called by [`Spec::check`]).
    pub fn check(
        &self,
        path: &Path,
        spec: &Spec,
        old: &FrameTables,
        new: &FrameTables,
    ) -> Result<(), SpecError> {
        let bad = |key: &str, why: String| SpecError::Key {
            path: path.to_path_buf(),
            table: "transformers".into(),
            key: key.to_string(),
            why,
        };
        if self.is_empty() {
            return match &self.source {
                Some(_) => Err(bad("source", "no transformer is named".into())),
                None => Ok(()),
            };
        }
        if self.source.is_none() {
            return Err(bad(
                "source",
                "missing: name the C file of the transformers".into(),
            ));
        }
        let all = self.types.iter().chain(&self.globals).chain(&self.frames);
        for (k, f) in all {
            if !is_c_identifier(f) {
                return Err(bad(k, format!("\"{f}\" is not a C function name")));
            }
        }
        for ty in self.types.keys() {
            if spec::aggregate(&new.types, ty).is_none() {
                return Err(bad(ty, format!("NEW has no {ty}")));
            }
            if spec::aggregate(&old.types, ty).is_none() {
                return Err(bad(ty, format!("OLD has no {ty}")));
            }
        }
        for g in self.globals.keys() {
            let has = |t: &FrameTables, key: &str| {
                t.globals
                    .iter()
                    .any(|x| spec::global_key(&x.name, x.owner.as_deref()) == key)
            };
            if !has(new, g) {
                return Err(bad(g, format!("NEW has no global {g}")));
            }
            let old_key = spec
                .rename
                .globals
                .iter()
                .find(|(_, n)| *n == g)
                .map_or(g.as_str(), |(o, _)| o.as_str());
            if !has(old, old_key) {
                return Err(bad(
                    g,
                    format!("OLD has no global {old_key}: nothing to transform"),
                ));
            }
        }
        for f in self.frames.keys() {
            if new.function(f).is_none() {
                return Err(bad(f, format!("NEW has no function {f}")));
            }
            let o = spec.old_function_name(f);
            if old.function(&o).is_none() {
                return Err(bad(f, format!("OLD has no function {o}")));
            }
        }
        Ok(())
    }
}

fn is_c_identifier(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// Where transformers are called, decided from the tables alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransformerPlan {
    pub globals: Vec<GlobalCalls>,
    pub locals: Vec<LocalCalls>,
    pub frames: Vec<FrameCall>,
}

impl TransformerPlan {
    /// Whether nothing is called.
    pub fn is_empty(&self) -> bool {
        self.globals.is_empty() && self.locals.is_empty() && self.frames.is_empty()
    }
}

/// One call on part of a value: the bytes at `old_offset` of the old value
/// (`old_size` long) and at `new_offset` of the new one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueCall {
    pub function: String,
    pub old_offset: u64,
    pub old_size: u64,
    pub new_offset: u64,
    pub new_size: u64,
    /// `acct`, `accts[3]`, `s.inner` for the report.
    pub what: String,
}

/// Calls on one global.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalCalls {
    /// Indices into OLD's and NEW's globals.
    pub old: usize,
    pub new: usize,
    pub label: String,
    /// Run even when the global still holds OLD's initial value (and so
    /// follows NEW): a transformer named for this global, or a change of
    /// type only the transformer maps.
    pub always: bool,
    pub calls: Vec<ValueCall>,
}

/// Calls on one local of every active frame of a function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalCalls {
    /// OLD's function name (frames are named so).
    pub function: String,
    /// Indices into OLD's and NEW's variables of the function.
    pub old_var: usize,
    pub new_var: usize,
    pub calls: Vec<ValueCall>,
}

/// A frame transformer of a function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameCall {
    /// OLD's function name.
    pub function: String,
    pub transformer: String,
    /// The variables each frame struct points to, in member order
    /// ([`frame_slots`]).
    pub old_vars: Vec<usize>,
    pub new_vars: Vec<usize>,
}

/// The variables of `f` that `struct F__frame__old/__new` has a pointer
/// to, in member order: every variable with a stack location.
pub fn frame_slots(f: &FunctionTable) -> Vec<usize> {
    f.vars
        .iter()
        .enumerate()
        .filter(|(_, v)| {
            matches!(
                v.location,
                VarLocation::Cfa(_) | VarLocation::CfaIndirect(_)
            )
        })
        .map(|(i, _)| i)
        .collect()
}

/// Follows typedefs and qualifiers.
fn strip(types: &[Type], mut id: TypeId) -> TypeId {
    for _ in 0..64 {
        match types.get(id.0 as usize) {
            Some(Type::Typedef {
                target: Some(t), ..
            })
            | Some(Type::Qualified {
                target: Some(t), ..
            }) => id = *t,
            _ => break,
        }
    }
    id
}

/// `"struct NAME"` of a struct or union type.
fn aggregate_name(types: &[Type], id: TypeId) -> Option<String> {
    match types.get(id.0 as usize)? {
        Type::Struct { name: Some(n), .. } => Some(format!("struct {n}")),
        Type::Union { name: Some(n), .. } => Some(format!("union {n}")),
        _ => None,
    }
}

/// Finds the parts of a value typed `old_ty` (OLD) / `new_ty` (NEW) that
/// are values of the aggregate `target` in both, pairing array elements by
/// index and members by name (after the SPEC's renames).
struct Sites<'a> {
    old: &'a [Type],
    new: &'a [Type],
    spec: &'a Spec,
    target: &'a str,
    function: &'a str,
    out: Vec<ValueCall>,
}

impl Sites<'_> {
    #[allow(clippy::too_many_arguments)]
    fn walk(&mut self, o: TypeId, n: TypeId, oo: u64, no: u64, what: String, depth: u32) {
        if depth > MAX_DEPTH || self.out.len() >= MAX_SITES {
            return;
        }
        let (o, n) = (strip(self.old, o), strip(self.new, n));
        let on = aggregate_name(self.old, o);
        let nn = aggregate_name(self.new, n);
        if nn.as_deref() == Some(self.target) && on.as_deref() == Some(self.target) {
            let (Some(os), Some(ns)) = (type_size(self.old, o), type_size(self.new, n)) else {
                return;
            };
            self.out.push(ValueCall {
                function: self.function.to_string(),
                old_offset: oo,
                old_size: os,
                new_offset: no,
                new_size: ns,
                what,
            });
            return;
        }
        match (self.old.get(o.0 as usize), self.new.get(n.0 as usize)) {
            (
                Some(Type::Array {
                    element: oe,
                    dims: od,
                }),
                Some(Type::Array {
                    element: ne,
                    dims: nd,
                }),
            ) => {
                let count = |d: &[ArrayDim]| {
                    d.iter().try_fold(1u64, |acc, x| match x {
                        ArrayDim::Fixed(k) => acc.checked_mul(*k),
                        _ => None,
                    })
                };
                let (Some(oc), Some(nc)) = (count(od), count(nd)) else {
                    return;
                };
                let (Some(es_o), Some(es_n)) = (type_size(self.old, *oe), type_size(self.new, *ne))
                else {
                    return;
                };
                for i in 0..oc.min(nc) {
                    if self.out.len() >= MAX_SITES {
                        return;
                    }
                    let (Some(a), Some(b)) = (
                        i.checked_mul(es_o).and_then(|x| x.checked_add(oo)),
                        i.checked_mul(es_n).and_then(|x| x.checked_add(no)),
                    ) else {
                        return;
                    };
                    self.walk(*oe, *ne, a, b, format!("{what}[{i}]"), depth + 1);
                }
            }
            (Some(Type::Struct { members: om, .. }), Some(Type::Struct { members: nm, .. })) => {
                let label = on.unwrap_or_default();
                for m in nm {
                    let Some(mn) = &m.name else { continue };
                    let Some(src) = om.iter().find(|x| {
                        x.name
                            .as_deref()
                            .is_some_and(|x| self.spec.new_member_name(&label, x) == mn)
                    }) else {
                        continue;
                    };
                    if src.bitfield.is_some() || m.bitfield.is_some() {
                        continue;
                    }
                    let (Some(a), Some(b)) = (oo.checked_add(src.offset), no.checked_add(m.offset))
                    else {
                        return;
                    };
                    self.walk(src.ty, m.ty, a, b, format!("{what}.{mn}"), depth + 1);
                }
            }
            _ => {}
        }
    }
}

/// Every type-transformer call on a value typed `o` / `n` named `what`.
fn type_calls(
    spec: &Spec,
    old: &FrameTables,
    new: &FrameTables,
    o: TypeId,
    n: TypeId,
    what: &str,
) -> Vec<ValueCall> {
    let mut out = Vec::new();
    for (target, function) in &spec.transformers.types {
        let mut s = Sites {
            old: &old.types,
            new: &new.types,
            spec,
            target,
            function,
            out: Vec::new(),
        };
        s.walk(o, n, 0, 0, what.to_string(), 0);
        out.extend(s.out);
    }
    out
}

/// Whether a type transformer covers a whole value of NEW's type `n`.
fn covered_by_type(spec: &Spec, new: &FrameTables, n: TypeId) -> bool {
    aggregate_name(&new.types, strip(&new.types, n))
        .is_some_and(|name| spec.transformers.types.contains_key(&name))
}

/// Settles the changes of type a transformer maps (the global or local then
/// starts from NEW's initializer or zero, and the transformer fills it) and
/// records where every transformer is called. Part of
/// [`crate::plan_with_spec`].
pub fn plan_transformers(plan: &mut UpdatePlan, old: &FrameTables, new: &FrameTables, spec: &Spec) {
    let t = &spec.transformers;
    if t.is_empty() {
        return;
    }
    let mut out = TransformerPlan::default();
    for m in &mut plan.globals {
        let (Some(og), Some(j)) = (old.globals.get(m.old), m.new) else {
            continue;
        };
        let Some(ng) = new.globals.get(j) else {
            continue;
        };
        let key = spec::global_key(&ng.name, ng.owner.as_deref());
        let own = t.globals.get(&key);
        if let GlobalAction::TypeChanged {
            old_type, new_type, ..
        } = &m.action
        {
            if own.is_some() || covered_by_type(spec, new, ng.ty) {
                m.action = GlobalAction::Transformed {
                    old_type: old_type.clone(),
                    new_type: new_type.clone(),
                };
            }
        }
        if !matches!(
            m.action,
            GlobalAction::Copy | GlobalAction::Convert { .. } | GlobalAction::Transformed { .. }
        ) {
            continue;
        }
        let mut calls = type_calls(spec, old, new, og.ty, ng.ty, &ng.name);
        if let Some(f) = own {
            if let (Some(os), Some(ns)) =
                (type_size(&old.types, og.ty), type_size(&new.types, ng.ty))
            {
                calls.push(ValueCall {
                    function: f.clone(),
                    old_offset: 0,
                    old_size: os,
                    new_offset: 0,
                    new_size: ns,
                    what: ng.name.clone(),
                });
            }
        }
        if !calls.is_empty() {
            out.globals.push(GlobalCalls {
                old: m.old,
                new: j,
                label: m.label.clone(),
                always: own.is_some() || matches!(m.action, GlobalAction::Transformed { .. }),
                calls,
            });
        }
    }
    for fm in &mut plan.functions {
        let (Some(of), Some(nf)) = (
            old.functions.get(fm.old),
            fm.new.and_then(|j| new.functions.get(j)),
        ) else {
            continue;
        };
        let frame = t.frames.get(&nf.name);
        for (k, src) in fm.vars.iter_mut().enumerate() {
            let Some(nv) = nf.vars.get(k) else { continue };
            if let VarSource::TypeChanged {
                old: i,
                old_type,
                new_type,
                ..
            } = src
            {
                if frame.is_some() || covered_by_type(spec, new, nv.ty) {
                    *src = VarSource::Transformed {
                        old: *i,
                        old_type: old_type.clone(),
                        new_type: new_type.clone(),
                    };
                }
            }
            let i = match src {
                VarSource::Old(i)
                | VarSource::Convert { old: i, .. }
                | VarSource::Transformed { old: i, .. } => *i,
                _ => continue,
            };
            let Some(ov) = of.vars.get(i) else { continue };
            if !matches!(
                (&ov.location, &nv.location),
                (VarLocation::Cfa(_), VarLocation::Cfa(_))
            ) {
                continue;
            }
            let calls = type_calls(spec, old, new, ov.ty, nv.ty, &nv.name);
            if !calls.is_empty() {
                out.locals.push(LocalCalls {
                    function: of.name.clone(),
                    old_var: i,
                    new_var: k,
                    calls,
                });
            }
        }
        if let Some(f) = frame {
            out.frames.push(FrameCall {
                function: of.name.clone(),
                transformer: f.clone(),
                old_vars: frame_slots(of),
                new_vars: frame_slots(nf),
            });
        }
    }
    plan.transformers = out;
}

/// The compiled transformers, carried in a PATCH.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransformerObject {
    /// The C file it was built from (for messages).
    pub source: PathBuf,
    /// The shared object's bytes.
    pub bytes: Vec<u8>,
    pub sha256: [u8; 32],
}

impl std::fmt::Debug for TransformerObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransformerObject")
            .field("source", &self.source)
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl TransformerObject {
    /// Whether the bytes still hash to `sha256`.
    pub fn intact(&self) -> bool {
        <[u8; 32]>::from(Sha256::digest(&self.bytes)) == self.sha256
    }
}

/// Why the transformers could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: larger than {cap} bytes")]
    TooLarge { path: PathBuf, cap: u64 },
    #[error("{dir}: cannot prepare the build: {source}")]
    Scratch {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run the C compiler {cc}: {source}")]
    Compiler {
        cc: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: does not compile: {first_error}")]
    Compile { path: PathBuf, first_error: String },
    #[error("{path}: {why}")]
    Object { path: PathBuf, why: String },
    #[error("{path}: defines no function {function} (named in [transformers])")]
    Missing { path: PathBuf, function: String },
}

/// The compiler: `$CC`, else `cc`.
fn compiler() -> String {
    std::env::var("CC")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "cc".into())
}

/// A private directory for one build, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch, BuildError> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        // A fresh name per try: create_dir fails on an existing one, so
        // nobody else's directory is ever used.
        let mut last = None;
        for k in 0..16u32 {
            let dir = base.join(format!("upstare-xform-{}-{nanos}-{k}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(Scratch(dir)),
                Err(e) => last = Some(e),
            }
        }
        Err(BuildError::Scratch {
            dir: base,
            source: last.unwrap_or_else(|| std::io::Error::other("no directory made")),
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads at most `cap` bytes of `path`.
fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, BuildError> {
    use std::io::Read;
    let err = |source| BuildError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let mut b = Vec::new();
    f.take(cap + 1).read_to_end(&mut b).map_err(err)?;
    if b.len() as u64 > cap {
        return Err(BuildError::TooLarge {
            path: path.to_path_buf(),
            cap,
        });
    }
    Ok(b)
}

/// The first line of the compiler's output that says `error`, else its
/// first line.
fn first_error(stderr: &str) -> String {
    stderr
        .lines()
        .find(|l| l.contains("error"))
        .or_else(|| stderr.lines().find(|l| !l.trim().is_empty()))
        .unwrap_or("the compiler failed without a message")
        .trim()
        .to_string()
}

/// Compiles the SPEC's transformer source (`source`, relative to the SPEC
/// file at `spec_path`) against the header for OLD → NEW into a shared
/// object, and checks it defines every function the SPEC names. `None`
/// when the SPEC names no transformer.
pub fn build(
    spec_path: &Path,
    spec: &Spec,
    old: &FrameTables,
    new: &FrameTables,
) -> Result<Option<TransformerObject>, BuildError> {
    let t = &spec.transformers;
    let Some(source) = t.source.as_ref().filter(|_| !t.is_empty()) else {
        return Ok(None);
    };
    let dir = spec_path.parent().unwrap_or(Path::new("."));
    let src = dir.join(source);
    let text = read_capped(&src, MAX_SOURCE_SIZE)?;
    let scratch = Scratch::new()?;
    let scratch_err = |source| BuildError::Scratch {
        dir: scratch.0.clone(),
        source,
    };
    // Frame structs for every function with a frame transformer, changed
    // or not.
    let frames: Vec<String> = t
        .frames
        .keys()
        .flat_map(|n| [spec.old_function_name(n), n.clone()])
        .collect();
    let header = crate::header::header_for(old, new, &frames);
    std::fs::write(scratch.0.join(HEADER_NAME), header).map_err(scratch_err)?;
    // The source is compiled from a copy, so that what is built is what
    // was read (and hashed) once.
    let c = scratch.0.join("transform.c");
    std::fs::write(&c, &text).map_err(scratch_err)?;
    let so = scratch.0.join("transform.so");
    let cc = compiler();
    let out = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O0", "-g", "-fno-omit-frame-pointer"])
        .arg("-I")
        .arg(&scratch.0)
        .arg("-I")
        .arg(dir)
        .arg("-o")
        .arg(&so)
        .arg(&c)
        .output()
        .map_err(|source| BuildError::Compiler {
            cc: cc.clone(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Name the user's file, not the private copy.
        let line =
            first_error(&stderr).replace(&c.display().to_string(), &src.display().to_string());
        return Err(BuildError::Compile {
            path: src,
            first_error: line,
        });
    }
    let bytes = read_capped(&so, MAX_OBJECT_SIZE)?;
    let elf = upstare_dwarf::elf::ElfFile::parse(&so, &bytes).map_err(|e| BuildError::Object {
        path: src.clone(),
        why: e.to_string(),
    })?;
    for f in t.functions() {
        let defined = elf
            .dynsyms
            .iter()
            .any(|s| s.name == f && s.defined && s.kind == object_stt_func());
        if !defined {
            return Err(BuildError::Missing {
                path: src,
                function: f,
            });
        }
    }
    let sha256 = Sha256::digest(&bytes).into();
    Ok(Some(TransformerObject {
        source: src,
        bytes,
        sha256,
    }))
}

/// `STT_FUNC`.
const fn object_stt_func() -> u8 {
    2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_keys_sort_by_kind() {
        let text = r#"
            [transformers]
            source = "t.c"
            "struct session" = "xf_s"
            "global counter" = "xf_c"
            main = "xf_main"
            [transformers.globals]
            "f::x" = "xf_x"
        "#;
        let s = Spec::parse(Path::new("S.toml"), text).expect("parses");
        let t = &s.transformers;
        assert_eq!(t.source.as_deref(), Some("t.c"));
        assert_eq!(
            t.types.get("struct session").map(String::as_str),
            Some("xf_s")
        );
        assert_eq!(t.globals.get("counter").map(String::as_str), Some("xf_c"));
        assert_eq!(t.globals.get("f::x").map(String::as_str), Some("xf_x"));
        assert_eq!(t.frames.get("main").map(String::as_str), Some("xf_main"));
        assert_eq!(t.functions(), ["xf_c", "xf_main", "xf_s", "xf_x"]);
    }

    #[test]
    fn first_error_line_is_kept() {
        let e = "t.c: In function 'f':\nt.c:3:5: error: 'x' undeclared\n  3 | x\n";
        assert_eq!(first_error(e), "t.c:3:5: error: 'x' undeclared");
    }
}
