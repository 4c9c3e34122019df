//! The default plan made from two real compiled and instrumented versions
//! (gcc and clang), with no process: what it maps, what it refuses, and what
//! it says — each warning once.

use std::path::PathBuf;
use upstare_dwarf::fdt::{Continuation, FrameTables};
use upstare_patcher::{default_plan, CallShape, GlobalAction, SiteKind, UpdatePlan, VarSource};
use upstare_testkit::{compile_instrumented, Toolchain};

const TOOLCHAINS: [Toolchain; 2] = [Toolchain::Gcc, Toolchain::Clang];

/// Compiles `src` with `tc`, instruments it and returns its tables.
fn tables(name: &str, src: &str, tc: Toolchain) -> FrameTables {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("patcher-plan");
    std::fs::create_dir_all(&dir).expect("dir");
    let up = compile_instrumented(&dir, &format!("{name}.{}", tc.name()), src, tc, &[]);
    let bytes = std::fs::read(&up).expect("read instrumented binary");
    upstare_dwarf::read_tables(&bytes).expect("tables")
}

fn plan(name: &str, v1: &str, v2: &str, tc: Toolchain) -> (FrameTables, FrameTables, UpdatePlan) {
    let old = tables(&format!("{name}.v1"), v1, tc);
    let new = tables(&format!("{name}.v2"), v2, tc);
    let p = default_plan(&old, &new);
    (old, new, p)
}

const V1: &str = r#"
#include <stdio.h>
long counter = 5;
long dropped = 7;
int retyped = 3;
static const int table[4] = {1, 2, 3, 4};
long step(long x) { long twice = x * 2; return twice + table[x & 3]; }
long gone(long x) { return x - 1; }
long finish(long a) { return a + gone(counter) + dropped + retyped; }
int main(void) {
    long acc = 0;
    for (long i = 0; i < 3; i++) {
        acc += step(i);
        printf("%ld\n", acc);
    }
    return (int)finish(acc) & 1;
}
"#;

const V2: &str = r#"
#include <stdio.h>
long counter = 5;
long added = 11;
long retyped = 3;
static const int table[6] = {1, 2, 3, 4, 5, 6};
long step(long x) { long bonus = 1; long twice = x * 2; return twice + table[x & 3] + bonus; }
long finish(long a) { return a + counter + added + retyped; }
int main(void) {
    long acc = 0;
    for (long i = 0; i < 3; i++) {
        acc += step(i);
        printf("%ld\n", acc);
    }
    return (int)finish(acc) & 1;
}
"#;

fn global_action<'p>(p: &'p UpdatePlan, old: &FrameTables, name: &str) -> &'p GlobalAction {
    let i = old
        .globals
        .iter()
        .position(|g| g.name == name && g.owner.is_none())
        .unwrap_or_else(|| panic!("no global {name}"));
    &p.global(i).expect("mapping").action
}

#[test]
fn globals_are_mapped_by_name_and_each_warning_is_said_once() {
    for tc in TOOLCHAINS {
        let (old, new, p) = plan("globals", V1, V2, tc);
        assert_eq!(
            p.globals.len(),
            old.globals.len(),
            "one mapping per old global"
        );
        assert_eq!(global_action(&p, &old, "counter"), &GlobalAction::Copy);
        assert_eq!(global_action(&p, &old, "dropped"), &GlobalAction::Removed);
        // int → long widens: converted, and the review says so.
        match global_action(&p, &old, "retyped") {
            GlobalAction::Convert { change } => {
                assert_eq!(change.old_type, "int");
                assert!(change.new_type.starts_with("long"), "{}", change.new_type);
                assert!(
                    change.changes.iter().any(|c| c.contains("int → long")),
                    "{:?}",
                    change.changes
                );
            }
            other => panic!("retyped: {other}"),
        }
        // The read-only table grew: NEW's value is kept, no user input.
        assert_eq!(global_action(&p, &old, "table"), &GlobalAction::KeepNew);
        let added: Vec<&str> = p
            .new_globals
            .iter()
            .map(|&j| new.globals[j].name.as_str())
            .collect();
        assert_eq!(added, ["added"], "[{}]", tc.name());
        let count = |needle: &str| p.warnings.iter().filter(|w| w.contains(needle)).count();
        assert_eq!(count("global added is new"), 1, "{:?}", p.warnings);
        assert_eq!(count("global dropped was removed"), 1, "{:?}", p.warnings);
        assert_eq!(
            p.type_changed_globals().count(),
            0,
            "nothing needs the user"
        );
    }
}

