//! Identity updates: a process updated to a fresh copy of its own
//! instrumented binary must go on exactly as if nothing had happened — same
//! stdout, stderr and exit status, byte for byte — whatever state it was
//! paused in. Nothing can be faked here: the new copy is a different file,
//! mapped at another address, and every frame, return address, saved
//! register and pointer into the image has to be moved for the run to end
//! the same way.
//!
//! - every deterministic corpus program (gcc and clang, PIE), paused at a
//!   spread of update-point hits from the first to the last; each update
//!   audited from outside while the process is still stopped (a second
//!   sweep: no value left pointing into the old image, code or data, beyond
//!   the counted exceptions);
//! - threads blocked in read (a pipe), accept and recv (127.0.0.1),
//!   nanosleep and pthread_mutex_lock, updated with [`apply`] while blocked;
//! - ten identity updates in a row on one process;
//! - `--dry-run`, the CLI report and `--json`, and the refusal of a non-PIE
//!   NEW, each leaving the process as it was.

mod apply_support;

use apply_support::*;
use nix::unistd::Pid;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use upstare_corpus::{programs, Feature, Program};
use upstare_runtime::stop::StopError;
use upstare_runtime::target::ptrace::Exit;
use upstare_runtime::update::{apply, ApplyOptions, UpdateError, UpdateReport};
use upstare_testkit::{ExitStatus, Output, Toolchain};

