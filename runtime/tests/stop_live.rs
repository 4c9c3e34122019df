//! Stopping real programs: hot loops brought to loop update points with
//! int3, deep recursion unwound completely, eight threads in mixed states,
//! threads that cannot get ready named in the refusal, and signals, threads
//! and processes created while stopping. After every test the program runs
//! to its normal end with its normal output once detached.

mod stop_support;

use std::time::{Duration, Instant};
use stop_support::*;
use upstare_dwarf::Reg;
use upstare_runtime::engine::state::{Readiness, ThreadState};
use upstare_runtime::stop::{stop_the_world, Location, StopError, StopOptions, Stopped};
use upstare_testkit::{ExitStatus, Toolchain};

fn find<'a>(threads: &'a [ThreadState], bottom: &str) -> &'a ThreadState {
    threads
        .iter()
        .find(|t| t.frames.last().map(|f| f.function.as_str()) == Some(bottom))
        .unwrap_or_else(|| panic!("no thread whose bottom frame is {bottom}: {threads:#?}"))
}

fn ids(t: &ThreadState) -> Vec<String> {
    t.frames
        .iter()
        .map(|f| format!("{}@{}", f.function, f.continuation))
        .collect()
}

fn hex_line(out: &str, tag: &str) -> u64 {
    let l = out
        .lines()
        .find_map(|l| l.strip_prefix(tag))
        .unwrap_or_else(|| panic!("no line {tag:?} in {out:?}"));
    u64::from_str_radix(l.trim(), 16).unwrap()
}

fn report(what: &str, s: &Stopped) {
    eprintln!(
        "{what}: {} threads, stop {:?} (classify {:?}, arm {:?} for {} points, run {:?}, finish {:?}), {} hits, {} interrupts, {} breaths",
        s.threads.len(),
        s.timings.total,
        s.timings.classify,
        s.timings.arm,
        s.breakpoints_armed,
        s.timings.run,
        s.timings.finish,
        s.breakpoints_hit,
        s.interrupts,
        s.breaths
    );
}

const DEPTH: u32 = 1000;

const DEEP: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

#define DEPTH 1000
volatile int flag;
volatile long counter;

int marker(int n)
{
    return n * 7 + 3;
}

int rec(int n)
{
    if (n == 0) {
        printf("top %lx\n", (unsigned long)__builtin_frame_address(0));
        printf("ready\n");
        fflush(stdout);
        while (!flag) {
            counter++;
        }
        return 0;
    }
    if (n == DEPTH) {
        printf("bottom %lx\n", (unsigned long)__builtin_frame_address(0));
        fflush(stdout);
    }
    return marker(n) + rec(n - 1);
}

void *watcher(void *a)
{
    char c;
    long n = read(0, &c, 1);
    flag = 1;
    return (void *)n;
}

int main(void)
{
    pthread_t t;
    pthread_create(&t, 0, watcher, 0);
    int sum = rec(DEPTH);
    void *r;
    pthread_join(t, &r);
    printf("sum %d read %ld\n", sum, (long)r);
    return 0;
}
"#;

