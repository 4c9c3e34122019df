//! Threads waiting on condition variables are updated: each is led out of
//! its `pthread_cond_wait` through glibc's own timeout path and returns 0
//! (a spurious wake-up) with its mutex held, into the new version's frame,
//! on the condition variable NEW uses. A worker pool (`pool` version pair:
//! 8 workers, 2 producers, a bounded queue of numbered jobs) is updated
//! idle and busy, back and forth: no job is lost or run twice (every id
//! printed once, totals as the source computes them), and every job after
//! an update runs the new version's code. A dry run before leads them out
//! and resumes them in the old version the same way.

mod apply_support;

use apply_support::ticks::pair;
use apply_support::{fresh_copy, TempDir};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions, UpdateReport};
use upstare_testkit::{spawn, ChildGuard, Toolchain};

const WAIT: Duration = Duration::from_secs(30);
/// Threads of the pool: main, 8 workers, 2 producers.
const THREADS: usize = 11;
/// Jobs each producer queues per `go` of a busy round.
const BUSY_JOBS: i64 = 1500;

fn update(child: &ChildGuard, to: &Path, dry_run: bool) -> UpdateReport {
    let opts = ApplyOptions {
        // Generous: the machine may be loaded (the stop usually takes
        // tens of milliseconds).
        timeout: Duration::from_millis(10_000),
        dry_run,
        ..ApplyOptions::default()
    };
    apply(child.pid() as i32, to, &opts).unwrap_or_else(|e| {
        panic!(
            "update failed: {e}\nstdout so far:\n{}",
            child.stdout_so_far()
        )
    })
}

/// Threads of `report` woken from a condition wait by the update.
fn woken(report: &UpdateReport) -> usize {
    report
        .threads
        .iter()
        .filter(|t| t.state.contains("woken from pthread_cond_"))
        .count()
}

/// The value version `v` computes for job `id` (pool's `run_job`).
fn value(v: u32, id: i64) -> i64 {
    if v == 1 {
        id * 3
    } else {
        id * 5 + 1
    }
}

/// Checks the whole output: every job id 1..=jobs printed exactly once
/// with its version's value, the totals lines, and the versions of the
/// lines in the order of the updates (`versions`: one entry per run of
/// lines of one version).
fn check_output(stdout: &str, jobs: i64, versions: &[u32]) {
    let mut ids = BTreeSet::new();
    let mut runs: Vec<u32> = Vec::new();
    for line in stdout.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let v: u32 = match w.first() {
            Some(&"v1") => 1,
            Some(&"v2") => 2,
            _ => panic!("line without a version: {line:?}"),
        };
        if runs.last() != Some(&v) {
            runs.push(v);
        }
        if w.get(1) == Some(&"job") {
            let id: i64 = w[2].parse().expect("job id");
            let val: i64 = w[6].parse().expect("value");
            assert_eq!(val, value(v, id), "{line:?}");
            assert!(ids.insert(id), "job {id} ran twice");
        }
    }
    let expected: BTreeSet<i64> = (1..=jobs).collect();
    let missing: Vec<_> = expected.difference(&ids).take(10).collect();
    assert!(missing.is_empty(), "jobs never run: {missing:?}");
    assert_eq!(ids.len() as i64, jobs, "jobs beyond {jobs} ran");
    assert_eq!(runs, versions, "versions of the lines in order");
    let totals = format!("done={jobs} sum={}", jobs * (jobs + 1) / 2);
    let last = stdout.lines().last().unwrap_or("");
    assert!(
        last.ends_with(&format!("joined {totals}")),
        "last line {last:?}, want joined {totals}"
    );
}

