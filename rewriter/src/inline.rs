//! `upstare-rewrite --inline-points`: update points as detours to
//! trampolines that test one flag byte, so that arming a process is one
//! write however many points it has.
//!
//! The output ELF is the input with:
//! - at each detoured point, a `jmp rel32` to its trampoline over the
//!   point's first instructions (the rest of the displaced bytes `int3`,
//!   never reached: nothing arrives inside them, see
//!   [`crate::analysis::PointDetour`]);
//! - a new read+execute `PT_LOAD` at the end of the file holding a copy of
//!   the program header table (which no longer fits where it was) and the
//!   trampolines;
//! - a new read+write `PT_LOAD` holding the flag byte (zero in the file);
//! - `e_phoff`/`e_phnum` and `PT_PHDR` pointing at the new table.
//!
//! The new segments follow the image's last page in memory (it stays one
//! contiguous range) and everything else in the file. The kernel finds the
//! moved program header table by the segment that holds `e_phoff` (Linux
//! 5.18 and later; older kernels computed `AT_PHDR` from the first
//! segment and would give the dynamic linker a wrong address). Each trampoline (see [`upstare_dwarf::fdt::InlinePoints`]):
//! ```text
//!   T:     cmp byte [rip + flag], 0     80 3d rel32 00
//!          je  T+10                     74 01
//!   T+9:   int3                         cc
//!   T+10:  displaced instructions, relocated (iced-x86 BlockEncoder)
//!          jmp point + displaced        e9 rel32
//! ```

use crate::analysis::{KeptInt3, PointDetour};
use iced_x86::{BlockEncoder, BlockEncoderOptions, InstructionBlock};
use upstare_dwarf::fdt::{Detour, InlinePoints};
use upstare_dwarf::LinkAddr;

const PAGE: u64 = 0x1000;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PT_PHDR: u32 = 6;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;
/// Offset of the `int3` in a trampoline.
const TRAP_AT: u64 = 9;
/// Trampolines start on this alignment.
const TRAMPOLINE_ALIGN: u64 = 16;

/// Why a binary cannot carry trampolines.
#[derive(Debug, thiserror::Error)]
pub enum InlineError {
    #[error("--inline-points: not a little-endian ELF64 file")]
    NotElf64,
    #[error("--inline-points: program header table outside the file")]
    BadPhdrs,
    #[error("--inline-points: no PT_PHDR program header (the program header table cannot move)")]
    NoPhdrHeader,
    #[error("--inline-points: no PT_LOAD segment")]
    NoLoad,
    #[error("--inline-points: update point {0} lies in no PT_LOAD segment's file bytes")]
    PointNotInFile(LinkAddr),
    #[error("--inline-points: address arithmetic overflows")]
    Overflow,
    #[error("trampoline of the update point at {0} cannot be read back into the original code")]
    Unreadable(LinkAddr),
}

/// A point that keeps `int3` arming, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeptPoint {
    pub function: String,
    pub point: LinkAddr,
    pub reason: KeptInt3,
}

/// The rewritten ELF (tables not attached yet) and what the tables say.
pub struct WithTrampolines {
    pub elf: Vec<u8>,
    pub inline: InlinePoints,
    /// Points left to `int3`, in address order.
    pub kept: Vec<KeptPoint>,
}

/// One program header.
#[derive(Clone, Copy)]
struct Phdr {
    p_type: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

impl Phdr {
    fn parse(b: &[u8]) -> Phdr {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(w)
        };
        Phdr {
            p_type: u32_at(0),
            flags: u32_at(4),
            offset: u64_at(8),
            vaddr: u64_at(16),
            filesz: u64_at(32),
            memsz: u64_at(40),
            align: u64_at(48),
        }
    }
    fn load(flags: u32, offset: u64, vaddr: u64, size: u64) -> Phdr {
        Phdr {
            p_type: PT_LOAD,
            flags,
            offset,
            vaddr,
            filesz: size,
            memsz: size,
            align: PAGE,
        }
    }
    fn bytes(&self) -> [u8; PHDR_SIZE] {
        let mut b = [0u8; PHDR_SIZE];
        b[0..4].copy_from_slice(&self.p_type.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_le_bytes());
        b[24..32].copy_from_slice(&self.vaddr.to_le_bytes());
        b[32..40].copy_from_slice(&self.filesz.to_le_bytes());
        b[40..48].copy_from_slice(&self.memsz.to_le_bytes());
        b[48..56].copy_from_slice(&self.align.to_le_bytes());
        b
    }
    /// File offset of link address `a`, if it is among the file bytes.
    fn file_offset(&self, a: u64) -> Option<u64> {
        let rel = a.checked_sub(self.vaddr)?;
        (self.p_type == PT_LOAD && rel < self.filesz).then(|| self.offset + rel)
    }
}

