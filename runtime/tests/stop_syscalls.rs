//! Threads blocked in each library call the stopper treats as safe to
//! abandon and re-execute: what their registers look like once seized (the
//! experiment the classification rests on), that each is classified ready
//! with the right callee, system call and frames, and that once detached
//! every call completes as if nothing happened (no EINTR, same output).

mod stop_support;

use std::collections::BTreeMap;
use std::time::Duration;
use stop_support::*;
use upstare_runtime::engine::state::Readiness;
use upstare_runtime::stop::{stop_the_world, StopOptions};
use upstare_testkit::Toolchain;

const BLOCKERS: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <time.h>
#include <poll.h>
#include <errno.h>
#include <signal.h>
#include <sys/select.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <semaphore.h>

enum { READ, POLL, SELECT, EPOLL, NPIPES };
static int pipes[NPIPES][2];
static int pairs[2];
static int lsock;
static int port;
static pid_t child;
static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t out = PTHREAD_MUTEX_INITIALIZER;
static sem_t sem;

static void frame(const char *name, void *fa)
{
    pthread_mutex_lock(&out);
    printf("F %s %lx\n", name, (unsigned long)fa);
    fflush(stdout);
    pthread_mutex_unlock(&out);
}

static void say(const char *what, long v)
{
    printf("%s %ld\n", what, v);
    fflush(stdout);
}

/* Join thread `t` and print what it returned. */
static void joined(pthread_t t, const char *what)
{
    void *r;
    pthread_join(t, &r);
    say(what, (long)r);
}

static void on_usr1(int s) { (void)s; }

void *t_read(void *a)
{
    frame("t_read", __builtin_frame_address(0));
    char b[8];
    long n = read(pipes[READ][0], b, 8);
    return (void *)(long)(n);
}

void *t_accept(void *a)
{
    frame("t_accept", __builtin_frame_address(0));
    int c = accept(lsock, 0, 0);
    return (void *)(long)(c >= 0);
}

void *t_nanosleep(void *a)
{
    frame("t_nanosleep", __builtin_frame_address(0));
    struct timespec ts = {2, 0};
    int r = nanosleep(&ts, 0);
    return (void *)(long)(r);
}

void *t_mutex(void *a)
{
    frame("t_mutex", __builtin_frame_address(0));
    int r = pthread_mutex_lock(&m);
    pthread_mutex_unlock(&m);
    return (void *)(long)(r);
}

void *t_poll(void *a)
{
    frame("t_poll", __builtin_frame_address(0));
    struct pollfd p = {pipes[POLL][0], POLLIN, 0};
    int r = poll(&p, 1, -1);
    return (void *)(long)(r);
}

void *t_select(void *a)
{
    frame("t_select", __builtin_frame_address(0));
    fd_set s;
    FD_ZERO(&s);
    FD_SET(pipes[SELECT][0], &s);
    int r = select(pipes[SELECT][0] + 1, &s, 0, 0, 0);
    return (void *)(long)(r);
}

void *t_epoll(void *a)
{
    int e = epoll_create1(0);
    struct epoll_event ev = {EPOLLIN, {0}};
    epoll_ctl(e, EPOLL_CTL_ADD, pipes[EPOLL][0], &ev);
    frame("t_epoll", __builtin_frame_address(0));
    int r = epoll_wait(e, &ev, 1, -1);
    return (void *)(long)(r);
}

void *t_usleep(void *a)
{
    frame("t_usleep", __builtin_frame_address(0));
    int r = usleep(2000000);
    return (void *)(long)(r);
}

void *t_sleep(void *a)
{
    frame("t_sleep", __builtin_frame_address(0));
    int r = sleep(2);
    return (void *)(long)(r);
}

void *t_pause(void *a)
{
    frame("t_pause", __builtin_frame_address(0));
#ifdef USE_SIGSUSPEND
    /* gcc starts the statement `r = pause();` at the call itself, where the
       rewriter conservatively takes argument registers as live, so the
       call gets no restart address: use a call with an argument. */
    sigset_t none;
    sigemptyset(&none);
    int r = sigsuspend(&none);
#else
    int r = pause();
#endif
    return (void *)(long)(r == -1 && errno == EINTR);
}

void *t_recv(void *a)
{
    frame("t_recv", __builtin_frame_address(0));
    char b[4];
    long n = recv(pairs[0], b, 4, 0);
    return (void *)(long)(n);
}

void *t_waitpid(void *a)
{
    frame("t_waitpid", __builtin_frame_address(0));
    int st = 0;
    pid_t r = waitpid(child, &st, 0);
    return (void *)(long)(r == child && WIFSIGNALED(st) ? WTERMSIG(st) : -1);
}

