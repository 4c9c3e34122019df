//! Heap objects of changed type, converted live: each pair below (gcc and
//! clang) is run under ptrace with glibc's checking allocator
//! (`GLIBC_TUNABLES=glibc.malloc.check=3`, its debug library preloaded) and
//! updated to v2 at every update-point hit of its run; every line it prints
//! is checked against what the C source says (each version's header states
//! the formula), and the updated program frees every object and exits with
//! status 0, the allocator finding nothing wrong.
//!
//! - `heap_list`: a list whose node gains a member in its padding: every
//!   node converted in place, the new member 0;
//! - `heap_tree`: a search tree with parent pointers whose node outgrows
//!   its block: every node moved, links and parents redirected;
//! - `heap_shared`: one object pointed to from a global, frames, itself and
//!   another heap object (one pointer into its interior) moves;
//! - `heap_array`, `heap_hash`: heap arrays counted by a global and by a
//!   member (the SPEC's `[heap]`) move whole;
//! - `heap_locals`: every frame of a recursive function holds its own heap
//!   array and its count in locals (`[heap] "level.items"`): each block
//!   moves whole with its frame's count.

mod apply_support;

use apply_support::ticks::{check_lines, pair, update_run, Lines, TICKS, TICKS_ARG};

use apply_support::*;
use std::path::{Path, PathBuf};
use std::time::Duration;
use upstare_patcher::Spec;
use upstare_runtime::engine::heap::HeapTypeFigures;
use upstare_runtime::update::{ApplyOptions, UpdateError, UpdateReport};
use upstare_testkit::{ExitStatus, Toolchain};

const READY_TIMEOUT: Duration = Duration::from_secs(3);
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// glibc's checking allocator: any misuse of the heap (a double free, a
/// write past a block) aborts the program.
const CHECKED_MALLOC: [(&str, &str); 2] = [
    ("GLIBC_TUNABLES", "glibc.malloc.check=3"),
    ("LD_PRELOAD", "libc_malloc_debug.so.0"),
];

