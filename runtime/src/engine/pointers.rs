//! Pointers inside typed values, and where each old pointer goes: into
//! OLD's globals and functions (as the update plan maps them), into moved
//! stack frames; everything else is kept.

use std::ops::Range;
use upstare_dwarf::model::{type_size, ArrayDim, Type, TypeId};
use upstare_dwarf::{LinkAddr, RuntimeAddr};
use upstare_patcher::convert::Conversion;
use upstare_patcher::{GlobalAction, UpdatePlan};

use crate::engine::state::Image;

/// Most array elements walked for pointers in one value.
const MAX_WALK_ELEMENTS: u64 = 1 << 20;
/// Deepest type nesting followed.
const MAX_TYPE_DEPTH: u32 = 48;

/// Calls `f(offset)` for every pointer-typed 8-byte slot inside a value of
/// type `ty` (members of structs, elements of fixed arrays; unions are
/// skipped because which member is live is unknown).
pub fn for_each_pointer(types: &[Type], ty: TypeId, f: &mut dyn FnMut(u64)) {
    for_each_pointer_typed(types, ty, &mut |off, _| f(off));
}

/// [`for_each_pointer`], also giving the type each pointer points to
/// (`None` for `void *` and unknown pointees).
pub fn for_each_pointer_typed(types: &[Type], ty: TypeId, f: &mut dyn FnMut(u64, Option<TypeId>)) {
    fn go(
        types: &[Type],
        ty: TypeId,
        base: u64,
        depth: u32,
        budget: &mut u64,
        f: &mut dyn FnMut(u64, Option<TypeId>),
    ) {
        if depth > MAX_TYPE_DEPTH || *budget == 0 {
            return;
        }
        match types.get(ty.0 as usize) {
            Some(Type::Pointer { pointee }) => {
                *budget -= 1;
                f(base, *pointee);
            }
            Some(Type::Struct {
                members,
                declaration: false,
                ..
            }) => {
                for m in members {
                    if m.bitfield.is_none() {
                        go(
                            types,
                            m.ty,
                            base.saturating_add(m.offset),
                            depth + 1,
                            budget,
                            f,
                        );
                    }
                }
            }
            Some(Type::Array { element, dims }) => {
                let mut count: u64 = 1;
                for d in dims {
                    match d {
                        ArrayDim::Fixed(n) => count = count.saturating_mul(*n),
                        _ => return,
                    }
                }
                let Some(esize) = type_size(types, *element).filter(|s| *s > 0) else {
                    return;
                };
                if !contains_pointer(types, *element, 0) {
                    return;
                }
                for i in 0..count.min(MAX_WALK_ELEMENTS) {
                    go(
                        types,
                        *element,
                        base.saturating_add(i.saturating_mul(esize)),
                        depth + 1,
                        budget,
                        f,
                    );
                }
            }
            Some(Type::Typedef {
                target: Some(t), ..
            })
            | Some(Type::Qualified {
                target: Some(t), ..
            }) => go(types, *t, base, depth + 1, budget, f),
            _ => {}
        }
    }
    let mut budget = MAX_WALK_ELEMENTS;
    go(types, ty, 0, 0, &mut budget, f);
}

/// Whether a value of type `ty` contains any pointer (outside unions).
pub(crate) fn contains_pointer(types: &[Type], ty: TypeId, depth: u32) -> bool {
    if depth > MAX_TYPE_DEPTH {
        return false;
    }
    match types.get(ty.0 as usize) {
        Some(Type::Pointer { .. }) => true,
        Some(Type::Struct { members, .. }) => members
            .iter()
            .any(|m| m.bitfield.is_none() && contains_pointer(types, m.ty, depth + 1)),
        Some(Type::Array { element, .. }) => contains_pointer(types, *element, depth + 1),
        Some(Type::Typedef {
            target: Some(t), ..
        })
        | Some(Type::Qualified {
            target: Some(t), ..
        }) => contains_pointer(types, *t, depth + 1),
        _ => false,
    }
}

/// Where an old stack address goes in the rebuilt stacks.
#[derive(Clone, Debug)]
pub enum StackMove {
    /// The whole old range moves by a constant (a frame copied byte for byte).
    Shift { old: Range<RuntimeAddr>, delta: i64 },
    /// A variable moved on its own (a frame whose layout changed); a
    /// converted one's interior moves with its members.
    Var {
        old: Range<RuntimeAddr>,
        new_start: RuntimeAddr,
        conversion: Option<Conversion>,
    },
}

