//! The conservative sweep for values pointing into the retired image.
//!
//! The typed walk (globals, frames, heap objects reached through typed
//! pointers) only sees pointers whose type says so. A callback kept in a
//! `void *`, a union, an integer or a block of raw bytes is invisible to
//! it, and after an update the old image's code is no longer executable: the
//! first call through such a value crashes, after a reported success. So
//! after the typed walk every 8-byte aligned value of all live writable
//! memory (data and `.bss` of every object, the heap, anonymous mappings,
//! each thread's stack above its stack pointer, the retired image's own
//! data) is checked, with the writes the update is about to make already
//! applied:
//! - the entry of a function of OLD → the same function of NEW (by the
//!   plan's function mapping, or by ELF symbol name for code without DWARF
//!   such as `_start`);
//! - an address inside an OLD global → the same global and offset in NEW
//!   (through the global's conversion);
//! - other OLD code addresses, one past the end of a global, and writable
//!   OLD data that is no global are reported: nothing can say where they
//!   should go;
//! - deliberate, counted exceptions: the objects OLD carries as COPY
//!   relocations (`stdout`, `environ`: libc keeps using OLD's copies), and
//!   OLD's read-only data (string literals), which stays mapped and never
//!   changes.
//!
//! Values stored inside the retired image's own data are only read by old
//! code: function entries there are remapped anyway (a stale pointer into
//! OLD's data then still leads to NEW's code), the rest is counted, not
//! reported.
//!
//! Pure computation on any [`TargetMemory`]; bounded by [`MAX_SWEEP_BYTES`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

use nix::unistd::Pid;
use serde::Serialize;
use upstare_dwarf::fdt::FrameTables;
use upstare_dwarf::{LinkAddr, LoadBias, Reg, RuntimeAddr};

use crate::target::ptrace::Regs;

use crate::engine::pointers::{HeapMove, Remapper};
use crate::engine::state::Image;
use crate::engine::Write;
use crate::memory::TargetMemory;
use crate::target::procfs::{EpollRegistration, MapPath, MemoryMap};

/// Most bytes the sweep reads; the rest is reported as not scanned.
pub const MAX_SWEEP_BYTES: u64 = 512 << 20;
/// Bytes read at once.
const CHUNK: u64 = 1 << 20;
/// Most hits kept with their location (the others are only counted).
const MAX_HITS_KEPT: usize = 1 << 16;

/// Offset of glibc's pointer guard in the thread control block (x86-64,
/// `fs:0x30`): the same value in every thread of a process.
pub const POINTER_GUARD_OFFSET: u64 = 0x30;

/// glibc's `PTR_DEMANGLE` with the process's pointer guard.
pub fn demangle(v: u64, guard: u64) -> u64 {
    v.rotate_right(17) ^ guard
}

/// glibc's `PTR_MANGLE` with the process's pointer guard.
pub fn mangle(p: u64, guard: u64) -> u64 {
    (p ^ guard).rotate_left(17)
}

/// The pointer guard of the process whose thread has `fs_base`.
pub fn pointer_guard(mem: &impl TargetMemory, fs_base: u64) -> Option<u64> {
    let at = fs_base.checked_add(POINTER_GUARD_OFFSET)?;
    mem.read_u64(RuntimeAddr(at)).ok()
}

/// Whether a callee saves its caller's return address mangled: the
/// `setjmp` family (`setjmp`, `_setjmp`, `sigsetjmp`, `__sigsetjmp`) keeps
/// the address after its call, with the stack and frame pointers, mangled
/// in the `jmp_buf` (glibc's `PTR_MANGLE`), where no plain sweep sees it.
pub(crate) fn saves_mangled_return(callee: &str) -> bool {
    matches!(callee.trim_start_matches('_'), "setjmp" | "sigsetjmp")
}

/// OLD's return addresses of calls to the `setjmp` family (link-time) →
/// what they are (`PostgresMain+0x1f3, after its call to __sigsetjmp`) and
/// NEW's return address of the same call as the plan maps it (link-time),
/// if it has one: a `jmp_buf` saved before the update returns there.
pub fn setjmp_returns(
    plan: &upstare_patcher::UpdatePlan,
    old: &FrameTables,
    new: &FrameTables,
) -> HashMap<u64, (String, Option<u64>)> {
    let mut out = HashMap::new();
    for f in &old.functions {
        for c in f
            .call_sites
            .iter()
            .filter(|c| saves_mangled_return(c.callee.id_name()))
        {
            let what = format!(
                "{}+{:#x}, after its call to {}",
                f.name,
                c.return_addr.0.wrapping_sub(f.low.0),
                c.callee.id_name()
            );
            let to = (|| {
                let fm = plan.function(&f.name)?;
                let planned = old.functions.get(fm.old)?;
                // A static homonym of another file: the plan's sites are
                // not its own.
                if planned.low != f.low && !old.same_declaration(f, planned) {
                    return None;
                }
                let nf = plan.new_function(f, old, new)?;
                let cm = fm.continuation(&c.continuation(), upstare_patcher::SiteKind::Call)?;
                let site = nf.call_sites.get(cm.new_site?)?;
                saves_mangled_return(site.callee.id_name()).then_some(site.return_addr.0)
            })();
            out.insert(c.return_addr.0, (what, to));
        }
    }
    out
}

/// The retired image as the sweep sees it (runtime addresses).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Retired {
    /// Its load bias (runtime = link-time + bias).
    pub bias: u64,
    /// Every byte it occupies.
    pub span: Range<u64>,
    /// One past its last byte as its segments say (not page-rounded): the
    /// dynamic linker records it (`l_map_end`).
    pub end: u64,
    /// Its code.
    pub text: Range<u64>,
    /// Its writable parts (data, `.bss`).
    pub writable: Vec<Range<u64>>,
    /// Its COPY-relocated objects: name and bytes.
    pub copies: Vec<(String, Range<u64>)>,
}

impl Retired {
    /// The retired image `old`, its writable parts as `maps` shows them and
    /// its COPY relocations read from its file's bytes `elf` (none when the
    /// file cannot be parsed: then values into them are reported, never
    /// silently accepted).
    pub fn new(old: &Image, maps: &[MemoryMap], elf: &[u8]) -> Retired {
        let span = old.span.start.0..old.span.end.0;
        Retired {
            writable: maps
                .iter()
                .filter(|m| m.perms.write && span.start <= m.start.0 && m.end.0 <= span.end)
                .map(|m| m.start.0..m.end.0)
                .collect(),
            copies: copy_relocations(elf)
                .into_iter()
                .filter_map(|(name, addr, size)| {
                    let start = LinkAddr(addr).to_runtime(old.bias).0;
                    Some((name, start..start.checked_add(size.max(1))?))
                })
                .collect(),
            text: old.text.start.0..old.text.end.0,
            end: segments_end(elf).map_or(span.end, |e| e.wrapping_add(old.bias.0)),
            bias: old.bias.0,
            span,
        }
    }

    fn writable_at(&self, v: u64) -> bool {
        self.writable.iter().any(|r| r.contains(&v))
    }
}

/// One past the end of the highest `PT_LOAD` segment (link-time).
fn segments_end(elf: &[u8]) -> Option<u64> {
    use object::{Object, ObjectSegment};
    let file = object::File::parse(elf).ok()?;
    file.segments()
        .filter_map(|s| s.address().checked_add(s.size()))
        .max()
}