fn deep_recursion(tc: Toolchain) {
    let d = TempDir::new("deep");
    let exe = build(&d, "deep", DEEP, tc);
    let mut child = start(&exe, &[], "ready");
    let pid = pid_of(&child);
    wait_threads(pid, 2);
    // The watcher blocks in read (main never sleeps).
    let watcher: Vec<_> = upstare_runtime::target::procfs::list_tasks(pid)
        .unwrap()
        .into_iter()
        .filter(|&t| t != pid)
        .collect();
    wait_sleeping(pid, &watcher);
    let out = child.stdout_so_far();
    let (top_rbp, bottom_rbp) = (hex_line(&out, "top "), hex_line(&out, "bottom "));

    let (mut tracee, image, mut libs) = seize(&child);
    let opts = StopOptions {
        timeout: Duration::from_secs(10),
        ..StopOptions::default()
    };
    let s = stop_the_world(&mut tracee, &image, &mut libs, &opts).unwrap_or_else(|e| panic!("{e}"));
    report(&format!("deep recursion ({tc})"), &s);
    assert_eq!(s.threads.len(), 2);

    let main = find(&s.threads, "main");
    assert_eq!(main.readiness, Readiness::AtPoint);
    let n = DEPTH as usize;
    assert_eq!(main.frames.len(), n + 2, "rec(0..=1000) and main");
    let got = ids(main);
    assert_eq!(got[0], "rec@loop#0");
    assert!(
        got[1..=n].iter().all(|i| i == "rec@call:rec#0"),
        "{:?}",
        &got[..4]
    );
    assert_eq!(got[n + 1], "main@call:rec#0");
    assert_eq!(main.frames[0].cfa.0, top_rbp + 16);
    assert_eq!(main.frames[n].cfa.0, bottom_rbp + 16);
    let stride = main.frames[1].cfa.0 - main.frames[0].cfa.0;
    assert!(
        main.frames[..=n]
            .windows(2)
            .all(|w| w[1].cfa.0 - w[0].cfa.0 == stride),
        "every rec frame has the same size"
    );
    if tc != Toolchain::Clang {
        // gcc keeps marker(n) in ebx across rec(n - 1): the frame of rec(n)
        // sees it when its call returns (found in rec(n - 1)'s save slot),
        // and the top sees marker(1) still in the register.
        for k in 1..=n {
            let want = (k as u64) * 7 + 3;
            assert_eq!(
                main.frames[k].callee_saved.get(&Reg::Rbx),
                Some(&want),
                "rec({k})"
            );
        }
        assert_eq!(main.frames[0].callee_saved.get(&Reg::Rbx), Some(&10));
    }

    let w = find(&s.threads, "watcher");
    assert_eq!(
        w.readiness,
        Readiness::Blocked {
            callee: "read".into(),
            syscall: 0
        }
    );
    assert_eq!(ids(w), vec!["watcher@call:read#0"]);
    assert_code_intact(&tracee, &image);
    tracee.detach().unwrap();

    child.send_stdin(b"x").unwrap();
    let out = child.wait(Duration::from_secs(30)).unwrap();
    assert_eq!(out.status, ExitStatus::Code(0), "{}", out.stderr);
    assert!(
        out.stdout.ends_with("ready\nsum 3506500 read 1\n"),
        "{}",
        out.stdout
    );
}

#[test]
fn deep_recursion_gcc() {
    deep_recursion(Toolchain::Gcc);
}

#[test]
fn deep_recursion_gcc_no_pie() {
    deep_recursion(Toolchain::GccNoPie);
}

#[test]
fn deep_recursion_clang() {
    deep_recursion(Toolchain::Clang);
}

const MIXED: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <poll.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>

volatile int stop;
volatile long spins[2];
int pipes[2][2];
int lsock;
pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
pthread_mutex_t cm = PTHREAD_MUTEX_INITIALIZER;
pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
int signalled;

long step(long x)
{
    return x * 3 + 1;
}

void *hot(void *a)
{
    long i = (long)a;
    long x = 0;
    while (!stop) {
        x = step(x) % 1000003;
        spins[i]++;
    }
    return (void *)(x >= 0);
}

void *reader(void *a)
{
    char b[4];
    long n = read(pipes[0][0], b, sizeof b);
    return (void *)n;
}

void *sleeper(void *a)
{
    struct timespec ts = {1000, 0};
    nanosleep(&ts, 0);
    return a;
}

void *locker(void *a)
{
    int r = pthread_mutex_lock(&m);
    pthread_mutex_unlock(&m);
    return (void *)(long)(r == 0);
}

void *waiter(void *a)
{
    int rounds = 0;
    pthread_mutex_lock(&cm);
    while (!signalled) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 5000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&cv, &cm, &ts);
        rounds++;
    }
    pthread_mutex_unlock(&cm);
    return (void *)(long)(rounds > 0);
}

void *acceptor(void *a)
{
    int c = accept(lsock, 0, 0);
    return (void *)(long)(c >= 0);
}

void *poller(void *a)
{
    struct pollfd p = {pipes[1][0], POLLIN, 0};
    int r = poll(&p, 1, -1);
    return (void *)(long)r;
}

int main(void)
{
    pipe(pipes[0]);
    pipe(pipes[1]);
    lsock = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(lsock, (struct sockaddr *)&sa, sizeof sa);
    socklen_t len = sizeof sa;
    getsockname(lsock, (struct sockaddr *)&sa, &len);
    listen(lsock, 1);
    pthread_mutex_lock(&m);
    pthread_t t[8];
    pthread_create(&t[0], 0, hot, (void *)0);
    pthread_create(&t[1], 0, hot, (void *)1);
    pthread_create(&t[2], 0, reader, 0);
    pthread_create(&t[3], 0, sleeper, 0);
    pthread_create(&t[4], 0, locker, 0);
    pthread_create(&t[5], 0, waiter, 0);
    pthread_create(&t[6], 0, acceptor, 0);
    pthread_create(&t[7], 0, poller, 0);
    printf("ready\n");
    fflush(stdout);
    char go;
    long n = read(0, &go, 1);
    stop = 1;
    write(pipes[0][1], "abc", 3);
    pthread_mutex_unlock(&m);
    pthread_mutex_lock(&cm);
    signalled = 1;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&cm);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    connect(c, (struct sockaddr *)&sa, sizeof sa);
    write(pipes[1][1], "x", 1);
    long total = 0;
    for (int i = 0; i < 8; i++) {
        if (i == 3)
            continue;
        void *r;
        pthread_join(t[i], &r);
        total += (long)r;
    }
    printf("go %ld total %ld\n", n, total);
    return 0;
}
"#;

