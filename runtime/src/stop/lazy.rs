//! Arming only the update points a thread can reach next (`int3` mode), so
//! that stopping does not grow with the program's size.
//!
//! A running thread reaches an update point of a function it is in (a
//! loop's point), of a function it calls (the entry point), or, once its
//! function returns, of a caller. So the points first armed are those of
//! every function active in some thread (the function at its pc and every
//! function whose call's return address lies on its stack), and the entry
//! points of what those functions call directly or may call through a
//! pointer (every function whose address the program takes: signal
//! handlers, thread start routines, callbacks). Return addresses are
//! recognised by the tables' call sites, and a stale one on a stack only
//! arms more.
//!
//! What this cannot see (a function pointer computed at run time, a frame
//! deeper than the stack scanned) costs time, never correctness: threads
//! still running after [`ESCALATE_AFTER`] get every point armed.

use crate::engine::state::Image;
use iced_x86::{Decoder, DecoderOptions, Instruction, OpKind};
use object::{Object, ObjectSection, ObjectSymbol, SectionKind};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Range;
use std::time::Duration;
use upstare_dwarf::fdt::{Callee, PointKind};
use upstare_dwarf::{LinkAddr, RuntimeAddr};

/// How long threads run with the first points before every point is armed.
pub const ESCALATE_AFTER: Duration = Duration::from_millis(2);
/// Programs with fewer `int3` points than this get them all at once: the
/// saving would be microseconds.
pub const LAZY_FROM_POINTS: usize = 512;
/// Bytes of each thread's stack scanned for return addresses, from its
/// stack pointer up.
pub const STACK_SCAN_BYTES: u64 = 256 << 10;

/// Fault injection for tests: with `UPSTARE_TEST_LAZY_FIRST=none` in the
/// environment, the first arming arms no point, so that only the arming of
/// every point after [`ESCALATE_AFTER`] can stop a running thread.
pub fn first_points_withheld() -> bool {
    std::env::var_os("UPSTARE_TEST_LAZY_FIRST").is_some_and(|v| v == "none")
}

/// One function of the tables, as arming it needs.
#[derive(Clone, Debug, Default)]
struct FunctionPoints {
    /// Its `int3` points: indices into [`LazyArming::points`].
    points: Range<usize>,
    /// Its entry point's index, if armed with `int3`.
    entry: Option<usize>,
    /// The functions it calls directly (indices into the tables).
    callees: Vec<usize>,
}

/// What lazy arming needs from an image, made before the pause.
#[derive(Clone, Debug, Default)]
pub struct LazyArming {
    /// Every `int3` point of the image, by function.
    points: Vec<RuntimeAddr>,
    functions: Vec<FunctionPoints>,
    /// Function ranges (runtime), sorted, with their index.
    ranges: Vec<(u64, u64, usize)>,
    /// Return addresses of the image's calls (runtime) → calling function.
    return_sites: HashMap<u64, usize>,
    /// Functions whose address the program takes (indices).
    address_taken: Vec<usize>,
}

impl LazyArming {
    /// The arming of `image`'s update points armed with `int3` (`is_int3`
    /// says which), with the functions whose address the program takes
    /// found in its file `elf`.
    pub fn new(image: &Image, elf: &[u8], is_int3: impl Fn(LinkAddr) -> bool) -> LazyArming {
        let tables = &image.tables;
        let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, f) in tables.functions.iter().enumerate() {
            by_name.entry(f.name.as_str()).or_default().push(i);
        }
        let mut points = Vec::new();
        let mut functions = Vec::with_capacity(tables.functions.len());
        let mut return_sites = HashMap::new();
        let mut ranges = Vec::with_capacity(tables.functions.len());
        for (i, f) in tables.functions.iter().enumerate() {
            let start = points.len();
            let mut entry = None;
            for p in f.update_points.iter().filter(|p| is_int3(p.addr)) {
                if p.kind == PointKind::Entry {
                    entry = Some(points.len());
                }
                points.push(image.runtime(p.addr));
            }
            let mut callees: Vec<usize> = f
                .call_sites
                .iter()
                .filter_map(|c| match &c.callee {
                    // Homonyms (static functions of other files): all.
                    Callee::Direct(name) => by_name.get(name.as_str()),
                    _ => None,
                })
                .flatten()
                .copied()
                .collect();
            callees.sort_unstable();
            callees.dedup();
            for c in &f.call_sites {
                return_sites.insert(image.runtime(c.return_addr).0, i);
            }
            ranges.push((image.runtime(f.low).0, image.runtime(f.high).0, i));
            functions.push(FunctionPoints {
                points: start..points.len(),
                entry,
                callees,
            });
        }
        ranges.sort_unstable();
        let entries: HashMap<u64, usize> = tables
            .functions
            .iter()
            .enumerate()
            .map(|(i, f)| (f.low.0, i))
            .collect();
        let address_taken = address_taken(elf, &entries).into_iter().collect();
        LazyArming {
            points,
            functions,
            ranges,
            return_sites,
            address_taken,
        }
    }

    /// The function whose code holds `pc`.
    pub fn function_at(&self, pc: RuntimeAddr) -> Option<usize> {
        let i = self.ranges.partition_point(|r| r.0 <= pc.0);
        let &(_, high, f) = self.ranges.get(i.checked_sub(1)?)?;
        (pc.0 < high).then_some(f)
    }

    /// The function a return address found on a stack returns into, if it
    /// is the return address of one of the image's calls.
    pub fn returns_into(&self, word: u64) -> Option<usize> {
        self.return_sites.get(&word).copied()
    }

    /// The points to arm first for threads in the functions `active`: all
    /// of theirs, and the entry points of what they call directly and of
    /// every function whose address is taken.
    pub fn first(&self, active: &BTreeSet<usize>) -> Vec<RuntimeAddr> {
        let mut picked: BTreeSet<usize> = BTreeSet::new();
        let entry_of = |f: usize, picked: &mut BTreeSet<usize>| {
            if let Some(e) = self.functions.get(f).and_then(|f| f.entry) {
                picked.insert(e);
            }
        };
        for &f in active {
            let Some(fp) = self.functions.get(f) else {
                continue;
            };
            picked.extend(fp.points.clone());
            for &c in &fp.callees {
                entry_of(c, &mut picked);
            }
        }
        for &f in &self.address_taken {
            entry_of(f, &mut picked);
        }
        picked.into_iter().map(|i| self.points[i]).collect()
    }
}

