//! A process tree updated as one application
//! (`runtime/src/update/tree.rs`): the pre-forking server of
//! `corpus/versions/prefork_server` — the parent in `waitpid`, 4 workers in
//! `accept`, one of them in `recv` on a live connection — updated through
//! `upstare-apply --pid PARENT`. A commit forced to fail in the last
//! process leaves all five exactly as they were; the real update turns
//! every one of them into v2, the live connection kept.

mod apply_support;

use apply_support::lines::{field, wait_for_lines, LineClient};
use apply_support::{instrumented, maps_text};
use nix::unistd::Pid;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use upstare_corpus::version_pair;
use upstare_testkit::{run_command, spawn, ChildGuard, ExitStatus, Toolchain};

const WAIT: Duration = Duration::from_secs(20);
const WORKERS: usize = 4;

/// Runs `upstare-apply --pid PID --to NEW --json` with `extra` arguments
/// and `env`; its exit success and the JSON it printed.
fn apply_cli(
    pid: Pid,
    to: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (bool, serde_json::Value, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_upstare-apply"));
    cmd.args([
        "--pid",
        &pid.to_string(),
        "--timeout",
        "3000",
        "--json",
        "--to",
    ])
    .arg(to)
    .args(extra)
    .envs(env.iter().copied());
    let out = run_command(cmd, Duration::from_secs(120)).expect("run upstare-apply");
    let json = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("JSON report: {e}: {}", out.stderr));
    (out.status == ExitStatus::Code(0), json, out.stderr)
}

/// Every worker answers: the live connection's worker, and the other
/// three through three connections held open at once (a worker serves one
/// connection at a time, so three open connections are three workers).
/// Each reply must be what `reply(line, served_before)` says.
fn every_worker_answers(
    port: u16,
    live: &mut LineClient,
    live_served: i64,
    tag: &str,
    reply: impl Fn(&str, i64) -> String,
) -> Vec<LineClient> {
    let line = format!("{tag} live");
    assert_eq!(live.ask(&line), reply(&line, live_served));
    let mut others: Vec<LineClient> = (0..WORKERS - 1)
        .map(|_| LineClient::connect(port))
        .collect();
    for (i, c) in others.iter_mut().enumerate() {
        let line = format!("{tag} {i}");
        let got = c.ask(&line);
        // A worker's count depends on how many connections it served
        // before: any number is v2's format, v1 has none.
        let expected_any = (0..8).any(|n| got == reply(&line, n));
        assert!(expected_any, "worker reply {got:?} to {line:?}");
    }
    others
}

/// The pids of the processes an update's JSON report lists, in its order.
fn updated_pids(json: &serde_json::Value) -> Vec<i64> {
    json["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .map(|p| p["pid"].as_i64().expect("pid"))
        .collect()
}

fn v1_reply(line: &str, _served: i64) -> String {
    format!("echo: {line}")
}

fn v2_reply(line: &str, served: i64) -> String {
    format!("v2 echo #{} ({} bytes): {line}", served + 1, line.len())
}

/// The pids of the parent and its workers, from the v1 lines.
fn tree_pids(server: &ChildGuard) -> Vec<Pid> {
    let workers = wait_for_lines(server, "v1 worker pid=", WORKERS, WAIT);
    std::iter::once(Pid::from_raw(server.pid() as i32))
        .chain(
            workers
                .iter()
                .map(|l| Pid::from_raw(field(l, "pid") as i32)),
        )
        .collect()
}

fn prefork_server_updated_as_one(tc: Toolchain) {
    let pair = version_pair("prefork_server").expect("prefork_server pair");
    let (v1, v2) = (instrumented(&pair.v1, tc), instrumented(&pair.v2, tc));
    let server = spawn(&v1, &[] as &[&str]).expect("spawn");
    let listening = server
        .wait_for_line("listening", WAIT, |l| l.starts_with("v1 listening"))
        .expect("listening");
    let port = field(&listening, "port") as u16;
    let pids = tree_pids(&server);
    assert_eq!(pids.len(), WORKERS + 1);
    let mut live = LineClient::connect(port);
    assert_eq!(live.ask("hello"), "echo: hello");
    // Now the parent sits in waitpid, one worker in recv, three in accept.
    std::thread::sleep(Duration::from_millis(50));

    // The last process's commit fails: all five are put back.
    let before: Vec<String> = pids.iter().map(|&p| maps_text(p)).collect();
    let (ok, json, stderr) = apply_cli(pids[0], &v2, &[], &[("UPSTARE_TEST_FAIL_COMMIT", "last")]);
    assert!(!ok, "the forced failure is reported: {json}");
    assert!(stderr.contains("rolled back"), "{stderr}");
    assert!(
        stderr.contains("4 process(es) had committed"),
        "the four before the last had committed: {stderr}"
    );
    for (p, b) in pids.iter().zip(&before) {
        assert_eq!(&maps_text(*p), b, "process {p} maps unchanged");
    }
    drop(every_worker_answers(
        port,
        &mut live,
        1,
        "after failure",
        v1_reply,
    ));

    // The real update, from the parent.
    let (ok, json, stderr) = apply_cli(pids[0], &v2, &[], &[]);
    assert!(ok, "update: {stderr}");
    let updated: Vec<i64> = json["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .map(|p| {
            assert!(
                !p["threads"].as_array().expect("threads").is_empty(),
                "each process lists its threads: {p}"
            );
            p["pid"].as_i64().expect("pid")
        })
        .collect();
    let mut want: Vec<i64> = pids.iter().map(|p| i64::from(p.as_raw())).collect();
    let mut got = updated.clone();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want, "the parent and its 4 workers: {json}");
    assert_eq!(updated[0], i64::from(pids[0].as_raw()), "the parent first");
    let mut others = every_worker_answers(port, &mut live, 2, "after update", v2_reply);
    // The parent runs v2: a worker told to exit is reaped and replaced in
    // v2's words, by a v2 worker.
    assert_eq!(others[0].ask("exit"), "v2 exiting");
    server
        .wait_for_line("the parent reaps as v2", WAIT, |l| {
            l.starts_with("v2 parent reaped pid=") && l.ends_with(" status=5")
        })
        .expect("v2 parent");
    server
        .wait_for_line("a v2 replacement", WAIT, |l| {
            l.starts_with("v2 worker pid=")
        })
        .expect("v2 worker");
    assert_eq!(live.ask("quit"), "v2 bye");
}

