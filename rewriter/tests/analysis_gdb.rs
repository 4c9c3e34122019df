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
    calc, checksums, geometry, inventory, kvstore, logstats, matrix, packets, ringbuf, scoring,
    stackvm, textstats, vending,
);
