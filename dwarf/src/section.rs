//! Finding the frame-description tables inside an ELF file.

use crate::fdt::{self, DecodeError, FrameTables, SECTION_NAME};
use object::{Object, ObjectSection};

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
}

/// Reads and decodes the `.upstare` section of an instrumented binary.
pub fn read_tables(elf: &[u8]) -> Result<FrameTables, TablesError> {
    let file = object::File::parse(elf).map_err(|e| TablesError::Parse(e.to_string()))?;
    let section = file
        .section_by_name(SECTION_NAME)
        .ok_or(TablesError::NoTables)?;
    let data = section
        .data()
        .map_err(|e| TablesError::Section(e.to_string()))?;
    Ok(fdt::decode(data)?)
}