fn page_up(x: u64) -> Option<u64> {
    x.checked_add(PAGE - 1).map(|v| v & !(PAGE - 1))
}

fn rel32(from_next: u64, to: u64) -> Option<i32> {
    i32::try_from(to.wrapping_sub(from_next) as i64).ok()
}

/// Encodes the trampoline of `d` at `at`, `flag` the flag byte's address;
/// `None` when it cannot be encoded or reached.
fn trampoline(d: &PointDetour, at: u64, flag: u64) -> Result<Vec<u8>, KeptInt3> {
    let fail = |reason: String| KeptInt3::Encoding { reason };
    let insns = d.displaced.as_ref().map_err(Clone::clone)?;
    let len = d
        .displaced_len()
        .ok_or_else(|| fail("no displaced code".into()))?;
    let mut code = Vec::with_capacity(32);
    let flag_rel = rel32(at + 7, flag).ok_or_else(|| fail("flag out of reach".into()))?;
    code.extend_from_slice(&[0x80, 0x3d]);
    code.extend_from_slice(&flag_rel.to_le_bytes());
    code.push(0);
    code.extend_from_slice(&[0x74, 0x01, 0xcc]);
    let resume = at + TRAP_AT + 1;
    let block = InstructionBlock::new(insns, resume);
    let moved = BlockEncoder::encode(64, block, BlockEncoderOptions::NONE)
        .map_err(|e| fail(e.to_string()))?;
    code.extend_from_slice(&moved.code_buffer);
    let jmp_at = at + code.len() as u64;
    let back = rel32(jmp_at + 5, d.point.0 + len)
        .ok_or_else(|| fail("return jump out of reach".into()))?;
    code.push(0xe9);
    code.extend_from_slice(&back.to_le_bytes());
    Ok(code)
}

/// The program header table of an ELF64 file.
fn program_headers(elf: &[u8]) -> Result<Vec<Phdr>, InlineError> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err(InlineError::NotElf64);
    }
    let mut off = [0u8; 8];
    off.copy_from_slice(&elf[0x20..0x28]);
    let phoff = u64::from_le_bytes(off);
    let phentsize = u16::from_le_bytes([elf[0x36], elf[0x37]]);
    let phnum = u16::from_le_bytes([elf[0x38], elf[0x39]]);
    if usize::from(phentsize) != PHDR_SIZE {
        return Err(InlineError::BadPhdrs);
    }
    let table = usize::try_from(phoff)
        .ok()
        .and_then(|o| elf.get(o..o.checked_add(usize::from(phnum) * PHDR_SIZE)?))
        .ok_or(InlineError::BadPhdrs)?;
    Ok(table.chunks_exact(PHDR_SIZE).map(Phdr::parse).collect())
}

/// The file bytes at link addresses `[a, a + len)`, in one segment.
fn file_range(phdrs: &[Phdr], a: u64, len: u64) -> Option<std::ops::Range<usize>> {
    let last = a.checked_add(len.checked_sub(1)?)?;
    let (start, _) = phdrs
        .iter()
        .find_map(|p| p.file_offset(a).zip(p.file_offset(last)))?;
    let start = usize::try_from(start).ok()?;
    Some(start..start.checked_add(usize::try_from(len).ok()?)?)
}

/// Most instructions a trampoline relocates (each at least one byte of
/// an at most 255-byte displacement).
const MAX_DISPLACED_INSNS: usize = 255;

