//! `run_with_breakpoints` on programs with threads, forks, vforks, signals,
//! crashes, and programs that never end or get killed.

mod common;
use common::*;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::time::Duration;
use upstare_runtime::*;
use upstare_testkit::{run_with_breakpoints, DriverError, Exit, HitAction, RunLimits, Toolchain};

#[test]
fn four_threads_hit_a_worker_function() {
    let d = TempDir::new("threads");
    let exe = compile(&d, "threads", progs::THREADS, Toolchain::Gcc);
    let step = symbol(&exe, "worker_step");
    let worker = symbol(&exe, "worker");
    let (nt, k) = (progs::THREADS_NT, progs::THREADS_K);
    let mut per_tid: BTreeMap<Pid, u64> = BTreeMap::new();
    let mut worker_tids = Vec::new();
    let mut pids = Vec::new();
    let r = run_with_breakpoints(
        &exe,
        &[] as &[&str],
        &[step, worker],
        |ctx| {
            pids.push(ctx.pid);
            if ctx.link_addr == step {
                *per_tid.entry(ctx.tid).or_insert(0) += 1;
            } else {
                worker_tids.push(ctx.tid);
            }
            HitAction::Continue
        },
        RunLimits::default(),
    )
    .unwrap();
    let want_sum: u64 = (0..nt)
        .flat_map(|i| (0..k).map(move |j| i * 1000 + j))
        .sum();
    assert_eq!(r.exit, Exit::Code(0));
    assert_eq!(r.stdout_str(), format!("sum={want_sum}\n"));
    assert_eq!(r.hits[&step], nt * k);
    assert_eq!(r.hits[&worker], nt);
    worker_tids.sort();
    worker_tids.dedup();
    assert_eq!(
        worker_tids.len() as u64,
        nt,
        "each thread enters worker once"
    );
    assert_eq!(per_tid.len() as u64, nt);
    assert!(per_tid.values().all(|&n| n == k), "{per_tid:?}");
    assert_eq!(r.threads_seen as u64, nt + 1);
    pids.dedup();
    assert_eq!(pids.len(), 1, "all threads belong to one process");
    assert!(
        !per_tid.contains_key(&pids[0]),
        "the main thread never calls worker_step"
    );
}

#[test]
fn every_instruction_of_a_contended_function_in_four_threads() {
    // Breakpoints on each instruction of worker_step, hit concurrently: a
    // thread running through a lifted int3 would lose a hit.
    let d = TempDir::new("threads-insn");
    let exe = compile(&d, "threads", progs::THREADS, Toolchain::Gcc);
    let insns = instructions(&exe, "worker_step");
    let plain = run_plain(&exe, &[]);
    let r = run_with_breakpoints(
        &exe,
        &[] as &[&str],
        &insns,
        |_| HitAction::Continue,
        RunLimits::default(),
    )
    .unwrap();
    assert_eq!(r.stdout_str(), plain.stdout);
    let want = progs::THREADS_NT * progs::THREADS_K;
    for a in &insns {
        assert_eq!(r.hits[a], want, "instruction {a}");
    }
}

#[test]
fn forking_program_completes_with_the_same_output() {
    let d = TempDir::new("fork");
    let exe = compile(&d, "fork", progs::FORK, Toolchain::Gcc);
    let work = symbol(&exe, "work");
    let plain = run_plain(&exe, &[]);
    assert!(plain.stdout.contains("child c=180\n"), "{}", plain.stdout);
    let mut pids = Vec::new();
    let r = run_with_breakpoints(
        &exe,
        &[] as &[&str],
        &[work],
        |ctx| {
            pids.push(ctx.pid);
            HitAction::Continue
        },
        RunLimits::default(),
    )
    .unwrap();
    assert_eq!(r.exit, Exit::Code(0));
    assert_eq!(r.stdout_str(), plain.stdout);
    assert!(r.stdout_str().contains("child exited=1 code=7\n"));
    // Only the parent is traced: 3 calls before the fork, 1 after.
    assert_eq!(r.hits[&work], 4);
    assert!(pids.iter().all(|&p| p == pids[0]));
    assert_eq!(r.forks_detached, 1);
}

#[test]
fn vfork_and_system_are_followed_until_exec_or_exit() {
    let d = TempDir::new("vfork");
    let exe = compile(&d, "vfork", progs::VFORK, Toolchain::Gcc);
    let work = symbol(&exe, "work");
    let plain = run_plain(&exe, &[]);
    assert!(
        plain.stdout.contains("vfork child code=42\n"),
        "{}",
        plain.stdout
    );
    let mut pids = Vec::new();
    let r = run_with_breakpoints(
        &exe,
        &[] as &[&str],
        &[work],
        |ctx| {
            pids.push(ctx.pid);
            HitAction::Continue
        },
        RunLimits::default(),
    )
    .unwrap();
    assert_eq!(r.exit, Exit::Code(0));
    assert_eq!(r.stdout_str(), plain.stdout);
    // The vfork child calls work twice (in shared memory), the parent once.
    assert_eq!(r.hits[&work], 3);
    assert_eq!(pids.len(), 3);
    assert_ne!(pids[0], pids[2], "the first two hits are the vfork child's");
    assert_eq!(pids[0], pids[1]);
    assert!(r.vforks_followed >= 2, "system() and vfork(): {r:?}");
}

