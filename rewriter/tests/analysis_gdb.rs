//! The analysis checked against the running program, with gdb as an
//! independent oracle:
//! - at every update point and every restart address, overwrite every
//!   caller-saved register, the callee-saved registers the function saves,
//!   xmm0-15, and flip the status flags; the program's output and exit status
//!   must not change (no live register state there);
//! - at every call site with a static stack depth, rsp - CFA (CFA = rbp+16
//!   after the prologue) must equal the recorded depth.

mod analysis_common;

use analysis_common::{analyze, compile, TempDir, Toolchain};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use upstare_dwarf::{LinkAddr, Reg};
use upstare_rewriter::analysis::DYNAMIC_DEPTH;
use upstare_testkit::{require_tool, run_command};

/// Runs `cmd` with a time limit (the kit's guard kills it, and its process
/// group, by pid past the limit); returns (exit code, stdout, stderr).
fn run_limited(cmd: Command, limit: Duration) -> (Option<i32>, String, String) {
    let what = format!("{cmd:?}");
    match run_command(cmd, limit) {
        Ok(out) => (out.status.code(), out.stdout, out.stderr),
        Err(e) => panic!("{what} did not finish in {limit:?}: {e}"),
    }
}

/// What to do at one address.
#[derive(Default)]
struct Stop {
    /// Clobber registers here (update point or restart address).
    clobber: bool,
    /// Callee-saved registers the function saves (safe to clobber).
    saved: Vec<Reg>,
    /// Expected rsp - CFA (a call site with a static depth).
    depth: Option<i64>,
}

/// Hits per breakpoint before it is disabled (bounds the run time).
const MAX_HITS: u32 = 10;

fn check_binary(bin: &Path, what: &str) -> (usize, usize) {
    require_tool("gdb");
    let a = analyze(bin);
    let mut stops: BTreeMap<LinkAddr, Stop> = BTreeMap::new();
    for res in a.fns.values() {
        let Ok((t, _)) = res else { continue };
        let saved: Vec<Reg> = t
            .saved_regs
            .iter()
            .map(|s| s.reg)
            .filter(|r| *r != Reg::Rbp)
            .collect();
        let stop = |stops: &mut BTreeMap<LinkAddr, Stop>, addr: LinkAddr| {
            stops.entry(addr).or_default().saved = saved.clone();
        };
        for p in &t.update_points {
            stop(&mut stops, p.addr);
            stops.get_mut(&p.addr).expect("stop").clobber = true;
        }
        for c in &t.call_sites {
            if let Some(r) = c.restart {
                stop(&mut stops, r);
                stops.get_mut(&r).expect("stop").clobber = true;
            }
            if c.stack_depth != DYNAMIC_DEPTH {
                stop(&mut stops, c.call_addr);
                stops.get_mut(&c.call_addr).expect("stop").depth = Some(c.stack_depth.0);
            }
        }
    }
    assert!(!stops.is_empty(), "{what}: nothing to check");

    let dir = TempDir::new("gdb");
    let out = dir.path().join("prog.out");
    let err = dir.path().join("prog.err");
    let mut script = String::new();
    script.push_str("set pagination off\nset confirm off\nset print thread-events off\n");
    let _ = writeln!(
        script,
        "starti > {} 2> {} < /dev/null",
        out.display(),
        err.display()
    );
    // The load bias (gdb disables ASLR, but PIE still moves): from main.
    let main = a.program.function("main").expect("main").low;
    let _ = writeln!(script, "set $bias = (long)&main - {}", main.0);
    for (n, (addr, s)) in stops.iter().enumerate() {
        let _ = writeln!(script, "set $hits{n} = 0");
        let _ = writeln!(script, "break *($bias + {})", addr.0);
        script.push_str("commands\nsilent\n");
        let _ = writeln!(script, "set $hits{n} = $hits{n} + 1");
        // Breakpoints are numbered from 1 in creation order.
        let _ = writeln!(script, "if $hits{n} >= {MAX_HITS}\ndisable {}\nend", n + 1);
        if let Some(d) = s.depth {
            let _ = writeln!(
                script,
                "printf \"UPSTARE-DEPTH {} %ld {d}\\n\", (long)$rsp - (long)$rbp - 16",
                addr.0
            );
        }
        if s.clobber {
            let _ = writeln!(script, "printf \"UPSTARE-POINT {}\\n\"", addr.0);
            for r in ["rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"] {
                let _ = writeln!(script, "set ${r} = 0x5a5a5a5a5a5a5a5a");
            }
            for r in &s.saved {
                let _ = writeln!(script, "set ${} = 0x3c3c3c3c3c3c3c3c", r.name());
            }
            for x in 0..16 {
                let _ = writeln!(
                    script,
                    "set $xmm{x}.v2_int64 = {{0x7e7e7e7e7e7e7e7e, 0x7e7e7e7e7e7e7e7e}}"
                );
            }
            script.push_str("set $eflags = $eflags ^ 0x8c5\n");
        }
        script.push_str("continue\nend\n");
    }
    script.push_str("continue\n");
    let script_path = dir.path().join("script.gdb");
    std::fs::write(&script_path, &script).expect("write script");

    let (code, _, _) = run_limited(Command::new(bin), Duration::from_secs(60));
    let mut gdb = Command::new("gdb");
    gdb.arg("-nx")
        .arg("-batch")
        .arg("-x")
        .arg(&script_path)
        .arg(bin);
    let (_, gdb_out, gdb_err) = run_limited(gdb, Duration::from_secs(300));
    let (plain_out, plain_err) = {
        let (_, o, e) = run_limited(Command::new(bin), Duration::from_secs(60));
        (o, e)
    };
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let (gout, gerr) = (read(&out), read(&err));
    assert_eq!(
        gout, plain_out,
        "{what}: stdout changed by clobbering at update points\n{gdb_err}"
    );
    assert_eq!(gerr, plain_err, "{what}: stderr changed");
    let want_exit = format!("exited with code {:02o}", code.unwrap_or(-1));
    let exited_normally = code == Some(0) && gdb_out.contains("exited normally");
    assert!(
        exited_normally || gdb_out.contains(&want_exit),
        "{what}: exit status differs from {code:?}: {gdb_out}"
    );
    let mut points = 0;
    let mut depths = 0;
    for line in gdb_out.lines() {
        if line.starts_with("UPSTARE-POINT") {
            points += 1;
        } else if let Some(rest) = line.strip_prefix("UPSTARE-DEPTH ") {
            let v: Vec<i64> = rest
                .split(' ')
                .map(|x| x.parse().expect("number"))
                .collect();
            assert_eq!(v[1], v[2], "{what}: stack depth at call {:#x}", v[0]);
            depths += 1;
        }
    }
    (points, depths)
}

