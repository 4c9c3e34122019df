//! Clean points: at every update point a corpus program reaches, overwrite
//! every caller-saved general register and the arithmetic flags with garbage
//! and let it go on — its output must not change (nothing was live there).
//! At every update point and every call site reached, the measured rsp must
//! equal CFA + the tables' stack depth (CFA = rbp + 16 once the prologue ran).

use std::collections::HashMap;
use std::time::Duration;
use upstare_corpus::{build, programs};
use upstare_dwarf::fdt::{Arming, FrameTables};
use upstare_dwarf::{CfaOffset, LinkAddr};
use upstare_rewriter::analysis::DYNAMIC_DEPTH;
use upstare_rewriter::rewrite::{rewrite_with, PointsMode};
use upstare_runtime::target::ptrace::Regs;
use upstare_testkit::{run, Toolchain};
use upstare_testkit::{run_with_breakpoints, Exit, HitAction, RunLimits};

/// What the tables expect at one breakpoint address.
#[derive(Clone, Copy)]
enum Site {
    Point(CfaOffset),
    /// A call and the function's depth after its prologue (the bound for
    /// calls whose depth is dynamic, inside a VLA scope).
    Call(CfaOffset, CfaOffset),
}

fn sites(tables: &FrameTables) -> HashMap<LinkAddr, Site> {
    let mut m = HashMap::new();
    for f in &tables.functions {
        for c in &f.call_sites {
            m.insert(c.call_addr, Site::Call(c.stack_depth, f.body_depth));
        }
        // An update point at a call instruction is checked as both; the
        // point's registers-are-dead property is the stronger one.
        for p in &f.update_points {
            m.insert(p.addr, Site::Point(p.stack_depth));
        }
    }
    m
}

/// Flags a program could read: CF, PF, AF, ZF, SF, OF.
const ARITH_FLAGS: u64 = 0x8d5;

/// Limits of one breakpoint run.
fn limits() -> RunLimits {
    RunLimits {
        timeout: Duration::from_secs(60),
        max_hits_per_addr: 40,
        ..RunLimits::default()
    }
}

/// Overwrites every caller-saved general register with the next values of
/// `garbage` and flips the arithmetic flags.
fn clobber(regs: &mut Regs, garbage: &mut u64) {
    let r = &mut regs.0;
    for reg in [
        &mut r.rax, &mut r.rcx, &mut r.rdx, &mut r.rsi, &mut r.rdi, &mut r.r8, &mut r.r9,
        &mut r.r10, &mut r.r11,
    ] {
        *garbage = garbage.rotate_left(13).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        *reg = *garbage;
    }
    r.eflags ^= ARITH_FLAGS;
}

/// The clobbered run of `program` ended as the reference run did: its
/// expected exit and, for a deterministic program, the same output.
fn check_run(
    name: &str,
    program: &upstare_corpus::Program,
    report: &upstare_testkit::RunReport,
    reference: &upstare_testkit::Output,
    failures: &mut Vec<String>,
) {
    let expected_exit = Exit::Code(program.expected_exit);
    if report.exit != expected_exit {
        failures.push(format!(
            "{name}: exit {:?}, expected {expected_exit:?}",
            report.exit
        ));
    }
    if program.deterministic
        && (report.stdout_str() != reference.stdout
            || String::from_utf8_lossy(&report.stderr) != reference.stderr)
    {
        failures.push(format!(
            "{name}: output changed after clobbering registers\n--- expected\n{}\n--- got\n{}",
            reference.stdout,
            report.stdout_str()
        ));
    }
}

