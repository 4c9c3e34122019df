//! The update plan: what maps to what between two versions, decided from
//! their frame-description tables alone (no process). The runtime executes
//! a plan against a stopped process; it never decides a mapping itself, it
//! only reports facts the plan could not know (which frames are active,
//! whether a value lies inside its frame).
//!
//! The default mapping (DESIGN.md, "Default mapping"): globals and static
//! locals by name and owning function; functions by name; continuations by
//! id (`entry`, `loop#k`, `call:NAME#k`); locals and parameters by name,
//! parameter-ness and rank among the variables of that name. A change of
//! type is not mapped yet: the plan says so by name, and the runtime refuses
//! when the changed value is live.
//!
//! Every index in a plan refers to the two tables it was made from
//! (`old.globals[i]`, `new.functions[j].vars[k]`, ...).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use upstare_dwarf::elf::ElfError;
use upstare_dwarf::fdt::{
    CallSite, Callee, Continuation, FrameTables, FunctionTable, PointKind, UpdatePoint,
};
use upstare_dwarf::model::{Global, VarLocation, Variable};

use crate::convert::{Conversion, Converter, TypeChange};
use crate::initial::{initial_values, InitialValue};
use crate::spec::{self, Spec};
use crate::transformer::{plan_transformers, TransformerPlan};
use crate::types::is_const_object;
use crate::unrelated::{Unmatched, Unrelated};

/// The whole mapping from OLD to NEW.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdatePlan {
    /// One entry per global and static local of OLD, in OLD's order.
    pub globals: Vec<GlobalMapping>,
    /// Globals and static locals only NEW has (indices into NEW's globals):
    /// they start with their initial value.
    pub new_globals: Vec<usize>,
    /// Values the SPEC gives to globals of NEW (new ones, or ones whose
    /// OLD value is not carried over): (index into NEW's globals, bytes).
    pub new_global_values: Vec<(usize, Vec<u8>)>,
    /// One entry per function of OLD, sorted by name.
    pub functions: Vec<FunctionMapping>,
    /// Frames that must not be active when the update happens (SPEC
    /// `[safety]`): the update waits for them to return, within its time
    /// limit.
    pub inactive: Vec<InactiveRule>,
    /// Named structs, unions and enums of OLD (`struct node`) whose NEW
    /// definition differs: objects of these types outside globals and
    /// frames (heap objects) need converting too.
    pub changed_types: Vec<String>,
    /// What a person should know about this update, each said once
    /// (removed and new globals). Facts about the running state (a new local
    /// in an active frame) are the runtime's to report.
    pub warnings: Vec<String>,
    /// Where the SPEC's C transformers are called (empty without them).
    pub transformers: TransformerPlan,
    /// NEW is plainly another program (`main`, or most of OLD's functions
    /// and globals, have no counterpart) and the SPEC does not accept it:
    /// the update is refused, saying this.
    pub unrelated: Option<Unrelated>,
    /// Heap arrays whose element count the SPEC names (`[heap]`).
    #[serde(default)]
    pub heap_arrays: Vec<crate::heap_arrays::HeapArray>,
}

/// A function (at any point, or at one continuation) that must not be
/// active during an update.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InactiveRule {
    /// OLD's function name.
    pub function: String,
    pub continuation: Option<Continuation>,
}

impl InactiveRule {
    /// Whether a frame of OLD's `function` paused at `continuation` breaks
    /// this rule.
    pub fn forbids(&self, function: &str, continuation: &Continuation) -> bool {
        self.function == function && self.continuation.as_ref().is_none_or(|c| c == continuation)
    }
}

impl fmt::Display for InactiveRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.continuation {
            Some(c) => write!(f, "{}@{c}", self.function),
            None => f.write_str(&self.function),
        }
    }
}

/// What happens to one global of OLD.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalMapping {
    /// Index into OLD's globals.
    pub old: usize,
    /// The NEW global of the same identity, if any.
    pub new: Option<usize>,
    /// `global counter`, `static main::calls`.
    pub label: String,
    pub action: GlobalAction,
    /// How byte offsets inside the global move when its type changed but
    /// its value is not converted (read-only data kept from NEW, a SPEC
    /// value): pointers into it follow their member or element. `None`
    /// when the type did not change, or the action converts (its
    /// conversion says it).
    pub offsets: Option<Conversion>,
    /// OLD's initial value of the global, when OLD's file tells it: a
    /// global that still holds it was never changed by the program, and
    /// follows the new version (keeps NEW's initial value) whatever the
    /// action says.
    pub initial: Option<InitialValue>,
}

