//! Finding the frame-description tables inside an ELF file, and checking
//! that they were made for that file's code and data.

use crate::fdt::{self, DecodeError, Digest, FrameTables, SECTION_NAME};
use object::elf;
use object::read::elf::{FileHeader as _, ProgramHeader as _};
use object::{Endianness, Object, ObjectSection, ReadRef};
use sha2::{Digest as _, Sha256};
use std::ops::Range;

/// Why an ELF file's tables could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TablesError {
    #[error("not a readable ELF file: {0}")]
    Parse(String),
    #[error("no {SECTION_NAME} section: the file was not produced by upstare-rewrite")]
    NoTables,
    #[error("section {SECTION_NAME}: {0}")]
    Section(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("the code and data do not match the checksum in the {SECTION_NAME} section: the binary was changed after upstare-rewrite, or the tables were made for another binary")]
    CodeChanged,
}

/// ELF header bytes that describe the section header table (`e_shoff`,
/// `e_shnum`, `e_shstrndx`): the loader maps them but never reads them, and
/// the rewriter changes them when it appends the tables, so the code digest
/// reads them as zero.
pub const SECTION_HEADER_FIELDS: [Range<u64>; 2] = [0x28..0x30, 0x3c..0x40];

/// Upper bound on the program headers hashed.
const MAX_SEGMENTS: usize = 1 << 12;
/// Upper bound on the bytes hashed (segments may overlap in a hostile file).
const MAX_HASHED: u64 = 2 << 30;

/// Reads and decodes the `.upstare` section of an instrumented binary and
/// checks both checksums: the tables' own and that of the code and data
/// they describe (the file's loaded bytes).
pub fn read_tables(elf: &[u8]) -> Result<FrameTables, TablesError> {
    let file = object::File::parse(elf).map_err(|e| TablesError::Parse(e.to_string()))?;
    let section = file
        .section_by_name(SECTION_NAME)
        .ok_or(TablesError::NoTables)?;
    let data = section
        .data()
        .map_err(|e| TablesError::Section(e.to_string()))?;
    let decoded = fdt::decode(data)?;
    check_code(elf, &decoded.code_digest)?;
    Ok(decoded.tables)
}

/// Fails with [`TablesError::CodeChanged`] unless the code digest of the
/// ELF file `data` is `expected`.
pub fn check_code<'d, R: ReadRef<'d>>(data: R, expected: &Digest) -> Result<(), TablesError> {
    if code_digest(data)? == *expected {
        Ok(())
    } else {
        Err(TablesError::CodeChanged)
    }
}

/// SHA-256 of what a binary's tables describe: every `PT_LOAD` program
/// header (address, sizes, offset, flags) and the file bytes it maps, with
/// [`SECTION_HEADER_FIELDS`] read as zero. Appending the `.upstare`
/// section leaves it unchanged; changing any loaded byte changes it.
pub fn code_digest<'d, R: ReadRef<'d>>(data: R) -> Result<Digest, TablesError> {
    let err = |e: object::read::Error| TablesError::Parse(e.to_string());
    let hdr = elf::FileHeader64::<Endianness>::parse(data).map_err(err)?;
    let endian = hdr.endian().map_err(err)?;
    let phdrs = hdr.program_headers(endian, data).map_err(err)?;
    if phdrs.len() > MAX_SEGMENTS {
        return Err(TablesError::Parse(format!(
            "{} program headers (at most {MAX_SEGMENTS})",
            phdrs.len()
        )));
    }
    let mut h = Sha256::new();
    let mut hashed = 0u64;
    for ph in phdrs.iter().filter(|p| p.p_type(endian) == elf::PT_LOAD) {
        let (offset, filesz) = (ph.p_offset(endian), ph.p_filesz(endian));
        for field in [ph.p_vaddr(endian), ph.p_memsz(endian), offset, filesz] {
            h.update(field.to_le_bytes());
        }
        h.update(ph.p_flags(endian).0.to_le_bytes());
        hashed = hashed.saturating_add(filesz);
        if hashed > MAX_HASHED {
            return Err(TablesError::Parse(format!(
                "loaded segments larger than {MAX_HASHED} bytes"
            )));
        }
        let bytes = data.read_bytes_at(offset, filesz).map_err(|()| {
            TablesError::Parse(format!(
                "a PT_LOAD segment at file offset {offset:#x} lies beyond the file"
            ))
        })?;
        hash_masked(&mut h, bytes, offset);
    }
    Ok(h.finalize().into())
}

/// Feeds `bytes` (found at file offset `at`) to `h`, with the bytes of
/// [`SECTION_HEADER_FIELDS`] replaced by zeros.
fn hash_masked(h: &mut Sha256, bytes: &[u8], at: u64) {
    let mut pos = 0usize;
    for field in &SECTION_HEADER_FIELDS {
        let local = |x: u64| usize::try_from(x.saturating_sub(at)).unwrap_or(usize::MAX);
        let (start, end) = (
            local(field.start).min(bytes.len()),
            local(field.end).min(bytes.len()),
        );
        if start < pos || start >= end {
            continue;
        }
        h.update(&bytes[pos..start]);
        h.update(vec![0u8; end - start]);
        pos = end;
    }
    h.update(&bytes[pos..]);
}
