//! The heap: objects reached from the old state through typed pointers,
//! and the pointers stored in them, remapped.

use std::collections::BTreeMap;
use std::ops::Range;
use upstare_dwarf::fdt::PointKind;
use upstare_dwarf::model::{type_name, type_size, Type, TypeId, VarLocation, Variable};
use upstare_dwarf::{LinkAddr, RuntimeAddr};

use upstare_patcher::convert::{Converter, TypeChange};
use upstare_patcher::heap_arrays::{HeapArray, HeapSlot};

use crate::engine::convert::convert;
use crate::engine::pointers::{
    contains_pointer, for_each_pointer, for_each_pointer_typed, HeapMove, Remapper,
};
use crate::engine::state::{Image, Readiness, ThreadState};
use crate::engine::transfer::MAX_VALUE_SIZE;
use crate::engine::Write;
use crate::memory::TargetMemory;
use crate::target::procfs::{MapPath, MemoryMap};

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
    /// Pointer slots (offset) that point to arrays of a known number of
    /// elements (the SPEC's `[heap]`).
    pub counts: Vec<(u64, u64)>,
    /// When the value is a pointer, its name as a `[heap]` key
    /// (`global.items`, `fill.items`), for messages.
    pub key: Option<String>,
}

/// Where the element counts of heap arrays are (the plan's
/// [`HeapArray`]s, resolved in the paused process).
#[derive(Clone, Debug, Default)]
pub struct ArrayRules {
    /// Pointer globals (index into OLD's globals) → their count, `None`
    /// when it cannot be read or is negative; with the SPEC key.
    globals: Vec<(usize, Option<u64>, String)>,
    /// Pointer members of structs.
    members: Vec<MemberRule>,
    /// Pointer locals and parameters of functions.
    locals: Vec<LocalRule>,
}

#[derive(Clone, Debug)]
struct LocalRule {
    /// OLD's function, whose every active frame holds the pointer.
    function: String,
    /// Index into its `vars`.
    pointer: usize,
    count: CountAt,
    key: String,
}

#[derive(Clone, Debug)]
struct MemberRule {
    /// `struct pool`.
    ty: String,
    pointer: u64,
    count: CountAt,
    key: String,
}

#[derive(Clone, Debug)]
enum CountAt {
    /// In the same object.
    Member {
        offset: u64,
        size: u64,
        signed: bool,
    },
    /// A global's value, read once.
    Value(Option<u64>),
    /// In the same frame: a local or parameter (index into the function's
    /// `vars`).
    Frame { var: usize, size: u64, signed: bool },
}

/// An integer of `size` bytes (little-endian) as a count; `None` when
/// negative or not there.
fn decode_count(bytes: &[u8], size: u64, signed: bool) -> Option<u64> {
    let n = usize::try_from(size).ok().filter(|n| *n <= 8)?;
    let b = bytes.get(..n)?;
    let mut w = [0u8; 8];
    w[..n].copy_from_slice(b);
    let raw = u64::from_le_bytes(w);
    if signed && n > 0 && b[n - 1] & 0x80 != 0 {
        return None;
    }
    Some(raw)
}

impl ArrayRules {
    /// The rules of `arrays` for the paused process: counts kept in globals
    /// are read now.
    pub fn new(mem: &impl TargetMemory, old: &Image, arrays: &[HeapArray]) -> ArrayRules {
        let global_count = |a: &HeapArray, index: usize| {
            let g = old.tables.globals.get(index)?;
            let bytes = mem.read_vec(old.runtime(g.addr), a.count_size, 8).ok()?;
            decode_count(&bytes, a.count_size, a.count_signed)
        };
        let mut rules = ArrayRules::default();
        for a in arrays {
            let count = match &a.count {
                HeapSlot::Global { index } => CountAt::Value(global_count(a, *index)),
                HeapSlot::Member { offset, .. } => CountAt::Member {
                    offset: *offset,
                    size: a.count_size,
                    signed: a.count_signed,
                },
                HeapSlot::Local { var, .. } => CountAt::Frame {
                    var: *var,
                    size: a.count_size,
                    signed: a.count_signed,
                },
            };
            match (&a.pointer, count) {
                (HeapSlot::Global { index }, CountAt::Value(n)) => {
                    rules.globals.push((*index, n, a.key.clone()))
                }
                (
                    HeapSlot::Member { ty, offset },
                    count @ (CountAt::Value(_) | CountAt::Member { .. }),
                ) => rules.members.push(MemberRule {
                    ty: ty.clone(),
                    pointer: *offset,
                    count,
                    key: a.key.clone(),
                }),
                (
                    HeapSlot::Local { function, var },
                    count @ (CountAt::Value(_) | CountAt::Frame { .. }),
                ) => rules.locals.push(LocalRule {
                    function: function.clone(),
                    pointer: *var,
                    count,
                    key: a.key.clone(),
                }),
                // A count where its pointer's cannot be (a global's in a
                // frame, a member's in a frame...): refused by the SPEC
                // check.
                _ => {}
            }
        }
        rules
    }

    /// The counts of the pointer members of an object `name` (`struct
    /// pool`) whose bytes are `bytes`: (offset, count); unreadable counts
    /// are said in `warnings`.
    fn member_counts(
        &self,
        name: Option<&str>,
        bytes: &[u8],
        warnings: &mut Vec<String>,
    ) -> Vec<(u64, u64)> {
        let Some(name) = name else {
            return Vec::new();
        };
        self.members
            .iter()
            .filter(|r| r.ty == name)
            .filter_map(|r| {
                let n = match r.count {
                    CountAt::Value(n) => n,
                    CountAt::Member {
                        offset,
                        size,
                        signed,
                    } => usize::try_from(offset)
                        .ok()
                        .and_then(|o| bytes.get(o..))
                        .and_then(|b| decode_count(b, size, signed)),
                    // Not a member rule's (see `new`).
                    CountAt::Frame { .. } => None,
                };
                if n.is_none() {
                    warnings.push(unreadable_count(&r.key));
                }
                Some((r.pointer, n?))
            })
            .collect()
    }
}

fn unreadable_count(key: &str) -> String {
    format!("the count of heap array {key} is negative or unreadable: its pointer is taken as one object")
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
        Some(Root {
            ty,
            bytes,
            counts: Vec::new(),
            key: None,
        })
    }
}

