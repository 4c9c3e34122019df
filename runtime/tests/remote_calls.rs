//! Remote system calls and function calls in real, seized processes: their
//! results, and that the thread (registers, extended registers, borrowed
//! code bytes, signal mask, pending signals, an interrupted system call)
//! comes back exactly as it was, shown by the program finishing with the
//! output of an undisturbed run.

mod remote_support;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use remote_support::*;
use std::path::PathBuf;
use std::time::Duration;
use upstare_dwarf::RuntimeAddr;
use upstare_runtime::load::Libraries;
use upstare_runtime::memory::TargetMemory;
use upstare_runtime::target::remote::{
    exe_entry, KernelSigaction, RemoteCalls, RemoteError, GADGET_LEN,
};
use upstare_runtime::Tracee;
use upstare_testkit::{ChildGuard, Toolchain};

const PROG: &str = r#"
#include <malloc.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

volatile int spin = 1;
volatile long spins;

int add(int a, int b) { return a + b; }
long seven(void) { return 7; }
long eight(void) { return 8; }
long weigh6(long a, long b, long c, long d, long e, long f) {
    return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f;
}
int fmt(char *buf, int n) { return snprintf(buf, 64, "value=%d", n); }
double half(double x) { return x / 2; }
void forever(void) { for (;;) spins++; }
unsigned long heap_in_use(void) { return mallinfo2().uordblks; }
/* x * 2 when called with the stack aligned as the ABI requires (rsp + 8
   a multiple of 16 at the entry, so the frame pushed there is too). */
long twice_if_aligned(long x) {
    return (uintptr_t)__builtin_frame_address(0) % 16 == 0 ? x * 2 : -1;
}
static void on_usr1(int s) { (void)s; write(1, "usr1\n", 5); }
static void on_usr2(int s) { (void)s; write(1, "usr2\n", 5); }

int main(int argc, char **argv) {
    char buf[64] = {0};
    signal(SIGUSR1, on_usr1);
    signal(SIGUSR2, on_usr2);
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    if (argc > 1) {
        while (spin)
            spins++;
        printf("spun\n");
        fflush(stdout);
    }
    ssize_t n = read(0, buf, sizeof buf - 1);
    printf("read %zd %s", n, buf);
    return 0;
}
"#;

fn program(dir: &TempDir) -> PathBuf {
    build(dir, "remote_prog", PROG, Toolchain::Gcc, &[])
}

/// Registers, extended registers, gadget bytes and maps of a thread.
type Snapshot = (
    upstare_runtime::Regs,
    upstare_runtime::ExtRegs,
    Vec<u8>,
    String,
);

/// Registers, extended registers, gadget bytes and maps of the thread.
fn snapshot(t: &Tracee, pid: Pid, gadget: RuntimeAddr) -> Snapshot {
    let regs = t.regs(pid).expect("regs");
    let ext = t.ext_regs(pid).expect("ext regs");
    let code = t
        .memory()
        .read_vec(gadget, GADGET_LEN as u64, 64)
        .expect("gadget bytes");
    (regs, ext, code, maps_text(pid))
}

/// The program built in a fresh directory (removed when the first value is
/// dropped), running, blocked in its read of stdin and seized.
fn seized_blocked(tag: &str) -> (TempDir, PathBuf, ChildGuard, Pid, Tracee) {
    let dir = TempDir::new(tag);
    let exe = program(&dir);
    let child = start(&exe, &[]);
    let pid = pid_of(&child);
    wait_blocked(pid);
    let t = Tracee::seize(pid).expect("seize");
    (dir, exe, child, pid, t)
}

/// `who`'s thread came back exactly as `before`: registers, extended
/// registers, gadget bytes, maps.
fn assert_restored(before: &Snapshot, after: &Snapshot, who: &str) {
    assert_eq!(before.0, after.0, "{who} registers restored");
    assert!(before.1 == after.1, "{who} extended registers restored");
    assert_eq!(before.2, after.2, "{who} gadget bytes restored");
    assert_eq!(before.3, after.3, "{who} maps as before");
}

/// Detaches, ends the program with `stdin` and expects exit 0 and
/// `expected` on stdout.
fn let_go(t: Tracee, child: ChildGuard, stdin: &[u8], expected: &str) {
    t.detach().expect("detach");
    let (code, out) = finish(child, stdin);
    assert_eq!(code, Some(0));
    assert_eq!(out, expected);
}

