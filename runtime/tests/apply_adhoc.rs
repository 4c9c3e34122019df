//! Programs that are not in the corpus, updated live the way a user would:
//! a key-value TCP server blocked in read() on an open connection (identity
//! update, then a changed version), with its state (the table and the
//! connection) kept.

mod apply_support;

use std::io::{BufRead, BufReader, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use upstare_testkit::{spawn, Toolchain};

const WAIT: Duration = Duration::from_secs(20);

/// A key-value server: `set K V`, `get K`, `count`; `reply_prefix` and
/// `count_bonus` differ between versions.
fn server(reply_prefix: &str, count_bonus: i32) -> String {
    format!(
        r#"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

struct entry {{ char key[32]; long value; }};
static struct entry table[64];
static int used;
static long requests;

static struct entry *find(const char *key)
{{
    for (int i = 0; i < used; i++)
        if (strcmp(table[i].key, key) == 0)
            return &table[i];
    return NULL;
}}

static int read_line(int fd, char *buf, int cap)
{{
    int n = 0;
    char c;
    while (n < cap - 1) {{
        ssize_t r = read(fd, &c, 1);
        if (r <= 0)
            return -1;
        if (c == '\n')
            break;
        buf[n++] = c;
    }}
    buf[n] = 0;
    return n;
}}

static void serve(int fd)
{{
    char line[128], out[160];
    while (read_line(fd, line, sizeof line) >= 0) {{
        char key[32];
        long value;
        requests++;
        if (sscanf(line, "set %31s %ld", key, &value) == 2) {{
            struct entry *e = find(key);
            if (!e && used < 64) {{
                e = &table[used++];
                strcpy(e->key, key);
            }}
            if (e)
                e->value = value;
            snprintf(out, sizeof out, "{reply_prefix}ok\n");
        }} else if (sscanf(line, "get %31s", key) == 1) {{
            struct entry *e = find(key);
            snprintf(out, sizeof out, "{reply_prefix}%s=%ld\n", key, e ? e->value : -1L);
        }} else if (strcmp(line, "count") == 0) {{
            snprintf(out, sizeof out, "{reply_prefix}keys=%d requests=%ld\n", used, requests + {count_bonus});
        }} else if (strcmp(line, "quit") == 0) {{
            write(fd, "bye\n", 4);
            return;
        }} else {{
            snprintf(out, sizeof out, "{reply_prefix}?\n");
        }}
        write(fd, out, strlen(out));
    }}
}}

int main(void)
{{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(s, (struct sockaddr *)&a, sizeof a);
    listen(s, 4);
    socklen_t len = sizeof a;
    getsockname(s, (struct sockaddr *)&a, &len);
    printf("port %d\n", ntohs(a.sin_port));
    fflush(stdout);
    int c = accept(s, NULL, NULL);
    serve(c);
    close(c);
    return 0;
}}
"#
    )
}

fn instrumented(dir: &Path, name: &str, src: &str) -> PathBuf {
    apply_support::compile_instrumented(dir, name, src, Toolchain::Gcc, &[])
}

#[test]
fn apply_cli_help_mentions_dry_run() {
    let r = Command::new(env!("CARGO_BIN_EXE_upstare-apply"))
        .arg("--help")
        .output()
        .expect("apply --help");
    assert!(String::from_utf8_lossy(&r.stdout).contains("--dry-run"));
}

fn apply_cli(pid: u32, to: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_upstare-apply"))
        .args(["--pid", &pid.to_string(), "--to"])
        .arg(to)
        .arg("--json")
        .output()
        .expect("run upstare-apply");
    assert!(
        out.status.success(),
        "upstare-apply failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json report")
}

#[test]
fn kv_server_blocked_in_read_is_updated_in_place() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("apply-adhoc");
    std::fs::create_dir_all(&dir).expect("dir");
    let v1 = instrumented(&dir, "kv1", &server("", 0));
    let v2 = instrumented(&dir, "kv2", &server("v2 ", 1000));
    let same = dir.join("kv1-copy.up");
    std::fs::copy(&v1, &same).expect("copy");

    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    let port_line = child
        .wait_for_line("port", WAIT, |l| l.starts_with("port "))
        .unwrap_or_else(|e| panic!("{e}"));
    let port: u16 = port_line[5..].parse().expect("port");
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut w = stream;
    let mut ask = |q: &str| -> String {
        w.write_all(format!("{q}\n").as_bytes()).expect("send");
        let mut line = String::new();
        reader.read_line(&mut line).expect("reply");
        line.trim_end().to_string()
    };
    assert_eq!(ask("set apples 3"), "ok");
    assert_eq!(ask("set pears 5"), "ok");
    std::thread::sleep(Duration::from_millis(30));

    // Identity update while blocked in read: nothing observable changes.
    let r = apply_cli(child.pid(), &same);
    assert_eq!(r["ok"], true);
    assert!(
        r["threads"][0]["state"]
            .as_str()
            .unwrap_or("")
            .contains("blocked"),
        "{r}"
    );
    assert_eq!(ask("get apples"), "apples=3");
    assert_eq!(ask("count"), "keys=2 requests=4");

    // A changed version: the table, the counter and the connection survive.
    std::thread::sleep(Duration::from_millis(30));
    let r = apply_cli(child.pid(), &v2);
    assert!(r["timings"]["total_us"].as_u64().unwrap_or(0) > 0);
    assert_eq!(ask("get pears"), "v2 pears=5");
    assert_eq!(ask("count"), "v2 keys=2 requests=1006");
    assert_eq!(ask("quit"), "bye");
    let out = child.wait(WAIT).expect("exits");
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
}