/// How a global's value reaches NEW.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GlobalAction {
    /// Same type: the value is copied, pointers inside it remapped.
    Copy,
    /// A read-only object: the program cannot have changed it, so NEW's own
    /// (relocated) value is kept.
    KeepNew,
    /// A thread-local variable: NEW's own thread-local storage is refused by
    /// the loader, so there is nothing to carry over.
    ThreadLocal,
    /// Gone in NEW: the value is dropped.
    Removed,
    /// The SPEC gives the value (see [`UpdatePlan::new_global_values`]).
    Given,
    /// The type changed and the default rules convert the value; parts of
    /// NEW's type the conversion does not fill keep NEW's initializer.
    Convert { change: TypeChange },
    /// The type changed in a way no default rule maps (a change of
    /// meaning): the update is refused, naming why.
    TypeChanged {
        old_type: String,
        new_type: String,
        why: String,
    },
    /// The type changed in a way no default rule maps, and a C transformer
    /// maps it: the value starts as NEW's initializer and the transformer
    /// (see [`UpdatePlan::transformers`]) fills it.
    Transformed { old_type: String, new_type: String },
}

/// What happens to the frames of one function of OLD.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionMapping {
    pub name: String,
    /// Index into OLD's functions.
    pub old: usize,
    /// Index into NEW's functions; `None` when NEW has no function of that
    /// name (an active frame of it cannot be updated).
    pub new: Option<usize>,
    /// Per variable of the NEW function, in NEW's order: where its value
    /// comes from when a frame is rebuilt. Empty when `new` is `None`.
    pub vars: Vec<VarSource>,
    /// Variables of OLD that NEW no longer has (indices into OLD's vars).
    pub removed_vars: Vec<usize>,
    /// Per update point and call site of OLD: where a frame paused there
    /// resumes in NEW.
    pub continuations: Vec<ContinuationMapping>,
}

/// Where one variable of a rebuilt frame takes its value from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VarSource {
    /// The old variable at this index (same name, type and rank).
    Old(usize),
    /// The old variable at this index, whose type changed: its value is
    /// converted; parts of the new type it does not fill start as zero.
    Convert { old: usize, change: TypeChange },
    /// A new local: it starts as zero.
    Zero,
    /// A new local the SPEC gives a value (these bytes).
    Value(Vec<u8>),
    /// Not a stack slot of the frame (a static local, no location): nothing
    /// to write.
    NotInFrame,
    /// The old variable at this index changed type in a way no default
    /// rule maps, and a C transformer maps it: it starts as zero and the
    /// transformer fills it.
    Transformed {
        old: usize,
        old_type: String,
        new_type: String,
    },
    /// The old variable at this index changed type in a way no default
    /// rule maps: a frame holding it cannot be updated.
    TypeChanged {
        old: usize,
        old_type: String,
        new_type: String,
        why: String,
    },
    /// The frame cannot be rebuilt around this variable (a variable-length
    /// array, an old value with no stack slot); copying the frame whole is
    /// still possible.
    Unmovable { why: String },
}

/// Which kind of place a continuation names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SiteKind {
    /// An update point (`entry`, `loop#k`).
    Point,
    /// A call site (`call:NAME#k`).
    Call,
}

/// Where a frame paused at one continuation of OLD resumes in NEW.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContinuationMapping {
    pub id: Continuation,
    pub kind: SiteKind,
    /// Index into OLD's update points or call sites (by `kind`).
    pub old_site: usize,
    /// Index into NEW's update points or call sites; `None` when NEW has no
    /// continuation of that id, or when which one is the same place is not
    /// sure (`unsure`).
    pub new_site: Option<usize>,
    /// Why the default mapping by id (`loop#k` to `loop#k`, `call:NAME#k`
    /// to `call:NAME#k`) cannot be trusted here: the function's loops, or
    /// its calls to NAME, changed in number or place, so the same ordinal
    /// may name another place in NEW. A frame paused here needs a SPEC
    /// `continuations` line; `None` when the mapping is sure or the SPEC
    /// gives it.
    pub unsure: Option<String>,
    /// A frame paused here (at the point, or in the call below the top of
    /// the stack) is copied byte for byte: same variables, types, saved
    /// registers, depths and call temporaries.
    pub copy_paused: bool,
    /// A frame blocked in this call, whose statement is re-executed, is
    /// copied byte for byte (the call's own depth and temporaries do not
    /// matter: the statement starts over at the body's depth).
    pub copy_restarted: bool,
    /// NEW can re-execute the call's statement (it has a restart address).
    pub restartable: bool,
    /// For a call rebuilt below the top: whether its temporaries and stack
    /// arguments carry over, or why not.
    pub call_shape: CallShape,
    /// New locals (no OLD counterpart, no SPEC value) whose declaration
    /// NEW's code has already passed at this continuation: they must hold
    /// their initial value, not zero.
    pub passed_inits: Vec<PassedInit>,
}

/// A new local whose initializer a frame paused at a continuation has
/// already passed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassedInit {
    /// Index into NEW's function's variables.
    pub var: usize,
    /// The constant its declaration stores; `None` when the initializer is
    /// computed (the update then needs a SPEC value for it).
    pub value: Option<Vec<u8>>,
}

