//! The machine-code analysis on real gcc (PIE, -no-pie) and clang output:
//! loops, jump tables, call temporaries, stack depths, update points,
//! refusals.

mod analysis_common;

use analysis_common::{analyze, compile, line_of, Toolchain};
use upstare_dwarf::fdt::{Callee, PointKind};
use upstare_dwarf::{LinkAddr, Reg};
use upstare_rewriter::analysis::{AnalysisError, DYNAMIC_DEPTH};

const LOOPS: &str = r#"
#include <stdio.h>
int none(int n)
{
    return n * 2;
}
int for_loop(int n)
{
    int s = 0;
    for (int i = 0; i < n; i++) {
        s += i;
    }
    return s;
}
int while_loop(int n)
{
    int s = 0;
    while (n > 0) {
        s += n;
        n--;
    }
    return s;
}
int do_loop(int n)
{
    int s = 0;
    do {
        s += n;
        n--;
    } while (n > 0);
    return s;
}
int goto_loop(int n)
{
    int s = 0;
again:
    s += n;
    n--;
    if (n > 0)
        goto again;
    return s;
}
int nested(int n)
{
    int s = 0;
    for (int a = 0; a < n; a++) {
        if (a == 2)
            continue;
        for (int b = 0; b < n; b++) {
            if (b == 5)
                break;
            s += a * b;
        }
    }
    return s;
}
int forever(int n)
{
    int s = 0;
    for (;;) {
        s += n;
        if (s > 100)
            break;
    }
    return s;
}
int three(int n)
{
    int s = 0;
    for (int i = 0; i < n; i++)
        s++;
    int j = n;
    while (j--)
        s += 2;
    do {
        s -= 1;
    } while (s > 1000);
    return s;
}
int main(int argc, char **argv)
{
    int n = argc + 6;
    printf("%d %d %d %d %d %d %d %d\n", none(n), for_loop(n), while_loop(n), do_loop(n),
           goto_loop(n), nested(n), forever(n), three(n));
    return 0;
}
"#;

/// Loops per function in `LOOPS`.
const LOOP_COUNTS: &[(&str, usize)] = &[
    ("none", 0),
    ("for_loop", 1),
    ("while_loop", 1),
    ("do_loop", 1),
    ("goto_loop", 1),
    ("nested", 2),
    ("forever", 1),
    ("three", 3),
    ("main", 0),
];

#[test]
fn loops_are_found_and_each_gets_an_update_point() {
    for cc in Toolchain::ALL {
        let (_dir, bin) = compile(LOOPS, cc, &[]);
        let a = analyze(&bin);
        for &(name, n) in LOOP_COUNTS {
            let (t, d) = a.get(name);
            assert_eq!(d.loops.len(), n, "{cc:?} {name}: loops {:?}", d.loops);
            // Headers in address order.
            assert!(d.loops.windows(2).all(|w| w[0].header < w[1].header));
            for k in 0..n {
                let p = t
                    .update_points
                    .iter()
                    .find(|p| p.kind == PointKind::Loop(k as u32))
                    .unwrap_or_else(|| {
                        panic!("{cc:?} {name}: loop#{k} has no point: {:?}", d.notes)
                    });
                // The point lies in one of the loop's blocks.
                let l = &d.loops[k];
                let in_loop = l.blocks.iter().any(|&b| {
                    let i = d.block_starts.partition_point(|&s| s <= p.addr);
                    i > 0 && d.block_starts[i - 1] == b
                });
                assert!(
                    in_loop,
                    "{cc:?} {name}: loop#{k} point {} outside the loop",
                    p.addr
                );
                assert_eq!(p.stack_depth, t.body_depth, "{cc:?} {name}");
            }
            assert!(
                t.update_points.iter().any(|p| p.kind == PointKind::Entry),
                "{cc:?} {name}: no entry point: {:?}",
                d.notes
            );
        }
    }
}

