//! The review of a plan: what a person reads before touching a process.
//! Every changed type, every changed, added and removed global with the
//! mapping chosen, every function whose frame layout changed, every
//! continuation that no longer exists, and what needs the user, each with
//! the SPEC line that would settle it.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use upstare_dwarf::fdt::{FrameTables, FunctionTable};
use upstare_dwarf::model::{type_name, Type, TypeId, VarLocation};

use crate::convert::Converter;
use crate::plan::{global_label, GlobalAction, UpdatePlan, VarSource};

/// The whole review.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    pub types: Vec<TypeReview>,
    pub globals: Vec<GlobalReview>,
    pub functions: Vec<FunctionReview>,
    /// `FUNC@continuation` of OLD that NEW no longer has.
    pub continuations_gone: Vec<String>,
    pub warnings: Vec<String>,
    pub needs_user: Vec<NeedsUser>,
}

/// A named type (struct, union, enum, typedef) both versions define
/// differently.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeReview {
    /// `struct session`, `typedef counter_t`.
    pub name: String,
    /// What changed, in words (`member flags added at offset 16`).
    pub changes: Vec<String>,
}

/// How a global changed and what the plan does with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalReview {
    /// `global counter`, `static main::calls`.
    pub label: String,
    /// `changed`, `removed` or `new`.
    pub status: String,
    pub old_type: Option<String>,
    pub new_type: Option<String>,
    /// The mapping chosen, in words.
    pub mapping: String,
}

/// A function whose frame layout changed, that was removed or is new.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionReview {
    pub name: String,
    /// `frame changed`, `removed` or `new`.
    pub status: String,
    /// Per variable and frame property, what changed and how it maps.
    pub changes: Vec<String>,
}

/// Something the default rules do not decide.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeedsUser {
    /// `global session`, `main: local cfg`.
    pub what: String,
    pub old_type: String,
    pub new_type: String,
    /// Why no default rule maps it.
    pub why: String,
    /// When it matters (`always`, or `when a frame of main is active`).
    pub when: String,
    /// The SPEC line that would settle it.
    pub spec_line: String,
}

/// What a SPEC line is about.
#[derive(Clone, Copy, Debug)]
pub enum SpecKey<'a> {
    /// A global, or a static local when `owner` is set.
    Global {
        name: &'a str,
        owner: Option<&'a str>,
    },
    /// A local or parameter of a function's frame.
    Local { function: &'a str, var: &'a str },
    /// A continuation (`entry`, `loop#K`, `call:NAME#K`) of OLD's
    /// `function`: the line maps it to itself, for the user to correct.
    Continuation {
        function: &'a str,
        continuation: &'a str,
    },
    /// A pointer that may hold a heap array, named as in `[heap]`
    /// (`global.items`, `struct pool.slots`, `fill.items`): the line names
    /// a placeholder count beside it, for the user to correct.
    HeapCount { pointer: &'a str },
}