#[test]
fn syscalls_and_calls_in_a_thread_blocked_in_read() {
    let (_dir, exe, child, pid, mut t) = seized_blocked("blocked");
    let gadget = exe_entry(pid).expect("entry");
    let before = snapshot(&t, pid, gadget);
    // Blocked in read(0, ...): the kernel will restart it.
    assert_eq!(before.0 .0.orig_rax, 0, "thread is inside read()");
    let add = runtime_symbol(pid, &exe, "add");
    let weigh6 = runtime_symbol(pid, &exe, "weigh6");
    let fmt = runtime_symbol(pid, &exe, "fmt");
    {
        let mut rc = RemoteCalls::new(&mut t, pid, gadget).expect("session");
        assert_eq!(rc.getpid().expect("getpid"), pid);
        let len = 3 * 4096;
        let m = rc
            .mmap(
                RuntimeAddr(0),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
            .expect("mmap");
        assert_eq!(perms_at(pid, m).as_deref(), Some("rw-p"));
        assert_eq!(
            perms_at(pid, RuntimeAddr(m.0 + len - 1)).as_deref(),
            Some("rw-p")
        );
        rc.memory()
            .write(m, b"remote bytes")
            .expect("write mapping");
        assert_eq!(
            rc.memory().read_vec(m, 12, 64).expect("read mapping"),
            b"remote bytes"
        );
        rc.mprotect(m, 4096, libc::PROT_READ).expect("mprotect");
        assert_eq!(perms_at(pid, m).as_deref(), Some("r--p"));
        assert_eq!(
            perms_at(pid, RuntimeAddr(m.0 + 4096)).as_deref(),
            Some("rw-p")
        );
        rc.munmap(m, len).expect("munmap");
        for page in 0..3 {
            assert_eq!(perms_at(pid, RuntimeAddr(m.0 + page * 4096)), None);
        }
        // A failing system call reports its errno.
        match rc.munmap(RuntimeAddr(1), 4096) {
            Err(RemoteError::Syscall { errno, .. }) => assert_eq!(errno, nix::errno::Errno::EINVAL),
            other => panic!("munmap of an unaligned address: {other:?}"),
        }
        // Function calls: integer arguments, all six registers, a libc call
        // writing into scratch memory.
        assert_eq!(rc.call(add, &[20, 22]).expect("add"), 42);
        assert_eq!(
            rc.call(add, &[(-5i64) as u64, 3]).expect("add") as u32 as i32,
            -2
        );
        assert_eq!(
            rc.call(weigh6, &[1, 2, 3, 4, 5, 6]).expect("weigh6"),
            1 + 4 + 9 + 16 + 25 + 36
        );
        let buf = rc.scratch_alloc(64).expect("scratch");
        assert_eq!(rc.call(fmt, &[buf.0, 4242]).expect("fmt"), 10);
        assert_eq!(
            rc.memory().read_vec(buf, 11, 64).expect("read buf"),
            b"value=4242\0"
        );
        // openat/close of a real file.
        let fd = rc
            .openat(&exe, libc::O_RDONLY | libc::O_CLOEXEC, 0)
            .expect("openat");
        assert!(fd > 2);
        assert!(std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).is_ok());
        rc.close(fd).expect("close");
        assert!(std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).is_err());
        rc.finish().expect("restore");
    }
    let after = snapshot(&t, pid, gadget);
    assert_restored(&before, &after, "thread");
    let_go(
        t,
        child,
        b"hello\n",
        &format!("ready {pid}\nread 6 hello\n"),
    );
}