/// Whether the undescribed stack contents of a call carry over to NEW.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallShape {
    /// Not a call, or NEW has no such call.
    NotApplicable,
    /// Same live registers, same temporaries (pairwise same size) and the
    /// same number of bytes of stack arguments.
    Same { stack_args: u64 },
    /// The call keeps different state in NEW.
    Different { why: String },
}

impl UpdatePlan {
    /// Records OLD's initial values (index-aligned with OLD's globals, as
    /// [`initial_values`] gives them).
    pub fn attach_initial_values(&mut self, values: Vec<Option<InitialValue>>) {
        for (m, v) in self.globals.iter_mut().zip(values) {
            m.initial = v;
        }
    }

    /// The mapping of OLD's function `name`.
    pub fn function(&self, name: &str) -> Option<&FunctionMapping> {
        self.functions
            .binary_search_by(|f| f.name.as_str().cmp(name))
            .ok()
            .and_then(|i| self.functions.get(i))
    }

    /// NEW's function that OLD's function `f` maps to (after the SPEC's
    /// renames): the one of its NEW name declared in the same file when
    /// static functions of several units share the name
    /// ([`FrameTables::counterpart`]).
    pub fn new_function<'a>(
        &self,
        f: &FunctionTable,
        old: &FrameTables,
        new: &'a FrameTables,
    ) -> Option<&'a FunctionTable> {
        let named = self
            .function(&f.name)
            .and_then(|m| m.new)
            .and_then(|j| new.functions.get(j))?;
        new.counterpart(&named.name, f, old)
    }

    /// The mapping of OLD's global at index `old`.
    pub fn global(&self, old: usize) -> Option<&GlobalMapping> {
        self.globals.get(old).filter(|g| g.old == old)
    }

    /// Every global whose change of type needs the user, in OLD's order.
    pub fn type_changed_globals(&self) -> impl Iterator<Item = &GlobalMapping> {
        self.globals
            .iter()
            .filter(|g| matches!(g.action, GlobalAction::TypeChanged { .. }))
    }
}

impl FunctionMapping {
    /// The mapping of the continuation `id` of kind `kind`.
    pub fn continuation(&self, id: &Continuation, kind: SiteKind) -> Option<&ContinuationMapping> {
        self.continuations
            .iter()
            .find(|c| c.kind == kind && &c.id == id)
    }

    /// The index of the old variable that NEW's variable `new_var` takes its
    /// value from, if any.
    pub fn source_of(&self, new_var: usize) -> Option<usize> {
        match self.vars.get(new_var)? {
            VarSource::Old(i) => Some(*i),
            VarSource::Convert { old, .. }
            | VarSource::TypeChanged { old, .. }
            | VarSource::Transformed { old, .. } => Some(*old),
            _ => None,
        }
    }
}

impl fmt::Display for GlobalAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GlobalAction::Copy => f.write_str("copied"),
            GlobalAction::KeepNew => f.write_str("read-only: the new value is kept"),
            GlobalAction::ThreadLocal => f.write_str("thread-local: not carried over"),
            GlobalAction::Removed => f.write_str("removed: its value is dropped"),
            GlobalAction::Given => f.write_str("the SPEC gives its value"),
            GlobalAction::Convert { change } => {
                write!(f, "converted: {}", change.changes.join("; "))
            }
            GlobalAction::TypeChanged { why, .. } => write!(f, "not mapped: {why}"),
            GlobalAction::Transformed { .. } => {
                f.write_str("mapped by a C transformer (from the new initial value)")
            }
        }
    }
}

/// The label of a global in messages: `global NAME` or `static FN::NAME`.
pub fn global_label(g: &Global) -> String {
    match &g.owner {
        Some(o) => format!("static {}::{}", o, g.name),
        None => format!("global {}", g.name),
    }
}

/// The identity of a global across versions: name and owning function
/// (`name`, `function::name`), as a SPEC names it.
fn global_key(g: &Global) -> String {
    spec::global_key(&g.name, g.owner.as_deref())
}

/// Why a plan could not be made from two files.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{path}: {why}")]
    Tables { path: PathBuf, why: String },
    #[error("{0}")]
    Elf(#[from] ElfError),
}

/// The default plan for two instrumented binaries, given their bytes:
/// their tables, and OLD's initial values (so data the program never
/// changed follows NEW).
pub fn plan_for_binaries(
    old_path: &Path,
    old_elf: &[u8],
    new_path: &Path,
    new_elf: &[u8],
) -> Result<UpdatePlan, PlanError> {
    let tables = |path: &Path, elf: &[u8]| {
        upstare_dwarf::read_tables(elf).map_err(|e| PlanError::Tables {
            path: path.to_path_buf(),
            why: e.to_string(),
        })
    };
    let (old, new) = (tables(old_path, old_elf)?, tables(new_path, new_elf)?);
    let mut plan = default_plan(&old, &new);
    plan.attach_initial_values(initial_values(old_path, &old, old_elf)?);
    Ok(plan)
}

