//! Benchmarks (not tests):
//! 1. update latency of an identity update against stack depth (1-1,000
//!    frames), thread count (1-64) and program size (50, 2,000 and 5,000
//!    more functions), with its breakdown by phase, against a floor: the
//!    time to seize, interrupt and resume the same threads with nothing
//!    else done;
//! 2. the stop phase of a busy 50-function and a busy 5,000-function
//!    program with `int3` arming (lazy from 512 points: the points the
//!    threads can reach next) and with `--inline-points` (one flag byte
//!    arms every detoured point);
//! 3. steady-state cost of an instrumented binary against the original:
//!    callgrind instruction counts and wall time, measured in the same run
//!    (`.up` default, `.inline` with `--inline-points`).
//!
//! `cargo bench -p upstare-runtime --bench update_latency`. Needs gcc and
//! valgrind (scripts/deps installs both).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use upstare_corpus::{build, program};
use upstare_runtime::target::ptrace::Tracee;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{
    compile_c, instrument, instrument_with, spawn, CSource, PointsMode, Toolchain,
};

const SUBJECT: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile int running = 1;
/* argv[3] "busy": the threads compute instead of sleeping, so that the
   update must arm the update points to stop them. */
static int busy;

static long step(long n, int id)
{
    for (volatile int k = 0; k < 200; k++)
        n += k ^ id;
    return n;
}

static long idle(int id)
{
    long n = 0;
    while (running) {
        if (busy) {
            n = step(n, id);
            continue;
        }
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
        n += id;
    }
    return n;
}

static long descend(int depth, int id)
{
    long here = depth * 3 + id;
    if (depth == 0)
        return idle(id);
    return descend(depth - 1, id) + here;
}

static int depth;

static void *worker(void *arg)
{
    descend(depth, (int)(long)arg);
    return NULL;
}

int main(int argc, char **argv)
{
    depth = atoi(argv[1]);
    int threads = atoi(argv[2]);
    busy = argc > 3 && argv[3][0] == 'b';
    pthread_t tids[64];
    for (int i = 1; i < threads && i < 64; i++)
        pthread_create(&tids[i], NULL, worker, (void *)(long)i);
    printf("ready\n");
    fflush(stdout);
    return (int)descend(depth, 0);
}
"#;

/// One update's phases, in ms.
#[derive(Clone, Copy, Default)]
struct Sample {
    /// Before the stop (not part of the pause).
    plan: f64,
    stop: f64,
    load: f64,
    /// Checking, transferring and rebuilding the state, transformers and
    /// the sweep.
    state: f64,
    /// The commit and the resume.
    commit: f64,
    /// Total minus every reported phase: time in no phase (0 since the
    /// phases are laps of one clock; kept as the check).
    other: f64,
    total: f64,
    /// From the stop to the end: total minus plan.
    pause: f64,
    /// Seizing, interrupting and resuming the same threads, nothing else.
    floor: f64,
}

/// Updates per path (legacy and current) and per row; the medians are
/// reported.
const RUNS: usize = 5;

/// `RUNS` identity updates of one process with `depth` frames per thread
/// and `threads` threads along each path (`legacy_pause` on and off),
/// interleaved so that drift (the images each update adds) falls on both
/// alike. Returns the median per phase of each path: (legacy, current).
fn latency(
    up: &Path,
    dir: &Path,
    tag: &str,
    depth: usize,
    threads: usize,
    busy: bool,
) -> (Sample, Sample) {
    let mode = if busy { "busy" } else { "idle" };
    let child = spawn(
        up,
        &[depth.to_string(), threads.to_string(), mode.to_string()],
    )
    .expect("spawn");
    child
        .wait_for_line("ready", Duration::from_secs(20), |l| l == "ready")
        .expect("ready");
    std::thread::sleep(Duration::from_millis(50));
    let mut per: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    let mut copies = Vec::new();
    for i in 0..2 * RUNS {
        // A fresh copy per update: NEW must be another file than any
        // mapped, retired images included.
        let to = dir.join(format!("{tag}-copy{i}.up"));
        std::fs::copy(up, &to).expect("copy");
        let legacy = i % 2 == 0;
        let opts = ApplyOptions {
            timeout: Duration::from_secs(5),
            legacy_pause: legacy,
            ..ApplyOptions::default()
        };
        let r = apply(child.pid() as i32, &to, &opts).unwrap_or_else(|e| panic!("update: {e}"));
        let t = &r.timings;
        let ms = |us: u64| us as f64 / 1000.0;
        let state = ms(t.check_us + t.transfer_us + t.rebuild_us + t.transform_us + t.sweep_us);
        let phases =
            ms(t.plan_us) + ms(t.stop_us) + ms(t.load_us) + state + ms(t.commit_us + t.resume_us);
        per[usize::from(!legacy)].push(Sample {
            plan: ms(t.plan_us),
            pause: ms(t.pause_us),
            stop: ms(t.stop_us),
            load: ms(t.load_us),
            state,
            commit: ms(t.commit_us + t.resume_us),
            other: (ms(t.total_us) - phases).max(0.0),
            total: ms(t.total_us),
            floor: floor(child.pid() as i32),
        });
        copies.push(to);
    }
    drop(child);
    for c in copies {
        let _ = std::fs::remove_file(c);
    }
    let [a, b] = per;
    (median(a), median(b))
}