/// Update-point hits to let pass before an update (`skip_hits`), counted
/// from the program's exec: the update happens at hit k + 1.
const SPREAD: &[u64] = &[0, 1, 2, 5, 20, 100, 500, 2000];
/// In the default test, hits are counted (and states chosen) only this far:
/// skipping costs a ptrace round trip per hit, and a few programs pass
/// 25,000-140,000 points. The ignored `..._full_spread` test goes to the end
/// of every run.
const HIT_CAP: u64 = 2500;
/// Time limit for the threads to become ready, once the hits are skipped.
const READY_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on any program's run after an update.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// What came of one identity update.
enum Outcome {
    Updated(Box<UpdateReport>),
    /// Refused (the process was left as it was): no thread state reachable
    /// from the k-th hit could be updated before the run ended, or a thread
    /// stays in a call that is not known to be safe.
    Refused(String),
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Runs `up args` under ptrace, lets `k` update-point hits pass after the
/// first, updates it to a fresh copy, lets it go and checks its whole
/// output against `base`.
fn identity_at(
    up: &Path,
    args: &[&str],
    k: u64,
    dir: &TempDir,
    base: &Output,
) -> Result<Outcome, String> {
    let new = fresh_copy(up, dir, &format!("k{k}"));
    let mut run = TracedRun::spawn(up, args);
    let pid = run.pid();
    let opts = ApplyOptions {
        timeout: READY_TIMEOUT,
        dry_run: false,
        skip_hits: k,
        ..ApplyOptions::default()
    };
    let applied = run.apply(&new, &opts);
    let mut ended: Option<Exit> = None;
    let outcome = match applied {
        Ok(report) => {
            if canon(&report.to) != canon(&new) || canon(&report.from) != canon(up) {
                return Err(format!(
                    "report names {} -> {}",
                    report.from.display(),
                    report.to.display()
                ));
            }
            let (_, new_x) = mappings_of(pid, &canon(&new));
            let (_, old_x) = mappings_of(pid, &canon(up));
            if new_x == 0 || old_x != 0 {
                return Err(format!(
                    "after the update: {new_x} executable mapping(s) of NEW, {old_x} of the \
                     old file:\n{}",
                    maps_text(pid)
                ));
            }
            // The fault test: the sweep run again from outside while the
            // process is still stopped finds no value of live memory left
            // pointing into the old image (beyond the counted exceptions).
            let (stale, _) = audit_after(&run, &report);
            if !stale.is_empty() {
                return Err(format!(
                    "{} value(s) left pointing into the old image: {}",
                    stale.len(),
                    stale.join(", ")
                ));
            }
            Outcome::Updated(Box::new(report))
        }
        Err(UpdateError::Stop(e @ StopError::NotReady { .. })) => Outcome::Refused(e.to_string()),
        Err(UpdateError::Stop(e @ StopError::Gone { .. })) => {
            if let StopError::Gone { status, .. } = &e {
                ended = *status;
            }
            Outcome::Refused(e.to_string())
        }
        Err(e) => return Err(format!("update failed: {e}")),
    };
    let mut out = run.finish(RUN_TIMEOUT)?;
    if let Outcome::Refused(why) = &outcome {
        // The program ended while the stopper waited for a ready state; the
        // tracer reaped it and the error carries the status.
        if out.status == ExitStatus::Unknown {
            out.status = match ended {
                Some(Exit::Code(code)) => ExitStatus::Code(code),
                Some(Exit::Signal { sig, .. }) => ExitStatus::Signal(sig.0),
                None => return Err(format!("no exit status after: {why}")),
            };
        }
    }
    let _ = std::fs::remove_file(&new);
    if out != *base {
        let what = match &outcome {
            Outcome::Updated(r) => format!("updated at {:?}", r.threads),
            Outcome::Refused(why) => format!("refused ({why})"),
        };
        return Err(format!(
            "{what}\noutput differs from an uninterrupted run:\n got {out:?}\nwant {base:?}"
        ));
    }
    Ok(outcome)
}

/// Figures of one spread.
#[derive(Default)]
struct Tally {
    updated: usize,
    refused: usize,
    /// Distinct (program, top frame) states updated.
    states: BTreeSet<String>,
    lines: Vec<String>,
    failures: Vec<String>,
    /// States tried (updated or refused or failed), over all programs.
    tried: usize,
}

/// The deterministic corpus programs, whose runs can be compared byte for
/// byte.
fn deterministic_programs() -> Vec<Program> {
    programs().into_iter().filter(|p| p.deterministic).collect()
}

/// Identity updates of `progs` built with `tc` at a spread of update-point
/// hits (all of the run with `full`).
fn identity_spread(tc: Toolchain, progs: Vec<Program>, full: bool, mode: PointsMode) -> Tally {
    let dir = TempDir::new(&format!("spread-{tc}"));
    let mut tally = Tally::default();
    for p in progs {
        let up = instrumented_as(&p, tc, mode);
        let base = baseline(&up, p.args);
        assert_eq!(
            base.status,
            ExitStatus::Code(p.expected_exit),
            "{tc} {}: {}",
            p.name,
            base.stderr
        );
        let (hits, capped) = count_hits(&up, p.args, (!full).then_some(HIT_CAP));
        let mut ks: Vec<u64> = SPREAD.iter().copied().filter(|&k| k < hits).collect();
        let near_end: Vec<u64> = if capped {
            Vec::new()
        } else if full {
            vec![hits / 4, hits / 2, hits * 3 / 4, hits.saturating_sub(1)]
        } else {
            vec![hits / 2, hits.saturating_sub(1)]
        };
        ks.extend(near_end.iter().copied().filter(|&k| k < hits));
        ks.sort_unstable();
        ks.dedup();
        tally.tried += ks.len();
        let (mut ok, mut refused) = (0, Vec::new());
        for &k in &ks {
            match identity_at(&up, p.args, k, &dir, &base) {
                Ok(Outcome::Updated(r)) => {
                    ok += 1;
                    tally.updated += 1;
                    let top = r.threads.first().and_then(|t| t.frames.first());
                    tally
                        .states
                        .insert(format!("{}:{}", p.name, top.map_or("", |s| s.as_str())));
                }
                Ok(Outcome::Refused(why)) => {
                    tally.refused += 1;
                    // Only where the program itself makes it so: near the
                    // end of a run (only points in callbacks or handlers
                    // left), or in threaded programs (a thread in a call
                    // that is not known to be safe).
                    let allowed = near_end.contains(&k)
                        || p.has(Feature::Threads)
                        || p.has(Feature::QsortCallback)
                        || p.has(Feature::Signals);
                    let first = why.lines().take(2).collect::<Vec<_>>().join(" /");
                    let line = format!("{tc} {} k={k}: refused: {first}", p.name);
                    if !allowed {
                        tally.failures.push(format!("{line}\n{why}"));
                    }
                    refused.push(line);
                }
                Err(e) => tally
                    .failures
                    .push(format!("{tc} {} k={k} (of {hits} hits): {e}", p.name)),
            }
        }
        // Every program is updatable somewhere: at its first hit at least.
        if ok < 3.min(ks.len()) {
            tally.failures.push(format!(
                "{tc} {}: only {ok} of {} states updated: {refused:?}",
                p.name,
                ks.len()
            ));
        }
        tally.lines.push(format!(
            "  {tc} {:10} {hits:>6}{} hits: {ok}/{} updated at k={ks:?}",
            p.name,
            if capped { "+" } else { " " },
            ks.len()
        ));
        for r in refused {
            tally.lines.push(format!("    {r}"));
        }
    }
    tally
}

fn check_spread(tc: Toolchain, full: bool) {
    tc.require();
    let t = identity_spread(tc, deterministic_programs(), full, PointsMode::Int3);
    report_spread(tc, &t);
    assert!(t.failures.is_empty(), "{}", t.failures.join("\n\n"));
    // 20 programs at up to 10 states each: most must really be updated.
    assert!(t.updated >= 120, "only {} identity updates", t.updated);
}

fn report_spread(tc: Toolchain, t: &Tally) {
    eprintln!(
        "identity updates ({tc}): {} updated (each audited from outside: 0 values left \
         pointing into the old image), {} refused (process unchanged); {} distinct top \
         frames\n{}",
        t.updated,
        t.refused,
        t.states.len(),
        t.lines.join("\n")
    );
}

/// Identity updates a program must pass at least (or at all its states if
/// it has fewer): the corpus-wide floor of 120 over 20 programs, per
/// program, now that each program is its own test.
const MIN_UPDATED_PER_PROGRAM: usize = 6;

/// The spread of one deterministic corpus program built with `tc`.
fn check_program_spread(tc: Toolchain, name: &str) {
    check_program_spread_as(tc, name, PointsMode::Int3);
}

/// [`check_program_spread`] of the program rewritten as `mode` says.
fn check_program_spread_as(tc: Toolchain, name: &str, mode: PointsMode) {
    tc.require();
    let p = upstare_corpus::program(name).unwrap_or_else(|| panic!("no corpus program {name}"));
    assert!(p.deterministic, "{name} is not deterministic");
    if mode == PointsMode::Inline {
        assert_mostly_detoured(&instrumented_as(&p, tc, mode));
    }
    let t = identity_spread(tc, vec![p], false, mode);
    report_spread(tc, &t);
    assert!(t.failures.is_empty(), "{}", t.failures.join("\n\n"));
    // Every state counts (threads in pthread_cond_wait are updated too),
    // and at least one update must happen.
    let floor = MIN_UPDATED_PER_PROGRAM.min(t.tried).max(1);
    assert!(
        t.updated >= floor,
        "{tc} {name}: only {} identity updates of {} states",
        t.updated,
        t.tried
    );
}

/// One test per deterministic corpus program and toolchain (gcc, clang), so
/// that they run in parallel; the list is checked against the corpus by
/// `the_spread_covers_every_deterministic_program`.
macro_rules! spread_tests {
    ($($name:ident),* $(,)?) => {
        const SPREAD_PROGRAMS: &[&str] = &[$(stringify!($name)),*];
        mod identity_updates_of_the_corpus_at_many_states {
            $(
                mod $name {
                    use super::super::{check_program_spread, Toolchain};
                    #[test]
                    fn gcc() {
                        check_program_spread(Toolchain::Gcc, stringify!($name));
                    }
                    #[test]
                    fn clang() {
                        check_program_spread(Toolchain::Clang, stringify!($name));
                    }
                }
            )*
        }
    };
}

spread_tests!(
    bank, calc, checksums, deeprec, dispatch, echo_tcp, geometry, inventory, jobrunner, kvstore,
    logstats, matrix, packets, pipeline, prodcons, ringbuf, scoring, signals, stackvm, textstats,
    vending,
);

/// The binary `up` arms most of its update points through trampolines
/// (so the spread really stops threads there).
fn assert_mostly_detoured(up: &Path) {
    let bytes = std::fs::read(up).expect("read the instrumented binary");
    let tables = upstare_dwarf::read_tables(&bytes).expect("tables");
    let points: BTreeSet<_> = tables
        .functions
        .iter()
        .flat_map(|f| f.update_points.iter().map(|p| p.addr))
        .collect();
    let upstare_dwarf::fdt::Arming::Inline(inline) = &tables.arming else {
        panic!("{}: not rewritten with --inline-points", up.display());
    };
    assert!(
        inline.detours.len() * 2 >= points.len(),
        "{}: only {} of {} update points detoured",
        up.display(),
        inline.detours.len(),
        points.len()
    );
}

/// The same spread with `upstare-rewrite --inline-points`: the update
/// points the threads stop at are mostly detours, armed by one flag byte,
/// and the hits are traps in trampolines taken as hits at the points.
/// Programs with loops, recursion, threads on condition variables, a
/// signal handler, blocking reads and a computed-goto VM.
macro_rules! inline_spread_tests {
    ($($name:ident),* $(,)?) => {
        mod inline_points_identity_updates_at_many_states {
            $(
                mod $name {
                    use super::super::{check_program_spread_as, PointsMode, Toolchain};
                    #[test]
                    fn gcc() {
                        check_program_spread_as(Toolchain::Gcc, stringify!($name), PointsMode::Inline);
                    }
                    #[test]
                    fn clang() {
                        check_program_spread_as(Toolchain::Clang, stringify!($name), PointsMode::Inline);
                    }
                }
            )*
        }
    };
}

inline_spread_tests!(bank, deeprec, dispatch, matrix, prodcons, signals, stackvm, textstats);

/// The per-program tests cover exactly the deterministic corpus programs
/// (a program added to the corpus needs its line in `spread_tests!`), and
/// there are at least the 20 the corpus-wide floor of 120 updates counted.
#[test]
fn the_spread_covers_every_deterministic_program() {
    let corpus: BTreeSet<&str> = deterministic_programs().iter().map(|p| p.name).collect();
    let tested: BTreeSet<&str> = SPREAD_PROGRAMS.iter().copied().collect();
    assert_eq!(tested, corpus);
    assert!(
        corpus.len() >= 20,
        "{} deterministic programs",
        corpus.len()
    );
}

/// The same to the very end of every run (skipping up to 140,000 hits costs
/// minutes): `cargo test -p upstare-runtime --test apply_identity -- --ignored`.
#[test]
#[ignore = "minutes: skips to the end of runs of up to 140,000 update-point hits"]
fn identity_updates_of_the_corpus_full_spread() {
    for tc in [Toolchain::Gcc, Toolchain::Clang] {
        check_spread(tc, true);
    }
}

/// Callbacks and addresses of globals that only heap objects hold are
/// found through the pointers' types and moved to the new image (without
/// that, the next call through them faults on the retired old code).
#[test]
fn identity_updates_remap_pointers_held_in_the_heap() {
    for tc in toolchains() {
        let dir = TempDir::new("heap");
        let up = build_c(&dir, "heap", include_str!("apply_support/heap.c"), tc);
        let base = baseline(&up, &[]);
        assert_eq!(base.status, ExitStatus::Code(0), "{}", base.stderr);
        for k in [0, 3, 50, 250] {
            match identity_at(&up, &[], k, &dir, &base) {
                Ok(Outcome::Updated(r)) => {
                    // Once the loop runs: two ops (fn, hits) and the ring
                    // (two slots) hold six pointers into the image.
                    let want = if k == 0 { (0, 0) } else { (3, 6) };
                    assert_eq!(
                        (r.heap_objects, r.heap_pointers_remapped),
                        want,
                        "{tc} k={k}: {:?}",
                        r.threads
                    );
                    assert!(
                        !r.warnings.iter().any(|w| w.contains("heap")),
                        "{tc} k={k}: {:?}",
                        r.warnings
                    );
                }
                Ok(Outcome::Refused(why)) => panic!("{tc} k={k}: refused: {why}"),
                Err(e) => panic!("{tc} k={k}: {e}"),
            }
        }
    }
}

/// A thread that runs through `raise()` on its way to an update point gets
/// its handler run before raise returns, as without the update, and two
/// raises of one signal do not merge (stop.rs used to hold such signals back
/// until the end: corpus `signals` then lost `usr1 #3`).
#[test]
fn signal_raised_while_stopping_is_delivered() {
    let p = upstare_corpus::program("signals").expect("signals");
    let up = instrumented(&p, Toolchain::Gcc);
    let base = baseline(&up, p.args);
    let dir = TempDir::new("sig");
    match identity_at(&up, p.args, 5, &dir, &base) {
        Ok(Outcome::Updated(_)) => {}
        Ok(Outcome::Refused(why)) => panic!("refused: {why}"),
        Err(e) => panic!("{e}"),
    }
}

// ---------------------------------------------------------------------------
// Updates while blocked in a library call.

const BLOCKED_C: &str = include_str!("apply_support/blocked.c");
const WAIT: Duration = Duration::from_secs(20);

/// x86-64 system call numbers as /proc/PID/task/TID/syscall shows them.
const SYS_READ: i64 = 0;
const SYS_NANOSLEEP: i64 = 35;
const SYS_ACCEPT: i64 = 43;
const SYS_RECVFROM: i64 = 45;
const SYS_FUTEX: i64 = 202;
const SYS_CLOCK_NANOSLEEP: i64 = 230;
const SYS_ACCEPT4: i64 = 288;

/// The system call each thread of `pid` is blocked in (`None`: running).
fn blocked_calls(pid: Pid) -> Vec<Option<i64>> {
    let Ok(tasks) = upstare_runtime::target::procfs::list_tasks(pid) else {
        return Vec::new();
    };
    tasks
        .iter()
        .map(|t| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{t}/syscall"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
        })
        .collect()
}