/// The SPEC line that settles `key`. The one place SPEC syntax is spelled
/// out here, so it can follow the SPEC format (`spec.rs`) in one edit.
pub fn spec_line(key: SpecKey<'_>) -> String {
    // Dotted keys at the top level: one line of valid TOML.
    match key {
        SpecKey::Global { name, owner } => {
            let key = crate::spec::global_key(name, owner);
            format!("values.globals.{} = 0", toml_str(&key))
        }
        SpecKey::Local { function, var } => {
            format!("values.locals.{}.{} = 0", toml_str(function), toml_str(var))
        }
        SpecKey::Continuation {
            function,
            continuation,
        } => {
            let site = format!("{function}@{continuation}");
            format!("continuations.{} = {}", toml_str(&site), toml_str(&site))
        }
        SpecKey::HeapCount { pointer } => {
            // The count sits where the pointer's can: beside it.
            let count = match pointer.rsplit_once('.') {
                Some((owner, _)) => format!("{owner}.COUNT"),
                None => "global.COUNT".to_string(),
            };
            format!(
                "heap.{} = {{ count = {} }}",
                toml_str(pointer),
                toml_str(&count)
            )
        }
    }
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A named type's identity across versions: kind and name.
pub(crate) fn named_key(t: &Type) -> Option<(&'static str, &str)> {
    match t {
        Type::Struct {
            name: Some(n),
            declaration: false,
            ..
        } => Some(("struct", n)),
        Type::Union {
            name: Some(n),
            declaration: false,
            ..
        } => Some(("union", n)),
        Type::Enum { name: Some(n), .. } => Some(("enum", n)),
        Type::Typedef { name, .. } => Some(("typedef", name)),
        _ => None,
    }
}

/// Named types defined in both versions whose definitions differ, each
/// once, in OLD's order: (kind, name, OLD's id, NEW's id).
pub(crate) fn changed_types<'t>(
    old: &'t FrameTables,
    new: &FrameTables,
    cmp: &mut Converter<'_>,
) -> Vec<(&'static str, &'t str, TypeId, TypeId)> {
    let mut new_ids: HashMap<(&str, &str), TypeId> = HashMap::new();
    for (j, t) in new.types.iter().enumerate() {
        if let (Some(k), Ok(j)) = (named_key(t), u32::try_from(j)) {
            new_ids.entry(k).or_insert(TypeId(j));
        }
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, t) in old.types.iter().enumerate() {
        let (Some(key), Ok(i)) = (named_key(t), u32::try_from(i)) else {
            continue;
        };
        if !seen.insert(key) {
            continue;
        }
        if let Some(&j) = new_ids.get(&key) {
            if !cmp.equal(TypeId(i), j) {
                out.push((key.0, key.1, TypeId(i), j));
            }
        }
    }
    out
}

/// The target of a typedef, if `id` is one.
fn typedef_target(types: &[Type], id: TypeId) -> Option<TypeId> {
    match types.get(id.0 as usize)? {
        Type::Typedef { target, .. } => *target,
        _ => None,
    }
}

/// Whether a typedef's change is already told by the named type it names
/// (`typedef struct session session_t`).
fn names_a_reported_type(types: &[Type], id: TypeId) -> bool {
    typedef_target(types, id)
        .and_then(|t| types.get(t.0 as usize))
        .and_then(named_key)
        .is_some_and(|(k, _)| k != "typedef")
}

