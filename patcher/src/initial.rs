//! The initial values of OLD's globals, read from OLD's file, so the runtime
//! can tell data the program never changed: such data follows the new
//! version (it takes NEW's initial value, which NEW's image already holds),
//! so a table that grew or whose entries changed between versions needs no
//! user input.
//!
//! A global's initial value is its bytes in the file (zero in `.bss`), with
//! the 8-byte slots that hold a link-time address (relative relocations)
//! described apart: at run time they hold `addend + load bias`. A global
//! holding any other relocation (the address of another library's symbol)
//! has no predictable initial value and gets none.

use serde::{Deserialize, Serialize};
use std::path::Path;
use upstare_dwarf::elf::{ElfError, ElfFile, Segment};
use upstare_dwarf::fdt::FrameTables;

/// Largest global whose initial value is recorded (bigger ones are copied
/// or converted as if changed).
pub const MAX_INITIAL_VALUE: u64 = 1 << 20;
/// Most bytes of initial values recorded for one version.
pub const MAX_INITIAL_TOTAL: u64 = 64 << 20;

/// `R_X86_64_RELATIVE`.
const R_RELATIVE: u32 = 8;

/// A global's value at program start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitialValue {
    /// The bytes, with each relative slot zeroed.
    pub bytes: Vec<u8>,
    /// Relative slots: (offset in the value, link-time address it holds).
    pub relative: Vec<(u64, u64)>,
}

impl InitialValue {
    /// Whether `live` (the value read from a process whose image is loaded
    /// with `bias`) still equals this initial value.
    pub fn matches(&self, live: &[u8], bias: u64) -> bool {
        if live.len() != self.bytes.len() {
            return false;
        }
        let mut expected = self.bytes.clone();
        for &(off, link) in &self.relative {
            let Some(slot) = usize::try_from(off)
                .ok()
                .and_then(|o| expected.get_mut(o..o.checked_add(8)?))
            else {
                return false;
            };
            slot.copy_from_slice(&link.wrapping_add(bias).to_le_bytes());
        }
        expected == live
    }
}

/// The initial value of every global of `tables` (index-aligned with
/// `tables.globals`), read from the ELF file `elf` (named `path` in
/// errors); `None` where it cannot be known.
pub fn initial_values(
    path: &Path,
    tables: &FrameTables,
    elf: &[u8],
) -> Result<Vec<Option<InitialValue>>, ElfError> {
    let file = ElfFile::parse(path, elf)?;
    // (link-time offset, Some(address held) for relative ones, None for any
    // other kind), sorted by offset.
    let mut relocs: Vec<(u64, Option<u64>)> = file
        .relocations
        .rela
        .iter()
        .map(|r| {
            let held = (r.kind == R_RELATIVE).then_some(r.addend as u64);
            (r.offset, held)
        })
        .collect();
    for &a in &file.relocations.relr {
        // RELR's addend is the word the file holds there.
        let held = file_word(&file.summary.loads, elf, a);
        relocs.push((a, held));
    }
    relocs.sort_unstable_by_key(|r| r.0);
    let mut total = 0u64;
    let mut out = Vec::with_capacity(tables.globals.len());
    for g in &tables.globals {
        let fits = !g.tls
            && g.size <= MAX_INITIAL_VALUE
            && total.saturating_add(g.size) <= MAX_INITIAL_TOTAL;
        let value = if fits {
            initial_value(&file.summary.loads, elf, &relocs, g.addr.0, g.size)
        } else {
            None
        };
        if value.is_some() {
            total = total.saturating_add(g.size);
        }
        out.push(value);
    }
    Ok(out)
}

fn initial_value(
    loads: &[Segment],
    elf: &[u8],
    relocs: &[(u64, Option<u64>)],
    addr: u64,
    size: u64,
) -> Option<InitialValue> {
    let end = addr.checked_add(size)?;
    let seg = loads
        .iter()
        .find(|s| s.vaddr <= addr && end <= s.vaddr.saturating_add(s.memsz))?;
    let len = usize::try_from(size).ok()?;
    let mut bytes = vec![0u8; len];
    // The part in the file; the rest (`.bss`) stays zero.
    let file_end = seg.vaddr.saturating_add(seg.filesz).min(end);
    if addr < file_end {
        let n = usize::try_from(file_end - addr).ok()?;
        let from = usize::try_from(seg.offset.checked_add(addr - seg.vaddr)?).ok()?;
        bytes[..n].copy_from_slice(elf.get(from..from.checked_add(n)?)?);
    }
    let first = relocs.partition_point(|r| r.0 < addr);
    let mut relative = Vec::new();
    for &(at, held) in relocs[first..].iter().take_while(|r| r.0 < end) {
        let off = at - addr;
        let held = held?;
        let slot = bytes
            .get_mut(usize::try_from(off).ok()?..usize::try_from(off.checked_add(8)?).ok()?)?;
        slot.fill(0);
        relative.push((off, held));
    }
    Some(InitialValue { bytes, relative })
}

/// The 8-byte word the file holds at link-time address `a`.
fn file_word(loads: &[Segment], elf: &[u8], a: u64) -> Option<u64> {
    let seg = loads.iter().find(|s| {
        s.vaddr <= a
            && a.checked_add(8)
                .is_some_and(|e| e <= s.vaddr.saturating_add(s.filesz))
    })?;
    let from = usize::try_from(seg.offset.checked_add(a - seg.vaddr)?).ok()?;
    let w: [u8; 8] = elf.get(from..from.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(w))
}