/// The floor: seizing every thread of `pid` (interrupted and stopped) and
/// letting them go, nothing else, in ms.
fn floor(pid: i32) -> f64 {
    let t = Instant::now();
    let tracee = Tracee::seize(nix::unistd::Pid::from_raw(pid)).expect("seize");
    tracee.detach().expect("detach");
    t.elapsed().as_secs_f64() * 1000.0
}

/// The median of each phase separately.
fn median(samples: Vec<Sample>) -> Sample {
    let pick = |f: fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    Sample {
        plan: pick(|s| s.plan),
        pause: pick(|s| s.pause),
        stop: pick(|s| s.stop),
        load: pick(|s| s.load),
        state: pick(|s| s.state),
        commit: pick(|s| s.commit),
        other: pick(|s| s.other),
        total: pick(|s| s.total),
        floor: pick(|s| s.floor),
    }
}

/// The subject with `n` more functions and `n / 4` more globals (a program
/// of nginx's size for `n` = 2,000): every function is in the tables and
/// every global is transferred.
fn large_subject(n: usize) -> String {
    let mut src = String::from(SUBJECT);
    src = src.replace(
        "int main(int argc",
        "long extra_sum(void);\nint main(int argc",
    );
    src = src.replace(
        "    printf(\"ready\\n\");",
        "    depth += (int)(extra_sum() & 0);\n    printf(\"ready\\n\");",
    );
    for i in 0..n / 4 {
        src.push_str(&format!("long extra_g{i} = {i};\n"));
    }
    for i in 0..n {
        src.push_str(&format!(
            "long extra_f{i}(long x)\n{{\n    long y = x * {i} + extra_g{};\n    return y ^ (x >> 3);\n}}\n",
            i % (n / 4).max(1)
        ));
    }
    src.push_str("long extra_sum(void)\n{\n    long s = 0;\n");
    for i in 0..n {
        src.push_str(&format!("    s += extra_f{i}(s);\n"));
    }
    src.push_str("    return s;\n}\n");
    src
}

fn callgrind(bin: &Path) -> Option<u64> {
    let out = Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .arg(bin)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find_map(|l| l.split("Collected :").nth(1))
        .and_then(|n| n.trim().parse().ok())
}