/// Functions (by symbol name) whose bytes are the same in OLD and NEW: any
/// address in one has its twin at the same offset of the other, the same
/// instruction (a return address into `_start` on the main stack, a stale
/// return address left in a frame of an unchanged function). Code that
/// changed at all is not in the list: its addresses are reported.
/// Link-time addresses: (OLD's range, NEW's start, name).
pub fn identical_code(old_elf: &[u8], new_elf: &[u8]) -> Vec<(Range<u64>, u64, String)> {
    use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
    let (Ok(a), Ok(b)) = (object::File::parse(old_elf), object::File::parse(new_elf)) else {
        return Vec::new();
    };
    let code = |f: &object::File<'_>, s: &object::Symbol<'_, '_>| -> Option<Vec<u8>> {
        let sec = f.section_by_index(s.section_index()?).ok()?;
        Some(sec.data_range(s.address(), s.size()).ok()??.to_vec())
    };
    let news: HashMap<String, object::Symbol<'_, '_>> = b
        .symbols()
        .take(1 << 22)
        .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0)
        .filter_map(|s| Some((s.name().ok()?.to_string(), s)))
        .collect();
    a.symbols()
        .take(1 << 22)
        .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0)
        .filter_map(|s| {
            let name = s.name().ok()?;
            let t = news.get(name)?;
            if t.size() != s.size() || code(&a, &s)? != code(&b, t)? {
                return None;
            }
            let start = s.address();
            Some((
                start..start.checked_add(s.size())?,
                t.address(),
                name.to_string(),
            ))
        })
        .collect()
}

/// `(symbol, link-time address, size)` of every `R_X86_64_COPY` relocation
/// of an ELF file.
pub fn copy_relocations(elf: &[u8]) -> Vec<(String, u64, u64)> {
    relocations_of(elf, &[object::elf::R_X86_64_COPY])
}

/// OLD's GOT slots → the same symbol's slot in NEW, both link-time
/// (`R_X86_64_GLOB_DAT` and `R_X86_64_JUMP_SLOT` relocations by symbol):
/// a value pointing at a slot of OLD's GOT (left on a stack by the dynamic
/// linker's lazy binding) goes to NEW's slot of the same symbol. Worked out
/// before the stop; the sweep adds the load biases.
pub fn got_slots(old_elf: &[u8], new_elf: &[u8]) -> HashMap<u64, (String, Option<u64>)> {
    let kinds = [
        object::elf::R_X86_64_GLOB_DAT,
        object::elf::R_X86_64_JUMP_SLOT,
    ];
    // A slot of no named symbol cannot be told from another.
    let named = |(name, _, _): &(String, u64, u64)| name != "?";
    let news: HashMap<String, u64> = relocations_of(new_elf, &kinds)
        .into_iter()
        .filter(named)
        .map(|(name, at, _)| (name, at))
        .collect();
    relocations_of(old_elf, &kinds)
        .into_iter()
        .filter(named)
        .map(|(name, at, _)| {
            let to = news.get(&name).copied();
            (at, (name, to))
        })
        .collect()
}

/// `(symbol, link-time address, size)` of every dynamic relocation of one
/// of `kinds` of an ELF file.
fn relocations_of(elf: &[u8], kinds: &[object::elf::RelocationType]) -> Vec<(String, u64, u64)> {
    use object::read::elf::ElfFile64;
    use object::{Object, ObjectSymbol, ObjectSymbolTable, RelocationFlags};
    let Ok(file) = ElfFile64::<object::Endianness>::parse(elf) else {
        return Vec::new();
    };
    let Some(relocs) = file.dynamic_relocations() else {
        return Vec::new();
    };
    let dynsyms = file.dynamic_symbol_table();
    let mut out = Vec::new();
    for (offset, r) in relocs.take(1 << 20) {
        let RelocationFlags::Elf { r_type } = r.flags() else {
            continue;
        };
        if !kinds.contains(&r_type) {
            continue;
        }
        let object::RelocationTarget::Symbol(idx) = r.target() else {
            continue;
        };
        let sym = dynsyms.as_ref().and_then(|t| t.symbol_by_index(idx).ok());
        let name = sym
            .as_ref()
            .and_then(|s| s.name().ok())
            .unwrap_or("?")
            .to_string();
        let size = sym.map_or(8, |s| s.size());
        out.push((name, offset, size));
    }
    out
}

/// Function entries of an ELF file by symbol name (link-time addresses).
pub fn function_symbols(elf: &[u8]) -> HashMap<String, u64> {
    use object::{Object, ObjectSymbol, SymbolKind};
    let Ok(file) = object::File::parse(elf) else {
        return HashMap::new();
    };
    file.symbols()
        .chain(file.dynamic_symbols())
        .take(1 << 22)
        .filter(|s| s.kind() == SymbolKind::Text && s.is_definition() && s.address() != 0)
        .filter_map(|s| Some((s.name().ok()?.to_string(), s.address())))
        .collect()
}

/// The link-time addresses of `__dso_handle` in OLD and in NEW: the C
/// runtime's token for "this program", stored by `atexit` with each exit
/// handler (`__cxa_atexit(fn, arg, &__dso_handle)`) and only ever compared
/// (`__cxa_finalize`); no DWARF describes it. After the update NEW's
/// destructors finalize with NEW's token, so the handlers registered by
/// OLD carry NEW's too.
pub fn dso_handles(old_elf: &[u8], new_elf: &[u8]) -> Option<(u64, u64)> {
    use object::{Object, ObjectSymbol};
    let find = |elf: &[u8]| -> Option<u64> {
        let file = object::File::parse(elf).ok()?;
        let found = file
            .symbols()
            .take(1 << 22)
            .find(|s| s.name() == Ok("__dso_handle") && s.is_definition())
            .map(|s| s.address());
        found
    };
    Some((find(old_elf)?, find(new_elf)?))
}

/// What a value pointing into the retired image is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Class {
    /// Goes to `new` (a function entry or a place in a global).
    Remap { new: u64, what: String },
    /// A code address that is no function entry of NEW: reported.
    OtherCode { what: String },
    /// Writable OLD data with no place in NEW: reported.
    OldData { what: String },
    /// One past the end of a global: which object it belongs to is
    /// ambiguous; reported.
    PastEnd { global: String },
    /// A COPY-relocated object libc keeps using: counted exception.
    Copy { name: String },
    /// OLD's read-only data (kept mapped, never written): counted
    /// exception.
    ReadOnly,
    /// One past the last byte of OLD (the dynamic linker's `l_map_end`):
    /// counted exception.
    ImageEnd,
    /// An untyped value (an integer, a union, raw bytes) pointing at or
    /// into a heap object of changed type that moves or changes layout: at
    /// its start it is redirected to `new`, inside it is reported and left
    /// (`new` is `None`); `--strict` refuses either way.
    HeapAlias {
        /// The object's type (`struct node`) and old start.
        ty: String,
        object_at: u64,
        offset: u64,
        new: Option<u64>,
    },
}

impl Class {
    /// Whether this class is a stale value nobody can map.
    pub fn is_stale(&self) -> bool {
        matches!(
            self,
            Class::OtherCode { .. } | Class::OldData { .. } | Class::PastEnd { .. }
        )
    }
}

