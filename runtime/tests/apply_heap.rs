//! Pointers that an update must not leave behind, live: each `Ticks` pair
//! below (gcc and clang) is run under ptrace and updated to v2 at every
//! update-point hit of its run; every line it prints is checked against
//! what the C source says (each version's header states the formula), and
//! the run must end normally.
//!
//! - `callback_other_file`: a heap struct holding a callback, whose type is
//!   defined in another compilation unit than the pointer to it: resolved
//!   by name across units, so the typed walk remaps the callback;
//! - `callback_void_ptr`: a callback stored only as raw bytes in a block
//!   reached through a `void *`: found and remapped by the sweep.

mod apply_support;

use apply_support::ticks::{check_lines, pair, update_run, Lines, TICKS, TICKS_ARG};

use apply_support::*;
use std::path::Path;
use std::time::Duration;
use upstare_runtime::update::{ApplyOptions, UpdateError, UpdateReport};
use upstare_testkit::{ExitStatus, Toolchain};

const READY_TIMEOUT: Duration = Duration::from_secs(3);
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// Updates a run of `v1` to `v2` after `k` hits; checks the output and
/// that the run ends with status 0. Returns the report.
fn update_at(v1: &Path, v2: &Path, k: u64, line: Lines) -> Result<UpdateReport, String> {
    let opts = ApplyOptions {
        timeout: READY_TIMEOUT,
        skip_hits: k,
        ..ApplyOptions::default()
    };
    let (r, out) = update_run((v1, v2), &[], &opts, RUN_TIMEOUT);
    let out = out?;
    let report = match r {
        Ok(r) => r,
        Err(UpdateError::Commit(e)) => return Err(format!("commit failed: {e}")),
        Err(e) => return Err(format!("refused: {e}")),
    };
    if out.status != ExitStatus::Code(0) {
        return Err(format!(
            "status {:?} after an update reported ok: {}\n{}",
            out.status, out.stderr, out.stdout
        ));
    }
    match check_lines(&out.stdout, line) {
        Ok(2) => Ok(report),
        Ok(_) => Err(format!(
            "updated, but v1 printed the last line\n{}",
            out.stdout
        )),
        Err(e) => Err(format!("{e}\nwhole output:\n{}", out.stdout)),
    }
}

/// Updates the pair at every hit of its run; every output must be right.
fn every_hit(name: &str, tc: Toolchain, line: Lines) -> Vec<UpdateReport> {
    let (v1, v2) = pair(name, tc);
    for (n, exe) in [(1, &v1), (2, &v2)] {
        let out = baseline(exe, &[TICKS_ARG]);
        let last = check_lines(&out.stdout, line)
            .unwrap_or_else(|e| panic!("{name} [{tc}] fresh v{n}: {e}\n{}", out.stdout));
        assert_eq!(last, n);
    }
    let (hits, more) = count_hits(&v1, &[TICKS_ARG], Some(10_000));
    assert!(!more && hits > TICKS as u64, "{name}: {hits} hits");
    let mut failures = Vec::new();
    let mut reports = Vec::new();
    for k in 0..hits {
        match update_at(&v1, &v2, k, line) {
            Ok(r) => reports.push(r),
            Err(e) => failures.push(format!("hit {k}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{name} [{tc}]: {} of {hits} updates wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!("{name} [{tc}]: {hits}/{hits} update-point hits updated, outputs right");
    reports
}

fn done(v: u32) -> String {
    format!("v{v} done t={TICKS}")
}

fn callback_other_file(v: u32, t: i64) -> String {
    if t == TICKS {
        return done(v);
    }
    let n = t + 1;
    format!("v{v} t={t} acc={} calls={n}", n * n)
}

fn callback_void_ptr(v: u32, t: i64) -> String {
    if t == TICKS {
        return done(v);
    }
    let n = t + 1;
    format!("v{v} t={t} acc={}", n * (3 * n + 1) / 2)
}

#[test]
fn callback_in_a_struct_defined_in_another_file_gcc() {
    every_hit("callback_other_file", Toolchain::Gcc, callback_other_file);
}

#[test]
fn callback_in_a_struct_defined_in_another_file_clang() {
    every_hit("callback_other_file", Toolchain::Clang, callback_other_file);
}

#[test]
fn callback_only_in_a_void_pointer_gcc() {
    let reports = every_hit("callback_void_ptr", Toolchain::Gcc, callback_void_ptr);
    // Once the block holds the callback (after main's first statements),
    // the sweep is what remaps it.
    assert!(
        reports.iter().any(|r| r.sweep.remapped_functions > 0),
        "the sweep never remapped a function"
    );
}

#[test]
fn callback_only_in_a_void_pointer_clang() {
    every_hit("callback_void_ptr", Toolchain::Clang, callback_void_ptr);
}

// ---- the fault test: a second sweep from outside after identity updates ----

/// Every deterministic corpus program (gcc, clang) updated to a fresh copy
/// of itself at a spread of hits, then audited from outside while still
/// stopped: no value of live memory may point into the old image's code or
/// writable data, beyond the counted exceptions; the run then ends exactly
/// as an uninterrupted one.
fn identity_then_audit(tc: Toolchain) {
    let dir = TempDir::new("heap-audit");
    let mut figures = (0usize, 0usize, 0usize, 0usize);
    let mut failures = Vec::new();
    for p in upstare_corpus::programs() {
        let up = instrumented(&p, tc);
        let new = fresh_copy(&up, &dir, "new");
        let base = baseline(&up, &[]);
        for k in [1u64, 7, 40] {
            let mut run = TracedRun::spawn(&up, &[]);
            let opts = ApplyOptions {
                timeout: READY_TIMEOUT,
                skip_hits: k,
                ..ApplyOptions::default()
            };
            let report = match run.apply(&new, &opts) {
                Ok(r) => r,
                // Not updatable from this state (the run ended, a thread in
                // an unsafe call): nothing to audit.
                Err(_) => continue,
            };
            let (stale, (copy, ro, _end)) = audit_after(&run, &report);
            figures.0 += 1;
            figures.1 += report.sweep.remapped_functions + report.sweep.remapped_globals;
            figures.2 += copy;
            figures.3 += ro;
            if !stale.is_empty() {
                failures.push(format!("{} hit {k}: {}", p.name, stale.join(", ")));
            }
            let out = run.finish(RUN_TIMEOUT);
            match out {
                Ok(o) if o.stdout == base.stdout && o.status == base.status => {}
                Ok(o) => failures.push(format!(
                    "{} hit {k}: run differs after the update: {:?}\n{}",
                    p.name, o.status, o.stdout
                )),
                Err(e) => failures.push(format!("{} hit {k}: {e}", p.name)),
            }
        }
    }
    println!(
        "audit [{tc}]: {} identity updates audited, {} untyped values remapped by the sweeps, \
         left: {} into COPY objects, {} into read-only data, 0 stale",
        figures.0, figures.1, figures.2, figures.3
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(figures.0 > 20, "only {} updates", figures.0);
}

#[test]
fn identity_updates_leave_no_value_pointing_into_the_old_image_gcc() {
    identity_then_audit(Toolchain::Gcc);
}

#[test]
fn identity_updates_leave_no_value_pointing_into_the_old_image_clang() {
    identity_then_audit(Toolchain::Clang);
}
