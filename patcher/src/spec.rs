//! The user's overrides of the default mapping: a SPEC file in TOML. Every
//! part is optional; every key is checked against the two versions, and a
//! bad one is a one-line error naming the file, the table and the key.
//!
//! ```toml
//! # Renames: OLD name = NEW name.
//! [rename.globals]
//! hits = "requests"                 # a static local is "function::name"
//! [rename.functions]
//! do_work = "handle_work"           # its frames and continuations follow
//! [rename.members."struct session"]
//! user = "username"
//! [rename.locals.main]
//! n = "count"
//!
//! # Values of what NEW adds: numbers, strings (char arrays), or
//! # { copy = "OLD_NAME" } for a local.
//! [values.globals]
//! max_clients = 64
//! [values.members."struct session"]
//! limit = 100
//! [values.locals.main]
//! bonus = 100
//! carry = { copy = "sum" }
//!
//! # Continuations: a frame paused here in OLD resumes there in NEW.
//! [continuations]
//! "worker@call:process#0" = "worker@call:handle#0"
//!
//! # Transaction safety: no update while one of these is active.
//! [safety]
//! inactive = ["commit_txn", "main@call:flush#0"]
//!
//! # NEW is plainly another program (`main`, or more than half of OLD's
//! # functions and globals, without a counterpart): refused unless the
//! # SPEC accepts it, giving how many of OLD's functions and globals have
//! # no counterpart (checked: a SPEC for other versions accepts nothing).
//! [accept]
//! unmatched = 41
//!
//! # C transformers (see `transformer.rs`), called after the default
//! # conversion with (old, new) pointers; `source` is relative to the SPEC.
//! [transformers]
//! source = "transform.c"
//! "struct session" = "xf_session"   # every value of the type
//! "global counter" = "xf_counter"   # one global
//! main = "xf_main_frame"            # every active frame of main
//!
//! # Heap arrays (see `heap_arrays.rs`): the count of a `T *` pointer.
//! [heap]
//! "global.items" = { count = "global.n_items" }
//! "struct pool.slots" = { count = "struct pool.n_slots" }
//! "fill.items" = { count = "fill.n" }    # locals of OLD's fill, one frame
//! ```

use crate::transformer::Transformers;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use upstare_dwarf::fdt::{Continuation, FrameTables};
use upstare_dwarf::model::{type_name, type_size, ArrayDim, BaseEncoding, Type, TypeId};

/// Largest SPEC file read.
pub const MAX_SPEC_SIZE: u64 = 1 << 20;

/// The SPEC file as written.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    #[serde(default)]
    pub rename: Renames,
    #[serde(default)]
    pub values: Values,
    /// `"old_fn@continuation" = "new_fn@continuation"`.
    #[serde(default)]
    pub continuations: BTreeMap<String, String>,
    #[serde(default)]
    pub safety: Safety,
    /// C transformers (see [`crate::transformer`]).
    #[serde(default)]
    pub transformers: Transformers,
    #[serde(default)]
    pub accept: Accept,
    /// Heap arrays: `"global.items" = { count = "global.n_items" }`,
    /// members and locals alike (see [`crate::heap_arrays`]).
    #[serde(default)]
    pub heap: BTreeMap<String, crate::heap_arrays::HeapCount>,
}

/// `[accept]`: updates the default rules refuse, accepted knowingly.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Accept {
    /// NEW is another program: accepted when exactly this many of OLD's
    /// functions and globals have no counterpart in NEW (see
    /// [`crate::unrelated`]).
    #[serde(default)]
    pub unmatched: Option<u64>,
}

/// `[rename.*]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Renames {
    #[serde(default)]
    pub globals: BTreeMap<String, String>,
    #[serde(default)]
    pub functions: BTreeMap<String, String>,
    /// Per struct or union (`"struct session"`): OLD member = NEW member.
    #[serde(default)]
    pub members: BTreeMap<String, BTreeMap<String, String>>,
    /// Per function (NEW's name): OLD local = NEW local.
    #[serde(default)]
    pub locals: BTreeMap<String, BTreeMap<String, String>>,
}

/// `[values.*]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Values {
    #[serde(default)]
    pub globals: BTreeMap<String, Value>,
    /// Per struct or union (`"struct session"`): member = value.
    #[serde(default)]
    pub members: BTreeMap<String, BTreeMap<String, Value>>,
    /// Per function (NEW's name): local = value.
    #[serde(default)]
    pub locals: BTreeMap<String, BTreeMap<String, Value>>,
}

