//! C transformers, live: the `xform_member` pair (a struct gains `balance`,
//! which the transformers compute as deposits - withdrawals, for the global
//! `acct` and for `mine`, a local of main's running loop) updated at a
//! spread of update-point hits, gcc and clang, every line checked against
//! the formulas of the C source; the same with one per-type transformer;
//! and transformers that segfault, loop or return an error: each refused,
//! the process exactly as it was (maps and code bytes) and going on with its
//! own v1 sequence. A dry run runs them and changes nothing; a PATCH carries
//! them; the object is unmapped after an update.

mod apply_support;

use apply_support::ticks::{code_and_maps, TICKS, TICKS_ARG};

use apply_support::*;
use std::path::{Path, PathBuf};
use std::time::Duration;
use upstare_corpus::version_pair;
use upstare_patcher::transformer::{build, TransformerObject};
use upstare_patcher::Spec;
use upstare_runtime::update::{apply, ApplyOptions, UpdateError, UpdateReport};
use upstare_testkit::{spawn, ExitStatus, TempDir, Toolchain};

const READY_TIMEOUT: Duration = Duration::from_secs(3);
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

fn pair(tc: Toolchain) -> (PathBuf, PathBuf) {
    let p = version_pair("xform_member").expect("xform_member pair");
    (instrumented(&p.v1, tc), instrumented(&p.v2, tc))
}

/// `corpus/versions/xform_member`, where its SPECs and C files are.
fn pair_dir() -> PathBuf {
    let p = version_pair("xform_member").expect("xform_member pair");
    p.v1.source
        .parent()
        .map(Path::to_path_buf)
        .expect("source dir")
}

/// What the sources say version `v` prints at tick `t` (n = t + 1).
fn line(v: u32, t: i64) -> String {
    if t == TICKS {
        return format!("v{v} done t={TICKS}");
    }
    let n = t + 1;
    let base = format!("v{v} t={t} acct={}/{} mine={}/{}", 10 * n, 3 * n, 5 * n, n);
    match v {
        1 => base,
        // balance = deposits - withdrawals, kept by v2 and computed at the
        // update by the transformers.
        _ => format!("{base} balance={}/{}", 7 * n, 4 * n),
    }
}

/// Checks a whole run's output: ticks in order, each its version's line,
/// no v1 after v2. Returns the version of the last line.
fn check_lines(stdout: &str) -> Result<u32, String> {
    let lines: Vec<&str> = stdout.lines().collect();
    if lines.len() != TICKS as usize + 1 {
        return Err(format!("{} lines, want {}", lines.len(), TICKS + 1));
    }
    let mut seen_v2 = false;
    let mut last = 1;
    for (t, got) in lines.iter().enumerate() {
        let n = match got.get(..3) {
            Some("v1 ") => 1,
            Some("v2 ") => 2,
            _ => return Err(format!("line {t} has no version marker: {got:?}")),
        };
        if n == 1 && seen_v2 {
            return Err(format!("v1 code ran after the update: {got:?}"));
        }
        seen_v2 |= n == 2;
        let want = line(n, t as i64);
        if *got != want {
            return Err(format!("tick {t}:\n got {got:?}\nwant {want:?}"));
        }
        last = n;
    }
    Ok(last)
}

/// The SPEC at `path` and its transformers built for `v1` → `v2`.
fn spec_and_object(path: &Path, v1: &Path, v2: &Path) -> (Spec, TransformerObject) {
    let spec = Spec::read(path).unwrap_or_else(|e| panic!("{e}"));
    let tables =
        |p: &Path| upstare_dwarf::read_tables(&std::fs::read(p).expect("read")).expect("tables");
    let (old, new) = (tables(v1), tables(v2));
    spec.check(path, &old, &new)
        .unwrap_or_else(|e| panic!("{e}"));
    let object = build(path, &spec, &old, &new)
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("transformers named");
    (spec, object)
}

fn options(path: &Path, spec: &Spec, object: &TransformerObject, k: u64) -> ApplyOptions {
    ApplyOptions {
        timeout: READY_TIMEOUT,
        skip_hits: k,
        spec: Some((path.to_path_buf(), spec.clone())),
        transformers: Some(object.clone()),
        ..ApplyOptions::default()
    }
}

/// `count` hits spread over `0..hits`, first and last included.
fn spread(hits: u64, count: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..count)
        .map(|i| i * (hits - 1) / (count - 1).max(1))
        .collect();
    v.dedup();
    v
}