/// A frame rebuilt variable by variable (its layout changed), with what
/// places a `jmp_buf` may have saved in it: its frame pointer (CFA-16 in
/// both versions) and its stack pointer at each call to the `setjmp`
/// family (the caller's rsp as the call returns).
#[derive(Clone, Debug)]
pub struct RebuiltFrame {
    /// The old frame's bytes.
    pub old: Range<RuntimeAddr>,
    pub old_cfa: RuntimeAddr,
    pub new_cfa: RuntimeAddr,
    /// Stack depth at each `setjmp` call of OLD (relative to the CFA) →
    /// the depth at the same call in NEW, if the plan maps it.
    pub setjmp_depths: Vec<(i64, Option<i64>)>,
}

/// Where a heap object of changed type goes: converted in place
/// (`new_start` is the old address) or moved to a new allocation. Pointers
/// into its interior move with the member they point at.
#[derive(Clone, Debug)]
pub struct HeapMove {
    pub old: Range<RuntimeAddr>,
    pub new_start: RuntimeAddr,
    pub conversion: Conversion,
    /// Its type (`struct node`), for the report.
    pub name: String,
}

impl HeapMove {
    /// Whether the object leaves its block (not converted in place).
    pub fn moves(&self) -> bool {
        self.new_start != self.old.start
    }
}

/// A pointer slot of no definite pointee (`void *`, `char *`) whose value
/// pointed at or into a heap object of changed type: redirected with the
/// typed pointers, and reported (`--strict` refuses).
#[derive(Clone, Debug)]
pub struct UntypedAlias {
    /// What holds it: `global g_any`, `heap object struct holder at 0x..+8`.
    pub site: String,
    /// Its spelled type (`void *`).
    pub slot_type: String,
    pub old: RuntimeAddr,
    pub new: RuntimeAddr,
    /// The object's type and old start.
    pub object: String,
    pub object_at: RuntimeAddr,
}

/// Remaps pointer values from the old image's world to the new one.
pub struct Remapper<'a> {
    plan: &'a UpdatePlan,
    old: &'a Image,
    new: &'a Image,
    /// Old globals sorted by address, with the index of the new global of
    /// the same identity.
    globals: Vec<OldGlobal<'a>>,
    stack: Vec<StackMove>,
    /// The frames rebuilt variable by variable (layout changed).
    rebuilt_frames: Vec<RebuiltFrame>,
    /// Heap objects converted or moved, sorted by old address, disjoint.
    heap: Vec<HeapMove>,
    /// Pointers into old code that name no function of the new image.
    pub dangling_code: Vec<RuntimeAddr>,
    /// Pointers into parts of converted values that the new version no
    /// longer has (a removed member): left pointing at the old bytes.
    pub dangling_data: Vec<RuntimeAddr>,
    /// Pointers into parts of converted heap objects that the new version
    /// no longer has: they would point into a freed or rewritten object,
    /// so the update is refused when there is any.
    pub dangling_heap: Vec<RuntimeAddr>,
    /// `void *` and `char *` slots that pointed into converted heap
    /// objects (see [`Remapper::remap_value_at`]).
    pub untyped_aliases: Vec<UntypedAlias>,
    /// Pointer values redirected to a converted heap object's new place,
    /// per type name.
    pub heap_redirects: std::collections::BTreeMap<String, usize>,
}

/// An old global as the remapper sees it.
struct OldGlobal<'a> {
    start: LinkAddr,
    size: u64,
    new_start: Option<LinkAddr>,
    conversion: Option<&'a Conversion>,
}

impl<'a> Remapper<'a> {
    /// A remapper that sends pointers into OLD's globals and functions where
    /// `plan` maps them.
    pub fn new(plan: &'a UpdatePlan, old: &'a Image, new: &'a Image) -> Self {
        let mut globals: Vec<OldGlobal<'a>> = plan
            .globals
            .iter()
            .filter(|m| m.action != GlobalAction::ThreadLocal)
            .filter_map(|m| {
                let g = old.tables.globals.get(m.old).filter(|g| !g.tls)?;
                let n = m
                    .new
                    .and_then(|j| new.tables.globals.get(j))
                    .filter(|n| !n.tls);
                let conversion = match &m.action {
                    GlobalAction::Convert { change } => Some(&change.conversion),
                    _ => m.offsets.as_ref(),
                };
                Some(OldGlobal {
                    start: g.addr,
                    size: g.size,
                    new_start: n.map(|n| n.addr),
                    conversion,
                })
            })
            .collect();
        globals.sort_by_key(|g| g.start);
        Remapper {
            plan,
            old,
            new,
            globals,
            stack: Vec::new(),
            rebuilt_frames: Vec::new(),
            heap: Vec::new(),
            dangling_code: Vec::new(),
            dangling_data: Vec::new(),
            dangling_heap: Vec::new(),
            untyped_aliases: Vec::new(),
            heap_redirects: Default::default(),
        }
    }