const STMTS: &str = r#"
#include <stdio.h>
#include <stdarg.h>
#include <string.h>
struct small { int a, b; };
struct big { long x[5]; };
static int counter;
int f(void) { return ++counter; }
int g(void) { return counter * 2; }
int h(int x) { return x + counter; }
double df(double x) { return x * 1.5; }
struct small mk(int x) { struct small s = { x, x * 2 }; return s; }
struct big mkbig(int x) { struct big b; for (int i = 0; i < 5; i++) b.x[i] = x + i; return b; }
int sum(int n, ...)
{
    va_list ap;
    int s = 0;
    va_start(ap, n);
    for (int i = 0; i < n; i++)
        s += va_arg(ap, int);
    va_end(ap);
    return s;
}
int fib(int n)
{
    if (n < 2)
        return n;
    return fib(n - 1) + fib(n - 2);
}
int arr[8];
int work(int x)
{
    int total = 0;
    for (int i = 0; i < 5; i++) {
        total += f() + g() * h(x);
        arr[f() & 7] = g();
        total += mk(i).b + mk(i + 1).a;
        total += (int)(df(i) + df(i) * x);
        total += sum(3, i, x, total & 15);
        total += fib(i + 3);
        struct big b = mkbig(i);
        total += (int)b.x[4];
        if (total > 1000)
            total -= 999;
    }
    return total;
}
int main(int argc, char **argv)
{
    char buf[64];
    int r = work(argc);
    snprintf(buf, sizeof buf, "%d", r);
    printf("%s %zu %d\n", buf, strlen(buf), arr[3]);
    return r & 3;
}
"#;

fn check_source(src: &str, name: &str, cc: Toolchain) {
    let (_dir, bin) = compile(src, cc, &[]);
    let (points, depths) = check_binary(&bin, &format!("{name} {cc:?}"));
    assert!(
        points > 0 && depths > 0,
        "{name} {cc:?}: {points} points, {depths} depths hit"
    );
}