/// The roots of the heap walk in the old state: every global and static
/// local, and every local and parameter in scope in every paused frame.
/// Pointers to heap arrays (`rules`) carry their counts: a global's from
/// its global, a local's from the same frame (every active frame of its
/// function, each with its own count).
pub fn heap_roots(
    mem: &impl TargetMemory,
    old: &Image,
    threads: &[ThreadState],
    rules: &ArrayRules,
) -> (Vec<Root>, Vec<String>) {
    let types = &old.tables.types;
    let mut warnings = Vec::new();
    let mut roots: Vec<Root> = old
        .tables
        .globals
        .iter()
        .enumerate()
        .filter(|(_, g)| !g.tls)
        .filter_map(|(i, g)| {
            let mut root = Root::read(mem, types, g.ty, old.runtime(g.addr))?;
            root.key = is_pointer(types, g.ty).then(|| {
                format!(
                    "global.{}",
                    upstare_patcher::spec::global_key(&g.name, g.owner.as_deref())
                )
            });
            for (_, n, key) in rules.globals.iter().filter(|(j, _, _)| *j == i) {
                match n {
                    Some(n) => root.counts.push((0, *n)),
                    None => warnings.push(unreadable_count(key)),
                }
            }
            Some(root)
        })
        .collect();
    for t in threads {
        for (idx, f) in t.frames.iter().enumerate() {
            let Some(ft) = old.tables.frame_function(&f.function, f.pc) else {
                continue;
            };
            // A frame paused in a call is inside the call's statement: probe
            // scopes just before the return address (a call can end a block).
            let at_point = idx == 0 && t.readiness == Readiness::AtPoint;
            let probe = if at_point {
                f.pc
            } else {
                LinkAddr(f.pc.0.saturating_sub(1))
            };
            // A frame paused at its entry has run none of its statements:
            // its locals (not its parameters) hold what the stack held
            // before, which may look like a heap pointer and a count.
            let at_entry = at_point
                && ft
                    .update_points
                    .iter()
                    .any(|p| p.kind == PointKind::Entry && p.addr == f.pc);
            let slot = |v: &Variable| {
                let in_scope =
                    v.scope.is_empty() || v.scope.iter().any(|&(a, b)| a <= probe && probe < b);
                match &v.location {
                    VarLocation::Cfa(o) if in_scope && (v.is_param || !at_entry) => {
                        f.cfa.checked_offset(o.0)
                    }
                    _ => None,
                }
            };
            for (i, v) in ft.vars.iter().enumerate() {
                let Some(mut root) = slot(v).and_then(|a| Root::read(mem, types, v.ty, a)) else {
                    continue;
                };
                root.key = is_pointer(types, v.ty).then(|| format!("{}.{}", f.function, v.name));
                let frame_rules = rules.locals.iter();
                for r in frame_rules.filter(|r| r.pointer == i && r.function == f.function) {
                    let n = match r.count {
                        CountAt::Value(n) => n,
                        CountAt::Frame { var, size, signed } => ft
                            .vars
                            .get(var)
                            .and_then(slot)
                            .and_then(|a| mem.read_vec(a, size, 8).ok())
                            .and_then(|b| decode_count(&b, size, signed)),
                        // Not a local rule's (see `ArrayRules::new`).
                        CountAt::Member { .. } => None,
                    };
                    match n {
                        Some(n) => root.counts.push((0, n)),
                        None => warnings.push(unreadable_count(&r.key)),
                    }
                }
                roots.push(root);
            }
        }
    }
    (roots, warnings)
}

/// Whether `ty` is a pointer (through typedefs and qualifiers).
fn is_pointer(types: &[Type], ty: TypeId) -> bool {
    resolve(types, ty)
        .and_then(|t| types.get(t.0 as usize))
        .is_some_and(|t| matches!(t, Type::Pointer { .. }))
}

/// The `[heap]` key of the pointer member at `off` of a struct `ty`
/// (`struct pool.slots`), when there is one exactly there.
fn member_key(types: &[Type], ty: TypeId, off: u64) -> Option<String> {
    let id = resolve(types, ty)?;
    let t = types.get(id.0 as usize)?;
    let Type::Struct { members, .. } = t else {
        return None;
    };
    let name = upstare_patcher::plan::aggregate_name(t)?;
    let m = members
        .iter()
        .find(|m| m.offset == off && m.bitfield.is_none() && is_pointer(types, m.ty))?;
    Some(format!("{name}.{}", m.name.as_deref()?))
}

/// Why the heap cannot be carried over.
#[derive(Debug, thiserror::Error)]
pub enum HeapError {
    #[error("a heap object at {addr} has type {ty}, which changed in the new version and cannot be converted ({why}); the update is refused and nothing was changed")]
    Unconvertible {
        addr: RuntimeAddr,
        ty: String,
        why: String,
    },
    #[error("a heap object at {addr} has type {ty}, which changed in the new version and has no definition there; the update is refused and nothing was changed")]
    NoNewType { addr: RuntimeAddr, ty: String },
    #[error("the heap object at {addr} of changed type {ty} is also reached as {other} at {other_addr}; an object reached through two types is refused")]
    TwoTypes {
        addr: RuntimeAddr,
        ty: String,
        other_addr: RuntimeAddr,
        other: String,
    },
    #[error("the heap object at {addr} of changed type {ty} grows from {old_size} to {new_size} bytes and is not the start of a block of the allocator, so it cannot be moved (an element of a heap array? give the array's count in the SPEC's [heap]); the update is refused and nothing was changed")]
    NotAllocated {
        addr: RuntimeAddr,
        ty: String,
        old_size: u64,
        new_size: u64,
    },
    #[error("the heap object at {addr} of type {ty} cannot be converted: {source}")]
    Convert {
        addr: RuntimeAddr,
        ty: String,
        #[source]
        source: crate::engine::convert::ConvertError,
    },
    #[error("the heap array {key} at {addr} holds {count} elements of {ty} by the SPEC's [heap] count, {why}; the update is refused and nothing was changed")]
    ArrayCount {
        key: String,
        addr: RuntimeAddr,
        count: u64,
        ty: String,
        why: String,
    },
    #[error("a pointer {value} points into a part of a converted heap object that the new version no longer has (a removed member); the update is refused and nothing was changed")]
    DanglingInterior { value: RuntimeAddr },
    #[error("cannot write the moved heap object of type {ty} at {addr}: {source}")]
    Write {
        addr: RuntimeAddr,
        ty: String,
        #[source]
        source: crate::memory::MemError,
    },
}

/// The name of the aggregate `ty` is, through typedefs and qualifiers.
fn resolved_name(types: &[Type], ty: TypeId) -> Option<String> {
    resolve(types, ty).and_then(|t| upstare_patcher::plan::aggregate_name(types.get(t.0 as usize)?))
}

/// The spelling (`struct dict`) of a struct or union that is only declared.
fn declared_name(types: &[Type], ty: TypeId) -> Option<String> {
    match types.get(resolve(types, ty)?.0 as usize)? {
        Type::Struct {
            name: Some(n),
            declaration: true,
            ..
        } => Some(format!("struct {n}")),
        Type::Union {
            name: Some(n),
            declaration: true,
            ..
        } => Some(format!("union {n}")),
        _ => None,
    }
}

/// `ty` without its typedefs and qualifiers (`None`: `void` through a
/// typedef, or a broken chain).
pub(crate) fn resolve(types: &[Type], ty: TypeId) -> Option<TypeId> {
    upstare_patcher::convert::resolve(types, ty).map(|(id, _)| id)
}

/// What holds a pointer the heap walk follows: a root (index into the
/// roots) or a heap object of a type (an element's, for arrays).
#[derive(Clone, Copy, Debug)]
enum Holder {
    Root(usize),
    Object(TypeId),
}

/// Where a pointer the heap walk follows was: its holder and the offset.
#[derive(Clone, Copy, Debug)]
struct Via {
    holder: Holder,
    off: u64,
}

/// A heap object whose type changed: its old bytes, its conversion, and
/// where the converted object goes.
#[derive(Clone, Debug)]
pub struct ChangedObject {
    pub addr: RuntimeAddr,
    /// Its type in OLD's types, as the pointer that reached it says.
    pub ty: TypeId,
    /// `struct node`.
    pub name: String,
    pub old: Vec<u8>,
    pub new_size: u64,
    /// Its conversion (for a heap array: of all its elements).
    pub change: TypeChange,
    /// Where the converted object is written: `None` in place, else a new
    /// allocation (the old object is freed after the commit).
    pub dest: Option<RuntimeAddr>,
    /// Elements: 1, or a heap array's count (the SPEC's `[heap]`); `ty`
    /// is then the element's type.
    pub count: u64,
    /// The `[heap]` key of the pointer that reached it first (`global.items`,
    /// `fill.items`, `struct pool.slots`), when that pointer is one a key
    /// can name: the array's key when `count` came from the SPEC.
    pub via: Option<String>,
}

