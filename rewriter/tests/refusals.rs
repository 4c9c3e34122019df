//! One test per refusal class of `upstare-rewrite`: the message names what is
//! wrong, the exit code is non-zero, and no output file is left behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use upstare_testkit::{compile_c, CSource, Toolchain};

const SIMPLE: &str = r#"
#include <stdio.h>
static int twice(int x) { int y = x * 2; return y; }
int main(void) { int s = 0; for (int i = 0; i < 4; i++) s += twice(i); printf("%d\n", s); return 0; }
"#;

fn work_dir(test: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("refusals")
        .join(test);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create work dir");
    d
}

fn compile(dir: &Path, source: &str, extra: &[&str]) -> PathBuf {
    compile_c(
        CSource::Text(source),
        Toolchain::Gcc,
        extra,
        &dir.join("prog"),
    )
    .expect("compile")
}

/// Runs the rewriter on `input`; asserts failure with a one-line message
/// containing every `needles` entry and no output file.
fn assert_refused(input: &Path, needles: &[&str]) {
    let out = input.with_extension("up");
    let r = Command::new(env!("CARGO_BIN_EXE_upstare-rewrite"))
        .arg(input)
        .arg("-o")
        .arg(&out)
        .output()
        .expect("run upstare-rewrite");
    // Match needles against the message without the path, which may contain them.
    let stderr =
        String::from_utf8_lossy(&r.stderr).replace(&input.display().to_string(), "<input>");
    assert!(
        !r.status.success(),
        "accepted {}: {stderr}",
        input.display()
    );
    assert_eq!(
        r.status.code(),
        Some(1),
        "exit code for {}",
        input.display()
    );
    // One line, or for several refused functions a summary line and one
    // line per reason.
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert!(
        lines.len() == 1
            || lines[0].contains("functions refused for")
                && lines[1..].iter().all(|l| l.starts_with("  ")),
        "not one line per reason: {stderr}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "message {stderr:?} does not mention {n:?}"
        );
    }
    assert!(
        !out.exists(),
        "output file left behind for {}",
        input.display()
    );
    let leftovers: Vec<_> = std::fs::read_dir(input.parent().expect("dir"))
        .expect("list dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("upstare-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn accepts_the_conforming_baseline() {
    // The refusals below must be caused by what each changes, not by the program.
    let dir = work_dir("baseline");
    let bin = compile(&dir, SIMPLE, &[]);
    let out = dir.join("prog.up");
    let r = Command::new(env!("CARGO_BIN_EXE_upstare-rewrite"))
        .arg(&bin)
        .arg("-o")
        .arg(&out)
        .output()
        .expect("run");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(out.exists());
}

#[test]
fn refuses_binary_without_dwarf() {
    let dir = work_dir("nodwarf");
    let bin = compile(&dir, SIMPLE, &["-g0"]);
    assert_refused(&bin, &[".debug_info"]);
}

#[test]
fn refuses_stripped_binary() {
    let dir = work_dir("stripped");
    let bin = compile(&dir, SIMPLE, &[]);
    let st = Command::new("strip").arg(&bin).status().expect("run strip");
    assert!(st.success());
    assert_refused(&bin, &["stripped"]);
}

#[test]
fn refuses_optimized_code() {
    let dir = work_dir("optimized");
    let bin = compile(&dir, SIMPLE, &["-O2"]);
    assert_refused(&bin, &["-O2", "-O0"]);
}

#[test]
fn refuses_function_without_frame_pointer() {
    let dir = work_dir("nofp");
    let bin = compile(&dir, SIMPLE, &["-fomit-frame-pointer"]);
    assert_refused(&bin, &["twice", "frame-pointer"]);
}

#[test]
fn refuses_stack_realignment() {
    let dir = work_dir("realign");
    let src = r#"
#include <stdio.h>
static int aligned_sum(int n) { _Alignas(64) char buf[64]; for (int i = 0; i < 64; i++) buf[i] = (char)(i * n); int s = 0; for (int i = 0; i < 64; i++) s += buf[i]; return s; }
int main(void) { printf("%d\n", aligned_sum(3)); return 0; }
"#;
    let bin = compile(&dir, src, &[]);
    assert_refused(&bin, &["aligned_sum", "realign"]);
}

#[test]
fn refuses_other_architectures() {
    let dir = work_dir("arch");
    let bin = compile(&dir, SIMPLE, &[]);
    let mut bytes = std::fs::read(&bin).expect("read");
    bytes[0x12..0x14].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    std::fs::write(&bin, bytes).expect("write");
    assert_refused(&bin, &["x86-64"]);
}

#[test]
fn refuses_truncated_elf() {
    let dir = work_dir("truncated");
    let bin = compile(&dir, SIMPLE, &[]);
    let bytes = std::fs::read(&bin).expect("read");
    std::fs::write(&bin, &bytes[..bytes.len() / 3]).expect("write");
    assert_refused(&bin, &[]);
}

#[test]
fn refuses_non_elf_input() {
    let dir = work_dir("garbage");
    let bin = dir.join("prog");
    std::fs::write(&bin, b"#!/bin/sh\necho this is not an ELF file\n").expect("write");
    assert_refused(&bin, &["ELF"]);
}

#[test]
fn refuses_already_instrumented_input() {
    let dir = work_dir("twice");
    let bin = compile(&dir, SIMPLE, &[]);
    let once = dir.join("once");
    let r = Command::new(env!("CARGO_BIN_EXE_upstare-rewrite"))
        .arg(&bin)
        .arg("-o")
        .arg(&once)
        .output()
        .expect("run");
    assert!(r.status.success());
    assert_refused(&once, &["already instrumented"]);
}

/// Three kinds of refusal in one binary: every refused function is listed,
/// grouped by reason, in one run; nothing is written.
const MANY_REFUSALS: &str = r#"
#include <stdio.h>
static int aligned_a(int n) { _Alignas(64) char b[64]; b[0] = (char)n; return b[0]; }
static int aligned_b(int n) { _Alignas(64) char b[64]; b[0] = (char)n; return b[0] + 1; }
static int aligned_c(int n) { _Alignas(64) char b[64]; b[0] = (char)n; return b[0] + 2; }
static int plain(int n) { return n * 3; }
int main(void) { printf("%d\n", aligned_a(1) + aligned_b(2) + aligned_c(3) + plain(4)); return 0; }
"#;

#[test]
fn lists_every_refused_function_grouped_by_reason() {
    let dir = work_dir("many");
    // Without a frame pointer, plain and main are refused for that; the
    // three realigned functions for their realignment.
    let bin = compile(&dir, MANY_REFUSALS, &["-fomit-frame-pointer"]);
    assert_refused(
        &bin,
        &[
            "5 functions refused for 2 reasons",
            "stack realignment: 3 (aligned_a, aligned_b, aligned_c)",
            "no frame-pointer prologue: 2 (",
        ],
    );
    let out = bin.with_extension("up");
    let r = Command::new(env!("CARGO_BIN_EXE_upstare-rewrite"))
        .arg(&bin)
        .arg("-o")
        .arg(&out)
        .arg("--json")
        .output()
        .expect("run upstare-rewrite");
    assert_eq!(r.status.code(), Some(1));
    assert!(!out.exists(), "output written despite refusals");
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).expect("json");
    assert_eq!(v["ok"], false);
    let groups = v["refused"].as_array().expect("groups");
    let names = |reason: &str| -> Vec<String> {
        let g = groups
            .iter()
            .find(|g| g["reason"] == reason)
            .unwrap_or_else(|| panic!("no group {reason}: {v}"));
        let mut n: Vec<String> = g["functions"]
            .as_array()
            .expect("functions")
            .iter()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        n.sort();
        n
    };
    assert_eq!(groups.len(), 2, "{v}");
    assert_eq!(
        names("stack realignment"),
        ["aligned_a", "aligned_b", "aligned_c"]
    );
    assert_eq!(names("no frame-pointer prologue"), ["main", "plain"]);
}