void *t_semwait(void *a)
{
    frame("t_semwait", __builtin_frame_address(0));
    int r = sem_wait(&sem);
    return (void *)(long)(r);
}

void *t_sigwait(void *a)
{
    sigset_t usr2;
    sigemptyset(&usr2);
    sigaddset(&usr2, SIGUSR2);
    frame("t_sigwait", __builtin_frame_address(0));
    int r = sigwaitinfo(&usr2, 0);
    return (void *)(long)(r);
}

int main(void)
{
    sem_init(&sem, 0, 0);
    /* SIGUSR2 stays blocked everywhere: t_sigwait takes it with sigwaitinfo. */
    sigset_t usr2;
    sigemptyset(&usr2);
    sigaddset(&usr2, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &usr2, 0);
    for (int i = 0; i < NPIPES; i++)
        pipe(pipes[i]);
    socketpair(AF_UNIX, SOCK_STREAM, 0, pairs);
    lsock = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(lsock, (struct sockaddr *)&sa, sizeof sa);
    socklen_t len = sizeof sa;
    getsockname(lsock, (struct sockaddr *)&sa, &len);
    listen(lsock, 1);
    signal(SIGUSR1, on_usr1);
    child = fork();
    if (child == 0) {
        sleep(1000);
        _exit(0);
    }
    pthread_mutex_lock(&m);
    void *(*fns[])(void *) = {t_read, t_accept, t_nanosleep, t_mutex, t_poll, t_select,
                              t_epoll, t_usleep, t_sleep, t_pause, t_recv, t_waitpid,
                              t_semwait, t_sigwait};
    enum { N = sizeof fns / sizeof fns[0] };
    pthread_t th[N];
    for (int i = 0; i < N; i++)
        pthread_create(&th[i], 0, fns[i], 0);
    frame("main", __builtin_frame_address(0));
    printf("ready\n");
    fflush(stdout);
    char go;
    long n = read(0, &go, 1);
    say("go", n);
    write(pipes[READ][1], "x", 1);
    joined(th[0], "read");
    int c = socket(AF_INET, SOCK_STREAM, 0);
    connect(c, (struct sockaddr *)&sa, sizeof sa);
    joined(th[1], "accept");
    joined(th[2], "nanosleep");
    pthread_mutex_unlock(&m);
    joined(th[3], "mutex");
    write(pipes[POLL][1], "x", 1);
    joined(th[4], "poll");
    write(pipes[SELECT][1], "x", 1);
    joined(th[5], "select");
    write(pipes[EPOLL][1], "x", 1);
    joined(th[6], "epoll");
    joined(th[7], "usleep");
    joined(th[8], "sleep");
    pthread_kill(th[9], SIGUSR1);
    joined(th[9], "pause");
    send(pairs[1], "abc", 3, 0);
    joined(th[10], "recv");
    kill(child, SIGKILL);
    joined(th[11], "waitpid");
    sem_post(&sem);
    joined(th[12], "semwait");
    pthread_kill(th[13], SIGUSR2);
    joined(th[13], "sigwait");
    printf("done\n");
    return 0;
}
"#;

/// The output after "ready", in order (main unblocks and joins one thread
/// at a time).
const AFTER: &str = "go 1\nread 1\naccept 1\nnanosleep 0\nmutex 0\npoll 1\nselect 1\nepoll 1\n\
usleep 0\nsleep 0\npause 1\nrecv 3\nwaitpid 9\nsemwait 0\nsigwait 12\ndone\n";

/// (thread function, callee it blocks in, system call, rax as seized). Observed on x86-64 Linux with glibc 2.36: nanosleep, usleep and
/// sleep all use clock_nanosleep (230) and report -ERESTART_RESTARTBLOCK;
/// poll -ERESTART_RESTARTBLOCK too; select is pselect6 (270) with
/// -ERESTARTNOHAND; epoll_wait and sigwaitinfo (rt_sigtimedwait) are
/// ended with -EINTR by the stop itself, which the tracer turns into
/// -ERESTARTNOHAND at the interrupt stop (so that any resume restarts
/// them); recv is recvfrom (45); waitpid is wait4 (61); pthread_mutex_lock futex.
const EXPECTED: &[(&str, &str, i64, i64)] = &[
    ("main", "read", 0, -512),
    ("t_read", "read", 0, -512),
    ("t_accept", "accept", 43, -512),
    ("t_nanosleep", "nanosleep", 230, -516),
    ("t_mutex", "pthread_mutex_lock", 202, -512),
    ("t_poll", "poll", 7, -516),
    ("t_select", "select", 270, -514),
    ("t_epoll", "epoll_wait", 232, -514),
    ("t_usleep", "usleep", 230, -516),
    ("t_sleep", "sleep", 230, -516),
    ("t_recv", "recv", 45, -512),
    ("t_waitpid", "waitpid", 61, -512),
    ("t_semwait", "sem_wait", 202, -512),
    ("t_sigwait", "sigwaitinfo", 128, -514),
];

