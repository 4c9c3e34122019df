//! Shared helpers: compile real C programs with the real gcc/clang into a
//! private temporary directory, run them, and look symbols up with `object`
//! (an independent source of truth for addresses and sizes).
#![allow(dead_code)]

use object::{Object, ObjectSection, ObjectSymbol};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One build configuration of the target contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cc {
    GccPie,
    GccNoPie,
    Clang,
}

impl Cc {
    pub fn is_clang(self) -> bool {
        self == Cc::Clang
    }
}

/// The configurations to test; clang is skipped (with a note) only when it
/// is not installed.
pub fn compilers() -> Vec<Cc> {
    let mut v = vec![Cc::GccPie, Cc::GccNoPie];
    if have("clang") {
        v.push(Cc::Clang);
    } else {
        eprintln!("NOTE: clang not found, skipping the clang configuration");
    }
    v
}

pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A private directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "upstare-dwarf-{tag}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A compiled program.
pub struct Built {
    pub dir: TempDir,
    pub exe: PathBuf,
    pub bytes: Vec<u8>,
    pub cc: Cc,
}

/// Compiles the C files `srcs` (name, text) with `-O0 -g
/// -fno-omit-frame-pointer` and the configuration's link mode.
pub fn build(cc: Cc, tag: &str, srcs: &[(&str, &str)]) -> Built {
    build_flags(cc, tag, srcs, &[])
}

/// [`build`] with extra compiler flags (`-gdwarf-4`, `-gz`...).
pub fn build_flags(cc: Cc, tag: &str, srcs: &[(&str, &str)], flags: &[&str]) -> Built {
    let dir = TempDir::new(tag);
    let mut cmd = Command::new(if cc.is_clang() { "clang" } else { "gcc" });
    cmd.args(["-O0", "-g", "-fno-omit-frame-pointer"]);
    cmd.args(flags);
    if cc == Cc::GccNoPie {
        cmd.arg("-no-pie");
    }
    for (name, text) in srcs {
        let p = dir.0.join(name);
        std::fs::write(&p, text).expect("write source");
        cmd.arg(&p);
    }
    let exe = dir.0.join(tag);
    cmd.arg("-o").arg(&exe);
    let out = cmd.output().expect("run the compiler");
    assert!(
        out.status.success(),
        "{cc:?} failed on {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