/// Threads that each recurse `DEPTH` deep and idle at the bottom, printing a
/// tick every 10 ms until stdin says `quit`; then the recursion unwinds and
/// every thread prints its sum. v2's `descend` gains a local (every frame's
/// layout changes) and a different formula; its idle loop prints differently.
fn deep_threads(version: u32) -> String {
    let (extra_decl, extra_use, weight) = if version == 2 {
        (
            "    long weight = 0;\n",
            "    weight = depth % 3 + 1;\n",
            "weight",
        )
    } else {
        ("", "", "1")
    };
    format!(
        r#"
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

#define THREADS 4
#define DEPTH 60
static volatile int quit;

static void idle(int id)
{{
    long ticks = 0;
    while (!quit) {{
        poll(NULL, 0, 10);
        ticks++;
        if (ticks % 5 == 0)
            printf("v{version} thread %d tick %ld\n", id, ticks);
    }}
}}

static long descend(int depth, int id)
{{
{extra_decl}    long here = depth * 10 + id;
    if (depth == 0) {{
        idle(id);
        return 0;
    }}
    long below = descend(depth - 1, id);
{extra_use}    return below + here * {weight};
}}

static void *worker(void *arg)
{{
    long id = (long)arg;
    long sum = descend(DEPTH, (int)id);
    printf("v{version} thread %ld sum %ld\n", id, sum);
    return NULL;
}}

int main(void)
{{
    pthread_t t[THREADS];
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (long i = 0; i < THREADS; i++)
        pthread_create(&t[i], NULL, worker, (void *)i);
    printf("v{version} started\n");
    char buf[8];
    while (read(0, buf, sizeof buf) > 0 && buf[0] != 'q')
        ;
    quit = 1;
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    printf("v{version} done\n");
    return 0;
}}
"#
    )
}

#[test]
fn threads_deep_in_recursion_move_to_a_changed_version() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("apply-adhoc-deep");
    std::fs::create_dir_all(&dir).expect("dir");
    let v1 = instrumented(&dir, "deep1", &deep_threads(1));
    let v2 = instrumented(&dir, "deep2", &deep_threads(2));
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    for id in 0..4 {
        child
            .wait_for_line("idle ticks", WAIT, |l| {
                l.starts_with(&format!("v1 thread {id} tick"))
            })
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let r = apply_cli(child.pid(), &v2);
    let frames: usize = r["threads"]
        .as_array()
        .expect("threads")
        .iter()
        .map(|t| t["frames"].as_array().map_or(0, Vec::len))
        .sum();
    assert!(
        frames >= 4 * 61,
        "every recursion frame was carried over: {frames}"
    );
    for id in 0..4 {
        child
            .wait_for_line("v2 ticks", WAIT, |l| {
                l.starts_with(&format!("v2 thread {id} tick"))
            })
            .unwrap_or_else(|e| panic!("{e}"));
    }
    child.send_stdin(b"q\n").expect("quit");
    let out = child.wait(WAIT).expect("exits");
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    // Every frame returns through v2's code: sum over depth d = 0..60 of
    // (d*10 + id) * (d % 3 + 1), minus the bottom frame's (it returns 0).
    for id in 0..4i64 {
        let want: i64 = (1..=60).map(|d: i64| (d * 10 + id) * (d % 3 + 1)).sum();
        let line = format!("v2 thread {id} sum {want}");
        assert!(
            out.stdout.lines().any(|l| l == line),
            "missing {line:?} in\n{}",
            out.stdout
        );
    }
    assert!(out.stdout.contains("v2 done"));
}

