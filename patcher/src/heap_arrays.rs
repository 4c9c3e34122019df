//! Heap arrays: a `T *items` whose element count is kept elsewhere. Without
//! being told, the heap walk takes a pointer for one object; the SPEC's
//! `[heap]` table names the count, and the plan carries where both are in
//! OLD, for the runtime to convert or move all `count` elements at once.
//!
//! ```toml
//! [heap]
//! "global.items" = { count = "global.n_items" }      # globals
//! "struct pool.slots" = { count = "struct pool.n" }   # members (the count
//!                                                     # in the same object,
//!                                                     # or a global)
//! ```

use serde::{Deserialize, Serialize};
use std::path::Path;
use upstare_dwarf::fdt::FrameTables;
use upstare_dwarf::model::{type_size, BaseEncoding, Type, TypeId};

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
    let (ty, member) = name
        .rsplit_once('.')
        .filter(|(ty, _)| ty.starts_with("struct "))
        .ok_or_else(|| format!("{name} is neither global.NAME nor struct TAG.MEMBER"))?;
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

/// `ty` without typedefs and qualifiers.
fn strip(types: &[Type], ty: TypeId) -> Option<&Type> {
    crate::convert::resolve(types, ty).map(|(_, t)| t)
}

/// One `[heap]` entry checked in one version (`which`: OLD or NEW).
fn entry(t: &FrameTables, which: &str, key: &str, count: &str) -> Result<HeapArray, String> {
    let (pointer, pty) = resolve(t, key).map_err(|e| format!("{which} has {e}"))?;
    match strip(&t.types, pty) {
        Some(Type::Pointer {
            pointee: Some(elem),
        }) if type_size(&t.types, *elem).is_some_and(|s| s > 0) => {}
        _ => {
            return Err(format!(
                "{which}'s {key} is not a pointer to a sized type (it is {})",
                upstare_dwarf::model::type_name(&t.types, pty)
            ))
        }
    }
    let (count_slot, cty) = resolve(t, count).map_err(|e| format!("{which} has {e}"))?;
    match (&pointer, &count_slot) {
        (HeapSlot::Member { ty: a, .. }, HeapSlot::Member { ty: b, .. }) if a != b => {
            return Err(format!(
                "the count {count} must be a member of {a} (the same object) or a global"
            ));
        }
        (HeapSlot::Global { .. }, HeapSlot::Member { .. }) => {
            return Err(format!("the count {count} of a global must be a global"));
        }
        _ => {}
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
        pointer,
        count: count_slot,
        count_size,
        count_signed,
    })
}

/// Checks `[heap]` of `spec` against both versions: each key and its count
/// exist in OLD and NEW, the key is a pointer to a sized type and the count
/// an integer. The first bad key is a one-line error.
pub fn check(
    spec: &Spec,
    path: &Path,
    old: &FrameTables,
    new: &FrameTables,
) -> Result<(), SpecError> {
    for (key, c) in &spec.heap {
        for (t, which) in [(old, "OLD"), (new, "NEW")] {
            entry(t, which, key, &c.count).map_err(|why| SpecError::Key {
                path: path.to_path_buf(),
                table: "heap".to_string(),
                key: key.clone(),
                why,
            })?;
        }
    }
    Ok(())
}

/// The heap arrays of `spec`, resolved in OLD (entries that do not resolve
/// were refused by [`check`]).
pub fn plan_heap_arrays(spec: &Spec, old: &FrameTables) -> Vec<HeapArray> {
    spec.heap
        .iter()
        .filter_map(|(key, c)| entry(old, "OLD", key, &c.count).ok())
        .collect()
}
