//! Every corpus program builds with every toolchain and is deterministic:
//! two runs give the same stdout, stderr and exit status (the expected one).
//! Later identity-update tests compare an updated run against a plain one, so
//! they rely on exactly this.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use upstare_corpus::{build, programs, Feature, Program};
use upstare_testkit::{run, ExitStatus, Output, Toolchain};

const RUN_TIMEOUT: Duration = Duration::from_secs(20);

fn run_program(p: &Program, tc: Toolchain) -> Result<Output, String> {
    let bin = build(p, tc).map_err(|e| format!("{}: build: {e}", p.name))?;
    run(&bin, p.args, RUN_TIMEOUT).map_err(|e| format!("{} [{tc}]: {e}", p.name))
}

/// Builds and runs every program twice with `tc`; returns all failures.
fn check_toolchain(tc: Toolchain) {
    tc.require();
    let mut failures = Vec::new();
    for p in programs() {
        let (first, second) = match (run_program(&p, tc), run_program(&p, tc)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                failures.push(e);
                continue;
            }
        };
        if first.status != ExitStatus::Code(p.expected_exit) {
            failures.push(format!(
                "{} [{tc}]: {} (expected exit code {}); stderr: {}",
                p.name, first.status, p.expected_exit, first.stderr
            ));
        }
        if first.stdout.lines().count() < 3 {
            failures.push(format!(
                "{} [{tc}]: prints too little: {:?}",
                p.name, first.stdout
            ));
        }
        if p.deterministic && first != second {
            failures.push(format!(
                "{} [{tc}]: two runs differ:\n--- run 1 ({})\n{}{}\n--- run 2 ({})\n{}{}",
                p.name,
                first.status,
                first.stdout,
                first.stderr,
                second.status,
                second.stdout,
                second.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn all_programs_build_and_run_deterministically_gcc() {
    check_toolchain(Toolchain::Gcc);
}

#[test]
fn all_programs_build_and_run_deterministically_gcc_nopie() {
    check_toolchain(Toolchain::GccNoPie);
}

#[test]
fn all_programs_build_and_run_deterministically_clang() {
    check_toolchain(Toolchain::Clang);
}

/// The programs avoid unspecified evaluation order and addresses in their
/// output, so all toolchains print the same: a test can compare any build's
/// output against any other's.
#[test]
fn output_is_the_same_with_every_toolchain() {
    let mut failures = Vec::new();
    for p in programs() {
        let outs: Vec<(Toolchain, Result<Output, String>)> = Toolchain::ALL
            .iter()
            .map(|&tc| (tc, run_program(&p, tc)))
            .collect();
        let (base_tc, base) = match &outs[0] {
            (tc, Ok(o)) => (*tc, o),
            (_, Err(e)) => {
                failures.push(e.clone());
                continue;
            }
        };
        for (tc, out) in &outs[1..] {
            match out {
                Ok(o) if o == base => {}
                Ok(o) => failures.push(format!(
                    "{}: {base_tc} and {tc} differ:\n--- {base_tc}\n{}\n--- {tc}\n{}",
                    p.name, base.stdout, o.stdout
                )),
                Err(e) => failures.push(e.clone()),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn catalog_lists_every_source_file_once() {
    let listed: HashSet<String> = programs().iter().map(|p| p.name.to_string()).collect();
    assert_eq!(listed.len(), programs().len(), "duplicate program names");
    assert!(listed.len() >= 16, "only {} programs", listed.len());
    let dir = upstare_testkit::workspace_root().join("corpus/programs");
    let on_disk: HashSet<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".c").map(str::to_string)
        })
        .collect();
    assert_eq!(listed, on_disk, "catalog and corpus/programs/*.c disagree");
}

#[test]
fn programs_are_realistic_and_document_their_features() {
    let mut failures = Vec::new();
    for p in programs() {
        let text = std::fs::read_to_string(&p.source)
            .unwrap_or_else(|e| panic!("{}: {e}", p.source.display()));
        let lines = text.lines().count();
        if !(60..=200).contains(&lines) {
            failures.push(format!("{}: {lines} lines (want 60..=200)", p.name));
        }
        if !text.starts_with("/*") || !text.contains("Exercises") {
            failures.push(format!(
                "{}: no header comment listing what it exercises",
                p.name
            ));
        }
        let lower = text.to_lowercase();
        for f in p.features {
            if let Some(marker) = f.source_marker() {
                if !lower.contains(&marker.to_lowercase()) {
                    failures.push(format!("{}: tagged {f:?} but has no `{marker}`", p.name));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_feature_is_covered() {
    let all = programs();
    let missing: Vec<Feature> = Feature::ALL
        .into_iter()
        .filter(|f| !all.iter().any(|p| p.has(*f)))
        .collect();
    assert!(missing.is_empty(), "no program exercises {missing:?}");
}

/// Functions the C runtime start files put into every executable; excluded
/// when looking for code generated from the corpus sources.
const CRT_FUNCTIONS: &[&str] = &[
    "_start",
    "_init",
    "_fini",
    "_dl_relocate_static_pie",
    "deregister_tm_clones",
    "register_tm_clones",
    "__do_global_dtors_aux",
    "frame_dummy",
];

/// The disassembly of each function defined from the program's source, by name.
fn user_functions(bin: &std::path::Path) -> Vec<(String, String)> {
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-j", ".text"])
        .arg(bin)
        .output()
        .unwrap_or_else(|e| panic!("objdump {}: {e}", bin.display()));
    assert!(out.status.success(), "objdump {} failed", bin.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut funcs: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line
            .strip_suffix(">:")
            .and_then(|l| l.split_once(" <"))
            .map(|x| x.1)
        {
            funcs.push((name.to_string(), String::new()));
        } else if let Some((_, body)) = funcs.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    funcs.retain(|(name, _)| !CRT_FUNCTIONS.contains(&name.as_str()));
    funcs
}

/// The tags that claim something about generated code are checked against the
/// generated code: a jump table is an indirect `jmp` in a corpus function, and
/// gcc's call temporaries mean a corpus function pushes rbx or r12-r15.
#[test]
fn code_level_tags_hold_in_the_binaries() {
    upstare_testkit::require_tool("objdump");
    let mut failures = Vec::new();
    for p in programs() {
        for tc in Toolchain::ALL {
            let bin = build(&p, tc).unwrap_or_else(|e| panic!("{e}"));
            let funcs = user_functions(&bin);
            let any = |needle: &str| funcs.iter().any(|(_, body)| body.contains(needle));
            if p.has(Feature::JumpTable) && !any("jmp    *%r") {
                failures.push(format!("{} [{tc}]: no indirect jmp (jump table)", p.name));
            }
            let pushes_callee_saved = ["push   %rbx", "push   %r12", "push   %r13"]
                .iter()
                .any(|n| any(n));
            if p.has(Feature::CalleeSavedTemps) && tc != Toolchain::Clang && !pushes_callee_saved {
                failures.push(format!("{} [{tc}]: no function saves rbx/r12/r13", p.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