impl ChangedObject {
    /// Bytes the old object spans.
    pub fn old_size(&self) -> u64 {
        self.old.len() as u64
    }

    /// Bytes of one element in OLD.
    pub fn stride(&self) -> u64 {
        self.old_size() / self.count.max(1)
    }

    /// Offsets of every pointer slot of the object (all its elements).
    fn pointer_offsets(&self, types: &[Type]) -> std::collections::HashSet<u64> {
        let mut out = std::collections::HashSet::new();
        let stride = self.stride();
        for_each_pointer(types, self.ty, &mut |off| {
            for i in 0..self.count {
                if let Some(o) = i.checked_mul(stride).and_then(|b| b.checked_add(off)) {
                    out.insert(o);
                }
            }
        });
        out
    }
}

/// What the heap walk found: objects whose pointers may need remapping and
/// objects of changed type, every one read once.
#[derive(Debug, Default)]
pub struct HeapObjects {
    /// Objects of unchanged type holding pointers: address, type, bytes.
    plain: Vec<(RuntimeAddr, TypeId, Vec<u8>)>,
    pub changed: Vec<ChangedObject>,
    pub warnings: Vec<String>,
}

impl HeapObjects {
    /// How pointers to the objects of changed type move (in place too:
    /// interior pointers follow their member).
    pub fn moves(&self) -> Vec<HeapMove> {
        self.changed
            .iter()
            .filter_map(|c| {
                Some(HeapMove {
                    old: c.addr..c.addr.checked_add(c.old_size())?,
                    new_start: c.dest.unwrap_or(c.addr),
                    conversion: c.change.conversion.clone(),
                    name: c.name.clone(),
                })
            })
            .collect()
    }

    /// Where `addr` is, when it lies inside an object of unchanged type the
    /// walk visited: `heap object struct T at A+off`.
    pub fn site_of(&self, types: &[Type], addr: RuntimeAddr) -> Option<String> {
        self.plain.iter().find_map(|(at, ty, bytes)| {
            let off = addr.offset_from(*at)?;
            (off < bytes.len() as u64).then(|| {
                let name = resolved_name(types, *ty).unwrap_or_else(|| type_name(types, *ty));
                format!("heap object {name} at {at}+{off}")
            })
        })
    }

    /// The old objects that moved, to free after the commit.
    pub fn moved_from(&self) -> Vec<RuntimeAddr> {
        self.changed
            .iter()
            .filter(|c| c.dest.is_some())
            .map(|c| c.addr)
            .collect()
    }
}

/// What the heap walk will change.
#[derive(Debug, Default)]
pub struct HeapPlan {
    /// Writes of the commit: one 8-byte write per pointer slot whose value
    /// changes, and every object converted in place.
    pub writes: Vec<Write>,
    /// Converted objects for their new allocations: written before the
    /// commit (no pointer reaches them until it), freed if it fails.
    pub moved: Vec<Write>,
    /// Heap objects visited.
    pub objects: usize,
    /// Objects of changed type converted where they are.
    pub converted_in_place: usize,
    /// Per type (`struct node`): objects found, converted in place, moved
    /// (pointers redirected and sweep hits are filled in by the update).
    pub per_type: BTreeMap<String, HeapTypeFigures>,
    pub warnings: Vec<String>,
}

/// What an update did to the heap objects of one type.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HeapTypeFigures {
    /// Objects the typed walk visited (objects of an unchanged type are
    /// visited only when they hold pointers).
    pub found: usize,
    pub converted_in_place: usize,
    pub moved: usize,
    /// Pointer values redirected to an object's new place (typed ones and
    /// `void *`/`char *` slots; in place only when a member moved).
    pub pointers_redirected: usize,
    /// Untyped values the sweep found pointing at or into an object of
    /// this type that moved or changed layout.
    pub sweep_hits: usize,
}