/// Makes the default plan from OLD's and NEW's tables.
pub fn default_plan(old: &FrameTables, new: &FrameTables) -> UpdatePlan {
    plan_with_spec(old, new, &Spec::default())
}

/// Makes the plan from OLD's and NEW's tables with the user's overrides
/// (already checked with [`Spec::check`]).
pub fn plan_with_spec(old: &FrameTables, new: &FrameTables, spec: &Spec) -> UpdatePlan {
    let mut cmp = Converter::with_spec(&old.types, &new.types, spec);
    let (globals, new_globals, warnings) = plan_globals(&mut cmp, old, new, spec);
    let new_global_values = spec
        .values
        .globals
        .iter()
        .filter_map(|(key, value)| {
            let j = new.globals.iter().position(|g| global_key(g) == *key)?;
            let bytes = spec::encode(&new.types, new.globals.get(j)?.ty, value).ok()?;
            Some((j, bytes))
        })
        .collect();
    let inactive = spec
        .safety
        .inactive
        .iter()
        .map(|item| match spec::split_site(item) {
            Some((function, c)) => InactiveRule {
                function,
                continuation: Some(c),
            },
            None => InactiveRule {
                function: item.clone(),
                continuation: None,
            },
        })
        .collect();
    // NEW's functions by name: the index of the only one, or every one
    // when static functions of several units share the name.
    let mut new_by_name: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, f) in new.functions.iter().enumerate() {
        new_by_name.entry(f.name.as_str()).or_default().push(i);
    }
    let mut functions: Vec<FunctionMapping> = old
        .functions
        .iter()
        .enumerate()
        .map(|(i, of)| {
            let name = spec.new_function_name(&of.name);
            let j = match new_by_name.get(name.as_str()).map(Vec::as_slice) {
                Some([j]) => Some(*j),
                Some(several) => new.counterpart(&name, of, old).and_then(|nf| {
                    several
                        .iter()
                        .copied()
                        .find(|&j| new.functions.get(j).is_some_and(|f| f.low == nf.low))
                }),
                None => None,
            };
            let nf = j.and_then(|j| Some((j, new.functions.get(j)?)));
            plan_function(&mut cmp, spec, i, of, nf)
        })
        .collect();
    functions.sort_by(|a, b| a.name.cmp(&b.name));
    // Two functions of one name (static functions of two units) cannot be
    // told apart by name: keep the first, like `FrameTables::function`.
    functions.dedup_by(|b, a| a.name == b.name);
    let changed_types = changed_types(&mut cmp, old, new);
    let mut plan = UpdatePlan {
        globals,
        new_globals,
        new_global_values,
        functions,
        inactive,
        changed_types,
        warnings,
        transformers: TransformerPlan::default(),
        unrelated: unrelated(old, new, spec),
        heap_arrays: crate::heap_arrays::plan_heap_arrays(spec, old),
    };
    plan_transformers(&mut plan, old, new, spec);
    plan
}

/// Why NEW is plainly another program, unless the SPEC accepts exactly
/// the count of OLD's functions and globals with no counterpart.
fn unrelated(old: &FrameTables, new: &FrameTables, spec: &Spec) -> Option<Unrelated> {
    let u = Unmatched::of(old, new, spec);
    let accepted = spec
        .accept
        .unmatched
        .is_some_and(|n| usize::try_from(n).is_ok_and(|n| n == u.count()));
    (u.is_another_program() && !accepted).then(|| u.summary())
}

/// The spelling of a named aggregate or enum type (`struct node`), if it
/// is a definition.
pub fn aggregate_name(t: &upstare_dwarf::model::Type) -> Option<String> {
    use upstare_dwarf::model::Type;
    match t {
        Type::Struct {
            name: Some(n),
            declaration: false,
            ..
        } => Some(format!("struct {n}")),
        Type::Union {
            name: Some(n),
            declaration: false,
            ..
        } => Some(format!("union {n}")),
        Type::Enum { name: Some(n), .. } => Some(format!("enum {n}")),
        _ => None,
    }
}

/// Named types of OLD whose every NEW definition of the same name differs.
fn changed_types(cmp: &mut Converter<'_>, old: &FrameTables, new: &FrameTables) -> Vec<String> {
    let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
    for (j, t) in new.types.iter().enumerate() {
        if let Some(n) = aggregate_name(t) {
            by_name.entry(n).or_default().push(j);
        }
    }
    let mut out: Vec<String> = Vec::new();
    for (i, t) in old.types.iter().enumerate() {
        let (Some(name), Ok(i)) = (aggregate_name(t), u32::try_from(i)) else {
            continue;
        };
        let Some(defs) = by_name.get(&name) else {
            continue;
        };
        let same = defs.iter().any(|&j| {
            u32::try_from(j).is_ok_and(|j| {
                cmp.equal(
                    upstare_dwarf::model::TypeId(i),
                    upstare_dwarf::model::TypeId(j),
                )
            })
        });
        if !same && !out.contains(&name) {
            out.push(name);
        }
    }
    out.sort();
    out
}