/// Waits (bounded) until, for each set in `sets`, a different thread of
/// `pid` is blocked in one of its system calls.
fn wait_blocked(pid: Pid, sets: &[&[i64]]) {
    let start = std::time::Instant::now();
    loop {
        let calls = blocked_calls(pid);
        let mut used = vec![false; calls.len()];
        let all = sets.iter().all(|set| {
            let i = calls
                .iter()
                .enumerate()
                .position(|(i, c)| !used[i] && c.is_some_and(|c| set.contains(&c)));
            i.map(|i| used[i] = true).is_some()
        });
        if all {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "pid {pid}: threads not blocked in {sets:?}: {calls:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Identity updates of one running process, each to a fresh copy of the
/// file it started from, checked as they go.
struct Updater<'a> {
    dir: &'a TempDir,
    original: PathBuf,
    running: PathBuf,
    reports: Vec<UpdateReport>,
}

impl<'a> Updater<'a> {
    fn new(dir: &'a TempDir, up: &Path) -> Self {
        Updater {
            dir,
            original: up.to_path_buf(),
            running: canon(up),
            reports: Vec::new(),
        }
    }

    /// Updates `pid`; each state in `expect` must be some thread's (`blocked
    /// in read`).
    fn update(&mut self, pid: Pid, expect: &[&str]) {
        let n = self.reports.len();
        let new = canon(&fresh_copy(&self.original, self.dir, &format!("u{n}")));
        let opts = ApplyOptions {
            timeout: READY_TIMEOUT,
            ..ApplyOptions::default()
        };
        let r = apply(pid.as_raw(), &new, &opts)
            .unwrap_or_else(|e| panic!("update {n} of pid {pid}: {e}"));
        for want in expect {
            assert!(
                r.threads.iter().any(|t| t.state.starts_with(want)),
                "update {n}: no thread {want}: {:?}",
                r.threads
            );
        }
        assert_eq!(canon(&r.from), self.running, "update {n}: from");
        assert_eq!(canon(&r.to), new, "update {n}: to");
        let (_, new_x) = mappings_of(pid, &new);
        let (_, old_x) = mappings_of(pid, &self.running);
        assert!(
            new_x >= 1 && old_x == 0,
            "update {n}: NEW executable {new_x}x, old {old_x}x:\n{}",
            maps_text(pid)
        );
        self.running = new;
        self.reports.push(r);
    }
}

fn pid_of(child: &upstare_testkit::ChildGuard) -> Pid {
    Pid::from_raw(child.pid() as i32)
}

/// Drives `blocked read`: before each chunk (and before end-of-file) the
/// main thread is blocked in read on the stdin pipe, and `hook` runs.
fn drive_read(up: &Path, hook: &mut dyn FnMut(Pid, usize)) -> Output {
    let mut child = upstare_testkit::spawn(up, &["read"]).expect("spawn");
    let pid = pid_of(&child);
    child
        .wait_for_line("ready", WAIT, |l| l == "ready")
        .expect("ready");
    let chunks = ["alpha\n", "beta beta\n", "gamma gamma gamma\n"];
    for (i, chunk) in chunks.iter().enumerate() {
        wait_blocked(pid, &[&[SYS_READ]]);
        hook(pid, i);
        child.send_stdin(chunk.as_bytes()).expect("write");
        let want = format!("chunk {}:", i + 1);
        child
            .wait_for_line("chunk", WAIT, |l| l.starts_with(&want))
            .expect("chunk read");
    }
    wait_blocked(pid, &[&[SYS_READ]]);
    hook(pid, chunks.len());
    child.close_stdin();
    child.wait(WAIT).expect("exit")
}

/// Drives `blocked sleep`: three naps, each ended by SIGUSR1 after `hook`.
fn drive_sleep(up: &Path, hook: &mut dyn FnMut(Pid, usize)) -> Output {
    let mut child = upstare_testkit::spawn(up, &["sleep"]).expect("spawn");
    let pid = pid_of(&child);
    for round in 0..3 {
        let nap = format!("nap {round}");
        child.wait_for_line("nap", WAIT, |l| l == nap).expect("nap");
        // Blocked in nanosleep before the signal, or it would sleep 60 s.
        wait_blocked(pid, &[&[SYS_NANOSLEEP, SYS_CLOCK_NANOSLEEP]]);
        hook(pid, round);
        // An updated thread re-executes the nanosleep statement: a signal
        // sent before it is back in the call would be handled first, and
        // the nap would last its full 60 s.
        wait_blocked(pid, &[&[SYS_NANOSLEEP, SYS_CLOCK_NANOSLEEP]]);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).expect("SIGUSR1");
        let woke = format!("woke {round}:");
        child
            .wait_for_line("woke", WAIT, |l| l.starts_with(&woke))
            .expect("woke");
    }
    child.wait(WAIT).expect("exit")
}

/// Drives `blocked mutex`: `hook` runs while one thread waits for the mutex
/// and main waits in read.
fn drive_mutex(up: &Path, hook: &mut dyn FnMut(Pid, usize)) -> Output {
    let mut child = upstare_testkit::spawn(up, &["mutex"]).expect("spawn");
    let pid = pid_of(&child);
    child
        .wait_for_line("ready", WAIT, |l| l == "ready")
        .expect("ready");
    wait_blocked(pid, &[&[SYS_FUTEX], &[SYS_READ]]);
    hook(pid, 0);
    child.send_stdin(b"g").expect("write");
    child.close_stdin();
    child.wait(WAIT).expect("exit")
}

/// Drives the echo server (`corpus/versions/echo_server/v1.c`, one
/// connection): `hook` runs while it is blocked in accept, then twice while
/// blocked in recv on the open connection. The port in its output is
/// replaced by `PORT`.
fn drive_echo(up: &Path, hook: &mut dyn FnMut(Pid, usize)) -> Output {
    use std::io::{BufRead, BufReader, Write};
    let mut child = upstare_testkit::spawn(up, &["1"]).expect("spawn");
    let pid = pid_of(&child);
    let line = child
        .wait_for_line("listening", WAIT, |l| l.starts_with("v1 listening port="))
        .expect("listening");
    let port: u16 = line["v1 listening port=".len()..].parse().expect("port");
    wait_blocked(pid, &[&[SYS_ACCEPT, SYS_ACCEPT4]]);
    hook(pid, 0);
    let conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut conn = conn;
    let mut talk = |say: &str| {
        conn.write_all(say.as_bytes()).expect("send");
        let mut reply = String::new();
        reader.read_line(&mut reply).expect("reply");
        reply
    };
    assert_eq!(talk("hello\n"), "echo: hello\n");
    wait_blocked(pid, &[&[SYS_RECVFROM]]);
    hook(pid, 1);
    assert_eq!(talk("dynamic updates\n"), "echo: dynamic updates\n");
    wait_blocked(pid, &[&[SYS_RECVFROM]]);
    hook(pid, 2);
    assert_eq!(talk("quit\n"), "bye\n");
    let mut out = child.wait(WAIT).expect("exit");
    out.stdout = out.stdout.replace(&format!("port={port}"), "port=PORT");
    out
}

type Driver = fn(&Path, &mut dyn FnMut(Pid, usize)) -> Output;

/// Runs `drive` once untouched and once with an identity update at every
/// hook, each requiring a thread in state `expect`; the outputs must match.
fn updated_while_blocked(up: &Path, drive: Driver, expect: &[&str], dir: &TempDir) -> usize {
    let base = drive(up, &mut |_, _| {});
    assert_eq!(base.status, ExitStatus::Code(0), "{}", base.stderr);
    let mut u = Updater::new(dir, up);
    let out = drive(up, &mut |pid, _| u.update(pid, expect));
    assert_eq!(out, base, "{}: output after updates differs", up.display());
    u.reports.len()
}

fn toolchains() -> Vec<Toolchain> {
    let tcs = vec![Toolchain::Gcc, Toolchain::Clang];
    for tc in &tcs {
        tc.require();
    }
    tcs
}

#[test]
fn identity_updates_while_blocked_in_read_on_a_pipe() {
    for tc in toolchains() {
        let dir = TempDir::new("read");
        let up = build_c(&dir, "blocked", BLOCKED_C, tc);
        // Four updates in a row, each while blocked in read.
        let n = updated_while_blocked(&up, drive_read, &["blocked in read"], &dir);
        assert_eq!(n, 4, "{tc}");
    }
}

#[test]
fn identity_updates_while_blocked_in_nanosleep() {
    for tc in toolchains() {
        let dir = TempDir::new("sleep");
        let up = build_c(&dir, "blocked", BLOCKED_C, tc);
        let n = updated_while_blocked(&up, drive_sleep, &["blocked in nanosleep"], &dir);
        assert_eq!(n, 3, "{tc}");
    }
}

#[test]
fn identity_update_while_blocked_in_pthread_mutex_lock() {
    for tc in toolchains() {
        let dir = TempDir::new("mutex");
        let up = build_c(&dir, "blocked", BLOCKED_C, tc);
        let expect = ["blocked in pthread_mutex_lock", "blocked in read"];
        let n = updated_while_blocked(&up, drive_mutex, &expect, &dir);
        assert_eq!(n, 1, "{tc}");
    }
}

#[test]
fn identity_updates_while_blocked_in_accept_and_recv() {
    let pair = upstare_corpus::version_pair("echo_server").expect("echo_server pair");
    for tc in toolchains() {
        let dir = TempDir::new("echo");
        let up = instrumented(&pair.v1, tc);
        let expect = ["blocked in"];
        let n = updated_while_blocked(&up, drive_echo, &expect, &dir);
        assert_eq!(n, 3, "{tc}");
    }
}

// ---------------------------------------------------------------------------
// Ten identity updates in a row on one process.

/// Checks the output of `corpus/versions/loop_body/v1.c` line by line: ticks
/// from 0 without a gap, each with the running sum of v1, and the final
/// line matching the last tick. Returns the number of ticks.
fn check_loop_body_output(stdout: &str, limit: u64) -> u64 {
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next(),
        Some(format!("v1 start limit={limit}").as_str())
    );
    let (mut i, mut sum) = (0u64, 0u64);
    let mut last = None;
    for line in lines {
        if let Some(rest) = line.strip_prefix("v1 done ") {
            let (ticks, s) = last.expect("a tick before the end");
            assert_eq!(rest, format!("ticks={ticks} sum={s}"), "{stdout}");
            return ticks + 1;
        }
        sum = (sum + i * 3) % 1_000_003;
        assert_eq!(line, format!("v1 tick {i} sum={sum}"), "{stdout}");
        last = Some((i, sum));
        i += 1;
    }
    panic!("no final line:\n{stdout}");
}