#[test]
fn update_points_are_line_starts_never_on_a_closing_brace() {
    for cc in Toolchain::ALL {
        let (_dir, bin) = compile(LOOPS, cc, &[]);
        let a = analyze(&bin);
        let lines: Vec<&str> = LOOPS.lines().collect();
        for &(name, _) in LOOP_COUNTS {
            let t = a.table(name);
            // The closing brace of the function, from the source text.
            let close = (t.decl_line as usize..lines.len())
                .find(|&i| lines[i] == "}")
                .map(|i| i as u32 + 1)
                .expect("closing brace");
            for p in &t.update_points {
                assert_ne!(
                    p.line, close,
                    "{cc:?} {name}: point {} on the closing brace",
                    p.addr
                );
                // A row of the line table starts at the point.
                let rows = a.program.rows_in(p.addr, LinkAddr(p.addr.0 + 1));
                assert!(
                    rows.iter().any(|r| r.is_stmt && r.line == p.line),
                    "{cc:?} {name}: point {} is not at an is_stmt row",
                    p.addr
                );
                assert!(p.addr >= t.low && p.addr < t.high);
            }
        }
    }
}

const SWITCH: &str = r#"
#include <stdio.h>
int sw(int x)
{
    int r = 0;
    switch (x) {
    case 0: r = 10; break; /*C0*/
    case 1: r = 11; break; /*C1*/
    case 2: r = 12; break; /*C2*/
    case 3: r = 13; break; /*C3*/
    case 4: r = 14; break; /*C4*/
    case 5: r = 15; break; /*C5*/
    case 7: r = 17; break; /*C7*/
    default: r = -1; /*CD*/
    }
    return r;
}
int sw_off(int x)
{
    switch (x) {
    case 100: return 1; /*D0*/
    case 101: return 2; /*D1*/
    case 102: return 3; /*D2*/
    case 103: return 4; /*D3*/
    case 104: return 5; /*D4*/
    case 105: return 6; /*D5*/
    }
    return 0;
}
int main(int argc, char **argv)
{
    int s = 0;
    for (int i = 0; i < 9; i++)
        s += sw(i + argc - 1) + sw_off(i + 99 + argc);
    printf("%d\n", s);
    return 0;
}
"#;

#[test]
fn jump_table_targets_are_block_starts() {
    for cc in Toolchain::ALL {
        for extra in [&[][..], &["-fcf-protection"][..]] {
            if cc == Toolchain::Clang && !extra.is_empty() {
                continue;
            }
            let (_dir, bin) = compile(SWITCH, cc, extra);
            let a = analyze(&bin);
            for (name, markers) in [
                ("sw", &["C0", "C1", "C2", "C3", "C4", "C5", "C7", "CD"][..]),
                ("sw_off", &["D0", "D1", "D2", "D3", "D4", "D5"][..]),
            ] {
                let (t, d) = a.get(name);
                assert_eq!(d.jump_tables.len(), 1, "{cc:?} {extra:?} {name}");
                let jt = &d.jump_tables[0];
                for m in markers {
                    let line = line_of(SWITCH, &format!("/*{m}*/"));
                    // The first address of the case's line, from the line table.
                    let start = a
                        .program
                        .rows_in(t.low, t.high)
                        .iter()
                        .filter(|r| r.line == line)
                        .map(|r| r.addr)
                        .min()
                        .unwrap_or_else(|| panic!("{cc:?} {name}: no row for line {line}"));
                    assert!(
                        d.block_starts.contains(&start),
                        "{cc:?} {extra:?} {name}: case {m} at {start} is not a block start"
                    );
                    assert!(
                        jt.targets.contains(&start),
                        "{cc:?} {extra:?} {name}: case {m} at {start} not in table {:?}",
                        jt.targets
                    );
                }
                // sw: cases 0..=7 (6 is the default): 8 entries.
                if name == "sw" {
                    assert_eq!(jt.entries, 8, "{cc:?} {name}");
                    assert_eq!(jt.targets.len(), 8, "{cc:?} {name}");
                } else {
                    assert_eq!(jt.entries, 6, "{cc:?} {name}");
                }
            }
        }
    }
}