#[test]
fn no_live_registers_at_update_points_of_generated_programs() {
    for cc in Toolchain::ALL {
        check_source(STMTS, "stmts", cc);
    }
}

/// One corpus program with one toolchain (the programs are read from
/// `corpus/programs/<name>.c`).
fn check_corpus_program(name: &str, cc: Toolchain) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus/programs");
    let src = std::fs::read_to_string(dir.join(format!("{name}.c")))
        .unwrap_or_else(|e| panic!("corpus program {name}: {e}"));
    check_source(&src, name, cc);
}

/// One test per single-threaded deterministic corpus program and toolchain,
/// so that they run in parallel.
macro_rules! corpus_programs {
    ($($name:ident),* $(,)?) => {
        mod no_live_registers_at_update_points_of_corpus_programs {
            $(
                mod $name {
                    use super::super::{check_corpus_program, Toolchain};
                    #[test]
                    fn gcc() {
                        check_corpus_program(stringify!($name), Toolchain::Gcc);
                    }
                    #[test]
                    fn gcc_no_pie() {
                        check_corpus_program(stringify!($name), Toolchain::GccNoPie);
                    }
                    #[test]
                    fn clang() {
                        check_corpus_program(stringify!($name), Toolchain::Clang);
                    }
                }
            )*
        }
    };
}

corpus_programs!(
    calc, checksums, dispatch, geometry, inventory, kvstore, logstats, matrix, packets, ringbuf,
    scoring, stackvm, textstats, vending,
);

// Patterns of real programs (Debian's sshd, nginx, PostgreSQL, lua) that the
// analysis used to refuse or leave without restart addresses, reproduced in
// small programs of our own. Each is checked by the oracle above (clobbered
// registers at every point and restart address, rsp at every call) and by
// running the instrumented binary.

/// The instrumented binary prints and exits exactly like the original.
fn instrumented_runs_alike(bin: &Path, what: &str) {
    let bytes = std::fs::read(bin).expect("read binary");
    let done = upstare_rewriter::rewrite::rewrite(&bytes)
        .unwrap_or_else(|e| panic!("{what}: rewrite refused: {e}"));
    let up = bin.with_extension("up");
    upstare_testkit::write_exe(&up, &done.elf, 0o755);
    let a = run_limited(Command::new(bin), Duration::from_secs(60));
    let b = run_limited(Command::new(&up), Duration::from_secs(60));
    assert_eq!(a, b, "{what}: the instrumented binary behaves differently");
}

/// Compiles `src` with `cc`, requires every function in `must_analyze` to be
/// analyzed, runs the oracle and the instrumented binary; returns the
/// analysis for further checks.
fn check_pattern(
    src: &str,
    what: &str,
    cc: Toolchain,
    must_analyze: &[&str],
) -> (TempDir, analysis_common::Analyzed) {
    let (dir, bin) = compile(src, cc, &[]);
    let what = format!("{what} [{}]", cc.name());
    let a = analyze(&bin);
    for f in must_analyze {
        if let Some(Err(e)) = a.fns.get(*f) {
            panic!("{what}: {e}");
        }
        assert!(a.fns.contains_key(*f), "{what}: no function {f}");
    }
    check_binary(&bin, &what);
    instrumented_runs_alike(&bin, &what);
    (dir, a)
}

/// The source line of the line-table row covering `addr`.
fn line_at(a: &analysis_common::Analyzed, addr: LinkAddr) -> Option<u32> {
    a.program
        .lines
        .iter()
        .rfind(|r| r.addr <= addr)
        .map(|r| r.line)
}

/// Largest local array of the frame-size sweep.
const SWEEP_MAX: usize = 1024;

/// `fN` keeps an N-byte array and calls `g`: frames of every multiple of 16
/// bytes from 16 to past 1,024, 128 among them (gcc: `add rsp,-128`).
fn frame_sweep_source() -> String {
    let mut s = String::from("#include <stdio.h>\nlong g(long x) { return x + 1; }\n");
    for n in (0..=SWEEP_MAX).step_by(8) {
        if n == 0 {
            let _ = writeln!(
                s,
                "long f0(long x)\n{{\n    long r = g(x);\n    return r;\n}}"
            );
        } else {
            let _ = writeln!(
                s,
                "long f{n}(long x)\n{{\n    volatile char buf[{n}];\n    buf[0] = (char)x;\n    buf[{last}] = 1;\n    long r = g(x);\n    return r + buf[0] + buf[{last}];\n}}",
                last = n - 1
            );
        }
    }
    s.push_str("int main(int argc, char **argv)\n{\n    long s = 0;\n");
    for n in (0..=SWEEP_MAX).step_by(8) {
        let _ = writeln!(s, "    s += f{n}(argc);");
    }
    s.push_str("    printf(\"%ld\\n\", s);\n    return 0;\n}\n");
    s
}