fn pool(tc: Toolchain) {
    tc.require();
    let (v1, v2) = pair("pool", tc);
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ready", WAIT, |l| l.starts_with("v1 ready 8 workers"))
        .expect("ready");
    // A dry run leads every waiter out and resumes it in v1 (a spurious
    // wake-up): nothing may be lost, main's read goes on.
    std::thread::sleep(Duration::from_millis(200));
    let dry = update(&child, &v2, true);
    assert_eq!(dry.threads.len(), THREADS, "{:?}", dry.threads);
    assert_eq!(woken(&dry), THREADS - 1, "{:?}", dry.threads);
    child.send_stdin(b"go 5\nwait\n").expect("go");
    child
        .wait_for_line("v1 idle", WAIT, |l| l.starts_with("v1 idle done=10 "))
        .expect("v1 runs every job after the dry run");
    // Idle: the 8 workers and 2 producers wait on their condition
    // variables, main in read.
    std::thread::sleep(Duration::from_millis(200));
    let idle = update(&child, &v2, false);
    assert_eq!(idle.threads.len(), THREADS, "{:?}", idle.threads);
    assert_eq!(woken(&idle), THREADS - 1, "{:?}", idle.threads);
    child.send_stdin(b"go 5\nwait\n").expect("go");
    child
        .wait_for_line("v2 idle", WAIT, |l| l.starts_with("v2 idle done=20 "))
        .expect("the new version's workers run the jobs");
    // Busy, back to v1 and forward to v2 again.
    let busy = format!("go {BUSY_JOBS}\nwait\n");
    child.send_stdin(busy.as_bytes()).expect("go");
    child
        .wait_for_line("busy", WAIT, |l| l.starts_with("v2 job 40 "))
        .expect("busy");
    // The running v1 file is mapped already: back to a copy of it.
    let dir = TempDir::new(&format!("pool-{tc}"));
    let v1_again = fresh_copy(&v1, &dir, "again");
    let back = update(&child, &v1_again, false);
    assert_eq!(back.threads.len(), THREADS, "{:?}", back.threads);
    // main waits for the jobs in pthread_cond_timedwait.
    assert!(woken(&back) >= 1, "{:?}", back.threads);
    child
        .wait_for_line("v1 runs", WAIT, |l| {
            // A job of the busy round (ids above 20), not of the dry run's.
            l.strip_prefix("v1 job ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|id| id.parse::<i64>().ok())
                .is_some_and(|id| id > 20)
        })
        .expect("v1 runs again");
    let forth = update(&child, &v2, false);
    assert_eq!(forth.threads.len(), THREADS, "{:?}", forth.threads);
    assert!(woken(&forth) >= 1, "{:?}", forth.threads);
    let jobs = 20 + 2 * BUSY_JOBS;
    child
        .wait_for_line("all done", WAIT, |l| {
            l.starts_with(&format!("v2 idle done={jobs} "))
        })
        .expect("every job done");
    child.send_stdin(b"quit\n").expect("quit");
    let out = child.wait(WAIT).expect("pool ends");
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    check_output(&out.stdout, jobs, &[1, 2, 1, 2]);
}

#[test]
fn worker_pool_updated_idle_and_busy_gcc() {
    pool(Toolchain::Gcc);
}

#[test]
fn worker_pool_updated_idle_and_busy_clang() {
    pool(Toolchain::Clang);
}

/// Threads of `waiters`: main and 6 waiters.
const WAITERS: usize = 6;

/// Loads of the machine: `n` shell loops spinning until dropped (a led-out
/// waiter then waits for a CPU on its way to the call's return, while the
/// updater keeps interrupting it).
fn spinners(n: usize) -> Vec<ChildGuard> {
    (0..n)
        .map(|_| spawn(Path::new("/bin/sh"), &["-c", "while :; do :; done"]).expect("spin"))
        .collect()
}

/// Kicks every waiter once and waits for each one's line of version `v`
/// with its job count `job`.
fn kick_all(child: &mut ChildGuard, v: u32, job: usize) {
    for k in 0..WAITERS {
        child
            .send_stdin(format!("kick {k}\n").as_bytes())
            .expect("kick");
        let want = format!("v{v} thread {k} job {job}");
        child
            .wait_for_line(&want, WAIT, |l| l == want)
            .unwrap_or_else(|e| panic!("{want}: {e}\n{}", child.stdout_so_far()));
    }
}

/// Waiters on their own mutexes, all at one call site (redis's background
/// threads), updated back and forth 20 times with the CPUs busy: each
/// update leads all 6 out and parks each at the call's return, the wait
/// returns 0 in the new version (the program ends if it returns anything
/// else), and each then serves a job in that version. A thread whose
/// breakpoint trap at the return was reported after the updater's own
/// interrupt used to be taken for one still on its way, run past its
/// return, and wait again until the update gave up.
fn waiters_updated_repeatedly_under_load(tc: Toolchain) {
    tc.require();
    let (v1, v2) = pair("waiters", tc);
    let dir = TempDir::new(&format!("waiters-{tc}"));
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ready", WAIT, |l| l == "v1 ready 6")
        .expect("ready");
    let _load = spinners(2);
    for round in 0..20usize {
        let v = if round % 2 == 0 { 2 } else { 1 };
        let src = if v == 2 { &v2 } else { &v1 };
        let to = fresh_copy(src, &dir, &format!("round{round}"));
        std::thread::sleep(Duration::from_millis(20));
        let report = update(&child, &to, false);
        assert_eq!(report.threads.len(), WAITERS + 1, "{:?}", report.threads);
        assert_eq!(woken(&report), WAITERS, "{:?}", report.threads);
        kick_all(&mut child, v, round + 1);
    }
    child.send_stdin(b"quit\n").expect("quit");
    let out = child.wait(WAIT).expect("waiters end");
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    let last = out.stdout.lines().last().unwrap_or("");
    assert_eq!(last, format!("v1 joined jobs={}", 20 * WAITERS));
}

#[test]
fn waiters_on_their_own_mutexes_updated_repeatedly_under_load_gcc() {
    waiters_updated_repeatedly_under_load(Toolchain::Gcc);
}

#[test]
fn waiters_on_their_own_mutexes_updated_repeatedly_under_load_clang() {
    waiters_updated_repeatedly_under_load(Toolchain::Clang);
}