/// Says what values pointing into the retired image are, and where they go.
pub struct Classifier<'c, 'a, 'r> {
    retired: &'c Retired,
    old: &'c Image,
    /// OLD function entry (runtime) → name and NEW entry, if any: runtime,
    /// or link-time plus [`Classifier::new_bias`].
    entries: Cow<'c, HashMap<u64, (String, Option<u64>)>>,
    /// Added to the NEW entries of `entries` (they are link-time when
    /// worked out before NEW was loaded, see [`SweepFiles`]).
    pub new_bias: LoadBias,
    /// Where globals go (`None`: nowhere, an audit after the update).
    remap: Option<&'r mut Remapper<'a>>,
    /// Code without DWARF that NEW has byte for byte ([`identical_code`]).
    pub same_code: Vec<(Range<u64>, u64, String)>,
    /// OLD's GOT slots and NEW's of the same symbol ([`got_slots`]).
    pub got: HashMap<u64, (String, Option<u64>)>,
    /// OLD's globals (not thread-local) by link-time address.
    globals: RangeIndex,
    /// Link-time end of a global (not thread-local, not empty) → the first
    /// such global.
    global_ends: HashMap<u64, usize>,
    /// `same_code` by address, built at the first lookup.
    same_code_index: Option<RangeIndex>,
    /// The process's pointer guard: with it, values glibc stored mangled
    /// (a `jmp_buf`'s saved pc, stack and frame pointers; exit handlers)
    /// are found too. `None`: only plain values are.
    pub pointer_guard: Option<u64>,
    /// OLD's return addresses of `setjmp` calls (runtime) → what they are
    /// and NEW's (runtime), see [`setjmp_returns`].
    pub setjmp_returns: HashMap<u64, (String, Option<u64>)>,
    /// OLD's and NEW's `__dso_handle` (runtime), see [`dso_handles`].
    pub dso_handle: Option<(u64, u64)>,
    /// The old stack addresses of frames that move (from the remapper),
    /// a quick test before remapping a demangled stack address.
    moved_stack: Option<Range<u64>>,
}

/// Ranges looked up by address: the first of a list (in the list's order)
/// whose range holds an address, in O(log n) plus the ranges that overlap
/// it, instead of a scan of the whole list for every value the sweep meets
/// (a few thousand globals times a few thousand values).
struct RangeIndex {
    /// (start, end, index in the list), sorted by start.
    sorted: Vec<(u64, u64, usize)>,
    /// The largest end among `sorted[..=i]`: where a backward scan stops.
    reach: Vec<u64>,
}

impl RangeIndex {
    fn new(ranges: impl Iterator<Item = (usize, Range<u64>)>) -> RangeIndex {
        let mut sorted: Vec<(u64, u64, usize)> = ranges.map(|(i, r)| (r.start, r.end, i)).collect();
        sorted.sort_unstable();
        let mut reach = Vec::with_capacity(sorted.len());
        let mut far = 0u64;
        for &(_, end, _) in &sorted {
            far = far.max(end);
            reach.push(far);
        }
        RangeIndex { sorted, reach }
    }

    /// The smallest list index whose range holds `v`.
    fn first_containing(&self, v: u64) -> Option<usize> {
        let mut i = self.sorted.partition_point(|&(start, _, _)| start <= v);
        let mut best: Option<usize> = None;
        while i > 0 {
            i -= 1;
            if self.reach[i] <= v {
                break;
            }
            let (_, end, idx) = self.sorted[i];
            if v < end {
                best = Some(best.map_or(idx, |b| b.min(idx)));
            }
        }
        best
    }
}

impl<'c, 'a, 'r> Classifier<'c, 'a, 'r> {
    /// A classifier for an update: `remap` sends globals where the plan
    /// says; `entries` maps OLD's function entries to NEW's (see
    /// [`entry_map`]).
    pub fn new(
        retired: &'c Retired,
        old: &'c Image,
        entries: Cow<'c, HashMap<u64, (String, Option<u64>)>>,
        remap: Option<&'r mut Remapper<'a>>,
    ) -> Self {
        let globals = &old.tables.globals;
        let index = RangeIndex::new(
            globals
                .iter()
                .enumerate()
                .filter(|(_, g)| !g.tls)
                .map(|(i, g)| (i, g.addr.0..g.addr.0.saturating_add(g.size.max(1)))),
        );
        let mut global_ends = HashMap::new();
        for (i, g) in globals.iter().enumerate() {
            if let (false, true, Some(end)) = (g.tls, g.size > 0, g.addr.0.checked_add(g.size)) {
                global_ends.entry(end).or_insert(i);
            }
        }
        Classifier {
            retired,
            old,
            entries,
            new_bias: LoadBias(0),
            same_code: Vec::new(),
            got: HashMap::new(),
            moved_stack: remap.as_ref().and_then(|r| r.moved_stack_span()),
            globals: index,
            global_ends,
            same_code_index: None,
            pointer_guard: None,
            setjmp_returns: HashMap::new(),
            dso_handle: None,
            remap,
        }
    }

    /// `None` when `v` does not point into the retired image.
    /// The values [`Classifier::classify`] may know (it returns `None` for
    /// every other): the retired span, and with the pointer guard the
    /// mangled forms of the retired code and of the stack that moves.
    pub fn interest(&self) -> Interest {
        let mut i = Interest::default();
        i.add(self.retired.span.clone());
        if let Some(guard) = self.pointer_guard {
            i.add_mangled(guard, self.retired.text.clone());
            if let Some(s) = &self.moved_stack {
                i.add_mangled(guard, s.clone());
            }
        }
        i
    }

    pub fn classify(&mut self, v: u64) -> Option<Class> {
        if !self.retired.span.contains(&v) {
            return self.classify_mangled(v);
        }
        let link = RuntimeAddr(v).to_link(self.old.bias);
        if self.retired.text.contains(&v) {
            if let Some((name, new)) = self.entries.get(&v) {
                return Some(match new {
                    Some(n) => Class::Remap {
                        new: LinkAddr(*n).to_runtime(self.new_bias).0,
                        what: format!("function {name}"),
                    },
                    None => Class::OtherCode {
                        what: format!("entry of {name}, which NEW does not have"),
                    },
                });
            }
            let same_code = &self.same_code;
            let index = self.same_code_index.get_or_insert_with(|| {
                RangeIndex::new(same_code.iter().map(|(r, _, _)| r.clone()).enumerate())
            });
            if let Some((r, to, name)) = index.first_containing(v).map(|i| &self.same_code[i]) {
                return Some(Class::Remap {
                    new: to.saturating_add(v - r.start),
                    what: format!("function {name}+{:#x} (identical code)", v - r.start),
                });
            }
            let what = match self.old.tables.function_at(link) {
                Some(f) => format!("{}+{:#x}", f.name, link.0 - f.low.0),
                None => format!("code at {link}"),
            };
            return Some(Class::OtherCode { what });
        }
        if v == self.retired.end {
            return Some(Class::ImageEnd);
        }
        if let Some((name, _)) = self.retired.copies.iter().find(|(_, r)| r.contains(&v)) {
            return Some(Class::Copy { name: name.clone() });
        }
        let globals = &self.old.tables.globals;
        if let Some(g) = self.globals.first_containing(link.0).map(|i| &globals[i]) {
            let off = link.0 - g.addr.0;
            let new = self
                .remap
                .as_mut()
                .map(|r| r.remap(RuntimeAddr(v)).0)
                .filter(|n| *n != v);
            return Some(match new {
                Some(new) => Class::Remap {
                    new,
                    what: format!("global {}+{off}", g.name),
                },
                None if self.retired.writable_at(v) => Class::OldData {
                    what: format!("global {}+{off}, which has no place in NEW", g.name),
                },
                None => Class::ReadOnly,
            });
        }
        if let Some((_, new)) = self.dso_handle.filter(|(old, _)| *old == v) {
            return Some(Class::Remap {
                new,
                what: "global __dso_handle (the program's token for its exit handlers)".to_string(),
            });
        }
        if let Some((name, to)) = self.got.get(&v) {
            return Some(match to {
                Some(n) => Class::Remap {
                    new: *n,
                    what: format!("GOT slot of {name}"),
                },
                None => Class::OldData {
                    what: format!("GOT slot of {name}, which NEW does not have"),
                },
            });
        }
        if !self.retired.writable_at(v) {
            return Some(Class::ReadOnly);
        }
        if let Some(g) = self.global_ends.get(&link.0).map(|&i| &globals[i]) {
            return Some(Class::PastEnd {
                global: g.name.clone(),
            });
        }
        if self.retired.writable_at(v) {
            return Some(Class::OldData {
                what: format!("data at {link}, in no global"),
            });
        }
        Some(Class::ReadOnly)
    }
}

