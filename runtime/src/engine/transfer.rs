//! State transfer between two versions, as the update plan says: finding
//! the pointers inside typed bytes, remapping them, carrying globals over,
//! and remapping the pointers stored in heap objects reachable through
//! typed pointers.
//!
//! Pure computation: reads go through [`TargetMemory`], results are a list of
//! writes the commit stage performs after everything has been validated.

use std::ops::Range;
use upstare_dwarf::model::{type_size, ArrayDim, Type, TypeId, VarLocation};
use upstare_dwarf::{LinkAddr, RuntimeAddr};
use upstare_patcher::{GlobalAction, GlobalMapping, UpdatePlan};

use crate::engine::state::{Image, Readiness, ThreadState};
use crate::memory::{MemError, TargetMemory};

/// Largest single variable copied (a bound on target-controlled sizes).
pub const MAX_VALUE_SIZE: u64 = 64 << 20;
/// Most array elements walked for pointers in one value.
const MAX_WALK_ELEMENTS: u64 = 1 << 20;
/// Deepest type nesting followed.
const MAX_TYPE_DEPTH: u32 = 48;

/// Why state cannot be transferred.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{what}: type changed from {old} to {new}; changes of type need an explicit mapping (not supported yet)")]
    TypeChanged {
        what: String,
        old: String,
        new: String,
    },
    #[error("{what}: the update plan names no such global in one of the versions (the plan was made for other binaries)")]
    PlanMismatch { what: String },
    #[error("{what}: size {size} is not supported")]
    BadSize { what: String, size: u64 },
    #[error("{what}: {source}")]
    Memory {
        what: String,
        #[source]
        source: MemError,
    },
}

/// A pending write of the commit stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub addr: RuntimeAddr,
    pub bytes: Vec<u8>,
    /// What it is, for diagnostics (`global counter`).
    pub what: String,
}

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
fn contains_pointer(types: &[Type], ty: TypeId, depth: u32) -> bool {
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
    Shift { old: Range<u64>, delta: i64 },
    /// A variable moved on its own (a frame whose layout changed).
    Var { old: Range<u64>, new_start: u64 },
}

/// Remaps pointer values from the old image's world to the new one.
pub struct Remapper<'a> {
    plan: &'a UpdatePlan,
    old: &'a Image,
    new: &'a Image,
    /// Old globals sorted by address, with the index of the new global of
    /// the same identity.
    globals: Vec<(LinkAddr, u64, Option<LinkAddr>)>,
    stack: Vec<StackMove>,
    /// Pointers into old code that name no function of the new image.
    pub dangling_code: Vec<u64>,
}

impl<'a> Remapper<'a> {
    /// A remapper that sends pointers into OLD's globals and functions where
    /// `plan` maps them.
    pub fn new(plan: &'a UpdatePlan, old: &'a Image, new: &'a Image) -> Self {
        let mut globals: Vec<(LinkAddr, u64, Option<LinkAddr>)> = plan
            .globals
            .iter()
            .filter(|m| m.action != GlobalAction::ThreadLocal)
            .filter_map(|m| {
                let g = old.tables.globals.get(m.old).filter(|g| !g.tls)?;
                let n = m
                    .new
                    .and_then(|j| new.tables.globals.get(j))
                    .filter(|n| !n.tls);
                Some((g.addr, g.size, n.map(|n| n.addr)))
            })
            .collect();
        globals.sort_by_key(|g| g.0);
        Remapper {
            plan,
            old,
            new,
            globals,
            stack: Vec::new(),
            dangling_code: Vec::new(),
        }
    }

    /// Registers how part of the old stack moves.
    pub fn add_stack_move(&mut self, m: StackMove) {
        self.stack.push(m);
    }

