//! Shared helpers of the analysis tests: compile C with the real compilers
//! into a temporary directory and analyze every function of the result.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use upstare_dwarf::fdt::FunctionTable;
use upstare_dwarf::model::Program;
use upstare_rewriter::analysis::{analyze_function_detailed, AnalysisError, CodeView, Details};

/// The toolchains the target contract names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cc {
    /// gcc, PIE (the default).
    Gcc,
    /// gcc -no-pie.
    GccNoPie,
    /// clang, PIE.
    Clang,
}

impl Cc {
    pub const ALL: [Cc; 3] = [Cc::Gcc, Cc::GccNoPie, Cc::Clang];
    pub fn compiler(self) -> &'static str {
        match self {
            Cc::Gcc | Cc::GccNoPie => "gcc",
            Cc::Clang => "clang",
        }
    }
    pub fn is_gcc(self) -> bool {
        self != Cc::Clang
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("upstare-analysis-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Compiles `src` with `-O0 -g -fno-omit-frame-pointer` (plus `extra`) and
/// returns the directory and the binary's path. Panics with the compiler's
/// message on failure: the compilers are part of the test environment
/// (scripts/deps installs them).
pub fn compile(src: &str, cc: Cc, extra: &[&str]) -> (TempDir, PathBuf) {
    let dir = TempDir::new(cc.compiler());
    let c = dir.path().join("t.c");
    std::fs::write(&c, src).expect("write source");
    let out = dir.path().join("t");
    let mut cmd = Command::new(cc.compiler());
    cmd.args(["-O0", "-g", "-fno-omit-frame-pointer", "-w"]);
    if cc == Cc::GccNoPie {
        cmd.arg("-no-pie");
    }
    cmd.args(extra).arg("-o").arg(&out).arg(&c).arg("-lm");
    let res = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cc.compiler()));
    assert!(
        res.status.success(),
        "{:?} failed: {}",
        cc,
        String::from_utf8_lossy(&res.stderr)
    );
    (dir, out)
}

/// Every function of a binary, analyzed.
pub struct Analyzed {
    pub program: Program,
    pub fns: BTreeMap<String, Result<(FunctionTable, Details), AnalysisError>>,
}

impl Analyzed {
    /// The table and details of `name`, panicking with the analysis error.
    pub fn get(&self, name: &str) -> &(FunctionTable, Details) {
        match self.fns.get(name) {
            Some(Ok(x)) => x,
            Some(Err(e)) => panic!("{name}: {e}"),
            None => panic!("no function {name}"),
        }
    }
    pub fn table(&self, name: &str) -> &FunctionTable {
        &self.get(name).0
    }
    pub fn details(&self, name: &str) -> &Details {
        &self.get(name).1
    }
    pub fn error(&self, name: &str) -> &AnalysisError {
        match self.fns.get(name) {
            Some(Err(e)) => e,
            Some(Ok(_)) => panic!("{name} was analyzed without error"),
            None => panic!("no function {name}"),
        }
    }
}

/// Reads the binary at `path` and analyzes every function with DWARF.
pub fn analyze(path: &Path) -> Analyzed {
    let bin = std::fs::read(path).expect("read binary");
    let file = object::File::parse(&*bin).expect("parse ELF");
    let program = upstare_dwarf::read::read_program(&bin).expect("read DWARF");
    let view = CodeView::new(&file).expect("code view");
    let mut fns = BTreeMap::new();
    for f in &program.functions {
        let code = view.code(f.low, f.high).expect("function code");
        fns.insert(
            f.name.clone(),
            analyze_function_detailed(f, &program, code, &view),
        );
    }
    Analyzed { program, fns }
}

/// 1-based number of the source line containing `marker`.
pub fn line_of(src: &str, marker: &str) -> u32 {
    let idx = src
        .lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("marker {marker} not in source"));
    u32::try_from(idx + 1).expect("line number")
}

/// Runs `path` and returns its stdout (asserting success).
pub fn run(path: &Path, args: &[&str]) -> String {
    let out = Command::new(path).args(args).output().expect("run program");
    assert!(out.status.success(), "{} failed: {:?}", path.display(), out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}
