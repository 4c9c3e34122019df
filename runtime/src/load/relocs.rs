//! NEW's relocations and imports decided as data before the process is
//! touched: what to write where ([`LoadPlan`]), from NEW's bytes and the
//! process's [`Libraries`]. A new relocation type is recognised in
//! [`plan_load`] (a [`RelocValue`] says how its value is computed) and, if it
//! needs a new kind of value, written in [`super::map`].

use super::elf::{page_down, page_up, ElfFile, Rela, Segment};
use super::libraries::Libraries;
use super::LoadError;
use crate::target::procfs::PAGE_SIZE;
use nix::unistd::Pid;
use object::elf;
use std::path::Path;
use upstare_dwarf::{LinkAddr, RuntimeAddr};

/// Bound on the size of one COPY-relocated object.
pub(super) const MAX_COPY: u64 = 16 << 20;

/// What a relocation writes, decided before the process is touched.
#[derive(Clone, Debug)]
pub(super) enum RelocValue {
    /// NEW's bias plus this.
    Base(u64),
    /// An absolute runtime address.
    Abs(u64),
    /// Call the resolver in the process; add the addend.
    Ifunc {
        resolver: RuntimeAddr,
        addend: u64,
        symbol: String,
    },
    /// NEW's own IFUNC: call bias + resolver.
    LocalIfunc { resolver: u64, symbol: String },
    /// Copy `size` bytes from the live definition.
    Copy {
        src: RuntimeAddr,
        size: u64,
        symbol: String,
    },
}

/// Everything [`super::load_image`] will do, computed from the files alone.
#[derive(Debug)]
pub(super) struct LoadPlan {
    /// NEW's `PT_LOAD` segments, sorted by address, checked not to overlap.
    pub segments: Vec<Segment>,
    /// Link-time span of the segments (page-aligned).
    pub lo: u64,
    pub hi: u64,
    /// (link-time address, value) in the order they are written; NEW's
    /// own IFUNCs (`IRELATIVE`) last.
    pub relocs: Vec<(u64, RelocValue)>,
    /// `PT_GNU_RELRO` (vaddr, memsz): made read-only after relocation.
    pub relro: Option<(u64, u64)>,
    /// `e_entry` (link-time).
    pub entry: u64,
    /// COPY-relocated objects (name, size).
    pub copies: Vec<(String, u64)>,
}

/// One import slot of an executable (a `GLOB_DAT`, `JUMP_SLOT`, `64` or
/// `COPY` relocation against a symbol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportSlot {
    pub symbol: String,
    pub version: Option<String>,
    /// `R_X86_64_*` type.
    pub kind: u32,
    /// Where the relocation writes (link-time).
    pub offset: LinkAddr,
    pub weak: bool,
}

/// Name a relocation type for messages.
pub fn reloc_name(kind: u32) -> &'static str {
    match kind {
        0 => "R_X86_64_NONE",
        1 => "R_X86_64_64",
        2 => "R_X86_64_PC32",
        5 => "R_X86_64_COPY",
        6 => "R_X86_64_GLOB_DAT",
        7 => "R_X86_64_JUMP_SLOT",
        8 => "R_X86_64_RELATIVE",
        16 => "R_X86_64_DTPMOD64",
        17 => "R_X86_64_DTPOFF64",
        18 => "R_X86_64_TPOFF64",
        37 => "R_X86_64_IRELATIVE",
        _ => "R_X86_64_?",
    }
}

/// The import slots of the executable `path` (whose bytes are `data`).
pub fn import_slots(path: &Path, data: &[u8]) -> Result<Vec<ImportSlot>, LoadError> {
    let file = ElfFile::parse(path, data)?;
    let mut out = Vec::new();
    for r in &file.relocations.rela {
        if r.symbol == 0 {
            continue;
        }
        let sym = file.dynsym(path, r.symbol)?;
        out.push(ImportSlot {
            symbol: sym.name.clone(),
            version: sym.version.clone(),
            kind: r.kind,
            offset: LinkAddr(r.offset),
            weak: sym.bind == elf::STB_WEAK.0,
        });
    }
    Ok(out)
}

fn display_sym(name: &str, version: Option<&str>) -> String {
    match version {
        Some(v) => format!("{name}@{v}"),
        None => name.to_string(),
    }
}