/// A value given by the user.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Value {
    Integer(i64),
    Float(f64),
    Bool(bool),
    /// A string, for a `char` array (NUL-terminated).
    Text(String),
    /// The value of another OLD local of the same frame.
    Copy {
        copy: String,
    },
}

/// `[safety]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Safety {
    /// OLD functions (`name`) or continuations (`name@continuation`) that
    /// must not be active when the update happens.
    #[serde(default)]
    pub inactive: Vec<String>,
}

/// A SPEC problem: one line naming the file, the table and the key.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{0}")]
    Input(#[from] crate::input::InputError),
    #[error("{path}: not a valid SPEC file: {reason}")]
    Syntax { path: PathBuf, reason: String },
    #[error("{path}: [{table}] \"{key}\": {why}")]
    Key {
        path: PathBuf,
        table: String,
        key: String,
        why: String,
    },
}

impl Spec {
    /// Reads and parses the SPEC file at `path` (not yet checked against
    /// the versions: see [`Spec::check`]).
    pub fn read(path: &Path) -> Result<Spec, SpecError> {
        // A FIFO or a device is refused without waiting on it.
        let bytes = crate::input::read_regular(path, MAX_SPEC_SIZE)?;
        let text = String::from_utf8(bytes).map_err(|e| SpecError::Syntax {
            path: path.to_path_buf(),
            reason: format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        })?;
        Spec::parse(path, &text)
    }