#[test]
fn frame_sizes_from_0_to_1024_bytes_get_their_depth_and_restart_addresses() {
    let src = frame_sweep_source();
    for cc in [Toolchain::Gcc, Toolchain::Clang] {
        let (_dir, a) = check_pattern(&src, "frame sweep", cc, &[]);
        for n in (0..=SWEEP_MAX).step_by(8) {
            let t = a.table(&format!("f{n}"));
            // The frame holds the array below the saved rbp.
            assert!(
                t.body_depth.0 <= -16 - n as i64,
                "[{}] f{n}: body depth {} does not cover {n} bytes",
                cc.name(),
                t.body_depth.0
            );
            assert_eq!(t.call_sites.len(), 1, "[{}] f{n}: one call", cc.name());
            let c = &t.call_sites[0];
            assert_eq!(
                c.stack_depth,
                t.body_depth,
                "[{}] f{n}: call depth",
                cc.name()
            );
            assert!(
                c.restart.is_some(),
                "[{}] f{n}: no restart address",
                cc.name()
            );
        }
        // The sweep has a 128-byte frame (gcc: `add rsp,-128`): below the
        // saved rbp, CFA-16-128.
        assert!(
            (0..=SWEEP_MAX)
                .step_by(8)
                .any(|n| a.table(&format!("f{n}")).body_depth.0 == -144),
            "[{}] no 128-byte frame in the sweep",
            cc.name()
        );
    }
}

/// sshd's pattern: a noreturn function called with more than six
/// arguments, so some are pushed (gcc), and the pushes are never popped;
/// the paths after the calls would join with different depths.
const NORETURN_STACK_ARGS: &str = r#"
#include <err.h>
#include <stdio.h>
#include <stdlib.h>
__attribute__((noreturn)) void fatal(const char *fmt, int a, int b, int c, int d, int e, int f, int g)
{
    fprintf(stderr, fmt, a, b, c, d, e, f, g);
    exit(2);
}
int demote(int x)
{
    if (x > 100)
        fatal("%d %d %d %d %d %d %d\n", x, 1, 2, 3, 4, 5, 6);
    else if (x < -100)
        errx(3, "%d %d %d %d %d %d %d", x, 6, 5, 4, 3, 2, 1);
    else if (x == 50)
        fatal("%d %d %d %d %d %d %d\n", x, 6, 5, 4, 3, 2, 1);
    int y = x * 2;
    printf("y %d\n", y);
    return y;
}
int main(int argc, char **argv)
{
    int r = demote(argc);
    printf("%d\n", r);
    return 0;
}
"#;

#[test]
fn noreturn_calls_with_pushed_arguments_end_their_path() {
    for cc in Toolchain::ALL {
        let (_dir, a) = check_pattern(NORETURN_STACK_ARGS, "noreturn", cc, &["demote"]);
        let t = a.table("demote");
        // Every call in demote is a call site; the one to printf, on the
        // path that goes on, can be restarted.
        let printf = t
            .call_sites
            .iter()
            .find(|c| c.callee.id_name() == "printf")
            .expect("printf call");
        assert!(
            printf.restart.is_some(),
            "[{}] printf: no restart",
            cc.name()
        );
        assert_eq!(printf.stack_depth, t.body_depth, "[{}]", cc.name());
    }
}