#[test]
fn eight_threads_in_mixed_states() {
    let d = TempDir::new("mixed");
    let exe = build(&d, "mixed", MIXED, Toolchain::Gcc);
    let mut child = start(&exe, &[], "ready");
    let pid = pid_of(&child);
    wait_threads(pid, 9);
    // Let the blocking threads block (the hot ones never sleep).
    std::thread::sleep(Duration::from_millis(50));

    let (mut tracee, image, mut libs) = seize(&child);
    let s = stop_the_world(&mut tracee, &image, &mut libs, &StopOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    report("8 threads", &s);
    assert_eq!(s.threads.len(), 9);
    let blocked = |callee: &str, nr: i64| Readiness::Blocked {
        callee: callee.into(),
        syscall: nr as u64,
    };
    let main = find(&s.threads, "main");
    assert_eq!(main.readiness, blocked("read", 0));
    assert_eq!(ids(main), vec!["main@call:read#0"]);
    let hot: Vec<&ThreadState> = s
        .threads
        .iter()
        .filter(|t| t.frames.last().unwrap().function == "hot")
        .collect();
    assert_eq!(hot.len(), 2);
    for h in hot {
        assert_eq!(h.readiness, Readiness::AtPoint);
        // At the loop point of hot; `step` has no loop and is reached only
        // through its entry point.
        let got = ids(h);
        // (At hot's entry if it had not started yet, on a loaded machine.)
        assert!(
            got == ["hot@loop#0"]
                || got == ["step@entry", "hot@call:step#0"]
                || got == ["hot@entry"],
            "{got:?}"
        );
        assert_eq!(h.frames[0].pc.to_runtime(image.bias), h.regs.rip());
    }
    let w = find(&s.threads, "waiter");
    // Led out of its condition wait, or at a point of its loop.
    assert!(
        match &w.readiness {
            Readiness::AtPoint => true,
            Readiness::Returned { callee } | Readiness::Relock { callee, .. } => {
                callee.starts_with("pthread_cond_")
            }
            _ => false,
        },
        "{:?}",
        w.readiness
    );
    assert!(ids(w)[0].starts_with("waiter@"), "{:?}", ids(w));
    assert_eq!(find(&s.threads, "reader").readiness, blocked("read", 0));
    assert_eq!(
        find(&s.threads, "sleeper").readiness,
        blocked("nanosleep", 230)
    );
    assert_eq!(
        find(&s.threads, "locker").readiness,
        blocked("pthread_mutex_lock", 202)
    );
    assert_eq!(
        find(&s.threads, "acceptor").readiness,
        blocked("accept", 43)
    );
    assert_eq!(find(&s.threads, "poller").readiness, blocked("poll", 7));
    assert!(s.breakpoints_armed > 0);
    assert_code_intact(&tracee, &image);
    tracee.detach().unwrap();

    child.send_stdin(b"g").unwrap();
    let out = child.wait(Duration::from_secs(30)).unwrap();
    assert_eq!(out.status, ExitStatus::Code(0), "{}", out.stderr);
    // hot 1+1, reader 3, locker 1, waiter 1, acceptor 1, poller 1.
    assert_eq!(out.stdout, "ready\ngo 1 total 9\n");
}

const STUCK: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

volatile int flag;
int full[2];

void spin(void)
{
    while (!flag) ;
}

void *spinner(void *a)
{
    spin();
    return a;
}

long fill(void)
{
    static char buf[4096];
    long total = 0;
    for (int i = 0; i < 256; i++) {
        total += write(full[1], buf, sizeof buf);
    }
    return total;
}

void *writer(void *a)
{
    return (void *)fill();
}

int main(void)
{
    pipe(full);
    pthread_t s, w;
    pthread_create(&s, 0, spinner, 0);
    pthread_create(&w, 0, writer, 0);
    printf("ready\n");
    fflush(stdout);
    char c;
    long n = read(0, &c, 1);
    flag = 1;
    static char sink[4096];
    long drained = 0;
    while (drained < 256 * 4096) {
        long r = read(full[0], sink, sizeof sink);
        if (r <= 0)
            break;
        drained += r;
    }
    void *wrote;
    pthread_join(s, 0);
    pthread_join(w, &wrote);
    printf("go %ld drained %ld wrote %ld\n", n, drained, (long)wrote);
    return 0;
}
"#;

#[test]
fn threads_that_cannot_get_ready_are_named_and_nothing_changes() {
    let d = TempDir::new("stuck");
    let exe = build(&d, "stuck", STUCK, Toolchain::Gcc);
    let mut child = start(&exe, &[], "ready");
    let pid = pid_of(&child);
    wait_threads(pid, 3);
    std::thread::sleep(Duration::from_millis(50));

    let (mut tracee, image, mut libs) = seize(&child);
    let opts = StopOptions {
        timeout: Duration::from_millis(300),
        ..StopOptions::default()
    };
    let t = Instant::now();
    let e = stop_the_world(&mut tracee, &image, &mut libs, &opts).unwrap_err();
    eprintln!("refused after {:?}:\n{e}", t.elapsed());
    let StopError::NotReady { threads, .. } = &e else {
        panic!("{e}");
    };
    assert_eq!(threads.len(), 2, "{e}");
    let spinner = threads
        .iter()
        .find(|t| matches!(&t.location, Location::App { function, .. } if function == "spin"))
        .unwrap_or_else(|| panic!("spinner not named: {e}"));
    assert!(
        matches!(&spinner.location, Location::App { file, line: 12, .. } if file == "stuck.c"),
        "{spinner}"
    );
    let writer = threads
        .iter()
        .find(|t| matches!(&t.location, Location::Library { .. }))
        .unwrap_or_else(|| panic!("writer not named: {e}"));
    let Location::Library {
        symbol,
        called_from,
        ..
    } = &writer.location
    else {
        unreachable!()
    };
    assert_eq!(symbol.as_deref(), Some("write"), "{writer}");
    let (func, file, line) = called_from.as_ref().expect("the calling frame");
    assert_eq!(
        (func.as_str(), file.as_str(), *line),
        ("fill", "stuck.c", 26)
    );
    assert!(
        writer.reason.to_string().contains("system call write"),
        "{writer}"
    );
    // One line per thread, each naming the thread.
    let text = e.to_string();
    assert_eq!(text.lines().count(), 3, "{text}");
    for t in threads {
        assert!(text.contains(&format!("thread {}", t.tid)), "{text}");
    }
    // Nothing left behind.
    assert_code_intact(&tracee, &image);
    tracee.detach().unwrap();

    child.send_stdin(b"g").unwrap();
    let out = child.wait(Duration::from_secs(30)).unwrap();
    assert_eq!(out.status, ExitStatus::Code(0), "{}", out.stderr);
    assert_eq!(out.stdout, "ready\ngo 1 drained 1048576 wrote 1048576\n");
}

const EVENTS: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sys/wait.h>

volatile int flag;
volatile long counter;
volatile int got;
int child_status = -1;

void on_usr1(int s)
{
    got++;
}

void *worker(void *a)
{
    while (!flag) {
        counter++;
    }
    return a;
}

int child_work(int n)
{
    int s = 0;
    for (int i = 0; i < n; i++) {
        s += i;
    }
    return s;
}

void *busy(void *a)
{
    syscall(SYS_poll, 0, 0, 1000);
    pthread_t w;
    pthread_create(&w, 0, worker, 0);
    pid_t ch = fork();
    if (ch == 0)
        _exit(child_work(10) == 45 ? 3 : 4);
    raise(SIGUSR1);
    int st = 0;
    while (waitpid(ch, &st, WNOHANG) == 0) {
        counter++;
    }
    child_status = WIFEXITED(st) ? WEXITSTATUS(st) : 100 + WTERMSIG(st);
    while (!flag) {
        counter++;
    }
    pthread_join(w, 0);
    return a;
}

int main(void)
{
    signal(SIGUSR1, on_usr1);
    pthread_t b;
    pthread_create(&b, 0, busy, 0);
    printf("ready\n");
    fflush(stdout);
    char x;
    long n = read(0, &x, 1);
    flag = 1;
    pthread_join(b, 0);
    printf("go %ld got %d child %d\n", n, got, child_status);
    return 0;
}
"#;

#[test]
fn signals_threads_and_forks_while_stopping() {
    let d = TempDir::new("events");
    let exe = build(&d, "events", EVENTS, Toolchain::Gcc);
    let mut child = start(&exe, &[], "ready");
    let pid = pid_of(&child);
    wait_threads(pid, 2);
    let busy: Vec<_> = upstare_runtime::target::procfs::list_tasks(pid)
        .unwrap()
        .into_iter()
        .filter(|&t| t != pid)
        .collect();
    wait_sleeping(pid, &busy);

    // `busy` waits 1 s in poll called through syscall() (not a safe call),
    // then creates a thread, forks and raises SIGUSR1, all while being
    // stopped: it is caught at its handler's entry, above the signal frame.
    let (mut tracee, image, mut libs) = seize(&child);
    let opts = StopOptions {
        timeout: Duration::from_secs(10),
        ..StopOptions::default()
    };
    let s = stop_the_world(&mut tracee, &image, &mut libs, &opts).unwrap_or_else(|e| panic!("{e}"));
    report("events", &s);
    assert_eq!(s.threads.len(), 3, "{:#?}", s.threads);
    assert_eq!(
        find(&s.threads, "main").readiness,
        Readiness::Blocked {
            callee: "read".into(),
            syscall: 0
        }
    );
    let busy = find(&s.threads, "on_usr1");
    assert_eq!(busy.readiness, Readiness::AtPoint);
    let under = busy.below.as_deref().expect("the context raise() left");
    assert_eq!(
        under.readiness,
        Readiness::UnderSignal {
            callee: "raise".into()
        }
    );
    assert_eq!(
        under.frames.last().map(|f| f.function.as_str()),
        Some("busy")
    );
    let worker = find(&s.threads, "worker");
    assert_eq!(worker.readiness, Readiness::AtPoint);
    let got = ids(worker);
    assert!(
        got == ["worker@loop#0"] || got == ["worker@entry"],
        "{got:?}"
    );
    // The signal raised while running towards a point is delivered at once
    // (raise() runs the handler before returning), not held.
    assert!(
        !s.signals_requeued
            .iter()
            .any(|&(tid, sig)| tid == busy.tid.as_raw() && sig.0 == libc::SIGUSR1),
        "{:?}",
        s.signals_requeued
    );
    assert_eq!(s.children_released.len(), 1);
    assert_code_intact(&tracee, &image);
    tracee.detach().unwrap();

    child.send_stdin(b"g").unwrap();
    let out = child.wait(Duration::from_secs(30)).unwrap();
    assert_eq!(out.status, ExitStatus::Code(0), "{}", out.stderr);
    // The signal reached its handler once; the child ran its loop
    // (an update point) without our int3.
    assert_eq!(out.stdout, "ready\ngo 1 got 1 child 3\n");
}

const COUNTED: &str = r#"
#include <stdio.h>
#include <unistd.h>

volatile int g = -1;
volatile int calls;

void work(void)
{
    calls++;
}

int main(void)
{
    printf("ready\n");
    fflush(stdout);
    usleep(300000);
    for (int i = 0; i < 1000; i++) {
        g = i;
        work();
    }
    printf("g %d calls %d\n", g, calls);
    return 0;
}
"#;

fn global(
    tracee: &upstare_runtime::Tracee,
    image: &upstare_runtime::engine::state::Image,
    name: &str,
) -> i32 {
    use upstare_runtime::TargetMemory;
    let g = image
        .tables
        .globals
        .iter()
        .find(|g| g.name == name)
        .unwrap_or_else(|| panic!("no global {name}"));
    tracee.memory().read_u32(image.runtime(g.addr)).unwrap() as i32
}

#[test]
fn skipping_hits_stops_at_the_kth_point_of_a_run() {
    let d = TempDir::new("counted");
    let exe = build(&d, "counted", COUNTED, Toolchain::Gcc);
    // Each iteration passes main's loop point, then work's entry point;
    // skipping k hits stops at hit k + 1. Without skipping, main is ready
    // where it is: blocked in usleep.
    for (skip, cont, g, calls) in [
        (0, "", -1, 0),
        (1, "entry", 0, 0),
        (7, "entry", 3, 3),
        (40, "loop#0", 19, 20),
    ] {
        let mut child = start(&exe, &[], "ready");
        let (mut tracee, image, mut libs) = seize(&child);
        let opts = StopOptions {
            skip_hits: skip,
            timeout: Duration::from_secs(10),
            ..StopOptions::default()
        };
        let s =
            stop_the_world(&mut tracee, &image, &mut libs, &opts).unwrap_or_else(|e| panic!("{e}"));
        if skip == 0 {
            let main = find(&s.threads, "main");
            assert_eq!(
                main.readiness,
                Readiness::Blocked {
                    callee: "usleep".into(),
                    syscall: 230
                }
            );
            assert_eq!(s.breakpoints_hit, 0);
            tracee.detach().unwrap();
            let out = child.wait(Duration::from_secs(30)).unwrap();
            assert_eq!(out.stdout, "ready\ng 999 calls 1000\n");
            continue;
        }
        let main = find(&s.threads, "main");
        assert_eq!(main.readiness, Readiness::AtPoint, "skip {skip}");
        assert_eq!(
            main.frames[0].continuation.to_string(),
            cont,
            "skip {skip}: {:?}",
            ids(main)
        );
        assert_eq!(s.breakpoints_hit, skip + 1);
        assert_eq!(
            (
                global(&tracee, &image, "g"),
                global(&tracee, &image, "calls")
            ),
            (g, calls),
            "skip {skip}"
        );
        assert_code_intact(&tracee, &image);
        tracee.detach().unwrap();
        let out = child.wait(Duration::from_secs(30)).unwrap();
        assert_eq!(out.status, ExitStatus::Code(0), "{}", out.stderr);
        assert_eq!(out.stdout, "ready\ng 999 calls 1000\n");
    }
}

const CALLBACKS: &str = r#"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

volatile int flag;
volatile long c1, c2;

void on_usr1(int s)
{
    write(1, "in handler\n", 11);
    while (!flag) {
        c1++;
    }
}

void *handler_thread(void *a)
{
    raise(SIGUSR1);
    return a;
}

int cmp(const void *a, const void *b)
{
    if (!c2)
        write(1, "in cmp\n", 7);
    while (!flag) {
        c2++;
    }
    return *(const int *)a - *(const int *)b;
}

void *sorter(void *a)
{
    int v[4] = {3, 1, 2, 0};
    qsort(v, 4, sizeof v[0], cmp);
    return (void *)(long)(v[0] * 1000 + v[1] * 100 + v[2] * 10 + v[3]);
}

int main(void)
{
    signal(SIGUSR1, on_usr1);
    pthread_t h, s;
    pthread_create(&h, 0, handler_thread, 0);
    pthread_create(&s, 0, sorter, 0);
    printf("ready\n");
    fflush(stdout);
    char c;
    long n = read(0, &c, 1);
    flag = 1;
    void *r;
    pthread_join(h, 0);
    pthread_join(s, &r);
    printf("go %ld sorted %ld\n", n, (long)r);
    return 0;
}
"#;

#[test]
fn frames_under_a_signal_handler_or_a_library_callback_are_ready_with_the_context_under_them() {
    let d = TempDir::new("callbacks");
    let exe = build(&d, "callbacks", CALLBACKS, Toolchain::Gcc);
    let mut child = start(&exe, &[], "ready");
    let pid = pid_of(&child);
    wait_threads(pid, 3);
    for line in ["in handler", "in cmp"] {
        child
            .wait_for_line(line, Duration::from_secs(20), |l| l == line)
            .unwrap();
    }

    let (mut tracee, image, mut libs) = seize(&child);
    let opts = StopOptions {
        timeout: Duration::from_secs(10),
        ..StopOptions::default()
    };
    let s = stop_the_world(&mut tracee, &image, &mut libs, &opts).unwrap_or_else(|e| panic!("{e}"));
    // Both loop at an update point above a boundary: the handler above the
    // signal frame (raise() interrupted under it), the comparator above
    // qsort's frames (sorter's call to qsort under it).
    let above = |bottom: &str| {
        s.threads
            .iter()
            .find(|t| t.frames.last().map(|f| f.function.as_str()) == Some(bottom))
            .unwrap_or_else(|| panic!("no thread with {bottom} at the bottom"))
    };
    let h = above("on_usr1");
    assert_eq!(h.readiness, Readiness::AtPoint);
    let under = h.below.as_deref().expect("the interrupted context");
    assert_eq!(
        under.readiness,
        Readiness::UnderSignal {
            callee: "raise".into()
        }
    );
    assert_eq!(
        under.frames.last().map(|f| f.function.as_str()),
        Some("handler_thread")
    );
    assert!(under.beneath && h.library_view.is_none());
    let c = above("cmp");
    assert_eq!(c.readiness, Readiness::AtPoint);
    let under = c.below.as_deref().expect("qsort's caller");
    assert_eq!(
        under.readiness,
        Readiness::UnderCallback {
            callee: "qsort".into()
        }
    );
    assert_eq!(
        under.frames.last().map(|f| f.function.as_str()),
        Some("sorter")
    );
    assert!(under.beneath && c.library_view.is_some());
    assert_code_intact(&tracee, &image);
    tracee.detach().unwrap();

    child.send_stdin(b"g").unwrap();
    let out = child.wait(Duration::from_secs(30)).unwrap();
    assert_eq!(out.status, ExitStatus::Code(0), "{}", out.stderr);
    let mut lines: Vec<&str> = out.stdout.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["go 1 sorted 123", "in cmp", "in handler", "ready"]);
}