impl Classifier<'_, '_, '_> {
    /// `v` demangled with the pointer guard: a code address of the retired
    /// image (a `jmp_buf`'s saved pc, an exit handler) goes where the same
    /// plain value would, or to NEW's return address of the same `setjmp`
    /// call, mangled again; a stack address in a frame that moves (a
    /// `jmp_buf`'s saved stack or frame pointer) moves with it. Anything
    /// else is `None`: a random word demangles into the old code with a
    /// chance of its size in 2^64.
    fn classify_mangled(&mut self, v: u64) -> Option<Class> {
        let guard = self.pointer_guard?;
        let d = demangle(v, guard);
        if self.retired.text.contains(&d) {
            if let Some((what, to)) = self.setjmp_returns.get(&d) {
                return Some(match to {
                    Some(n) => Class::Remap {
                        new: mangle(*n, guard),
                        what: format!("mangled return address {what} (a jmp_buf's saved pc)"),
                    },
                    None => Class::OtherCode {
                        what: format!(
                            "mangled return address {what} (a jmp_buf's saved pc), a call NEW does not have"
                        ),
                    },
                });
            }
            return Some(match self.classify(d)? {
                Class::Remap { new, what } => Class::Remap {
                    new: mangle(new, guard),
                    what: format!("{what} (mangled)"),
                },
                Class::OtherCode { what } => Class::OtherCode {
                    what: format!("{what} (mangled: a jmp_buf's saved pc or a C library handler)"),
                },
                other => other,
            });
        }
        if self.moved_stack.as_ref().is_some_and(|r| r.contains(&d)) {
            let remap = self.remap.as_mut()?;
            match remap.rebuilt_frame_anchor(RuntimeAddr(d)) {
                Some(Some(n)) => {
                    return Some(Class::Remap {
                        new: mangle(n.0, guard),
                        what: "mangled stack address in a frame rebuilt for NEW's layout (a jmp_buf's saved stack or frame pointer)".to_string(),
                    })
                }
                Some(None) => {
                    return Some(Class::OldData {
                        what: "mangled stack address in a frame rebuilt for NEW's layout, neither its frame pointer nor its stack pointer at a mapped setjmp call: no sure place".to_string(),
                    })
                }
                None => {}
            }
            let n = remap.remap(RuntimeAddr(d)).0;
            if n != d {
                return Some(Class::Remap {
                    new: mangle(n, guard),
                    what: "mangled stack address in a frame that moves (a jmp_buf's saved stack or frame pointer)".to_string(),
                });
            }
        }
        None
    }
}

/// OLD's function entries (runtime) → their name and NEW's entry of the
/// same function (link-time: NEW need not be loaded yet): by the plan's
/// function mapping for functions with DWARF, by ELF symbol name for the
/// others (`_start`, `frame_dummy`...).
pub fn entry_map(
    plan: &upstare_patcher::UpdatePlan,
    old: &Image,
    new_tables: &FrameTables,
    old_syms: &HashMap<String, u64>,
    new_syms: &HashMap<String, u64>,
) -> HashMap<u64, (String, Option<u64>)> {
    let mut out = HashMap::new();
    for (name, addr) in old_syms {
        let to = new_syms.get(name).copied();
        out.insert(old.runtime(LinkAddr(*addr)).0, (name.clone(), to));
    }
    for f in &old.tables.functions {
        let to = plan
            .new_function(f, &old.tables, new_tables)
            .map(|nf| nf.low.0);
        out.insert(old.runtime(f.low).0, (f.name.clone(), to));
    }
    out
}

/// One range of memory to scan.
#[derive(Clone, Debug, Serialize)]
pub struct Region {
    pub range: Range<u64>,
    /// The mapping's name (`[heap]`, a file, `anonymous`, `[stack]`).
    pub name: String,
    /// Inside the retired image.
    pub retired: bool,
}

/// Every live writable range of the process: private writable mappings,
/// each thread's stack from its stack pointer `rsps` up (the part below is
/// dead), shared mappings left out (another process's memory too).
pub fn regions(maps: &[MemoryMap], rsps: &[u64], retired: &Retired) -> Vec<Region> {
    maps.iter()
        .filter(|m| m.perms.read && m.perms.write && !m.perms.shared)
        .map(|m| {
            let lowest_sp = rsps
                .iter()
                .filter(|sp| m.start.0 <= **sp && **sp < m.end.0)
                .min();
            let start = lowest_sp.map_or(m.start.0, |sp| sp & !7);
            Region {
                range: start..m.end.0,
                name: match &m.path {
                    MapPath::Anonymous => "anonymous".to_string(),
                    MapPath::Pseudo(p) => p.clone(),
                    MapPath::File(p) => p.display().to_string(),
                },
                retired: retired.span.start <= m.start.0 && m.end.0 <= retired.span.end,
            }
        })
        .collect()
}

/// Most bytes of shared writable mappings one sweep reads.
pub const MAX_SHARED_SWEEP_BYTES: u64 = 64 << 20;

/// Writable mappings shared with other processes (`MAP_SHARED`, SysV or
/// POSIX shared memory): those swept (up to [`MAX_SHARED_SWEEP_BYTES`] in
/// all) and those left, as (name, bytes). A value there is seen by every
/// process mapping it, which may have NEW at another address or no update
/// at all, so none is remapped: a value pointing into the old image is
/// reported (`--strict` refuses), and what is not swept is said.
pub fn shared_regions(maps: &[MemoryMap]) -> (Vec<Region>, Vec<(String, u64)>) {
    let mut swept = Vec::new();
    let mut left = Vec::new();
    let mut budget = MAX_SHARED_SWEEP_BYTES;
    for m in maps
        .iter()
        .filter(|m| m.perms.read && m.perms.write && m.perms.shared)
    {
        // `MAP_SHARED | MAP_ANONYMOUS` shows as the deleted /dev/zero.
        let name = match &m.path {
            MapPath::File(p) if p.as_path() != std::path::Path::new("/dev/zero") => {
                format!("shared memory {}", p.display())
            }
            MapPath::Pseudo(p) => format!("shared memory {p}"),
            _ => format!("shared anonymous memory at {}", m.start),
        };
        let len = m.end.0.saturating_sub(m.start.0);
        if len <= budget {
            budget -= len;
            swept.push(Region {
                range: m.start.0..m.end.0,
                name,
                retired: false,
            });
        } else {
            left.push((name, len));
        }
    }
    (swept, left)
}

/// A value found pointing into the retired image.
#[derive(Clone, Debug, Serialize)]
pub struct Hit {
    /// Where it is.
    pub addr: u64,
    /// `mapping+offset`.
    pub location: String,
    pub value: u64,
    pub class: Class,
    /// Stored inside the retired image itself.
    pub in_retired: bool,
}

/// What a sweep found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SweepResult {
    pub bytes_scanned: u64,
    /// Bytes not scanned because of [`MAX_SWEEP_BYTES`].
    pub bytes_not_scanned: u64,
    /// Ranges that could not be read (`name@start`).
    pub unreadable: Vec<String>,
    /// Hits, with their location (at most `MAX_HITS_KEPT`).
    pub hits: Vec<Hit>,
    /// Hits beyond those kept.
    pub hits_dropped: u64,
    /// Shared writable mappings not swept ([`shared_regions`]).
    pub shared_unswept: Vec<(String, u64)>,
    /// Epoll registrations whose user data goes to NEW, with the new value
    /// (the kernel keeps it: re-registered at the commit).
    #[serde(skip)]
    pub epoll_remaps: Vec<(EpollRegistration, u64)>,
}

