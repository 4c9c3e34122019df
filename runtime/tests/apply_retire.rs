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

#[test]
fn two_hundred_updates_do_not_grow_the_process() {
    let dir = TempDir::new("retire");
    let v1 = build_c(&dir, "bank1", &bank::source(1), Toolchain::Gcc);
    let v2 = build_c(&dir, "bank2", &bank::source(2), Toolchain::Gcc);
    let child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("start", Duration::from_secs(20), |l| {
            l.contains(" round 2:")
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let pid = child.pid();
    let opts = ApplyOptions {
        timeout: Duration::from_secs(10),
        ..ApplyOptions::default()
    };
    let mut at_baseline = (0, 0);
    let mut unmapped = 0;
    let mut kept_first = None;
    for k in 1..=UPDATES {
        // Update k runs v2 when k is odd: a fresh copy each time (the
        // running file cannot be mapped a second time).
        let (src, tag) = if k % 2 == 1 { (&v2, "v2") } else { (&v1, "v1") };
        let new = fresh_copy(src, &dir, &format!("{tag}.{k}"));
        let r = apply(pid as i32, &new, &opts).unwrap_or_else(|e| panic!("update {k}: {e}"));
        assert_eq!(r.retired.unmap_failed, 0, "update {k}: {:?}", r.retired);
        assert!(
            r.retired.unmapped > 0,
            "update {k} unmapped nothing: {:?} {:?} {:?}",
            r.retired,
            r.warnings,
            apply_support::maps_text(nix::unistd::Pid::from_raw(pid as i32))
        );
        unmapped += r.retired.unmapped;
        if k == 1 {
            kept_first = Some(r.retired.clone());
        } else {
            // An image upstare mapped is unmapped whole: nothing points
            // into it (the label still points into the first image).
            assert_eq!(
                r.retired.kept, 0,
                "update {k}: {:?}",
                r.retired.kept_reasons
            );
        }
        if k == BASELINE_AT {
            at_baseline = footprint(pid);
        }
    }
    let after = footprint(pid);
    let first = kept_first.expect("first update");
    println!(
        "first image: {} mappings unmapped, {} kept ({:?}); {unmapped} mappings unmapped in {UPDATES} updates",
        first.unmapped, first.kept, first.kept_reasons
    );
    println!(
        "after update {BASELINE_AT}: {} mappings, {} kB resident; after update {UPDATES}: {} mappings, {} kB resident",
        at_baseline.0, at_baseline.1, after.0, after.1
    );
    for why in [
        "program headers of the main program",
        ".dynamic of the main program",
        "values still point into it",
    ] {
        assert!(
            first.kept_reasons.iter().any(|k| k.contains(why)),
            "{why}: {:?}",
            first.kept_reasons
        );
    }
    assert!(
        after.0 <= at_baseline.0 + MAPS_ALLOWANCE,
        "mappings grew from {} to {}",
        at_baseline.0,
        after.0
    );
    assert!(
        after.1 <= at_baseline.1 + RSS_ALLOWANCE_KB,
        "resident memory grew from {} kB to {} kB",
        at_baseline.1,
        after.1
    );
    // The program runs on as the last version, every line right.
    let lines = child.stdout_so_far().lines().count();
    child
        .wait_for_line("after the updates", Duration::from_secs(20), |l| {
            l.contains(&format!(" round {}:", lines + 3))
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let (n1, n2) = bank::check_lines(&child.stdout_so_far()).unwrap_or_else(|e| panic!("{e}"));
    assert!(n1 > 0 && n2 > 0, "{n1} v1 lines, {n2} v2 lines");
}
