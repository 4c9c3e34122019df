//! Heap arrays: a `T *items` whose element count is kept elsewhere. Without
//! being told, the heap walk takes a pointer for one object; the SPEC's
//! `[heap]` table names the count, and the plan carries where both are in
//! OLD, for the runtime to convert or move all `count` elements at once.
//!
//! ```toml
//! [heap]
//! "global.items" = { count = "global.n_items" }      # globals (a static
//!                                                     # local: "global.f::x")
//! "struct pool.slots" = { count = "struct pool.n" }   # members (the count
//!                                                     # in the same object,
//!                                                     # or a global)
//! "fill.items" = { count = "fill.n" }                 # locals and parameters
//!                                                     # of OLD's function
//!                                                     # fill (the count in
//!                                                     # the same frame, or
//!                                                     # a global)
//! ```
//!
//! Names are OLD's; NEW is checked under the SPEC's renames. A local is
//! read in every active frame of its function (every thread, every level
//! of a recursion), its count from the same frame.

use serde::{Deserialize, Serialize};
use std::path::Path;
use upstare_dwarf::fdt::FrameTables;
use upstare_dwarf::model::{type_size, BaseEncoding, Type, TypeId, VarLocation};

use crate::spec::{aggregate, global_key, Spec, SpecError};

/// One entry of `[heap]`: where the element count of the keyed pointer is.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeapCount {
    /// `global.NAME` or `struct TAG.MEMBER`.
    pub count: String,
}

/// Where a pointer or a count is, in OLD.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeapSlot {
    /// A global or static local (index into OLD's globals), the whole of it.
    Global { index: usize },
    /// A member of every object of the struct `ty` (`struct pool`), at
    /// `offset` bytes.
    Member { ty: String, offset: u64 },
    /// A local or parameter in its stack slot, in every active frame of
    /// OLD's function `function`: `var` indexes that function's `vars`.
    Local { function: String, var: usize },
}

/// A heap array the SPEC gave the count of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeapArray {
    /// The SPEC key (`global.items`), for messages.
    pub key: String,
    pub pointer: HeapSlot,
    pub count: HeapSlot,
    /// The count's integer size in bytes and signedness.
    pub count_size: u64,
    pub count_signed: bool,
}

/// A place named in `[heap]`, resolved in one version's tables: the slot
/// and its type.
fn resolve(t: &FrameTables, name: &str) -> Result<(HeapSlot, TypeId), String> {
    if let Some(g) = name.strip_prefix("global.") {
        let index = t
            .globals
            .iter()
            .position(|x| !x.tls && global_key(&x.name, x.owner.as_deref()) == g)
            .ok_or_else(|| format!("no global {g}"))?;
        return Ok((HeapSlot::Global { index }, t.globals[index].ty));
    }
    if name.starts_with("struct ") {
        return member(t, name);
    }
    let (function, local) = name.split_once('.').ok_or_else(|| {
        format!("{name} is neither global.NAME, struct TAG.MEMBER nor FUNCTION.LOCAL")
    })?;
    let f = t
        .function(function)
        .ok_or_else(|| format!("no function {function}"))?;
    let mut named = f.vars.iter().enumerate().filter(|(_, v)| v.name == local);
    let (var, v) = named
        .next()
        .ok_or_else(|| format!("no local or parameter {local} in {function}"))?;
    if named.next().is_some() {
        return Err(format!(
            "several locals named {local} in {function} (in different blocks): which one is meant cannot be known"
        ));
    }
    if !matches!(v.location, VarLocation::Cfa(_)) {
        return Err(format!(
            "a local {local} of {function} outside a stack slot of its frame"
        ));
    }
    Ok((
        HeapSlot::Local {
            function: function.to_string(),
            var,
        },
        v.ty,
    ))
}

/// `struct TAG.MEMBER`, resolved.
fn member(t: &FrameTables, name: &str) -> Result<(HeapSlot, TypeId), String> {
    let (ty, member) = name
        .rsplit_once('.')
        .ok_or_else(|| format!("{name} is not struct TAG.MEMBER"))?;
    let sid = aggregate(&t.types, ty).ok_or_else(|| format!("no {ty}"))?;
    let Some(Type::Struct { members, .. }) = t.types.get(sid.0 as usize) else {
        return Err(format!("{ty} is not a struct"));
    };
    let m = members
        .iter()
        .find(|m| m.name.as_deref() == Some(member) && m.bitfield.is_none())
        .ok_or_else(|| format!("{ty} has no member {member}"))?;
    Ok((
        HeapSlot::Member {
            ty: ty.to_string(),
            offset: m.offset,
        },
        m.ty,
    ))
}