    /// Parses SPEC text (named `path` in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Spec, SpecError> {
        toml::from_str(text).map_err(|e| SpecError::Syntax {
            path: path.to_path_buf(),
            // toml's message spans several lines (a source excerpt): keep
            // its first line, which says what is wrong.
            reason: e.message().lines().next().unwrap_or("").to_string(),
        })
    }

    /// Whether the SPEC says nothing.
    pub fn is_empty(&self) -> bool {
        *self == Spec::default()
    }

    /// Checks every key against OLD and NEW; the first bad one is the error.
    pub fn check(
        &self,
        path: &Path,
        old: &FrameTables,
        new: &FrameTables,
    ) -> Result<(), SpecError> {
        let bad = |table: &str, key: &str, why: String| SpecError::Key {
            path: path.to_path_buf(),
            table: table.to_string(),
            key: key.to_string(),
            why,
        };
        let global = |t: &FrameTables, key: &str| {
            t.globals
                .iter()
                .any(|g| global_key(&g.name, g.owner.as_deref()) == key)
        };
        for (o, n) in &self.rename.globals {
            if !global(old, o) {
                return Err(bad("rename.globals", o, format!("OLD has no global {o}")));
            }
            if !global(new, n) {
                return Err(bad("rename.globals", o, format!("NEW has no global {n}")));
            }
        }
        for (o, n) in &self.rename.functions {
            if old.function(o).is_none() {
                return Err(bad(
                    "rename.functions",
                    o,
                    format!("OLD has no function {o}"),
                ));
            }
            if new.function(n).is_none() {
                return Err(bad(
                    "rename.functions",
                    o,
                    format!("NEW has no function {n}"),
                ));
            }
        }
        for (ty, members) in &self.rename.members {
            let (Some(ot), Some(nt)) = (aggregate(&old.types, ty), aggregate(&new.types, ty))
            else {
                return Err(bad(
                    "rename.members",
                    ty,
                    format!("{ty} is not a struct or union of both versions"),
                ));
            };
            for (o, n) in members {
                if !has_member(&old.types, ot, o) {
                    return Err(bad(
                        &format!("rename.members.\"{ty}\""),
                        o,
                        format!("OLD's {ty} has no member {o}"),
                    ));
                }
                if !has_member(&new.types, nt, n) {
                    return Err(bad(
                        &format!("rename.members.\"{ty}\""),
                        o,
                        format!("NEW's {ty} has no member {n}"),
                    ));
                }
            }
        }
        for (func, locals) in &self.rename.locals {
            let Some(nf) = new.function(func) else {
                return Err(bad(
                    "rename.locals",
                    func,
                    format!("NEW has no function {func}"),
                ));
            };
            let old_name = self.old_function_name(func);
            let Some(of) = old.function(&old_name) else {
                return Err(bad(
                    "rename.locals",
                    func,
                    format!("OLD has no function {old_name}"),
                ));
            };
            for (o, n) in locals {
                if !of.vars.iter().any(|v| &v.name == o) {
                    return Err(bad(
                        &format!("rename.locals.{func}"),
                        o,
                        format!("OLD's {old_name} has no local {o}"),
                    ));
                }
                if !nf.vars.iter().any(|v| &v.name == n) {
                    return Err(bad(
                        &format!("rename.locals.{func}"),
                        o,
                        format!("NEW's {func} has no local {n}"),
                    ));
                }
            }
        }
        for (name, value) in &self.values.globals {
            let Some(g) = new
                .globals
                .iter()
                .find(|g| global_key(&g.name, g.owner.as_deref()) == *name)
            else {
                return Err(bad(
                    "values.globals",
                    name,
                    format!("NEW has no global {name}"),
                ));
            };
            if let Err(why) = encode(&new.types, g.ty, value) {
                return Err(bad("values.globals", name, why));
            }
        }
        for (ty, members) in &self.values.members {
            let Some(nt) = aggregate(&new.types, ty) else {
                return Err(bad(
                    "values.members",
                    ty,
                    format!("{ty} is not a struct or union of NEW"),
                ));
            };
            for (m, value) in members {
                let Some(mty) = member_type(&new.types, nt, m) else {
                    return Err(bad(
                        &format!("values.members.\"{ty}\""),
                        m,
                        format!("NEW's {ty} has no member {m}"),
                    ));
                };
                if let Err(why) = encode(&new.types, mty, value) {
                    return Err(bad(&format!("values.members.\"{ty}\""), m, why));
                }
            }
        }
        for (func, locals) in &self.values.locals {
            let Some(nf) = new.function(func) else {
                return Err(bad(
                    "values.locals",
                    func,
                    format!("NEW has no function {func}"),
                ));
            };
            let old_name = self.old_function_name(func);
            for (l, value) in locals {
                let Some(v) = nf.vars.iter().find(|v| &v.name == l) else {
                    return Err(bad(
                        &format!("values.locals.{func}"),
                        l,
                        format!("NEW's {func} has no local {l}"),
                    ));
                };
                match value {
                    Value::Copy { copy } => {
                        let exists = old
                            .function(&old_name)
                            .is_some_and(|of| of.vars.iter().any(|v| &v.name == copy));
                        if !exists {
                            return Err(bad(
                                &format!("values.locals.{func}"),
                                l,
                                format!("OLD's {old_name} has no local {copy} to copy"),
                            ));
                        }
                    }
                    _ => {
                        if let Err(why) = encode(&new.types, v.ty, value) {
                            return Err(bad(&format!("values.locals.{func}"), l, why));
                        }
                    }
                }
            }
        }
        for (from, to) in &self.continuations {
            let (Some((of, oc)), Some((nf, nc))) = (split_site(from), split_site(to)) else {
                return Err(bad("continuations", from, "write \"function@continuation\" on both sides (continuations: entry, loop#K, call:NAME#K)".into()));
            };
            let Some(oft) = old.function(&of) else {
                return Err(bad(
                    "continuations",
                    from,
                    format!("OLD has no function {of}"),
                ));
            };
            if !has_continuation(oft, &oc) {
                return Err(bad(
                    "continuations",
                    from,
                    format!("OLD's {of} has no continuation {oc}"),
                ));
            }
            let Some(nft) = new.function(&nf) else {
                return Err(bad(
                    "continuations",
                    from,
                    format!("NEW has no function {nf}"),
                ));
            };
            if !has_continuation(nft, &nc) {
                return Err(bad(
                    "continuations",
                    from,
                    format!("NEW's {nf} has no continuation {nc}"),
                ));
            }
            if self.new_function_name(&of) != nf {
                return Err(bad(
                    "continuations",
                    from,
                    format!(
                        "{of} maps to {} in NEW, not {nf} (rename the function first)",
                        self.new_function_name(&of)
                    ),
                ));
            }
        }
        self.transformers.check(path, self, old, new)?;
        crate::heap_arrays::check(self, path, old, new)?;
        for item in &self.safety.inactive {
            let (func, cont) = match split_site(item) {
                Some((f, c)) => (f, Some(c)),
                None => (item.clone(), None),
            };
            let Some(f) = old.function(&func) else {
                return Err(bad("safety", item, format!("OLD has no function {func}")));
            };
            if let Some(c) = cont {
                if !has_continuation(f, &c) {
                    return Err(bad(
                        "safety",
                        item,
                        format!("OLD's {func} has no continuation {c}"),
                    ));
                }
            }
        }
        if let Some(n) = self.accept.unmatched {
            let actual = crate::unrelated::Unmatched::of(old, new, self).count();
            if usize::try_from(n).ok() != Some(actual) {
                return Err(bad(
                    "accept",
                    "unmatched",
                    format!("{actual} of OLD's functions and globals have no counterpart in NEW, not {n}"),
                ));
            }
        }
        Ok(())
    }

    /// The NEW name of OLD's function `old`.
    pub fn new_function_name(&self, old: &str) -> String {
        self.rename
            .functions
            .get(old)
            .cloned()
            .unwrap_or_else(|| old.to_string())
    }

    /// The OLD name of NEW's function `new`.
    pub fn old_function_name(&self, new: &str) -> String {
        self.rename
            .functions
            .iter()
            .find(|(_, n)| n.as_str() == new)
            .map(|(o, _)| o.clone())
            .unwrap_or_else(|| new.to_string())
    }

    /// The NEW key of OLD's global `key` (`name` or `function::name`).
    pub fn new_global_key(&self, key: &str) -> String {
        self.rename
            .globals
            .get(key)
            .cloned()
            .unwrap_or_else(|| key.to_string())
    }

    /// The NEW name of member `old` of OLD's aggregate named `ty`.
    pub fn new_member_name<'a>(&'a self, ty: &str, old: &'a str) -> &'a str {
        self.rename
            .members
            .get(ty)
            .and_then(|m| m.get(old))
            .map_or(old, String::as_str)
    }

    /// The NEW name of local `old` of OLD's function whose NEW name is `func`.
    pub fn new_local_name<'a>(&'a self, func: &str, old: &'a str) -> &'a str {
        self.rename
            .locals
            .get(func)
            .and_then(|m| m.get(old))
            .map_or(old, String::as_str)
    }

    /// Whether the SPEC's `continuations` maps `func@c` explicitly.
    pub fn maps_continuation(&self, func: &str, c: &Continuation) -> bool {
        self.continuations.contains_key(&format!("{func}@{c}"))
    }

    /// The continuation a frame of OLD's `func` paused at `c` resumes at in
    /// NEW (by default the same id).
    pub fn new_continuation(&self, func: &str, c: &Continuation) -> Continuation {
        let key = format!("{func}@{c}");
        if let Some((_, nc)) = self.continuations.get(&key).and_then(|to| split_site(to)) {
            return nc;
        }
        // Calls to a renamed function keep their ids under the new name.
        match c {
            Continuation::Call { callee, ordinal } => Continuation::Call {
                callee: self.new_function_name(callee),
                ordinal: *ordinal,
            },
            other => other.clone(),
        }
    }
}

