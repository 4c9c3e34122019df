//! DWARF oracle: at every update point a corpus program reaches, every
//! in-scope parameter and local read through upstare's tables must be the
//! same variable (same address, same bytes, same declaration) that gdb finds
//! by its own evaluation of the DWARF at the same stop. gdb runs the script
//! gdb_oracle.py; this side turns the tables into its expectations and checks
//! its report.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use upstare_corpus::{build, programs};
use upstare_dwarf::fdt::FrameTables;
use upstare_dwarf::model::{type_size, VarLocation};
use upstare_testkit::{run_command, PointsMode, Toolchain};

/// The expectations for gdb: per update point, the variables in scope there
/// with their table locations.
fn expectations(tables: &FrameTables) -> Value {
    let mut points = Vec::new();
    for f in &tables.functions {
        for p in &f.update_points {
            let vars: Vec<Value> = f
                .vars_at(p.addr)
                .map(|v| {
                    let (kind, offset, detail) = match &v.location {
                        VarLocation::Cfa(o) => ("cfa", o.0, String::new()),
                        VarLocation::CfaIndirect(o) => ("indirect", o.0, String::new()),
                        VarLocation::Static(a) => ("static", a.0 as i64, String::new()),
                        VarLocation::Complex(d) => ("complex", 0, d.clone()),
                        VarLocation::None => ("complex", 0, "no location".into()),
                    };
                    let scope_len: u64 = v.scope.iter().map(|(a, b)| b.0.saturating_sub(a.0)).sum();
                    let size = match v.location {
                        VarLocation::Cfa(_) => type_size(&tables.types, v.ty),
                        _ => None,
                    };
                    json!({"name": v.name, "kind": kind, "offset": offset, "detail": detail,
                           "size": size, "decl_line": v.decl_line, "scope_len": scope_len})
                })
                .collect();
            points.push(json!({"addr": p.addr.0, "function": f.name, "vars": vars}));
        }
    }
    json!({"pie": tables.binary.pie, "points": points})
}

struct OracleResult {
    points_total: usize,
    points_reached: usize,
    stops: u64,
    compared: u64,
    statics: u64,
    skipped: Vec<String>,
    mismatches: Vec<String>,
}

fn run_oracle(binary: &Path, args: &[&str], work: &Path) -> OracleResult {
    let input = std::fs::read(binary).expect("read binary");
    // An instrumented binary's own tables (its code may carry detours);
    // else the tables the rewriter makes of it.
    let tables = upstare_dwarf::read_tables(&input)
        .or_else(|_| upstare_rewriter::rewrite::build_tables(&input).map_err(|e| e.to_string()))
        .expect("tables");
    let spec = expectations(&tables);
    let spec_path = work.join("spec.json");
    let report_path = work.join("report.json");
    let _ = std::fs::remove_file(&report_path);
    std::fs::write(&spec_path, spec.to_string()).expect("write spec");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/gdb_oracle.py");
    let mut cmd = Command::new("gdb");
    cmd.args(["-batch", "-nx", "-x"])
        .arg(&script)
        .arg("--args")
        .arg(binary)
        .args(args)
        .env("UPSTARE_ORACLE_IN", &spec_path)
        .env("UPSTARE_ORACLE_OUT", &report_path);
    let out = run_command(cmd, Duration::from_secs(120)).expect("run gdb");
    let report: Value = match std::fs::read_to_string(&report_path) {
        Ok(s) => serde_json::from_str(&s).expect("parse report"),
        Err(_) => panic!(
            "gdb wrote no report for {}:\n{}\n{}",
            binary.display(),
            out.stdout,
            out.stderr
        ),
    };
    let strings = |k: &str| -> Vec<String> {
        report[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    OracleResult {
        points_total: spec["points"].as_array().map_or(0, Vec::len),
        points_reached: report["points_reached"].as_array().map_or(0, Vec::len),
        stops: report["stops"].as_u64().unwrap_or(0),
        compared: report["compared"].as_u64().unwrap_or(0),
        statics: report["statics_compared"].as_u64().unwrap_or(0),
        skipped: strings("skipped"),
        mismatches: strings("mismatches"),
    }
}

fn oracle_for(toolchain: Toolchain) {
    oracle_as(toolchain, None);
}

fn oracle_as(toolchain: Toolchain, mode: Option<PointsMode>) {
    upstare_testkit::require_tool("gdb");
    toolchain.require();
    let tag = if mode.is_some() { "-inline" } else { "" };
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("oracle-{}{tag}", toolchain.name()));
    std::fs::create_dir_all(&work).expect("work dir");
    let (mut reached, mut total, mut stops, mut compared, mut statics) = (0, 0, 0, 0, 0);
    let mut mismatches = Vec::new();
    let mut skipped = 0;
    for program in programs() {
        let mut bin = build(&program, toolchain).expect("build");
        if let Some(mode) = mode {
            // gdb stops at the points of the rewritten binary, over its
            // detours, and runs through the trampolines between stops.
            let up = work.join(program.name);
            upstare_testkit::instrument_with(&bin, &up, mode);
            bin = up;
        }
        let r = run_oracle(&bin, program.args, &work);
        assert!(
            r.points_reached > 0,
            "{} [{}]: no update point reached under gdb",
            program.name,
            toolchain.name()
        );
        total += r.points_total;
        reached += r.points_reached;
        stops += r.stops;
        compared += r.compared;
        statics += r.statics;
        skipped += r.skipped.len();
        for s in r.skipped.iter().take(3) {
            println!("  skipped [{}] {}: {s}", toolchain.name(), program.name);
        }
        mismatches.extend(
            r.mismatches
                .into_iter()
                .map(|m| format!("{} [{}]: {m}", program.name, toolchain.name())),
        );
    }
    println!(
        "oracle [{}]: {reached} of {total} update points reached, {stops} stops, {compared} variables and {statics} static locals compared with gdb, {skipped} skipped, {} mismatches",
        toolchain.name(),
        mismatches.len()
    );
    assert!(compared > 100, "too few comparisons: {compared}");
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[test]
fn inline_points_tables_agree_with_gdb_gcc_pie() {
    oracle_as(Toolchain::Gcc, Some(PointsMode::Inline));
}

#[test]
fn inline_points_tables_agree_with_gdb_clang() {
    oracle_as(Toolchain::Clang, Some(PointsMode::Inline));
}

#[test]
fn tables_agree_with_gdb_gcc_pie() {
    oracle_for(Toolchain::Gcc);
}

#[test]
fn tables_agree_with_gdb_gcc_no_pie() {
    oracle_for(Toolchain::GccNoPie);
}

#[test]
fn tables_agree_with_gdb_clang() {
    oracle_for(Toolchain::Clang);
}