fn ten_in_a_row(tc: Toolchain) {
    let pair = upstare_corpus::version_pair("loop_body").expect("loop_body pair");
    let up = instrumented(&pair.v1, tc);
    let dir = TempDir::new("ten");
    let limit = 1_000_000u64;
    let mut child = upstare_testkit::spawn(&up, &[limit.to_string()]).expect("spawn");
    let pid = pid_of(&child);
    child
        .wait_for_line("tick", WAIT, |l| l.starts_with("v1 tick 3 "))
        .expect("ticking");
    let mut u = Updater::new(&dir, &up);
    let last_tick = |text: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.strip_prefix("v1 tick "))
            .filter_map(|l| l.split(' ').next()?.parse().ok())
            .next_back()
            .unwrap_or(0)
    };
    for n in 0..10 {
        u.update(pid, &[]);
        // The process goes on between updates: two more ticks.
        let want = format!("v1 tick {} ", last_tick(&child.stdout_so_far()) + 2);
        child
            .wait_for_line("more ticks", WAIT, |l| l.starts_with(&want))
            .unwrap_or_else(|e| panic!("{tc}: after update {n}: {e}"));
    }
    // Each update came from the previous file; the last one is the only
    // executable image. The earlier files upstare mapped are unmapped
    // whole; of the original, what the dynamic linker and libc read stays
    // mapped (program headers, `.dynamic`, `stdout`), not executable.
    let files: Vec<PathBuf> = std::iter::once(canon(&up))
        .chain(u.reports.iter().map(|r| canon(&r.to)))
        .collect();
    for (r, from) in u.reports.iter().zip(&files) {
        assert_eq!(&canon(&r.from), from, "{tc}");
    }
    let (last, earlier) = files.split_last().expect("files");
    assert_eq!(mappings_of(pid, last).1, 1, "{tc}:\n{}", maps_text(pid));
    for (i, f) in earlier.iter().enumerate() {
        let (all, exec) = mappings_of(pid, f);
        assert!(
            exec == 0 && (all > 0) == (i == 0),
            "{tc}: {}:\n{}",
            f.display(),
            maps_text(pid)
        );
    }
    child.send_stdin(b"quit\n").expect("quit");
    let out = child.wait(WAIT).expect("exit");
    assert_eq!(out.status, ExitStatus::Code(0), "{tc}: {}", out.stderr);
    assert_eq!(out.stderr, "", "{tc}");
    let ticks = check_loop_body_output(&out.stdout, limit);
    let states: Vec<&str> = u
        .reports
        .iter()
        .map(|r| r.threads[0].state.as_str())
        .collect();
    eprintln!("{tc}: 10 updates in a row ({states:?}), {ticks} ticks checked");
}