/// Finds the heap objects reachable through typed pointers, starting from
/// `roots` (the old globals and locals) and following pointers into `heap`
/// (the process's heap and anonymous memory, without thread stacks or
/// images), each object read as its pointer's pointee type. Objects whose
/// type is in `changed` get their conversion to NEW's type of the same
/// name (in `new_types`). `void *` and unions are not followed (their type
/// is unknown); the walk is bounded by [`MAX_HEAP_OBJECTS`] and
/// [`MAX_HEAP_BYTES`] and visits each (address, type) once, so cycles end.
#[allow(clippy::too_many_arguments)]
pub fn find_heap_objects(
    mem: &impl TargetMemory,
    types: &[Type],
    new_types: &[Type],
    roots: &[Root],
    heap: &[Range<RuntimeAddr>],
    changed: &[String],
    rules: &ArrayRules,
) -> Result<HeapObjects, HeapError> {
    let in_heap = |a: RuntimeAddr, len: u64| {
        let end = a.checked_add(len);
        heap.iter()
            .any(|r| r.start <= a && end.is_some_and(|e| e <= r.end))
    };
    let mut found = HeapObjects::default();
    // (address, pointee type, elements, the slot that pointed there).
    let mut todo: Vec<(RuntimeAddr, TypeId, u64, Via)> = Vec::new();
    // Heap pointers found in a value held at `holder`: (address, pointee
    // type, elements: the count of `counts` for that slot, else 1).
    let scan = |bytes: &[u8],
                ty: TypeId,
                holder: Holder,
                counts: &[(u64, u64)],
                todo: &mut Vec<(RuntimeAddr, TypeId, u64, Via)>| {
        for_each_pointer_typed(types, ty, &mut |off, pointee| {
            let Some(pointee) = pointee else {
                return;
            };
            let Some(slot) = usize::try_from(off)
                .ok()
                .and_then(|o| bytes.get(o..o.checked_add(8)?))
            else {
                return;
            };
            let mut w = [0u8; 8];
            w.copy_from_slice(slot);
            let v = RuntimeAddr(u64::from_le_bytes(w));
            let n = counts
                .iter()
                .find(|(o, _)| *o == off)
                .map_or(1, |(_, n)| *n);
            if v.0 != 0 && n > 0 && in_heap(v, 1) {
                todo.push((v, pointee, n, Via { holder, off }));
            }
        });
    };
    for (i, r) in roots.iter().enumerate() {
        // A struct global or local with an array member: its count too.
        let name = resolved_name(types, r.ty);
        let mut counts = rules.member_counts(name.as_deref(), &r.bytes, &mut found.warnings);
        counts.extend(r.counts.iter().copied());
        scan(&r.bytes, r.ty, Holder::Root(i), &counts, &mut todo);
    }
    // The `[heap]` key of the slot a pointer was found in, for messages.
    let key_of = |via: Via| match via.holder {
        Holder::Root(i) => roots.get(i).and_then(|r| match via.off {
            0 => r.key.clone(),
            off => member_key(types, r.ty, off),
        }),
        Holder::Object(ty) => member_key(types, ty, via.off),
    };
    let array_key = |via: Via, ty: TypeId| {
        key_of(via).unwrap_or_else(|| format!("of {}", type_name(types, ty)))
    };
    // NEW's aggregates by name, for the conversions of changed types.
    // Two units may define one tag differently (redis's `struct dict` and
    // hiredis's): an object whose own definition NEW still has is
    // unchanged, whatever another definition of its name became.
    let mut new_defs: std::collections::HashMap<String, Vec<TypeId>> = Default::default();
    for (i, t) in new_types.iter().enumerate() {
        if let (Some(n), Ok(i)) = (upstare_patcher::plan::aggregate_name(t), u32::try_from(i)) {
            new_defs.entry(n).or_default().push(TypeId(i));
        }
    }
    let mut comparer = upstare_dwarf::compare::TypeComparer::new(types, new_types);
    // Per OLD definition: its NEW counterpart (None: unchanged), or why
    // there is none for sure.
    let mut counterparts: std::collections::HashMap<TypeId, Result<Option<TypeId>, String>> =
        Default::default();
    let mut counterpart = |name: &str, resolved: TypeId| -> Result<Option<TypeId>, String> {
        counterparts
            .entry(resolved)
            .or_insert_with(|| {
                let defs = new_defs.get(name).map(Vec::as_slice).unwrap_or(&[]);
                if defs.iter().any(|&d| comparer.equal(resolved, d)) {
                    return Ok(None);
                }
                match defs {
                    [one] => Ok(Some(*one)),
                    [] => Ok(None),
                    _ => Err(format!(
                        "the new version defines {name} differently in {} units and none is this \
                         object's old definition: which one it becomes cannot be known",
                        defs.len()
                    )),
                }
            })
            .clone()
    };
    let mut conversions: std::collections::HashMap<TypeId, TypeChange> = Default::default();
    let mut converter = Converter::new(types, new_types);
    let mut seen: std::collections::HashSet<(RuntimeAddr, TypeId, u64)> =
        std::collections::HashSet::new();
    // Objects of changed type by address: one reached again through
    // another typedef or another unit's copy of its type is the same one.
    let mut changed_at: std::collections::HashMap<(RuntimeAddr, u64), String> = Default::default();
    let (mut objects, mut bytes_read, mut unreadable) = (0usize, 0u64, 0usize);
    while let Some((addr, ty, count, via)) = todo.pop() {
        if !seen.insert((addr, ty, count)) {
            continue;
        }
        let mut changed_name = resolved_name(types, ty).filter(|n| changed.contains(n));
        if let Some(n) = changed_name.clone() {
            let resolved = resolve(types, ty).unwrap_or(ty);
            match counterpart(&n, resolved) {
                Ok(Some(_)) => {}
                // Its own definition is unchanged (another unit's changed).
                Ok(None) if new_defs.contains_key(&n) => changed_name = None,
                Ok(None) => {}
                Err(why) => return Err(HeapError::Unconvertible { addr, ty: n, why }),
            }
        }
        // A declaration left opaque because two units define its tag
        // differently (dwarf::resolve): if that tag changed, which layout
        // this object has cannot be known.
        if let Some(n) = declared_name(types, ty).filter(|n| changed.contains(n)) {
            return Err(HeapError::Unconvertible {
                addr,
                ty: n,
                why: "the pointer to it has a type only declared in its unit, and two other \
                      units define that type differently"
                    .to_string(),
            });
        }
        if let Some(n) = &changed_name {
            if changed_at.get(&(addr, count)) == Some(n) {
                continue;
            }
        }
        if changed_name.is_none() && !contains_pointer(types, ty, 0) {
            continue;
        }
        if objects >= MAX_HEAP_OBJECTS || bytes_read >= MAX_HEAP_BYTES {
            found.warnings.push(format!(
                "heap walk stopped after {objects} objects ({bytes_read} bytes): pointers in the \
                 rest of the heap were not remapped"
            ));
            // Objects of changed type past the bound would be misread by
            // NEW: refuse rather than succeed wrongly.
            if let Some(ty) = todo
                .iter()
                .find_map(|(_, t, _, _)| resolved_name(types, *t).filter(|n| changed.contains(n)))
            {
                return Err(HeapError::Unconvertible {
                    addr,
                    ty,
                    why: format!("the heap walk stopped after {objects} objects"),
                });
            }
            break;
        }
        let Some(size) = type_size(types, ty).filter(|s| *s > 0 && *s <= MAX_VALUE_SIZE) else {
            continue;
        };
        let total = size
            .checked_mul(count)
            .filter(|t| *t <= MAX_VALUE_SIZE && in_heap(addr, *t));
        let Some(total) = total else {
            // An object that does not fit in the heap is not one (a stale
            // or mistyped pointer): leave it alone.
            if count == 1 {
                continue;
            }
            let key = array_key(via, ty);
            // A heap array whose count does not fit its place: never
            // convert part of it.
            if let Some(name) = changed_name {
                let why = match size.checked_mul(count).filter(|t| *t <= MAX_VALUE_SIZE) {
                    Some(_) => "which run past the heap mapping".to_string(),
                    None => format!("more than the update handles ({MAX_VALUE_SIZE} bytes)"),
                };
                return Err(HeapError::ArrayCount {
                    key,
                    addr,
                    count,
                    ty: name,
                    why,
                });
            }
            found.warnings.push(format!(
                "the heap array {key} of {} at {addr} does not hold its count ({count}) of elements: its pointers were not remapped",
                type_name(types, ty)
            ));
            continue;
        };
        if count > 1 && changed_name.is_none() {
            // Elements of an unchanged type: each an object of its own.
            for i in (0..count).rev() {
                if let Some(at) = i.checked_mul(size).and_then(|o| addr.checked_add(o)) {
                    todo.push((at, ty, 1, via));
                }
            }
            continue;
        }
        if let Some(name) = changed_name.as_ref().filter(|_| count > 1) {
            // A heap array of changed type is rewritten whole: its count
            // must fit its block (the header's size; the allocator is asked
            // too before anything is placed).
            let block = heap
                .iter()
                .find(|r| r.contains(&addr))
                .and_then(|r| chunk_capacity(mem, addr, r));
            let why = match block {
                None => Some("and it does not start a block of the allocator, so its count cannot be checked against the allocation".to_string()),
                Some(cap) if cap < total => Some(format!(
                    "{total} bytes, more than its block of the allocator holds ({cap} bytes)"
                )),
                Some(_) => None,
            };
            if let Some(why) = why {
                return Err(HeapError::ArrayCount {
                    key: array_key(via, ty),
                    addr,
                    count,
                    ty: name.clone(),
                    why,
                });
            }
        }
        let Ok(old) = mem.read_vec(addr, total, MAX_VALUE_SIZE as usize) else {
            unreadable += 1;
            continue;
        };
        objects += 1;
        bytes_read = bytes_read.saturating_add(total);
        let name = resolved_name(types, ty);
        for element in old.chunks(size as usize) {
            let counts = rules.member_counts(name.as_deref(), element, &mut found.warnings);
            scan(element, ty, Holder::Object(ty), &counts, &mut todo);
        }
        let Some(name) = changed_name else {
            found.plain.push((addr, ty, old));
            continue;
        };
        // NEW reads this object with its own layout: it is converted.
        let resolved = resolve(types, ty).unwrap_or(ty);
        let change = match conversions.get(&resolved) {
            Some(c) => c.clone(),
            None => {
                let Ok(Some(new_ty)) = counterpart(&name, resolved) else {
                    return Err(HeapError::NoNewType { addr, ty: name });
                };
                let c = converter.change(resolved, new_ty, &name);
                conversions.insert(resolved, c.clone());
                c
            }
        };
        if let Some(why) = change.conversion.refusal() {
            return Err(HeapError::Unconvertible {
                addr,
                ty: name,
                why: why.to_string(),
            });
        }
        let new_size = counterpart(&name, resolved)
            .ok()
            .flatten()
            .and_then(|t| type_size(new_types, t))
            .filter(|s| *s > 0 && *s <= MAX_VALUE_SIZE)
            .ok_or_else(|| HeapError::NoNewType {
                addr,
                ty: name.clone(),
            })?;
        let (new_total, change) = if count == 1 {
            (new_size, change)
        } else {
            let new_total = new_size
                .checked_mul(count)
                .filter(|t| *t <= MAX_VALUE_SIZE)
                .ok_or_else(|| HeapError::ArrayCount {
                    key: array_key(via, ty),
                    addr,
                    count,
                    ty: name.clone(),
                    why: format!(
                        "which grow past what the update handles ({MAX_VALUE_SIZE} bytes)"
                    ),
                })?;
            let conversion = upstare_patcher::convert::Conversion::Array {
                count,
                old_stride: size,
                new_stride: new_size,
                element: Box::new(change.conversion.clone()),
            };
            (
                new_total,
                TypeChange {
                    conversion,
                    ..change
                },
            )
        };
        changed_at.insert((addr, count), name.clone());
        found.changed.push(ChangedObject {
            addr,
            ty,
            name,
            old,
            new_size: new_total,
            change,
            dest: None,
            count,
            via: key_of(via),
        });
    }
    if unreadable > 0 {
        found.warnings.push(format!(
            "{unreadable} heap pointer(s) led to unreadable memory; left alone"
        ));
    }
    drop_elements_of_arrays(&mut found);
    check_disjoint(types, &mut found)?;
    Ok(found)
}