    /// The new value of a pointer `v` read from old state.
    pub fn remap(&mut self, v: u64) -> u64 {
        let addr = RuntimeAddr(v);
        if self.old.span.contains(&addr) {
            let link = addr.to_link(self.old.bias);
            if self.old.is_code(addr) {
                if let Some(f) = self.old.tables.function_at(link) {
                    let nf = self
                        .plan
                        .function(&f.name)
                        .and_then(|m| m.new)
                        .and_then(|j| self.new.tables.functions.get(j));
                    if let Some(nf) = nf {
                        let off = link.0 - f.low.0;
                        if off < nf.high.0.saturating_sub(nf.low.0) {
                            return self.new.runtime(LinkAddr(nf.low.0 + off)).0;
                        }
                    }
                }
                self.dangling_code.push(v);
                return v;
            }
            let i = self.globals.partition_point(|g| g.0 <= link);
            if let Some(&(start, size, Some(new_start))) =
                i.checked_sub(1).and_then(|i| self.globals.get(i))
            {
                let off = link.0 - start.0;
                if off < size.max(1) {
                    return self.new.runtime(LinkAddr(new_start.0 + off)).0;
                }
            }
            // Read-only data (string literals) stays valid in the old
            // image's mapping, which is never unmapped.
            return v;
        }
        for m in &self.stack {
            match m {
                StackMove::Var { old, new_start } if old.contains(&v) => {
                    return new_start + (v - old.start);
                }
                StackMove::Shift { old, delta } if old.contains(&v) => {
                    return v.wrapping_add_signed(*delta);
                }
                _ => {}
            }
        }
        v
    }

    /// Remaps every pointer inside `bytes`, a value of `ty` in `types`.
    pub fn remap_value(&mut self, types: &[Type], ty: TypeId, bytes: &mut [u8]) {
        let mut slots = Vec::new();
        for_each_pointer(types, ty, &mut |off| slots.push(off));
        for off in slots {
            let Some(slot) = usize::try_from(off)
                .ok()
                .and_then(|o| bytes.get_mut(o..o.checked_add(8)?))
            else {
                continue;
            };
            let mut w = [0u8; 8];
            w.copy_from_slice(slot);
            let v = u64::from_le_bytes(w);
            if v != 0 {
                slot.copy_from_slice(&self.remap(v).to_le_bytes());
            }
        }
    }
}

/// What happened to the globals.
#[derive(Debug, Default)]
pub struct GlobalsPlan {
    pub writes: Vec<Write>,
    pub copied: usize,
    /// Read-only globals (const objects) left with the new version's value.
    pub kept_const: usize,
}

/// Refuses the update when the plan leaves a global unmapped (a change of
/// type). Needs no process access, so it runs before anything is loaded.
pub fn check_globals(plan: &UpdatePlan) -> Result<(), TransferError> {
    match plan.type_changed_globals().next() {
        Some(GlobalMapping {
            label,
            action: GlobalAction::TypeChanged { old_type, new_type },
            ..
        }) => Err(TransferError::TypeChanged {
            what: label.clone(),
            old: old_type.clone(),
            new: new_type.clone(),
        }),
        _ => Ok(()),
    }
}

/// Executes the plan's global mappings: reads every global the plan copies
/// and prepares its write into the new image, pointers remapped.
pub fn transfer_globals(
    mem: &impl TargetMemory,
    plan: &UpdatePlan,
    old: &Image,
    new: &Image,
    remap: &mut Remapper<'_>,
) -> Result<GlobalsPlan, TransferError> {
    check_globals(plan)?;
    let mut out = GlobalsPlan::default();
    for m in &plan.globals {
        match m.action {
            GlobalAction::Copy => {}
            GlobalAction::KeepNew => {
                out.kept_const += 1;
                continue;
            }
            _ => continue,
        }
        let what = m.label.clone();
        let (Some(g), Some(n)) = (
            old.tables.globals.get(m.old),
            m.new.and_then(|j| new.tables.globals.get(j)),
        ) else {
            return Err(TransferError::PlanMismatch { what });
        };
        if g.size > MAX_VALUE_SIZE {
            return Err(TransferError::BadSize { what, size: g.size });
        }
        let mut bytes = mem
            .read_vec(old.runtime(g.addr), g.size, MAX_VALUE_SIZE as usize)
            .map_err(|source| TransferError::Memory {
                what: what.clone(),
                source,
            })?;
        remap.remap_value(&old.tables.types, g.ty, &mut bytes);
        out.writes.push(Write {
            addr: new.runtime(n.addr),
            bytes,
            what,
        });
        out.copied += 1;
    }
    Ok(out)
}

