//! Types only declared in one compilation unit (`struct hash;`), resolved
//! by name to their definition in another unit of the same binary.
//!
//! Without this, a pointer whose pointee is only declared where the pointer
//! lives leads nowhere: an object of a type the unit never sees is never
//! looked into, and a callback in it keeps pointing into the retired image
//! after an update. C allows two units to give one tag different
//! definitions (redis's `struct dict` and its vendored hiredis's): when a
//! declaration's name has such rival definitions, which one it means cannot
//! be known, so the declaration stays opaque and is reported as ambiguous.
//! The typed walk does not enter it; the sweep for pointers into the old
//! image still covers what it holds, and the plan refuses an update that
//! changes such a type (its objects could not all be found).

use std::collections::HashMap;

use crate::compare::TypeComparer;
use crate::model::{Type, TypeId};

/// Two compilation units define the tag a declaration names differently:
/// the declaration is left opaque.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// `struct` or `union`.
    pub kind: &'static str,
    pub name: String,
    /// The units (their `DW_AT_name`) of the two definitions.
    pub first: String,
    pub second: String,
}

/// What [`resolve_declarations`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Declarations replaced by their definition.
    pub resolved: usize,
    /// Tags whose rival definitions leave their declarations opaque, one
    /// entry per tag.
    pub ambiguous: Vec<Conflict>,
}

/// Replaces every named struct or union that is only a declaration by a
/// copy of its definition, when the binary defines it, and all its
/// definitions agree (same layout, member names and member types, compared
/// structurally since each unit has its own type entries). A declaration
/// with no definition anywhere stays a declaration (a library's opaque
/// type); so does one whose definitions disagree, reported in
/// [`Resolution::ambiguous`]. `unit_of` names the compilation unit of a
/// type, for the report.
pub fn resolve_declarations(types: &mut [Type], unit_of: &dyn Fn(TypeId) -> String) -> Resolution {
    let mut ambiguous = Vec::new();
    // (is a union, tag) -> definitions, in type-table order.
    let mut defs: HashMap<(bool, &str), Vec<TypeId>> = HashMap::new();
    let mut decls: Vec<(TypeId, bool, String)> = Vec::new();
    for (i, t) in types.iter().enumerate() {
        let Ok(i) = u32::try_from(i) else { break };
        let (is_union, name, declaration) = match t {
            Type::Struct {
                name: Some(n),
                declaration,
                ..
            } => (false, n, *declaration),
            Type::Union {
                name: Some(n),
                declaration,
                ..
            } => (true, n, *declaration),
            _ => continue,
        };
        if declaration {
            decls.push((TypeId(i), is_union, name.clone()));
        } else {
            defs.entry((is_union, name.as_str()))
                .or_default()
                .push(TypeId(i));
        }
    }
    // Per tag: the definition every declaration of it becomes.
    let mut chosen: HashMap<(bool, String), TypeId> = HashMap::new();
    for (_, is_union, name) in &decls {
        let key = (*is_union, name.clone());
        if chosen.contains_key(&key) {
            continue;
        }
        let Some(cands) = defs.get(&(*is_union, name.as_str())) else {
            continue;
        };
        let Some(&first) = cands.first() else {
            continue;
        };
        let rival = cands[1..]
            .iter()
            .find(|&&other| !TypeComparer::new(types, types).equal(first, other));
        if let Some(&other) = rival {
            if !ambiguous.iter().any(|c: &Conflict| c.name == *name) {
                ambiguous.push(Conflict {
                    kind: if *is_union { "union" } else { "struct" },
                    name: name.clone(),
                    first: unit_of(first),
                    second: unit_of(other),
                });
            }
            continue;
        }
        chosen.insert(key, first);
    }
    let mut resolved = 0;
    for (id, is_union, name) in decls {
        let Some(&def) = chosen.get(&(is_union, name)) else {
            continue;
        };
        if let (Some(d), true) = (
            types.get(def.0 as usize).cloned(),
            (id.0 as usize) < types.len(),
        ) {
            types[id.0 as usize] = d;
            resolved += 1;
        }
    }
    Resolution {
        resolved,
        ambiguous,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BaseEncoding, Member};

    fn long() -> Type {
        Type::Base {
            name: "long".into(),
            size: 8,
            encoding: BaseEncoding::Signed,
        }
    }

    fn member(name: &str, ty: u32, offset: u64) -> Member {
        Member {
            name: Some(name.into()),
            ty: TypeId(ty),
            offset,
            bitfield: None,
        }
    }

    fn decl(name: &str) -> Type {
        Type::Struct {
            name: Some(name.into()),
            size: 0,
            members: vec![],
            declaration: true,
        }
    }

    /// Unit A: 0 long, 1 `struct hash;`, 2 `struct hash *`.
    /// Unit B: 3 long, 4 struct hash { long n; struct hash *next; }, 5 ptr
    /// to 4; unit C: 6 struct hash (as given), 7 ptr to 6.
    fn table(c_second: &str) -> Vec<Type> {
        vec![
            long(),
            decl("hash"),
            Type::Pointer {
                pointee: Some(TypeId(1)),
            },
            long(),
            Type::Struct {
                name: Some("hash".into()),
                size: 16,
                members: vec![member("n", 3, 0), member("next", 5, 8)],
                declaration: false,
            },
            Type::Pointer {
                pointee: Some(TypeId(4)),
            },
            Type::Struct {
                name: Some("hash".into()),
                size: 16,
                members: vec![member("n", 0, 0), member(c_second, 7, 8)],
                declaration: false,
            },
            Type::Pointer {
                pointee: Some(TypeId(6)),
            },
        ]
    }

    fn unit(id: TypeId) -> String {
        match id.0 {
            0..=2 => "a.c".into(),
            3..=5 => "b.c".into(),
            _ => "c.c".into(),
        }
    }

    #[test]
    fn a_declaration_becomes_the_agreeing_definition() {
        let mut t = table("next");
        assert_eq!(resolve_declarations(&mut t, &unit).resolved, 1);
        match &t[1] {
            Type::Struct {
                size, declaration, ..
            } => assert_eq!((*size, *declaration), (16, false)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rival_definitions_leave_the_declaration_opaque_naming_both_units() {
        let mut t = table("link");
        let r = resolve_declarations(&mut t, &unit);
        assert_eq!(r.resolved, 0);
        assert_eq!(t[1], decl("hash"));
        let [e] = r.ambiguous.as_slice() else {
            panic!("one ambiguous tag expected: {r:?}");
        };
        assert_eq!(
            (e.kind, e.name.as_str(), e.first.as_str(), e.second.as_str()),
            ("struct", "hash", "b.c", "c.c")
        );
    }

    #[test]
    fn rival_definitions_without_a_declaration_are_fine() {
        let mut t = table("link");
        t[1] = long();
        assert_eq!(resolve_declarations(&mut t, &unit), Resolution::default());
    }

    #[test]
    fn an_undefined_tag_stays_declared() {
        let mut t = vec![decl("opaque")];
        assert_eq!(resolve_declarations(&mut t, &unit), Resolution::default());
        assert_eq!(t[0], decl("opaque"));
    }
}