fn wall(bin: &Path, runs: usize) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            let s = Command::new(bin).output().expect("run");
            assert!(s.status.success() || s.status.code().is_some());
            t.elapsed().as_secs_f64() * 1000.0
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-update");
    std::fs::create_dir_all(&dir).expect("dir");
    let bin = compile_c(
        CSource::Text(SUBJECT),
        Toolchain::Gcc,
        &[],
        &dir.join("subject"),
    )
    .expect("compile");
    let up = dir.join("subject.up");
    instrument(&bin, &up);
    let sized_as = |n: usize, mode: PointsMode| {
        let src = large_subject(n);
        let bin = compile_c(
            CSource::Text(&src),
            Toolchain::Gcc,
            &[],
            &dir.join(format!("large{n}")),
        )
        .expect("compile a large subject");
        let up = match mode {
            PointsMode::Int3 => dir.join(format!("large{n}.up")),
            PointsMode::Inline => dir.join(format!("large{n}.inline")),
        };
        instrument_with(&bin, &up, mode);
        up
    };
    let sized = |n: usize| sized_as(n, PointsMode::Int3);
    let (f50, large, f5000) = (sized(50), sized(2000), sized(5000));

    println!(
        "identity update latency, ms, median of {RUNS} updates per path of one process;\n\
         before = the former pause (legacy_pause), after = current, interleaved in the same run"
    );
    println!(
        "plan: before the stop (not paused); pause = stop + load + state + commit + other;\n\
         other = in no reported phase; ratio = pause after / pause before;\n\
         floor = seize + interrupt + resume of the same threads, nothing else (median of the runs);\n\
         busy = the threads compute (the update arms the update points to stop them)"
    );
    let head = format!(
        "{:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7}",
        "plan", "stop", "load", "state", "commit", "other", "pause"
    );
    println!(
        "{:>14} {:>6} {:>7} | {head} | {head} | {:>6} {:>6} {:>7}",
        "program", "frames", "threads", "ratio", "floor", "/floor"
    );
    println!("{:>29} | {:^52} | {:^52} |", "", "before", "after");
    let mut rows: Vec<(&str, &Path, usize, usize, bool)> = Vec::new();
    for depth in [1usize, 10, 100, 1000] {
        rows.push(("small", up.as_path(), depth, 1, false));
    }
    for threads in [4usize, 16, 64] {
        rows.push(("small", up.as_path(), 10, threads, false));
    }
    rows.push(("2000 fns", large.as_path(), 10, 1, false));
    rows.push(("50 fns busy", f50.as_path(), 10, 1, true));
    rows.push(("5000 fns busy", f5000.as_path(), 10, 1, true));
    let only: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    for (name, image, depth, threads, busy) in rows {
        let label = format!("{name}-{depth}-{threads}");
        if only.as_deref().is_some_and(|o| !label.contains(o)) {
            continue;
        }
        let (a, b) = latency(image, &dir, &label.replace(' ', "_"), depth, threads, busy);
        let cols = |s: &Sample| {
            format!(
                "{:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>7.2}",
                s.plan, s.stop, s.load, s.state, s.commit, s.other, s.pause
            )
        };
        println!(
            "{:>14} {:>6} {:>7} | {} | {} | {:>6.3} {:>6.2} {:>7.1}",
            name,
            depth + 3,
            threads,
            cols(&a),
            cols(&b),
            b.pause / a.pause,
            b.floor,
            b.pause / b.floor
        );
    }
    if only.as_deref().is_none_or(|o| "stop-modes".contains(o)) {
        println!(
            "\nstop phase (ms, median of {RUNS} updates), busy threads: int3 at the points the \
             threads can reach next (every point below 512) vs --inline-points (one flag byte; \
             points whose detour is not safe keep int3)"
        );
        println!(
            "{:>14} {:>7} {:>9} {:>9} {:>10} {:>10}",
            "program", "points", "detoured", "int3", "inline", "ratio"
        );
        for n in [50usize, 5000] {
            let inline = sized_as(n, PointsMode::Inline);
            let int3 = if n == 50 { &f50 } else { &f5000 };
            let tables =
                upstare_dwarf::read_tables(&std::fs::read(&inline).expect("read")).expect("tables");
            let points: usize = tables.functions.iter().map(|f| f.update_points.len()).sum();
            let detoured = match &tables.arming {
                upstare_dwarf::fdt::Arming::Inline(i) => i.detours.len(),
                upstare_dwarf::fdt::Arming::Int3 => 0,
            };
            let (_, a) = latency(int3, &dir, &format!("stop-int3-{n}"), 10, 1, true);
            let (_, b) = latency(&inline, &dir, &format!("stop-inline-{n}"), 10, 1, true);
            println!(
                "{:>14} {:>7} {:>9} {:>9.2} {:>10.2} {:>10.3}",
                format!("{n} fns busy"),
                points,
                detoured,
                a.stop,
                b.stop,
                b.stop / a.stop
            );
        }
    }
    if only.is_some() {
        return;
    }

    println!("\nsteady-state cost: instrumented vs original (same run)");
    println!(
        "{:>10} {:>16} {:>16} {:>8} {:>10} {:>10} {:>8} {:>16} {:>8} {:>10} {:>8}",
        "program",
        "instr orig",
        "instr .up",
        "ratio",
        "ms orig",
        "ms .up",
        "ratio",
        "instr .inline",
        "ratio",
        "ms .inline",
        "ratio"
    );
    for name in ["scoring", "matrix", "calc", "kvstore"] {
        let p = program(name).expect("corpus program");
        let orig = build(&p, Toolchain::Gcc).expect("build");
        let inst = dir.join(format!("{name}.up"));
        instrument(&orig, &inst);
        let inl = dir.join(format!("{name}.inline"));
        instrument_with(&orig, &inl, PointsMode::Inline);
        let (a, b, c) = (callgrind(&orig), callgrind(&inst), callgrind(&inl));
        let (wa, wb, wc) = (wall(&orig, 15), wall(&inst, 15), wall(&inl, 15));
        let ratio = |b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) if a > 0 => format!("{:.4}", b as f64 / a as f64),
            _ => "n/a".into(),
        };
        let count = |v: Option<u64>| v.map_or("n/a".into(), |v| v.to_string());
        println!(
            "{:>10} {:>16} {:>16} {:>8} {:>10.2} {:>10.2} {:>8.3} {:>16} {:>8} {:>10.2} {:>8.3}",
            name,
            count(a),
            count(b),
            ratio(b),
            wa,
            wb,
            wb / wa,
            count(c),
            ratio(c),
            wc,
            wc / wa
        );
    }
}