const CALLS: &str = r#"
#include <stdio.h>
#include <stdlib.h>
int f(void) { return 3; }
int g(void) { return 4; }
int h(int x) { return x + 5; }
int one(int a) { return a + 1; }
int seven(int a, int b, int c, int d, int e, int f_, int g_) { return a + g_; }
int eight(int a, int b, int c, int d, int e, int f_, int g_, int h_) { return a + g_ + h_; }
int expr(int x)
{
    int a;
    a = f() + g() * h(x); /*EXPR*/
    return a;
}
int stackargs(int x)
{
    int s = one(x);
    s += seven(1, 2, 3, 4, 5, 6, x);
    s += eight(1, 2, 3, 4, 5, 6, 7, x);
    s += one(s);
    return s;
}
int simple(int x)
{
    int v = one(x); /*SIMPLE*/
    x = v + 2;
    return x;
}
int (*fp)(int) = one;
int indirect(int x)
{
    int r = fp(x);
    r += fp(r);
    return r;
}
int main(int argc, char **argv)
{
    int r = expr(argc) + stackargs(argc) + simple(argc) + indirect(argc);
    printf("%d\n", r);
    puts("done");
    exit(r == 0);
}
"#;

#[test]
fn gcc_keeps_call_temporaries_in_rbx_and_r12_clang_in_slots() {
    for cc in Toolchain::ALL {
        let (_dir, bin) = compile(CALLS, cc, &[]);
        let a = analyze(&bin);
        let t = a.table("expr");
        let call = |n: &str| {
            t.call_sites
                .iter()
                .find(|c| c.callee == Callee::Direct(n.into()))
                .unwrap_or_else(|| panic!("{cc:?}: no call to {n}"))
        };
        let (cf, cg, ch) = (call("f"), call("g"), call("h"));
        let line = line_of(CALLS, "/*EXPR*/");
        for c in [cf, cg, ch] {
            assert_eq!(c.line, line);
            assert_eq!(c.ordinal, 0);
        }
        if !cc.is_clang() {
            // r12d = f() across g() and h(); ebx = g() across h().
            assert_eq!(cf.live_regs, Vec::<Reg>::new(), "{cc:?}");
            assert_eq!(cg.live_regs, vec![Reg::R12], "{cc:?}");
            assert_eq!(ch.live_regs, vec![Reg::Rbx, Reg::R12], "{cc:?}");
            assert!(ch.temp_slots.is_empty(), "{cc:?}: {:?}", ch.temp_slots);
        } else {
            // clang spills f() and g() to anonymous 4-byte slots.
            assert!(ch.live_regs.is_empty());
            assert!(cf.temp_slots.is_empty());
            assert_eq!(cg.temp_slots.len(), 1, "{:?}", cg.temp_slots);
            assert_eq!(ch.temp_slots.len(), 2, "{:?}", ch.temp_slots);
            assert!(ch.temp_slots.iter().all(|s| s.size == 4));
            assert!(ch.temp_slots.contains(&cg.temp_slots[0]));
            // No DWARF variable covers a temporary slot.
            for s in &ch.temp_slots {
                for v in &t.vars {
                    if let upstare_dwarf::model::VarLocation::Cfa(o) = v.location {
                        assert!(
                            o.0 + 4 <= s.offset.0 || s.offset.0 + 4 <= o.0,
                            "{} overlaps",
                            v.name
                        );
                    }
                }
            }
        }
        // f, g and h only compute values: every call of the statement
        // restarts it (a helper with effects stops that, see
        // `a_blocking_call_restarts_over_a_pure_helper_in_its_arguments`).
        let stmt = a.statement_start("expr", line);
        assert_eq!(cf.restart, Some(stmt), "{cc:?}");
        assert_eq!(cg.restart, Some(stmt), "{cc:?}");
        assert_eq!(ch.restart, Some(stmt), "{cc:?}");

        // `int v = one(x);` restarts at its statement.
        let s = a.table("simple");
        let line = line_of(CALLS, "/*SIMPLE*/");
        let c = &s.call_sites[0];
        let stmt = a.statement_start("simple", line);
        assert_eq!(c.restart, Some(stmt), "{cc:?}");
        assert!(c.restart.is_some_and(|r| r < c.call_addr));
    }
}