fn plan_globals(
    cmp: &mut Converter<'_>,
    old: &FrameTables,
    new: &FrameTables,
    spec: &Spec,
) -> (Vec<GlobalMapping>, Vec<usize>, Vec<String>) {
    // Candidates by name (and owning function), with the unit that defines
    // them: a static of one name in two files is two globals.
    let mut by_key: HashMap<String, Vec<usize>> = HashMap::new();
    for (j, g) in new.globals.iter().enumerate() {
        by_key.entry(global_key(g)).or_default().push(j);
    }
    let mut old_count: HashMap<String, usize> = HashMap::new();
    for g in &old.globals {
        *old_count.entry(global_key(g)).or_default() += 1;
    }
    let mut warnings = Vec::new();
    let mut mappings = Vec::with_capacity(old.globals.len());
    for (i, g) in old.globals.iter().enumerate() {
        let label = global_label(g);
        let key = spec.new_global_key(&global_key(g));
        let candidates = by_key.get(&key).map(Vec::as_slice).unwrap_or(&[]);
        let pick = |j: &usize| new.globals.get(*j).map(|n| (*j, n));
        // Same unit first (file-scope statics and static locals); an
        // external symbol, or a name defined once on each side, needs no
        // unit (files may be renamed between versions).
        let found = candidates
            .iter()
            .filter_map(pick)
            .find(|(_, n)| n.unit == g.unit)
            .or_else(|| {
                let unique = candidates.len() == 1 && old_count.get(&global_key(g)) == Some(&1);
                if g.external || unique {
                    candidates.iter().filter_map(pick).next()
                } else {
                    None
                }
            });
        if found.is_none() && !candidates.is_empty() {
            warnings.push(format!(
                "{label} (in {}) is defined in several files of the new version, none of them {}; not carried over",
                g.unit, g.unit
            ));
        }
        let given = found.is_some_and(|(_, n)| spec.values.globals.contains_key(&global_key(n)));
        let action = match found {
            // The SPEC gives NEW's value (written from `new_global_values`).
            Some(_) if given => GlobalAction::Given,
            None => {
                warnings.push(format!(
                    "{label} was removed in the new version; its value is dropped"
                ));
                GlobalAction::Removed
            }
            // A read-only object cannot have been changed by the program:
            // NEW's value is the one to keep, whatever its type became (a
            // static table that grew needs nothing from the user).
            Some((_, n))
                if !g.tls
                    && is_const_object(&old.types, g.ty)
                    && is_const_object(&new.types, n.ty) =>
            {
                GlobalAction::KeepNew
            }
            Some((_, n)) if !cmp.equal(g.ty, n.ty) => {
                let change = cmp.change(g.ty, n.ty, &label);
                match change.conversion.refusal() {
                    Some(why) => GlobalAction::TypeChanged {
                        old_type: change.old_type.clone(),
                        new_type: change.new_type.clone(),
                        why: why.to_string(),
                    },
                    None if g.tls => GlobalAction::ThreadLocal,
                    None => GlobalAction::Convert { change },
                }
            }
            Some(_) if g.tls => GlobalAction::ThreadLocal,
            Some((_, n)) if is_const_object(&new.types, n.ty) => GlobalAction::KeepNew,
            Some(_) => GlobalAction::Copy,
        };
        let offsets = match (&action, found) {
            (GlobalAction::KeepNew | GlobalAction::Given, Some((_, n)))
                if !cmp.equal(g.ty, n.ty) =>
            {
                Some(cmp.change(g.ty, n.ty, &label).conversion)
            }
            _ => None,
        };
        mappings.push(GlobalMapping {
            old: i,
            new: found.map(|(j, _)| j),
            label,
            action,
            offsets,
            initial: None,
        });
    }
    let mapped: HashSet<usize> = mappings.iter().filter_map(|m| m.new).collect();
    let mut added = Vec::new();
    for (j, n) in new.globals.iter().enumerate() {
        if !mapped.contains(&j) {
            let given = spec.values.globals.contains_key(&global_key(n));
            warnings.push(format!(
                "{} is new; it starts with {}",
                global_label(n),
                if given {
                    "the SPEC's value"
                } else {
                    "its initial value"
                }
            ));
            added.push(j);
        }
    }
    (mappings, added, warnings)
}