/// An element of a converted heap array reached on its own (a pointer to
/// `items[2]`) is converted with the array: dropped as an object.
fn drop_elements_of_arrays(found: &mut HeapObjects) {
    let arrays: Vec<(Range<RuntimeAddr>, String, u64)> = found
        .changed
        .iter()
        .filter(|c| c.count > 1)
        .filter_map(|c| {
            Some((
                c.addr..c.addr.checked_add(c.old_size())?,
                c.name.clone(),
                c.stride(),
            ))
        })
        .collect();
    if arrays.is_empty() {
        return;
    }
    found.changed.retain(|c| {
        c.count > 1
            || !arrays.iter().any(|(r, name, stride)| {
                r.contains(&c.addr)
                    && *name == c.name
                    && c.addr.offset_from(r.start).is_some_and(|o| o % stride == 0)
            })
    });
}

/// An object of changed type is rewritten whole: objects of changed type
/// must not overlap, and another object visited inside one (reached
/// through a pointer to a member) is dropped from the walk's writes when
/// its pointers are pointers of the object around it (they are remapped
/// with it); any other overlap is an object seen through two types.
fn check_disjoint(types: &[Type], found: &mut HeapObjects) -> Result<(), HeapError> {
    found.changed.sort_by_key(|c| c.addr);
    let end = |a: RuntimeAddr, len: u64| a.checked_add(len).unwrap_or(RuntimeAddr(u64::MAX));
    let two = |c: &ChangedObject, other_addr: RuntimeAddr, other: String| HeapError::TwoTypes {
        addr: c.addr,
        ty: c.name.clone(),
        other_addr,
        other,
    };
    for w in found.changed.windows(2) {
        if end(w[0].addr, w[0].old_size()) > w[1].addr {
            return Err(two(&w[0], w[1].addr, w[1].name.clone()));
        }
    }
    let changed = &found.changed;
    let mut keep = Vec::with_capacity(found.plain.len());
    for (addr, ty, bytes) in std::mem::take(&mut found.plain) {
        let p_end = end(addr, bytes.len() as u64);
        let name = || resolved_name(types, ty).unwrap_or_else(|| "a pointer-holding value".into());
        // The last object of changed type starting at or before `addr`, and
        // the first one after it.
        let i = changed.partition_point(|c| c.addr <= addr);
        if let Some(next) = changed.get(i).filter(|c| c.addr < p_end) {
            return Err(two(next, addr, name()));
        }
        let Some(c) = i.checked_sub(1).and_then(|i| changed.get(i)) else {
            keep.push((addr, ty, bytes));
            continue;
        };
        let c_end = end(c.addr, c.old_size());
        if c_end <= addr {
            keep.push((addr, ty, bytes));
            continue;
        }
        if p_end > c_end {
            return Err(two(c, addr, name()));
        }
        let base = addr.offset_from(c.addr).unwrap_or(0);
        let outer = c.pointer_offsets(types);
        let mut agrees = true;
        for_each_pointer(types, ty, &mut |off| {
            agrees &= base.checked_add(off).is_some_and(|o| outer.contains(&o));
        });
        if !agrees {
            return Err(two(c, addr, name()));
        }
    }
    found.plain = keep;
    Ok(())
}

/// Remaps the pointers stored in the heap objects `found` and converts the
/// objects of changed type: a slot pointing into the old image (a callback,
/// the address of a global), into a moved stack frame or into a converted
/// heap object gets its new value. Pointers inside an object of changed
/// type are remapped first (in its old layout), then it is converted, its
/// new members zero.
pub fn transfer_heap(
    types: &[Type],
    found: &HeapObjects,
    remap: &mut Remapper<'_>,
) -> Result<HeapPlan, HeapError> {
    let mut plan = HeapPlan {
        objects: found.plain.len() + found.changed.len(),
        warnings: found.warnings.clone(),
        ..HeapPlan::default()
    };
    let mut slots: std::collections::BTreeMap<RuntimeAddr, u64> = std::collections::BTreeMap::new();
    for (addr, ty, old) in &found.plain {
        let (addr, ty) = (*addr, *ty);
        let name = resolved_name(types, ty).unwrap_or_else(|| type_name(types, ty));
        plan.per_type.entry(name.clone()).or_default().found += 1;
        let mut new = old.clone();
        let site = || format!("heap object {name} at {addr}");
        remap.remap_value_at(types, ty, &mut new, &site);
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
                    if let Some(at) = addr.checked_add(off) {
                        slots.insert(at, u64::from_le_bytes(w));
                    }
                }
            }
        });
    }
    plan.writes = slots
        .into_iter()
        .map(|(addr, v)| Write {
            addr,
            bytes: v.to_le_bytes().to_vec(),
            what: format!("heap pointer at {addr}"),
        })
        .collect();
    for c in &found.changed {
        let mut old = c.old.clone();
        let stride = usize::try_from(c.stride()).unwrap_or(usize::MAX).max(1);
        for (i, element) in old.chunks_mut(stride).enumerate() {
            let site = || match c.count {
                1 => format!("heap object {} at {}", c.name, c.addr),
                _ => format!("heap array of {} at {}, element {i}", c.name, c.addr),
            };
            remap.remap_value_at(types, c.ty, element, &site);
        }
        let n = usize::try_from(c.count).unwrap_or(usize::MAX);
        let figures = plan.per_type.entry(c.name.clone()).or_default();
        figures.found = figures.found.saturating_add(n);
        match c.dest {
            None => figures.converted_in_place = figures.converted_in_place.saturating_add(n),
            Some(_) => figures.moved = figures.moved.saturating_add(n),
        }
        let len = usize::try_from(c.new_size).map_err(|_| HeapError::NoNewType {
            addr: c.addr,
            ty: c.name.clone(),
        })?;
        let mut new = vec![0u8; len];
        convert(&c.change.conversion, &old, &mut new).map_err(|source| HeapError::Convert {
            addr: c.addr,
            ty: c.name.clone(),
            source,
        })?;
        match c.dest {
            None => {
                plan.converted_in_place += 1;
                plan.writes.push(Write {
                    addr: c.addr,
                    bytes: new,
                    what: format!("heap object {} at {}", c.name, c.addr),
                });
            }
            Some(dest) => plan.moved.push(Write {
                addr: dest,
                bytes: new,
                what: format!("heap object {} moved from {} to {dest}", c.name, c.addr),
            }),
        }
    }
    Ok(plan)
}