/// nginx's ngx_vslprintf: gcc puts the bounds check of the second switch
/// before a `jmp` to the dispatch code.
const SWITCH_THROUGH_JMP: &str = r#"
#include <stdio.h>
int fmt(const char *fmt, long v)
{
    int width = 0, sign = 1, hex = 0, out = 0;
    while (*fmt) {
        if (*fmt == '%') {
            fmt++;
            while (*fmt >= '0' && *fmt <= '9')
                width = width * 10 + (*fmt++ - '0');
            for (;;) {
                switch (*fmt) {
                case 'u': sign = 0; fmt++; continue;
                case 'X': hex = 2; sign = 0; fmt++; continue;
                case 'x': hex = 1; sign = 0; fmt++; continue;
                case '.': fmt++; while (*fmt >= '0' && *fmt <= '9') fmt++; continue;
                case '*': width = (int)v; fmt++; continue;
                default: break;
                }
                break;
            }
            switch (*fmt) {
            case 'd': out += (int)v * sign; break;
            case 'i': out += 2; break;
            case 's': out += 3; break;
            case 'p': out += 4; break;
            case 'c': out += 5; break;
            case 'z': out += 6; break;
            default: out += *fmt; break;
            }
            fmt++;
        } else {
            out++;
            fmt++;
        }
    }
    return out + width + hex;
}
int main(int argc, char **argv)
{
    int r = fmt("a%5ud %*.3xs %Xp %c %zz %i", argc);
    printf("%d\n", r);
    return 0;
}
"#;

#[test]
fn switch_whose_bounds_check_jumps_to_the_dispatch_is_recognized() {
    for cc in Toolchain::ALL {
        let (_dir, a) = check_pattern(SWITCH_THROUGH_JMP, "switch through jmp", cc, &["fmt"]);
        let d = a.details("fmt");
        // The switches are recognized (the refusal was an unrecognized
        // indirect jump) and their targets split blocks.
        assert!(
            !d.jump_tables.is_empty(),
            "[{}] no jump table recognized",
            cc.name()
        );
        for jt in &d.jump_tables {
            assert!(
                jt.targets.iter().all(|t| d.block_starts.contains(t)),
                "[{}] a target is not a block start",
                cc.name()
            );
        }
    }
}

/// PostgreSQL's CreateDestReceiver: a switch over an enum with a case for
/// every value and an unreachable end has no bounds check.
const ENUM_SWITCH: &str = r#"
#include <stdio.h>
enum dest { D_NONE, D_DEBUG, D_REMOTE, D_EXEC, D_FILE, D_TUPLE, D_SQL };
int create(enum dest d, int x)
{
    switch (d) {
    case D_NONE: return x;
    case D_DEBUG: return x + 1;
    case D_REMOTE: return x * 2;
    case D_EXEC: return x - 3;
    case D_FILE: return x ^ 5;
    case D_TUPLE: return x << 1;
    case D_SQL: return -x;
    }
    __builtin_unreachable();
}
int main(int argc, char **argv)
{
    int s = 0;
    for (int i = 0; i < 7; i++)
        s += create((enum dest)i, argc + i);
    printf("%d\n", s);
    return 0;
}
"#;

#[test]
fn enum_switch_without_bounds_check_is_recognized() {
    for cc in Toolchain::ALL {
        let (_dir, a) = check_pattern(ENUM_SWITCH, "enum switch", cc, &["create"]);
        let d = a.details("create");
        assert_eq!(d.jump_tables.len(), 1, "[{}] one switch", cc.name());
        let jt = &d.jump_tables[0];
        // Seven cases, seven distinct targets (the entries may run on into
        // whatever follows the table, which only adds targets).
        assert!(
            jt.entries >= 7 && jt.targets.len() >= 7,
            "[{}] {} entries, {} targets",
            cc.name(),
            jt.entries,
            jt.targets.len()
        );
        // Each case's `return` line is the line of one target.
        let case_lines: Vec<u32> = (0..7)
            .map(|k| {
                analysis_common::line_of(
                    ENUM_SWITCH,
                    &format!(
                        "case D_{}",
                        ["NONE", "DEBUG", "REMOTE", "EXEC", "FILE", "TUPLE", "SQL"][k]
                    ),
                )
            })
            .collect();
        let target_lines: Vec<u32> = jt.targets.iter().filter_map(|t| line_at(&a, *t)).collect();
        for l in case_lines {
            assert!(
                target_lines.contains(&l),
                "[{}] no target on line {l}: {target_lines:?}",
                cc.name()
            );
        }
    }
}