const SPINNERS: &str = r#"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

#define N 8
volatile int flag;
volatile long spins[N];
__thread int me;

void on_usr1(int s)
{
    char line[] = "in handler 0\n";
    line[11] = (char)('0' + me);
    write(1, line, sizeof line - 1);
    while (!flag) {
        spins[me]++;
    }
}

volatile int running[N];

void *spinner(void *a)
{
    me = (int)(long)a;
    while (!flag) {
        running[me] = 1;
    }
    return a;
}

int main(void)
{
    signal(SIGUSR1, on_usr1);
    pthread_t t[N];
    for (long i = 0; i < N; i++)
        pthread_create(&t[i], 0, spinner, (void *)i);
    /* Each signal interrupts its spinner's own code: a context no update
       can keep, so a thread in the handler is never ready. */
    for (int i = 0; i < N; i++) {
        while (!running[i])
            usleep(1000);
        pthread_kill(t[i], SIGUSR1);
    }
    printf("ready\n");
    fflush(stdout);
    char c;
    long n = read(0, &c, 1);
    flag = 1;
    for (int i = 0; i < N; i++)
        pthread_join(t[i], 0);
    printf("go %ld\n", n);
    return 0;
}
"#;

/// Whether any thread of `pid` has a SIGTRAP pending (its own queue or the
/// process's): what an `int3` hit that the stopper never took leaves.
fn sigtrap_pending(pid: nix::unistd::Pid) -> Vec<String> {
    let trap_bit = 1u64 << (nix::libc::SIGTRAP - 1);
    let tasks = upstare_runtime::target::procfs::list_tasks(pid).expect("tasks");
    let mut out = Vec::new();
    for t in tasks {
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/task/{t}/status")).expect("task status");
        for key in ["SigPnd:", "ShdPnd:"] {
            let mask = status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex mask"))
                .expect("pending mask");
            if mask & trap_bit != 0 {
                out.push(format!("thread {t} {key} {mask:#x}"));
            }
        }
    }
    out
}