    /// The converted heap object `v` points at or into: its move.
    pub fn heap_move_at(&self, v: RuntimeAddr) -> Option<&HeapMove> {
        let i = self.heap.partition_point(|m| m.old.start <= v);
        i.checked_sub(1)
            .and_then(|i| self.heap.get(i))
            .filter(|m| m.old.contains(&v))
    }

    /// Registers how part of the old stack moves.
    pub fn add_stack_move(&mut self, m: StackMove) {
        self.stack.push(m);
    }

    /// Registers a frame rebuilt variable by variable.
    pub fn add_rebuilt_frame(&mut self, frame: RebuiltFrame) {
        self.rebuilt_frames.push(frame);
    }

    /// Where a stack address that a `jmp_buf` saved goes when it lies in a
    /// frame rebuilt variable by variable: `None` when it is in no such
    /// frame, `Some(None)` when it is but is neither the frame's saved
    /// frame pointer nor its stack pointer at a mapped `setjmp` call.
    pub fn rebuilt_frame_anchor(&self, v: RuntimeAddr) -> Option<Option<RuntimeAddr>> {
        let f = self.rebuilt_frames.iter().find(|f| f.old.contains(&v))?;
        let off = v.0.wrapping_sub(f.old_cfa.0) as i64;
        let new_off = if off == -16 {
            Some(-16)
        } else {
            f.setjmp_depths
                .iter()
                .find(|(o, _)| *o == off)
                .and_then(|(_, n)| *n)
        };
        Some(new_off.and_then(|o| f.new_cfa.checked_offset(o)))
    }

    /// The smallest range holding every old stack address that moves or
    /// lies in a rebuilt frame (`None`: the stack stays as it is).
    pub fn moved_stack_span(&self) -> Option<std::ops::Range<u64>> {
        let moving = self.stack.iter().filter_map(|m| match m {
            StackMove::Shift { old, delta } if *delta != 0 => Some(old),
            StackMove::Var { old, new_start, .. } if *new_start != old.start => Some(old),
            _ => None,
        });
        moving
            .chain(self.rebuilt_frames.iter().map(|f| &f.old))
            .map(|r| r.start.0..r.end.0)
            .reduce(|a, b| a.start.min(b.start)..a.end.max(b.end))
    }

    /// Registers heap objects of changed type (converted in place or
    /// moved); `moves` must not overlap (the heap walk refuses overlapping
    /// objects of changed type).
    pub fn set_heap_moves(&mut self, mut moves: Vec<HeapMove>) {
        moves.sort_by_key(|m| m.old.start);
        self.heap = moves;
    }

    /// The new value of a pointer `v` read from old state.
    pub fn remap(&mut self, v: RuntimeAddr) -> RuntimeAddr {
        // Heap objects are many: found by binary search on their start.
        let i = self.heap.partition_point(|m| m.old.start <= v);
        if let Some(m) = i.checked_sub(1).and_then(|i| self.heap.get(i)) {
            if m.old.contains(&v) {
                let off = v.offset_from(m.old.start).unwrap_or(0);
                return match m
                    .conversion
                    .map_offset(off)
                    .and_then(|o| m.new_start.checked_add(o))
                {
                    Some(at) => {
                        if at != v {
                            *self.heap_redirects.entry(m.name.clone()).or_default() += 1;
                        }
                        at
                    }
                    None => {
                        self.dangling_heap.push(v);
                        v
                    }
                };
            }
        }
        if self.old.span.contains(&v) {
            let link = v.to_link(self.old.bias);
            if self.old.is_code(v) {
                if let Some(f) = self.old.tables.function_at(link) {
                    let nf = self
                        .plan
                        .new_function(f, &self.old.tables, &self.new.tables);
                    let off = link.offset_from(f.low);
                    if let (Some(nf), Some(off)) = (nf, off) {
                        let len = nf.high.offset_from(nf.low).unwrap_or(0);
                        if let (true, Some(at)) = (off < len, nf.low.checked_add(off)) {
                            return self.new.runtime(at);
                        }
                    }
                }
                self.dangling_code.push(v);
                return v;
            }
            let i = self.globals.partition_point(|g| g.start <= link);
            if let Some(g) = i.checked_sub(1).and_then(|i| self.globals.get(i)) {
                let off = link.offset_from(g.start).unwrap_or(u64::MAX);
                if let (true, Some(new_start)) = (off < g.size.max(1), g.new_start) {
                    // A pointer into a converted object moves with the
                    // member it points at.
                    let new_off = match g.conversion {
                        None => Some(off),
                        Some(c) => c.map_offset(off),
                    };
                    match new_off.and_then(|o| new_start.checked_add(o)) {
                        Some(at) => return self.new.runtime(at),
                        None => {
                            self.dangling_data.push(v);
                            return v;
                        }
                    }
                }
            }
            // Read-only data (string literals) stays valid in the old
            // image's mapping, which is never unmapped.
            return v;
        }
        for m in &self.stack {
            match m {
                StackMove::Var {
                    old,
                    new_start,
                    conversion,
                } if old.contains(&v) => {
                    let off = v.offset_from(old.start).unwrap_or(0);
                    let new_off = conversion.as_ref().map_or(Some(off), |c| c.map_offset(off));
                    match new_off.and_then(|o| new_start.checked_add(o)) {
                        Some(at) => return at,
                        None => {
                            self.dangling_data.push(v);
                            return v;
                        }
                    }
                }
                StackMove::Shift { old, delta } if old.contains(&v) => {
                    return v.checked_offset(*delta).unwrap_or(v);
                }
                _ => {}
            }
        }
        v
    }