/// Makes the review of `plan`, made from `old` and `new`.
pub fn review(old: &FrameTables, new: &FrameTables, plan: &UpdatePlan) -> Review {
    let mut cmp = Converter::new(&old.types, &new.types);
    let mut r = Review {
        warnings: plan.warnings.clone(),
        ..Review::default()
    };
    if let Some(u) = &plan.unrelated {
        r.needs_user.push(NeedsUser {
            what: "the new version".into(),
            old_type: String::new(),
            new_type: String::new(),
            why: u.to_string(),
            when: "always".into(),
            spec_line: u.spec_line(),
        });
    }

    for (kind, name, a, b) in changed_types(old, new, &mut cmp) {
        let label = format!("{kind} {name}");
        let changes = if kind == "typedef" {
            if names_a_reported_type(&old.types, a) && names_a_reported_type(&new.types, b) {
                continue;
            }
            match (typedef_target(&old.types, a), typedef_target(&new.types, b)) {
                (Some(x), Some(y)) => cmp.change(x, y, &label).changes,
                _ => vec![format!("{label}: now names another type")],
            }
        } else {
            cmp.change(a, b, &label).changes
        };
        // The words start with the path (`struct session: member ...`): the
        // review prints them under the type's name.
        let prefix = format!("{label}: ");
        let changes = changes
            .into_iter()
            .map(|c| c.strip_prefix(&prefix).map(str::to_string).unwrap_or(c))
            .collect();
        r.types.push(TypeReview {
            name: label,
            changes,
        });
    }

    for m in &plan.globals {
        let Some(og) = old.globals.get(m.old) else {
            continue;
        };
        let ng = m.new.and_then(|j| new.globals.get(j));
        let same_type = ng.is_some_and(|n| cmp.equal(og.ty, n.ty));
        let status = match &m.action {
            GlobalAction::Copy => continue,
            GlobalAction::KeepNew | GlobalAction::ThreadLocal if same_type => continue,
            GlobalAction::Removed => "removed",
            _ => "changed",
        };
        r.globals.push(GlobalReview {
            label: m.label.clone(),
            status: status.into(),
            old_type: Some(type_name(&old.types, og.ty)),
            new_type: ng.map(|n| type_name(&new.types, n.ty)),
            mapping: unprefixed(&m.action.to_string(), &m.label),
        });
        if let GlobalAction::TypeChanged {
            old_type,
            new_type,
            why,
        } = &m.action
        {
            r.needs_user.push(NeedsUser {
                what: m.label.clone(),
                old_type: old_type.clone(),
                new_type: new_type.clone(),
                why: why.clone(),
                when: "always".into(),
                spec_line: spec_line(SpecKey::Global {
                    name: &og.name,
                    owner: og.owner.as_deref(),
                }),
            });
        }
    }
    for &j in &plan.new_globals {
        if let Some(n) = new.globals.get(j) {
            r.globals.push(GlobalReview {
                label: global_label(n),
                status: "new".into(),
                old_type: None,
                new_type: Some(type_name(&new.types, n.ty)),
                mapping: "starts with its initial value".into(),
            });
        }
    }

    let mut old_names = HashSet::new();
    for fm in &plan.functions {
        old_names.insert(fm.name.as_str());
        let Some(of) = old.functions.get(fm.old) else {
            continue;
        };
        let Some(nf) = fm.new.and_then(|j| new.functions.get(j)) else {
            r.functions.push(FunctionReview {
                name: fm.name.clone(),
                status: "removed".into(),
                changes: vec!["an active frame of it cannot be updated".into()],
            });
            continue;
        };
        let changes = frame_changes(of, nf, &fm.vars, &fm.removed_vars);
        if !changes.is_empty() {
            r.functions.push(FunctionReview {
                name: fm.name.clone(),
                status: "frame changed".into(),
                changes,
            });
        }
        for c in fm.continuations.iter().filter(|c| c.new_site.is_none()) {
            let Some(why) = &c.unsure else {
                r.continuations_gone.push(format!("{}@{}", fm.name, c.id));
                continue;
            };
            // NEW may have this id, but not surely for the same place.
            r.needs_user.push(NeedsUser {
                what: format!("{}@{}", fm.name, c.id),
                old_type: String::new(),
                new_type: String::new(),
                why: why.clone(),
                when: format!("when a frame of {} is paused there", fm.name),
                spec_line: spec_line(SpecKey::Continuation {
                    function: &fm.name,
                    continuation: &c.id.to_string(),
                }),
            });
        }
        for (k, s) in fm.vars.iter().enumerate() {
            if let VarSource::TypeChanged {
                old_type,
                new_type,
                why,
                ..
            } = s
            {
                let var = nf.vars.get(k).map(|v| v.name.as_str()).unwrap_or("?");
                r.needs_user.push(NeedsUser {
                    what: format!("{}: local {var}", fm.name),
                    old_type: old_type.clone(),
                    new_type: new_type.clone(),
                    why: why.clone(),
                    when: format!("when a frame of {} is active", fm.name),
                    spec_line: spec_line(SpecKey::Local {
                        function: &fm.name,
                        var,
                    }),
                });
            }
        }
    }
    let mut added: Vec<&str> = new
        .functions
        .iter()
        .map(|f| f.name.as_str())
        .filter(|n| !old_names.contains(n))
        .collect();
    added.sort_unstable();
    added.dedup();
    for name in added {
        r.functions.push(FunctionReview {
            name: name.into(),
            status: "new".into(),
            changes: Vec::new(),
        });
    }
    r
}

/// `text` without the repetitions of `label: ` the change words start with
/// (the review prints them under the label already).
fn unprefixed(text: &str, label: &str) -> String {
    text.replace(&format!("{label}: "), "")
}

fn location(l: &VarLocation) -> String {
    match l {
        VarLocation::Cfa(o) => format!("CFA{:+}", o.0),
        _ => "no stack slot".into(),
    }
}