/// A refusal while many threads hit update points at a high rate (every
/// iteration of their loops, interrupted every millisecond) leaves the
/// process exactly as it was: no `int3` in the code and no SIGTRAP of one
/// pending on any thread, round after round; then the program ends
/// normally.
#[test]
fn a_refusal_amid_many_breakpoint_hits_leaves_no_trap_behind() {
    const N: usize = 8;
    const ROUNDS: usize = 6;
    let d = TempDir::new("spinners");
    let exe = build(&d, "spinners", SPINNERS, Toolchain::Gcc);
    let mut child = start(&exe, &[], "ready");
    let pid = pid_of(&child);
    wait_threads(pid, N + 1);
    for i in 0..N {
        let line = format!("in handler {i}");
        child
            .wait_for_line(&line, Duration::from_secs(20), |l| l == line)
            .unwrap();
    }
    let opts = StopOptions {
        timeout: Duration::from_millis(150),
        poll_interval: Duration::from_millis(1),
        ..StopOptions::default()
    };
    for round in 0..ROUNDS {
        let (mut tracee, image, mut libs) = seize(&child);
        let e = stop_the_world(&mut tracee, &image, &mut libs, &opts).unwrap_err();
        let StopError::NotReady { threads, .. } = &e else {
            panic!("round {round}: {e}");
        };
        assert_eq!(threads.len(), N, "round {round}: {e}");
        // Where they are, not why: under load a thread may not have run
        // to a point yet.
        assert!(
            threads.iter().all(
                |t| matches!(&t.location, Location::App { function, .. } if function == "on_usr1")
            ),
            "round {round}: {e}"
        );
        let pending = sigtrap_pending(pid);
        assert!(pending.is_empty(), "round {round}: {pending:?}");
        assert_code_intact(&tracee, &image);
        tracee.detach().unwrap();
        // Let them run: a trap left behind would kill the process now.
        std::thread::sleep(Duration::from_millis(20));
    }

    child.send_stdin(b"g").unwrap();
    let out = child.wait(Duration::from_secs(30)).unwrap();
    assert_eq!(out.status, ExitStatus::Code(0), "{}", out.stderr);
    assert!(out.stdout.ends_with("go 1\n"), "{}", out.stdout);
}