    /// Remaps every pointer inside `bytes`, a value of `ty` in `types`.
    pub fn remap_value(&mut self, types: &[Type], ty: TypeId, bytes: &mut [u8]) {
        self.remap_value_at(types, ty, bytes, &|| "a value".to_string());
    }

    /// [`Remapper::remap_value`] for a value held by `site` (named only
    /// when needed): a `void *` or `char *` slot pointing at or into a
    /// converted heap object is redirected like a typed pointer (to the
    /// object's new start, or following the member it points into) and
    /// recorded in [`Remapper::untyped_aliases`].
    pub fn remap_value_at(
        &mut self,
        types: &[Type],
        ty: TypeId,
        bytes: &mut [u8],
        site: &dyn Fn() -> String,
    ) {
        let mut slots = Vec::new();
        for_each_pointer_typed(types, ty, &mut |off, pointee| slots.push((off, pointee)));
        for (off, pointee) in slots {
            let Some(slot) = usize::try_from(off)
                .ok()
                .and_then(|o| bytes.get_mut(o..o.checked_add(8)?))
            else {
                continue;
            };
            let mut w = [0u8; 8];
            w.copy_from_slice(slot);
            let v = u64::from_le_bytes(w);
            if v == 0 {
                continue;
            }
            let new = self.remap(RuntimeAddr(v));
            slot.copy_from_slice(&new.0.to_le_bytes());
            if untyped_pointee(types, pointee) {
                if let Some(m) = self.heap_move_at(RuntimeAddr(v)) {
                    let alias = UntypedAlias {
                        site: match off {
                            0 => site(),
                            o => format!("{}+{o}", site()),
                        },
                        slot_type: format!(
                            "{} *",
                            pointee.map_or_else(
                                || "void".to_string(),
                                |p| upstare_dwarf::model::type_name(types, p)
                            )
                        ),
                        old: RuntimeAddr(v),
                        new,
                        object: m.name.clone(),
                        object_at: m.old.start,
                    };
                    self.untyped_aliases.push(alias);
                }
            }
        }
    }
}

/// `void`, or a one-byte integer (`char`): a pointer to it says nothing of
/// the object it points at.
fn untyped_pointee(types: &[Type], pointee: Option<TypeId>) -> bool {
    let Some(p) = pointee else {
        return true;
    };
    matches!(
        crate::engine::heap::resolve(types, p).and_then(|t| types.get(t.0 as usize)),
        None | Some(Type::Void) | Some(Type::Base { size: 1, .. })
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use upstare_dwarf::model::{BaseEncoding, Member};

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
    fn pointers_found_in_structs_and_arrays() {
        let mut t = node("next");
        t.push(Type::Array {
            element: TypeId(1),
            dims: vec![ArrayDim::Fixed(3)],
        }); // 3
        let mut offs = Vec::new();
        for_each_pointer(&t, TypeId(3), &mut |o| offs.push(o));
        assert_eq!(offs, vec![8, 24, 40]);
        let mut none = Vec::new();
        for_each_pointer(&t, TypeId(0), &mut |o| none.push(o));
        assert!(none.is_empty());
    }

    #[test]
    fn hostile_types_are_bounded() {
        // A typedef cycle and a huge array must terminate.
        let t = vec![
            Type::Typedef {
                name: "a".into(),
                target: Some(TypeId(1)),
            },
            Type::Typedef {
                name: "b".into(),
                target: Some(TypeId(0)),
            },
            Type::Pointer { pointee: None },
            Type::Array {
                element: TypeId(2),
                dims: vec![ArrayDim::Fixed(u64::MAX)],
            },
        ];
        let mut n = 0u64;
        for_each_pointer(&t, TypeId(0), &mut |_| n += 1);
        assert_eq!(n, 0);
        for_each_pointer(&t, TypeId(3), &mut |_| n += 1);
        assert!(n <= MAX_WALK_ELEMENTS);
        assert!(!upstare_patcher::TypeComparer::new(&t, &t).equal(TypeId(0), TypeId(2)));
    }
}