#[test]
fn ten_identity_updates_in_a_row() {
    for tc in toolchains() {
        ten_in_a_row(tc);
    }
}

// ---------------------------------------------------------------------------
// --dry-run, the CLI, refusals.

const CLI: &str = env!("CARGO_BIN_EXE_upstare-apply");

/// The file-backed mappings of `pid`: (start, end, perms, path).
fn file_maps(pid: Pid) -> Vec<(u64, u64, String, PathBuf)> {
    use upstare_runtime::target::procfs::MapPath;
    upstare_runtime::target::procfs::read_maps(pid)
        .expect("maps")
        .into_iter()
        .filter_map(|m| match m.path {
            MapPath::File(p) => {
                let perms = format!("{:?}", m.perms);
                Some((m.start.0, m.end.0, perms, p))
            }
            _ => None,
        })
        .collect()
}

/// Runs upstare-apply (bounded) with `args`.
fn cli(args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(CLI);
    cmd.args(args);
    upstare_testkit::run_command(cmd, Duration::from_secs(30)).expect("run upstare-apply")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("--json output does not parse ({e}): {:?}", out.stdout))
}

/// The report's phases, in their order: together they are the whole update.
const PHASES: [&str; 11] = [
    "plan",
    "stop",
    "check",
    "load",
    "transfer",
    "rebuild",
    "transform",
    "sweep",
    "tree_wait",
    "commit",
    "resume",
];