/// main waits in pthread_join for a worker blocked in read on stdin.
fn joiner(version: u32) -> String {
    format!(
        r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static long handled;

static void *worker(void *arg)
{{
    (void)arg;
    char buf[64];
    ssize_t n;
    while ((n = read(0, buf, sizeof buf)) > 0) {{
        handled++;
        printf("v{version} worker got %ld\n", handled);
    }}
    return NULL;
}}

int main(void)
{{
    pthread_t t;
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_create(&t, NULL, worker, NULL);
    printf("v{version} started\n");
    pthread_join(t, NULL);
    printf("v{version} main joined after %ld\n", handled);
    return 0;
}}
"#
    )
}

#[test]
fn thread_waiting_in_pthread_join_returns_into_the_new_version() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("apply-adhoc-join");
    std::fs::create_dir_all(&dir).expect("dir");
    let v1 = instrumented(&dir, "join1", &joiner(1));
    let v2 = instrumented(&dir, "join2", &joiner(2));
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("started", WAIT, |l| l == "v1 started")
        .unwrap_or_else(|e| panic!("{e}"));
    child.send_stdin(b"a\n").expect("send");
    child
        .wait_for_line("v1 work", WAIT, |l| l == "v1 worker got 1")
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_millis(50));
    let r = apply_cli(child.pid(), &v2);
    let states: Vec<String> = r["threads"]
        .as_array()
        .expect("threads")
        .iter()
        .map(|t| t["state"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        states
            .iter()
            .any(|s| s.contains("pthread_join") && s.contains("left in place")),
        "main waits in pthread_join: {states:?}"
    );
    child.send_stdin(b"b\n").expect("send");
    child
        .wait_for_line("v2 work", WAIT, |l| l == "v2 worker got 2")
        .unwrap_or_else(|e| panic!("{e}"));
    child.close_stdin();
    let out = child.wait(WAIT).expect("exits");
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    // pthread_join returned into v2's main.
    assert!(
        out.stdout.lines().any(|l| l == "v2 main joined after 2"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_pid_that_does_not_exist_is_one_clear_line() {
    // pid_max is at most 2^22 on Linux: this pid cannot exist.
    let out = Command::new(env!("CARGO_BIN_EXE_upstare-apply"))
        .args(["--pid", "99999999", "--to", "/nonexistent.up"])
        .output()
        .expect("run upstare-apply");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        "upstare-apply: error: no process with pid 99999999"
    );
}

/// main's last instruction is a call to a noreturn function (gcc and clang
/// drop the epilogue after it), so the return address it pushed is the next
/// function's first byte. The frame is still main's: an identity update
/// while the callee is blocked in read must find main's call site.
const NORETURN_LAST: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static long lines;

__attribute__((noreturn)) static void serve_forever(void)
{
    char buf[64];
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf - 1);
        if (n <= 0 || strncmp(buf, "quit", 4) == 0)
            exit(0);
        lines++;
        printf("line %ld\n", lines);
        fflush(stdout);
    }
}

static int after_main(int x) { return x + 1; }

int main(int argc, char **argv)
{
    printf("ready %d\n", after_main(argc));
    fflush(stdout);
    serve_forever();
}
"#;

#[test]
fn frame_whose_return_address_is_the_next_function_is_updated() {
    for tc in [Toolchain::Gcc, Toolchain::Clang] {
        tc.require();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("apply-noreturn-last-{}", tc.name()));
        std::fs::create_dir_all(&dir).expect("dir");
        let v1 = apply_support::compile_instrumented(&dir, "nr", NORETURN_LAST, tc, &[]);
        let same = dir.join("nr-copy.up");
        std::fs::copy(&v1, &same).expect("copy");
        // The premise: main's call to serve_forever ends main.
        let tables =
            upstare_dwarf::read_tables(&std::fs::read(&v1).expect("read")).expect("tables");
        let main = tables.function("main").expect("main");
        let last = main
            .call_sites
            .iter()
            .find(|c| c.callee.id_name() == "serve_forever")
            .expect("main calls serve_forever");
        assert_eq!(
            last.return_addr,
            main.high,
            "[{}] call is main's last instruction",
            tc.name()
        );

        let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
        child
            .wait_for_line("ready", WAIT, |l| l.starts_with("ready "))
            .unwrap_or_else(|e| panic!("{e}"));
        child.send_stdin(b"one\n").expect("send");
        child
            .wait_for_line("line 1", WAIT, |l| l == "line 1")
            .unwrap_or_else(|e| panic!("{e}"));
        std::thread::sleep(Duration::from_millis(30));
        let r = apply_cli(child.pid(), &same);
        assert_eq!(r["ok"], true, "[{}] {r}", tc.name());
        child.send_stdin(b"two\n").expect("send");
        child
            .wait_for_line("line 2", WAIT, |l| l == "line 2")
            .unwrap_or_else(|e| panic!("[{}] after the update: {e}", tc.name()));
        child.send_stdin(b"quit\n").expect("quit");
        let out = child.wait(WAIT).expect("exits");
        assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    }
}

