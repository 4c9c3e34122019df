//! Unmapping the retired image once an update is committed.
//!
//! After the commit the old image's code is no longer run, and the sweep
//! (`engine/sweep.rs`) has redirected every value it found pointing at
//! OLD's functions and globals. What may still be read is kept, each
//! mapping with its reason, and everything else of the image is unmapped:
//! - a mapping some live value still points into (OLD's read-only data
//!   such as string literals, a stale value the update reported, a
//!   COPY-relocated object), and what the values stored in kept memory
//!   point to, followed (a kept table of pointers keeps their targets);
//! - for the program the process was started from (the dynamic linker's
//!   first `link_map` entry; `AT_PHDR` lies in it): its program headers
//!   (`dl_iterate_phdr`, `AT_PHDR`), its `.dynamic` (`l_ld`: the
//!   destructors run at exit are read there, redirected to NEW), its
//!   COPY-relocated objects (`stdout`, `environ`: libc uses these copies,
//!   also through read-only GOT entries the sweep does not scan), its
//!   dynamic symbol tables (symbol lookups by the dynamic linker), and its
//!   thread-local initialization image when it has one (read at every
//!   `pthread_create`).
//!
//! An image upstare mapped itself (a NEW of an earlier update) is in no
//! `link_map`: only referenced mappings stay. A sweep that did not see
//! everything (bytes not scanned, unreadable ranges, hits beyond those it
//! keeps) unmaps nothing. One past the end of a code segment
//! (`l_text_end`) is compared by the dynamic linker, never read: it keeps
//! nothing. Computation on the maps, the sweep and the process's memory.

use std::ops::Range;

use serde::Serialize;
use upstare_dwarf::{LinkAddr, RuntimeAddr};

use super::elf::ElfSummary;
use crate::engine::state::Image;
use crate::engine::sweep::{Class, Retired, SweepResult};
use crate::memory::TargetMemory;
use crate::target::procfs::{MapPath, MemoryMap};

/// What became of the retired image's mappings (in the report and
/// `--json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetiredMappings {
    /// Mappings unmapped, and their bytes.
    pub unmapped: usize,
    pub unmapped_bytes: u64,
    /// Mappings kept, and why (`r--p 0x7f..-0x7f..: program headers`).
    pub kept: usize,
    pub kept_reasons: Vec<String>,
    /// Mappings the process refused to unmap (left mapped).
    pub unmap_failed: usize,
}

/// Which mappings of the retired image to unmap, and which are kept.
#[derive(Clone, Debug, Default)]
pub struct UnmapPlan {
    pub unmap: Vec<Range<RuntimeAddr>>,
    pub keep: Vec<(Range<RuntimeAddr>, String)>,
}

impl UnmapPlan {
    /// The report of this plan, `failed` of its unmaps having failed.
    pub fn report(&self, failed: usize) -> RetiredMappings {
        RetiredMappings {
            unmapped: self.unmap.len().saturating_sub(failed),
            unmapped_bytes: self.unmap.iter().map(|r| r.end.0 - r.start.0).sum(),
            kept: self.keep.len(),
            kept_reasons: self
                .keep
                .iter()
                .map(|(r, why)| format!("{}-{}: {why}", r.start, r.end))
                .collect(),
            unmap_failed: failed,
        }
    }
}

/// Whether a value of this class stays pointing into the retired image
/// after the update (a remapped one goes to NEW; the image's end is only
/// compared, never read).
fn stays(class: &Class) -> bool {
    !matches!(class, Class::Remap { .. } | Class::ImageEnd)
}

/// Largest kept mapping read to follow the values it holds; a larger one
/// keeps the whole image.
const MAX_FOLLOWED: u64 = 16 << 20;

/// Sections the dynamic linker reads in the main program for symbol
/// lookups (`dlsym`, lazy binding of other objects) as long as the process
/// lives.
const LOOKUP_SECTIONS: &[&str] = &[
    ".dynsym",
    ".dynstr",
    ".gnu.hash",
    ".hash",
    ".gnu.version",
    ".gnu.version_d",
    ".gnu.version_r",
];