#[test]
fn a_read_only_table_keeps_the_new_value_and_an_unchanged_one_is_copied() {
    const T1: &str = "static const int table[4] = {1, 2, 3, 4};\nconst int same[2] = {1, 2};\nint main(void) { return table[1] + same[0]; }\n";
    const T2: &str = "static const int table[4] = {9, 9, 9, 9};\nconst int same[2] = {1, 2};\nint main(void) { return table[1] + same[0]; }\n";
    for tc in TOOLCHAINS {
        let (old, _, p) = plan("consts", T1, T2, tc);
        assert_eq!(global_action(&p, &old, "same"), &GlobalAction::KeepNew);
        let table = old
            .globals
            .iter()
            .position(|g| g.name == "table")
            .expect("table");
        assert_eq!(
            p.global(table).expect("mapping").action,
            GlobalAction::KeepNew
        );
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }
}

#[test]
fn frames_map_by_variable_name_and_continuation_id() {
    for tc in TOOLCHAINS {
        let (old, new, p) = plan("frames", V1, V2, tc);
        // Removed function: no target.
        assert_eq!(p.function("gone").expect("gone").new, None);
        // step gains a local declared first: the layout changes, `twice`
        // comes from the old frame, `bonus` starts as zero.
        let step = p.function("step").expect("step");
        let nf = &new.functions[step.new.expect("step in NEW")];
        let of = &old.functions[step.old];
        for (k, v) in nf.vars.iter().enumerate() {
            match (v.name.as_str(), &step.vars[k]) {
                ("bonus", VarSource::Zero) => {}
                ("twice" | "x", VarSource::Old(i)) => assert_eq!(of.vars[*i].name, v.name),
                (name, source) => panic!("[{}] step.{name}: {source:?}", tc.name()),
            }
        }
        let entry = step
            .continuation(&Continuation::Entry, SiteKind::Point)
            .expect("entry");
        assert!(entry.new_site.is_some());
        assert!(!entry.copy_paused, "step's layout changed: not copied");
        // main is unchanged in layout: its frames are copied whole, at its
        // loop and in its call to step.
        let main = p.function("main").expect("main");
        assert!(main.vars.iter().all(|v| matches!(v, VarSource::Old(_))));
        let looped = main
            .continuation(&Continuation::Loop(0), SiteKind::Point)
            .expect("loop#0");
        assert!(looped.copy_paused, "[{}] main at loop#0", tc.name());
        let call = main
            .continuation(
                &Continuation::Call {
                    callee: "step".into(),
                    ordinal: 0,
                },
                SiteKind::Call,
            )
            .expect("call:step#0");
        assert!(call.copy_paused && call.copy_restarted);
        assert!(
            matches!(call.call_shape, CallShape::Same { .. }),
            "{:?}",
            call.call_shape
        );
        // A continuation NEW lacks has no target.
        let finish = p.function("finish").expect("finish");
        let gone_call = finish
            .continuation(
                &Continuation::Call {
                    callee: "gone".into(),
                    ordinal: 0,
                },
                SiteKind::Call,
            )
            .expect("call:gone#0 in OLD");
        assert_eq!(gone_call.new_site, None);
    }
}