/// A parent ticking, a forked child ticking (same program) and a forked
/// child that exec'd `sleep`. Lines: `VER started child=A other=B`,
/// `VER parent|child PID tick N`.
const TICKERS: &str = r#"
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static void ticks(const char *who)
{
    long n = 0;
    for (;;) {
        struct timespec ts = {0, 20000000};
        nanosleep(&ts, NULL);
        n++;
        printf("VER %s %d tick %ld\n", who, (int)getpid(), n);
    }
}

int main(void)
{
    pid_t a, b;
    setvbuf(stdout, NULL, _IOLBF, 0);
    a = fork();
    if (a == 0)
        ticks("child");
    b = fork();
    if (b == 0) {
        execl("/bin/sleep", "sleep", "60", (char *)NULL);
        _exit(127);
    }
    printf("VER started child=%d other=%d\n", (int)a, (int)b);
    ticks("parent");
    return 0;
}
"#;

/// The tickers in versions 1 and 2, and a started v1 with the pids of its
/// ticking child and of the child running `sleep`.
fn tickers(dir: &apply_support::TempDir) -> (std::path::PathBuf, ChildGuard, Pid, Pid) {
    let v1 = apply_support::build_c(dir, "tick1", &TICKERS.replace("VER", "v1"), Toolchain::Gcc);
    let v2 = apply_support::build_c(dir, "tick2", &TICKERS.replace("VER", "v2"), Toolchain::Gcc);
    let run = spawn(&v1, &[] as &[&str]).expect("spawn");
    let started = run
        .wait_for_line("started", WAIT, |l| l.starts_with("v1 started"))
        .expect("started");
    let child = Pid::from_raw(field(&started, "child") as i32);
    let other = Pid::from_raw(field(&started, "other") as i32);
    run.wait_for_line("the child ticks", WAIT, |l| l.starts_with("v1 child "))
        .expect("child ticks");
    (v2, run, child, other)
}

#[test]
fn descendants_running_another_program_are_left_alone() {
    let dir = apply_support::TempDir::new("tree-other");
    let (v2, run, child, other) = tickers(&dir);
    let exe_before = std::fs::read_link(format!("/proc/{other}/exe")).expect("sleep's exe");
    let parent = Pid::from_raw(run.pid() as i32);
    let (ok, json, stderr) = apply_cli(parent, &v2, &[], &[]);
    assert!(ok, "update: {stderr}");
    let pids = updated_pids(&json);
    assert_eq!(
        pids,
        [i64::from(parent.as_raw()), i64::from(child.as_raw())]
    );
    assert_eq!(
        json["other_programs"][0]["pid"].as_i64(),
        Some(i64::from(other.as_raw())),
        "{json}"
    );
    for who in [format!("v2 parent {parent} "), format!("v2 child {child} ")] {
        run.wait_for_line("both tick as v2", WAIT, |l| l.starts_with(&who))
            .expect("v2 ticks");
    }
    assert_eq!(
        std::fs::read_link(format!("/proc/{other}/exe")).expect("sleep still runs"),
        exe_before
    );
    assert!(!maps_text(other).contains("tick"), "sleep was not touched");
}