/// `elf` (rewritten with `--inline-points`, described by `inline`) with
/// each detoured point's original instructions back in place, read from
/// its trampoline and encoded again at the point: the code the analysis
/// saw (for `--dump --notes` on an instrumented binary). Refused when an
/// instruction does not come back to the displaced length.
pub fn restore_original(elf: &[u8], inline: &InlinePoints) -> Result<Vec<u8>, InlineError> {
    use iced_x86::{Decoder, DecoderOptions, FlowControl};
    let phdrs = program_headers(elf)?;
    let mut out = elf.to_vec();
    for d in &inline.detours {
        let bad = || InlineError::Unreadable(d.point);
        let resume = d.trap.0.checked_add(1).ok_or_else(bad)?;
        let back = d.point.0 + u64::from(d.displaced);
        // The relocated instructions and the jmp back fit in this bound.
        let window = (inline.trampolines.1 .0.saturating_sub(resume)).min(4 * 255 + 5);
        let bytes = file_range(&phdrs, resume, window)
            .and_then(|r| elf.get(r))
            .ok_or_else(bad)?;
        let mut dec = Decoder::with_ip(64, bytes, resume, DecoderOptions::NONE);
        let mut insns = Vec::new();
        loop {
            if !dec.can_decode() || insns.len() > MAX_DISPLACED_INSNS {
                return Err(bad());
            }
            let ins = dec.decode();
            if ins.flow_control() == FlowControl::UnconditionalBranch
                && ins.near_branch_target() == back
            {
                break;
            }
            if ins.is_invalid() || ins.flow_control() != FlowControl::Next {
                return Err(bad());
            }
            insns.push(ins);
        }
        let block = InstructionBlock::new(&insns, d.point.0);
        let code = BlockEncoder::encode(64, block, BlockEncoderOptions::NONE)
            .map_err(|_| bad())?
            .code_buffer;
        let range = file_range(&phdrs, d.point.0, u64::from(d.displaced)).ok_or_else(bad)?;
        let dest = out.get_mut(range).ok_or_else(bad)?;
        if code.len() != dest.len() {
            return Err(bad());
        }
        dest.copy_from_slice(&code);
    }
    Ok(out)
}