/// Updates a run of `v1` to `v2` after `k` hits; checks the output and
/// that the run ends with status 0. Returns the report.
fn update_at(
    v1: &Path,
    v2: &Path,
    k: u64,
    line: Lines,
    spec: &Option<(PathBuf, Spec)>,
) -> Result<UpdateReport, String> {
    let opts = ApplyOptions {
        timeout: READY_TIMEOUT,
        skip_hits: k,
        spec: spec.clone(),
        ..ApplyOptions::default()
    };
    let (r, out) = update_run((v1, v2), &CHECKED_MALLOC, &opts, RUN_TIMEOUT);
    let out = out?;
    let report = match r {
        Ok(r) => r,
        Err(UpdateError::Commit(e)) => return Err(format!("commit failed: {e}")),
        Err(e) => return Err(format!("refused: {e}")),
    };
    if out.status != ExitStatus::Code(0) || !out.stderr.is_empty() {
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
/// Returns (hit, report) of each.
fn every_hit(name: &str, tc: Toolchain, line: Lines) -> Vec<(u64, UpdateReport)> {
    every_hit_with(name, tc, line, None)
}

/// [`every_hit`] with the pair's SPEC.toml.
fn every_hit_with_spec(name: &str, tc: Toolchain, line: Lines) -> Vec<(u64, UpdateReport)> {
    let p = upstare_corpus::version_pair(name).unwrap_or_else(|| panic!("no pair {name}"));
    let path = p.v1.source.with_file_name("SPEC.toml");
    let spec = Spec::read(&path).unwrap_or_else(|e| panic!("{e}"));
    every_hit_with(name, tc, line, Some((path, spec)))
}

fn every_hit_with(
    name: &str,
    tc: Toolchain,
    line: Lines,
    spec: Option<(PathBuf, Spec)>,
) -> Vec<(u64, UpdateReport)> {
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
        match update_at(&v1, &v2, k, line, &spec) {
            Ok(r) => reports.push((k, r)),
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

fn heap_list(v: u32, t: i64) -> String {
    if t == TICKS {
        return format!("{} freed=4", done(v));
    }
    let n = t + 1;
    let base = format!("v{v} t={t} count=4 sum={}", 100 + 4 * n);
    match v {
        1 => base,
        _ => format!("{base} weights=0"),
    }
}

fn heap_tree(v: u32, t: i64) -> String {
    if t == TICKS {
        return format!("{} freed=7", done(v));
    }
    let n = t + 1;
    let base = format!(
        "v{v} t={t} nodes=7 keys=350 counts={} links=1 sorted=1",
        35 * n
    );
    match v {
        1 => base,
        _ => format!("{base} labels=0 depths=0"),
    }
}

fn heap_shared(v: u32, t: i64) -> String {
    if t == TICKS {
        return format!("{} freed=2", done(v));
    }
    let n = t + 1;
    let base = format!("v{v} t={t} id=7 hits={} bumps={n} same=1", 11 * n);
    match v {
        1 => base,
        _ => format!("{base} note=0 extra=0"),
    }
}

fn heap_array(v: u32, t: i64) -> String {
    if t == TICKS {
        return format!("{} freed=1", done(v));
    }
    let n = t + 1;
    let base = format!("v{v} t={t} count=5 ids=15 qty={} cur=3", 150 + 15 * n);
    match v {
        1 => base,
        _ => format!("{base} tags=0 prices=0"),
    }
}

fn heap_hash(v: u32, t: i64) -> String {
    if t == TICKS {
        return format!("{} freed=12", done(v));
    }
    let n = t + 1;
    let base = format!(
        "v{v} t={t} entries=12 keys=78 vals={} longest=2 found=12",
        780 + 78 * n
    );
    match v {
        1 => base,
        _ => format!("{base} names=0 hits=0"),
    }
}

fn heap_locals(v: u32, t: i64) -> String {
    if t == TICKS {
        // 3 levels of 3, 4 and 5 items: ids 6 + 10 + 15, qty 10 * 31 plus
        // 15 per tick of the innermost.
        let base = format!(
            "v{v} done t={TICKS} levels=3 count=12 ids=31 qty={}",
            310 + 15 * TICKS
        );
        return match v {
            1 => format!("{base} freed=3"),
            _ => format!("{base} tags=0 prices=0 freed=3"),
        };
    }
    let n = t + 1;
    let base = format!("v{v} t={t} count=5 ids=15 qty={}", 150 + 15 * n);
    match v {
        1 => base,
        _ => format!("{base} tags=0 prices=0"),
    }
}

/// The most objects of changed type any one update converted: (in place,
/// moved).
fn most(reports: &[(u64, UpdateReport)]) -> (usize, usize) {
    (
        reports
            .iter()
            .map(|(_, r)| r.heap_converted_in_place)
            .max()
            .unwrap_or(0),
        reports.iter().map(|(_, r)| r.heap_moved).max().unwrap_or(0),
    )
}

/// The report's figures for `ty` in every update that converted `n`
/// objects.
fn figures_when_built(
    reports: &[(u64, UpdateReport)],
    ty: &str,
    n: usize,
) -> Vec<(u64, HeapTypeFigures)> {
    reports
        .iter()
        .filter(|(_, r)| r.heap_converted_in_place + r.heap_moved == n)
        .map(|(k, r)| (*k, r.heap_types.get(ty).cloned().unwrap_or_default()))
        .collect()
}

/// In every update that converted `n` objects (there is one at least),
/// the figures of `ty`: (found, converted in place, moved), and at least
/// `redirected` pointers redirected.
fn check_figures(
    reports: &[(u64, UpdateReport)],
    tc: Toolchain,
    (ty, n): (&str, usize),
    counts: (usize, usize, usize),
    redirected: usize,
) {
    let built = figures_when_built(reports, ty, n);
    assert!(!built.is_empty(), "[{tc}]");
    for (k, f) in built {
        let got = (f.found, f.converted_in_place, f.moved);
        assert_eq!(got, counts, "[{tc}] hit {k}");
        assert!(f.pointers_redirected >= redirected, "[{tc}] hit {k}: {f:?}");
    }
}

fn list(tc: Toolchain) {
    let reports = every_hit("heap_list", tc, heap_list);
    // Once the list is built, each update converts its 4 nodes in place.
    assert_eq!(most(&reports), (4, 0), "[{tc}]");
    // Per type: the 4 nodes found and converted in place; `next` keeps its
    // offset, so no pointer changes and the sweep has nothing to do.
    let built = figures_when_built(&reports, "struct node", 4);
    assert!(!built.is_empty(), "[{tc}]");
    let want = HeapTypeFigures {
        found: 4,
        converted_in_place: 4,
        ..HeapTypeFigures::default()
    };
    for (k, f) in built {
        assert_eq!(f, want, "[{tc}] hit {k}");
    }
}

fn tree(tc: Toolchain) {
    let reports = every_hit("heap_tree", tc, heap_tree);
    // Once the tree is built, each update moves its 7 nodes.
    assert_eq!(most(&reports), (0, 7), "[{tc}]");
    // Per type: 7 nodes found and moved; at least `root`, the 6 child links
    // and the 6 parent links redirected (frames may hold more).
    check_figures(&reports, tc, ("struct tnode", 7), (7, 0, 7), 13);
}

fn shared(tc: Toolchain) {
    let reports = every_hit("heap_shared", tc, heap_shared);
    // The rec moves; the holder, whose pointer members point to a changed
    // type, is of a changed type too and is converted in place.
    assert_eq!(most(&reports), (1, 1), "[{tc}]");
}

#[test]
fn list_nodes_converted_in_place_gcc() {
    list(Toolchain::Gcc);
}

#[test]
fn list_nodes_converted_in_place_clang() {
    list(Toolchain::Clang);
}

#[test]
fn tree_with_parent_pointers_moved_gcc() {
    tree(Toolchain::Gcc);
}

#[test]
fn tree_with_parent_pointers_moved_clang() {
    tree(Toolchain::Clang);
}

#[test]
fn object_shared_by_global_frames_and_heap_moved_gcc() {
    shared(Toolchain::Gcc);
}

#[test]
fn object_shared_by_global_frames_and_heap_moved_clang() {
    shared(Toolchain::Clang);
}

fn array(tc: Toolchain) {
    let reports = every_hit_with_spec("heap_array", tc, heap_array);
    // Once the array is allocated, its one block (5 elements) moves.
    assert_eq!(most(&reports), (0, 1), "[{tc}]");
    check_figures(&reports, tc, ("struct item", 1), (5, 0, 5), 0);
}

fn hash(tc: Toolchain) {
    let reports = every_hit_with_spec("heap_hash", tc, heap_hash);
    // Once the table is full, its 12 entries move, in all 8 buckets; the
    // table, whose member points to the changed type, is of a changed type
    // too and is converted in place.
    assert_eq!(most(&reports), (1, 12), "[{tc}]");
    // 8 bucket heads and 4 chain links redirected at least.
    check_figures(&reports, tc, ("struct entry", 13), (12, 0, 12), 12);
}

fn locals(tc: Toolchain) {
    let reports = every_hit_with_spec("heap_locals", tc, heap_locals);
    // Once the three levels have their blocks (3, 4 and 5 items), each
    // update moves the three blocks whole, each with its own frame's count.
    assert_eq!(most(&reports), (0, 3), "[{tc}]");
    // The three frames' `items` redirected at least.
    check_figures(&reports, tc, ("struct item", 3), (12, 0, 12), 3);
}

#[test]
fn heap_arrays_in_the_locals_of_every_frame_moved_whole_gcc() {
    locals(Toolchain::Gcc);
}

#[test]
fn heap_arrays_in_the_locals_of_every_frame_moved_whole_clang() {
    locals(Toolchain::Clang);
}

#[test]
fn heap_array_with_a_spec_count_moved_whole_gcc() {
    array(Toolchain::Gcc);
}

#[test]
fn heap_array_with_a_spec_count_moved_whole_clang() {
    array(Toolchain::Clang);
}

#[test]
fn hash_table_buckets_with_a_spec_count_moved_gcc() {
    hash(Toolchain::Gcc);
}

#[test]
fn hash_table_buckets_with_a_spec_count_moved_clang() {
    hash(Toolchain::Clang);
}

/// Updates a run of `v1` to `v2` after `k` hits with no SPEC: the update's
/// result and the run's output.
fn update_without_spec(
    v1: &Path,
    v2: &Path,
    k: u64,
) -> (
    Result<UpdateReport, UpdateError>,
    Result<upstare_testkit::Output, String>,
) {
    let opts = ApplyOptions {
        timeout: READY_TIMEOUT,
        skip_hits: k,
        ..ApplyOptions::default()
    };
    update_run((v1, v2), &[], &opts, RUN_TIMEOUT)
}

/// Without the SPEC's count, `items` is one object. Once `cur` points at
/// `items[2]` the update is refused (that element cannot move alone), the
/// message pointing at `[heap]`, and v1 runs on to its end; before that
/// (during the setup) only the first element is converted, and the update
/// says so, naming the room its block has (5 elements of 16 bytes: 88
/// usable bytes), the global that reached it and the SPEC line to add.
#[test]
fn heap_array_without_a_count_is_one_object_and_said() {
    for tc in [Toolchain::Gcc, Toolchain::Clang] {
        let (v1, v2) = pair("heap_array", tc);
        let (mut warned, mut refused) = (0, 0);
        for k in 0..40 {
            let (r, out) = update_without_spec(&v1, &v2, k);
            match r {
                Ok(r) => {
                    // The rest of the run reads a half-converted array: not
                    // checked.
                    warned += usize::from(r.warnings.iter().any(|w| {
                        w.contains("heap object struct item at ")
                            && w.contains("reached through global.items")
                            && w.contains("its block holds 88 bytes, room for 5 of them")
                            && w.contains(r#"heap."global.items" = { count = "global.COUNT" }"#)
                    }));
                }
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("struct item") && e.contains("[heap]"),
                        "[{tc}] hit {k}: {e}"
                    );
                    let out = out.unwrap_or_else(|e| panic!("[{tc}] hit {k}: {e}"));
                    assert_eq!(
                        check_lines(&out.stdout, heap_array),
                        Ok(1),
                        "[{tc}] hit {k}"
                    );
                    refused += 1;
                }
            }
        }
        assert!(
            warned > 0 && refused > 0,
            "[{tc}] {warned} warned, {refused} refused"
        );
    }
}

/// Without the SPEC's count, each frame's `items` is one object: once a
/// block is allocated the update converts only its first element and says
/// so, naming the local that reached it and the SPEC line to add.
#[test]
fn heap_array_of_a_local_without_a_count_is_said_with_its_spec_line() {
    let line = r#"heap."level.items" = { count = "level.COUNT" }"#;
    for tc in [Toolchain::Gcc, Toolchain::Clang] {
        let (v1, v2) = pair("heap_locals", tc);
        let mut warned = 0;
        for k in 0..30 {
            // The rest of the run reads half-converted arrays: not checked.
            if let (Ok(r), _) = update_without_spec(&v1, &v2, k) {
                warned += usize::from(r.warnings.iter().any(|w| {
                    w.contains("heap object struct item at ")
                        && w.contains("reached through level.items")
                        && w.contains("room for ")
                        && w.contains(line)
                }));
            }
        }
        assert!(warned > 0, "[{tc}] never warned");
    }
}

/// A count larger than its block (`level.limit`, 6, for blocks of 3 to 5
/// items) is refused naming the SPEC key, and v1 runs on to its end as if
/// nothing happened; before any block exists the update goes through.
#[test]
fn heap_array_count_larger_than_its_block_is_refused_naming_the_key() {
    let dir = upstare_testkit::TempDir::new("heap-locals-count");
    let path = dir.path().join("SPEC.toml");
    let text = "[heap]\n\"level.items\" = { count = \"level.limit\" }\n";
    std::fs::write(&path, text).expect("write SPEC");
    let spec = Some((path.clone(), Spec::read(&path).expect("SPEC")));
    for tc in [Toolchain::Gcc, Toolchain::Clang] {
        let (v1, v2) = pair("heap_locals", tc);
        let (hits, _) = count_hits(&v1, &[TICKS_ARG], Some(10_000));
        let mut refused = 0;
        for k in (0..hits).step_by(5) {
            let opts = ApplyOptions {
                timeout: READY_TIMEOUT,
                skip_hits: k,
                spec: spec.clone(),
                ..ApplyOptions::default()
            };
            let (r, out) = update_run((&v1, &v2), &CHECKED_MALLOC, &opts, RUN_TIMEOUT);
            let out = out.unwrap_or_else(|e| panic!("[{tc}] hit {k}: {e}"));
            assert_eq!(
                out.status,
                ExitStatus::Code(0),
                "[{tc}] hit {k}: {}",
                out.stderr
            );
            let last = check_lines(&out.stdout, heap_locals)
                .unwrap_or_else(|e| panic!("[{tc}] hit {k}: {e}\n{}", out.stdout));
            match r {
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("heap array level.items at ")
                            && e.contains("holds 6 elements of struct item")
                            && e.contains("more than its block of the allocator holds"),
                        "[{tc}] hit {k}: {e}"
                    );
                    assert_eq!(last, 1, "[{tc}] hit {k}: refused, yet v2 ran");
                    refused += 1;
                }
                Ok(_) => assert_eq!(last, 2, "[{tc}] hit {k}"),
            }
        }
        assert!(refused > 0, "[{tc}] never refused");
    }
}

/// The frames' heap arrays travel in a PATCH (written and read back): the
/// plan from `upstare-patch --spec` moves the three blocks like the plan
/// made at apply time, and v2's lines are right.
#[test]
fn a_patch_carries_the_heap_arrays_of_locals() {
    let (v1, v2) = pair("heap_locals", Toolchain::Gcc);
    let p = upstare_corpus::version_pair("heap_locals").expect("pair");
    let spec = p.v1.source.with_file_name("SPEC.toml");
    let (patch, _) = upstare_patcher::patchfile::make_patch_with_spec(&v1, &v2, Some(&spec))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(patch.is_complete(), "{:?}", patch.needs_user);
    let dir = upstare_testkit::TempDir::new("heap-locals-patch");
    let file = dir.path().join("heap_locals.patch");
    upstare_patcher::patchfile::write_patch(&file, &patch).expect("write");
    let patch = upstare_patcher::patchfile::read_patch(&file).expect("read");
    assert!(
        matches!(
            patch.plan.heap_arrays.as_slice(),
            [a] if a.key == "level.items"
                && matches!(&a.pointer, upstare_patcher::heap_arrays::HeapSlot::Local { function, .. } if function == "level")
        ),
        "{:?}",
        patch.plan.heap_arrays
    );
    let mut moved = 0;
    for k in [40, 60] {
        let opts = ApplyOptions {
            timeout: READY_TIMEOUT,
            skip_hits: k,
            plan: Some(patch.plan.clone()),
            expected_old: Some(patch.old.clone()),
            expected_new: Some(patch.new.clone()),
            ..ApplyOptions::default()
        };
        let (r, out) = update_run((&v1, &v2), &CHECKED_MALLOC, &opts, RUN_TIMEOUT);
        let r = r.unwrap_or_else(|e| panic!("hit {k}: {e}"));
        moved = moved.max(r.heap_moved);
        let out = out.expect("finish");
        assert_eq!(out.status, ExitStatus::Code(0), "hit {k}: {}", out.stderr);
        assert_eq!(
            check_lines(&out.stdout, heap_locals),
            Ok(2),
            "hit {k}: {}",
            out.stdout
        );
    }
    assert_eq!(moved, 3);
}