/// `--dump` reads tables from a file: tables changed after the rewrite, or
/// code that is no longer the code they describe, are refused in one line
/// naming the file and what does not match.
#[test]
fn dump_refuses_tables_that_do_not_match_their_binary() {
    let dir = work_dir("bound");
    let bin = compile(&dir, SIMPLE, &[]);
    let up = dir.join("prog.up");
    let r = Command::new(env!("CARGO_BIN_EXE_upstare-rewrite"))
        .arg(&bin)
        .arg("-o")
        .arg(&up)
        .output()
        .expect("run");
    assert!(r.status.success());
    let bytes = std::fs::read(&up).expect("read");
    let summary = upstare_dwarf::elf::ElfSummary::parse(&up, &bytes[..]).expect("ELF");
    let (tables_at, tables_len) = summary.tables.expect("tables");
    let code = summary.loads.iter().find(|s| s.exec()).expect("code");
    let cases = [
        (
            tables_at + tables_len / 2,
            "frame tables do not match their checksum",
        ),
        (
            code.offset + code.filesz / 2,
            "the code and data do not match the checksum",
        ),
    ];
    for (i, (at, needle)) in cases.into_iter().enumerate() {
        let mut b = bytes.clone();
        b[usize::try_from(at).expect("offset")] ^= 0x10;
        let bad = dir.join(format!("bad{i}.up"));
        std::fs::write(&bad, &b).expect("write");
        let r = Command::new(env!("CARGO_BIN_EXE_upstare-rewrite"))
            .arg("--dump")
            .arg(&bad)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&bad.display().to_string()), "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
        assert!(r.stdout.is_empty());
    }
}
