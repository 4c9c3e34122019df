//! Programs that are not in the corpus: generated programs of several sizes
//! come out of upstare-rewrite running exactly as before, and the dumped
//! tables describe what the generator wrote (functions, loops, calls).

mod common;

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use upstare_testkit::{compile_c, run, CSource, Toolchain};

fn check(n: usize, toolchain: Toolchain) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("generated-{n}-{}", toolchain.name()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bin = compile_c(
        CSource::Text(&common::gen::generate(n)),
        toolchain,
        &[],
        &dir.join("gen"),
    )
    .expect("compile");
    let up = dir.join("gen.up");
    let _ = std::fs::remove_file(&up);
    let exe = env!("CARGO_BIN_EXE_upstare-rewrite");
    let r = Command::new(exe)
        .arg(&bin)
        .arg("-o")
        .arg(&up)
        .output()
        .expect("rewrite");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let none: [&str; 0] = [];
    let a = run(&bin, &none, Duration::from_secs(30)).expect("run original");
    let b = run(&up, &none, Duration::from_secs(30)).expect("run instrumented");
    assert_eq!(a, b, "instrumented program behaves differently");
    assert!(!a.stdout.is_empty());

    let d = Command::new(exe)
        .arg("--dump")
        .arg("--json")
        .arg(&up)
        .output()
        .expect("dump");
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    let t: Value = serde_json::from_slice(&d.stdout).expect("json");
    // --notes explains the loops that have no update point: shape 4's
    // one-line loop.
    let notes = Command::new(exe)
        .arg("--dump")
        .arg("--notes")
        .arg(&up)
        .output()
        .expect("notes");
    let notes = String::from_utf8_lossy(&notes.stdout);
    assert!(
        notes
            .lines()
            .any(|l| l.trim_start().starts_with("f4: loop#0") && l.contains("no update point")),
        "no note for f4's one-line loop"
    );
    let funcs = t["functions"].as_array().expect("functions");
    assert_eq!(funcs.len(), n + 1, "f0..f{} and main", n - 1);
    let by_name = |name: &str| {
        funcs
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    for i in 0..n {
        let f = by_name(&format!("f{i}"));
        let points = f["update_points"].as_array().expect("points");
        let kinds: Vec<String> = points.iter().map(|p| p["kind"].to_string()).collect();
        assert!(
            kinds.iter().any(|k| k.contains("Entry")),
            "f{i}: no entry point: {kinds:?}"
        );
        let loops = kinds.iter().filter(|k| k.contains("Loop")).count();
        // Shapes 0, 2 and 3 have a for, while and do-while loop over several
        // lines; shape 4's loop is written on one line, which has no row
        // starting a new line inside it, so it gets no update point.
        let expected_loops = match i % 5 {
            0 | 2 | 3 => 1,
            _ => 0,
        };
        assert_eq!(
            loops,
            expected_loops,
            "f{i} (shape {}): loops {kinds:?}",
            i % 5
        );
        let calls = f["call_sites"].as_array().expect("calls");
        let callee = |k: usize| format!("f{}", (i * 7 + k * 13 + 1) % n);
        match i % 5 {
            1 => {
                let names: Vec<&str> = calls
                    .iter()
                    .filter_map(|c| c["callee"]["Direct"].as_str())
                    .collect();
                let mut want = vec![callee(1), callee(2)];
                let mut got: Vec<String> = names.iter().map(|s| s.to_string()).collect();
                want.sort();
                got.sort();
                assert_eq!(got, want, "f{i}: direct calls");
                if callee(1) == callee(2) {
                    let ords: Vec<u64> =
                        calls.iter().filter_map(|c| c["ordinal"].as_u64()).collect();
                    assert_eq!(
                        ords,
                        vec![0, 1],
                        "f{i}: ordinals of two calls to one callee"
                    );
                }
            }
            3 => assert!(
                calls.iter().any(|c| c["callee"]["Plt"] == "snprintf"),
                "f{i}: snprintf call through the PLT"
            ),
            4 => assert!(
                calls
                    .iter()
                    .any(|c| c["callee"]["Direct"] == Value::String(callee(3))),
                "f{i}: call to {}",
                callee(3)
            ),
            _ => {}
        }
    }
}

#[test]
fn generated_30_functions_gcc() {
    check(30, Toolchain::Gcc);
}

#[test]
fn generated_300_functions_gcc_no_pie() {
    check(300, Toolchain::GccNoPie);
}

#[test]
fn generated_300_functions_clang() {
    check(300, Toolchain::Clang);
}
