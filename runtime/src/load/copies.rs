//! COPY-relocated data (`environ`, `stdout`, `optarg`, ...) stays one object
//! for the C library and the running version. The library reads and writes
//! such an object through GOT slots that the dynamic linker bound at startup
//! to the first executable's copy; a new version has its own copy (its code
//! addresses it PC-relative). NEW's copy is filled from the live one (where
//! the library's slots point: after an update, the previous version's
//! copy), and the commit points the library's slots at NEW's copy, so that
//! `setenv` and NEW's code use one `environ` (undone on rollback).

use super::libraries::Libraries;
use upstare_dwarf::RuntimeAddr;

/// One GOT slot of a library bound to a COPY-relocated object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundSlot {
    /// The COPY symbol of NEW the slot's object is (`environ`).
    pub symbol: String,
    /// Where the slot is in the process.
    pub addr: RuntimeAddr,
}

/// Bound on the dynamic relocations read per library.
const MAX_RELOCS: usize = 1 << 20;

/// The slots of the process's libraries (not the main program) bound to
/// the objects `names` denote: `GLOB_DAT` or `64` relocations against any
/// symbol the library defines at the address it defines the name at (its
/// aliases: libc's code uses `__environ` for `environ`). Read from the
/// files alone.
pub(super) fn bound_slots(libs: &Libraries, names: &[String]) -> Vec<BoundSlot> {
    use object::read::elf::ElfFile64;
    use object::{Object, ObjectSymbol, ObjectSymbolTable, RelocationFlags};
    let mut out = Vec::new();
    if names.is_empty() {
        return out;
    }
    for lib in libs.iter().filter(|l| !l.is_main()) {
        let Ok(bytes) = lib.bytes() else { continue };
        let Ok(file) = ElfFile64::<object::Endianness>::parse(bytes) else {
            continue;
        };
        let Some(dynsyms) = file.dynamic_symbol_table() else {
            continue;
        };
        // The address this library defines each name at.
        let defined: Vec<(&String, u64)> = names
            .iter()
            .filter_map(|n| {
                file.dynamic_symbols()
                    .find(|s| s.is_definition() && s.name().is_ok_and(|x| x == n))
                    .map(|s| (n, s.address()))
            })
            .filter(|(_, a)| *a != 0)
            .collect();
        if defined.is_empty() {
            continue;
        }
        let Some(relocs) = file.dynamic_relocations() else {
            continue;
        };
        for (offset, r) in relocs.take(MAX_RELOCS) {
            let RelocationFlags::Elf { r_type } = r.flags() else {
                continue;
            };
            if r_type != object::elf::R_X86_64_GLOB_DAT && r_type != object::elf::R_X86_64_64 {
                continue;
            }
            let object::RelocationTarget::Symbol(idx) = r.target() else {
                continue;
            };
            let Ok(sym) = dynsyms.symbol_by_index(idx) else {
                continue;
            };
            if !sym.is_definition() {
                continue;
            }
            let Some((name, _)) = defined.iter().find(|(_, a)| *a == sym.address()) else {
                continue;
            };
            let Some(addr) = offset.checked_add(lib.bias().0) else {
                continue;
            };
            out.push(BoundSlot {
                symbol: (*name).clone(),
                addr: RuntimeAddr(addr),
            });
        }
    }
    out
}
