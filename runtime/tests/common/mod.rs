//! Helpers shared by the runtime's integration tests: build real C programs
//! with the real compiler into a private temporary directory, look up their
//! symbols, run them untraced for comparison.
#![allow(dead_code)]

use object::{Object, ObjectSection, ObjectSymbol};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use upstare_dwarf::LinkAddr;
pub use upstare_testkit::{compile_files, TempDir, Toolchain};

/// Compile `src` (C) into `dir/name` with `-O0 -g -fno-omit-frame-pointer
/// -pthread` (and `-no-pie` for that toolchain).
pub fn compile(dir: &TempDir, name: &str, src: &str, tc: Toolchain) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, src).expect("write C source");
    compile_files(tc, &[&c], &["-pthread"], &[], &dir.join(name))
        .unwrap_or_else(|e| panic!("compiling {name}: {e}"))
}

/// Link-time address of symbol `name` in `exe`.
pub fn symbol(exe: &Path, name: &str) -> LinkAddr {
    let data = std::fs::read(exe).expect("read exe");
    let file = object::File::parse(&*data).expect("parse exe");
    let sym = file
        .symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("no symbol {name} in {}", exe.display()));
    LinkAddr(sym.address())
}

/// Bytes of `exe`'s file image at link-time address `addr`.
pub fn file_bytes(exe: &Path, addr: LinkAddr, len: usize) -> Vec<u8> {
    let data = std::fs::read(exe).expect("read exe");
    let file = object::File::parse(&*data).expect("parse exe");
    for s in file.sections() {
        let (a, sz) = (s.address(), s.size());
        if a <= addr.0 && addr.0 + len as u64 <= a + sz {
            let d = s.data().expect("section data");
            let off = (addr.0 - a) as usize;
            return d[off..off + len].to_vec();
        }
    }
    panic!("{addr} not in any section of {}", exe.display())
}

/// First PT_LOAD (p_offset, p_vaddr) of `exe`.
pub fn first_load(exe: &Path) -> (u64, u64) {
    use object::read::elf::{FileHeader, ProgramHeader};
    let data = std::fs::read(exe).expect("read exe");
    let hdr = object::elf::FileHeader64::<object::Endianness>::parse(&*data).expect("elf");
    let endian = hdr.endian().expect("endian");
    let ph = hdr
        .program_headers(endian, &*data)
        .expect("phdrs")
        .iter()
        .find(|p| p.p_type(endian) == object::elf::PT_LOAD)
        .expect("a PT_LOAD");
    (ph.p_offset(endian), ph.p_vaddr(endian))
}

/// Output of an untraced run.
pub struct Plain {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Run `exe` untraced (stdin /dev/null), killed after 30 s.
pub fn run_plain(exe: &Path, args: &[&str]) -> Plain {
    let dir = std::env::temp_dir();
    let tag = format!("{}-{}", std::process::id(), exe.display().to_string().len());
    let out_path = dir.join(format!(
        "upstare-plain-{tag}-{:?}.out",
        std::thread::current().id()
    ));
    let err_path = dir.join(format!(
        "upstare-plain-{tag}-{:?}.err",
        std::thread::current().id()
    ));
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("out file"))
        .stderr(std::fs::File::create(&err_path).expect("err file"))
        .spawn()
        .expect("spawn untraced");
    let start = Instant::now();
    let code = loop {
        if let Some(st) = child.try_wait().expect("wait untraced") {
            break st.code();
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("untraced run of {} hung", exe.display());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    Plain {
        code,
        stdout,
        stderr,
    }
}

/// Link-time addresses of every instruction of function `name`, from
/// `objdump -d` (an independent decoder).
pub fn instructions(exe: &Path, name: &str) -> Vec<LinkAddr> {
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-M", "intel"])
        .arg(format!("--disassemble={name}"))
        .arg(exe)
        .output()
        .expect("run objdump");
    assert!(out.status.success(), "objdump failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut addrs = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.ends_with(&format!("<{name}>:")) {
            inside = true;
            continue;
        }
        if inside {
            let Some((a, _)) = line.trim_start().split_once(':') else {
                if line.trim().is_empty() {
                    break;
                }
                continue;
            };
            match u64::from_str_radix(a.trim(), 16) {
                Ok(v) => addrs.push(LinkAddr(v)),
                Err(_) => break,
            }
        }
    }
    assert!(addrs.len() > 2, "no instructions found for {name}");
    addrs
}

/// The test programs.
pub mod progs {
    /// `work(x)` called `argv[1]` times; globals `counter`, `total`.
    pub const CALLS: &str = r#"
#include <stdio.h>
#include <stdlib.h>
int counter = 0;
long total = 0;
int work(int x) {
    counter++;
    total += x;
    return x * 2;
}
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 5;
    for (int i = 0; i < n; i++) {
        printf("before %d counter=%d\n", i, counter);
        int r = work(i);
        printf("work(%d)=%d\n", i, r);
    }
    printf("total=%ld counter=%d\n", total, counter);
    return 0;
}
"#;