/// Check NEW and decide every relocation (see the module doc of
/// [`super`]); `libs` must have been read with [`Libraries::read`].
pub(super) fn plan_load(path: &Path, data: &[u8], libs: &Libraries) -> Result<LoadPlan, LoadError> {
    plan_load_object(path, data, libs, true)
}

/// [`plan_load`] for any position-independent object: `tables` says
/// whether it must carry upstare tables (NEW does; a transformer object
/// does not).
pub(super) fn plan_load_object(
    path: &Path,
    data: &[u8],
    libs: &Libraries,
    tables: bool,
) -> Result<LoadPlan, LoadError> {
    let file = ElfFile::parse(path, data)?;
    let sum = &file.summary;
    let p = || path.to_path_buf();
    let libs_pid = libs.pid().map_or(0, Pid::as_raw);
    if sum.machine != elf::EM_X86_64.0 {
        return Err(LoadError::NotX86_64 {
            path: p(),
            machine: sum.machine,
        });
    }
    if sum.e_type == elf::ET_EXEC.0 {
        return Err(LoadError::NotPie { path: p() });
    }
    if sum.e_type != elf::ET_DYN.0 {
        return Err(LoadError::NotExecutable {
            path: p(),
            e_type: sum.e_type,
        });
    }
    if sum.tls {
        return Err(LoadError::OwnTls { path: p() });
    }
    if tables && sum.tables.is_none() {
        return Err(LoadError::NoTables { path: p() });
    }
    let missing: Vec<&str> = sum
        .needed
        .iter()
        .filter(|n| !libs.has_library(n))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(LoadError::MissingLibrary {
            path: p(),
            library: missing.join(", "),
            pid: libs_pid,
        });
    }
    let bad = |what: String| LoadError::BadLayout { path: p(), what };
    let mut segments = sum.loads.clone();
    segments.sort_by_key(|s| s.vaddr);
    if segments.is_empty() {
        return Err(bad("no PT_LOAD segment".into()));
    }
    let mut prev_end = 0u64;
    for s in &segments {
        let end = s
            .vaddr
            .checked_add(s.memsz)
            .ok_or_else(|| bad(format!("segment at {:#x} wraps", s.vaddr)))?;
        if s.filesz > s.memsz
            || s.offset
                .checked_add(s.filesz)
                .is_none_or(|e| e > data.len() as u64)
        {
            return Err(bad(format!("segment at {:#x} exceeds the file", s.vaddr)));
        }
        if s.vaddr % PAGE_SIZE != s.offset % PAGE_SIZE {
            return Err(bad(format!(
                "segment at {:#x}: address and file offset {:#x} differ modulo the page size",
                s.vaddr, s.offset
            )));
        }
        if page_down(s.vaddr) < prev_end {
            return Err(bad(format!(
                "segment at {:#x} overlaps the one before",
                s.vaddr
            )));
        }
        prev_end = page_up(end).ok_or_else(|| bad("span wraps".into()))?;
    }
    let lo = page_down(segments[0].vaddr);
    let hi = prev_end;
    let in_image = |off: u64| {
        segments
            .iter()
            .any(|s| s.vaddr <= off && off.checked_add(8).is_some_and(|e| e <= s.vaddr + s.memsz))
    };
    // The file's bytes at link-time address `a` (for RELR's implicit addends).
    let file_word = |a: u64| -> Option<u64> {
        let s = segments
            .iter()
            .find(|s| s.vaddr <= a && a.checked_add(8).is_some_and(|e| e <= s.vaddr + s.filesz))?;
        let off = usize::try_from(s.offset + (a - s.vaddr)).ok()?;
        let b = data.get(off..off.checked_add(8)?)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    };

    let raw = &file.relocations;

    let mut relocs = Vec::with_capacity(raw.rela.len() + raw.relr.len());
    let mut irelative = Vec::new();
    let mut unresolved: Vec<String> = Vec::new();
    let mut copies = Vec::new();
    for &Rela {
        offset,
        kind,
        symbol: symidx,
        addend,
    } in &raw.rela
    {
        let addend_u = addend as u64;
        if kind == elf::R_X86_64_NONE.0 {
            continue;
        }
        if !in_image(offset) {
            return Err(bad(format!(
                "{} at {offset:#x} outside every segment",
                reloc_name(kind)
            )));
        }
        let unsupported = |symbol: String| LoadError::UnsupportedReloc {
            path: p(),
            kind,
            offset: LinkAddr(offset),
            symbol,
        };
        if kind == elf::R_X86_64_RELATIVE.0 {
            relocs.push((offset, RelocValue::Base(addend_u)));
            continue;
        }
        if kind == elf::R_X86_64_IRELATIVE.0 {
            irelative.push((
                offset,
                RelocValue::LocalIfunc {
                    resolver: addend_u,
                    symbol: format!("IRELATIVE at {offset:#x}"),
                },
            ));
            continue;
        }
        let by_symbol = kind == elf::R_X86_64_64.0
            || kind == elf::R_X86_64_GLOB_DAT.0
            || kind == elf::R_X86_64_JUMP_SLOT.0;
        let is_copy = kind == elf::R_X86_64_COPY.0;
        if !(by_symbol || is_copy) {
            let name = if symidx == 0 {
                "none".to_string()
            } else {
                file.dynsym(path, symidx)?.name.clone()
            };
            return Err(unsupported(format!("{name} ({})", reloc_name(kind))));
        }
        let sym = file.dynsym(path, symidx)?;
        let (name, version) = (sym.name.clone(), sym.version.clone());
        let weak = sym.bind == elf::STB_WEAK.0;
        let defined_here = sym.defined;
        if is_copy {
            let Some(r) = libs.lookup_symbol(&name, version.as_deref()) else {
                unresolved.push(display_sym(&name, version.as_deref()));
                continue;
            };
            let size = sym.size;
            if size > MAX_COPY || r.size < size {
                return Err(LoadError::Copy {
                    path: p(),
                    symbol: name,
                    reason: format!("size {size} here, {} in {}", r.size, r.library.name()),
                });
            }
            if !in_image(offset) || offset.checked_add(size).is_none() {
                return Err(bad(format!("COPY of {name} outside every segment")));
            }
            copies.push((name.clone(), size));
            relocs.push((
                offset,
                RelocValue::Copy {
                    src: r.addr,
                    size,
                    symbol: name,
                },
            ));
            continue;
        }
        if defined_here {
            // NEW's own definition (an executable's export): not in the
            // process's scope, so bind to it directly.
            let v = sym.value;
            if sym.kind == elf::STT_GNU_IFUNC.0 {
                relocs.push((
                    offset,
                    RelocValue::LocalIfunc {
                        resolver: v,
                        symbol: name,
                    },
                ));
            } else if sym.kind == elf::STT_TLS.0 {
                return Err(unsupported(name));
            } else {
                relocs.push((offset, RelocValue::Base(v.wrapping_add(addend_u))));
            }
            continue;
        }
        match libs.lookup_symbol(&name, version.as_deref()) {
            Some(r) if r.tls => return Err(unsupported(name)),
            Some(r) if r.ifunc => relocs.push((
                offset,
                RelocValue::Ifunc {
                    resolver: r.addr,
                    addend: addend_u,
                    symbol: display_sym(&name, version.as_deref()),
                },
            )),
            Some(r) => relocs.push((offset, RelocValue::Abs(r.addr.0.wrapping_add(addend_u)))),
            None if weak => relocs.push((offset, RelocValue::Abs(0u64.wrapping_add(addend_u)))),
            None => unresolved.push(display_sym(&name, version.as_deref())),
        }
    }
    for &a in &raw.relr {
        let v =
            file_word(a).ok_or_else(|| bad(format!("RELR entry at {a:#x} outside the file")))?;
        relocs.push((a, RelocValue::Base(v)));
    }
    if !unresolved.is_empty() {
        unresolved.sort();
        unresolved.dedup();
        let more = unresolved.len().saturating_sub(8);
        let mut symbols = unresolved
            .into_iter()
            .take(8)
            .collect::<Vec<_>>()
            .join(", ");
        if more > 0 {
            symbols.push_str(&format!(" and {more} more"));
        }
        return Err(LoadError::Unresolved {
            path: p(),
            symbols,
            pid: libs_pid,
        });
    }
    // IRELATIVE last: resolvers may use NEW's other relocated data.
    relocs.extend(irelative);
    Ok(LoadPlan {
        segments,
        lo,
        hi,
        relocs,
        relro: sum.relro,
        entry: sum.entry,
        copies,
    })
}
