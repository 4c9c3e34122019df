//! Where the heap objects of changed type go: converted in place when the
//! new layout fits the allocator's block, else moved to a block allocated
//! with the process's own `malloc` (freed again unless the update commits;
//! the old block is freed after the commit).

use std::collections::BTreeMap;
use std::ops::Range;
use upstare_dwarf::RuntimeAddr;

use super::UpdateError;
use crate::engine::heap::{
    chunk_capacity, find_heap_objects, heap_roots, ArrayRules, HeapError, HeapObjects, HeapPlan,
    HeapTypeFigures,
};
use crate::engine::pointers::UntypedAlias;
use crate::engine::state::{Image, ThreadState};
use crate::engine::sweep::{Class, SweepResult};
use crate::load::LoadedImage;
use upstare_patcher::review::{spec_line, SpecKey};
use upstare_patcher::UpdatePlan;

/// The heap objects reachable from the paused state of `old` through typed
/// pointers (heap arrays with the plan's counts), in `heap`.
pub fn find(
    loaded: &mut LoadedImage<'_>,
    old: &Image,
    threads: &[ThreadState],
    plan: &UpdatePlan,
    heap: &[Range<RuntimeAddr>],
) -> Result<HeapObjects, UpdateError> {
    // The walk reads every object it reaches (10,000 in an idle redis):
    // one read per page instead of one per object. The process is paused
    // and nothing writes while it walks.
    let mem = crate::memory::PageCache::new(loaded.tracee().memory());
    let rules = ArrayRules::new(&mem, old, &plan.heap_arrays);
    let (roots, warnings) = heap_roots(&mem, old, threads, &rules);
    let mut found = find_heap_objects(
        &mem,
        &old.tables.types,
        &loaded.image().tables.types,
        &roots,
        heap,
        &plan.changed_types,
        &rules,
    )?;
    found.warnings.extend(warnings);
    Ok(found)
}

/// Decides, for every object of changed type in `found`, whether it is
/// converted in place or moved, and allocates the new blocks (recorded in
/// `loaded`, which frees them unless the update commits). `heap` are the
/// ranges the objects were found in; the allocator's usable size is capped
/// by the block header and the mapping, never taken on trust.
pub fn place(
    loaded: &mut LoadedImage<'_>,
    found: &mut HeapObjects,
    heap: &[Range<RuntimeAddr>],
) -> Result<(), UpdateError> {
    let mem = loaded.tracee().memory();
    // Objects that grow: which start a block of the allocator, and how
    // many bytes that block holds by its header.
    let mut ask: Vec<(usize, u64)> = Vec::new();
    for (i, c) in found.changed.iter().enumerate() {
        // A pointer is one object unless the SPEC names a count: say so
        // when its block could hold more (a heap array?). Blocks of the
        // smallest size (24 usable bytes) hold small objects twice anyway.
        let block = heap
            .iter()
            .find(|r| r.contains(&c.addr))
            .and_then(|r| chunk_capacity(&mem, c.addr, r));
        if let (1, Some(cap)) = (c.count, block) {
            if cap > 24 && cap / 2 >= c.old_size() {
                found.warnings.push(format!(
                    "heap object {} at {}{}: its block holds {cap} bytes, room for {} of them; only the first was converted (for a heap array, give its count in the SPEC's [heap]{})",
                    c.name,
                    c.addr,
                    c.via.as_ref().map(|k| format!(", reached through {k}")).unwrap_or_default(),
                    cap / c.old_size().max(1),
                    c.via.as_ref().map(|k| format!(": {}", spec_line(SpecKey::HeapCount { pointer: k }))).unwrap_or_default(),
                ));
            }
        }
        // A heap array's count is checked against its block, whether it
        // grows or not: a count larger than the allocation would convert
        // (and write) past it.
        if c.count > 1 {
            match block {
                Some(cap) => ask.push((i, cap)),
                None => return Err(array_count(c, "and it does not start a block of the allocator, so its count cannot be checked against the allocation".into())),
            }
            continue;
        }
        if c.new_size <= c.old_size() {
            continue;
        }
        let cap = block.filter(|cap| *cap >= c.old_size());
        match cap {
            Some(cap) => ask.push((i, cap)),
            None => {
                return Err(HeapError::NotAllocated {
                    addr: c.addr,
                    ty: c.name.clone(),
                    old_size: c.old_size(),
                    new_size: c.new_size,
                }
                .into())
            }
        }
    }
    let chunks: Vec<RuntimeAddr> = ask.iter().map(|&(i, _)| found.changed[i].addr).collect();
    let usable = loaded.usable_sizes(&chunks)?;
    let mut moves: Vec<usize> = Vec::new();
    for (&(i, cap), &u) in ask.iter().zip(&usable) {
        let c = &found.changed[i];
        // The allocator's answer, never more than the header allows.
        let room = u.min(cap);
        if c.count > 1 && room < c.old_size() {
            return Err(array_count(
                c,
                format!(
                    "{} bytes, more than its block of the allocator holds ({room} bytes)",
                    c.old_size()
                ),
            ));
        }
        if room < c.old_size() {
            return Err(HeapError::NotAllocated {
                addr: c.addr,
                ty: c.name.clone(),
                old_size: c.old_size(),
                new_size: c.new_size,
            }
            .into());
        }
        if c.new_size > room {
            moves.push(i);
        }
    }
    let sizes: Vec<u64> = moves.iter().map(|&i| found.changed[i].new_size).collect();
    let blocks = loaded.heap_allocate(&sizes)?;
    for (&i, b) in moves.iter().zip(blocks) {
        found.changed[i].dest = Some(b);
    }
    Ok(())
}

