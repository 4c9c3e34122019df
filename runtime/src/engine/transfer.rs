//! State transfer between two versions: comparing types across the two
//! images' tables, finding the pointers inside typed bytes, remapping them,
//! mapping globals by name, and remapping the pointers stored in heap
//! objects reachable through typed pointers.
//!
//! Pure computation: reads go through [`TargetMemory`], results are a list of
//! writes the commit stage performs after everything has been validated.

use std::collections::HashMap;
use std::ops::Range;
use upstare_dwarf::fdt::FrameTables;
use upstare_dwarf::model::{
    type_name, type_size, ArrayDim, Global, Qualifier, Type, TypeId, VarLocation,
};
use upstare_dwarf::{LinkAddr, RuntimeAddr};

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
    old: &'a Image,
    new: &'a Image,
    /// Old globals sorted by address, with the index of the new global of
    /// the same identity.
    globals: Vec<(LinkAddr, u64, Option<LinkAddr>)>,
    stack: Vec<StackMove>,
    /// Pointers into old code that name no function of the new image.
    pub dangling_code: Vec<u64>,
}

/// The identity of a global across versions: name and owning function.
fn global_key(g: &Global) -> (&str, Option<&str>) {
    (g.name.as_str(), g.owner.as_deref())
}

impl<'a> Remapper<'a> {
    pub fn new(old: &'a Image, new: &'a Image) -> Self {
        let by_key: HashMap<(&str, Option<&str>), &Global> = new
            .tables
            .globals
            .iter()
            .filter(|g| !g.tls)
            .map(|g| (global_key(g), g))
            .collect();
        let mut globals: Vec<(LinkAddr, u64, Option<LinkAddr>)> = old
            .tables
            .globals
            .iter()
            .filter(|g| !g.tls)
            .map(|g| (g.addr, g.size, by_key.get(&global_key(g)).map(|n| n.addr)))
            .collect();
        globals.sort_by_key(|g| g.0);
        Remapper {
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
                    if let Some(nf) = self.new.tables.function(&f.name) {
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
    pub warnings: Vec<String>,
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
                qualifier: Qualifier::Const,
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

fn global_label(g: &Global) -> String {
    match &g.owner {
        Some(o) => format!("static {}::{}", o, g.name),
        None => format!("global {}", g.name),
    }
}

/// Checks that every global present in both versions keeps its type; the
/// first change is an error. Needs no process access, so it runs before
/// anything is loaded.
pub fn check_globals(old: &FrameTables, new: &FrameTables) -> Result<Vec<String>, TransferError> {
    let mut cmp = TypeComparer::new(&old.types, &new.types);
    let by_key: HashMap<(&str, Option<&str>), &Global> =
        new.globals.iter().map(|g| (global_key(g), g)).collect();
    let mut warnings = Vec::new();
    for g in &old.globals {
        match by_key.get(&global_key(g)) {
            Some(n) if !cmp.equal(g.ty, n.ty) => {
                return Err(TransferError::TypeChanged {
                    what: global_label(g),
                    old: type_name(&old.types, g.ty),
                    new: type_name(&new.types, n.ty),
                })
            }
            Some(_) => {}
            None => warnings.push(format!(
                "{} was removed in the new version; its value is dropped",
                global_label(g)
            )),
        }
    }
    let old_keys: std::collections::HashSet<(&str, Option<&str>)> =
        old.globals.iter().map(global_key).collect();
    for n in &new.globals {
        if !old_keys.contains(&global_key(n)) {
            warnings.push(format!(
                "{} is new; it starts with its initial value",
                global_label(n)
            ));
        }
    }
    Ok(warnings)
}

/// Reads every global of the old image that the new one also has and
/// prepares its write into the new image, pointers remapped. Const objects
/// keep the new image's value (see [`is_const_object`]). Thread-local
/// variables are skipped (the new image's TLS is refused by the loader).
pub fn transfer_globals(
    mem: &impl TargetMemory,
    old: &Image,
    new: &Image,
    remap: &mut Remapper<'_>,
) -> Result<GlobalsPlan, TransferError> {
    let mut plan = GlobalsPlan {
        warnings: check_globals(&old.tables, &new.tables)?,
        ..GlobalsPlan::default()
    };
    let by_key: HashMap<(&str, Option<&str>), &Global> = new
        .tables
        .globals
        .iter()
        .map(|g| (global_key(g), g))
        .collect();
    for g in old.tables.globals.iter().filter(|g| !g.tls) {
        let Some(n) = by_key.get(&global_key(g)) else {
            continue;
        };
        if is_const_object(&new.tables.types, n.ty) {
            plan.kept_const += 1;
            continue;
        }
        let what = global_label(g);
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
        plan.writes.push(Write {
            addr: new.runtime(n.addr),
            bytes,
            what,
        });
        plan.copied += 1;
    }
    Ok(plan)
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
    fn recursive_structs_compare_by_layout_and_names() {
        let (a, b, c) = (node("next"), node("next"), node("link"));
        assert!(TypeComparer::new(&a, &b).equal(TypeId(1), TypeId(1)));
        assert!(!TypeComparer::new(&a, &c).equal(TypeId(1), TypeId(1)));
        assert!(!TypeComparer::new(&a, &b).equal(TypeId(0), TypeId(2)));
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
        let mut remap = Remapper::new(&old, &new);
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
        assert!(!TypeComparer::new(&t, &t).equal(TypeId(0), TypeId(2)));
    }
}