/// The most bytes the allocator block starting at `addr` can hold, read
/// from its glibc chunk header, when `addr` looks like the start of a block
/// in use lying inside `within`; `None` otherwise (an object inside another
/// one, memory of another allocator). Only then may the allocator itself
/// be asked about `addr` (it trusts its argument).
pub fn chunk_capacity(
    mem: &impl TargetMemory,
    addr: RuntimeAddr,
    within: &Range<RuntimeAddr>,
) -> Option<u64> {
    const SIZE_BITS: u64 = 7;
    const PREV_INUSE: u64 = 1;
    const IS_MMAPPED: u64 = 2;
    if !addr.0.is_multiple_of(16) {
        return None;
    }
    let chunk = RuntimeAddr(addr.0.checked_sub(16)?);
    if chunk < within.start {
        return None;
    }
    let field = mem.read_u64(RuntimeAddr(addr.0 - 8)).ok()?;
    let size = field & !SIZE_BITS;
    if size < 32 || !size.is_multiple_of(16) {
        return None;
    }
    let end = chunk.checked_add(size)?;
    if field & IS_MMAPPED != 0 {
        return (end <= within.end).then_some(size - 16);
    }
    // The next block's header says whether this one is in use; it lies
    // inside the same mapping (the top block always follows).
    if end.checked_add(16)? > within.end {
        return None;
    }
    let next = mem.read_u64(end.checked_add(8)?).ok()?;
    (next & PREV_INUSE != 0 && (next & !SIZE_BITS) >= 16).then_some(size - 8)
}