impl SweepResult {
    /// Keep `hit`, or only count it beyond [`MAX_HITS_KEPT`].
    fn keep(&mut self, hit: Hit) {
        if self.hits.len() < MAX_HITS_KEPT {
            self.hits.push(hit);
        } else {
            self.hits_dropped += 1;
        }
    }

    /// Keep a hit of a value held outside the process's memory (a
    /// register, the kernel), named by `location` (at address 0: never
    /// written).
    fn keep_outside(&mut self, location: String, value: u64, class: Class) {
        self.keep(Hit {
            addr: 0,
            location,
            value,
            class,
            in_retired: false,
        });
    }

    /// Hits that are stale values stored in live memory (outside the
    /// retired image).
    pub fn stale(&self) -> impl Iterator<Item = &Hit> {
        self.hits
            .iter()
            .filter(|h| !h.in_retired && h.class.is_stale())
    }
    /// Hits of the counted exceptions in live memory: (COPY objects,
    /// read-only data, end of the image).
    pub fn exceptions(&self) -> (usize, usize, usize) {
        let live = self.hits.iter().filter(|h| !h.in_retired);
        let (mut copy, mut ro, mut end) = (0, 0, 0);
        for h in live {
            match h.class {
                Class::Copy { .. } => copy += 1,
                Class::ReadOnly => ro += 1,
                Class::ImageEnd => end += 1,
                _ => {}
            }
        }
        (copy, ro, end)
    }
    /// Untyped aliases of moved heap objects in live memory.
    pub fn heap_aliases(&self) -> impl Iterator<Item = &Hit> {
        self.hits
            .iter()
            .filter(|h| !h.in_retired && matches!(h.class, Class::HeapAlias { .. }))
    }
    /// The writes that remap: function entries everywhere, globals and
    /// whole-object aliases of moved heap objects in live memory.
    pub fn writes(&self) -> Vec<Write> {
        self.hits
            .iter()
            .filter_map(|h| match &h.class {
                Class::Remap { new, what } if !h.in_retired || what.starts_with("function ") => {
                    Some(Write {
                        addr: RuntimeAddr(h.addr),
                        bytes: new.to_le_bytes().to_vec(),
                        what: format!("pointer at {} to {what} of the old image", h.location),
                    })
                }
                Class::HeapAlias { new: Some(new), .. } if !h.in_retired => Some(Write {
                    addr: RuntimeAddr(h.addr),
                    bytes: new.to_le_bytes().to_vec(),
                    what: format!("untyped alias at {} of a moved heap object", h.location),
                }),
                _ => None,
            })
            .collect()
    }
}

/// Where untyped values pointing into converted heap objects go: the
/// objects' moves, sorted and disjoint.
pub struct HeapAliases<'m> {
    moves: Vec<&'m HeapMove>,
    /// Lowest and highest address of any object (a quick test).
    span: Range<u64>,
}

impl<'m> HeapAliases<'m> {
    /// The moves that can break an untyped alias: objects that move, or
    /// whose members move in place.
    pub fn new(moves: &'m [HeapMove]) -> Self {
        let mut moves: Vec<&HeapMove> = moves.iter().collect();
        moves.sort_by_key(|m| m.old.start);
        let span = match (moves.first(), moves.iter().map(|m| m.old.end.0).max()) {
            (Some(f), Some(end)) => f.old.start.0..end,
            _ => 0..0,
        };
        HeapAliases { moves, span }
    }

    /// `None` when `v` is no alias that changes.
    pub fn classify(&self, v: u64) -> Option<Class> {
        if !self.span.contains(&v) {
            return None;
        }
        let i = self.moves.partition_point(|m| m.old.start.0 <= v);
        let m = self.moves.get(i.checked_sub(1)?)?;
        let offset = v.checked_sub(m.old.start.0)?;
        if !m.old.contains(&RuntimeAddr(v)) {
            return None;
        }
        let to = m
            .conversion
            .map_offset(offset)
            .and_then(|o| m.new_start.0.checked_add(o));
        if to == Some(v) {
            return None;
        }
        Some(Class::HeapAlias {
            ty: m.name.clone(),
            object_at: m.old.start.0,
            offset,
            new: (offset == 0).then_some(m.new_start.0),
        })
    }

    /// Whether `addr` lies in the old block of an object that moves (freed
    /// after the update: what it holds is dead).
    pub fn in_moved_block(&self, addr: u64) -> bool {
        self.moves
            .iter()
            .any(|m| m.moves() && m.old.contains(&RuntimeAddr(addr)))
    }
}

/// Scans `regions` of `mem` for 8-byte aligned values `classify` knows,
/// reading the memory as it will be once `pending` (the update's other
/// writes) are made.
pub fn sweep(
    mem: &impl TargetMemory,
    regions: &[Region],
    pending: &[&Write],
    interest: &Interest,
    classify: &mut dyn FnMut(u64) -> Option<Class>,
) -> SweepResult {
    let mut out = SweepResult::default();
    let mut sorted: Vec<&Write> = pending.to_vec();
    sorted.sort_by_key(|w| w.addr.0);
    for region in regions {
        let mut cur = region.range.start;
        while cur < region.range.end {
            let len = (region.range.end - cur).min(CHUNK);
            if out.bytes_scanned.saturating_add(len) > MAX_SWEEP_BYTES {
                out.bytes_not_scanned =
                    out.bytes_not_scanned.saturating_add(region.range.end - cur);
                break;
            }
            let Ok(mut bytes) = mem.read_vec(RuntimeAddr(cur), len, CHUNK as usize) else {
                out.unreadable.push(format!("{}@{cur:#x}", region.name));
                break;
            };
            out.bytes_scanned += len;
            overlay(&mut bytes, cur, &sorted);
            let first = (8 - cur % 8) % 8;
            let mut i = first as usize;
            while i + 8 <= bytes.len() {
                let mut w = [0u8; 8];
                w.copy_from_slice(&bytes[i..i + 8]);
                let v = u64::from_le_bytes(w);
                if !interest.wants(v) {
                    i += 8;
                    continue;
                }
                if let Some(class) = classify(v) {
                    let addr = cur + i as u64;
                    out.keep(Hit {
                        addr,
                        location: format!("{}+{:#x}", region.name, addr - region.range.start),
                        value: v,
                        class,
                        in_retired: region.retired,
                    });
                }
                i += 8;
            }
            cur += len;
        }
    }
    out
}

/// Which values the classifier of a sweep may know, as ranges tested
/// inline on every word: most words (zeros, small numbers, heap and stack
/// addresses) fail them, and are never handed to the classifier (a call
/// that builds a [`Class`]), which made the sweep of a small program's
/// 240 KB take 0.2 ms instead of a few tens of microseconds.
#[derive(Clone, Debug, Default)]
pub struct Interest {
    /// Values inside one of these.
    plain: Vec<Range<u64>>,
    /// With glibc's pointer guard: values that, demangled with it, are
    /// inside one of these.
    mangled: Option<(u64, Vec<Range<u64>>)>,
}

impl Interest {
    /// Adds values in `r`.
    pub fn add(&mut self, r: Range<u64>) {
        if !r.is_empty() {
            self.plain.push(r);
        }
    }

