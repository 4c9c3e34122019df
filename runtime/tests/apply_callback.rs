//! Threads caught in an application callback under library frames are
//! updated where they are: the callback's frames rebuilt above the
//! library's frames, which stay in place with the frames under them: a libevent server whose read callback works on every request is
//! updated under a back-to-back load to a version whose reply changed (no
//! request fails, the replies switch format exactly once, the connection
//! is kept), and a `qsort` comparator running during an update is updated
//! in the comparator and returns into `qsort`, which goes on sorting with
//! NEW's comparator; when NEW's frame
//! that called `qsort` is larger the update is refused by name and the
//! process goes on as it was.

mod apply_support;

use apply_support::lines::LineClient;
use apply_support::real::free_port;
use apply_support::{apply_within, with_version, TempDir};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{compile_instrumented, spawn, ChildGuard, Toolchain};

/// The server: v1 replies `v1 N SUM`, v2 `v2:N:SUM`, where SUM is
/// [`checksum`] of N. The callback's work is a checksum and a short sleep
/// (the I/O a real server waits for), so the loop is mostly inside it.
const SERVER: &str = r#"
#include <event2/event.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static struct event_base *base;
static char pending[256];
static long have;
static long served;

static long checksum(long n)
{
    long s = n;
    for (long i = 0; i < 500; i++)
        s = (s * 31 + i) % 1000003;
    usleep(1000);
    return s;
}

static void reply(int fd, long n)
{
    char out[96];
    int len = snprintf(out, sizeof out, REPLY, n, checksum(n));
    served++;
    if (write(fd, out, len) != len)
        event_base_loopbreak(base);
}

static void on_read(evutil_socket_t fd, short what, void *arg)
{
    long n = read(fd, pending + have, sizeof pending - 1 - have);
    char *line = pending, *nl;
    (void)what;
    (void)arg;
    if (n <= 0) {
        event_base_loopbreak(base);
        return;
    }
    have += n;
    pending[have] = 0;
    while ((nl = strchr(line, '\n')) != NULL) {
        *nl = 0;
        reply(fd, atol(line));
        line = nl + 1;
    }
    have -= line - pending;
    memmove(pending, line, have);
}

static void on_accept(evutil_socket_t lfd, short what, void *arg)
{
    int fd = accept(lfd, NULL, NULL);
    (void)what;
    (void)arg;
    if (fd >= 0)
        event_add(event_new(base, fd, EV_READ | EV_PERSIST, on_read, NULL), NULL);
}

int main(int argc, char **argv)
{
    struct sockaddr_in a;
    int one = 1, lfd = socket(AF_INET, SOCK_STREAM, 0);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2)
        return 2;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(atoi(argv[1]));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) || listen(lfd, 8)) {
        perror("listen");
        return 1;
    }
    base = event_base_new();
    event_add(event_new(base, lfd, EV_READ | EV_PERSIST, on_accept, NULL), NULL);
    printf(VERSION " listening\n");
    event_base_dispatch(base);
    printf(VERSION " served %ld\n", served);
    return 0;
}
"#;

/// Requests the load keeps in flight.
const AHEAD: i64 = 4;

/// What the server's `checksum(n)` computes.
fn checksum(n: i64) -> i64 {
    (0..500).fold(n, |s, i| (s * 31 + i) % 1_000_003)
}

fn server(version: &str, reply: &str) -> String {
    format!("#define VERSION \"{version}\"\n#define REPLY \"{reply}\\n\"\n{SERVER}")
}

/// Which version answered `line` to request `n` (panics on any other
/// reply).
fn version_of(line: &str, n: i64) -> u8 {
    let sum = checksum(n);
    if line == format!("v1 {n} {sum}") {
        1
    } else if line == format!("v2:{n}:{sum}") {
        2
    } else {
        panic!("request {n}: unexpected reply {line:?}")
    }
}