/// The name in NEW of the place OLD's `name` is, under the SPEC's renames.
fn new_name(spec: &Spec, name: &str) -> String {
    if let Some(g) = name.strip_prefix("global.") {
        return format!("global.{}", spec.new_global_key(g));
    }
    if name.starts_with("struct ") {
        return match name.rsplit_once('.') {
            Some((ty, m)) => format!("{ty}.{}", spec.new_member_name(ty, m)),
            None => name.to_string(),
        };
    }
    match name.split_once('.') {
        Some((f, local)) => {
            let nf = spec.new_function_name(f);
            let nl = spec.new_local_name(&nf, local).to_string();
            format!("{nf}.{nl}")
        }
        None => name.to_string(),
    }
}

/// `ty` without typedefs and qualifiers.
fn strip(types: &[Type], ty: TypeId) -> Option<&Type> {
    crate::convert::resolve(types, ty).map(|(_, t)| t)
}

/// Why a count cannot be where it is for its pointer: a member's count is
/// in the same object or a global, a local's in the same frame or a global,
/// a global's a global.
fn misplaced(pointer: &HeapSlot, count: &HeapSlot, name: &str) -> Option<String> {
    match (pointer, count) {
        (_, HeapSlot::Global { .. }) => None,
        (HeapSlot::Member { ty: a, .. }, HeapSlot::Member { ty: b, .. }) if a == b => None,
        (HeapSlot::Local { function: a, .. }, HeapSlot::Local { function: b, .. }) if a == b => {
            None
        }
        (HeapSlot::Member { ty, .. }, _) => Some(format!(
            "the count {name} must be a member of {ty} (the same object) or a global"
        )),
        (HeapSlot::Local { function, .. }, _) => Some(format!(
            "the count {name} must be a local or parameter of {function} (the same frame) or a global"
        )),
        (HeapSlot::Global { .. }, _) => Some(format!(
            "the count {name} of a global must be a global"
        )),
    }
}

/// One `[heap]` entry checked in one version (`which`: OLD or NEW), named
/// in that version (`pointer`, `count`); `key` is the SPEC's key.
fn entry(
    t: &FrameTables,
    which: &str,
    key: &str,
    pointer: &str,
    count: &str,
) -> Result<HeapArray, String> {
    let (pointer_slot, pty) = resolve(t, pointer).map_err(|e| format!("{which} has {e}"))?;
    match strip(&t.types, pty) {
        Some(Type::Pointer {
            pointee: Some(elem),
        }) if type_size(&t.types, *elem).is_some_and(|s| s > 0) => {}
        _ => {
            return Err(format!(
                "{which}'s {pointer} is not a pointer to a sized type (it is {})",
                upstare_dwarf::model::type_name(&t.types, pty)
            ))
        }
    }
    let (count_slot, cty) = resolve(t, count).map_err(|e| format!("{which} has {e}"))?;
    if let Some(why) = misplaced(&pointer_slot, &count_slot, count) {
        return Err(why);
    }
    let (count_size, count_signed) = match strip(&t.types, cty) {
        Some(Type::Base { size, encoding, .. })
            if matches!(encoding, BaseEncoding::Signed | BaseEncoding::Unsigned)
                && [1, 2, 4, 8].contains(size) =>
        {
            (*size, *encoding == BaseEncoding::Signed)
        }
        _ => {
            return Err(format!(
                "{which}'s count {count} is not an integer (it is {})",
                upstare_dwarf::model::type_name(&t.types, cty)
            ))
        }
    };
    Ok(HeapArray {
        key: key.to_string(),
        pointer: pointer_slot,
        count: count_slot,
        count_size,
        count_signed,
    })
}

/// Checks `[heap]` of `spec` against both versions: each key and its count
/// exist in OLD and (renamed) in NEW, the key is a pointer to a sized type,
/// the count an integer where the pointer's count can be. The first bad key
/// is a one-line error.
pub fn check(
    spec: &Spec,
    path: &Path,
    old: &FrameTables,
    new: &FrameTables,
) -> Result<(), SpecError> {
    for (key, c) in &spec.heap {
        let bad = |why| SpecError::Key {
            path: path.to_path_buf(),
            table: "heap".to_string(),
            key: key.clone(),
            why,
        };
        entry(old, "OLD", key, key, &c.count).map_err(bad)?;
        let (pointer, count) = (new_name(spec, key), new_name(spec, &c.count));
        entry(new, "NEW", key, &pointer, &count).map_err(bad)?;
    }
    Ok(())
}

/// The heap arrays of `spec`, resolved in OLD (entries that do not resolve
/// were refused by [`check`]).
pub fn plan_heap_arrays(spec: &Spec, old: &FrameTables) -> Vec<HeapArray> {
    spec.heap
        .iter()
        .filter_map(|(key, c)| entry(old, "OLD", key, key, &c.count).ok())
        .collect()
}
