//! Comparing types across two versions' type tables.

use std::collections::HashMap;
use upstare_dwarf::model::{Type, TypeId};

/// Deepest type nesting followed.
const MAX_TYPE_DEPTH: u32 = 48;

/// Structural type equality across two type tables (coinductive: a pair
/// being compared is assumed equal, which handles recursive structs).
pub struct TypeComparer<'a> {
    old: &'a [Type],
    new: &'a [Type],
    memo: HashMap<(TypeId, TypeId), bool>,
}

impl<'a> TypeComparer<'a> {
    pub fn new(old: &'a [Type], new: &'a [Type]) -> Self {
        TypeComparer {
            old,
            new,
            memo: HashMap::new(),
        }
    }

    /// Whether old type `a` and new type `b` have the same layout and meaning.
    pub fn equal(&mut self, a: TypeId, b: TypeId) -> bool {
        self.eq(Some(a), Some(b), 0)
    }

    fn eq(&mut self, a: Option<TypeId>, b: Option<TypeId>, depth: u32) -> bool {
        let (a, b) = match (a, b) {
            (None, None) => return true,
            (Some(a), Some(b)) => (a, b),
            _ => return false,
        };
        if depth > MAX_TYPE_DEPTH {
            return false;
        }
        if let Some(&r) = self.memo.get(&(a, b)) {
            return r;
        }
        self.memo.insert((a, b), true);
        let (Some(ta), Some(tb)) = (self.old.get(a.0 as usize), self.new.get(b.0 as usize)) else {
            self.memo.insert((a, b), false);
            return false;
        };
        let (ta, tb) = (ta.clone(), tb.clone());
        let d = depth + 1;
        let r = match (&ta, &tb) {
            (Type::Void, Type::Void) => true,
            (
                Type::Base {
                    name: n1,
                    size: s1,
                    encoding: e1,
                },
                Type::Base {
                    name: n2,
                    size: s2,
                    encoding: e2,
                },
            ) => n1 == n2 && s1 == s2 && e1 == e2,
            (Type::Pointer { pointee: p1 }, Type::Pointer { pointee: p2 }) => self.eq(*p1, *p2, d),
            (
                Type::Struct {
                    name: n1,
                    size: s1,
                    members: m1,
                    declaration: d1,
                },
                Type::Struct {
                    name: n2,
                    size: s2,
                    members: m2,
                    declaration: d2,
                },
            )
            | (
                Type::Union {
                    name: n1,
                    size: s1,
                    members: m1,
                    declaration: d1,
                },
                Type::Union {
                    name: n2,
                    size: s2,
                    members: m2,
                    declaration: d2,
                },
            ) => {
                n1 == n2
                    && (*d1 || *d2 || (s1 == s2 && m1.len() == m2.len()))
                    && (*d1
                        || *d2
                        || m1.iter().zip(m2.iter()).all(|(x, y)| {
                            x.name == y.name
                                && x.offset == y.offset
                                && x.bitfield == y.bitfield
                                && self.eq(Some(x.ty), Some(y.ty), d)
                        }))
            }
            (
                Type::Array {
                    element: e1,
                    dims: d1,
                },
                Type::Array {
                    element: e2,
                    dims: d2,
                },
            ) => d1 == d2 && self.eq(Some(*e1), Some(*e2), d),
            (
                Type::Enum {
                    size: s1,
                    enumerators: v1,
                    name: n1,
                    ..
                },
                Type::Enum {
                    size: s2,
                    enumerators: v2,
                    name: n2,
                    ..
                },
            ) => n1 == n2 && s1 == s2 && v1 == v2,
            (
                Type::Typedef {
                    name: n1,
                    target: t1,
                },
                Type::Typedef {
                    name: n2,
                    target: t2,
                },
            ) => n1 == n2 && self.eq(*t1, *t2, d),
            (
                Type::Qualified {
                    qualifier: q1,
                    target: t1,
                },
                Type::Qualified {
                    qualifier: q2,
                    target: t2,
                },
            ) => q1 == q2 && self.eq(*t1, *t2, d),
            (
                Type::Function {
                    ret: r1,
                    params: p1,
                    varargs: v1,
                },
                Type::Function {
                    ret: r2,
                    params: p2,
                    varargs: v2,
                },
            ) => {
                v1 == v2
                    && p1.len() == p2.len()
                    && self.eq(*r1, *r2, d)
                    && p1
                        .iter()
                        .zip(p2.iter())
                        .all(|(x, y)| self.eq(Some(*x), Some(*y), d))
            }
            _ => false,
        };
        self.memo.insert((a, b), r);
        r
    }
}