/// The old variable that new variable `new_vars[k]` takes its value from:
/// same name (after the SPEC's renames, given by `renamed`), same
/// parameter-ness, same rank among the variables of that name (shadowed
/// locals keep their nesting order).
fn matching_var(
    old_vars: &[Variable],
    new_vars: &[Variable],
    k: usize,
    renamed: &dyn Fn(&str) -> String,
) -> Option<usize> {
    let v = new_vars.get(k)?;
    let same_new = |x: &Variable| x.name == v.name && x.is_param == v.is_param;
    let rank = new_vars.iter().take(k).filter(|x| same_new(x)).count();
    old_vars
        .iter()
        .enumerate()
        .filter(|(_, x)| renamed(&x.name) == v.name && x.is_param == v.is_param)
        .nth(rank)
        .map(|(i, _)| i)
}

fn plan_function(
    cmp: &mut Converter<'_>,
    spec: &Spec,
    old_index: usize,
    of: &FunctionTable,
    nf: Option<(usize, &FunctionTable)>,
) -> FunctionMapping {
    let Some((new_index, nf)) = nf else {
        return FunctionMapping {
            name: of.name.clone(),
            old: old_index,
            new: None,
            vars: Vec::new(),
            removed_vars: Vec::new(),
            continuations: Vec::new(),
        };
    };
    let vars: Vec<VarSource> = (0..nf.vars.len())
        .map(|k| var_source(cmp, spec, of, nf, k))
        .collect();
    // An old variable no new one takes its value from, and that NEW does
    // not keep under its (renamed) name either: a static local, which is
    // carried as a global, is not removed.
    let renamed = |name: &str| spec.new_local_name(&nf.name, name).to_string();
    let removed_vars = (0..of.vars.len())
        .filter(|&i| {
            let kept = of.vars.get(i).is_some_and(|o| {
                nf.vars
                    .iter()
                    .any(|n| n.name == renamed(&o.name) && n.is_param == o.is_param)
            });
            !kept
                && !vars.iter().any(|v| match v {
                    VarSource::Old(j)
                    | VarSource::Convert { old: j, .. }
                    | VarSource::TypeChanged { old: j, .. }
                    | VarSource::Transformed { old: j, .. } => *j == i,
                    _ => false,
                })
        })
        .collect();
    let frame_same = of.vars.len() == nf.vars.len()
        && of.vars.iter().zip(&nf.vars).all(|(a, b)| {
            a.name == b.name
                && a.location == b.location
                && a.is_param == b.is_param
                && cmp.equal(a.ty, b.ty)
        })
        && of.saved_regs == nf.saved_regs
        && of.body_depth == nf.body_depth
        && of.extent == nf.extent;
    let mut continuations = Vec::new();
    let loops_unsure = loops_unsure(of, nf);
    for (i, p) in of.update_points.iter().enumerate() {
        let id = p.continuation();
        let target = spec.new_continuation(&of.name, &id);
        let unsure = match p.kind {
            PointKind::Loop(_) if !spec.maps_continuation(&of.name, &id) => loops_unsure.clone(),
            _ => None,
        };
        let np = nf
            .update_points
            .iter()
            .enumerate()
            .find(|(_, q)| q.continuation() == target)
            .filter(|_| unsure.is_none());
        let mut m = point_mapping(id, i, p, np, frame_same);
        m.unsure = unsure;
        continuations.push(m);
    }
    for (i, c) in of.call_sites.iter().enumerate() {
        let id = c.continuation();
        let target = spec.new_continuation(&of.name, &id);
        let unsure = if spec.maps_continuation(&of.name, &id) {
            None
        } else {
            calls_unsure(
                of,
                nf,
                &c.callee,
                &spec.new_function_name(c.callee.id_name()),
            )
        };
        let nc = nf
            .call_sites
            .iter()
            .enumerate()
            .find(|(_, d)| d.continuation() == target)
            .filter(|_| unsure.is_none());
        let mut m = call_mapping(id, i, of, c, nf, nc, frame_same);
        m.unsure = unsure;
        continuations.push(m);
    }
    for c in &mut continuations {
        let at = match (c.kind, c.new_site) {
            (SiteKind::Point, Some(i)) => nf.update_points.get(i).map(|p| p.addr),
            (SiteKind::Call, Some(i)) => nf.call_sites.get(i).map(|s| s.call_addr),
            _ => None,
        };
        if let Some(at) = at {
            c.passed_inits = passed_inits(nf, &vars, at);
        }
    }
    FunctionMapping {
        name: of.name.clone(),
        old: old_index,
        new: Some(new_index),
        vars,
        removed_vars,
        continuations,
    }
}

