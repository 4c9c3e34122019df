//! NEW plainly another program (`main`, or most of OLD's functions and
//! globals, without a counterpart) is refused by the plan, naming what does
//! not match, unless the SPEC accepts it with the exact count; a real new
//! version of the same program is not.

use std::path::{Path, PathBuf};
use upstare_dwarf::fdt::FrameTables;
use upstare_patcher::{default_plan, plan_with_spec, review, Spec};
use upstare_testkit::{compile_instrumented, Toolchain};

fn tables(name: &str, src: &str) -> FrameTables {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("patcher-unrelated");
    std::fs::create_dir_all(&dir).expect("dir");
    let up = compile_instrumented(&dir, name, src, Toolchain::Gcc, &[]);
    upstare_dwarf::read_tables(&std::fs::read(up).expect("read")).expect("tables")
}

/// OLD: 3 functions (main, deposit, report), 2 globals.
const BANK: &str = r#"
#include <stdio.h>
long accounts[3] = {100, 250, 75};
long total_deposited;
long deposit(int i, long amount) { accounts[i] += amount; total_deposited += amount; return accounts[i]; }
void report(int round) { printf("%d %ld\n", round, total_deposited); }
int main(void) {
    for (int round = 1; round <= 3; round++) { deposit(round % 3, round * 10); report(round); }
    return 0;
}
"#;

/// The next version: one function renamed, one global added.
const BANK_V2: &str = r#"
#include <stdio.h>
long accounts[3] = {100, 250, 75};
long total_deposited;
long fees;
long deposit(int i, long amount) { accounts[i] += amount - 1; fees++; total_deposited += amount; return accounts[i]; }
void print_report(int round) { printf("%d %ld %ld\n", round, total_deposited, fees); }
int main(void) {
    for (int round = 1; round <= 3; round++) { deposit(round % 3, round * 10); print_report(round); }
    return 0;
}
"#;

/// Another program that happens to have a `main`.
const OTHER_WITH_MAIN: &str = r#"
#include <stdio.h>
double samples[8];
int count;
void record(double x) { samples[count++ % 8] = x; }
int main(void) { for (int i = 0; i < 4; i++) record(i * 0.5); printf("%d\n", count); return 0; }
"#;

/// Another program sharing `main` and `report` with OLD, nothing else.
const OTHER_SAME_HELPER: &str = r#"
#include <stdio.h>
int grid[4][4];
void report(int round) { printf("%d\n", round); }
static int step(int k) { grid[k % 4][k / 4 % 4]++; return grid[0][0]; }
int main(void) { for (int k = 0; k < 9; k++) report(step(k)); return 0; }
"#;

#[test]
fn another_program_is_refused_naming_what_does_not_match() {
    let old = tables("bank", BANK);
    // A real next version: 1 of 3 functions and 0 of 2 globals unmatched.
    let v2 = tables("bank_v2", BANK_V2);
    assert_eq!(default_plan(&old, &v2).unrelated, None);

    // main matches, report matches, but deposit, accounts and
    // total_deposited do not: 3 of 5 unmatched.
    let other = tables("other_helper", OTHER_SAME_HELPER);
    let plan = default_plan(&old, &other);
    let u = plan.unrelated.clone().expect("refused");
    let text = u.to_string();
    assert!(!u.main, "{text}");
    assert_eq!((u.functions, u.function_total), (1, 3), "{text}");
    assert_eq!((u.globals, u.global_total), (2, 2), "{text}");
    for name in ["deposit", "accounts", "total_deposited"] {
        assert!(text.contains(name), "{text}");
    }
    assert!(text.contains("accept.unmatched = 3"), "{text}");
    // The review says it needs the user, with the SPEC line: a PATCH made
    // from it is incomplete and refused.
    let r = review(&old, &other, &plan);
    assert_eq!(r.needs_user.len(), 1, "{:?}", r.needs_user);
    assert_eq!(r.needs_user[0].spec_line, "accept.unmatched = 3");
    let rendered = upstare_patcher::review::render_text(&r);
    assert!(
        rendered.contains("looks like another program"),
        "{rendered}"
    );

    // Sharing only main: 4 of 5 unmatched.
    let with_main = tables("other_main", OTHER_WITH_MAIN);
    let u = default_plan(&old, &with_main).unrelated.expect("refused");
    assert!(!u.main);
    assert_eq!(u.functions + u.globals, 4, "{u}");
}

#[test]
fn main_without_counterpart_is_refused_even_when_the_rest_matches() {
    let old = tables("bank", BANK);
    let v2 = tables("bank_v2", BANK_V2);
    // main mapped to a function NEW lacks: 2 of 5 unmatched (main and
    // report), yet refused for main.
    let spec = Spec::parse(
        Path::new("s.toml"),
        "[rename.functions]\nmain = \"start\"\n",
    )
    .expect("parse");
    let u = plan_with_spec(&old, &v2, &spec).unrelated.expect("refused");
    assert!(u.main);
    assert_eq!(u.functions + u.globals, 2, "{u}");
    assert!(u.to_string().contains("main has no counterpart"), "{u}");
}

#[test]
fn the_spec_accepts_exactly_the_count_it_names() {
    let old = tables("bank", BANK);
    let other = tables("other_helper", OTHER_SAME_HELPER);
    let path = Path::new("accept.toml");
    let wrong = Spec::parse(path, "[accept]\nunmatched = 2\n").expect("parse");
    let e = wrong
        .check(path, &old, &other)
        .expect_err("wrong count")
        .to_string();
    assert_eq!(
        e,
        "accept.toml: [accept] \"unmatched\": 3 of OLD's functions and globals have no counterpart in NEW, not 2"
    );
    let right = Spec::parse(path, "[accept]\nunmatched = 3\n").expect("parse");
    right.check(path, &old, &other).expect("right count");
    assert_eq!(plan_with_spec(&old, &other, &right).unrelated, None);
    // Checked against both versions: the same SPEC for the real next
    // version is refused (it has 1 unmatched, not 3).
    let v2 = tables("bank_v2", BANK_V2);
    assert!(right.check(path, &old, &v2).is_err());
}