#[test]
fn stack_arguments_deepen_the_stack_at_the_call() {
    for cc in Toolchain::ALL {
        let (_dir, bin) = compile(CALLS, cc, &[]);
        let a = analyze(&bin);
        let t = a.table("stackargs");
        let depth = |n: &str, k: u32| {
            t.call_sites
                .iter()
                .find(|c| c.callee == Callee::Direct(n.into()) && c.ordinal == k)
                .unwrap_or_else(|| panic!("{cc:?}: no call {n}#{k}"))
                .stack_depth
                .0
        };
        let plain = depth("one", 0);
        assert_eq!(plain, depth("one", 1), "{cc:?}");
        assert_eq!(plain, t.body_depth.0, "{cc:?}");
        if !cc.is_clang() {
            // gcc pushes stack arguments; with -fipa-stack-alignment and
            // only local callees, no padding.
            assert_eq!(depth("seven", 0), plain - 8, "{cc:?}");
            assert_eq!(depth("eight", 0), plain - 16, "{cc:?}");
        } else {
            // clang stores them into a preallocated area.
            assert_eq!(depth("seven", 0), plain, "{cc:?}");
            assert_eq!(depth("eight", 0), plain, "{cc:?}");
        }
        assert!(t.extent.0 <= depth("eight", 0));
    }
}

#[test]
fn callees_are_named_direct_plt_or_indirect() {
    for cc in Toolchain::ALL {
        for extra in [&[][..], &["-Wl,-z,now"][..], &["-fcf-protection"][..]] {
            let (_dir, bin) = compile(CALLS, cc, extra);
            let a = analyze(&bin);
            let m = a.table("main");
            let callees: Vec<&Callee> = m.call_sites.iter().map(|c| &c.callee).collect();
            for want in [
                Callee::Direct("expr".into()),
                Callee::Plt("printf".into()),
                Callee::Plt("puts".into()),
                Callee::Plt("exit".into()),
            ] {
                assert!(
                    callees.contains(&&want),
                    "{cc:?} {extra:?}: {want:?} not in {callees:?}"
                );
            }
            let ind = a.table("indirect");
            assert_eq!(ind.call_sites.len(), 2);
            for (k, c) in ind.call_sites.iter().enumerate() {
                assert_eq!(c.callee, Callee::Indirect);
                assert_eq!(c.ordinal, k as u32);
                assert_eq!(
                    c.return_addr.0,
                    c.call_addr.0 + 2,
                    "{cc:?}: call rdx/rax is 2 bytes"
                );
            }
            // Call sites are in address order and inside the function.
            for t in a.fns.values().flatten().map(|x| &x.0) {
                assert!(t
                    .call_sites
                    .windows(2)
                    .all(|w| w[0].call_addr < w[1].call_addr));
                assert!(t
                    .call_sites
                    .iter()
                    .all(|c| c.call_addr >= t.low && c.return_addr <= t.high));
            }
        }
    }
}

const VLA: &str = r#"
#include <stdio.h>
int use(int *p, int n) { return p[n - 1]; }
int vla(int n)
{
    int s = 0;
    for (int i = 0; i < n; i++) /*OUTSIDE*/
        s += i;
    {
        int v[n];
        for (int i = 0; i < n; i++) /*INSIDE*/
            v[i] = i * 2;
        s += use(v, n); /*VLACALL*/
    }
    s += use(&s, 1);
    return s;
}
int main(int argc, char **argv)
{
    printf("%d\n", vla(argc + 4));
    return 0;
}
"#;