/// A thread blocked in read inside a stdio call the runtime does not know
/// (getc_unlocked, as lua's io.read and many servers read): the update
/// cannot use that state and refuses after its timeout, and the program
/// must not notice: its pending read goes on and gets the next line (the
/// interrupted system call restarts rather than failing).
const STDIO_READER: &str = r#"
#include <stdio.h>
#include <string.h>

static int read_line(FILE *f, char *buf, int cap)
{
    int i = 0, c = 0;
    flockfile(f);
    while (i < cap - 1 && (c = getc_unlocked(f)) != EOF && c != '\n')
        buf[i++] = (char)c;
    funlockfile(f);
    buf[i] = 0;
    return c == EOF && i == 0 ? -1 : i;
}

int main(void)
{
    char buf[128];
    long n = 0;
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        if (read_line(stdin, buf, sizeof buf) < 0 || strcmp(buf, "quit") == 0)
            break;
        n++;
        printf("got %s %ld\n", buf, n);
        fflush(stdout);
    }
    printf("end %ld\n", n);
    return 0;
}
"#;

#[test]
fn a_read_inside_an_unknown_stdio_call_survives_a_refused_update() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("apply-stdio-reader");
    std::fs::create_dir_all(&dir).expect("dir");
    let v1 = instrumented(&dir, "reader", STDIO_READER);
    let same = dir.join("reader-copy.up");
    std::fs::copy(&v1, &same).expect("copy");
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ready", WAIT, |l| l == "ready")
        .unwrap_or_else(|e| panic!("{e}"));
    child.send_stdin(b"one\n").expect("send");
    child
        .wait_for_line("got one", WAIT, |l| l == "got one 1")
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_millis(30));
    let out = Command::new(env!("CARGO_BIN_EXE_upstare-apply"))
        .args([
            "--pid",
            &child.pid().to_string(),
            "--timeout",
            "300",
            "--to",
        ])
        .arg(&same)
        .output()
        .expect("run upstare-apply");
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "blocked in getc_unlocked, not a known call: {report}"
    );
    assert!(report.contains("getc_unlocked"), "{report}");
    child.send_stdin(b"two\n").expect("send");
    child
        .wait_for_line("got two", WAIT, |l| l == "got two 2")
        .unwrap_or_else(|e| panic!("after the refused update: {e}"));
    child.send_stdin(b"quit\n").expect("quit");
    let out = child.wait(WAIT).expect("exits");
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
}

/// A program keeping a function pointer in memory shared with other
/// processes (`MAP_SHARED`): every byte read calls it and prints 42.
const SHARED_POINTER: &str = r#"
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

static int answer(void) { return 42; }

int main(void)
{
    int (**slot)(void) = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (slot == MAP_FAILED)
        return 1;
    *slot = answer;
    printf("ready\n");
    fflush(stdout);
    char c;
    while (read(0, &c, 1) == 1) {
        printf("%d\n", (*slot)());
        fflush(stdout);
    }
    return 0;
}
"#;

fn apply_cli_with(pid: u32, to: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_upstare-apply"))
        .args(["--pid", &pid.to_string(), "--to"])
        .arg(to)
        .args(extra)
        .output()
        .expect("run upstare-apply");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A pointer into the old image kept in shared memory cannot be remapped
/// (another process mapping it may have NEW elsewhere, or no update): it is
/// found and named; `--strict` refuses the update and the process goes on
/// unchanged.
#[test]
fn a_pointer_into_the_image_in_shared_memory_is_named_and_strict_refuses() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("apply-adhoc-shared");
    std::fs::create_dir_all(&dir).expect("dir");
    let v1 = instrumented(&dir, "shared1", SHARED_POINTER);
    let same = dir.join("shared1-copy.up");
    std::fs::copy(&v1, &same).expect("copy");
    let mut child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("ready", WAIT, |l| l == "ready")
        .unwrap_or_else(|e| panic!("{e}"));

    let (ok, out) = apply_cli_with(child.pid(), &same, &["--strict"]);
    assert!(!ok, "--strict took a stale pointer in shared memory: {out}");
    assert!(
        out.contains("shared anonymous memory at") && out.contains("nothing was changed"),
        "{out}"
    );
    child.send_stdin(b"x").expect("stdin");
    child
        .wait_for_line("42", WAIT, |l| l == "42")
        .unwrap_or_else(|e| panic!("after the refused update: {e}"));

    let (ok, out) = apply_cli_with(child.pid(), &same, &["--json"]);
    assert!(ok, "{out}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("json report");
    let warnings = r["warnings"].to_string();
    assert!(
        warnings.contains("function answer, in memory shared with other processes: not remapped"),
        "{warnings}"
    );
    assert_eq!(r["sweep"]["stale"], 1, "{}", r["sweep"]);
}