/// `--json`'s `timings`: every phase present, their sum the total, the
/// pause everything after the planning (a consistency check, not a timing
/// one).
fn phases_add_up(t: &serde_json::Value) {
    let get = |k: &str| {
        t[format!("{k}_us")]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k}_us in {t}"))
    };
    let sum: u64 = PHASES.iter().map(|p| get(p)).sum();
    assert_eq!(sum, get("total"), "{t}");
    assert_eq!(get("pause"), get("total") - get("plan"), "{t}");
    assert!(get("total") > 0, "{t}");
    // The stop's parts are within the stop.
    let detail = &t["stop_detail"];
    let parts: u64 = ["classify", "rescue", "arm", "run", "finish", "unrescue"]
        .iter()
        .map(|k| {
            detail[format!("{k}_us")]
                .as_u64()
                .unwrap_or_else(|| panic!("no stop_detail.{k}_us in {t}"))
        })
        .sum();
    assert!(parts <= get("stop"), "{t}");
}

/// The text report's latency line: `name N us` per phase, in order, adding
/// up to the total.
fn text_phases_add_up(stdout: &str) {
    let line = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("latency: "))
        .unwrap_or_else(|| panic!("no latency line in {stdout}"));
    let (phases, total) = line
        .split_once("; total ")
        .unwrap_or_else(|| panic!("no total in {line}"));
    let number = |s: &str| -> u64 {
        s.trim()
            .strip_suffix(" us")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not a time in microseconds: {s} ({line})"))
    };
    let mut names = Vec::new();
    let mut sum = 0;
    for p in phases.split(", ") {
        let (name, value) = p.split_once(' ').unwrap_or_else(|| panic!("{p}"));
        names.push(name.replace("transformers", "transform").replace('-', "_"));
        sum += number(value);
    }
    assert_eq!(names, PHASES, "{line}");
    let total = number(total.split(',').next().unwrap_or_default());
    assert_eq!(sum, total, "{line}");
}