/// Most heap objects visited by [`transfer_heap`].
pub const MAX_HEAP_OBJECTS: usize = 1 << 18;
/// Most bytes of heap objects read by [`transfer_heap`].
pub const MAX_HEAP_BYTES: u64 = 256 << 20;

/// A typed value of the old state (a global, a local) from which the heap
/// walk starts: its type in the old image's types and its bytes.
#[derive(Clone, Debug)]
pub struct Root {
    pub ty: TypeId,
    pub bytes: Vec<u8>,
}

impl Root {
    /// Reads a value of `ty` at `addr` as a root, if its type can hold a
    /// pointer (the others cannot lead into the heap); `None` when it holds
    /// none or cannot be read.
    pub fn read(
        mem: &impl TargetMemory,
        types: &[Type],
        ty: TypeId,
        addr: RuntimeAddr,
    ) -> Option<Root> {
        if !contains_pointer(types, ty, 0) {
            return None;
        }
        let size = type_size(types, ty).filter(|s| *s > 0 && *s <= MAX_VALUE_SIZE)?;
        let bytes = mem.read_vec(addr, size, MAX_VALUE_SIZE as usize).ok()?;
        Some(Root { ty, bytes })
    }
}

/// The roots of the heap walk in the old state: every global and static
/// local, and every local and parameter in scope in every paused frame.
pub fn heap_roots(mem: &impl TargetMemory, old: &Image, threads: &[ThreadState]) -> Vec<Root> {
    let types = &old.tables.types;
    let mut roots: Vec<Root> = old
        .tables
        .globals
        .iter()
        .filter(|g| !g.tls)
        .filter_map(|g| Root::read(mem, types, g.ty, old.runtime(g.addr)))
        .collect();
    for t in threads {
        for (idx, f) in t.frames.iter().enumerate() {
            let Some(ft) = old.tables.function(&f.function) else {
                continue;
            };
            // A frame paused in a call is inside the call's statement: probe
            // scopes just before the return address (a call can end a block).
            let probe = if idx == 0 && t.readiness == Readiness::AtPoint {
                f.pc
            } else {
                LinkAddr(f.pc.0.saturating_sub(1))
            };
            for v in &ft.vars {
                let in_scope =
                    v.scope.is_empty() || v.scope.iter().any(|&(a, b)| a <= probe && probe < b);
                if let (true, VarLocation::Cfa(o)) = (in_scope, &v.location) {
                    if let Some(addr) = f.cfa.checked_offset(o.0) {
                        roots.extend(Root::read(mem, types, v.ty, addr));
                    }
                }
            }
        }
    }
    roots
}

/// What the heap walk found and will change.
#[derive(Debug, Default)]
pub struct HeapPlan {
    /// One 8-byte write per pointer slot whose value changes.
    pub writes: Vec<Write>,
    /// Heap objects visited.
    pub objects: usize,
    pub warnings: Vec<String>,
}