#[test]
fn only_pid_updates_one_process_of_the_tree() {
    let dir = apply_support::TempDir::new("tree-only");
    let (v2, run, child, _) = tickers(&dir);
    let (ok, json, stderr) = apply_cli(child, &v2, &["--only-pid"], &[]);
    assert!(ok, "update: {stderr}");
    assert_eq!(json["pid"].as_i64(), Some(i64::from(child.as_raw())));
    assert!(json.get("processes").is_none(), "one process: {json}");
    run.wait_for_line("the child ticks as v2", WAIT, |l| {
        l.starts_with(&format!("v2 child {child} "))
    })
    .expect("v2 child");
    // The parent goes on as v1 after the child switched.
    let parent = run.pid();
    let seen_v2 = std::cell::Cell::new(false);
    run.wait_for_line("the parent still v1", WAIT, |l| {
        seen_v2.set(seen_v2.get() || l.starts_with("v2 child "));
        seen_v2.get() && l.starts_with(&format!("v1 parent {parent} "))
    })
    .expect("v1 parent after the child's update");
}

/// Processes forked and ending during the update: every process of the
/// tree that lives on runs v2 (none is left on v1), those that ended are
/// dropped, and the update succeeds.
#[test]
fn forks_and_exits_during_the_update_leave_no_process_on_v1() {
    // About 10 children alive, each for 300 ms.
    let dir = apply_support::TempDir::new("tree-churn");
    let (v2, run) = start_forker(&dir, &["15", "1000000"], 12);
    let opts = upstare_runtime::update::ApplyOptions {
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let report = upstare_runtime::update::tree::apply_tree(run.pid() as i32, &v2, &opts)
        .unwrap_or_else(|e| panic!("update of the churning tree: {e}"));
    // Every child is either updated or dropped as ended (planning runs
    // before the seize, so on a loaded machine each child of this churn,
    // 300 ms old at most, may end first): the test must have met some.
    assert!(
        report.processes.len() + report.exited.len() >= 2,
        "the parent and its children: {} updated, {} ended",
        report.processes.len(),
        report.exited.len()
    );
    eprintln!(
        "updated {}, forked during the update {}, ended {}, other {:?}",
        report.processes.len(),
        report.forked.len(),
        report.exited.len(),
        report.other_programs
    );
    // Lines printed before the stop may still be in the pipe: let them
    // come, then every line from then on is v2's.
    std::thread::sleep(Duration::from_millis(150));
    let mark = run.stdout_so_far().len();
    wait_for_lines(&run, "v2 parent tick", 12, WAIT);
    assert_no_v1_since(&run, mark);
}

/// No line of v1 in `run`'s output from byte `mark` on.
fn assert_no_v1_since(run: &ChildGuard, mark: usize) {
    let after = run.stdout_so_far();
    let late_v1: Vec<&str> = after[mark..]
        .lines()
        .filter(|l| l.starts_with("v1 "))
        .collect();
    assert!(late_v1.is_empty(), "processes left on v1: {late_v1:?}");
}

/// A parent that forks a child at each turn of its loop (every 30 ms, at
/// most `argv[2]`); each child ticks every 20 ms, `argv[1]` times (0: for
/// ever), then exits. Lines: `VER parent tick N`, `VER child PID tick N`.
const FORKER: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void nap(long ms)
{
    struct timespec ts = {0, ms * 1000000};
    nanosleep(&ts, NULL);
}

static void child_life(long life)
{
    for (long n = 0; life == 0 || n < life; n++) {
        nap(20);
        printf("VER child %d tick %ld\n", (int)getpid(), n);
    }
    _exit(0);
}

int main(int argc, char **argv)
{
    long life = argc > 1 ? atol(argv[1]) : 0;
    long most = argc > 2 ? atol(argv[2]) : 30;
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGCHLD, SIG_IGN);
    for (long n = 0;; n++) {
        if (n < most && fork() == 0)
            child_life(life);
        nap(30);
        printf("VER parent tick %ld\n", n);
    }
    return 0;
}
"#;

