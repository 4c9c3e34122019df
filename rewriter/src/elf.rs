//! Writing the instrumented ELF and reading its tables back.
//!
//! The instrumented binary is the original with one more section, `.upstare`,
//! that is not allocated (no SHF_ALLOC): the loader never maps it, so it costs
//! nothing at run time, and every original byte that is loaded stays at its
//! file offset and address, which keeps DWARF, CFI, line tables and jump
//! tables valid. After writing, the output is parsed again and every loaded
//! byte is compared with the input; a difference is an error, not a silent
//! corruption.

use object::{Object, ObjectSegment};
use upstare_dwarf::fdt::{FrameTables, SECTION_NAME};
use upstare_dwarf::section::SECTION_HEADER_FIELDS;
use upstare_dwarf::TablesError;

/// Why the tables could not be attached or found.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("not a readable ELF file: {0}")]
    Parse(String),
    #[error("input already carries a {SECTION_NAME} section (already instrumented)")]
    AlreadyInstrumented,
    #[error("cannot write the instrumented ELF: {0}")]
    Write(String),
    #[error("self-check failed: loaded segment at file offset {offset:#x} differs from the input")]
    SegmentChanged { offset: u64 },
}

/// Returns `input` with `section` added as a non-allocated `.upstare` section.
///
/// The section data, a new section-name table and a new section header table
/// are appended at the end of the file; only the ELF header's `e_shoff` and
/// `e_shnum` change. (`object::build::elf::Builder` was tried first: it
/// regenerates `.dynsym` and `.gnu.hash`, which moves loaded bytes.)
pub fn attach_tables(input: &[u8], section: &[u8]) -> Result<Vec<u8>, ElfError> {
    let in_file = object::File::parse(input).map_err(|e| ElfError::Parse(e.to_string()))?;
    if in_file.section_by_name(SECTION_NAME).is_some() {
        return Err(ElfError::AlreadyInstrumented);
    }
    let hdr = ElfHeader::parse(input)?;
    let shdrs_len = usize::from(hdr.shnum) * SHDR_SIZE;
    let shdrs = usize::try_from(hdr.shoff)
        .ok()
        .and_then(|o| input.get(o..o.checked_add(shdrs_len)?))
        .ok_or_else(|| ElfError::Parse("section header table lies outside the file".into()))?;
    let strndx = usize::from(hdr.shstrndx);
    let str_hdr = shdrs
        .get(strndx * SHDR_SIZE..(strndx + 1) * SHDR_SIZE)
        .ok_or_else(|| ElfError::Parse("e_shstrndx names no section".into()))?;
    let str_off = u64_at(str_hdr, 0x18);
    let str_size = u64_at(str_hdr, 0x20);
    let old_names = usize::try_from(str_off)
        .ok()
        .zip(usize::try_from(str_size).ok())
        .and_then(|(o, n)| input.get(o..o.checked_add(n)?))
        .ok_or_else(|| ElfError::Parse("section .shstrtab lies outside the file".into()))?;

    let mut out = input.to_vec();
    // New name table: the old names plus ours.
    let new_names_off = align(&mut out, 1);
    out.extend_from_slice(old_names);
    let name_index = old_names.len() as u32;
    out.extend_from_slice(SECTION_NAME.as_bytes());
    out.push(0);
    let new_names_size = (out.len() - new_names_off) as u64;
    let data_off = align(&mut out, 8);
    out.extend_from_slice(section);
    let new_shoff = align(&mut out, 8);
    out.extend_from_slice(shdrs);
    // Point the name-table header at the new copy.
    let str_at = new_shoff + strndx * SHDR_SIZE;
    out[str_at + 0x18..str_at + 0x20].copy_from_slice(&(new_names_off as u64).to_le_bytes());
    out[str_at + 0x20..str_at + 0x28].copy_from_slice(&new_names_size.to_le_bytes());
    let mut ours = [0u8; SHDR_SIZE];
    ours[0..4].copy_from_slice(&name_index.to_le_bytes());
    ours[4..8].copy_from_slice(&object::elf::SHT_PROGBITS.0.to_le_bytes());
    // sh_flags 0 (not SHF_ALLOC), sh_addr 0.
    ours[0x18..0x20].copy_from_slice(&(data_off as u64).to_le_bytes());
    ours[0x20..0x28].copy_from_slice(&(section.len() as u64).to_le_bytes());
    ours[0x30..0x38].copy_from_slice(&8u64.to_le_bytes());
    out.extend_from_slice(&ours);
    let shnum = hdr
        .shnum
        .checked_add(1)
        .filter(|n| *n < object::elf::SHN_LORESERVE)
        .ok_or_else(|| ElfError::Write("too many sections".into()))?;
    out[0x28..0x30].copy_from_slice(&(new_shoff as u64).to_le_bytes());
    out[0x3c..0x3e].copy_from_slice(&shnum.to_le_bytes());
    check_loaded_bytes_unchanged(&in_file, &out)?;
    Ok(out)
}