#[test]
fn a_target_killed_while_being_stopped_is_an_error_not_a_hang() {
    let d = TempDir::new("killed");
    let exe = build(&d, "stuck", STUCK, Toolchain::Gcc);
    let child = start(&exe, &[], "ready");
    let pid = pid_of(&child);
    wait_threads(pid, 3);
    std::thread::sleep(Duration::from_millis(50));
    let (mut tracee, image, mut libs) = seize(&child);
    // The spinner never gets ready: kill the process while we wait for it.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    });
    let opts = StopOptions {
        timeout: Duration::from_secs(30),
        ..StopOptions::default()
    };
    let t = Instant::now();
    let e = stop_the_world(&mut tracee, &image, &mut libs, &opts).unwrap_err();
    killer.join().unwrap();
    eprintln!("after {:?}: {e}", t.elapsed());
    assert!(matches!(e, StopError::Gone { .. }), "{e}");
    assert!(
        e.to_string().contains(&format!("process {pid} ended")),
        "{e}"
    );
}

const TICKETS: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

volatile int stop;
volatile long counter;
int tickets;
pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

void *ticker(void *a)
{
    long n = 0;
    while (!stop) {
        struct timespec ts = {0, 20000000};
        nanosleep(&ts, 0);
        n++;
        if (n % 4 == 0) {
            pthread_mutex_lock(&m);
            tickets++;
            pthread_cond_signal(&cv);
            pthread_mutex_unlock(&m);
        }
    }
    return a;
}