/// Whether an object of type `ty` is read-only: const-qualified, or an
/// array of const elements (through typedefs). The program cannot have
/// changed such an object, and it lives in the new image's read-only data,
/// relocated by the loader: the new version's value is the one to keep.
pub fn is_const_object(types: &[Type], ty: TypeId) -> bool {
    let mut cur = ty;
    for _ in 0..MAX_TYPE_DEPTH {
        match types.get(cur.0 as usize) {
            Some(Type::Qualified {
                qualifier: upstare_dwarf::model::Qualifier::Const,
                ..
            }) => return true,
            Some(Type::Qualified {
                target: Some(t), ..
            })
            | Some(Type::Typedef {
                target: Some(t), ..
            }) => cur = *t,
            Some(Type::Array { element, .. }) => cur = *element,
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use upstare_dwarf::model::{ArrayDim, BaseEncoding, Member, Qualifier};

    fn int() -> Type {
        Type::Base {
            name: "int".into(),
            size: 4,
            encoding: BaseEncoding::Signed,
        }
    }

    fn node(next_field: &str) -> Vec<Type> {
        // 0 int, 1 struct node { int v; struct node *next; }, 2 pointer to 1
        vec![
            int(),
            Type::Struct {
                name: Some("node".into()),
                size: 16,
                members: vec![
                    Member {
                        name: Some("v".into()),
                        ty: TypeId(0),
                        offset: 0,
                        bitfield: None,
                    },
                    Member {
                        name: Some(next_field.into()),
                        ty: TypeId(2),
                        offset: 8,
                        bitfield: None,
                    },
                ],
                declaration: false,
            },
            Type::Pointer {
                pointee: Some(TypeId(1)),
            },
        ]
    }

    #[test]
    fn recursive_structs_compare_by_layout_and_names() {
        let (a, b, c) = (node("next"), node("next"), node("link"));
        assert!(TypeComparer::new(&a, &b).equal(TypeId(1), TypeId(1)));
        assert!(!TypeComparer::new(&a, &c).equal(TypeId(1), TypeId(1)));
        assert!(!TypeComparer::new(&a, &b).equal(TypeId(0), TypeId(2)));
    }

    #[test]
    fn const_objects_are_recognised_through_arrays_and_typedefs() {
        // 0 int, 1 const int, 2 const int[6], 3 typedef T = const int[6],
        // 4 int[6], 5 pointer to const int, 6 const pointer to int
        let t = vec![
            int(),
            Type::Qualified {
                qualifier: Qualifier::Const,
                target: Some(TypeId(0)),
            },
            Type::Array {
                element: TypeId(1),
                dims: vec![ArrayDim::Fixed(6)],
            },
            Type::Typedef {
                name: "T".into(),
                target: Some(TypeId(2)),
            },
            Type::Array {
                element: TypeId(0),
                dims: vec![ArrayDim::Fixed(6)],
            },
            Type::Pointer {
                pointee: Some(TypeId(1)),
            },
            Type::Qualified {
                qualifier: Qualifier::Const,
                target: Some(TypeId(7)),
            },
            Type::Pointer {
                pointee: Some(TypeId(0)),
            },
        ];
        let c: Vec<bool> = (0..7).map(|i| is_const_object(&t, TypeId(i))).collect();
        assert_eq!(c, [false, true, true, true, false, false, true]);
        // A qualifier cycle ends.
        let cyc = vec![Type::Qualified {
            qualifier: Qualifier::Volatile,
            target: Some(TypeId(0)),
        }];
        assert!(!is_const_object(&cyc, TypeId(0)));
    }
}