#[test]
fn calls_in_a_busy_thread_leave_it_unchanged() {
    let dir = TempDir::new("busy");
    let exe = program(&dir);
    let child = start(&exe, &["spin"]);
    let pid = pid_of(&child);
    std::thread::sleep(Duration::from_millis(30));
    let mut t = Tracee::seize(pid).expect("seize");
    let gadget = exe_entry(pid).expect("entry");
    let before = snapshot(&t, pid, gadget);
    let main_fn = symbol(&exe, "main");
    let bias = bias_in(pid, &exe);
    let rip = before.0 .0.rip;
    assert!(
        rip >= main_fn.to_runtime(bias).0 && rip < main_fn.to_runtime(bias).0 + 0x200,
        "stopped in main's loop"
    );
    let half = runtime_symbol(pid, &exe, "half");
    {
        let mut rc = RemoteCalls::new(&mut t, pid, gadget).expect("session");
        for i in 0..20u64 {
            assert_eq!(
                rc.call(runtime_symbol(pid, &exe, "add"), &[i, 1])
                    .expect("add"),
                i + 1
            );
        }
        // A call that uses xmm registers: the thread's vector state must
        // come back.
        let _ = rc.call(half, &[]).expect("half");
        let old = rc.rt_sigaction(libc::SIGUSR1, None).expect("sigaction");
        assert_eq!(
            old.handler,
            runtime_symbol(pid, &exe, "on_usr1").0,
            "SIGUSR1 handler is on_usr1"
        );
        // Re-install the same action: still the same afterwards.
        let again = rc.rt_sigaction(libc::SIGUSR1, Some(&old)).expect("set");
        assert_eq!(again, old);
        assert_eq!(
            rc.rt_sigaction(libc::SIGUSR2, None).expect("usr2").handler,
            runtime_symbol(pid, &exe, "on_usr2").0
        );
        assert_eq!(
            rc.rt_sigaction(libc::SIGTERM, None).expect("term"),
            KernelSigaction::default()
        );
    }
    let after = snapshot(&t, pid, gadget);
    assert_restored(&before, &after, "thread");
    // Let the loop end.
    let mut mem = t.memory();
    mem.write_u32(runtime_symbol(pid, &exe, "spin"), 0)
        .expect("clear spin");
    let_go(t, child, b"x\n", &format!("ready {pid}\nspun\nread 2 x\n"));
}

#[test]
fn signals_arriving_around_remote_calls_are_delivered_once_afterwards() {
    let (_dir, exe, child, pid, mut t) = seized_blocked("signals");
    let gadget = exe_entry(pid).expect("entry");
    let before = snapshot(&t, pid, gadget);
    // Pending before the session starts: taken at its first resume.
    signal::kill(pid, Signal::SIGUSR1).expect("kill USR1");
    {
        let mut rc = RemoteCalls::new(&mut t, pid, gadget).expect("session");
        assert_eq!(rc.getpid().expect("getpid"), pid);
        // Arrives during the session: stays pending (blocked).
        signal::kill(pid, Signal::SIGUSR2).expect("kill USR2");
        for _ in 0..5 {
            assert_eq!(rc.getpid().expect("getpid"), pid);
        }
        let add = runtime_symbol(pid, &exe, "add");
        assert_eq!(rc.call(add, &[1, 2]).expect("add"), 3);
        rc.finish().expect("restore");
    }
    let after = snapshot(&t, pid, gadget);
    assert_eq!(before.0, after.0, "registers restored");
    assert_eq!(before.2, after.2, "gadget bytes restored");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert!(
        status.contains("SigBlk:\t0000000000000000"),
        "signal mask restored:\n{status}"
    );
    t.detach().expect("detach");
    // Both handlers run once (signal() restarts read afterwards).
    child
        .wait_for_line("usr2", Duration::from_secs(10), |l| l == "usr2")
        .expect("USR2 delivered");
    let (code, out) = finish(child, b"abc\n");
    assert_eq!(code, Some(0));
    // Both were pending together when the thread resumed: the kernel sets
    // up both handler frames at once, so either may print first.
    let mut lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(format!("ready {pid}").as_str())
    );
    assert_eq!(lines.last().copied(), Some("read 4 abc"));
    lines.sort_unstable();
    assert_eq!(
        lines,
        vec![
            "read 4 abc",
            format!("ready {pid}").as_str(),
            "usr1",
            "usr2"
        ],
        "each handler ran exactly once: {out:?}"
    );
}