/// Writes the objects moved to new allocations (before the commit: they
/// are not reachable until it, and freed if it does not happen).
pub fn write_moved(mem: &mut impl TargetMemory, plan: &HeapPlan) -> Result<(), HeapError> {
    for w in &plan.moved {
        mem.write(w.addr, &w.bytes)
            .map_err(|source| HeapError::Write {
                addr: w.addr,
                ty: w.what.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Where heap objects may be: private anonymous memory and `[heap]`, but
/// not a thread's stack (frames are rebuilt on their own) nor either image.
pub fn heap_ranges(
    maps: &[MemoryMap],
    threads: &[ThreadState],
    images: [&Image; 2],
) -> Vec<Range<RuntimeAddr>> {
    maps.iter()
        .filter(|m| m.perms.read && m.perms.write && !m.perms.shared)
        .filter(|m| match &m.path {
            MapPath::Anonymous => true,
            MapPath::Pseudo(p) => p == "[heap]",
            MapPath::File(_) => false,
        })
        .filter(|m| !threads.iter().any(|t| m.contains(t.regs.rsp())))
        .filter(|m| {
            images
                .iter()
                .all(|i| m.end <= i.span.start || i.span.end <= m.start)
        })
        .map(|m| m.start..m.end)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use upstare_dwarf::fdt::FrameTables;
    use upstare_dwarf::model::{BaseEncoding, Global, Member};

    fn image(base: u64, global_at: u64, types: Vec<Type>) -> Image {
        let tables = FrameTables {
            types,
            globals: vec![Global {
                name: "g".into(),
                ty: TypeId(0),
                addr: LinkAddr(global_at),
                size: 8,
                owner: None,
                unit: "t.c".into(),
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
                counts: Vec::new(),
                key: None,
            },
            Root {
                ty: TypeId(2),
                bytes: (heap + 0xf0).to_le_bytes().to_vec(),
                counts: Vec::new(),
                key: None,
            },
        ];
        let heap_ranges = [RuntimeAddr(heap)..RuntimeAddr(heap + 0x100)];
        let found = find_heap_objects(
            &mem,
            &types,
            &types,
            &roots,
            &heap_ranges,
            &[],
            &ArrayRules::default(),
        )
        .expect("no changed types");
        let plan = transfer_heap(&types, &found, &mut remap).expect("no changed types");
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

    fn member(name: &str, ty: u32, offset: u64) -> Member {
        Member {
            name: Some(name.into()),
            ty: TypeId(ty),
            offset,
            bitfield: None,
        }
    }

    /// 0 long, 1 struct hnode (members), 2 struct hnode *.
    fn hnode(members: Vec<Member>, size: u64) -> Vec<Type> {
        vec![
            Type::Base {
                name: "long".into(),
                size: 8,
                encoding: BaseEncoding::Signed,
            },
            Type::Struct {
                name: Some("hnode".into()),
                size,
                members,
                declaration: false,
            },
            Type::Pointer {
                pointee: Some(TypeId(1)),
            },
        ]
    }

    fn word(b: &[u8], off: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[off..off + 8]);
        u64::from_le_bytes(w)
    }

    #[test]
    fn changed_heap_objects_are_converted_in_place_or_moved_and_pointers_follow() {
        use crate::memory::ByteBuffer;
        // v1 { long v; struct hnode *next; } -> v2 { long v; long w; next }.
        let old_t = hnode(vec![member("v", 0, 0), member("next", 2, 8)], 16);
        let new_t = hnode(
            vec![member("v", 0, 0), member("w", 0, 8), member("next", 2, 16)],
            24,
        );
        let old = image(0x10000, 0x100, old_t.clone());
        let new = image(0x20000, 0x200, new_t.clone());
        // Node a (v 1) -> node b (v 2) -> null.
        let heap = 0x50000u64;
        let (a, b) = (heap + 0x10, heap + 0x40);
        let mut bytes = vec![0u8; 0x100];
        let mut put = |off: u64, v: u64| {
            let o = (off - heap) as usize;
            bytes[o..o + 8].copy_from_slice(&v.to_le_bytes())
        };
        put(a, 1);
        put(a + 8, b);
        put(b, 2);
        let mem = ByteBuffer::with_region(RuntimeAddr(heap), bytes).expect("heap");
        let roots = [Root {
            ty: TypeId(2),
            bytes: a.to_le_bytes().to_vec(),
            counts: Vec::new(),
            key: None,
        }];
        let ranges = [RuntimeAddr(heap)..RuntimeAddr(heap + 0x100)];
        let changed = ["struct hnode".to_string()];
        let mut found = find_heap_objects(
            &mem,
            &old_t,
            &new_t,
            &roots,
            &ranges,
            &changed,
            &ArrayRules::default(),
        )
        .expect("found");
        assert_eq!(found.changed.len(), 2);
        // a moves, b is converted where it is.
        let dest = 0x90000u64;
        for c in &mut found.changed {
            assert_eq!((c.old_size(), c.new_size), (16, 24));
            if c.addr.0 == a {
                c.dest = Some(RuntimeAddr(dest));
            }
        }
        let update_plan = upstare_patcher::default_plan(&old.tables, &new.tables);
        let mut remap = Remapper::new(&update_plan, &old, &new);
        remap.set_heap_moves(found.moves());
        assert_eq!(remap.remap(RuntimeAddr(a)).0, dest);
        // Interior pointers follow their member: b's next moved from 8 to 16.
        assert_eq!(remap.remap(RuntimeAddr(b + 8)).0, b + 16);
        let plan = transfer_heap(&old_t, &found, &mut remap).expect("converted");
        assert_eq!(plan.converted_in_place, 1);
        assert_eq!(plan.moved.len(), 1);
        let moved = &plan.moved[0];
        assert_eq!(moved.addr.0, dest);
        assert_eq!(
            (
                word(&moved.bytes, 0),
                word(&moved.bytes, 8),
                word(&moved.bytes, 16)
            ),
            (1, 0, b)
        );
        let inplace = plan
            .writes
            .iter()
            .find(|w| w.addr.0 == b)
            .expect("b written");
        assert_eq!(inplace.bytes.len(), 24);
        assert_eq!(
            (
                word(&inplace.bytes, 0),
                word(&inplace.bytes, 8),
                word(&inplace.bytes, 16)
            ),
            (2, 0, 0)
        );
        assert_eq!(found.moved_from(), vec![RuntimeAddr(a)]);
    }

    /// Two units define `struct hnode` differently (3: { long v; } besides
    /// 1). Only 1 changed: an object of 3 is left as it is (it is not
    /// converted by 1's change), and one of 1 — whose NEW counterpart
    /// cannot be told from 3's — is refused, naming the type.
    #[test]
    fn rival_definitions_of_a_changed_name_are_told_apart() {
        use crate::memory::ByteBuffer;
        let rival = Type::Struct {
            name: Some("hnode".into()),
            size: 8,
            members: vec![member("v", 0, 0)],
            declaration: false,
        };
        let mut old_t = hnode(vec![member("v", 0, 0), member("next", 2, 8)], 16);
        old_t.push(rival.clone());
        old_t.push(Type::Pointer {
            pointee: Some(TypeId(3)),
        });
        let mut new_t = hnode(
            vec![member("v", 0, 0), member("w", 0, 8), member("next", 2, 16)],
            24,
        );
        new_t.push(rival);
        new_t.push(old_t[4].clone());
        let heap = 0x50000u64;
        let mem = ByteBuffer::with_region(RuntimeAddr(heap), vec![0u8; 0x100]).expect("heap");
        let ranges = [RuntimeAddr(heap)..RuntimeAddr(heap + 0x100)];
        let changed = ["struct hnode".to_string()];
        let root = |ty: u32| Root {
            ty: TypeId(ty),
            bytes: (heap + 0x10).to_le_bytes().to_vec(),
            counts: Vec::new(),
            key: None,
        };
        let found = find_heap_objects(
            &mem,
            &old_t,
            &new_t,
            &[root(4)],
            &ranges,
            &changed,
            &ArrayRules::default(),
        )
        .expect("the unchanged definition is walked");
        assert!(
            found.changed.is_empty(),
            "converted by another unit's change"
        );
        let err = find_heap_objects(
            &mem,
            &old_t,
            &new_t,
            &[root(2)],
            &ranges,
            &changed,
            &ArrayRules::default(),
        )
        .expect_err("which NEW definition is ambiguous");
        assert!(err.to_string().contains("struct hnode"), "{err}");
    }

    /// A pointer whose pointee is only declared in its unit (two other
    /// units define the tag differently, so it stayed opaque) reaching an
    /// object when that tag changed: refused, naming the type.
    #[test]
    fn a_changed_type_reached_through_an_ambiguous_declaration_is_refused() {
        use crate::memory::ByteBuffer;
        // 3: `struct hnode;` (declaration only), 4: pointer to it.
        let mut old_t = hnode(vec![member("v", 0, 0), member("next", 2, 8)], 16);
        old_t.push(Type::Struct {
            name: Some("hnode".into()),
            size: 0,
            members: vec![],
            declaration: true,
        });
        old_t.push(Type::Pointer {
            pointee: Some(TypeId(3)),
        });
        let new_t = hnode(
            vec![member("v", 0, 0), member("w", 0, 8), member("next", 2, 16)],
            24,
        );
        let heap = 0x50000u64;
        let mem = ByteBuffer::with_region(RuntimeAddr(heap), vec![0u8; 0x100]).expect("heap");
        let roots = [Root {
            ty: TypeId(4),
            bytes: (heap + 0x10).to_le_bytes().to_vec(),
            counts: Vec::new(),
            key: None,
        }];
        let ranges = [RuntimeAddr(heap)..RuntimeAddr(heap + 0x100)];
        let changed = ["struct hnode".to_string()];
        let err = find_heap_objects(
            &mem,
            &old_t,
            &new_t,
            &roots,
            &ranges,
            &changed,
            &ArrayRules::default(),
        )
        .expect_err("an opaque pointer to a changed type");
        let msg = err.to_string();
        assert!(
            msg.contains("struct hnode") && msg.contains("only declared"),
            "{msg}"
        );
        // The same heap with the type unchanged is walked without complaint.
        assert!(find_heap_objects(
            &mem,
            &old_t,
            &old_t,
            &roots,
            &ranges,
            &[],
            &ArrayRules::default()
        )
        .is_ok());
    }

    #[test]
    fn a_changed_object_overlapped_by_another_type_is_refused() {
        use crate::memory::ByteBuffer;
        // 3: struct other { struct hnode *p; struct hnode *q; }, 4: pointer
        // to it, reached at a + 8 (inside a, whose slot 8 is a pointer but
        // slot 16 is outside a).
        let mut old_t = hnode(vec![member("v", 0, 0), member("next", 2, 8)], 16);
        old_t.push(Type::Struct {
            name: Some("other".into()),
            size: 16,
            members: vec![member("p", 2, 0), member("q", 2, 8)],
            declaration: false,
        });
        old_t.push(Type::Pointer {
            pointee: Some(TypeId(3)),
        });
        let mut new_t = hnode(
            vec![member("v", 0, 0), member("w", 0, 8), member("next", 2, 16)],
            24,
        );
        new_t.push(old_t[3].clone());
        new_t.push(old_t[4].clone());
        let heap = 0x50000u64;
        let a = heap + 0x10;
        let mem = ByteBuffer::with_region(RuntimeAddr(heap), vec![0u8; 0x100]).expect("heap");
        let roots = [
            Root {
                ty: TypeId(2),
                bytes: a.to_le_bytes().to_vec(),
                counts: Vec::new(),
                key: None,
            },
            Root {
                ty: TypeId(4),
                bytes: (a + 8).to_le_bytes().to_vec(),
                counts: Vec::new(),
                key: None,
            },
        ];
        let ranges = [RuntimeAddr(heap)..RuntimeAddr(heap + 0x100)];
        let err = find_heap_objects(
            &mem,
            &old_t,
            &new_t,
            &roots,
            &ranges,
            &["struct hnode".to_string()],
            &ArrayRules::default(),
        )
        .expect_err("two types");
        assert!(matches!(err, HeapError::TwoTypes { .. }), "{err}");
        assert!(err.to_string().contains("struct other"), "{err}");
    }

    #[test]
    fn chunk_capacity_reads_the_header_without_trusting_it() {
        use crate::memory::ByteBuffer;
        let base = 0x60000u64;
        let mut bytes = vec![0u8; 0x100];
        let mut put = |o: usize, v: u64| bytes[o..o + 8].copy_from_slice(&v.to_le_bytes());
        // A 32-byte chunk at base (user data at +16), the next one in use.
        put(8, 0x21);
        put(0x28, 0x31);
        // A chunk at 0x80 whose next block says it is free.
        put(0x88, 0x21);
        put(0xa8, 0x30);
        // A chunk at 0xc0 claiming more than the mapping.
        put(0xc8, 0x1001);
        let mem = ByteBuffer::with_region(RuntimeAddr(base), bytes).expect("mem");
        let r = RuntimeAddr(base)..RuntimeAddr(base + 0x100);
        assert_eq!(chunk_capacity(&mem, RuntimeAddr(base + 16), &r), Some(24));
        assert_eq!(chunk_capacity(&mem, RuntimeAddr(base + 24), &r), None);
        assert_eq!(chunk_capacity(&mem, RuntimeAddr(base + 0x90), &r), None);
        assert_eq!(chunk_capacity(&mem, RuntimeAddr(base + 0xd0), &r), None);
        assert_eq!(chunk_capacity(&mem, RuntimeAddr(base), &r), None);
    }

    /// The counts of heap arrays held by locals are read in each frame:
    /// two frames of one recursive function on one thread and one on
    /// another, each with its own count; a frame at its entry point is not
    /// walked (its locals are stack garbage); a count out of scope is said,
    /// naming the key.
    #[test]
    fn heap_array_counts_of_locals_are_read_in_each_frame() {
        use crate::engine::state::AppFrame;
        use crate::memory::ByteBuffer;
        use crate::target::ptrace::Regs;
        use nix::unistd::Pid;
        use upstare_dwarf::fdt::{Continuation, FunctionTable, UpdatePoint};
        use upstare_dwarf::model::FrameBaseKind;
        use upstare_dwarf::CfaOffset;
        use upstare_patcher::heap_arrays::HeapArray;
        // 0 long, 1 long *, 2 unsigned long
        let types = vec![
            Type::Base {
                name: "long".into(),
                size: 8,
                encoding: BaseEncoding::Signed,
            },
            Type::Pointer {
                pointee: Some(TypeId(0)),
            },
            Type::Base {
                name: "unsigned long".into(),
                size: 8,
                encoding: BaseEncoding::Unsigned,
            },
        ];
        let var = |name: &str, ty: u32, off: i64, scope: Vec<(LinkAddr, LinkAddr)>| Variable {
            name: name.into(),
            ty: TypeId(ty),
            location: VarLocation::Cfa(CfaOffset(off)),
            scope,
            is_param: false,
            decl_line: 0,
        };
        let point = |kind, addr| UpdatePoint {
            kind,
            addr: LinkAddr(addr),
            file: 0,
            line: 0,
            stack_depth: CfaOffset(-32),
        };
        let mut old = image(0x10000, 0x100, types);
        old.tables.functions = vec![FunctionTable {
            name: "fill".into(),
            low: LinkAddr(0x1000),
            high: LinkAddr(0x1100),
            decl_file: None,
            decl_line: 0,
            frame_base: FrameBaseKind::Cfa,
            external: true,
            saved_regs: Vec::new(),
            body_depth: CfaOffset(-32),
            extent: CfaOffset(-32),
            vars: vec![
                var("list", 1, -16, Vec::new()),
                var("len", 2, -24, Vec::new()),
                var("inner", 2, -32, vec![(LinkAddr(0x1050), LinkAddr(0x1060))]),
            ],
            update_points: vec![
                point(PointKind::Entry, 0x1004),
                point(PointKind::Loop(0), 0x1020),
            ],
            call_sites: Vec::new(),
            var_inits: Vec::new(),
        }];
        // Three frames' slots (CFA - 32 .. CFA): list, len, inner.
        let stack = 0x70000u64;
        let (cfa_a, cfa_b, cfa_c, cfa_d) =
            (stack + 0x40, stack + 0x80, stack + 0xc0, stack + 0x100);
        let mut bytes = vec![0u8; 0x100];
        let mut put = |cfa: u64, off: u64, v: u64| {
            let at = (cfa - off - stack) as usize;
            bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
        };
        for (cfa, list, len) in [
            (cfa_a, 0x5000, 3),
            (cfa_b, 0x6000, 7),
            (cfa_c, 0x7777, 9),
            (cfa_d, 0x8000, 4),
        ] {
            put(cfa, 16, list);
            put(cfa, 24, len);
            put(cfa, 32, 5);
        }
        let mem = ByteBuffer::with_region(RuntimeAddr(stack), bytes).expect("stack");
        let frame = |pc: u64, cfa: u64, continuation| AppFrame {
            function: "fill".into(),
            pc: LinkAddr(pc),
            cfa: RuntimeAddr(cfa),
            continuation,
            callee_saved: Default::default(),
        };
        let thread = |frames| ThreadState {
            tid: Pid::from_raw(1),
            regs: Regs::zeroed(),
            readiness: Readiness::AtPoint,
            frames,
            below: None,
            beneath: false,
            library_view: None,
        };
        let threads = [
            // Recursion: paused in its loop, above a frame of itself.
            thread(vec![
                frame(0x1020, cfa_a, Continuation::Loop(0)),
                frame(0x1031, cfa_b, Continuation::Entry),
            ]),
            // Just entered: `list` and `len` not assigned yet.
            thread(vec![frame(0x1004, cfa_c, Continuation::Entry)]),
            thread(vec![frame(0x1020, cfa_d, Continuation::Loop(0))]),
        ];
        let array = |count: usize| HeapArray {
            key: "fill.list".into(),
            pointer: HeapSlot::Local {
                function: "fill".into(),
                var: 0,
            },
            count: HeapSlot::Local {
                function: "fill".into(),
                var: count,
            },
            count_size: 8,
            count_signed: false,
        };
        let roots_of = |count: usize| {
            let rules = ArrayRules::new(&mem, &old, &[array(count)]);
            heap_roots(&mem, &old, &threads, &rules)
        };
        let (roots, warnings) = roots_of(1);
        // Every root is a frame's `list` (the global is no pointer).
        assert!(roots.iter().all(|r| r.key.as_deref() == Some("fill.list")));
        let got: Vec<_> = roots
            .iter()
            .map(|r| (r.bytes.clone(), r.counts.clone()))
            .collect();
        let want: Vec<_> = [(0x5000u64, 3u64), (0x6000, 7), (0x8000, 4)]
            .into_iter()
            .map(|(list, len)| (list.to_le_bytes().to_vec(), vec![(0u64, len)]))
            .collect();
        assert_eq!(got, want);
        assert!(warnings.is_empty(), "{warnings:?}");
        // `inner` is in scope in neither frame: no count, said by key.
        let (roots, warnings) = roots_of(2);
        assert!(roots.iter().all(|r| r.counts.is_empty()), "{roots:?}");
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings.iter().all(|w| w.contains("heap array fill.list")));
    }
}