fn libevent_server_under_load(tc: Toolchain) {
    tc.require();
    let dir = TempDir::new(&format!("callback-{tc}"));
    let flags = ["-Wl,--no-as-needed", "-levent"];
    let v1 = compile_instrumented(dir.path(), "cb1", &server("v1", "v1 %ld %ld"), tc, &flags);
    let v2 = compile_instrumented(dir.path(), "cb2", &server("v2", "v2:%ld:%ld"), tc, &flags);
    let port = free_port();
    let mut child = spawn(&v1, &[port.to_string()]).expect("spawn");
    let wait = Duration::from_secs(20);
    child
        .wait_for_line("listening", wait, |l| l == "v1 listening")
        .expect("listening");

    // One connection, requests back to back until told to stop (bounded),
    // a few ahead so that the server always has one to work on.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut c = LineClient::connect(port);
            let start = Instant::now();
            let mut versions = Vec::new();
            for n in 0..AHEAD {
                c.send(&n.to_string());
            }
            for n in 0..200_000i64 {
                if stop.load(Ordering::Relaxed) || start.elapsed() > Duration::from_secs(60) {
                    // Only the replies still owed.
                    for m in n..n + AHEAD {
                        versions.push(version_of(&c.reply_to(&m.to_string()), m));
                    }
                    break;
                }
                versions.push(version_of(&c.reply_to(&n.to_string()), n));
                c.send(&(n + AHEAD).to_string());
            }
            versions
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let opts = ApplyOptions {
        timeout: Duration::from_secs(10),
        ..ApplyOptions::default()
    };
    let report = apply(child.pid() as i32, &v2, &opts);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let versions = load.join().expect("no request failed");
    let report = report.unwrap_or_else(|e| panic!("update failed: {e}"));
    let state = &report.threads[0].state;
    // Updated where it was: idle in event_base_dispatch, or in the
    // callback above it (the library frames kept under it).
    assert!(state.contains("event_base_dispatch"), "{state}");
    let switch = versions.iter().position(|&v| v == 2);
    let switch = switch.unwrap_or_else(|| panic!("no v2 reply in {} replies", versions.len()));
    assert!(switch > 10, "only {switch} v1 replies before the update");
    assert!(
        versions[..switch].iter().all(|&v| v == 1) && versions[switch..].iter().all(|&v| v == 2),
        "the replies switch format more than once"
    );
    assert!(versions.len() > switch + 10, "{} replies", versions.len());
    // Closing the connection ends the loop: NEW's main prints the count.
    let out = child.wait(wait).expect("ends");
    assert_eq!(out.status.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
    let served = format!("v2 served {}\n", versions.len());
    assert!(out.stdout.ends_with(&served), "{}", out.stdout);
}

#[test]
fn a_libevent_server_under_load_is_updated_out_of_its_callback_gcc() {
    libevent_server_under_load(Toolchain::Gcc);
}

#[test]
fn a_libevent_server_under_load_is_updated_out_of_its_callback_clang() {
    libevent_server_under_load(Toolchain::Clang);
}

/// A thread sorting with `qsort` and a comparator that takes its time:
/// v2's comparator orders the same way and counts its own calls.
const SORTER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define N 400
static long calls;
static long calls_v2;

static int cmp(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    calls++;
    if (VERSION[1] == '2')
        calls_v2++;
    usleep(20);
    return (x > y) - (x < y);
}

int main(void)
{
    static int v[N];
#ifdef PAD
    volatile char pad[PAD];
    pad[0] = 1;
#endif
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int round = 0; round < 40; round++) {
        int sorted = 1;
        for (int i = 0; i < N; i++)
            v[i] = (i * 7919 + round) % N;
        qsort(v, N, sizeof v[0], cmp);
        for (int i = 0; i < N; i++)
            sorted &= v[i] == i;
        printf(VERSION " round %d sorted %d by v2 %ld\n", round, sorted, calls_v2);
    }
    return 0;
}
"#;

/// How long a sorter may take to end.
const SORT_WAIT: Duration = Duration::from_secs(60);