#[test]
fn faulting_and_endless_calls_are_errors_and_the_thread_recovers() {
    let (_dir, exe, child, pid, mut t) = seized_blocked("fault");
    let gadget = exe_entry(pid).expect("entry");
    let before = snapshot(&t, pid, gadget);
    {
        let mut rc = RemoteCalls::new(&mut t, pid, gadget).expect("session");
        match rc.call(RuntimeAddr(0x10), &[]) {
            Err(RemoteError::Fault { sig, rip, .. }) => {
                assert_eq!(sig.0, libc::SIGSEGV);
                assert_eq!(rip, RuntimeAddr(0x10));
            }
            other => panic!("call of an unmapped address: {other:?}"),
        }
        // The session is still usable.
        assert_eq!(rc.getpid().expect("getpid"), pid);
        rc.set_timeout(Duration::from_millis(200));
        let forever = runtime_symbol(pid, &exe, "forever");
        match rc.call(forever, &[]) {
            Err(RemoteError::Timeout { .. }) => {}
            other => panic!("endless call: {other:?}"),
        }
        rc.set_timeout(Duration::from_secs(5));
        assert_eq!(rc.getpid().expect("getpid after timeout"), pid);
        match rc.call(forever, &[1, 2, 3, 4, 5, 6, 7]) {
            Err(RemoteError::TooManyArgs { n: 7, .. }) => {}
            other => panic!("7 arguments: {other:?}"),
        }
    }
    let after = snapshot(&t, pid, gadget);
    assert_restored(&before, &after, "thread");
    let_go(t, child, b"ok\n", &format!("ready {pid}\nread 3 ok\n"));
}

#[test]
fn a_gadget_outside_executable_memory_is_refused() {
    let (_dir, exe, child, pid, mut t) = seized_blocked("gadget");
    let data = runtime_symbol(pid, &exe, "spins");
    match RemoteCalls::new(&mut t, pid, data) {
        Err(e @ RemoteError::BadGadget { .. }) => {
            assert!(
                e.to_string().contains("not inside an executable mapping"),
                "{e}"
            )
        }
        other => panic!("data address as gadget: {other:?}"),
    }
    let_go(t, child, b"ok\n", &format!("ready {pid}\nread 3 ok\n"));
}

#[test]
fn killing_the_target_during_a_call_is_a_clear_error() {
    let (_dir, exe, mut child, pid, mut t) = seized_blocked("kill");
    let gadget = exe_entry(pid).expect("entry");
    let forever = runtime_symbol(pid, &exe, "forever");
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let _ = signal::kill(pid, Signal::SIGKILL);
    });
    {
        let mut rc = RemoteCalls::new(&mut t, pid, gadget).expect("session");
        match rc.call(forever, &[]) {
            Err(e @ RemoteError::Ended { .. }) => {
                assert!(e.to_string().contains("ended during remote call"), "{e}")
            }
            other => panic!("call in a killed process: {other:?}"),
        }
    }
    killer.join().expect("killer thread");
    drop(t);
    let _ = child.kill();
}

const THREADED: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

int add(int a, int b) { return a + b; }
static void *worker(void *arg) {
    char buf[16] = {0};
    (void)arg;
    printf("ready worker %ld\n", (long)syscall(SYS_gettid));
    fflush(stdout);
    ssize_t n = read(0, buf, sizeof buf - 1);
    printf("worker read %zd\n", n);
    return NULL;
}
int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    pthread_join(t, NULL);
    printf("joined\n");
    return 0;
}
"#;