#[test]
fn no_update_point_inside_a_vla_scope() {
    for cc in Toolchain::ALL {
        let (_dir, bin) = compile(VLA, cc, &[]);
        let a = analyze(&bin);
        let (t, d) = a.get("vla");
        assert_eq!(d.loops.len(), 2, "{cc:?}");
        let inside = line_of(VLA, "/*INSIDE*/");
        let outside = line_of(VLA, "/*OUTSIDE*/");
        let points: Vec<_> = t
            .update_points
            .iter()
            .filter(|p| p.kind != PointKind::Entry)
            .collect();
        assert_eq!(points.len(), 1, "{cc:?}: {points:?} {:?}", d.notes);
        assert!(
            points[0].line >= outside && points[0].line < inside,
            "{cc:?}: {points:?}"
        );
        // The call inside the VLA scope has a run-time stack depth; the one
        // after the scope is back at the body depth.
        let vla_line = line_of(VLA, "/*VLACALL*/");
        let calls: Vec<_> = t.call_sites.iter().collect();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].line, vla_line);
        assert_eq!(calls[0].stack_depth, DYNAMIC_DEPTH, "{cc:?}");
        assert_eq!(calls[0].restart, None);
        assert_eq!(calls[1].stack_depth, t.body_depth, "{cc:?}");
    }
}

#[test]
fn realigned_and_frameless_functions_are_refused() {
    let src = r#"
int aligned(int x)
{
    _Alignas(32) int a[8];
    a[x & 7] = x;
    return a[0];
}
int plain(int x) { return x + 1; }
int main(int argc, char **argv) { return aligned(argc) + plain(argc); }
"#;
    for cc in Toolchain::ALL {
        let (_dir, bin) = compile(src, cc, &[]);
        let a = analyze(&bin);
        let e = a.error("aligned");
        assert!(matches!(e, AnalysisError::Realigned { .. }), "{cc:?}: {e}");
        assert!(e.to_string().contains("aligned"), "{e}");
        a.get("plain");
    }
    // Optimized code without a frame pointer.
    let (_dir, bin) = compile(
        "int leaf(int x) { return x * 3 + 1; }\nint main(int c, char **v) { return leaf(c); }\n",
        Toolchain::Gcc,
        &["-O2", "-fomit-frame-pointer"],
    );
    let a = analyze(&bin);
    let e = a.error("leaf");
    assert!(matches!(e, AnalysisError::NoFramePointer { .. }), "{e}");
    assert!(e.to_string().starts_with("function leaf:"), "{e}");
}

#[test]
fn frame_extent_covers_the_red_zone() {
    let src = r#"
int big_leaf(int i, int a)
{
    char buf[200];
    buf[i] = (char)a;
    return buf[i + 1];
}
int small_leaf(int a)
{
    volatile long x = a, y = 2, z = 3;
    return (int)(x + y + z);
}
int main(int argc, char **argv) { return big_leaf(argc, 3) + small_leaf(argc); }
"#;
    for cc in Toolchain::ALL {
        let (_dir, bin) = compile(src, cc, &[]);
        let a = analyze(&bin);
        for name in ["big_leaf", "small_leaf"] {
            let t = a.table(name);
            // Below rsp: the red zone holds locals.
            assert!(
                t.extent.0 < t.body_depth.0,
                "{cc:?} {name}: {} vs {}",
                t.extent,
                t.body_depth
            );
            for v in &t.vars {
                if let upstare_dwarf::model::VarLocation::Cfa(o) = v.location {
                    assert!(t.extent.0 <= o.0, "{cc:?} {name}: {} below extent", v.name);
                }
            }
        }
        // buf[200] plus the two spilled ints.
        assert!(a.table("big_leaf").extent.0 <= -(16 + 200), "{cc:?}");
    }
}

const BLOCKING: &str = r#"
#include <unistd.h>
#include <stdio.h>
int rd(int fd, char *buf)
{
    int n;
    n = read(fd, buf, 16); /*READ*/
    return n;
}
int main(void)
{
    char buf[16];
    int fds[2];
    if (pipe(fds) != 0)
        return 1;
    write(fds[1], "hello", 5);
    printf("%d\n", rd(fds[0], buf));
    return 0;
}
"#;