/// loop_body v1 with 150 ticks, started and past its 5th tick.
fn start_ticking(up: &Path) -> upstare_testkit::ChildGuard {
    let child = upstare_testkit::spawn(up, &["150"]).expect("spawn");
    child
        .wait_for_line("tick 5", WAIT, |l| l.starts_with("v1 tick 5 "))
        .expect("ticking");
    child
}

#[test]
fn dry_run_changes_nothing_and_the_cli_reports() {
    let tc = Toolchain::Gcc;
    let pair = upstare_corpus::version_pair("loop_body").expect("loop_body pair");
    let up = instrumented(&pair.v1, tc);
    let base = upstare_testkit::run(&up, &["150"], WAIT).expect("baseline run");
    assert_eq!(base.status, ExitStatus::Code(0));
    let dir = TempDir::new("dry");
    let new = canon(&fresh_copy(&up, &dir, "new"));
    let new_s = new.to_str().expect("utf-8 path");

    let mut child = start_ticking(&up);
    let pid = pid_of(&child);
    let pid_s = pid.to_string();
    let before = file_maps(pid);
    let unchanged = |what: &str| {
        assert_eq!(file_maps(pid), before, "{what} changed the mappings");
        assert_eq!(mappings_of(pid, &new), (0, 0), "{what} mapped NEW");
    };

    // The library.
    let opts = ApplyOptions {
        dry_run: true,
        timeout: READY_TIMEOUT,
        ..ApplyOptions::default()
    };
    let r = apply(pid.as_raw(), &new, &opts).unwrap_or_else(|e| panic!("dry run: {e}"));
    assert!(r.dry_run);
    assert_eq!((r.bytes_written, r.globals_copied), (0, 0));
    assert_eq!(r.new_load_address, None);
    assert_eq!(canon(&r.from), canon(&up));
    assert_eq!(r.threads.len(), 1);
    assert_eq!(r.threads[0].tid, pid.as_raw());
    assert_eq!(
        r.threads[0].frames.last().map(|f| f.starts_with("main@")),
        Some(true)
    );
    unchanged("a dry run");

    // The CLI, text.
    let out = cli(&["--pid", &pid_s, "--to", new_s, "--dry-run"]);
    assert_eq!(out.status, ExitStatus::Code(0), "{}", out.stderr);
    let first = out.stdout.lines().next().unwrap_or_default();
    assert_eq!(
        first,
        format!(
            "would update process {pid} from {} to {new_s}",
            canon(&up).display()
        )
    );
    assert!(
        out.stdout.contains(&format!("\n  thread {pid}: "))
            && out.stdout.contains("latency: plan "),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("bytes written"), "{}", out.stdout);
    unchanged("upstare-apply --dry-run");

    // The CLI, JSON.
    let out = cli(&["--pid", &pid_s, "--to", new_s, "--dry-run", "--json"]);
    assert_eq!(out.status, ExitStatus::Code(0), "{}", out.stderr);
    let v = json(&out);
    assert_eq!(v["ok"], true);
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["pid"], pid.as_raw());
    assert_eq!(v["to"], new_s);
    assert_eq!(v["bytes_written"], 0);
    assert_eq!(v["threads"][0]["tid"], pid.as_raw());
    assert!(v["threads"][0]["frames"].is_array() && v["warnings"].is_array());
    phases_add_up(&v["timings"]);
    unchanged("upstare-apply --dry-run --json");

    // A refusal from the CLI: one line naming the file, and JSON.
    let missing = dir.path().join("missing.up");
    let missing_s = missing.to_str().expect("utf-8 path");
    let out = cli(&["--pid", &pid_s, "--to", missing_s]);
    assert_eq!(out.status, ExitStatus::Code(1));
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr
            .starts_with(&format!("upstare-apply: error: {missing_s}: cannot read")),
        "{}",
        out.stderr
    );
    let out = cli(&["--pid", &pid_s, "--to", missing_s, "--json"]);
    assert_eq!(out.status, ExitStatus::Code(1));
    let v = json(&out);
    assert_eq!(v["ok"], false);
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains(missing_s)),
        "{v}"
    );
    unchanged("a refused update");

    let out = child.wait(WAIT).expect("exit");
    assert_eq!(out, base, "dry runs changed the output");
}

#[test]
fn cli_updates_report_in_text_and_json() {
    let tc = Toolchain::Gcc;
    let pair = upstare_corpus::version_pair("loop_body").expect("loop_body pair");
    let up = instrumented(&pair.v1, tc);
    let base = upstare_testkit::run(&up, &["150"], WAIT).expect("baseline run");
    let dir = TempDir::new("cli");
    let first = canon(&fresh_copy(&up, &dir, "1"));
    let second = canon(&fresh_copy(&up, &dir, "2"));
    let (first_s, second_s) = (first.to_str().unwrap(), second.to_str().unwrap());

    let mut child = start_ticking(&up);
    let pid = pid_of(&child);
    let pid_s = pid.to_string();
    let out = cli(&["--pid", &pid_s, "--to", first_s, "--json"]);
    assert_eq!(out.status, ExitStatus::Code(0), "{}", out.stderr);
    let v = json(&out);
    assert_eq!(v["ok"], true);
    assert_eq!(v["dry_run"], false);
    assert_eq!(v["to"], first_s);
    assert!(v["new_load_address"].is_u64(), "{v}");
    assert!(v["bytes_written"].as_u64().is_some_and(|n| n > 0), "{v}");
    assert_eq!(v["threads"][0]["tid"], pid.as_raw());
    phases_add_up(&v["timings"]);
    assert_eq!(
        (mappings_of(pid, &first).1, mappings_of(pid, &canon(&up)).1),
        (1, 0)
    );

    let out = cli(&["--pid", &pid_s, "--to", second_s]);
    assert_eq!(out.status, ExitStatus::Code(0), "{}", out.stderr);
    assert_eq!(
        out.stdout.lines().next().unwrap_or_default(),
        format!("updated process {pid} from {first_s} to {second_s}")
    );
    assert!(out.stdout.contains(" globals copied, "), "{}", out.stdout);
    text_phases_add_up(&out.stdout);
    assert_eq!(
        (mappings_of(pid, &second).1, mappings_of(pid, &first).1),
        (1, 0)
    );

    let out = child.wait(WAIT).expect("exit");
    assert_eq!(out, base, "output after two CLI updates");
}