#[test]
fn remote_calls_in_a_non_leader_thread() {
    let dir = TempDir::new("thread");
    let exe = build(&dir, "threaded", THREADED, Toolchain::Gcc, &["-pthread"]);
    let child = start(&exe, &[]);
    let pid = pid_of(&child);
    let line = child
        .wait_for_line("worker", Duration::from_secs(10), |l| {
            l.starts_with("ready worker")
        })
        .expect("worker line");
    let tid = Pid::from_raw(
        line.rsplit(' ')
            .next()
            .and_then(|t| t.parse().ok())
            .expect("tid"),
    );
    assert_ne!(tid, pid);
    for _ in 0..2000 {
        let stat =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap_or_default();
        if stat
            .rfind(')')
            .is_some_and(|i| stat[i + 1..].trim_start().starts_with('S'))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut t = Tracee::seize(pid).expect("seize");
    let gadget = exe_entry(pid).expect("entry");
    let before_worker = snapshot(&t, tid, gadget);
    let before_main = t.regs(pid).expect("main regs");
    {
        let mut rc = RemoteCalls::new(&mut t, tid, gadget).expect("session");
        assert_eq!(rc.getpid().expect("getpid"), pid);
        assert_eq!(
            rc.syscall(libc::SYS_gettid, &[]).expect("gettid"),
            i64::from(tid.as_raw())
        );
        let add = runtime_symbol(pid, &exe, "add");
        assert_eq!(rc.call(add, &[7, 8]).expect("add"), 15);
        rc.finish().expect("restore");
    }
    let after_worker = snapshot(&t, tid, gadget);
    assert_restored(&before_worker, &after_worker, "worker");
    assert_eq!(
        t.regs(pid).expect("main regs"),
        before_main,
        "main untouched"
    );
    let_go(
        t,
        child,
        b"hi\n",
        &format!("ready worker {tid}\nworker read 3\njoined\n"),
    );
}

/// glibc's chunk for a request of `n` bytes: `n` plus the 8-byte size
/// field, rounded up to 16, at least 32 (what `mallinfo2().uordblks`
/// counts and `malloc_usable_size` reports minus the size field).
fn glibc_chunk(n: u64) -> u64 {
    ((n + 8 + 15) & !15).max(32)
}

#[test]
fn batched_calls_allocate_measure_and_free_ten_thousand_blocks() {
    let (_dir, exe, child, pid, mut t) = seized_blocked("batch");
    let gadget = exe_entry(pid).expect("entry");
    let before = snapshot(&t, pid, gadget);
    let libs = Libraries::read(pid).expect("libraries");
    let libc_fn = |name: &str| libs.lookup_symbol(name, None).expect(name).addr;
    let (malloc, usable, free) = (
        libc_fn("malloc"),
        libc_fn("malloc_usable_size"),
        libc_fn("free"),
    );
    let in_use = runtime_symbol(pid, &exe, "heap_in_use");
    let twice = runtime_symbol(pid, &exe, "twice_if_aligned");
    // Above glibc's per-thread cache (1032 bytes), which mallinfo would
    // count as in use after the frees.
    let sizes: Vec<u64> = (0..10_000u64).map(|i| 1100 + (i % 7) * 40).collect();
    {
        let mut rc = RemoteCalls::new(&mut t, pid, gadget).expect("session");
        let heap0 = rc.call(in_use, &[]).expect("mallinfo2 before");
        let mut blocks = Vec::new();
        rc.call_each(malloc, &sizes, true, &mut blocks)
            .expect("batched malloc");
        assert_eq!(blocks.len(), sizes.len(), "one block per size");
        assert!(blocks.iter().all(|&b| b != 0 && b % 16 == 0));
        let mut distinct = blocks.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), blocks.len(), "distinct blocks");
        let heap1 = rc.call(in_use, &[]).expect("mallinfo2 after malloc");
        let chunks: u64 = sizes.iter().map(|&n| glibc_chunk(n)).sum();
        assert_eq!(heap1 - heap0, chunks, "the heap grew by the chunks");
        let mut usable_sizes = Vec::new();
        rc.call_each(usable, &blocks, false, &mut usable_sizes)
            .expect("batched malloc_usable_size");
        for (n, u) in sizes.iter().zip(&usable_sizes) {
            assert_eq!(u + 8, glibc_chunk(*n), "usable size of a {n}-byte block");
        }
        // The same in chunks of 1000 calls: the (empty) 1 MiB scratch
        // area is taken but for 16 bytes per call.
        let _ = rc.scratch_alloc((1 << 20) - 16_000).expect("fill scratch");
        let mut again = Vec::new();
        rc.call_each(usable, &blocks, false, &mut again)
            .expect("chunked malloc_usable_size");
        assert_eq!(again, usable_sizes);
        rc.scratch_reset();
        // Each call finds the stack aligned.
        let mut doubled = Vec::new();
        rc.call_each(twice, &[1, 2, 3], false, &mut doubled)
            .expect("aligned calls");
        assert_eq!(doubled, vec![2, 4, 6]);
        let mut freed = Vec::new();
        rc.call_each(free, &blocks, false, &mut freed)
            .expect("batched free");
        assert_eq!(freed.len(), blocks.len(), "every block freed");
        let heap2 = rc.call(in_use, &[]).expect("mallinfo2 after free");
        assert_eq!(heap2, heap0, "the heap is back where it was");
        // A NULL from malloc ends the batch there.
        let mut partial = Vec::new();
        rc.call_each(malloc, &[64, 1 << 62, 64], true, &mut partial)
            .expect("malloc batch with a failure");
        assert_eq!(partial.len(), 2, "stopped after the NULL: {partial:?}");
        assert!(partial[0] != 0 && partial[1] == 0);
        rc.call_each(free, &partial[..1], false, &mut Vec::new())
            .expect("free the one block");
        rc.finish().expect("restore");
    }
    // The heap's end may differ by what glibc kept when it trimmed; every
    // other mapping (no scratch, no code page left) is as before.
    let without_heap = |s: &Snapshot| {
        let maps: Vec<String> =
            s.3.lines()
                .filter(|l| !l.ends_with("[heap]"))
                .map(str::to_string)
                .collect();
        (s.0, s.2.clone(), maps)
    };
    let after = snapshot(&t, pid, gadget);
    assert_eq!(without_heap(&before), without_heap(&after));
    assert!(before.1 == after.1, "extended registers restored");
    let_go(t, child, b"ok\n", &format!("ready {pid}\nread 3 ok\n"));
}