#[test]
fn signals_and_handlers_behave_as_untraced() {
    let d = TempDir::new("signals");
    let exe = compile(&d, "signals", progs::SIGNALS, Toolchain::Gcc);
    let work = symbol(&exe, "work");
    let handler = symbol(&exe, "on_usr1");
    let alrm = symbol(&exe, "on_alrm");
    let plain = run_plain(&exe, &[]);
    assert_eq!(plain.stdout, "acc=55 got=4\nalarms>=30 calls>0: 1\n");
    let r = run_with_breakpoints(
        &exe,
        &[] as &[&str],
        &[work, handler, alrm],
        |_| HitAction::Continue,
        RunLimits::default(),
    )
    .unwrap();
    assert_eq!(r.exit, Exit::Code(0), "{r:?}");
    assert_eq!(r.stdout_str(), plain.stdout);
    assert_eq!(r.hits[&handler], 4);
    assert!(r.hits[&alrm] >= 30, "{r:?}");
    // 10 loop calls + 4 from the handler + at least one in the spin loop.
    assert!(r.hits[&work] > 14, "{r:?}");
}

#[test]
fn crash_at_a_breakpointed_instruction_is_delivered() {
    let d = TempDir::new("crash");
    let exe = compile(&d, "crash", progs::CRASH, Toolchain::Gcc);
    let insns = instructions(&exe, "crash");
    let plain = run_plain(&exe, &[]);
    assert_eq!(plain.code, None, "untraced run must die by a signal");
    let r = run_with_breakpoints(
        &exe,
        &[] as &[&str],
        &insns,
        |_| HitAction::Continue,
        RunLimits::default(),
    )
    .unwrap();
    assert_eq!(r.exit, Exit::Killed(Sig::SEGV), "{r:?}");
    assert_eq!(r.stdout_str(), "about to crash\n");
    // The instructions up to the faulting load ran once.
    assert_eq!(r.hits[&insns[0]], 1);
}

#[test]
fn a_program_that_never_ends_times_out_and_is_killed() {
    let d = TempDir::new("pause");
    let exe = compile(&d, "pause", progs::PAUSE, Toolchain::Gcc);
    let main = symbol(&exe, "main");
    let mut pid = None;
    let limits = RunLimits {
        timeout: Duration::from_millis(500),
        ..RunLimits::default()
    };
    let e = run_with_breakpoints(
        &exe,
        &[] as &[&str],
        &[main],
        |ctx| {
            pid = Some(ctx.pid);
            HitAction::Continue
        },
        limits,
    )
    .unwrap_err();
    assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("pause"), "{e}");
    let pid = pid.expect("main was hit");
    assert_eq!(
        signal::kill(pid, None),
        Err(nix::errno::Errno::ESRCH),
        "the program survived the timeout"
    );
}

#[test]
fn target_killed_from_outside_ends_the_run_cleanly() {
    let d = TempDir::new("extkill");
    let exe = compile(&d, "threads", progs::THREADS, Toolchain::Gcc);
    let step = symbol(&exe, "worker_step");
    let r = run_with_breakpoints(
        &exe,
        &[] as &[&str],
        &[step],
        |ctx| {
            if ctx.hit == 10 {
                signal::kill(ctx.pid, Signal::SIGKILL).unwrap();
            }
            HitAction::Continue
        },
        RunLimits::default(),
    )
    .unwrap();
    assert_eq!(r.exit, Exit::Killed(Sig::KILL));
    assert!(r.hits[&step] >= 10);
}

#[test]
fn exec_replaces_the_image_and_its_breakpoints() {
    let d = TempDir::new("exec");
    let exe = compile(&d, "exec", progs::EXEC, Toolchain::Gcc);
    let work = symbol(&exe, "work");
    let r = run_with_breakpoints(
        &exe,
        &[] as &[&str],
        &[work],
        |_| HitAction::Continue,
        RunLimits::default(),
    )
    .unwrap();
    assert_eq!(r.exit, Exit::Code(0));
    assert_eq!(r.stdout_str(), "image 1 work=2\nimage 2 work=3\n");
    assert!(r.exec_replaced_image);
    // Only the first image had the breakpoint.
    assert_eq!(r.hits[&work], 1);
}

#[test]
fn signal_arriving_during_a_step_keeps_its_siginfo() {
    // At the first hit, util-linux kill queues SIGUSR1 with a value
    // (sigqueue). The signal is taken while the driver steps over the
    // breakpoint: it must reach the handler once, with SI_QUEUE and the value.
    let d = TempDir::new("queued");
    let exe = compile(&d, "queued", progs::QUEUED, Toolchain::Gcc);
    let work = symbol(&exe, "work");
    assert_eq!(
        run_plain(&exe, &[]).stdout,
        "acc=6 count=0 code=99 value=0\n"
    );
    let r = run_with_breakpoints(
        &exe,
        &[] as &[&str],
        &[work],
        |ctx| {
            if ctx.hit == 1 {
                let st = std::process::Command::new("/usr/bin/kill")
                    .args(["-s", "USR1", "-q", "1234"])
                    .arg(ctx.pid.to_string())
                    .status()
                    .expect("run kill");
                assert!(st.success());
            }
            HitAction::Continue
        },
        RunLimits::default(),
    )
    .unwrap();
    assert_eq!(r.exit, Exit::Code(0));
    // SI_QUEUE is -1.
    assert_eq!(r.stdout_str(), "acc=6 count=1 code=-1 value=1234\n");
    assert_eq!(r.hits[&work], 3);
}