void *waiter(void *a)
{
    long got = 0;
    pthread_mutex_lock(&m);
    while (!stop) {
        while (tickets == 0 && !stop)
            pthread_cond_wait(&cv, &m);
        if (tickets > 0) {
            tickets--;
            got++;
        }
    }
    pthread_mutex_unlock(&m);
    return (void *)(got > 0);
}

void *hot(void *a)
{
    while (!stop) {
        counter++;
    }
    return a;
}

int main(void)
{
    pthread_t t[3];
    pthread_create(&t[0], 0, ticker, 0);
    pthread_create(&t[1], 0, waiter, 0);
    pthread_create(&t[2], 0, hot, 0);
    printf("ready\n");
    fflush(stdout);
    char c;
    long n = read(0, &c, 1);
    stop = 1;
    pthread_mutex_lock(&m);
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&m);
    void *got;
    pthread_join(t[0], 0);
    pthread_join(t[1], &got);
    pthread_join(t[2], 0);
    printf("go %ld got %ld\n", n, (long)got);
    return 0;
}
"#;

#[test]
fn a_condition_variable_signalled_by_a_sleeping_thread_gets_ready() {
    // The waiter is led out of pthread_cond_wait (glibc's timeout path)
    // and parked at the call's return with the mutex, or, signalled by the
    // ticker (blocked in nanosleep most of the time) meanwhile, reaches an
    // update point: either way it gets ready, and the run ends as without
    // the stop (the wake-up is spurious, the program re-checks).
    let d = TempDir::new("tickets");
    let exe = build(&d, "tickets", TICKETS, Toolchain::Gcc);
    let mut child = start(&exe, &[], "ready");
    let pid = pid_of(&child);
    wait_threads(pid, 4);
    // Long enough for the waiter to take a ticket (one every 80 ms) before
    // the stop: led out, it is ready without one, and main may end the run
    // right after.
    std::thread::sleep(Duration::from_millis(400));
    let (mut tracee, image, mut libs) = seize(&child);
    let opts = StopOptions {
        timeout: Duration::from_secs(5),
        ..StopOptions::default()
    };
    let s = stop_the_world(&mut tracee, &image, &mut libs, &opts).unwrap_or_else(|e| panic!("{e}"));
    report("condition variable", &s);
    assert_eq!(s.threads.len(), 4);
    // At a point, or led out: parked at the return with the mutex, or set
    // to re-acquire it (the ticker held it at that moment).
    let waiter = &find(&s.threads, "waiter").readiness;
    assert!(
        match waiter {
            Readiness::AtPoint => true,
            Readiness::Returned { callee } | Readiness::Relock { callee, .. } => {
                callee == "pthread_cond_wait"
            }
            _ => false,
        },
        "{waiter:?}"
    );
    assert_eq!(find(&s.threads, "hot").readiness, Readiness::AtPoint);
    // The ticker may wait for the mutex the parked waiter holds.
    let ticker = find(&s.threads, "ticker");
    let blocked_in = |callee: &str, nr: u64| Readiness::Blocked {
        callee: callee.into(),
        syscall: nr,
    };
    assert!(
        ticker.readiness == Readiness::AtPoint
            || ticker.readiness == blocked_in("nanosleep", 230)
            || ticker.readiness == blocked_in("pthread_mutex_lock", 202),
        "{:?}",
        ticker.readiness
    );
    assert_code_intact(&tracee, &image);
    tracee.detach().unwrap();
    child.send_stdin(b"g").unwrap();
    let out = child.wait(Duration::from_secs(30)).unwrap();
    assert_eq!(out.status, ExitStatus::Code(0), "{}", out.stderr);
    assert_eq!(out.stdout, "ready\ngo 1 got 1\n");
}