/// NEW must be a copy: the running file itself (by any name) is refused
/// before the process is touched, and the process goes on as before.
#[test]
fn updating_to_the_running_file_itself_is_refused() {
    let pair = upstare_corpus::version_pair("loop_body").expect("loop_body pair");
    let up = canon(&instrumented(&pair.v1, Toolchain::Gcc));
    let base = upstare_testkit::run(&up, &["150"], WAIT).expect("baseline run");
    let dir = TempDir::new("self");
    let link = dir.path().join("same-file.up");
    std::os::unix::fs::symlink(&up, &link).expect("symlink");
    let mut child = start_ticking(&up);
    let pid = pid_of(&child);
    let before = file_maps(pid);
    for new in [&up, &link] {
        match apply(pid.as_raw(), new, &ApplyOptions::default()) {
            Err(e @ UpdateError::New { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("update to a copy of it") && msg.contains(&format!("{pid}")),
                    "{msg}"
                );
            }
            other => panic!("{}: not refused: {other:?}", new.display()),
        }
    }
    assert_eq!(file_maps(pid), before);
    let out = child.wait(WAIT).expect("exit");
    assert_eq!(out, base, "output after the refusals");
}

/// A non-PIE NEW cannot be placed beside the running image: refused with a
/// one-line reason before anything changes, whether the running program is
/// PIE or not.
#[test]
fn non_pie_new_is_refused_and_the_process_goes_on() {
    Toolchain::GccNoPie.require();
    let pair = upstare_corpus::version_pair("loop_body").expect("loop_body pair");
    let pie = instrumented(&pair.v1, Toolchain::Gcc);
    let nopie = instrumented(&pair.v1, Toolchain::GccNoPie);
    let dir = TempDir::new("nopie");
    for running in [&pie, &nopie] {
        let base = upstare_testkit::run(running, &["150"], WAIT).expect("baseline run");
        let new = canon(&fresh_copy(&nopie, &dir, "new"));
        let new_s = new.to_str().expect("utf-8 path");
        let mut child = start_ticking(running);
        let pid = pid_of(&child);
        let before = file_maps(pid);
        let why = "not position-independent (ELF type EXEC)";
        match apply(pid.as_raw(), &new, &ApplyOptions::default()) {
            Err(e @ UpdateError::Load(_)) => {
                let msg = e.to_string();
                assert!(msg.starts_with(&format!("{new_s}: {why}")), "{msg}");
            }
            other => panic!("a non-PIE NEW was not refused: {other:?}"),
        }
        let out = cli(&["--pid", &pid.to_string(), "--to", new_s]);
        assert_eq!(out.status, ExitStatus::Code(1));
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        assert_eq!(out.stderr.matches(why).count(), 1, "{}", out.stderr);
        assert_eq!(file_maps(pid), before);
        assert_eq!(mappings_of(pid, &new), (0, 0));
        let out = child.wait(WAIT).expect("exit");
        assert_eq!(out, base, "{}: output after the refusal", running.display());
    }
}

// ---------------------------------------------------------------------------
// Regressions of bugs found here in other parts of the runtime.

/// A process stopped at its exec has only ld.so mapped; libc comes later.
/// Update points reached after that must still be classified (main returns
/// into libc): stop.rs used to read the libraries once, so with `skip_hits`
/// the program ran to its end ("process ended while being stopped").
#[test]
fn skipping_hits_from_the_exec_stop() {
    let p = upstare_corpus::program("calc").expect("calc");
    let up = instrumented(&p, Toolchain::Gcc);
    let dir = TempDir::new("exec");
    let new = fresh_copy(&up, &dir, "new");
    let mut run = TracedRun::spawn(&up, p.args);
    let opts = ApplyOptions {
        timeout: READY_TIMEOUT,
        dry_run: false,
        skip_hits: 5,
        ..ApplyOptions::default()
    };
    run.apply(&new, &opts)
        .unwrap_or_else(|e| panic!("update from the exec stop: {e}"));
}

/// `Tracee::spawn` hands the program over in a SIGSTOP group-stop; after
/// `Tracee::detach` the program must run on (it used to stay in state T).
#[test]
fn a_spawned_tracee_runs_on_after_detach() {
    let p = upstare_corpus::program("calc").expect("calc");
    let exe = upstare_corpus::build(&p, Toolchain::Gcc).expect("build");
    let mut cmd = std::process::Command::new(&exe);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let (tracee, _stdio) = upstare_runtime::Tracee::spawn(cmd).expect("spawn");
    let mut guard = KillGuard::new(tracee.pid());
    tracee.detach().expect("detach");
    let status = guard.wait(Duration::from_secs(10));
    assert_eq!(status, Ok(ExitStatus::Code(0)));
}