    /// 4 threads, each calling `worker_step` K times.
    pub const THREADS: &str = r#"
#include <pthread.h>
#include <stdio.h>
#define NT 4
#define K 50
pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
long sum = 0;
void worker_step(long id, int j) {
    pthread_mutex_lock(&mu);
    sum += id * 1000 + j;
    pthread_mutex_unlock(&mu);
}
void *worker(void *arg) {
    long id = (long)arg;
    for (int j = 0; j < K; j++)
        worker_step(id, j);
    return NULL;
}
int main(void) {
    pthread_t t[NT];
    for (long i = 0; i < NT; i++)
        pthread_create(&t[i], NULL, worker, (void *)i);
    for (int i = 0; i < NT; i++)
        pthread_join(t[i], NULL);
    printf("sum=%ld\n", sum);
    return 0;
}
"#;
    pub const THREADS_NT: u64 = 4;
    pub const THREADS_K: u64 = 50;

    /// Parent calls `work` 4 times, its forked child 5 times.
    pub const FORK: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/wait.h>
int work(int x) { return x * 3; }
int main(void) {
    int acc = 0;
    for (int i = 0; i < 3; i++)
        acc += work(i);
    printf("parent before fork acc=%d\n", acc);
    fflush(stdout);
    pid_t p = fork();
    if (p == 0) {
        int c = 0;
        for (int i = 0; i < 5; i++)
            c += work(i + 10);
        printf("child c=%d\n", c);
        fflush(stdout);
        _exit(7);
    }
    int st = 0;
    waitpid(p, &st, 0);
    printf("child exited=%d code=%d\n", WIFEXITED(st), WEXITSTATUS(st));
    acc += work(100);
    printf("parent acc=%d\n", acc);
    return 0;
}
"#;

    /// system() (posix_spawn: a vfork-style clone that execs /bin/sh), then
    /// a vfork child that calls `work` twice; the parent calls it once.
    pub const VFORK: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/wait.h>
int work(int x) { return x + 40; }
int main(void) {
    int r = system("echo from-shell");
    printf("system=%d\n", r);
    fflush(stdout);
    pid_t p = vfork();
    if (p == 0) {
        work(5);
        _exit(work(2));
    }
    int st = 0;
    waitpid(p, &st, 0);
    printf("vfork child code=%d\n", WEXITSTATUS(st));
    printf("work=%d\n", work(1));
    return 0;
}
"#;

    /// Signal handlers that call `work`, raised synchronously and by a
    /// fast interval timer.
    pub const SIGNALS: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
volatile sig_atomic_t got = 0, alarms = 0;
int work(int x) { return x + 1; }
void on_usr1(int sig) { got++; work(sig); }
void on_alrm(int sig) { (void)sig; alarms++; }
int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, 0);
    sa.sa_handler = on_alrm;
    sigaction(SIGALRM, &sa, 0);
    int acc = 0;
    for (int i = 0; i < 10; i++) {
        acc += work(i);
        if (i % 3 == 0)
            raise(SIGUSR1);
    }
    printf("acc=%d got=%d\n", acc, got);
    struct itimerval it = {{0, 200}, {0, 200}};
    setitimer(ITIMER_REAL, &it, 0);
    long calls = 0;
    while (alarms < 30)
        calls += work(1) > 0;
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, 0);
    printf("alarms>=30 calls>0: %d\n", calls > 0);
    return 0;
}
"#;

    /// Dereferences a null pointer in `crash`.
    pub const CRASH: &str = r#"
#include <stdio.h>
int crash(int *p) { return *p + 1; }
int main(void) {
    printf("about to crash\n");
    fflush(stdout);
    return crash((int *)0);
}
"#;

    /// Calls `work`, then re-executes itself once.
    pub const EXEC: &str = r#"
#include <stdio.h>
#include <unistd.h>
int work(int x) { return x + 1; }
int main(int argc, char **argv) {
    printf("image %d work=%d\n", argc, work(argc));
    fflush(stdout);
    if (argc == 1) {
        execl("/proc/self/exe", argv[0], "again", (char *)0);
        return 9;
    }
    return 0;
}
"#;

    /// Records the siginfo of a SIGUSR1 sent from outside.
    pub const QUEUED: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <string.h>
volatile int code = 99, value = 0, count = 0;
int work(int x) { return x + 1; }
void on_usr1(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    code = si->si_code;
    value = si->si_value.sival_int;
    count++;
}
int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_usr1;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGUSR1, &sa, 0);
    int acc = 0;
    for (int i = 0; i < 3; i++)
        acc += work(i);
    printf("acc=%d count=%d code=%d value=%d\n", acc, count, code, value);
    return 0;
}
"#;

    /// Waits forever.
    pub const PAUSE: &str = r#"
#include <unistd.h>
int main(void) { for (;;) pause(); }
"#;

    /// Two threads spin until the global `stop_flag` is set from outside.
    pub const SPIN: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
volatile int stop_flag = 0;
volatile long spins = 0;
void *helper(void *a) { (void)a; while (!stop_flag) usleep(1000); return NULL; }
int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, helper, NULL);
    printf("ready\n");
    fflush(stdout);
    while (!stop_flag) { spins++; usleep(1000); }
    pthread_join(t, NULL);
    printf("stopped\n");
    return 0;
}
"#;
}