/// Updates at a spread of hits with the SPEC `spec_name` of the pair; every
/// update must apply and every line be right.
fn sweep(tc: Toolchain, spec_name: &str, points: u64) {
    let (v1, v2) = pair(tc);
    let path = pair_dir().join(spec_name);
    let (spec, object) = spec_and_object(&path, &v1, &v2);
    let (hits, more) = count_hits(&v1, &[TICKS_ARG], Some(10_000));
    assert!(!more && hits > TICKS as u64, "{hits} hits");
    for (n, exe) in [(1, &v1), (2, &v2)] {
        let out = baseline(exe, &[TICKS_ARG]);
        assert_eq!(
            check_lines(&out.stdout),
            Ok(n),
            "fresh v{n}:\n{}",
            out.stdout
        );
    }
    let mut failures = Vec::new();
    for k in spread(hits, points) {
        let mut run = TracedRun::spawn(&v1, &[TICKS_ARG]);
        let r = run.apply(&v2, &options(&path, &spec, &object, k));
        let out = run
            .finish(RUN_TIMEOUT)
            .unwrap_or_else(|e| panic!("hit {k}: {e}"));
        match r {
            Ok(r) => {
                if r.transformed.is_empty() {
                    failures.push(format!("hit {k}: no transformer ran"));
                }
                if out.status != ExitStatus::Code(0) {
                    failures.push(format!("hit {k}: status {:?}", out.status));
                }
                match check_lines(&out.stdout) {
                    Ok(2) => {}
                    Ok(_) => failures.push(format!("hit {k}: updated but v1 ended")),
                    Err(e) => failures.push(format!("hit {k}: {e}\n{}", out.stdout)),
                }
                println!(
                    "hit {k}: {} transformer call(s), transformers {} us of {} us",
                    r.transformed.len(),
                    r.timings.transform_us,
                    r.timings.total_us
                );
            }
            Err(e) => failures.push(format!("hit {k}: refused: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn global_and_frame_transformers_at_a_spread_of_points_gcc() {
    sweep(Toolchain::Gcc, "SPEC.toml", 8);
}

#[test]
fn global_and_frame_transformers_at_a_spread_of_points_clang() {
    sweep(Toolchain::Clang, "SPEC.toml", 8);
}

#[test]
fn a_type_transformer_reaches_the_global_and_the_frame_local_gcc() {
    sweep(Toolchain::Gcc, "SPEC_type.toml", 4);
}

#[test]
fn a_type_transformer_reaches_the_global_and_the_frame_local_clang() {
    sweep(Toolchain::Clang, "SPEC_type.toml", 4);
}

/// A SPEC naming `function` (defined in `c`) for the global acct, written
/// with its source into `dir`.
fn bad_spec(dir: &TempDir, function: &str, c: &str) -> PathBuf {
    std::fs::write(dir.path().join("bad.c"), c).expect("write C");
    let spec = dir.path().join("bad.toml");
    std::fs::write(
        &spec,
        format!("[transformers]\nsource = \"bad.c\"\n\"global acct\" = \"{function}\"\n"),
    )
    .expect("write SPEC");
    spec
}

/// A running (untraced, paced) v1 whose update fails in its transformer:
/// the error says `expect`, /proc/PID/maps and every executable byte are
/// the same before and after, and it goes on printing its own sequence.
fn refused_untouched(tc: Toolchain, spec_path: &Path, expect: &[&str]) {
    let (v1, v2) = pair(tc);
    let (spec, object) = spec_and_object(spec_path, &v1, &v2);
    let mut child = spawn(&v1, &["400", "20"]).expect("spawn");
    let wait = Duration::from_secs(20);
    child
        .wait_for_line("tick 3", wait, |l| l.starts_with("v1 t=3 "))
        .expect("v1 runs");
    let (maps0, code0) = code_and_maps(child.pid());
    let opts = ApplyOptions {
        timeout: Duration::from_millis(800),
        ..options(spec_path, &spec, &object, 0)
    };
    let err = match apply(child.pid() as i32, &v2, &opts) {
        Ok(r) => panic!("updated through a failing transformer: {r:?}"),
        Err(UpdateError::Commit(e)) => panic!("failed in the commit: {e}"),
        Err(e) => e.to_string(),
    };
    for e in expect {
        assert!(err.contains(e), "{err:?} does not say {e:?}");
    }
    assert!(!err.contains('\n'), "not one line: {err}");
    let (maps1, code1) = code_and_maps(child.pid());
    assert_eq!(maps0, maps1, "the mappings changed");
    assert_eq!(code0.len(), code1.len());
    for ((m0, c0), (_, c1)) in code0.iter().zip(&code1) {
        assert!(c0 == c1, "code bytes of {m0} changed");
    }
    let t_now = child.stdout_so_far().lines().count() as i64;
    child
        .wait_for_line("8 more ticks", wait, |l| {
            l.starts_with(&format!("v1 t={} ", t_now + 8))
        })
        .expect("v1 goes on");
    let out = child.kill();
    for (t, l) in out.stdout.lines().enumerate() {
        if l.is_empty() {
            continue;
        }
        // Its own v1 sequence, tick after tick (it runs 400 ticks).
        let n = t as i64 + 1;
        assert_eq!(
            l,
            format!("v1 t={t} acct={}/{} mine={}/{}", 10 * n, 3 * n, 5 * n, n),
            "line {t}"
        );
    }
}

#[test]
fn a_segfaulting_transformer_is_refused_and_the_process_untouched_gcc() {
    refused_untouched(
        Toolchain::Gcc,
        &pair_dir().join("SPEC_crash.toml"),
        &["xf_crash", "SIGSEGV", "nothing was changed"],
    );
}

#[test]
fn a_segfaulting_transformer_is_refused_and_the_process_untouched_clang() {
    refused_untouched(
        Toolchain::Clang,
        &pair_dir().join("SPEC_crash.toml"),
        &["xf_crash", "SIGSEGV", "nothing was changed"],
    );
}

#[test]
fn a_transformer_that_never_returns_is_refused_and_the_process_untouched() {
    let dir = TempDir::new("xform-loop");
    let spec = bad_spec(
        &dir,
        "xf_loop",
        "#include \"upstare_transformers.h\"\n\
         int xf_loop(const struct account__old *o, struct account *n)\n\
         { volatile int forever = 1; while (forever) n->balance++; return 0; }\n",
    );
    refused_untouched(Toolchain::Gcc, &spec, &["xf_loop", "did not finish"]);
}

#[test]
fn a_transformer_that_returns_an_error_is_refused_and_the_process_untouched() {
    let dir = TempDir::new("xform-err");
    let spec = bad_spec(
        &dir,
        "xf_no",
        "#include \"upstare_transformers.h\"\n\
         int xf_no(const struct account__old *o, struct account *n)\n\
         { n->balance = 1; return o->deposits > 0 ? 7 : 0; }\n",
    );
    refused_untouched(Toolchain::Gcc, &spec, &["xf_no", "returned 7"]);
}

#[test]
fn a_dry_run_runs_the_transformers_and_changes_nothing() {
    let (v1, v2) = pair(Toolchain::Gcc);
    let path = pair_dir().join("SPEC.toml");
    let (spec, object) = spec_and_object(&path, &v1, &v2);
    let mut run = TracedRun::spawn(&v1, &[TICKS_ARG]);
    let opts = ApplyOptions {
        dry_run: true,
        ..options(&path, &spec, &object, 3)
    };
    let r: UpdateReport = run.apply(&v2, &opts).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.dry_run);
    assert!(
        r.transformed
            .iter()
            .any(|c| c.starts_with("xf_acct on global acct"))
            && r.transformed
                .iter()
                .any(|c| c.starts_with("xf_main on thread")),
        "{:?}",
        r.transformed
    );
    let out = run.finish(RUN_TIMEOUT).expect("finish");
    assert_eq!(check_lines(&out.stdout), Ok(1), "{}", out.stdout);
}

#[test]
fn a_patch_carries_the_transformers_and_the_object_is_unmapped_after() {
    let (v1, v2) = pair(Toolchain::Gcc);
    let path = pair_dir().join("SPEC.toml");
    let (patch, _) = upstare_patcher::patchfile::make_patch_with_spec(&v1, &v2, Some(&path))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(patch.is_complete(), "{:?}", patch.needs_user);
    let dir = TempDir::new("xform-patch");
    let file = dir.path().join("x.patch");
    upstare_patcher::patchfile::write_patch(&file, &patch).expect("write");
    let patch = upstare_patcher::patchfile::read_patch(&file).expect("read");
    assert!(patch.transformers.is_some());
    let mut run = TracedRun::spawn(&v1, &[TICKS_ARG]);
    let opts = ApplyOptions {
        timeout: READY_TIMEOUT,
        skip_hits: 5,
        plan: Some(patch.plan),
        expected_old: Some(patch.old),
        expected_new: Some(patch.new),
        transformers: patch.transformers,
        ..ApplyOptions::default()
    };
    let r = run.apply(&v2, &opts).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.transformed.len(), 2, "{:?}", r.transformed);
    let maps = maps_text(run.pid());
    assert!(
        !maps.contains("upstare-xf-"),
        "the transformer object is still mapped:\n{maps}"
    );
    let out = run.finish(RUN_TIMEOUT).expect("finish");
    assert_eq!(check_lines(&out.stdout), Ok(2), "{}", out.stdout);
}
