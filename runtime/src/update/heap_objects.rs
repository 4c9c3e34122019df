//! Where the heap objects of changed type go: converted in place when the
//! new layout fits the allocator's block, else moved to a block allocated
//! with the process's own `malloc` (freed again unless the update commits;
//! the old block is freed after the commit).

use std::ops::Range;
use upstare_dwarf::RuntimeAddr;

use super::UpdateError;
use crate::engine::heap::{chunk_capacity, HeapError, HeapObjects};
use crate::load::LoadedImage;

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
        if c.new_size <= c.old_size() {
            continue;
        }
        let cap = heap
            .iter()
            .find(|r| r.contains(&c.addr))
            .and_then(|r| chunk_capacity(&mem, c.addr, r))
            .filter(|cap| *cap >= c.old_size());
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