    /// Adds values that, demangled with `guard`, are in `r`. One guard per
    /// process: a second one replaces the first.
    pub fn add_mangled(&mut self, guard: u64, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        match &mut self.mangled {
            Some((g, ranges)) if *g == guard => ranges.push(r),
            m => *m = Some((guard, vec![r])),
        }
    }

    /// Whether `v` may be known to the classifier.
    #[inline]
    pub fn wants(&self, v: u64) -> bool {
        if self.plain.iter().any(|r| r.contains(&v)) {
            return true;
        }
        match &self.mangled {
            Some((guard, ranges)) => {
                let d = demangle(v, *guard);
                ranges.iter().any(|r| r.contains(&d))
            }
            None => false,
        }
    }
}

/// Applies the writes of `sorted` (by address) that overlap `bytes` read at
/// `base`.
fn overlay(bytes: &mut [u8], base: u64, sorted: &[&Write]) {
    let end = base.saturating_add(bytes.len() as u64);
    // Writes are at most a value long: start a little before `base`.
    let from = sorted.partition_point(|w| w.addr.0.saturating_add(w.bytes.len() as u64) <= base);
    for w in &sorted[from..] {
        if w.addr.0 >= end {
            break;
        }
        for (k, b) in w.bytes.iter().enumerate() {
            let a = w.addr.0.saturating_add(k as u64);
            if base <= a && a < end {
                bytes[(a - base) as usize] = *b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ByteBuffer;

    fn image(base: u64) -> Image {
        Image {
            path: "/old".into(),
            bias: upstare_dwarf::LoadBias(base),
            tables: upstare_dwarf::fdt::FrameTables::default(),
            text: RuntimeAddr(base + 0x1000)..RuntimeAddr(base + 0x2000),
            span: RuntimeAddr(base)..RuntimeAddr(base + 0x4000),
        }
    }

    #[test]
    fn shared_writable_mappings_are_swept_within_their_budget_and_the_rest_named() {
        let map = |start: u64, len: u64, shared: bool, write: bool, path: MapPath| MemoryMap {
            start: RuntimeAddr(start),
            end: RuntimeAddr(start + len),
            perms: crate::target::procfs::Perms {
                read: true,
                write,
                exec: false,
                shared,
            },
            offset: upstare_dwarf::FileOffset(0),
            dev_major: 0,
            dev_minor: 0,
            inode: 0,
            path,
            deleted: false,
        };
        let maps = [
            map(0x1000, 0x1000, false, true, MapPath::Anonymous),
            map(
                0x10000,
                0x2000,
                true,
                true,
                MapPath::File("/dev/zero".into()),
            ),
            map(0x20000, 0x1000, true, false, MapPath::File("/ro".into())),
            map(
                0x1_0000_0000,
                MAX_SHARED_SWEEP_BYTES,
                true,
                true,
                MapPath::File("/dev/shm/big".into()),
            ),
            map(
                0x30000,
                0x1000,
                true,
                true,
                MapPath::Pseudo("[sysv]".into()),
            ),
        ];
        let (swept, left) = shared_regions(&maps);
        let names: Vec<(&str, u64, u64)> = swept
            .iter()
            .map(|r| (r.name.as_str(), r.range.start, r.range.end))
            .collect();
        assert_eq!(
            names,
            [
                ("shared anonymous memory at 0x10000", 0x10000, 0x12000),
                ("shared memory [sysv]", 0x30000, 0x31000)
            ]
        );
        assert_eq!(
            left,
            [(
                "shared memory /dev/shm/big".to_string(),
                MAX_SHARED_SWEEP_BYTES
            )]
        );
        // Private writable memory stays with the ordinary sweep.
        assert!(regions(&maps, &[], &Retired::default())
            .iter()
            .all(|r| r.range.start == 0x1000));
    }

    #[test]
    fn range_index_finds_what_a_scan_of_the_list_finds() {
        // Overlapping, nested, empty and huge ranges, in no order; every
        // address near their bounds answers as the first-in-list scan does.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        for round in 0..50 {
            let n = 1 + next(40) as usize;
            let ranges: Vec<Range<u64>> = (0..n)
                .map(|_| {
                    let start = next(1000);
                    let len = if next(10) == 0 { next(2000) } else { next(30) };
                    start..start + len
                })
                .collect();
            let index = RangeIndex::new(ranges.iter().cloned().enumerate());
            for v in 0..3100 {
                let scan = ranges.iter().position(|r| r.contains(&v));
                assert_eq!(index.first_containing(v), scan, "round {round}, value {v}");
            }
        }
    }

    type Entries = HashMap<u64, (String, Option<u64>)>;

    /// An old image at 0x10000 (code 0x11000-0x12000, data 0x13000-0x14000
    /// with a COPY object) and one function entry, `cb` at 0x11100, whose
    /// new entry is 0x91100.
    fn small_retired() -> (Image, Retired, Entries) {
        let old = image(0x10000);
        let retired = Retired {
            bias: 0x10000,
            span: 0x10000..0x14000,
            end: 0x13ff0,
            text: 0x11000..0x12000,
            writable: std::iter::once(0x13000..0x14000).collect(),
            copies: vec![("stdout".into(), 0x13f00..0x13f08)],
        };
        let mut entries = HashMap::new();
        entries.insert(0x11100u64, ("cb".to_string(), Some(0x91100u64)));
        (old, retired, entries)
    }

    #[test]
    fn the_interest_passes_every_value_the_classifier_knows() {
        let (old, retired, entries) = small_retired();
        let guard = 0x5a5a_1234_dead_beefu64;
        let mut c = Classifier::new(&retired, &old, Cow::Owned(entries), None);
        c.pointer_guard = Some(guard);
        let interest = c.interest();
        // Around every bound, plain and mangled, and pseudo-random words.
        let mut vals: Vec<u64> = Vec::new();
        for b in [
            0x10000u64, 0x11000, 0x11100, 0x12000, 0x13f00, 0x13ff0, 0x14000,
        ] {
            for v in b.saturating_sub(9)..b + 9 {
                vals.extend([v, mangle(v, guard)]);
            }
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            vals.extend([seed, seed % 0x20000]);
        }
        let (mut known, mut passed) = (0, 0);
        for v in vals {
            let wanted = interest.wants(v);
            passed += usize::from(wanted);
            if c.classify(v).is_some() {
                known += 1;
                assert!(wanted, "{v:#x} is known but filtered out");
            }
        }
        assert!(known > 50, "{known}");
        // Most random words are not handed over.
        assert!(passed < 5_000, "{passed}");
    }

    #[test]
    fn values_into_the_retired_image_are_found_classified_and_remapped() {
        let (old, retired, entries) = small_retired();
        let mut c = Classifier::new(&retired, &old, Cow::Owned(entries), None);
        // A heap block: an entry, a mid-function address, a COPY object,
        // a string literal, writable data of no global, a heap pointer,
        // and (unaligned) an entry that must not be seen.
        let heap = 0x50000u64;
        let vals = [0x11100u64, 0x11104, 0x13f00, 0x10800, 0x13010, 0x50008];
        let mut bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        bytes.extend_from_slice(&[0u8; 4]);
        bytes.extend_from_slice(&0x11100u64.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 4]);
        let mem = ByteBuffer::with_region(RuntimeAddr(heap), bytes).expect("heap");
        let regions = [Region {
            range: heap..heap + 64,
            name: "[heap]".into(),
            retired: false,
        }];
        // A pending write turns the sixth slot into an entry too.
        let w = Write {
            addr: RuntimeAddr(heap + 40),
            bytes: 0x11100u64.to_le_bytes().to_vec(),
            what: "x".into(),
        };
        let r = sweep(&mem, &regions, &[&w], &c.interest(), &mut |v| c.classify(v));
        let got: Vec<(u64, &str)> = r
            .hits
            .iter()
            .map(|h| {
                (
                    h.addr - heap,
                    match &h.class {
                        Class::Remap { .. } => "remap",
                        Class::OtherCode { .. } => "code",
                        Class::Copy { .. } => "copy",
                        Class::ReadOnly => "ro",
                        Class::OldData { .. } => "data",
                        Class::PastEnd { .. } => "end",
                        Class::ImageEnd => "image end",
                        Class::HeapAlias { .. } => "heap alias",
                    },
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0, "remap"),
                (8, "code"),
                (16, "copy"),
                (24, "ro"),
                (32, "data"),
                (40, "remap")
            ]
        );
        assert_eq!(r.stale().count(), 2);
        assert_eq!(r.exceptions(), (1, 1, 0));
        let writes = r.writes();
        assert_eq!(writes.len(), 2);
        assert_eq!(writes[0].bytes, 0x91100u64.to_le_bytes().to_vec());
        assert_eq!(r.bytes_scanned, 64);
    }

    #[test]
    fn stacks_are_scanned_from_their_stack_pointer() {
        use crate::target::procfs::Perms;
        let m = MemoryMap {
            start: RuntimeAddr(0x7000),
            end: RuntimeAddr(0x9000),
            perms: Perms {
                read: true,
                write: true,
                exec: false,
                shared: false,
            },
            offset: upstare_dwarf::FileOffset(0),
            dev_major: 0,
            dev_minor: 0,
            inode: 0,
            path: MapPath::Pseudo("[stack]".into()),
            deleted: false,
        };
        let r = regions(&[m], &[0x8123], &Retired::default());
        assert_eq!(r[0].range, 0x8120..0x9000);
    }
}

/// Counts of one update's sweep, for the report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SweepSummary {
    pub bytes_scanned: u64,
    /// Not scanned (over [`MAX_SWEEP_BYTES`]); the update says so.
    pub bytes_not_scanned: u64,
    /// Bytes of shared writable mappings not swept ([`shared_regions`]);
    /// the update says so.
    pub shared_bytes_unswept: u64,
    /// Untyped values remapped to a function of NEW.
    pub remapped_functions: usize,
    /// Untyped values remapped to a global of NEW.
    pub remapped_globals: usize,
    /// Stale values left (reported by location; `--strict` refuses).
    pub stale: usize,
    /// Deliberate exceptions: values into OLD's COPY-relocated objects.
    pub copy_exceptions: usize,
    /// Deliberate exceptions: values into OLD's read-only data.
    pub readonly_exceptions: usize,
    /// Deliberate exceptions: the end of the old image (`l_map_end`).
    pub image_end_exceptions: usize,
    /// Values stored inside the retired image's own data (only old code
    /// reads them).
    pub inside_retired: usize,
    /// Untyped values (integers, unions, raw bytes) pointing at the start
    /// of a moved heap object: redirected, and reported.
    pub heap_aliases_redirected: usize,
    /// Untyped values pointing inside a heap object that moved or changed
    /// layout: reported, left unchanged.
    pub heap_aliases_left: usize,
    /// Epoll registrations whose user data (kept by the kernel) was
    /// pointed at NEW.
    pub epoll_remapped: usize,
    /// The retired image, for an audit sweep after the update.
    pub retired: Retired,
}

