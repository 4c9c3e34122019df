//! Shared helpers of the analysis tests: compile C with the real compilers
//! into a temporary directory and analyze every function of the result.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use upstare_dwarf::fdt::FunctionTable;
use upstare_dwarf::model::Program;
use upstare_rewriter::analysis::{analyze_function_detailed, AnalysisError, CodeView, Details};

pub use upstare_testkit::{TempDir, Toolchain};

/// Compiles `src` with `-O0 -g -fno-omit-frame-pointer -w` (plus `extra`,
/// linked with `-lm`) and returns the directory and the binary's path.
/// Panics with the compiler's message on failure, or naming the compiler
/// when it is missing: the compilers are part of the test environment
/// (scripts/deps installs them).
pub fn compile(src: &str, cc: Toolchain, extra: &[&str]) -> (TempDir, PathBuf) {
    cc.require();
    let dir = TempDir::new(&format!("analysis-{}", cc.compiler()));
    let c = dir.path().join("t.c");
    std::fs::write(&c, src).expect("write source");
    let out = dir.path().join("t");
    let mut flags = vec!["-w"];
    flags.extend_from_slice(extra);
    if let Err(e) = upstare_testkit::compile_files(cc, &[&c], &flags, &["-lm"], &out) {
        panic!("{cc:?} failed: {e}");
    }
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
    /// The first instruction of source line `line` in function `name`:
    /// where a statement on that line starts.
    pub fn statement_start(&self, name: &str, line: u32) -> upstare_dwarf::LinkAddr {
        let t = self.table(name);
        self.program
            .rows_in(t.low, t.high)
            .iter()
            .filter(|r| r.line == line)
            .map(|r| r.addr)
            .min()
            .unwrap_or_else(|| panic!("{name}: no row of line {line}"))
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