/// The maps epoch (maps read at one epoch are the process's maps while it
/// is unchanged): unchanged by a system call that maps nothing, bumped by
/// one that maps, by a function call (it may allocate) and by letting the
/// program run; while it is unchanged, the maps read again are the same.
#[test]
fn the_maps_epoch_changes_with_whatever_may_map_memory() {
    let (_dir, exe, child, pid, mut t) = seized_blocked("epoch");
    let gadget = exe_entry(pid).expect("entry");
    let add = runtime_symbol(pid, &exe, "add");
    let read = || upstare_runtime::target::procfs::read_maps(pid).expect("maps");
    let (maps0, e0) = (read(), t.maps_epoch());
    {
        let mut rc = RemoteCalls::new(&mut t, pid, gadget).expect("session");
        assert_eq!(rc.getpid().expect("getpid"), pid);
        assert_eq!(rc.maps_epoch(), e0, "getpid maps nothing");
        let m = rc
            .mmap(
                RuntimeAddr(0),
                4096,
                nix::libc::PROT_READ,
                nix::libc::MAP_PRIVATE | nix::libc::MAP_ANONYMOUS,
                -1,
                0,
            )
            .expect("mmap");
        let e1 = rc.maps_epoch();
        assert_ne!(e1, e0, "mmap maps");
        assert!(read().iter().any(|x| x.start == m), "the new mapping shows");
        assert_eq!(rc.call(add, &[2, 3]).expect("add"), 5);
        assert_ne!(rc.maps_epoch(), e1, "a function call may allocate");
        rc.munmap(m, 4096).expect("munmap");
        rc.finish().expect("finish");
    }
    assert_eq!(read(), maps0, "the session left the maps as they were");
    let e2 = t.maps_epoch();
    t.cont(pid, None).expect("cont");
    assert_ne!(t.maps_epoch(), e2, "the program ran");
    t.halt_all().expect("halt");
    let_go(t, child, b"x\n", &format!("ready {pid}\nread 2 x\n"));
}

/// Functions of no argument (IFUNC resolvers) called in one batch: each
/// result in order, the thread and its maps as before.
#[test]
fn call_all_calls_each_function_in_order() {
    let (_dir, exe, child, pid, mut t) = seized_blocked("call-all");
    let gadget = exe_entry(pid).expect("entry");
    let before = snapshot(&t, pid, gadget);
    let seven = runtime_symbol(pid, &exe, "seven");
    let eight = runtime_symbol(pid, &exe, "eight");
    {
        let mut rc = RemoteCalls::new(&mut t, pid, gadget).expect("session");
        let mut got = Vec::new();
        rc.call_all(&[seven, eight, eight, seven], &mut got)
            .expect("batch");
        assert_eq!(got, [7, 8, 8, 7]);
        rc.finish().expect("finish");
    }
    assert_restored(&before, &snapshot(&t, pid, gadget), "call_all");
    let_go(t, child, b"x\n", &format!("ready {pid}\nread 2 x\n"));
}