/// The sorter built as v1 running, well inside its third round's `qsort`,
/// and `v2_src` built as NEW (in the returned directory).
fn sorting(tag: &str, tc: Toolchain, v2_src: &str) -> (TempDir, ChildGuard, PathBuf) {
    tc.require();
    let dir = TempDir::new(&format!("{tag}-{tc}"));
    let v1 = compile_instrumented(dir.path(), "qs1", &with_version(SORTER, "v1"), tc, &[]);
    let v2 = compile_instrumented(dir.path(), "qs2", v2_src, tc, &[]);
    let child = spawn(&v1, &[] as &[&str]).expect("spawn");
    child
        .wait_for_line("round 1", SORT_WAIT, |l| l.starts_with("v1 round 1 "))
        .expect("sorting");
    // A round takes a few hundred ms, almost all of it in the comparator.
    std::thread::sleep(Duration::from_millis(100));
    (dir, child, v2)
}

fn comparator_active_during_update(tc: Toolchain) {
    let (_dir, mut child, v2) = sorting("qsort", tc, &with_version(SORTER, "v2"));
    let wait = SORT_WAIT;
    let report = apply_within(child.pid(), &v2, Duration::from_secs(10));
    let state = &report.threads[0].state;
    // Updated in the comparator, qsort's frames kept under it.
    assert!(
        state.contains("in qsort, which called back: left in place"),
        "{state}"
    );
    let out = child.wait(wait).expect("ends");
    assert_eq!(out.status.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 40, "{}", out.stdout);
    let first_v2 = lines
        .iter()
        .position(|l| l.starts_with("v2 "))
        .unwrap_or_else(|| panic!("no v2 round: {}", out.stdout));
    for (round, l) in lines.iter().enumerate() {
        let version = if round < first_v2 { "v1" } else { "v2" };
        let prefix = format!("{version} round {round} sorted 1 by v2 ");
        assert!(l.starts_with(&prefix), "{l}");
    }
    // The round the update interrupted went on with NEW's comparator.
    let by_v2: i64 = lines[first_v2]
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a count");
    assert!(by_v2 > 0, "{}", lines[first_v2]);
}

#[test]
fn a_qsort_comparator_active_during_an_update_returns_into_qsort_gcc() {
    comparator_active_during_update(Toolchain::Gcc);
}

#[test]
fn a_qsort_comparator_active_during_an_update_returns_into_qsort_clang() {
    comparator_active_during_update(Toolchain::Clang);
}

/// NEW's frame of the function that called `qsort` is larger: the
/// library's frames would have to move, so the update is refused naming
/// the function, and the process goes on exactly as v1 (the breakpoint at
/// the comparator's return is gone from `qsort`: every round sorts).
fn comparator_active_frame_below_grows(tc: Toolchain) {
    let grown = format!("#define PAD 256\n{}", with_version(SORTER, "v2"));
    let (_dir, mut child, v2) = sorting("qsort-grow", tc, &grown);
    let wait = SORT_WAIT;
    let opts = ApplyOptions {
        timeout: Duration::from_secs(10),
        ..ApplyOptions::default()
    };
    let e = apply(child.pid() as i32, &v2, &opts).expect_err("main's frame grew under qsort");
    let e = e.to_string();
    assert!(
        e.contains("main at call:qsort") && e.contains("left in place"),
        "{e}"
    );
    let out = child.wait(wait).expect("ends");
    assert_eq!(out.status.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
    let want: Vec<String> = (0..40)
        .map(|r| format!("v1 round {r} sorted 1 by v2 0"))
        .collect();
    assert_eq!(out.stdout.lines().collect::<Vec<_>>(), want);
}

#[test]
fn a_larger_frame_below_an_active_comparator_is_refused_gcc() {
    comparator_active_frame_below_grows(Toolchain::Gcc);
}

#[test]
fn a_larger_frame_below_an_active_comparator_is_refused_clang() {
    comparator_active_frame_below_grows(Toolchain::Clang);
}
