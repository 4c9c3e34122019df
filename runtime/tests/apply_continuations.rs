//! Where a frame paused in a loop of OLD resumes in NEW when NEW's loops
//! changed around it. Loops are numbered (`loop#k`) in the address order of
//! their headers, and gcc puts a loop's condition after its body, so a loop
//! NEW adds inside, before or after the loop a frame is paused in renumbers
//! the loops: paired by number alone, the frame went on in another loop
//! (it once resumed in a new inner loop and printed `ids=14 tags=1` where
//! the source says `ids=15 tags=0`). Such a pairing is not sure: the update
//! is refused with the frame paused there, naming the function, the
//! continuation and the SPEC line; with that line it goes on in the right
//! loop. A loop whose body is only wrapped in an `if` keeps its number and
//! its lines, and is updated with no user input.
//!
//! Each case is updated at every update-point hit of its run (gcc and
//! clang), and every line is checked against the source: `ids` and `qty`
//! from the formula, `tags` 0 in v1, the whole count in v2 except on the
//! tick the update came in (the part of the count NEW's code still runs
//! from where the frame resumed).

mod apply_support;

use apply_support::*;
use std::path::{Path, PathBuf};
use std::time::Duration;
use upstare_dwarf::fdt::{Continuation, PointKind};
use upstare_patcher::Spec;
use upstare_runtime::update::{ApplyOptions, UpdateError};
use upstare_testkit::{ExitStatus, Toolchain};

/// Ticks each run prints (`argv[1]`).
const TICKS: i64 = 4;
const TICKS_ARG: &str = "4";
/// Bound on the threads' getting ready once the hits are skipped.
const READY_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on a run after its update.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// Items' ids sum to 6, quantities to 60; tags "a", "", "bc" hold 3
/// characters in all (suffix counts from item i on: 3, 2, 2, 0).
const PROGRAM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
struct item { long id; long qty; char tag[4]; };
static struct item items[3] = {{1, 10, "a"}, {2, 20, ""}, {3, 30, "bc"}};
static long n_items = 3;
static void show(long t) {
    long ids = 0, qty = 0;
    long tags = 0;
BODY
    printf(VERSION " t=%ld ids=%ld qty=%ld tags=%ld\n", t, ids, qty, tags);
    fflush(stdout);
}
int main(int argc, char **argv) {
    long ticks = argc > 1 ? atol(argv[1]) : 4;
    for (long t = 0; t < ticks; t++)
        show(t);
    printf(VERSION " done\n");
    return 0;
}
"#;

/// v1's loop: the one a frame is paused in.
const V1_BODY: &str = "    for (long i = 0; i < n_items; i++) {
        ids += items[i].id + t;
        qty += items[i].qty;
    }";

/// The line that starts the loop both versions share.
const SHARED_LOOP: &str = "for (long i = 0; i < n_items; i++) {";

/// One change of v2's loops.
struct Case {
    name: &'static str,
    body: &'static str,
    /// Values `tags` may hold on the tick the update came in.
    partial_tags: &'static [i64],
    /// Whether the default pairing of loops is sure (no SPEC needed).
    sure: bool,
}

const CASES: [Case; 4] = [
    Case {
        name: "inner",
        body: "    for (long i = 0; i < n_items; i++) {
        ids += items[i].id + t;
        qty += items[i].qty;
        for (int k = 0; k < (int)sizeof items[i].tag && items[i].tag[k]; k++)
            tags++;
    }",
        partial_tags: &[0, 2, 3],
        sure: false,
    },
    Case {
        name: "before",
        body: "    for (long j = 0; j < n_items; j++)
        tags += (items[j].tag[0] != 0) + (items[j].tag[1] != 0);
    for (long i = 0; i < n_items; i++) {
        ids += items[i].id + t;
        qty += items[i].qty;
    }",
        partial_tags: &[0, 3],
        sure: false,
    },
    Case {
        name: "after",
        body: "    for (long i = 0; i < n_items; i++) {
        ids += items[i].id + t;
        qty += items[i].qty;
    }
    for (long j = 0; j < n_items; j++)
        tags += (items[j].tag[0] != 0) + (items[j].tag[1] != 0);",
        partial_tags: &[3],
        sure: false,
    },
    Case {
        name: "wrapped_in_if",
        body: "    for (long i = 0; i < n_items; i++) {
        if (items[i].qty > 0) {
            ids += items[i].id + t;
            qty += items[i].qty;
            tags += (items[i].tag[0] != 0) + (items[i].tag[1] != 0);
        }
    }",
        partial_tags: &[0, 2, 3],
        sure: true,
    },
];