#[test]
fn a_widened_local_is_converted_and_a_change_of_meaning_is_named_not_mapped() {
    const L1: &str = "int f(int n) { int total = n; long flag = 1; return total + (int)flag; }\nint main(void) { return f(1); }\n";
    const L2: &str = "int f(int n) { long total = n; char *flag = 0; return (int)total + (flag != 0); }\nint main(void) { return f(1); }\n";
    for tc in TOOLCHAINS {
        let (_, new, p) = plan("local", L1, L2, tc);
        let f = p.function("f").expect("f");
        let nf = &new.functions[f.new.expect("f in NEW")];
        let var = |name: &str| {
            let k = nf.vars.iter().position(|v| v.name == name).expect("var");
            &f.vars[k]
        };
        match var("total") {
            VarSource::Convert { change, .. } => {
                assert_eq!(change.old_type, "int");
                assert!(change.new_type.starts_with("long"), "{}", change.new_type);
            }
            other => panic!("[{}] total: {other:?}", tc.name()),
        }
        match var("flag") {
            VarSource::TypeChanged { why, .. } => {
                assert!(why.contains("changes the meaning"), "{why}");
                assert!(why.contains("local flag"), "names the variable: {why}");
            }
            other => panic!("[{}] flag: {other:?}", tc.name()),
        }
    }
}

#[test]
fn the_plan_is_plain_data_that_round_trips() {
    let (_, _, p) = plan("roundtrip", V1, V2, Toolchain::Gcc);
    let text = serde_json::to_string(&p).expect("serialize");
    let back: UpdatePlan = serde_json::from_str(&text).expect("deserialize");
    assert_eq!(back, p);
}

/// Two files each with a `static long count` (and a static local `calls`
/// in a function of the same name in each): each pairs with the one of its
/// own file, never the other's.
#[test]
fn statics_of_one_name_in_several_files_pair_by_file() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("patcher-units");
    std::fs::create_dir_all(&dir).expect("dir");
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write source");
        p
    };
    let file = |tag: &str, extra: &str| {
        format!(
            "static long count = 1;\n{extra}static long bump(void) {{ static long calls; calls++; return ++count + calls; }}\nlong {tag}_tick(void) {{ return bump(); }}\n"
        )
    };
    let main_c = write(
        "main.c",
        "long a_tick(void);\nlong b_tick(void);\nint main(void) { return (int)(a_tick() + b_tick()); }\n",
    );
    let tables_of = |version: &str, b_extra: &str| {
        let a = write(&format!("a_{version}.c"), &file("a", ""));
        // Same file names in both versions: a.c and b.c.
        let a_named = dir.join("a.c");
        std::fs::copy(&a, &a_named).expect("copy");
        let b_named = write("b.c", &file("b", b_extra));
        let exe = dir.join(format!("units.{version}"));
        upstare_testkit::compile_files(
            Toolchain::Gcc,
            &[&main_c, &a_named, &b_named],
            &[],
            &[],
            &exe,
        )
        .expect("compile");
        let up = upstare_testkit::instrument(&exe, &dir.join(format!("units.{version}.up")));
        upstare_dwarf::read_tables(&std::fs::read(up).expect("read")).expect("tables")
    };
    let old = tables_of("v1", "");
    // v2: b.c's statics move (a new global before them), a.c's do not.
    let new = tables_of(
        "v2",
        "static long pad[4] = {9, 9, 9, 9};\nlong *keep = pad;\n",
    );
    let p = default_plan(&old, &new);
    for (i, g) in old.globals.iter().enumerate() {
        if g.name != "count" && g.name != "calls" {
            continue;
        }
        let m = p.global(i).expect("mapping");
        let n = &new.globals[m
            .new
            .unwrap_or_else(|| panic!("{} of {} unmapped", g.name, g.unit))];
        assert_eq!(
            (&n.name, &n.unit, &n.owner),
            (&g.name, &g.unit, &g.owner),
            "paired across files"
        );
    }
    let counts = old.globals.iter().filter(|g| g.name == "count").count();
    assert_eq!(counts, 2, "one count per file");
    // A static local is carried as a global, never reported as a removed
    // local of its function's frames.
    let bump = p.function("bump").expect("bump");
    assert!(bump.removed_vars.is_empty(), "{:?}", bump.removed_vars);
}

