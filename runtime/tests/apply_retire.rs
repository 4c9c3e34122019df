//! Retired images are unmapped: 200 updates in a row on one process,
//! alternating between fresh copies of two versions (v1 → v2 → v1 ...),
//! must not make its mappings or its resident memory grow with the number
//! of updates, and its output stays what the sources say (every line's
//! balance the previous one plus the deposit of the version that printed
//! it). What must stay of the first image (its program headers, its
//! `.dynamic`, `stdout`, and the string literal a global still points to)
//! is kept and reported.

mod apply_support;

use apply_support::{bank, build_c, fresh_copy, TempDir};
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{spawn, Toolchain};

const UPDATES: usize = 200;
/// Where growth is measured from: after the first updates, once the
/// program's own allocations (stdio buffers) are made.
const BASELINE_AT: usize = 20;
/// Allowance for noise in the mapping count (the kernel may split or
/// merge anonymous mappings) and in resident memory (page cache of the
/// files, stack pages touched), fixed whatever the number of updates.
const MAPS_ALLOWANCE: usize = 2;
const RSS_ALLOWANCE_KB: u64 = 256;

/// The bank program `exe` started and past its second round.
fn start_bank(exe: &std::path::Path) -> upstare_testkit::ChildGuard {
    let child = spawn(exe, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("start", Duration::from_secs(20), |l| {
            l.contains(" round 2:")
        })
        .unwrap_or_else(|e| panic!("{e}"));
    child
}

/// Lets the bank program run three more rounds, checks every line of its
/// output and returns it with the count of v1 lines.
fn run_on_checked(child: &upstare_testkit::ChildGuard) -> (String, usize) {
    let lines = child.stdout_so_far().lines().count();
    child
        .wait_for_line("after the updates", Duration::from_secs(20), |l| {
            l.contains(&format!(" round {}:", lines + 3))
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let out = child.stdout_so_far();
    let (n1, _) = bank::check_lines(&out).unwrap_or_else(|e| panic!("{e}"));
    (out, n1)
}

/// Updates with a 10 s stop limit.
fn options() -> ApplyOptions {
    ApplyOptions {
        timeout: Duration::from_secs(10),
        ..ApplyOptions::default()
    }
}

/// (mappings, resident KB) of process `pid`.
fn footprint(pid: u32) -> (usize, u64) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("rollup");
    let rss = rollup
        .lines()
        .find_map(|l| l.strip_prefix("Rss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("Rss in smaps_rollup");
    (maps.lines().count(), rss)
}

/// What a run of updates in a row measured.
struct Run {
    /// The first update's report of the original image.
    first: upstare_runtime::load::retire::RetiredMappings,
    unmapped: usize,
    /// (mappings, resident KB) after update [`BASELINE_AT`] and at the end.
    at_baseline: (usize, u64),
    after: (usize, u64),
}

/// Starts v1 built with `first_tc`, then makes `updates` updates in a row,
/// alternating between fresh copies of v2 and v1 built with `tc` (the
/// running file cannot be mapped a second time), and checks every output
/// line once the program has run on.
fn updates_in_a_row(first_tc: Toolchain, tc: Toolchain, updates: usize) -> Run {
    let dir = TempDir::new("retire");
    let start = build_c(&dir, "bank0", &bank::source(1), first_tc);
    let v1 = build_c(&dir, "bank1", &bank::source(1), tc);
    let v2 = build_c(&dir, "bank2", &bank::source(2), tc);
    let child = start_bank(&start);
    let pid = child.pid();
    let opts = options();
    let mut run = Run {
        first: Default::default(),
        unmapped: 0,
        at_baseline: (0, 0),
        after: (0, 0),
    };
    for k in 1..=updates {
        let (src, tag) = if k % 2 == 1 { (&v2, "v2") } else { (&v1, "v1") };
        let new = fresh_copy(src, &dir, &format!("{tag}.{k}"));
        let r = apply(pid as i32, &new, &opts)
            .unwrap_or_else(|e| panic!("{first_tc} then {tc}: update {k}: {e}"));
        let m = &r.retired;
        assert_eq!(m.unmap_failed, 0, "update {k}: {m:?}");
        run.unmapped += m.unmapped;
        if k == 1 {
            run.first = m.clone();
        } else {
            assert!(m.unmapped > 0, "update {k} unmapped nothing: {m:?}");
            // An image upstare mapped is unmapped whole: nothing points
            // into it (the label still points into the first image).
            assert_eq!(m.kept, 0, "update {k}: {:?}", m.kept_reasons);
        }
        if k == BASELINE_AT {
            run.at_baseline = footprint(pid);
        }
    }
    run.after = footprint(pid);
    for why in [
        "program headers of the main program",
        ".dynamic of the main program",
        "values still point into it",
    ] {
        assert!(
            run.first.kept_reasons.iter().any(|k| k.contains(why)),
            "{first_tc}: {why}: {:?}",
            run.first.kept_reasons
        );
    }
    // The program runs on as the last version, every line right.
    let (out, n1) = run_on_checked(&child);
    assert!(n1 > 0, "no v1 line");
    // Whether a round ran between two updates depends on the machine's
    // load; the rounds after the last update are the last version's.
    let last = if updates % 2 == 1 { "v2 " } else { "v1 " };
    assert!(
        out.lines().last().is_some_and(|l| l.starts_with(last)),
        "the last line is not {last}: {out}"
    );
    run
}

#[test]
fn two_hundred_updates_do_not_grow_the_process() {
    let run = updates_in_a_row(Toolchain::Gcc, Toolchain::Gcc, UPDATES);
    // The original's code and nothing else it does not need.
    assert!(run.first.unmapped > 0, "{:?}", run.first);
    let (base, after) = (run.at_baseline, run.after);
    println!(
        "first image: {} mappings unmapped, {} kept ({:?}); {} mappings unmapped in {UPDATES} updates",
        run.first.unmapped, run.first.kept, run.first.kept_reasons, run.unmapped
    );
    println!(
        "after update {BASELINE_AT}: {} mappings, {} kB resident; after update {UPDATES}: {} mappings, {} kB resident",
        base.0, base.1, after.0, after.1
    );
    assert!(
        after.0 <= base.0 + MAPS_ALLOWANCE,
        "mappings grew from {} to {}",
        base.0,
        after.0
    );
    assert!(
        after.1 <= base.1 + RSS_ALLOWANCE_KB,
        "resident memory grew from {} kB to {} kB",
        base.1,
        after.1
    );
}

/// A non-PIE original (fixed addresses, absolute `.dynamic` entries) and
/// clang builds keep what they must too. (A non-PIE `_start` differs from
/// NEW's PIE one: the return address into it on the main stack is a stale
/// value the update reports, and the original's code stays mapped, not
/// executable.)
#[test]
fn retired_images_of_other_builds_are_unmapped() {
    for (first, tc) in [
        (Toolchain::GccNoPie, Toolchain::Gcc),
        (Toolchain::Clang, Toolchain::Clang),
    ] {
        let run = updates_in_a_row(first, tc, 6);
        println!(
            "{first} then {tc}: first image {} unmapped, kept {:?}",
            run.first.unmapped, run.first.kept_reasons
        );
    }
}

/// Back to the very file the process started from, and away again: the
/// first update keeps part of the starting image mapped (its program
/// headers, `.dynamic`, data a library uses), so after the return the
/// process maps that file twice, the kept parts elsewhere than the running
/// copy. Every later update was refused ("inconsistent load bias") before
/// the kept parts were told apart from the running image.
#[test]
fn back_to_the_starting_file_and_away_again() {
    let tc = Toolchain::Gcc;
    tc.require();
    let dir = TempDir::new("retire-back");
    let v1 = build_c(&dir, "bank1", &bank::source(1), tc);
    let v2 = build_c(&dir, "bank2", &bank::source(2), tc);
    let child = start_bank(&v1);
    let pid = child.pid() as i32;
    let opts = options();
    let first = apply(pid, &v2, &opts).unwrap_or_else(|e| panic!("to v2: {e}"));
    assert!(first.retired.kept > 0, "{:?}", first.retired);
    apply(pid, &v1, &opts).unwrap_or_else(|e| panic!("back to the starting file: {e}"));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let v1_name = v1.to_string_lossy().to_string();
    let starts: std::collections::BTreeSet<&str> = maps
        .lines()
        .filter(|l| l.ends_with(v1_name.as_str()))
        .filter_map(|l| l.split('-').next())
        .collect();
    assert!(
        starts.len() > 1,
        "the starting file mapped once only: {maps}"
    );
    for k in 0..3 {
        let to = if k % 2 == 0 { &v2 } else { &v1 };
        apply(pid, to, &opts).unwrap_or_else(|e| panic!("update {k} after the return: {e}"));
    }
    // v2 runs on, every line right.
    let (out, _) = run_on_checked(&child);
    assert!(
        out.lines().last().is_some_and(|l| l.starts_with("v2 ")),
        "{out}"
    );
}