fn source(version: &str, body: &str) -> String {
    with_version(&PROGRAM.replace("BODY", body), version)
}

/// `key=value` of a line, as a number.
fn number(line: &str, key: &str) -> Result<i64, String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {key} in {line:?}"))
}

/// Checks a whole output against the source: ticks 0..TICKS then `done`,
/// v1's lines then v2's; `ids` and `qty` always the formula's; `tags` 0 in
/// v1, 3 in v2 but on the update's tick (one of `partial`). Returns the
/// version of the last line.
fn check_output(stdout: &str, partial: &[i64]) -> Result<u32, String> {
    let lines: Vec<&str> = stdout.lines().collect();
    if lines.len() != TICKS as usize + 1 {
        return Err(format!("{} lines, want {}", lines.len(), TICKS + 1));
    }
    let mut version = 1;
    let mut first_v2 = true;
    for (t, line) in (0..).zip(&lines) {
        let v = match line.get(..3) {
            Some("v1 ") if version == 1 => 1,
            Some("v2 ") => 2,
            _ => return Err(format!("tick {t}: unexpected {line:?}")),
        };
        let update_tick = v == 2 && first_v2;
        first_v2 &= v == 1;
        version = v;
        if t == TICKS {
            return (*line == format!("v{v} done"))
                .then_some(v)
                .ok_or_else(|| format!("last line {line:?}"));
        }
        let (ids, qty, tags) = (
            number(line, "ids")?,
            number(line, "qty")?,
            number(line, "tags")?,
        );
        let tags_ok = match (v, update_tick) {
            (1, _) => tags == 0,
            (_, false) => tags == 3,
            (_, true) => partial.contains(&tags),
        };
        if number(line, "t")? != t || ids != 6 + 3 * t || qty != 60 || !tags_ok {
            return Err(format!(
                "tick {t}: {line:?}, the source says ids={} qty=60 tags={}",
                6 + 3 * t,
                if v == 1 { "0" } else { "3" }
            ));
        }
    }
    Err("no done line".into())
}

/// The number of the loop of `show` whose update point is on the shared
/// loop's line or the first line of its body (where the compilers put it).
fn shared_loop_number(new: &Path, src: &str) -> u32 {
    let line = (1..)
        .zip(src.lines())
        .find(|(_, l)| l.contains(SHARED_LOOP))
        .map(|(n, _)| n)
        .expect("shared loop line");
    let t = upstare_dwarf::read_tables(&std::fs::read(new).expect("read NEW")).expect("tables");
    let show = t.function("show").expect("show");
    let ks: Vec<u32> = show
        .update_points
        .iter()
        .filter_map(|p| match p.kind {
            PointKind::Loop(k) if p.line == line || p.line == line + 1 => Some(k),
            _ => None,
        })
        .collect();
    let all: Vec<(String, u32)> = show
        .update_points
        .iter()
        .map(|p| (p.continuation().to_string(), p.line))
        .collect();
    assert_eq!(ks.len(), 1, "loops of show at line {line}: {all:?}");
    ks[0]
}

/// What one sweep saw: updates, refusals (with their hits).
#[derive(Default)]
struct Seen {
    updated: u64,
    refused: Vec<(u64, String)>,
    failures: Vec<String>,
}