/// Writes a trampoline for every detour of `points` (per function name)
/// into `input`; a point whose detour is refused keeps `int3` and is
/// listed with its reason.
pub fn add_trampolines(
    input: &[u8],
    points: &[(String, PointDetour)],
) -> Result<WithTrampolines, InlineError> {
    let phdrs = program_headers(input)?;
    let phnum = u16::try_from(phdrs.len()).map_err(|_| InlineError::BadPhdrs)?;
    if !phdrs.iter().any(|p| p.p_type == PT_PHDR) {
        return Err(InlineError::NoPhdrHeader);
    }
    let loads: Vec<&Phdr> = phdrs.iter().filter(|p| p.p_type == PT_LOAD).collect();
    let top = loads
        .iter()
        .map(|p| p.vaddr.checked_add(p.memsz).and_then(page_up))
        .collect::<Option<Vec<u64>>>()
        .and_then(|v| v.into_iter().max())
        .ok_or(InlineError::Overflow)?;

    // The executable segment: the program header table, then trampolines,
    // at the page after the image's last byte and the flag's page right
    // after it, so the image stays contiguous (the dynamic linker records
    // a non-contiguous main program segment by segment, in places an
    // update cannot follow); in the file, after everything.
    let new_phnum = usize::from(phnum) + 2;
    let offset = page_up(input.len() as u64).ok_or(InlineError::Overflow)?;
    let exec_vaddr = top;
    let tramp_start =
        (exec_vaddr + (new_phnum * PHDR_SIZE) as u64).next_multiple_of(TRAMPOLINE_ALIGN);
    // Trampolines are at most 7+3+displaced*4+5 bytes: an upper bound on
    // the segment's size places the flag page before encoding.
    let bound: u64 = points
        .iter()
        .filter_map(|(_, d)| d.displaced_len())
        .map(|l| (15 + 4 * l + 8).next_multiple_of(TRAMPOLINE_ALIGN))
        .sum();
    let flag_vaddr = page_up(tramp_start + bound + 1).ok_or(InlineError::Overflow)?;

    let mut out = input.to_vec();
    let mut tramp = Vec::new();
    let mut detours = Vec::new();
    let mut kept = Vec::new();
    let mut sorted: Vec<&(String, PointDetour)> = points.iter().collect();
    sorted.sort_by_key(|(_, d)| d.point);
    // A loop's point can be its function's entry point too: one detour.
    sorted.dedup_by_key(|(_, d)| d.point);
    for (function, d) in sorted {
        let at = tramp_start + tramp.len() as u64;
        let encoded = trampoline(d, at, flag_vaddr).and_then(|code| {
            let jmp = rel32(d.point.0 + 5, at).ok_or_else(|| KeptInt3::Encoding {
                reason: "trampoline out of jmp rel32 reach".into(),
            })?;
            Ok((code, jmp))
        });
        let (code, jmp) = match encoded {
            Ok(x) => x,
            Err(reason) => {
                kept.push(KeptPoint {
                    function: function.clone(),
                    point: d.point,
                    reason,
                });
                continue;
            }
        };
        let len = d.displaced_len().unwrap_or(0);
        // The whole displaced range in one segment's file bytes.
        let range =
            file_range(&phdrs, d.point.0, len).ok_or(InlineError::PointNotInFile(d.point))?;
        let patch = out
            .get_mut(range)
            .ok_or(InlineError::PointNotInFile(d.point))?;
        patch.fill(0xcc);
        patch[0] = 0xe9;
        patch[1..5].copy_from_slice(&jmp.to_le_bytes());
        detours.push(Detour {
            point: d.point,
            trap: LinkAddr(at + TRAP_AT),
            displaced: u8::try_from(len).map_err(|_| InlineError::Overflow)?,
        });
        tramp.extend_from_slice(&code);
        while !(tramp.len() as u64).is_multiple_of(TRAMPOLINE_ALIGN) {
            tramp.push(0xcc);
        }
    }
    let tramp_end = tramp_start + tramp.len() as u64;
    debug_assert!(tramp_end < flag_vaddr);

    // New program headers: PT_PHDR at the new table, the two segments
    // after the last PT_LOAD (PT_LOADs stay sorted by address).
    let exec_size = tramp_end - exec_vaddr;
    // The flag's page right after the executable one, in file and memory.
    let flag_offset = offset + (flag_vaddr - exec_vaddr);
    let mut new_phdrs: Vec<Phdr> = Vec::with_capacity(new_phnum);
    let last_load = phdrs
        .iter()
        .rposition(|p| p.p_type == PT_LOAD)
        .ok_or(InlineError::NoLoad)?;
    for (i, p) in phdrs.iter().enumerate() {
        let mut p = *p;
        if p.p_type == PT_PHDR {
            p.offset = offset;
            p.vaddr = exec_vaddr;
            p.filesz = (new_phnum * PHDR_SIZE) as u64;
            p.memsz = p.filesz;
        }
        new_phdrs.push(p);
        if i == last_load {
            new_phdrs.push(Phdr::load(PF_R | PF_X, offset, exec_vaddr, exec_size));
            new_phdrs.push(Phdr::load(PF_R | PF_W, flag_offset, flag_vaddr, 8));
        }
    }
    let offset_usize = usize::try_from(offset).map_err(|_| InlineError::Overflow)?;
    out.resize(offset_usize, 0);
    for p in &new_phdrs {
        out.extend_from_slice(&p.bytes());
    }
    let tramp_file =
        usize::try_from(offset + (tramp_start - exec_vaddr)).map_err(|_| InlineError::Overflow)?;
    out.resize(tramp_file, 0xcc);
    out.extend_from_slice(&tramp);
    let flag_file = usize::try_from(flag_offset).map_err(|_| InlineError::Overflow)?;
    out.resize(flag_file + 8, 0);
    out[0x20..0x28].copy_from_slice(&offset.to_le_bytes());
    let phnum = u16::try_from(new_phnum).map_err(|_| InlineError::BadPhdrs)?;
    out[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
    Ok(WithTrampolines {
        elf: out,
        inline: InlinePoints {
            flag: LinkAddr(flag_vaddr),
            trampolines: (LinkAddr(tramp_start), LinkAddr(tramp_end)),
            detours,
        },
        kept,
    })
}