/// The key of a global in a SPEC: `name`, or `function::name` for a
/// static local.
pub fn global_key(name: &str, owner: Option<&str>) -> String {
    match owner {
        Some(f) => format!("{f}::{name}"),
        None => name.to_string(),
    }
}

/// `function@continuation` → parts.
pub fn split_site(s: &str) -> Option<(String, Continuation)> {
    let (f, c) = s.split_once('@')?;
    Some((f.to_string(), parse_continuation(c)?))
}

/// `entry`, `loop#K`, `call:NAME#K`.
pub fn parse_continuation(s: &str) -> Option<Continuation> {
    if s == "entry" {
        return Some(Continuation::Entry);
    }
    if let Some(k) = s.strip_prefix("loop#") {
        return k.parse().ok().map(Continuation::Loop);
    }
    let rest = s.strip_prefix("call:")?;
    let (callee, k) = rest.rsplit_once('#')?;
    Some(Continuation::Call {
        callee: callee.to_string(),
        ordinal: k.parse().ok()?,
    })
}

fn has_continuation(f: &upstare_dwarf::fdt::FunctionTable, c: &Continuation) -> bool {
    f.update_points.iter().any(|p| p.continuation() == *c)
        || f.call_sites.iter().any(|s| s.continuation() == *c)
}

/// The struct or union named `"struct NAME"` / `"union NAME"` (a
/// definition, not a declaration).
pub fn aggregate(types: &[Type], name: &str) -> Option<TypeId> {
    let (kind, tag) = name.split_once(' ')?;
    types
        .iter()
        .position(|t| match (kind, t) {
            (
                "struct",
                Type::Struct {
                    name: Some(n),
                    declaration: false,
                    ..
                },
            )
            | (
                "union",
                Type::Union {
                    name: Some(n),
                    declaration: false,
                    ..
                },
            ) => n == tag,
            _ => false,
        })
        .and_then(|i| u32::try_from(i).ok())
        .map(TypeId)
}

fn members(types: &[Type], ty: TypeId) -> &[upstare_dwarf::model::Member] {
    match types.get(ty.0 as usize) {
        Some(Type::Struct { members, .. }) | Some(Type::Union { members, .. }) => members,
        _ => &[],
    }
}