/// The forker in versions 1 and 2 (in `dir`) and v1 started with `args`
/// once its parent ticked `ticks` times.
fn start_forker(
    dir: &apply_support::TempDir,
    args: &[&str],
    ticks: usize,
) -> (std::path::PathBuf, ChildGuard) {
    let v1 = apply_support::build_c(dir, "fork1", &FORKER.replace("VER", "v1"), Toolchain::Gcc);
    let v2 = apply_support::build_c(dir, "fork2", &FORKER.replace("VER", "v2"), Toolchain::Gcc);
    let run = spawn(&v1, args).expect("spawn");
    wait_for_lines(&run, "v1 parent tick", ticks, WAIT);
    (v2, run)
}

/// The parent is let run through 6 update points while it is being
/// stopped (`skip_hits`), forking a child at each: those children, forked
/// during the update, are seized and updated too.
#[test]
fn children_forked_during_the_stop_are_included() {
    let dir = apply_support::TempDir::new("tree-forker");
    let (v2, run) = start_forker(&dir, &["0", "30"], 2);
    let opts = upstare_runtime::update::ApplyOptions {
        timeout: Duration::from_secs(5),
        skip_hits: 6,
        ..Default::default()
    };
    let report = upstare_runtime::update::tree::apply_tree(run.pid() as i32, &v2, &opts)
        .unwrap_or_else(|e| panic!("update of the forking tree: {e}"));
    assert!(
        !report.forked.is_empty(),
        "children forked while the parent was being stopped: {:?}",
        report.processes.iter().map(|p| p.pid).collect::<Vec<_>>()
    );
    for pid in &report.forked {
        run.wait_for_line("a child forked during the update ticks as v2", WAIT, |l| {
            l.starts_with(&format!("v2 child {pid} tick"))
        })
        .expect("v2 child");
    }
    std::thread::sleep(Duration::from_millis(150));
    let mark = run.stdout_so_far().len();
    wait_for_lines(&run, "v2 parent tick", 3, WAIT);
    std::thread::sleep(Duration::from_millis(100));
    assert_no_v1_since(&run, mark);
}

#[test]
fn prefork_server_updated_as_one_gcc() {
    prefork_server_updated_as_one(Toolchain::Gcc);
}

#[test]
fn prefork_server_updated_as_one_clang() {
    prefork_server_updated_as_one(Toolchain::Clang);
}

/// A parent that re-executes its own program for each request, as sshd
/// does for each connection: on `spawn` on stdin it forks, and the child
/// execs the path the parent was started from with `-R`. Lines:
/// `VER ready`, `VER spawned child=PID`, `VER rexec PID tick N`.
const REEXEC: &str = r#"
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char *self_path;

static void ticks(void)
{
    long n = 0;
    for (;;) {
        struct timespec ts = {0, 20000000};
        nanosleep(&ts, NULL);
        n++;
        printf("VER rexec %d tick %ld\n", (int)getpid(), n);
    }
}

int main(int argc, char **argv)
{
    char buf[64];
    ssize_t n;
    pid_t c;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 1 && strcmp(argv[1], "-R") == 0)
        ticks();
    self_path = argv[0];
    printf("VER ready\n");
    for (;;) {
        n = read(0, buf, sizeof buf - 1);
        if (n <= 0)
            return 0;
        buf[n] = 0;
        if (strncmp(buf, "spawn", 5) == 0) {
            c = fork();
            if (c == 0) {
                execl(self_path, self_path, "-R", (char *)NULL);
                _exit(127);
            }
            printf("VER spawned child=%d\n", (int)c);
        }
    }
}
"#;