fn clean_points_for(toolchain: Toolchain) {
    toolchain.require();
    let mut failures = Vec::new();
    let (mut points_hit, mut calls_hit, mut clobbers, mut depth_checks) = (0u64, 0u64, 0u64, 0u64);
    for program in programs() {
        let bin = build(&program, toolchain).expect("build");
        let input = std::fs::read(&bin).expect("read");
        let tables = upstare_rewriter::rewrite::build_tables(&input).expect("tables");
        let sites = sites(&tables);
        let addrs: Vec<LinkAddr> = sites.keys().copied().collect();
        let reference = run(&bin, program.args, Duration::from_secs(20)).expect("reference run");
        let mut wrong_depth = Vec::new();
        let mut garbage: u64 = 0x5eed_0bad_c0de_0001;
        let report = run_with_breakpoints(
            &bin,
            program.args,
            &addrs,
            |hit| {
                let r = &mut hit.regs.0;
                let cfa = r.rbp.wrapping_add(16);
                let (kind, depth, ok) = match sites[&hit.link_addr] {
                    Site::Point(d) => ("update point", d, r.rsp == cfa.wrapping_add_signed(d.0)),
                    // A VLA below the fixed frame: rsp is only bounded.
                    Site::Call(d, body) if d == DYNAMIC_DEPTH => (
                        "call site (dynamic)",
                        body,
                        r.rsp <= cfa.wrapping_add_signed(body.0),
                    ),
                    Site::Call(d, _) => ("call site", d, r.rsp == cfa.wrapping_add_signed(d.0)),
                };
                if !ok && wrong_depth.len() < 5 {
                    wrong_depth.push(format!(
                        "{kind} {}: rsp = CFA{:+}, tables say CFA{:+}",
                        hit.link_addr,
                        r.rsp.wrapping_sub(cfa) as i64,
                        depth.0
                    ));
                }
                depth_checks += 1;
                if let Site::Point(_) = sites[&hit.link_addr] {
                    points_hit += 1;
                    clobber(&mut hit.regs, &mut garbage);
                    clobbers += 1;
                } else {
                    calls_hit += 1;
                }
                HitAction::Continue
            },
            limits(),
        )
        .unwrap_or_else(|e| panic!("{} [{}]: {e}", program.name, toolchain.name()));
        let name = format!("{} [{}]", program.name, toolchain.name());
        failures.extend(wrong_depth.into_iter().map(|w| format!("{name}: {w}")));
        check_run(&name, &program, &report, &reference, &mut failures);
    }
    println!(
        "clean points [{}]: {points_hit} update-point hits clobbered ({clobbers} register sets), {calls_hit} call-site hits, {depth_checks} stack depths checked",
        toolchain.name()
    );
    assert!(points_hit > 500 && calls_hit > 500, "too few hits");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The same for `--inline-points`: breakpoints where each trampoline goes
/// on after its `int3` (where a thread trapped at a detoured point is
/// resumed), in the rewritten binary. There rsp must be the point's depth
/// and clobbering every caller-saved register and the flags must change
/// nothing: the trampoline's flag test and the relocated instructions
/// run in a state where nothing is live, as the point does.
fn clean_trampolines_for(toolchain: Toolchain) {
    toolchain.require();
    let dir = upstare_testkit::TempDir::new(&format!("clean-inline-{}", toolchain.name()));
    let mut failures = Vec::new();
    let (mut hits, mut detours) = (0u64, 0usize);
    for program in programs() {
        let bin = build(&program, toolchain).expect("build");
        let input = std::fs::read(&bin).expect("read");
        let rewritten = rewrite_with(&input, PointsMode::Inline).expect("rewrite");
        let Arming::Inline(inline) = &rewritten.tables.arming else {
            panic!("not inline");
        };
        detours += inline.detours.len();
        let up = dir.path().join(program.name);
        upstare_testkit::write_exe(&up, &rewritten.elf, 0o755);
        let depth: HashMap<LinkAddr, CfaOffset> = rewritten
            .tables
            .functions
            .iter()
            .flat_map(|f| f.update_points.iter())
            .filter_map(|p| {
                let d = inline.detour_at(p.addr)?;
                Some((LinkAddr(d.trap.0 + 1), p.stack_depth))
            })
            .collect();
        let addrs: Vec<LinkAddr> = depth.keys().copied().collect();
        let reference = run(&bin, program.args, Duration::from_secs(20)).expect("reference run");
        let mut garbage: u64 = 0x5eed_0bad_c0de_0002;
        let mut wrong = Vec::new();
        let report = run_with_breakpoints(
            &up,
            program.args,
            &addrs,
            |hit| {
                let r = &mut hit.regs.0;
                let cfa = r.rbp.wrapping_add(16);
                let d = depth[&hit.link_addr];
                if r.rsp != cfa.wrapping_add_signed(d.0) && wrong.len() < 5 {
                    wrong.push(format!(
                        "trampoline {}: rsp = CFA{:+}, tables say CFA{:+}",
                        hit.link_addr,
                        r.rsp.wrapping_sub(cfa) as i64,
                        d.0
                    ));
                }
                clobber(&mut hit.regs, &mut garbage);
                hits += 1;
                HitAction::Continue
            },
            limits(),
        )
        .unwrap_or_else(|e| panic!("{} [{}]: {e}", program.name, toolchain.name()));
        let name = format!("{} [{}] inline", program.name, toolchain.name());
        failures.extend(wrong.into_iter().map(|w| format!("{name}: {w}")));
        check_run(&name, &program, &report, &reference, &mut failures);
    }
    println!(
        "clean trampolines [{}]: {hits} hits clobbered over {detours} detours",
        toolchain.name()
    );
    assert!(hits > 500, "too few hits: {hits}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn trampolines_are_register_free_gcc_pie() {
    clean_trampolines_for(Toolchain::Gcc);
}

#[test]
fn trampolines_are_register_free_gcc_no_pie() {
    clean_trampolines_for(Toolchain::GccNoPie);
}

#[test]
fn trampolines_are_register_free_clang() {
    clean_trampolines_for(Toolchain::Clang);
}

#[test]
fn update_points_are_register_free_gcc_pie() {
    clean_points_for(Toolchain::Gcc);
}

#[test]
fn update_points_are_register_free_gcc_no_pie() {
    clean_points_for(Toolchain::GccNoPie);
}

#[test]
fn update_points_are_register_free_clang() {
    clean_points_for(Toolchain::Clang);
}