fn has_member(types: &[Type], ty: TypeId, name: &str) -> bool {
    member_type(types, ty, name).is_some()
}

fn member_type(types: &[Type], ty: TypeId, name: &str) -> Option<TypeId> {
    members(types, ty)
        .iter()
        .find(|m| m.name.as_deref() == Some(name))
        .map(|m| m.ty)
}

/// The bytes of `value` as a value of type `ty`, or why it does not fit.
pub fn encode(types: &[Type], ty: TypeId, value: &Value) -> Result<Vec<u8>, String> {
    let mut cur = ty;
    for _ in 0..64 {
        match types.get(cur.0 as usize) {
            Some(Type::Typedef {
                target: Some(t), ..
            })
            | Some(Type::Qualified {
                target: Some(t), ..
            }) => cur = *t,
            _ => break,
        }
    }
    let name = type_name(types, ty);
    let size = type_size(types, cur).ok_or_else(|| format!("{name} has no size"))?;
    let int = |v: i128, signed: bool| -> Result<Vec<u8>, String> {
        let bits = u32::try_from(size * 8).map_err(|_| format!("{name} is too large"))?;
        if bits == 0 || bits > 64 {
            return Err(format!("{name} is not an integer"));
        }
        let (min, max) = if signed {
            (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
        } else {
            (0, (1i128 << bits) - 1)
        };
        if v < min || v > max {
            return Err(format!("{v} does not fit {name}"));
        }
        Ok(v.to_le_bytes()[..size as usize].to_vec())
    };
    match (types.get(cur.0 as usize), value) {
        (Some(Type::Base { encoding, .. }), Value::Integer(v)) => match encoding {
            BaseEncoding::Signed | BaseEncoding::SignedChar => int(i128::from(*v), true),
            BaseEncoding::Unsigned | BaseEncoding::UnsignedChar | BaseEncoding::Bool => {
                int(i128::from(*v), false)
            }
            BaseEncoding::Float => float(size, *v as f64, &name),
            _ => Err(format!("{name} takes no integer")),
        },
        (
            Some(Type::Base {
                encoding: BaseEncoding::Float,
                ..
            }),
            Value::Float(v),
        ) => float(size, *v, &name),
        (
            Some(Type::Base {
                encoding: BaseEncoding::Bool,
                ..
            }),
            Value::Bool(b),
        ) => int(i128::from(*b), false),
        (Some(Type::Enum { enumerators, .. }), Value::Integer(v)) => {
            if enumerators.iter().any(|(_, e)| e == v) {
                int(
                    i128::from(*v),
                    *v < 0 || enumerators.iter().any(|(_, e)| *e < 0),
                )
            } else {
                Err(format!("{v} is no enumerator of {name}"))
            }
        }
        (Some(Type::Enum { enumerators, .. }), Value::Text(s)) => {
            match enumerators.iter().find(|(n, _)| n == s) {
                Some((_, v)) => int(i128::from(*v), enumerators.iter().any(|(_, e)| *e < 0)),
                None => Err(format!("{name} has no enumerator {s}")),
            }
        }
        (Some(Type::Array { element, dims }), Value::Text(s)) => {
            let is_char = matches!(
                types.get(element.0 as usize),
                Some(Type::Base {
                    encoding: BaseEncoding::SignedChar | BaseEncoding::UnsignedChar,
                    ..
                })
            );
            let Some(ArrayDim::Fixed(n)) = dims.first() else {
                return Err(format!("{name} has no fixed length"));
            };
            if !is_char || dims.len() != 1 {
                return Err(format!("{name} is not a char array"));
            }
            if s.len() as u64 >= *n {
                return Err(format!("\"{s}\" and its NUL do not fit {name}"));
            }
            let mut b = vec![0u8; *n as usize];
            b[..s.len()].copy_from_slice(s.as_bytes());
            Ok(b)
        }
        (Some(Type::Pointer { .. }), Value::Integer(0)) => Ok(vec![0; 8]),
        (_, Value::Copy { .. }) => Err("copy = ... is for locals only".into()),
        _ => Err(format!("this value does not fit {name}")),
    }
}

fn float(size: u64, v: f64, name: &str) -> Result<Vec<u8>, String> {
    match size {
        4 => Ok((v as f32).to_le_bytes().to_vec()),
        8 => Ok(v.to_le_bytes().to_vec()),
        _ => Err(format!("{name}: unsupported floating-point size")),
    }
}