impl SweepSummary {
    /// The counts of `r`.
    pub fn of(r: &SweepResult, retired: &Retired) -> SweepSummary {
        let live = || r.hits.iter().filter(|h| !h.in_retired);
        let (copy_exceptions, readonly_exceptions, image_end_exceptions) = r.exceptions();
        SweepSummary {
            bytes_scanned: r.bytes_scanned,
            bytes_not_scanned: r.bytes_not_scanned,
            shared_bytes_unswept: r.shared_unswept.iter().map(|(_, n)| *n).sum(),
            remapped_functions: r
                .hits
                .iter()
                .filter(|h| matches!(&h.class, Class::Remap { what, .. } if what.starts_with("function ")))
                .count(),
            remapped_globals: live()
                .filter(|h| matches!(&h.class, Class::Remap { what, .. } if what.starts_with("global ")))
                .count(),
            stale: r.stale().count(),
            copy_exceptions,
            readonly_exceptions,
            image_end_exceptions,
            inside_retired: r.hits.iter().filter(|h| h.in_retired).count(),
            heap_aliases_redirected: r
                .heap_aliases()
                .filter(|h| matches!(h.class, Class::HeapAlias { new: Some(_), .. }))
                .count(),
            heap_aliases_left: r
                .heap_aliases()
                .filter(|h| matches!(h.class, Class::HeapAlias { new: None, .. }))
                .count(),
            epoll_remapped: r.epoll_remaps.len(),
            retired: retired.clone(),
        }
    }
}

/// The sweep of one update: everything the process will hold once `pending`
/// is written, with `rsps` the threads' new stack pointers, and the
/// registers of the threads left in library code (`kept_regs`: a callback's
/// return into `qsort` keeps the comparator and the array in registers),
/// remapped in place. `old_elf` is OLD's file (for its COPY relocations);
/// `files` what the two files say, worked out before the stop. Values pointing into the heap objects of
/// changed type (`heap_moves`) are found too, except inside the old blocks
/// of moved objects (freed after the update) and the retired image.
#[allow(clippy::too_many_arguments)]
pub fn sweep_update<'a>(
    mem: &impl TargetMemory,
    maps: &[MemoryMap],
    rsps: &[u64],
    old: &'a Image,
    new: &Image,
    remap: &mut Remapper<'a>,
    pending: &[&Write],
    old_elf: &[u8],
    files: &SweepFiles,
    heap_moves: &[HeapMove],
    kept_regs: &mut [(Pid, &mut Regs)],
    pointer_guard: Option<u64>,
    epoll: &[(EpollRegistration, bool)],
    timers: &[(i64, u64)],
) -> (SweepResult, Retired) {
    let retired = Retired::new(old, maps, old_elf);
    let regions = regions(maps, rsps, &retired);
    let (shared, unswept) = shared_regions(maps);
    let aliases = HeapAliases::new(heap_moves);
    let mut r = {
        let mut c = Classifier::new(&retired, old, Cow::Borrowed(&files.entries), Some(remap));
        c.new_bias = new.bias;
        c.same_code = files
            .same_code
            .iter()
            .filter_map(|(r, to, name)| {
                let start = old.runtime(LinkAddr(r.start)).0;
                Some((
                    start..start.checked_add(r.end - r.start)?,
                    new.runtime(LinkAddr(*to)).0,
                    name.clone(),
                ))
            })
            .collect();
        c.got = files
            .got
            .iter()
            .map(|(at, (name, to))| {
                let to = to.map(|to| new.runtime(LinkAddr(to)).0);
                (old.runtime(LinkAddr(*at)).0, (name.clone(), to))
            })
            .collect();
        c.pointer_guard = pointer_guard;
        c.dso_handle = files
            .dso_handle
            .map(|(o, n)| (old.runtime(LinkAddr(o)).0, new.runtime(LinkAddr(n)).0));
        c.setjmp_returns = files
            .setjmp_returns
            .iter()
            .map(|(at, (what, to))| {
                let to = to.map(|to| new.runtime(LinkAddr(to)).0);
                (old.runtime(LinkAddr(*at)).0, (what.clone(), to))
            })
            .collect();
        let mut interest = c.interest();
        interest.add(aliases.span.clone());
        let mut r = sweep(mem, &regions, pending, &interest, &mut |v| {
            aliases.classify(v).or_else(|| c.classify(v))
        });
        for (tid, regs) in kept_regs.iter_mut() {
            sweep_registers(*tid, regs, &mut r, &mut |v| {
                aliases.classify(v).or_else(|| c.classify(v))
            });
        }
        sweep_epoll(epoll, &mut r, &mut |v| {
            aliases.classify(v).or_else(|| c.classify(v))
        });
        sweep_timers(timers, &mut r, &mut |v| {
            aliases.classify(v).or_else(|| c.classify(v))
        });
        // Shared memory: found, never remapped (see `shared_regions`).
        let s = sweep(mem, &shared, pending, &interest, &mut |v| {
            aliases.classify(v).or_else(|| c.classify(v))
        });
        r.bytes_scanned = r.bytes_scanned.saturating_add(s.bytes_scanned);
        r.unreadable.extend(s.unreadable);
        for mut h in s.hits {
            let what = match &h.class {
                Class::Remap { what, .. } => Some(what.clone()),
                Class::HeapAlias { ty, offset, .. } => Some(format!("{ty}+{offset}")),
                _ => None,
            };
            if let Some(what) = what {
                h.class = Class::OldData {
                    what: format!("{what}, in memory shared with other processes: not remapped"),
                };
            }
            r.keep(h);
        }
        r
    };
    r.hits.retain(|h| {
        !matches!(h.class, Class::HeapAlias { .. })
            || !(h.in_retired || aliases.in_moved_block(h.addr))
    });
    r.shared_unswept = unswept;
    (r, retired)
}

