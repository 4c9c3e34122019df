//! `Tracee`, `ProcessMemory` and breakpoints used directly on real
//! processes: restoring code bytes, both memory back-ends, the load bias,
//! seizing a running program, and dead targets.

mod common;
use common::*;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use upstare_dwarf::{FileOffset, LinkAddr, LoadBias, RuntimeAddr};
use upstare_runtime::target::breakpoint::INT3;
use upstare_runtime::target::procfs;
use upstare_runtime::*;

fn spawn(exe: &Path, args: &[&str]) -> (Tracee, SpawnedIo) {
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let (t, io) = Tracee::spawn(cmd).expect("spawn traced");
    (t, SpawnedIo(io))
}

struct SpawnedIo(SpawnedStdio);

impl SpawnedIo {
    /// All of stdout (the program must have ended).
    fn stdout(self) -> String {
        let mut s = String::new();
        if let Some(mut o) = self.0.stdout {
            std::io::Read::read_to_string(&mut o, &mut s).unwrap();
        }
        s
    }
}

fn bias_of(t: &Tracee, exe: &Path) -> LoadBias {
    let data = std::fs::read(exe).unwrap();
    let entry = object::Object::entry(&object::File::parse(&*data).unwrap());
    let auxv = procfs::read_auxv(t.pid()).unwrap();
    procfs::load_bias_from_auxv(&auxv, LinkAddr(entry)).unwrap()
}