/// Why OLD's loop update points of a function cannot be paired with NEW's
/// by ordinal for sure; `None` when they can. Loops are numbered in the
/// address order of their headers, and gcc puts a loop's header (its
/// condition) after its body, so a loop added inside, before or after
/// another renumbers them: `loop#0` of OLD may be a different loop of NEW.
/// The pairing is trusted only when both versions have loops of the same
/// ordinals, in the same order of source lines, each moved by the same
/// number of lines (text added above them or inside a body, not between
/// loops).
fn loops_unsure(of: &FunctionTable, nf: &FunctionTable) -> Option<String> {
    let loops = |f: &FunctionTable| -> Vec<(u32, u32)> {
        f.update_points
            .iter()
            .filter_map(|p| match p.kind {
                PointKind::Loop(k) => Some((k, p.line)),
                PointKind::Entry => None,
            })
            .collect()
    };
    let (o, n) = (loops(of), loops(nf));
    // No loops on one side: nothing to pair (a loop NEW lacks is gone).
    if o.is_empty() || n.is_empty() {
        return None;
    }
    let lines = |v: &[(u32, u32)]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v.iter()
            .map(|(k, l)| format!("loop#{k} at line {l}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let changed = || {
        format!(
            "the loops of {} changed (OLD: {}; NEW: {}): the same loop number may be another loop in NEW",
            of.name,
            lines(&o),
            lines(&n)
        )
    };
    if o.len() != n.len() || o.iter().zip(&n).any(|(a, b)| a.0 != b.0) {
        return Some(changed());
    }
    let order = |v: &[(u32, u32)]| {
        let mut by_line: Vec<(u32, u32)> = v.iter().map(|&(k, l)| (l, k)).collect();
        by_line.sort_unstable();
        by_line.into_iter().map(|(_, k)| k).collect::<Vec<_>>()
    };
    let shift = |a: &(u32, u32), b: &(u32, u32)| i64::from(b.1) - i64::from(a.1);
    let first = o.first().zip(n.first()).map(|(a, b)| shift(a, b));
    if order(&o) != order(&n) || o.iter().zip(&n).any(|(a, b)| Some(shift(a, b)) != first) {
        return Some(changed());
    }
    None
}

/// Why OLD's calls to `callee` (named `new_callee` in NEW) cannot be paired
/// with NEW's by ordinal for sure; `None` when they can: the same number of
/// calls, each moved by the same number of lines.
fn calls_unsure(
    of: &FunctionTable,
    nf: &FunctionTable,
    callee: &Callee,
    new_callee: &str,
) -> Option<String> {
    let o: Vec<u32> = of
        .call_sites
        .iter()
        .filter(|c| c.callee.id_name() == callee.id_name())
        .map(|c| c.line)
        .collect();
    let n: Vec<u32> = nf
        .call_sites
        .iter()
        .filter(|c| c.callee.id_name() == new_callee)
        .map(|c| c.line)
        .collect();
    // No such call in NEW: the continuation is gone, not unsure.
    if n.is_empty() {
        return None;
    }
    let shift = |a: &u32, b: &u32| i64::from(*b) - i64::from(*a);
    let first = o.first().zip(n.first()).map(|(a, b)| shift(a, b));
    if o.len() == n.len() && o.iter().zip(&n).all(|(a, b)| Some(shift(a, b)) == first) {
        return None;
    }
    let lines = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    Some(format!(
        "the calls of {} to {} changed (OLD's at lines {}, NEW's at lines {}): the same call number may be another call in NEW",
        of.name,
        callee.id_name(),
        lines(&o),
        lines(&n)
    ))
}

/// The new locals of `nf` (those `vars` starts at zero) whose initializing
/// store lies before `at` while `at` is in their scope.
fn passed_inits(
    nf: &FunctionTable,
    vars: &[VarSource],
    at: upstare_dwarf::LinkAddr,
) -> Vec<PassedInit> {
    nf.var_inits
        .iter()
        .filter_map(|init| {
            let k = usize::try_from(init.var).ok()?;
            let v = nf.vars.get(k)?;
            let in_scope =
                v.scope.is_empty() || v.scope.iter().any(|&(lo, hi)| lo <= at && at < hi);
            (matches!(vars.get(k), Some(VarSource::Zero)) && in_scope && init.addr < at).then(
                || PassedInit {
                    var: k,
                    value: init.constant.clone(),
                },
            )
        })
        .collect()
}

fn var_source(
    cmp: &mut Converter<'_>,
    spec: &Spec,
    of: &FunctionTable,
    nf: &FunctionTable,
    k: usize,
) -> VarSource {
    let Some(v) = nf.vars.get(k) else {
        return VarSource::NotInFrame;
    };
    let renamed = |name: &str| spec.new_local_name(&nf.name, name).to_string();
    let given = spec
        .values
        .locals
        .get(&nf.name)
        .and_then(|l| l.get(&v.name));
    // A SPEC `copy` names the old local to take the value from.
    let matched_index = match given {
        Some(spec::Value::Copy { copy }) => of.vars.iter().position(|x| &x.name == copy),
        _ => matching_var(&of.vars, &nf.vars, k, &renamed),
    };
    let matched = matched_index.and_then(|i| Some((i, of.vars.get(i)?)));
    // A value the SPEC gives replaces the old one (a new local, or one
    // whose change of type has no default).
    if let (Some(value), true) = (given, matches!(v.location, VarLocation::Cfa(_))) {
        if !matches!(value, spec::Value::Copy { .. }) {
            if let Ok(bytes) = spec::encode(cmp.new_types(), v.ty, value) {
                return VarSource::Value(bytes);
            }
        }
    }
    let mut change = None;
    if let Some((i, ov)) = matched {
        if !cmp.equal(ov.ty, v.ty) {
            let c = cmp.change(ov.ty, v.ty, &format!("{}: local {}", nf.name, v.name));
            if let Some(why) = c.conversion.refusal() {
                return VarSource::TypeChanged {
                    old: i,
                    old_type: c.old_type.clone(),
                    new_type: c.new_type.clone(),
                    why: why.to_string(),
                };
            }
            change = Some(c);
        }
    }
    match v.location {
        VarLocation::Cfa(_) => {}
        VarLocation::CfaIndirect(_) => {
            return VarSource::Unmovable {
                why: format!("variable-length array {} cannot be moved", v.name),
            }
        }
        _ => return VarSource::NotInFrame,
    }
    match matched {
        None => match given.map(|value| spec::encode(cmp.new_types(), v.ty, value)) {
            Some(Ok(bytes)) => VarSource::Value(bytes),
            // Checked by `Spec::check`; a value that does not encode is
            // treated as absent.
            _ => VarSource::Zero,
        },
        Some((_, ov)) if !matches!(ov.location, VarLocation::Cfa(_)) => VarSource::Unmovable {
            why: format!("old variable {} has no stack slot", ov.name),
        },
        Some((i, _)) => match change {
            Some(change) => VarSource::Convert { old: i, change },
            None => VarSource::Old(i),
        },
    }
}

fn point_mapping(
    id: Continuation,
    old_site: usize,
    op: &UpdatePoint,
    new_point: Option<(usize, &UpdatePoint)>,
    frame_same: bool,
) -> ContinuationMapping {
    ContinuationMapping {
        id,
        kind: SiteKind::Point,
        old_site,
        new_site: new_point.map(|(i, _)| i),
        copy_paused: new_point
            .is_some_and(|(_, np)| frame_same && op.stack_depth == np.stack_depth),
        copy_restarted: false,
        restartable: false,
        call_shape: CallShape::NotApplicable,
        passed_inits: Vec::new(),
        unsure: None,
    }
}

fn call_mapping(
    id: Continuation,
    old_site: usize,
    of: &FunctionTable,
    oc: &CallSite,
    nf: &FunctionTable,
    new_call: Option<(usize, &CallSite)>,
    frame_same: bool,
) -> ContinuationMapping {
    let Some((new_site, nc)) = new_call else {
        return ContinuationMapping {
            id,
            kind: SiteKind::Call,
            old_site,
            new_site: None,
            copy_paused: false,
            copy_restarted: false,
            restartable: false,
            call_shape: CallShape::NotApplicable,
            passed_inits: Vec::new(),
            unsure: None,
        };
    };
    ContinuationMapping {
        id,
        kind: SiteKind::Call,
        old_site,
        new_site: Some(new_site),
        copy_paused: frame_same
            && oc.stack_depth == nc.stack_depth
            && oc.live_regs == nc.live_regs
            && oc.temp_slots == nc.temp_slots,
        copy_restarted: frame_same,
        restartable: nc.restart.is_some(),
        call_shape: call_shape(of, oc, nf, nc),
        passed_inits: Vec::new(),
        unsure: None,
    }
}

/// Whether the temporaries and stack arguments of a call carry over.
fn call_shape(of: &FunctionTable, oc: &CallSite, nf: &FunctionTable, nc: &CallSite) -> CallShape {
    // Bytes of stack arguments below the body (pushed for the call); `None`
    // for a dynamic or inconsistent depth.
    let args = |ft: &FunctionTable, c: &CallSite| {
        let n = ft.body_depth.0.checked_sub(c.stack_depth.0)?;
        u64::try_from(n).ok()
    };
    let different = |why: &str| CallShape::Different { why: why.into() };
    let (old_args, new_args) = (args(of, oc), args(nf, nc));
    if oc.live_regs != nc.live_regs || oc.temp_slots.len() != nc.temp_slots.len() {
        return different("the call keeps different temporaries or stack arguments");
    }
    let Some(stack_args) = old_args.filter(|_| old_args == new_args) else {
        return different("the call keeps different temporaries or stack arguments");
    };
    if oc
        .temp_slots
        .iter()
        .zip(&nc.temp_slots)
        .any(|(a, b)| a.size != b.size)
    {
        return different("a call temporary changed size");
    }
    CallShape::Same { stack_args }
}