/// Updates a run of `v1` to `v2` at every update-point hit, checking each
/// whole output.
fn sweep(v1: &Path, v2: &Path, spec: Option<&str>, partial: &[i64]) -> Seen {
    let args = [TICKS_ARG];
    let (hits, more) = count_hits(v1, &args, Some(1_000));
    assert!(!more && hits > TICKS as u64, "{hits} hits");
    let mut seen = Seen::default();
    for k in 0..hits {
        let spec = spec.map(|text| {
            let path = PathBuf::from("continuations.toml");
            let parsed = Spec::parse(&path, text).expect("SPEC");
            (path, parsed)
        });
        let opts = ApplyOptions {
            timeout: READY_TIMEOUT,
            skip_hits: k,
            spec,
            ..ApplyOptions::default()
        };
        let mut run = TracedRun::spawn(v1, &args);
        let outcome = run.apply(v2, &opts);
        let out = match run.finish(RUN_TIMEOUT) {
            Ok(out) => out,
            Err(e) => {
                seen.failures.push(format!("hit {k}: {e}"));
                continue;
            }
        };
        let last = check_output(&out.stdout, partial);
        match (outcome, last) {
            (Err(UpdateError::Commit(e)), _) => {
                seen.failures.push(format!("hit {k}: commit failed: {e}"))
            }
            (_, Err(e)) => seen
                .failures
                .push(format!("hit {k}: {e}\nwhole output:\n{}", out.stdout)),
            (Ok(_), Ok(2)) if out.status == ExitStatus::Code(0) => seen.updated += 1,
            (Err(e), Ok(1)) => seen.refused.push((k, e.to_string())),
            (o, Ok(v)) => seen.failures.push(format!(
                "hit {k}: {} but the last line is v{v}, status {:?}",
                if o.is_ok() { "updated" } else { "refused" },
                out.status
            )),
        }
    }
    seen
}

fn run_case(case: &Case, tc: Toolchain) {
    let dir = TempDir::new("apply-continuations");
    let (src1, src2) = (source("v1", V1_BODY), source("v2", case.body));
    let v1 = build_c(&dir, &format!("{}.v1.{}", case.name, tc.name()), &src1, tc);
    let v2 = build_c(&dir, &format!("{}.v2.{}", case.name, tc.name()), &src2, tc);
    assert_eq!(shared_loop_number(&v1, &src1), 0);
    let what = format!("{} [{}]", case.name, tc.name());
    let seen = sweep(&v1, &v2, None, case.partial_tags);
    println!(
        "{what}: {} updated, {} refused of {} hits",
        seen.updated,
        seen.refused.len(),
        seen.updated + seen.refused.len() as u64 + seen.failures.len() as u64
    );
    assert!(
        seen.failures.is_empty(),
        "{what}:\n{}",
        seen.failures.join("\n")
    );
    let unsure = Continuation::Loop(0).to_string();
    let spec_key = format!("continuations.\"show@{unsure}\"");
    if case.sure {
        assert!(
            seen.refused.is_empty(),
            "{what}: refused {:?}",
            seen.refused
        );
        return;
    }
    // Refused only while show is paused in its loop, naming it and the line.
    assert!(!seen.refused.is_empty(), "{what}: never refused");
    println!("  refused with: {}", seen.refused[0].1);
    for (k, why) in &seen.refused {
        assert!(
            why.contains("function show is paused at loop#0") && why.contains(&spec_key),
            "{what}: hit {k}: {why}"
        );
    }
    // With the SPEC line pointing at the same loop in NEW, every hit
    // updates and every line is right.
    let k = shared_loop_number(&v2, &src2);
    let spec = format!("[continuations]\n\"show@loop#0\" = \"show@loop#{k}\"\n");
    let seen = sweep(&v1, &v2, Some(&spec), case.partial_tags);
    assert!(
        seen.failures.is_empty(),
        "{what} with SPEC:\n{}",
        seen.failures.join("\n")
    );
    assert!(
        seen.refused.is_empty(),
        "{what} with SPEC: refused {:?}",
        seen.refused
    );
}

macro_rules! cases {
    ($($name:ident: $index:expr;)*) => {
        $(
            mod $name {
                use super::*;
                #[test]
                fn gcc() {
                    run_case(&CASES[$index], Toolchain::Gcc);
                }
                #[test]
                fn clang() {
                    run_case(&CASES[$index], Toolchain::Clang);
                }
            }
        )*
    };
}

cases! {
    new_inner_loop: 0;
    new_loop_before: 1;
    new_loop_after: 2;
    loop_body_wrapped_in_if: 3;
}
