//! Structural type equality: across two versions' type tables (the
//! patcher), or between two units' entries of one table (resolving
//! declarations).

use crate::model::{Type, TypeId};
use std::collections::{HashMap, HashSet};

/// Most type pairs one comparison explores (a bound on hostile tables; real
/// programs' largest types reach a few thousand pairs).
const MAX_PAIRS: usize = 1 << 22;

/// Structural type equality across two type tables.
///
/// Coinductive and iterative: comparing a pair assumes every pair it reaches
/// is equal and checks each one shallowly (names, sizes, offsets, kinds),
/// queueing the pairs of their parts. Recursive structs end because a pair is
/// checked once; nesting has no depth limit because nothing recurses. A
/// comparison that succeeds proves every pair it reached equal (they form a
/// bisimulation), so all are remembered; one that fails remembers only the
/// pair asked about.
pub struct TypeComparer<'a> {
    old: &'a [Type],
    new: &'a [Type],
    memo: HashMap<(TypeId, TypeId), bool>,
}

/// The outcome of comparing one pair shallowly.
enum Shallow {
    Differs,
    /// Equal if these pairs of parts are equal.
    SameIf(Vec<(Option<TypeId>, Option<TypeId>)>),
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
        if let Some(&r) = self.memo.get(&(a, b)) {
            return r;
        }
        let mut seen: HashSet<(TypeId, TypeId)> = HashSet::new();
        let mut todo = vec![(a, b)];
        let mut same = true;
        while let Some(pair) = todo.pop() {
            if self.memo.get(&pair) == Some(&true) || !seen.insert(pair) {
                continue;
            }
            if seen.len() > MAX_PAIRS || self.memo.get(&pair) == Some(&false) {
                same = false;
                break;
            }
            match self.shallow(pair.0, pair.1) {
                Shallow::Differs => {
                    same = false;
                    break;
                }
                Shallow::SameIf(parts) => {
                    for part in parts {
                        match part {
                            (None, None) => {}
                            (Some(x), Some(y)) => todo.push((x, y)),
                            _ => {
                                same = false;
                                break;
                            }
                        }
                    }
                    if !same {
                        break;
                    }
                }
            }
        }
        if same {
            self.memo.extend(seen.into_iter().map(|p| (p, true)));
        } else {
            self.memo.insert((a, b), false);
        }
        same
    }

    /// Compares one pair without looking into its parts.
    fn shallow(&self, a: TypeId, b: TypeId) -> Shallow {
        let (Some(ta), Some(tb)) = (self.old.get(a.0 as usize), self.new.get(b.0 as usize)) else {
            return Shallow::Differs;
        };
        let same_if = |cond: bool, parts: Vec<(Option<TypeId>, Option<TypeId>)>| {
            if cond {
                Shallow::SameIf(parts)
            } else {
                Shallow::Differs
            }
        };
        match (ta, tb) {
            (Type::Void, Type::Void) => Shallow::SameIf(Vec::new()),
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
            ) => same_if(n1 == n2 && s1 == s2 && e1 == e2, Vec::new()),
            (Type::Pointer { pointee: p1 }, Type::Pointer { pointee: p2 }) => {
                Shallow::SameIf(vec![(*p1, *p2)])
            }
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
                if n1 != n2 {
                    return Shallow::Differs;
                }
                // A type only declared on one side is known by name alone.
                if *d1 || *d2 {
                    return Shallow::SameIf(Vec::new());
                }
                let layout_same = s1 == s2
                    && m1.len() == m2.len()
                    && m1.iter().zip(m2.iter()).all(|(x, y)| {
                        x.name == y.name && x.offset == y.offset && x.bitfield == y.bitfield
                    });
                same_if(
                    layout_same,
                    m1.iter()
                        .zip(m2.iter())
                        .map(|(x, y)| (Some(x.ty), Some(y.ty)))
                        .collect(),
                )
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
            ) => same_if(d1 == d2, vec![(Some(*e1), Some(*e2))]),
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
            ) => same_if(n1 == n2 && s1 == s2 && v1 == v2, Vec::new()),
            (
                Type::Typedef {
                    name: n1,
                    target: t1,
                },
                Type::Typedef {
                    name: n2,
                    target: t2,
                },
            ) => same_if(n1 == n2, vec![(*t1, *t2)]),
            (
                Type::Qualified {
                    qualifier: q1,
                    target: t1,
                },
                Type::Qualified {
                    qualifier: q2,
                    target: t2,
                },
            ) => same_if(q1 == q2, vec![(*t1, *t2)]),
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
                let mut parts = vec![(*r1, *r2)];
                parts.extend(p1.iter().zip(p2.iter()).map(|(x, y)| (Some(*x), Some(*y))));
                same_if(v1 == v2 && p1.len() == p2.len(), parts)
            }
            _ => Shallow::Differs,
        }
    }
}