#[test]
fn a_blocking_library_call_can_be_restarted_from_its_statement() {
    for cc in Toolchain::ALL {
        let (_dir, bin) = compile(BLOCKING, cc, &[]);
        let a = analyze(&bin);
        let t = a.table("rd");
        let line = line_of(BLOCKING, "/*READ*/");
        assert_eq!(t.call_sites.len(), 1);
        let c = &t.call_sites[0];
        assert_eq!(c.callee, Callee::Plt("read".into()), "{cc:?}");
        assert_eq!(c.line, line);
        assert!(c.live_regs.is_empty() && c.temp_slots.is_empty());
        let stmt = a.statement_start("rd", line);
        assert_eq!(c.restart, Some(stmt), "{cc:?}: {:?}", a.details("rd").notes);
        assert_eq!(c.stack_depth, t.body_depth);
    }
}

const PURE_ARGUMENTS: &str = r#"
#include <poll.h>
#include <unistd.h>
#include <stdio.h>
struct deadline { int ms; };
static int calls_made;
int timeout_of(const struct deadline *d)
{
    return d->ms < 0 ? -1 : d->ms;
}
int next_len(int *state)
{
    *state += 1;
    return 4;
}
int counted(void)
{
    calls_made++;
    return 4;
}
int chained(const struct deadline *d)
{
    return timeout_of(d);
}
int wait_pure(struct pollfd *fds, struct deadline *d)
{
    int n;
    n = poll(fds, 1, timeout_of(d)); /*PURE*/
    return n;
}
int read_state(int fd, char *buf, int *state)
{
    int n;
    n = read(fd, buf, next_len(state)); /*STATE*/
    return n;
}
int read_global(int fd, char *buf)
{
    int n;
    n = read(fd, buf, counted()); /*GLOBAL*/
    return n;
}
int wait_chained(struct pollfd *fds, struct deadline *d)
{
    int n;
    n = poll(fds, 1, chained(d)); /*CHAINED*/
    return n;
}
int main(void)
{
    char buf[16];
    int fds[2], state = 0;
    struct deadline d = { 0 };
    if (pipe(fds) != 0)
        return 1;
    write(fds[1], "hello", 5);
    struct pollfd p = { .fd = fds[0], .events = POLLIN };
    printf("%d %d\n", wait_pure(&p, &d), wait_chained(&p, &d));
    printf("%d %d\n", read_state(fds[0], buf, &state), read_global(fds[0], buf));
    return 0;
}
"#;

/// A blocking call whose arguments call a helper (sshd's
/// `ppoll(fds, n, ptimeout_get_tsp(&timeout), mask)`) restarts at its
/// statement when the helper only reads memory and writes its own frame;
/// a helper that stores through a pointer, into a global, or calls
/// anything keeps the call without a restart address.
#[test]
fn a_blocking_call_restarts_over_a_pure_helper_in_its_arguments() {
    for cc in Toolchain::ALL {
        let (_dir, bin) = compile(PURE_ARGUMENTS, cc, &[]);
        let a = analyze(&bin);
        let blocking = |function: &str, callee: &str| {
            a.table(function)
                .call_sites
                .iter()
                .find(|c| c.callee == Callee::Plt(callee.into()))
                .unwrap_or_else(|| panic!("{cc:?}: no call to {callee} in {function}"))
                .clone()
        };
        let c = blocking("wait_pure", "poll");
        let line = line_of(PURE_ARGUMENTS, "/*PURE*/");
        let stmt = a.statement_start("wait_pure", line);
        assert_eq!(
            c.restart,
            Some(stmt),
            "{cc:?}: {:?}",
            a.details("wait_pure").notes
        );
        for (function, callee) in [
            ("read_state", "read"),
            ("read_global", "read"),
            ("wait_chained", "poll"),
        ] {
            let c = blocking(function, callee);
            assert_eq!(c.restart, None, "{cc:?}: {function}");
        }
    }
}