/// A program whose `sum` has a loop (`head` before it, `body` its body)
/// and whose `main` calls `sum` `calls` times.
fn loop_program(head: &str, body: &str, calls: usize) -> String {
    format!(
        "long items[3] = {{1, 2, 3}};\nlong sum(void) {{\n    long s = 0;\n{head}    for (long i = 0; i < 3; i++) {{\n{body}    }}\n    return s;\n}}\nint main(void) {{ return 0{}; }}\n",
        " + (int)sum()".repeat(calls)
    )
}

const LOOP_BODY: &str = "        s += items[i];\n";
/// NEW adds an inner loop inside `sum`'s loop.
const INNER_LOOP_BODY: &str =
    "        s += items[i];\n        for (int k = 0; k < 2; k++)\n            s++;\n";
/// NEW shifts the loop by a line above and wraps its body in an `if`.
const SHIFT_HEAD: &str = "    long unused = 1;\n";
const WRAPPED_BODY: &str = "        if (items[i] > 0) s += items[i] + unused;\n";

#[test]
fn loops_and_calls_renumbered_by_new_ones_are_not_paired_by_number() {
    for tc in TOOLCHAINS {
        let v1 = loop_program("", LOOP_BODY, 2);
        // A new inner loop and a third call to `sum`.
        let v2 = loop_program("", INNER_LOOP_BODY, 3);
        let (_, _, p) = plan("renumbered", &v1, &v2, tc);
        let sum = p.function("sum").expect("sum");
        let l = sum
            .continuation(&Continuation::Loop(0), SiteKind::Point)
            .expect("loop#0");
        assert_eq!(l.new_site, None, "[{}] {l:?}", tc.name());
        let why = l.unsure.as_deref().unwrap_or_default();
        assert!(
            why.contains("the loops of sum changed"),
            "[{}] {why}",
            tc.name()
        );
        let entry = sum
            .continuation(&Continuation::Entry, SiteKind::Point)
            .expect("entry");
        assert!(entry.new_site.is_some() && entry.unsure.is_none());
        let main = p.function("main").expect("main");
        for ordinal in 0..2 {
            let id = Continuation::Call {
                callee: "sum".into(),
                ordinal,
            };
            let c = main.continuation(&id, SiteKind::Call).expect("call");
            assert_eq!(c.new_site, None, "[{}] {id}", tc.name());
            assert!(c.unsure.is_some(), "[{}] {id}", tc.name());
        }
        // The review names each and the SPEC line that settles it.
        let (old, new) = (
            tables("renumbered.v1", &v1, tc),
            tables("renumbered.v2", &v2, tc),
        );
        let r = upstare_patcher::review(&old, &new, &p);
        let n = r
            .needs_user
            .iter()
            .find(|n| n.what == "sum@loop#0")
            .expect("sum@loop#0 needs the user");
        assert_eq!(n.spec_line, "continuations.\"sum@loop#0\" = \"sum@loop#0\"");
        assert!(!r.continuations_gone.iter().any(|c| c == "sum@loop#0"));

        let v3 = loop_program(SHIFT_HEAD, WRAPPED_BODY, 2);
        let (_, _, p) = plan("shifted", &v1, &v3, tc);
        let sum = p.function("sum").expect("sum");
        let l = sum
            .continuation(&Continuation::Loop(0), SiteKind::Point)
            .expect("loop#0");
        assert!(
            l.new_site.is_some() && l.unsure.is_none(),
            "[{}] {l:?}",
            tc.name()
        );
        let main = p.function("main").expect("main");
        assert!(main
            .continuations
            .iter()
            .all(|c| c.new_site.is_some() && c.unsure.is_none()));
    }
}