fn frame_lines(out: &str) -> BTreeMap<String, u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("F "))
        .filter_map(|l| {
            let (name, addr) = l.split_once(' ')?;
            Some((name.to_string(), u64::from_str_radix(addr, 16).ok()?))
        })
        .collect()
}

fn blocked_calls(tc: Toolchain, pause: (&str, &str, i64, i64), flags: &[&str]) {
    let d = TempDir::new("sys");
    let exe = build_with(&d, "blockers", BLOCKERS, tc, flags);
    let expected: Vec<(&str, &str, i64, i64)> = EXPECTED
        .iter()
        .copied()
        .chain(std::iter::once(pause))
        .collect();
    let mut child = start(&exe, &[], "ready");
    let pid = pid_of(&child);
    wait_threads(pid, expected.len());
    for e in &expected {
        let tag = format!("F {} ", e.0);
        child
            .wait_for_line(&tag, Duration::from_secs(20), |l| l.starts_with(&tag))
            .unwrap();
    }
    let tids = upstare_runtime::target::procfs::list_tasks(pid).unwrap();
    wait_sleeping(pid, &tids);
    let printed = frame_lines(&child.stdout_so_far());
    assert_eq!(printed.len(), expected.len(), "{printed:?}");

    let (mut tracee, image, mut libs) = seize(&child);
    // The experiment: registers as seized.
    let mut raw = BTreeMap::new();
    for &tid in &tids {
        let r = tracee.regs(tid).unwrap();
        raw.insert(tid.as_raw(), (r.0.orig_rax as i64, r.0.rax as i64));
    }
    let stopped = stop_the_world(&mut tracee, &image, &mut libs, &StopOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stopped.threads.len(), expected.len());
    assert_eq!(
        stopped.breakpoints_armed, 0,
        "every thread was ready as seized"
    );
    for t in &stopped.threads {
        let bottom = &t.frames.last().expect("frames").function;
        let &(func, callee, nr, rax) = expected
            .iter()
            .find(|e| e.0 == bottom)
            .unwrap_or_else(|| panic!("unexpected thread {t:?}"));
        assert_eq!(
            raw[&t.tid.as_raw()],
            (nr, rax),
            "{func}: (orig_rax, rax) as seized"
        );
        assert_eq!(
            t.readiness,
            Readiness::Blocked {
                callee: callee.into(),
                syscall: nr as u64
            },
            "{func}"
        );
        // The thread function (or main) calls the library directly.
        assert_eq!(t.frames.len(), 1, "{func}: {:?}", t.frames);
        let f = &t.frames[0];
        assert_eq!(
            f.continuation.to_string(),
            format!("call:{callee}#0"),
            "{func}"
        );
        assert_eq!(f.cfa.0, printed[func] + 16, "{func}: CFA = rbp + 16");
        let site = image
            .tables
            .function(func)
            .unwrap()
            .call_site_returning_to(f.pc)
            .expect("paused at a call site");
        assert!(site.restart.is_some(), "{func}");
        // The callee-saved view was recovered for every tracked register.
        assert_eq!(f.callee_saved.len(), 5, "{func}");
    }
    assert_code_intact(&tracee, &image);
    tracee.detach().unwrap();

    child.send_stdin(b"g").unwrap();
    let out = child.wait(Duration::from_secs(30)).unwrap();
    assert_eq!(
        out.status,
        upstare_testkit::ExitStatus::Code(0),
        "{}",
        out.stderr
    );
    let after: String = out
        .stdout
        .lines()
        .filter(|l| !l.starts_with("F ") && *l != "ready")
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(after, AFTER, "every call completed as if never interrupted");
}

#[test]
fn blocked_calls_gcc() {
    blocked_calls(
        Toolchain::Gcc,
        ("t_pause", "sigsuspend", 130, -514),
        &["-DUSE_SIGSUSPEND"],
    );
}

#[test]
fn blocked_calls_clang() {
    blocked_calls(Toolchain::Clang, ("t_pause", "pause", 34, -514), &[]);
}