/// The refusal of the heap array `c` (its count from the SPEC), saying
/// `why` its count does not fit.
fn array_count(c: &crate::engine::heap::ChangedObject, why: String) -> UpdateError {
    HeapError::ArrayCount {
        key: c.via.clone().unwrap_or_else(|| format!("of {}", c.name)),
        addr: c.addr,
        count: c.count,
        ty: c.name.clone(),
        why,
    }
    .into()
}

/// Every untyped alias of a heap object of changed type, in words: the
/// `void *` and `char *` slots the typed walk redirected, and the untyped
/// values the sweep found (integers, unions, raw bytes; `where_is` gives
/// the typed path of an address when it is known).
pub fn alias_lines(
    typed: &[UntypedAlias],
    swept: &SweepResult,
    where_is: &dyn Fn(RuntimeAddr) -> Option<String>,
) -> Vec<String> {
    let mut out: Vec<String> = typed
        .iter()
        .map(|a| {
            let off = a.old.offset_from(a.object_at).unwrap_or(0);
            let target = match off {
                0 => format!("points at heap object {} at {}", a.object, a.object_at),
                o => format!(
                    "points into heap object {} at {}+{o}",
                    a.object, a.object_at
                ),
            };
            let how = if a.new == a.old {
                "left unchanged".to_string()
            } else if off == 0 {
                format!("redirected to {}", a.new)
            } else {
                format!("redirected to {} (following its member)", a.new)
            };
            format!(
                "{} ({}) {target}, whose type changed: {how}",
                a.site, a.slot_type
            )
        })
        .collect();
    for h in swept.heap_aliases() {
        let Class::HeapAlias {
            ty,
            object_at,
            offset,
            new,
        } = &h.class
        else {
            continue;
        };
        let at = match where_is(RuntimeAddr(h.addr)) {
            Some(site) => format!("{} ({site})", h.location),
            None => h.location.clone(),
        };
        out.push(match new {
            Some(n) => format!(
                "untyped value {:#x} at {at} points at heap object {ty} at {object_at:#x}, which moves: redirected to {n:#x}",
                h.value
            ),
            None => format!(
                "untyped value {:#x} at {at} points into heap object {ty} at {object_at:#x}+{offset}, which moves or changes layout: left unchanged",
                h.value
            ),
        });
    }
    out
}

/// At most this many aliases are listed one by one in the warnings.
const ALIASES_SHOWN: usize = 8;

/// The warnings for `lines` (the first few, then a count).
pub fn alias_warnings(lines: &[String]) -> Vec<String> {
    let mut out: Vec<String> = lines.iter().take(ALIASES_SHOWN).cloned().collect();
    if lines.len() > ALIASES_SHOWN {
        out.push(format!(
            "{} more untyped aliases of heap objects of changed type",
            lines.len() - ALIASES_SHOWN
        ));
    }
    out
}

/// The per-type figures of the heap: the walk's, the pointers redirected
/// to each type's objects and the sweep's hits on them.
pub fn type_figures(
    plan: &HeapPlan,
    redirects: &BTreeMap<String, usize>,
    swept: &SweepResult,
) -> BTreeMap<String, HeapTypeFigures> {
    let mut out = plan.per_type.clone();
    for (name, n) in redirects {
        out.entry(name.clone()).or_default().pointers_redirected += n;
    }
    for h in swept.heap_aliases() {
        if let Class::HeapAlias { ty, .. } = &h.class {
            out.entry(ty.clone()).or_default().sweep_hits += 1;
        }
    }
    out
}

/// The typed path of `addr`, when known: a global of NEW
/// (`global g_any+8`) or a heap object the walk visited.
pub fn site_of(
    new: &crate::engine::state::Image,
    old_types: &[upstare_dwarf::model::Type],
    found: &HeapObjects,
    addr: RuntimeAddr,
) -> Option<String> {
    let global = new.tables.globals.iter().filter(|g| !g.tls).find_map(|g| {
        let off = addr.offset_from(new.runtime(g.addr))?;
        (off < g.size).then(|| match off {
            0 => format!("global {}", g.name),
            o => format!("global {}+{o}", g.name),
        })
    });
    global.or_else(|| found.site_of(old_types, addr))
}