/// Remaps the pointers stored in heap objects: objects are found through
/// typed pointers, starting from `roots` (the old globals and locals) and
/// following pointers into `heap` (the process's heap and anonymous
/// memory, without thread stacks or images), each object read as its
/// pointer's pointee type. A slot pointing into the old image (a callback,
/// the address of a global) or into a moved stack frame gets its new value;
/// heap pointers are kept and followed. `void *` and unions are not
/// followed (their type is unknown); the walk is bounded by
/// [`MAX_HEAP_OBJECTS`] and [`MAX_HEAP_BYTES`] and visits each (address,
/// type) once, so cycles end.
pub fn transfer_heap(
    mem: &impl TargetMemory,
    types: &[Type],
    roots: &[Root],
    heap: &[Range<u64>],
    remap: &mut Remapper<'_>,
) -> HeapPlan {
    let in_heap = |a: u64, len: u64| {
        let end = a.checked_add(len);
        heap.iter()
            .any(|r| r.start <= a && end.is_some_and(|e| e <= r.end))
    };
    let mut plan = HeapPlan::default();
    let mut todo: Vec<(u64, TypeId)> = Vec::new();
    // Heap pointers found in a value: (address, pointee type).
    let scan = |bytes: &[u8], ty: TypeId, todo: &mut Vec<(u64, TypeId)>| {
        for_each_pointer_typed(types, ty, &mut |off, pointee| {
            let (Some(pointee), Ok(off)) = (pointee, usize::try_from(off)) else {
                return;
            };
            let Some(slot) = off.checked_add(8).and_then(|end| bytes.get(off..end)) else {
                return;
            };
            let mut w = [0u8; 8];
            w.copy_from_slice(slot);
            let v = u64::from_le_bytes(w);
            if v != 0 && in_heap(v, 1) {
                todo.push((v, pointee));
            }
        });
    };
    for r in roots {
        scan(&r.bytes, r.ty, &mut todo);
    }
    let mut seen: std::collections::HashSet<(u64, TypeId)> = std::collections::HashSet::new();
    let mut slots: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    let (mut bytes_read, mut unreadable) = (0u64, 0usize);
    while let Some((addr, ty)) = todo.pop() {
        if !seen.insert((addr, ty)) || !contains_pointer(types, ty, 0) {
            continue;
        }
        if plan.objects >= MAX_HEAP_OBJECTS || bytes_read >= MAX_HEAP_BYTES {
            plan.warnings.push(format!(
                "heap walk stopped after {} objects ({} bytes): pointers in the rest of the \
                 heap were not remapped",
                plan.objects, bytes_read
            ));
            break;
        }
        let Some(size) = type_size(types, ty).filter(|s| *s > 0 && *s <= MAX_VALUE_SIZE) else {
            continue;
        };
        // An object that does not fit in the heap is not one (a stale or
        // mistyped pointer): leave it alone.
        if !in_heap(addr, size) {
            continue;
        }
        let Ok(old) = mem.read_vec(RuntimeAddr(addr), size, MAX_VALUE_SIZE as usize) else {
            unreadable += 1;
            continue;
        };
        plan.objects += 1;
        bytes_read = bytes_read.saturating_add(size);
        let mut new = old.clone();
        remap.remap_value(types, ty, &mut new);
        // Only the pointer slots that changed are written, 8 bytes each: two
        // objects seen at one address with different types then never undo
        // each other's changes.
        for_each_pointer(types, ty, &mut |off| {
            let Some(r) = usize::try_from(off)
                .ok()
                .and_then(|o| Some(o..o.checked_add(8)?))
            else {
                return;
            };
            if let (Some(a), Some(b)) = (old.get(r.clone()), new.get(r)) {
                if a != b {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(b);
                    slots.insert(addr.saturating_add(off), u64::from_le_bytes(w));
                }
            }
        });
        scan(&old, ty, &mut todo);
    }
    if unreadable > 0 {
        plan.warnings.push(format!(
            "{unreadable} heap pointer(s) led to unreadable memory; left alone"
        ));
    }
    plan.writes = slots
        .into_iter()
        .map(|(addr, v)| Write {
            addr: RuntimeAddr(addr),
            bytes: v.to_le_bytes().to_vec(),
            what: format!("heap pointer at {addr:#x}"),
        })
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use upstare_dwarf::fdt::FrameTables;
    use upstare_dwarf::model::{BaseEncoding, Global, Member};

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

    fn image(base: u64, global_at: u64, types: Vec<Type>) -> Image {
        let tables = FrameTables {
            types,
            globals: vec![Global {
                name: "g".into(),
                ty: TypeId(0),
                addr: LinkAddr(global_at),
                size: 8,
                owner: None,
                external: true,
                tls: false,
            }],
            ..FrameTables::default()
        };
        Image {
            path: "/x".into(),
            bias: upstare_dwarf::LoadBias(base),
            tables,
            text: RuntimeAddr(base)..RuntimeAddr(base),
            span: RuntimeAddr(base)..RuntimeAddr(base + 0x1000),
        }
    }

    #[test]
    fn heap_pointers_into_the_old_image_are_remapped_and_cycles_end() {
        use crate::memory::ByteBuffer;
        // 0 long, 1 struct hnode { long v; struct hnode *next; long *gp; },
        // 2 struct hnode *, 3 long *
        let types = vec![
            Type::Base {
                name: "long".into(),
                size: 8,
                encoding: BaseEncoding::Signed,
            },
            Type::Struct {
                name: Some("hnode".into()),
                size: 24,
                members: vec![
                    Member {
                        name: Some("v".into()),
                        ty: TypeId(0),
                        offset: 0,
                        bitfield: None,
                    },
                    Member {
                        name: Some("next".into()),
                        ty: TypeId(2),
                        offset: 8,
                        bitfield: None,
                    },
                    Member {
                        name: Some("gp".into()),
                        ty: TypeId(3),
                        offset: 16,
                        bitfield: None,
                    },
                ],
                declaration: false,
            },
            Type::Pointer {
                pointee: Some(TypeId(1)),
            },
            Type::Pointer {
                pointee: Some(TypeId(0)),
            },
        ];
        let old = image(0x10000, 0x100, types.clone());
        let new = image(0x20000, 0x200, types.clone());
        let (g_old, g_new) = (0x10100u64, 0x20200u64);
        // A circular list of three nodes on the heap; the last one's `gp`
        // points outside both images and is kept. A fourth "node" sits
        // across the end of the heap and must not be touched.
        let heap = 0x50000u64;
        let mut bytes = vec![0u8; 0x100];
        let mut put = |off: usize, v: u64| bytes[off..off + 8].copy_from_slice(&v.to_le_bytes());
        for (i, (next, gp)) in [(heap + 24, g_old), (heap + 48, g_old), (heap, 0x7777)]
            .into_iter()
            .enumerate()
        {
            put(24 * i, i as u64);
            put(24 * i + 8, next);
            put(24 * i + 16, gp);
        }
        put(0xf0, g_old);
        let mem = ByteBuffer::with_region(RuntimeAddr(heap), bytes).expect("heap");
        let update_plan = upstare_patcher::default_plan(&old.tables, &new.tables);
        let mut remap = Remapper::new(&update_plan, &old, &new);
        let roots = [
            Root {
                ty: TypeId(2),
                bytes: (heap + 24).to_le_bytes().to_vec(),
            },
            Root {
                ty: TypeId(2),
                bytes: (heap + 0xf0).to_le_bytes().to_vec(),
            },
        ];
        let heap_ranges = [std::ops::Range {
            start: heap,
            end: heap + 0x100,
        }];
        let plan = transfer_heap(&mem, &types, &roots, &heap_ranges, &mut remap);
        assert_eq!(plan.objects, 3, "{plan:?}");
        let writes: Vec<(u64, u64)> = plan
            .writes
            .iter()
            .map(|w| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&w.bytes);
                (w.addr.0, u64::from_le_bytes(b))
            })
            .collect();
        assert_eq!(writes, vec![(heap + 16, g_new), (heap + 40, g_new)]);
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
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