/// Plans the unmapping of `old` (retired by the update, described by
/// `retired`, its file's bytes `old_elf`) from `maps` (the process's,
/// read after the sweep), given the update's sweep `swept`, the auxiliary
/// vector value `phdr` (`AT_PHDR`, when known), and the process's memory
/// `mem` (to follow values stored in what is kept).
pub fn plan_unmap(
    mem: &impl TargetMemory,
    maps: &[MemoryMap],
    old: &Image,
    retired: &Retired,
    old_elf: &[u8],
    swept: &SweepResult,
    phdr: Option<u64>,
) -> UnmapPlan {
    let span = &retired.span;
    let mine: Vec<&MemoryMap> = maps
        .iter()
        .filter(|m| span.start <= m.start.0 && m.end.0 <= span.end)
        .filter(|m| match &m.path {
            MapPath::File(p) => p.as_path() == old.path.as_path(),
            MapPath::Anonymous => true,
            MapPath::Pseudo(_) => false,
        })
        .collect();
    let summary = ElfSummary::parse(&old.path, old_elf).ok();
    // One past the end of each code segment (`l_text_end` of the dynamic
    // linker): compared, never read.
    let text_ends: Vec<u64> = summary
        .iter()
        .flat_map(|s| s.loads.iter().filter(|l| l.exec()))
        .filter_map(|l| l.vaddr.checked_add(l.memsz))
        .map(|e| old.runtime(LinkAddr(e)).0)
        .collect();
    let index_of = |v: u64| {
        if text_ends.contains(&v) {
            return None;
        }
        mine.iter().position(|m| m.contains(RuntimeAddr(v)))
    };
    let overlapping = |r: &Range<u64>| {
        mine.iter()
            .enumerate()
            .filter(|(_, m)| m.start.0 < r.end && r.start < m.end.0)
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };
    let mut keep: Vec<Option<String>> = vec![None; mine.len()];
    // Kept mappings whose values are still to be followed, and ranges.
    let mut follow: Vec<Range<u64>> = Vec::new();
    // A range the sweep could not read matters only if it is still there
    // (the updater's own scratch memory is gone by now).
    let unread_live = swept.unreadable.iter().any(|u| {
        u.rsplit_once("@0x")
            .and_then(|(_, a)| u64::from_str_radix(a, 16).ok())
            .is_none_or(|a| maps.iter().any(|m| m.contains(RuntimeAddr(a))))
    });
    if swept.bytes_not_scanned > 0 || unread_live || swept.hits_dropped > 0 {
        keep.iter_mut()
            .for_each(|k| *k = Some("the sweep did not see all memory".into()));
    }
    if let Some(phdr) = phdr.filter(|p| span.contains(p)) {
        let mut rule = |r: Range<u64>, why: &str| {
            for i in overlapping(&r) {
                keep[i].get_or_insert_with(|| why.to_string());
            }
        };
        rule(phdr..phdr + 1, "program headers of the main program");
        if let Some((vaddr, memsz)) = summary.as_ref().and_then(|s| s.dynamic) {
            let start = old.runtime(LinkAddr(vaddr)).0;
            rule(
                start..start.saturating_add(memsz.max(1)),
                ".dynamic of the main program",
            );
        }
        if let Ok(file) = object::File::parse(old_elf) {
            use object::{Object, ObjectSection};
            for name in LOOKUP_SECTIONS {
                if let Some(sec) = file.section_by_name(name) {
                    let start = old.runtime(LinkAddr(sec.address())).0;
                    rule(
                        start..start.saturating_add(sec.size().max(1)),
                        "symbol tables of the main program (dynamic linker lookups)",
                    );
                }
            }
        }
        for (name, r) in &retired.copies {
            rule(r.clone(), &format!("{name}, used by libc"));
            follow.push(r.clone());
        }
        if summary.as_ref().is_none_or(|s| s.tls) {
            for (i, m) in mine.iter().enumerate() {
                if !m.perms.exec && m.path != MapPath::Anonymous {
                    keep[i].get_or_insert_with(|| "thread-local initial data".into());
                }
            }
        }
    }
    for h in swept
        .hits
        .iter()
        .filter(|h| !h.in_retired && stays(&h.class))
    {
        if let Some(i) = index_of(h.value) {
            if keep[i].is_none() {
                keep[i] = Some(format!(
                    "values still point into it (first: {:#x} at {})",
                    h.value, h.location
                ));
                follow.push(mine[i].start.0..mine[i].end.0);
            }
        }
    }
    // What kept memory holds is read too: follow the values stored there
    // (each round keeps one more mapping or ends).
    while let Some(r) = follow.pop() {
        if r.end - r.start > MAX_FOLLOWED {
            keep.iter_mut().for_each(|k| {
                k.get_or_insert_with(|| "a kept mapping too large to follow".into());
            });
            break;
        }
        let mut bytes = vec![0u8; usize::try_from(r.end - r.start).unwrap_or(0)];
        if mem.read(RuntimeAddr(r.start), &mut bytes).is_err() {
            continue;
        }
        for (k, w) in bytes.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            let v = u64::from_le_bytes(b);
            let Some(i) = index_of(v) else { continue };
            if keep[i].is_none() {
                keep[i] = Some(format!(
                    "a kept part of the image points into it (first: {v:#x} at {:#x})",
                    r.start + 8 * k as u64
                ));
                follow.push(mine[i].start.0..mine[i].end.0);
            }
        }
    }
    let mut plan = UnmapPlan::default();
    for (m, k) in mine.iter().zip(keep) {
        match k {
            Some(why) => plan.keep.push((m.start..m.end, why)),
            None => plan.unmap.push(m.start..m.end),
        }
    }
    plan
}