/// Deepest chain of qualifiers, typedefs and array elements followed by
/// [`is_const_object`] (such chains have no cycles in real programs; the
/// bound ends hostile ones).
const MAX_TYPE_DEPTH: u32 = 48;

/// Whether an object of type `ty` is read-only: const-qualified, or an
/// array of const elements (through typedefs). The program cannot have
/// changed such an object, and it lives in the new image's read-only data,
/// relocated by the loader: the new version's value is the one to keep.
pub fn is_const_object(types: &[Type], ty: TypeId) -> bool {
    let mut cur = ty;
    for _ in 0..MAX_TYPE_DEPTH {
        match types.get(cur.0 as usize) {
            Some(Type::Qualified {
                qualifier: crate::model::Qualifier::Const,
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
    use crate::model::{ArrayDim, BaseEncoding, Member, Qualifier};

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

    /// A chain of `depth` typedefs over structs, each holding a pointer to
    /// the next, ending in `leaf`.
    fn chain(depth: u32, leaf: Type) -> Vec<Type> {
        let mut t = Vec::new();
        for k in 0..depth {
            // 2k: typedef T_k -> 2k+1; 2k+1: struct S_k { T_{k+1} *next; }
            t.push(Type::Typedef {
                name: format!("T{k}"),
                target: Some(TypeId(2 * k + 1)),
            });
            t.push(Type::Struct {
                name: Some(format!("S{k}")),
                size: 8,
                members: vec![Member {
                    name: Some("next".into()),
                    ty: TypeId(2 * depth + 1 + k),
                    offset: 0,
                    bitfield: None,
                }],
                declaration: false,
            });
        }
        t.push(leaf); // 2 * depth
        for k in 0..depth {
            // pointer to T_{k+1} (the leaf after the last)
            let target = if k + 1 == depth {
                2 * depth
            } else {
                2 * (k + 1)
            };
            t.push(Type::Pointer {
                pointee: Some(TypeId(target)),
            });
        }
        t
    }

    #[test]
    fn nesting_has_no_depth_limit() {
        // Far deeper than any limit a recursive comparison could afford.
        let (a, b) = (chain(5000, int()), chain(5000, int()));
        let mut cmp = TypeComparer::new(&a, &b);
        assert!(cmp.equal(TypeId(0), TypeId(0)));
        // A difference at the very bottom is found, and only the pairs on
        // the way to it are called different.
        let c = chain(
            5000,
            Type::Base {
                name: "long".into(),
                size: 8,
                encoding: BaseEncoding::Signed,
            },
        );
        let mut cmp = TypeComparer::new(&a, &c);
        assert!(!cmp.equal(TypeId(0), TypeId(0)));
        assert!(!cmp.equal(TypeId(2 * 4999), TypeId(2 * 4999)));
        assert!(cmp.equal(TypeId(2), TypeId(2)) == cmp.equal(TypeId(0), TypeId(0)));
        let mut cmp = TypeComparer::new(&a, &c);
        // Asked first about an unrelated equal pair: still equal after a
        // failed comparison that did not reach it.
        assert!(!cmp.equal(TypeId(0), TypeId(0)));
        assert!(
            cmp.equal(TypeId(2 * 5000 + 1), TypeId(2 * 5000 + 1))
                == cmp.equal(TypeId(0), TypeId(0))
        );
    }

    #[test]
    fn a_failed_comparison_does_not_poison_equal_parts() {
        let (a, b, c) = (node("next"), node("next"), node("link"));
        // 3.. = node("next") again, its ids shifted by 3.
        let mut t_new = c.clone();
        t_new.extend(b.iter().map(|t| {
            match t {
                Type::Struct {
                    name,
                    size,
                    members,
                    declaration,
                } => Type::Struct {
                    name: name.clone(),
                    size: *size,
                    members: members
                        .iter()
                        .map(|m| Member {
                            ty: TypeId(m.ty.0 + 3),
                            ..m.clone()
                        })
                        .collect(),
                    declaration: *declaration,
                },
                Type::Pointer { pointee } => Type::Pointer {
                    pointee: pointee.map(|p| TypeId(p.0 + 3)),
                },
                other => other.clone(),
            }
        }));
        let mut cmp = TypeComparer::new(&a, &t_new);
        assert!(!cmp.equal(TypeId(1), TypeId(1)));
        assert!(cmp.equal(TypeId(1), TypeId(4)));
        assert!(cmp.equal(TypeId(0), TypeId(0)));
    }
}