/// Resume every traced thread until the leader exits.
fn run_to_exit(t: &mut Tracee) -> Stop {
    let start = Instant::now();
    let leader = t.pid();
    let _ = t.cont(leader, None);
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "program did not end"
        );
        for tid in t.traced() {
            match t.try_wait(tid).unwrap() {
                Some(s) if s.is_terminal() && tid == leader => return s,
                Some(s) if s.is_terminal() => {}
                Some(Stop::Signal { sig, .. }) => t.cont(tid, Some(sig)).unwrap(),
                Some(_) => t.cont(tid, None).unwrap(),
                None => {}
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn spawned_tracee_stops_at_exec_with_a_consistent_load_bias() {
    let d = TempDir::new("bias");
    for (i, build) in [Toolchain::Gcc, Toolchain::GccNoPie, Toolchain::Clang]
        .into_iter()
        .enumerate()
    {
        let exe = compile(&d, &format!("calls{i}"), progs::CALLS, build);
        let (mut t, io) = spawn(&exe, &["2"]);
        let pid = t.pid();
        assert_eq!(t.traced(), vec![pid]);
        assert_eq!(t.tasks().unwrap(), vec![pid]);
        assert_eq!(t.state(pid), Some(ThreadState::Stopped));

        let from_auxv = bias_of(&t, &exe);
        let maps = procfs::read_maps(pid).unwrap();
        let exe_path = procfs::exe_path(pid).unwrap();
        let (off, vaddr) = first_load(&exe);
        let from_maps =
            procfs::load_bias_from_maps(pid, &maps, &exe_path, FileOffset(off), LinkAddr(vaddr))
                .unwrap();
        assert_eq!(from_auxv, from_maps, "{build:?}");
        if matches!(build, Toolchain::GccNoPie) {
            assert_eq!(from_auxv, LoadBias(0));
        }
        // Nothing of the program ran: rip is in the dynamic linker, not in
        // the executable.
        let rip = t.regs(pid).unwrap().rip();
        let exe_map = maps
            .iter()
            .find(|m| m.contains(rip))
            .expect("rip is mapped");
        assert_ne!(exe_map.file(), Some(exe_path.as_path()), "{build:?}");

        // The bytes of main in the process equal the file's.
        let main = symbol(&exe, "main");
        let mem = t.memory();
        let got = mem.read_vec(main.to_runtime(from_auxv), 32, 32).unwrap();
        assert_eq!(got, file_bytes(&exe, main, 32), "{build:?}");

        assert_eq!(run_to_exit(&mut t), Stop::Exited { code: 0 });
        assert!(io.stdout().ends_with("total=1 counter=2\n"));
    }
}

#[test]
fn breakpoints_are_restored_to_the_file_bytes() {
    let d = TempDir::new("restore");
    let exe = compile(&d, "calls", progs::CALLS, Toolchain::Gcc);
    let (mut t, io) = spawn(&exe, &["4"]);
    let bias = bias_of(&t, &exe);
    let insns = instructions(&exe, "work");
    let first = insns[0];
    let len = (insns.last().unwrap().0 - first.0 + 1) as usize;
    let file = file_bytes(&exe, first, len);
    let start = first.to_runtime(bias);
    {
        let mut set = BreakpointSet::new(t.memory());
        for a in &insns {
            set.arm(a.to_runtime(bias)).unwrap();
        }
        for a in &insns {
            assert_eq!(set.memory().read_u8(a.to_runtime(bias)).unwrap(), INT3);
        }
        let mut view = vec![0u8; len];
        set.read_original(start, &mut view).unwrap();
        assert_eq!(view, file, "read_original must hide the int3s");
        set.disarm(insns[1].to_runtime(bias)).unwrap();
        assert_eq!(
            set.memory().read_u8(insns[1].to_runtime(bias)).unwrap(),
            file[(insns[1].0 - first.0) as usize]
        );
        set.disarm_all().unwrap();
        let now = t.memory().read_vec(start, len as u64, len).unwrap();
        assert_eq!(now, file, "disarm_all left different bytes");

        // Dropping an armed set restores too.
        set.arm(start).unwrap();
    }
    assert_eq!(t.memory().read_vec(start, len as u64, len).unwrap(), file);

    // The single guard.
    {
        let bp = Breakpoint::arm(t.memory(), start).unwrap();
        assert_eq!(bp.original_byte(), file[0]);
        assert_eq!(t.memory().read_u8(start).unwrap(), INT3);
    }
    assert_eq!(t.memory().read_u8(start).unwrap(), file[0]);

    // The program still runs correctly with no int3 left behind.
    assert_eq!(run_to_exit(&mut t), Stop::Exited { code: 0 });
    assert!(io.stdout().ends_with("total=6 counter=4\n"));
}

#[test]
fn step_over_executes_the_original_instruction() {
    let d = TempDir::new("stepover");
    let exe = compile(&d, "calls", progs::CALLS, Toolchain::Gcc);
    let (mut t, io) = spawn(&exe, &["3"]);
    let pid = t.pid();
    let bias = bias_of(&t, &exe);
    let work = symbol(&exe, "work").to_runtime(bias);
    let mut set = BreakpointSet::new(t.memory());
    set.arm(work).unwrap();
    let mut hits = 0;
    t.cont(pid, None).unwrap();
    loop {
        match t.wait_stop(pid, Duration::from_secs(10)).unwrap() {
            Stop::Int3 => {
                hits += 1;
                let mut regs = t.regs(pid).unwrap();
                assert_eq!(regs.rip(), RuntimeAddr(work.0 + 1));
                regs.set_rip(work);
                t.set_regs(pid, &regs).unwrap();
                let rsp_before = regs.rsp();
                let out = set.step_over(&mut t, pid, Duration::from_secs(5)).unwrap();
                assert_eq!(out.end, StepEnd::Stepped);
                // The first instruction is `push rbp`.
                let after = t.regs(pid).unwrap();
                assert_eq!(after.rsp().0, rsp_before.0 - 8);
                assert_eq!(after.rip(), RuntimeAddr(work.0 + 1));
                assert_eq!(set.memory().read_u8(work).unwrap(), INT3, "re-armed");
                t.cont(pid, None).unwrap();
            }
            Stop::Exited { code } => {
                assert_eq!(code, 0);
                break;
            }
            Stop::Signal { sig, .. } => t.cont(pid, Some(sig)).unwrap(),
            _ => t.cont(pid, None).unwrap(),
        }
    }
    set.forget_all();
    assert_eq!(hits, 3);
    assert!(io.stdout().ends_with("total=3 counter=3\n"));
}

#[test]
fn proc_mem_and_ptrace_words_agree() {
    let d = TempDir::new("memback");
    let exe = compile(&d, "calls", progs::CALLS, Toolchain::Gcc);
    let (mut t, io) = spawn(&exe, &["2"]);
    let pid = t.pid();
    let bias = bias_of(&t, &exe);
    let proc_mem = ProcessMemory::open_proc(pid).unwrap();
    assert!(proc_mem.uses_proc_mem());
    let mut words = ProcessMemory::ptrace_only(pid);
    assert!(!words.uses_proc_mem());

    // Unaligned read of code, across word boundaries.
    let main = symbol(&exe, "main").to_runtime(bias);
    let a = RuntimeAddr(main.0 + 3);
    let via_proc = proc_mem.read_vec(a, 21, 64).unwrap();
    let via_ptrace = words.read_vec(a, 21, 64).unwrap();
    assert_eq!(via_proc, via_ptrace);

    // Write through ptrace (into read-only code and into data), read back
    // through /proc.
    let orig = via_proc.clone();
    words.write(a, &[0x90; 5]).unwrap();
    assert_eq!(proc_mem.read_vec(a, 5, 5).unwrap(), vec![0x90; 5]);
    assert_eq!(
        proc_mem.read_vec(RuntimeAddr(a.0 + 5), 16, 16).unwrap(),
        orig[5..]
    );
    words.write(a, &orig[..5]).unwrap();
    assert_eq!(proc_mem.read_vec(a, 21, 64).unwrap(), orig);

    let total = symbol(&exe, "total").to_runtime(bias);
    words.write_u64(total, 1000).unwrap();
    assert_eq!(proc_mem.read_u64(total).unwrap(), 1000);

    assert_eq!(run_to_exit(&mut t), Stop::Exited { code: 0 });
    // total started at 1000 instead of 0.
    assert!(io.stdout().ends_with("total=1001 counter=2\n"));
}

#[test]
fn killed_target_gives_clear_errors_not_hangs() {
    let d = TempDir::new("dead");
    let exe = compile(&d, "pause", progs::PAUSE, Toolchain::Gcc);
    let (mut t, _io) = spawn(&exe, &[]);
    let pid = t.pid();
    let mem = t.memory();
    t.cont(pid, None).unwrap();

    // Running: no stop to report; a bounded wait says so.
    let e = t.wait_stop(pid, Duration::from_millis(100)).unwrap_err();
    assert!(matches!(e, PtraceError::Timeout { .. }), "{e}");
    let e = t.regs(pid).unwrap_err();
    assert!(matches!(e, PtraceError::NotStopped { .. }), "{e}");

    // Interrupt works on a seized thread blocked in pause().
    t.interrupt(pid).unwrap();
    assert!(matches!(
        t.wait_stop(pid, Duration::from_secs(5)).unwrap(),
        Stop::EventStop { .. }
    ));
    t.regs(pid).unwrap();
    t.cont(pid, None).unwrap();

    signal::kill(pid, Signal::SIGKILL).unwrap();
    assert_eq!(
        t.wait_stop(pid, Duration::from_secs(5)).unwrap(),
        Stop::Killed {
            sig: Sig::KILL,
            core: false
        }
    );
    for e in [
        t.regs(pid).unwrap_err(),
        t.cont(pid, None).unwrap_err(),
        t.wait_stop(pid, Duration::from_secs(5)).unwrap_err(),
    ] {
        assert!(matches!(e, PtraceError::Gone { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&pid.to_string()) && msg.contains("no longer exists"),
            "{msg}"
        );
    }
    let e = mem.read_u64(RuntimeAddr(0x1000)).unwrap_err();
    assert!(e.to_string().contains(&format!("pid {pid}")), "{e}");
}

#[test]
fn thread_killed_while_stopped_reports_gone() {
    let d = TempDir::new("zombie");
    let exe = compile(&d, "pause", progs::PAUSE, Toolchain::Gcc);
    let (t, _io) = spawn(&exe, &[]);
    let pid = t.pid();
    // Stopped at exec; SIGKILL takes it out of the stop and it becomes a
    // zombie that nobody has reaped yet.
    signal::kill(pid, Signal::SIGKILL).unwrap();
    let start = Instant::now();
    let e = loop {
        let e = t.regs(pid).unwrap_err();
        if matches!(e, PtraceError::Gone { .. }) || start.elapsed() > Duration::from_secs(5) {
            break e;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(matches!(e, PtraceError::Gone { .. }), "{e}");
    // kill() reaps it and reports how it ended.
    assert_eq!(
        t.kill(),
        Some(Stop::Killed {
            sig: Sig::KILL,
            core: false
        })
    );
}

#[test]
fn spawn_failure_names_the_program() {
    let e = Tracee::spawn(Command::new("/nonexistent/upstare-prog")).unwrap_err();
    assert!(matches!(e, PtraceError::Spawn { .. }));
    assert!(e.to_string().contains("/nonexistent/upstare-prog"), "{e}");
}

#[test]
fn seize_a_running_program_change_a_global_and_detach() {
    let d = TempDir::new("seize");
    let exe = compile(&d, "spin", progs::SPIN, Toolchain::Gcc);
    let mut child = Command::new(&exe)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    let mut guard = ChildGuard::new(pid, false);
    // Wait (bounded) for "ready": both threads exist by then.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        while let Some(Ok(l)) = lines.next() {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "ready");

    let t = Tracee::seize(pid).unwrap();
    assert!(!t.is_spawned());
    let threads = t.traced();
    assert_eq!(threads.len(), 2, "{threads:?}");
    for &tid in &threads {
        assert_eq!(t.state(tid), Some(ThreadState::Stopped));
        t.regs(tid).unwrap();
    }
    // Find the bias from the maps and set stop_flag.
    let maps = procfs::read_maps(pid).unwrap();
    let exe_path = procfs::exe_path(pid).unwrap();
    let (off, vaddr) = first_load(&exe);
    let bias = procfs::load_bias_from_maps(pid, &maps, &exe_path, FileOffset(off), LinkAddr(vaddr))
        .unwrap();
    let flag = symbol(&exe, "stop_flag").to_runtime(bias);
    let mut mem = t.memory();
    assert_eq!(mem.read_u32(flag).unwrap(), 0);
    mem.write_u32(flag, 1).unwrap();
    let spins = mem
        .read_u64(symbol(&exe, "spins").to_runtime(bias))
        .unwrap();
    assert!(spins < 1 << 40);
    t.detach().unwrap();

    // Detached, the program sees the flag and ends normally.
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "stopped");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            guard.mark_reaped();
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "did not exit");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn dropping_a_seized_tracee_detaches_and_the_program_lives_on() {
    let d = TempDir::new("seizedrop");
    let exe = compile(&d, "spin", progs::SPIN, Toolchain::Gcc);
    // Killed and reaped by pid through the guard below.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(&exe)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    let _guard = ChildGuard::new(pid, false);
    let start = Instant::now();
    while procfs::list_tasks(pid).map(|t| t.len()).unwrap_or(0) < 2 {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(1));
    }
    {
        let mut t = Tracee::seize(pid).unwrap();
        // Leave one thread running when the tracee is dropped.
        let tid = t.traced()[1];
        t.cont(tid, None).unwrap();
    }
    // Not traced any more, still running (not stopped, not dead).
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let tracer = status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(tracer, "0", "{status}");
    let state = status.lines().find(|l| l.starts_with("State:")).unwrap();
    assert!(state.contains('S') || state.contains('R'), "{state}");
    // The guard kills it.
}