/// The functions (indices of `entries`: link-time entry → index) whose
/// address the ELF file `elf` takes: named by a relocation or a dynamic
/// symbol, stored in its data, or formed in its code by a rip-relative
/// displacement (`lea`) or, in a position-dependent file, an immediate,
/// other than as a direct call's or jump's target. A superset (a word of
/// data that happens to equal an entry counts): a false match arms one
/// more entry point. An unreadable file gives every function.
pub fn address_taken(elf: &[u8], entries: &HashMap<u64, usize>) -> BTreeSet<usize> {
    let Ok(file) = object::File::parse(elf) else {
        return entries.values().copied().collect();
    };
    let mut found: HashSet<u64> = HashSet::new();
    let mut note = |v: u64| {
        if entries.contains_key(&v) {
            found.insert(v);
        }
    };
    // Relocations: a RELATIVE's addend, a symbol's value.
    if let Some(relocs) = file.dynamic_relocations() {
        for (_, r) in relocs {
            note(r.addend() as u64);
            if let object::RelocationTarget::Symbol(s) = r.target() {
                if let Ok(sym) = file.symbol_by_index(s) {
                    note(sym.address());
                }
            }
        }
    }
    for s in file.dynamic_symbols() {
        if s.is_definition() {
            note(s.address());
        }
    }
    let position_dependent =
        file.relative_address_base() == 0 && matches!(file.kind(), object::ObjectKind::Executable);
    for section in file.sections() {
        let Ok(bytes) = section.data() else {
            continue;
        };
        let base = section.address();
        match section.kind() {
            SectionKind::Text => {
                // Decoded (gcc puts no data in code): an address formed
                // rip-relative (`lea rdi, [rip + handler]`) or, in a
                // position-dependent file, as an immediate; branch targets
                // are no taken addresses.
                let mut decoder = Decoder::with_ip(64, bytes, base, DecoderOptions::NONE);
                let mut insn = Instruction::default();
                while decoder.can_decode() {
                    decoder.decode_out(&mut insn);
                    if insn.is_invalid()
                        || insn.is_call_near()
                        || insn.is_jmp_near()
                        || insn.is_jcc_short_or_near()
                        || insn.is_jmp_short()
                    {
                        continue;
                    }
                    if insn.is_ip_rel_memory_operand() {
                        note(insn.ip_rel_memory_address());
                    }
                    if position_dependent {
                        for i in 0..insn.op_count() {
                            if matches!(
                                insn.op_kind(i),
                                OpKind::Immediate32 | OpKind::Immediate32to64 | OpKind::Immediate64
                            ) {
                                note(insn.immediate(i));
                            }
                        }
                    }
                }
            }
            // Every other part loaded in memory (data, read-only data,
            // .init_array, the GOT): its 8-byte words.
            _ if allocated(&section) => {
                for w in bytes.chunks_exact(8) {
                    note(u64::from_le_bytes(w.try_into().unwrap_or([0; 8])));
                }
            }
            _ => {}
        }
    }
    found
        .iter()
        .filter_map(|v| entries.get(v).copied())
        .collect()
}

/// Whether `section` is loaded in memory (`SHF_ALLOC`) and has file bytes.
fn allocated(section: &object::Section<'_, '_>) -> bool {
    let alloc = match section.flags() {
        object::SectionFlags::Elf { sh_flags, .. } => sh_flags.0 & object::elf::SHF_ALLOC.0 != 0,
        _ => false,
    };
    alloc && section.kind() != SectionKind::UninitializedData
}
