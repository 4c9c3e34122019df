//! Shared helpers: compile real C programs with the real gcc/clang into a
//! private temporary directory, run them, and look symbols up with `object`
//! (an independent source of truth for addresses and sizes).
#![allow(dead_code)]

use object::{Object, ObjectSection, ObjectSymbol};
use std::path::{Path, PathBuf};
use std::process::Command;

#[allow(unused_imports)] // each test file uses a subset
pub use upstare_testkit::{require_tool, TempDir, Toolchain};

/// The configurations to test: every toolchain. A missing compiler fails
/// the test, naming it.
pub fn compilers() -> Vec<Toolchain> {
    for tc in Toolchain::ALL {
        tc.require();
    }
    Toolchain::ALL.to_vec()
}

/// A compiled program.
pub struct Built {
    pub dir: TempDir,
    pub exe: PathBuf,
    pub bytes: Vec<u8>,
    pub cc: Toolchain,
}

/// Compiles the C files `srcs` (name, text) with `-O0 -g
/// -fno-omit-frame-pointer` and the configuration's link mode.
pub fn build(cc: Toolchain, tag: &str, srcs: &[(&str, &str)]) -> Built {
    build_flags(cc, tag, srcs, &[])
}

/// [`build`] with extra compiler flags (`-gdwarf-4`, `-gz`...).
pub fn build_flags(cc: Toolchain, tag: &str, srcs: &[(&str, &str)], flags: &[&str]) -> Built {
    let dir = TempDir::new(&format!("dwarf-{tag}"));
    let mut paths = Vec::new();
    for (name, text) in srcs {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write source");
        paths.push(p);
    }
    let sources: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let exe = dir.join(tag);
    if let Err(e) = upstare_testkit::compile_files(cc, &sources, flags, &[], &exe) {
        panic!("{cc} failed on {tag}: {e}");
    }
    let bytes = std::fs::read(&exe).expect("read the binary");
    Built {
        dir,
        exe,
        bytes,
        cc,
    }
}

/// Runs a built program (no input, bounded by its own code) and returns its
/// stdout.
pub fn run(exe: &Path) -> String {
    let out = Command::new(exe).output().expect("run the test program");
    assert!(out.status.success(), "{} failed: {:?}", exe.display(), out);
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A symbol from the ELF symbol table.
#[derive(Clone, Debug)]
pub struct Sym {
    pub name: String,
    pub addr: u64,
    pub size: u64,
    pub kind: object::SymbolKind,
}

pub fn symbols(bytes: &[u8]) -> Vec<Sym> {
    let file = object::File::parse(bytes).expect("parse ELF");
    file.symbols()
        .filter_map(|s| {
            Some(Sym {
                name: s.name().ok()?.to_string(),
                addr: s.address(),
                size: s.size(),
                kind: s.kind(),
            })
        })
        .collect()
}

pub fn symbol<'a>(syms: &'a [Sym], name: &str) -> &'a Sym {
    syms.iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("symbol {name} not in the symbol table"))
}

/// The bytes of the code at link address `addr` (from the section holding it).
pub fn code_at(bytes: &[u8], addr: u64, len: usize) -> Vec<u8> {
    let file = object::File::parse(bytes).expect("parse ELF");
    for sec in file.sections() {
        let (start, size) = (sec.address(), sec.size());
        if addr >= start && addr < start + size {
            let data = sec.data().expect("section data");
            let off = (addr - start) as usize;
            return data[off..(off + len).min(data.len())].to_vec();
        }
    }
    panic!("no section holds {addr:#x}");
}