/// lua's luaV_execute and PostgreSQL's ExecInterpExpr: computed `goto *`
/// through a static table of label addresses.
const COMPUTED_GOTO: &str = r#"
#include <stdio.h>
int run(const unsigned char *code, int acc)
{
    static const void *const disp[] = { &&op_add, &&op_mul, &&op_neg, &&op_halt };
    goto *disp[*code];
op_add:
    acc += code[1];
    code += 2;
    goto *disp[*code];
op_mul:
    acc *= code[1];
    code += 2;
    goto *disp[*code];
op_neg:
    acc = -acc;
    code += 1;
    goto *disp[*code];
op_halt:
    return acc;
}
int main(int argc, char **argv)
{
    static const unsigned char prog[] = { 0, 3, 1, 5, 2, 0, 7, 3 };
    printf("%d\n", run(prog, argc));
    return 0;
}
"#;

#[test]
fn computed_goto_targets_are_the_functions_labels() {
    for cc in Toolchain::ALL {
        let (_dir, a) = check_pattern(COMPUTED_GOTO, "computed goto", cc, &["run"]);
        let d = a.details("run");
        assert!(
            !d.jump_tables.is_empty(),
            "[{}] no computed goto",
            cc.name()
        );
        // Every label's first line (the statement after it) is a target of
        // every `goto *`.
        let label_lines: Vec<u32> = ["op_add:", "op_mul:", "op_neg:", "op_halt:"]
            .iter()
            .map(|m| analysis_common::line_of(COMPUTED_GOTO, m) + 1)
            .collect();
        for jt in &d.jump_tables {
            let lines: Vec<u32> = jt.targets.iter().filter_map(|t| line_at(&a, *t)).collect();
            for l in &label_lines {
                assert!(
                    lines.contains(l),
                    "[{}] goto at {} misses line {l}: {lines:?}",
                    cc.name(),
                    jt.jmp
                );
            }
        }
    }
}

/// PostgreSQL's functions ending in elog(ERROR) / pg_unreachable(): gcc
/// drops the epilogue, so `break` jumps to the next function's first byte,
/// and a noreturn call can be a function's last instruction.
const UNREACHABLE_END: &str = r#"
#include <stdio.h>
#include <stdlib.h>
__attribute__((noreturn)) void die(int code)
{
    fprintf(stderr, "die %d\n", code);
    exit(code);
}
int find(int x)
{
    for (int i = 0; i < 10; i++) {
        if (i * i >= x)
            return i;
    }
    die(3);
}
int never(int x)
{
    while (x > 0) {
        if (x == 5)
            return x;
        x--;
        if (x == -7)
            break;
    }
    __builtin_unreachable();
}
void give_up(void)
{
    abort();
}
int main(int argc, char **argv)
{
    printf("%d %d\n", find(argc + 20), never(argc + 9));
    if (argc > 5)
        give_up();
    return 0;
}
"#;

#[test]
fn jumps_to_the_function_end_after_unreachable_code_are_not_edges() {
    for cc in Toolchain::ALL {
        let (_dir, a) = check_pattern(
            UNREACHABLE_END,
            "unreachable end",
            cc,
            &["find", "never", "give_up"],
        );
        let t = a.table("give_up");
        assert_eq!(t.call_sites.len(), 1, "[{}] give_up calls abort", cc.name());
        assert!(
            t.call_sites[0].restart.is_some(),
            "[{}] abort: no restart",
            cc.name()
        );
    }
}

/// A blocking call whose statement is written over two lines (clang puts a
/// row of the second line between the arguments, with registers live).
const TWO_LINE_CALL: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
int slurp(const char *path)
{
    char buf[256];
    int fd = open(path,
                  O_RDONLY);
    long n = read(fd,
                  buf, sizeof buf);
    close(fd);
    return n > 0;
}
int main(int argc, char **argv)
{
    printf("%d\n", slurp(argv[0]));
    return 0;
}
"#;

#[test]
fn a_call_statement_over_two_lines_gets_a_restart_address() {
    for cc in Toolchain::ALL {
        let (_dir, a) = check_pattern(TWO_LINE_CALL, "two-line call", cc, &["slurp"]);
        let t = a.table("slurp");
        let start = analysis_common::line_of(TWO_LINE_CALL, "long n = read(fd,");
        for c in &t.call_sites {
            let r = c
                .restart
                .unwrap_or_else(|| panic!("[{}] {}: no restart", cc.name(), c.callee.id_name()));
            if c.callee.id_name() == "read" {
                assert_eq!(
                    line_at(&a, r),
                    Some(start),
                    "[{}] read restarts at its statement",
                    cc.name()
                );
            }
        }
    }
}