/// What [`sweep_update`] needs from OLD's and NEW's files alone, in
/// link-time addresses: worked out before the process is paused, because
/// parsing both symbol tables and comparing every function's bytes takes
/// milliseconds for a program of a few thousand functions.
#[derive(Clone, Debug, Default)]
pub struct SweepFiles {
    /// [`entry_map`]: NEW's entries link-time.
    entries: HashMap<u64, (String, Option<u64>)>,
    /// [`identical_code`] of the two files.
    same_code: Vec<(Range<u64>, u64, String)>,
    /// [`got_slots`] of the two files, link-time.
    got: HashMap<u64, (String, Option<u64>)>,
    /// [`setjmp_returns`], link-time.
    setjmp_returns: HashMap<u64, (String, Option<u64>)>,
    /// `__dso_handle` of OLD and of NEW, link-time ([`dso_handles`]).
    dso_handle: Option<(u64, u64)>,
}

impl SweepFiles {
    /// From the contents of OLD's and NEW's files, the plan, the running
    /// image and NEW's tables.
    pub fn new(
        old_elf: &[u8],
        new_elf: &[u8],
        plan: &upstare_patcher::UpdatePlan,
        old: &Image,
        new_tables: &FrameTables,
    ) -> SweepFiles {
        SweepFiles {
            entries: entry_map(
                plan,
                old,
                new_tables,
                &function_symbols(old_elf),
                &function_symbols(new_elf),
            ),
            same_code: identical_code(old_elf, new_elf),
            got: got_slots(old_elf, new_elf),
            setjmp_returns: setjmp_returns(plan, &old.tables, new_tables),
            dso_handle: dso_handles(old_elf, new_elf),
        }
    }
}

/// Remap the general registers of thread `tid` (left as they are in
/// library code) that `classify` sends to NEW; the other values it knows
/// are kept as hits named by the register (at address 0: never written).
fn sweep_registers(
    tid: Pid,
    regs: &mut Regs,
    out: &mut SweepResult,
    classify: &mut dyn FnMut(u64) -> Option<Class>,
) {
    for reg in Reg::ALL {
        if matches!(reg, Reg::Rip | Reg::Rsp) {
            continue;
        }
        let value = regs.get(reg);
        match classify(value) {
            None => {}
            Some(Class::Remap { new, .. }) | Some(Class::HeapAlias { new: Some(new), .. }) => {
                regs.set(reg, new)
            }
            Some(class) => out.keep_outside(format!("thread {tid} register {reg}"), value, class),
        }
    }
}

/// `EPOLLEXCLUSIVE`: a registration made with it cannot be modified.
const EPOLLEXCLUSIVE: u32 = 1 << 28;

/// The user data of each epoll registration (`(registration, whether its
/// descriptor still names the registered file)`): what `classify` sends to
/// NEW is kept in `out.epoll_remaps` when the registration can be modified
/// in place; the other values it knows are hits named by the
/// registration (at address 0: never written), stale when they cannot be
/// remapped.
fn sweep_epoll(
    registrations: &[(EpollRegistration, bool)],
    out: &mut SweepResult,
    classify: &mut dyn FnMut(u64) -> Option<Class>,
) {
    for (reg, current) in registrations {
        let Some(class) = classify(reg.data) else {
            continue;
        };
        let location = format!(
            "epoll descriptor {}, registration of descriptor {}",
            reg.epfd, reg.tfd
        );
        let new = match &class {
            Class::Remap { new, .. } | Class::HeapAlias { new: Some(new), .. } => Some(*new),
            _ => None,
        };
        let class = match new {
            Some(new) if *current && reg.events & EPOLLEXCLUSIVE == 0 => {
                out.epoll_remaps.push((reg.clone(), new));
                continue;
            }
            Some(_) => Class::OldData {
                what: if *current {
                    "epoll user data registered with EPOLLEXCLUSIVE, which cannot be modified"
                        .to_string()
                } else {
                    "epoll user data of a descriptor that now names another file: it cannot be modified".to_string()
                },
            },
            None => class,
        };
        out.keep_outside(location, reg.data, class);
    }
}

/// The signal value of each POSIX timer (`(id, sigev_value)`): the kernel
/// keeps it and nothing can change it (`timer_settime` keeps the value),
/// so one pointing into the old image is a stale hit even where NEW has a
/// place for it, named by the timer.
fn sweep_timers(
    timers: &[(i64, u64)],
    out: &mut SweepResult,
    classify: &mut dyn FnMut(u64) -> Option<Class>,
) {
    for &(id, value) in timers {
        let Some(class) = classify(value) else {
            continue;
        };
        let class = match class {
            Class::Remap { what, .. } => Class::OldData {
                what: format!(
                    "{what}, as the signal value of a POSIX timer, which the kernel keeps and no call can change"
                ),
            },
            Class::HeapAlias { ty, offset, .. } => Class::OldData {
                what: format!(
                    "{ty}+{offset}, as the signal value of a POSIX timer, which the kernel keeps and no call can change"
                ),
            },
            other => other,
        };
        out.keep_outside(format!("POSIX timer {id} (sigev_value)"), value, class);
    }
}

/// The audit sweep of a process after an update: every value of live
/// memory still pointing into `retired` (whose tables are `old`'s), with no
/// remapping; `rsps` are the threads' stack pointers. With the process's
/// `pointer_guard`, mangled values (a `jmp_buf`'s saved pc) are seen too.
pub fn audit(
    mem: &impl TargetMemory,
    maps: &[MemoryMap],
    rsps: &[u64],
    old: &Image,
    retired: &Retired,
    pointer_guard: Option<u64>,
) -> SweepResult {
    // Entries are known (so they are named) but go nowhere: any left is
    // stale.
    let entries = old
        .tables
        .functions
        .iter()
        .map(|f| (old.runtime(f.low).0, (f.name.clone(), None)))
        .collect();
    let regions = regions(maps, rsps, retired);
    let mut c = Classifier::new(retired, old, Cow::Owned(entries), None);
    c.pointer_guard = pointer_guard;
    let interest = c.interest();
    sweep(mem, &regions, &[], &interest, &mut |v| c.classify(v))
}
