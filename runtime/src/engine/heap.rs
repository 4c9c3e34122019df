//! The heap: objects reached from the old state through typed pointers,
//! and the pointers stored in them, remapped.

use std::ops::Range;
use upstare_dwarf::model::{type_size, Type, TypeId, VarLocation};
use upstare_dwarf::{LinkAddr, RuntimeAddr};

use crate::engine::pointers::{
    contains_pointer, for_each_pointer, for_each_pointer_typed, Remapper,
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

/// Why the heap cannot be carried over.
#[derive(Debug, thiserror::Error)]
pub enum HeapError {
    #[error("a heap object at {addr} has type {ty}, which changed in the new version; converting heap objects is not supported yet, so the update is refused and nothing was changed")]
    ChangedType { addr: RuntimeAddr, ty: String },
}

/// The name of the aggregate `ty` is, through typedefs and qualifiers.
fn resolved_name(types: &[Type], ty: TypeId) -> Option<String> {
    let mut cur = ty;
    for _ in 0..64 {
        match types.get(cur.0 as usize)? {
            Type::Typedef { target, .. } | Type::Qualified { target, .. } => cur = (*target)?,
            t => return upstare_patcher::plan::aggregate_name(t),
        }
    }
    None
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
    heap: &[Range<RuntimeAddr>],
    changed: &[String],
    remap: &mut Remapper<'_>,
) -> Result<HeapPlan, HeapError> {
    let in_heap = |a: RuntimeAddr, len: u64| {
        let end = a.checked_add(len);
        heap.iter()
            .any(|r| r.start <= a && end.is_some_and(|e| e <= r.end))
    };
    let mut plan = HeapPlan::default();
    let mut todo: Vec<(RuntimeAddr, TypeId)> = Vec::new();
    // Heap pointers found in a value: (address, pointee type).
    let scan = |bytes: &[u8], ty: TypeId, todo: &mut Vec<(RuntimeAddr, TypeId)>| {
        for_each_pointer_typed(types, ty, &mut |off, pointee| {
            let (Some(pointee), Ok(off)) = (pointee, usize::try_from(off)) else {
                return;
            };
            let Some(slot) = off.checked_add(8).and_then(|end| bytes.get(off..end)) else {
                return;
            };
            let mut w = [0u8; 8];
            w.copy_from_slice(slot);
            let v = RuntimeAddr(u64::from_le_bytes(w));
            if v.0 != 0 && in_heap(v, 1) {
                todo.push((v, pointee));
            }
        });
    };
    for r in roots {
        scan(&r.bytes, r.ty, &mut todo);
    }
    let mut seen: std::collections::HashSet<(RuntimeAddr, TypeId)> =
        std::collections::HashSet::new();
    let mut slots: std::collections::BTreeMap<RuntimeAddr, u64> = std::collections::BTreeMap::new();
    let (mut bytes_read, mut unreadable) = (0u64, 0usize);
    while let Some((addr, ty)) = todo.pop() {
        if !seen.insert((addr, ty)) {
            continue;
        }
        // NEW reads this object with its own layout: an object whose type
        // changed would be misread. Converting heap objects is not done
        // yet, so refuse rather than succeed wrongly.
        if let Some(name) = resolved_name(types, ty).filter(|n| changed.contains(n)) {
            let fits = type_size(types, ty).is_some_and(|s| in_heap(addr, s.max(1)));
            if fits {
                return Err(HeapError::ChangedType { addr, ty: name });
            }
        }
        if !contains_pointer(types, ty, 0) {
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
        let Ok(old) = mem.read_vec(addr, size, MAX_VALUE_SIZE as usize) else {
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
                    if let Some(at) = addr.checked_add(off) {
                        slots.insert(at, u64::from_le_bytes(w));
                    }
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
            addr,
            bytes: v.to_le_bytes().to_vec(),
            what: format!("heap pointer at {addr}"),
        })
        .collect();
    Ok(plan)
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
            },
            Root {
                ty: TypeId(2),
                bytes: (heap + 0xf0).to_le_bytes().to_vec(),
            },
        ];
        let heap_ranges = [RuntimeAddr(heap)..RuntimeAddr(heap + 0x100)];
        let plan = transfer_heap(&mem, &types, &roots, &heap_ranges, &[], &mut remap)
            .expect("no changed types");
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
}