/// After its parent was updated to another file, a child that re-executed
/// the file the parent was started from (sshd's rexec) runs an older
/// version than its parent: it is still the same application, updated
/// with it (with its own plan), not left alone as another program.
#[test]
fn a_child_re_executing_the_started_file_is_updated_with_its_parent() {
    let dir = apply_support::TempDir::new("tree-rexec");
    let v1 = apply_support::build_c(&dir, "rexec1", &REEXEC.replace("VER", "v1"), Toolchain::Gcc);
    let v2 = apply_support::build_c(&dir, "rexec2", &REEXEC.replace("VER", "v2"), Toolchain::Gcc);
    let mut run = spawn(&v1, &[] as &[&str]).expect("spawn");
    run.wait_for_line("ready", WAIT, |l| l == "v1 ready")
        .expect("ready");
    let parent = Pid::from_raw(run.pid() as i32);
    // The parent now runs a copy; its re-executed children run v1's file.
    let copy = apply_support::fresh_copy(&v1, &dir, "identity");
    let (ok, _, stderr) = apply_cli(parent, &copy, &[], &[]);
    assert!(ok, "identity update: {stderr}");
    run.send_stdin(b"spawn\n").expect("spawn");
    let spawned = run
        .wait_for_line("spawned", WAIT, |l| l.starts_with("v1 spawned"))
        .expect("spawned");
    let child = Pid::from_raw(field(&spawned, "child") as i32);
    run.wait_for_line("the child ticks", WAIT, |l| {
        l.starts_with(&format!("v1 rexec {child} "))
    })
    .expect("child ticks");

    let (ok, json, stderr) = apply_cli(parent, &v2, &[], &[]);
    assert!(ok, "update: {stderr}");
    let pids = updated_pids(&json);
    assert_eq!(
        pids,
        [i64::from(parent.as_raw()), i64::from(child.as_raw())],
        "{json}"
    );
    assert_eq!(json["other_programs"].as_array().map(Vec::len), Some(0));
    run.wait_for_line("the child ticks as v2", WAIT, |l| {
        l.starts_with(&format!("v2 rexec {child} "))
    })
    .expect("v2 child ticks");
    run.send_stdin(b"spawn\n").expect("spawn");
    run.wait_for_line("the parent as v2", WAIT, |l| l.starts_with("v2 spawned"))
        .expect("v2 parent");
}

/// What [`sandboxed_tickers`] adds to `TICKERS`: a seccomp filter that
/// allows every call (its content does not matter: an update cannot know
/// what a filter would deny).
const SANDBOX: &str = r#"
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>

static void sandbox(void)
{
    struct sock_filter allow = BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    struct sock_fprog prog = { 1, &allow };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
        printf("no sandbox\n");
        _exit(1);
    }
}
"#;

/// `TICKERS` of version `ver` whose ticking child first puts itself under
/// a seccomp filter.
fn sandboxed_tickers(ver: &str) -> String {
    let src = TICKERS.replace("VER", ver).replace(
        "    if (a == 0)\n        ticks(\"child\");",
        "    if (a == 0) {\n        sandbox();\n        ticks(\"child\");\n    }",
    );
    assert!(src.contains("sandbox();"), "TICKERS no longer fits");
    format!("{SANDBOX}{src}")
}

/// The last tick number `who` (`v1 child 123`) printed so far.
fn last_tick(run: &ChildGuard, who: &str) -> i64 {
    run.stdout_so_far()
        .lines()
        .filter_map(|l| l.strip_prefix(who)?.strip_prefix(" tick ")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// A descendant under a seccomp filter the updater does not run under is
/// refused by pid before any process is stopped (remote system calls could
/// be denied or kill it), in the tree and alone; both processes go on
/// ticking as v1 with nothing of v2 mapped.
#[test]
fn a_sandboxed_descendant_is_refused_and_nothing_changes() {
    let dir = apply_support::TempDir::new("tree-seccomp");
    let v1 = apply_support::build_c(&dir, "sandbox1", &sandboxed_tickers("v1"), Toolchain::Gcc);
    let v2 = apply_support::build_c(&dir, "sandbox2", &sandboxed_tickers("v2"), Toolchain::Gcc);
    let run = spawn(&v1, &[] as &[&str]).expect("spawn");
    let started = run
        .wait_for_line("started", WAIT, |l| l.starts_with("v1 started"))
        .expect("started");
    let parent = Pid::from_raw(run.pid() as i32);
    let child = Pid::from_raw(field(&started, "child") as i32);
    let (child_who, parent_who) = (format!("v1 child {child}"), format!("v1 parent {parent}"));
    run.wait_for_line("the child ticks", WAIT, |l| l.starts_with(&child_who))
        .expect("child ticks");

    for (pid, extra) in [(parent, &[] as &[&str]), (child, &["--only-pid"])] {
        let (ok, json, stderr) = apply_cli(pid, &v2, extra, &[]);
        assert!(!ok, "the update of {pid} went through: {json}");
        let error = json["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(&format!("process {child} ("))
                && error.contains("seccomp")
                && error.contains("nothing was changed"),
            "{error} {stderr}"
        );
    }
    for who in [&child_who, &parent_who] {
        let next = last_tick(&run, who) + 3;
        let line = format!("{who} tick {next}");
        run.wait_for_line("ticks on as v1", WAIT, |l| l == line)
            .expect("v1 ticks on");
    }
    for p in [parent, child] {
        assert!(!maps_text(p).contains("sandbox2"), "v2 mapped in {p}");
    }
    assert!(!run.stdout_so_far().contains("v2 "), "a v2 line");
}