/// What changed in a function's frame, in words.
fn frame_changes(
    of: &FunctionTable,
    nf: &FunctionTable,
    vars: &[VarSource],
    removed: &[usize],
) -> Vec<String> {
    let mut out = Vec::new();
    let kind = |is_param: bool| if is_param { "parameter" } else { "local" };
    for (k, s) in vars.iter().enumerate() {
        let Some(v) = nf.vars.get(k) else { continue };
        let what = format!("{} {}", kind(v.is_param), v.name);
        let moved = |i: usize| {
            of.vars
                .get(i)
                .filter(|o| o.location != v.location)
                .map(|o| {
                    format!(
                        " (moved from {} to {})",
                        location(&o.location),
                        location(&v.location)
                    )
                })
                .unwrap_or_default()
        };
        match s {
            VarSource::Old(i) => {
                let m = moved(*i);
                if !m.is_empty() {
                    out.push(format!("{what}: copied{m}"));
                }
            }
            VarSource::Convert { old, change } => out.push(format!(
                "{what}: {} → {}, converted: {}{}",
                change.old_type,
                change.new_type,
                unprefixed(
                    &change.changes.join("; "),
                    &format!("{}: local {}", nf.name, v.name)
                ),
                moved(*old)
            )),
            VarSource::Zero => out.push(format!("{what} added: starts at zero")),
            VarSource::Value(_) => out.push(format!("{what} added: starts with the SPEC's value")),
            VarSource::NotInFrame => {}
            VarSource::Transformed {
                old_type, new_type, ..
            } => out.push(format!(
                "{what}: {old_type} → {new_type}, mapped by a C transformer"
            )),
            VarSource::TypeChanged {
                old_type,
                new_type,
                why,
                ..
            } => out.push(format!(
                "{what}: {old_type} → {new_type}, not mapped: {}",
                unprefixed(why, &format!("{}: local {}", nf.name, v.name))
            )),
            VarSource::Unmovable { why } => out.push(format!("{what}: cannot be moved: {why}")),
        }
    }
    for &i in removed {
        if let Some(v) = of.vars.get(i) {
            out.push(format!("{} {} removed", kind(v.is_param), v.name));
        }
    }
    // Same variables in the same places can still sit in a frame of
    // another size or with other saved registers.
    let size = |f: &FunctionTable| f.extent.0.checked_neg().unwrap_or(i64::MAX);
    if of.extent != nf.extent {
        out.push(format!("frame size {} → {} bytes", size(of), size(nf)));
    }
    if of.saved_regs != nf.saved_regs || of.body_depth != nf.body_depth {
        out.push("saved registers or stack depth changed".into());
    }
    out
}

/// The review as text for a person.
pub fn render_text(r: &Review) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Types changed ({}):", r.types.len());
    for t in &r.types {
        let _ = writeln!(out, "  {}", t.name);
        for c in &t.changes {
            let _ = writeln!(out, "    - {c}");
        }
    }
    let _ = writeln!(
        out,
        "Globals changed, added or removed ({}):",
        r.globals.len()
    );
    for g in &r.globals {
        let types = match (&g.old_type, &g.new_type) {
            (Some(a), Some(b)) if a != b => format!(" ({a} → {b})"),
            (Some(a), _) | (None, Some(a)) => format!(" ({a})"),
            (None, None) => String::new(),
        };
        let _ = writeln!(out, "  {} [{}]{types}: {}", g.label, g.status, g.mapping);
    }
    let _ = writeln!(out, "Functions ({}):", r.functions.len());
    for f in &r.functions {
        let _ = writeln!(out, "  {} [{}]", f.name, f.status);
        for c in &f.changes {
            let _ = writeln!(out, "    - {c}");
        }
    }
    let _ = writeln!(
        out,
        "Continuations that no longer exist ({}): a frame paused there cannot be updated",
        r.continuations_gone.len()
    );
    for c in &r.continuations_gone {
        let _ = writeln!(out, "  {c}");
    }
    let _ = writeln!(out, "Warnings ({}):", r.warnings.len());
    for w in &r.warnings {
        let _ = writeln!(out, "  {w}");
    }
    let _ = writeln!(out, "Needs the user ({}):", r.needs_user.len());
    for n in &r.needs_user {
        if n.old_type.is_empty() && n.new_type.is_empty() {
            let _ = writeln!(out, "  {} ({}): {}", n.what, n.when, n.why);
        } else {
            let _ = writeln!(
                out,
                "  {} ({} → {}, {}): {}",
                n.what, n.old_type, n.new_type, n.when, n.why
            );
        }
        let _ = writeln!(out, "    {}", n.spec_line);
    }
    out
}