const SHDR_SIZE: usize = 64;

/// The ELF64 header fields describing the section header table.
struct ElfHeader {
    shoff: u64,
    shnum: u16,
    shstrndx: u16,
}

impl ElfHeader {
    fn parse(b: &[u8]) -> Result<ElfHeader, ElfError> {
        if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
            return Err(ElfError::Parse("not a little-endian ELF64 file".into()));
        }
        let shentsize = u16::from_le_bytes([b[0x3a], b[0x3b]]);
        let shnum = u16::from_le_bytes([b[0x3c], b[0x3d]]);
        let shstrndx = u16::from_le_bytes([b[0x3e], b[0x3f]]);
        if usize::from(shentsize) != SHDR_SIZE || shnum == 0 || shstrndx >= shnum {
            return Err(ElfError::Parse(format!(
                "unsupported section header table (e_shentsize {shentsize}, e_shnum {shnum}, e_shstrndx {shstrndx})"
            )));
        }
        Ok(ElfHeader {
            shoff: u64_at(b, 0x28),
            shnum,
            shstrndx,
        })
    }
}

/// Little-endian u64 at `off` of a slice the caller has bounds-checked.
fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(w)
}

/// Pads `out` to a multiple of `to` and returns the new length.
fn align(out: &mut Vec<u8>, to: usize) -> usize {
    while !out.len().is_multiple_of(to) {
        out.push(0);
    }
    out.len()
}

/// Every PT_LOAD segment's file bytes of `output` must equal those of `input`,
/// except the ELF header's section-header fields (e_shoff, e_shnum,
/// e_shstrndx), which the loader maps but never reads.
fn check_loaded_bytes_unchanged(input: &object::File<'_>, output: &[u8]) -> Result<(), ElfError> {
    let out_file = object::File::parse(output).map_err(|e| ElfError::Write(e.to_string()))?;
    let in_segs: Vec<_> = input.segments().collect();
    let out_segs: Vec<_> = out_file.segments().collect();
    if in_segs.len() != out_segs.len() {
        return Err(ElfError::Write(format!(
            "segment count changed from {} to {}",
            in_segs.len(),
            out_segs.len()
        )));
    }
    for (a, b) in in_segs.iter().zip(&out_segs) {
        let (off, _) = a.file_range();
        let same_place = a.address() == b.address() && a.file_range() == b.file_range();
        let (Ok(da), Ok(db)) = (a.data(), b.data()) else {
            return Err(ElfError::SegmentChanged { offset: off });
        };
        if !same_place || da.len() != db.len() {
            return Err(ElfError::SegmentChanged { offset: off });
        }
        let differs = da.iter().zip(db).enumerate().any(|(i, (x, y))| {
            let file_off = off + i as u64;
            x != y && !SECTION_HEADER_FIELDS.iter().any(|r| r.contains(&file_off))
        });
        if differs {
            return Err(ElfError::SegmentChanged { offset: off });
        }
    }
    Ok(())
}

/// Whether `elf` carries a `.upstare` section (already instrumented).
pub fn has_tables(elf: &[u8]) -> bool {
    object::File::parse(elf).is_ok_and(|f| f.section_by_name(SECTION_NAME).is_some())
}

/// Reads and decodes the `.upstare` section of an instrumented binary.
pub fn read_tables(elf: &[u8]) -> Result<FrameTables, TablesError> {
    upstare_dwarf::read_tables(elf)
}
