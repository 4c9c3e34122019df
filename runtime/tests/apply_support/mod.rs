//! Helpers for the live-update tests: instrumented corpus builds, fresh
//! copies of a binary to update to, a traced program whose output is
//! collected after it is let go, and guards that kill what they start.
#![allow(dead_code)]

pub mod bank;
pub mod lines;
pub mod real;
pub mod servers;
pub mod ticks;

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use upstare_corpus::Program;
use upstare_dwarf::LinkAddr;
use upstare_runtime::target::procfs::MapPath;
use upstare_runtime::update::{apply_traced, ApplyOptions, UpdateError, UpdateReport};
use upstare_runtime::Tracee;
pub use upstare_testkit::{
    compile_instrumented, instrument_to_with, write_exe, PointsMode, TempDir,
};
use upstare_testkit::{ExitStatus, Output, Toolchain};

/// The corpus program built with `tc` and instrumented (cached next to the
/// corpus build cache).
pub fn instrumented(p: &Program, tc: Toolchain) -> PathBuf {
    instrumented_as(p, tc, PointsMode::Int3)
}

/// [`instrumented`] with update points armed as `mode` says (inline:
/// `upstare-rewrite --inline-points`, cached as `NAME.inline.up`).
pub fn instrumented_as(p: &Program, tc: Toolchain, mode: PointsMode) -> PathBuf {
    let exe = upstare_corpus::build(p, tc).unwrap_or_else(|e| panic!("build {}: {e}", p.name));
    // Names contain dots (`loop_body.v1`): `.up` is appended to the whole
    // name, never put in place of an "extension".
    let suffix = match mode {
        PointsMode::Int3 => "up",
        PointsMode::Inline => "inline.up",
    };
    instrument_to_with(
        &exe,
        &exe.with_file_name(format!("{}.{suffix}", p.name)),
        mode,
    )
}

/// Updates process `pid` to `new` with a `timeout` to get ready (other
/// options default), panicking with the refusal.
pub fn apply_within(pid: u32, new: &Path, timeout: Duration) -> UpdateReport {
    let opts = ApplyOptions {
        timeout,
        ..ApplyOptions::default()
    };
    upstare_runtime::update::apply(pid as i32, new, &opts)
        .unwrap_or_else(|e| panic!("update failed: {e}"))
}

/// Compiles C text with `tc` into `dir/name` and instruments it.
pub fn build_c(dir: &TempDir, name: &str, src: &str, tc: Toolchain) -> PathBuf {
    compile_instrumented(dir.path(), name, src, tc, &[])
}

/// C source `src` for version `version`: `VERSION` defined as that string
/// (one text for both versions of a generated pair).
pub fn with_version(src: &str, version: &str) -> String {
    format!("#define VERSION \"{version}\"\n{src}")
}

/// A fresh copy of `up` (a different file, same bytes) in `dir`.
pub fn fresh_copy(up: &Path, dir: &TempDir, tag: &str) -> PathBuf {
    let name = up.file_name().map(|n| n.to_string_lossy().into_owned());
    let out = dir
        .path()
        .join(format!("{}.{tag}", name.unwrap_or_default()));
    let bytes = std::fs::read(up).expect("read instrumented binary");
    write_exe(&out, &bytes, 0o755);
    out
}

/// Every update point of an instrumented binary (link-time addresses).
pub fn update_points(up: &Path) -> Vec<LinkAddr> {
    let bytes = std::fs::read(up).expect("read instrumented binary");
    let t = upstare_dwarf::read_tables(&bytes).expect("tables");
    t.functions
        .iter()
        .flat_map(|f| f.update_points.iter().map(|p| p.addr))
        .collect()
}

/// Update-point hits of a run of `up` (under ptrace with every point
/// armed), counted up to `cap`; `true` if the run had more.
pub fn count_hits(up: &Path, args: &[&str], cap: Option<u64>) -> (u64, bool) {
    let points = update_points(up);
    let limits = upstare_testkit::RunLimits {
        timeout: Duration::from_secs(120),
        max_hits_per_addr: u64::MAX,
        max_total_hits: cap.unwrap_or(u64::MAX),
        ..Default::default()
    };
    let r = upstare_testkit::run_with_breakpoints(
        up,
        args,
        &points,
        |_| upstare_testkit::HitAction::Continue,
        limits,
    )
    .unwrap_or_else(|e| panic!("count hits of {}: {e}", up.display()));
    (r.total_hits(), r.hit_limit_reached)
}

/// Seizes process `pid` for the test itself and lets every thread run on:
/// while it is held, no other tracer (`upstare-apply`) can seize it, so a
/// refusal that names its reason was made before any ptrace call.
pub fn hold_traced(pid: u32) -> Tracee {
    let pid = i32::try_from(pid).expect("pid");
    let mut holder = Tracee::seize(Pid::from_raw(pid)).expect("seize");
    for tid in holder.traced() {
        let sig = holder.take_pending_signal(tid);
        holder.cont(tid, sig).expect("cont");
    }
    holder
}

/// An uninterrupted, untraced run.
pub fn baseline(up: &Path, args: &[&str]) -> Output {
    upstare_testkit::run(up, args, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("run {}: {e}", up.display()))
}

/// Kills a child process (and its group) by pid unless it was reaped.
pub struct KillGuard {
    pid: Pid,
    reaped: bool,
}

impl KillGuard {
    pub fn new(pid: Pid) -> KillGuard {
        KillGuard { pid, reaped: false }
    }

    /// Waits (bounded) for the child to exit; kills it after `timeout`.
    /// `ExitStatus::Unknown` if someone else (the tracer) reaped it.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let start = Instant::now();
        let mut nap = Duration::from_micros(200);
        loop {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, c)) => {
                    self.reaped = true;
                    return Ok(ExitStatus::Code(c));
                }
                Ok(WaitStatus::Signaled(_, s, _)) => {
                    self.reaped = true;
                    return Ok(ExitStatus::Signal(s as i32));
                }
                Ok(_) => {}
                Err(nix::errno::Errno::ECHILD) => {
                    self.reaped = true;
                    return Ok(ExitStatus::Unknown);
                }
                Err(e) => return Err(format!("waitpid {}: {e}", self.pid)),
            }
            if start.elapsed() >= timeout {
                self.kill();
                return Err(format!("pid {} still running after {timeout:?}", self.pid));
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(5));
        }
    }

    pub fn kill(&mut self) {
        if self.reaped {
            return;
        }
        // Unreaped: the pid (and group id) still belong to our child.
        let _ = killpg(self.pid, Signal::SIGKILL);
        let _ = kill(self.pid, Signal::SIGKILL);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_) => break,
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        self.reaped = true;
    }
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads a pipe to its end in the background.
fn reader(mut pipe: impl Read + Send + 'static) -> Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = pipe.read_to_end(&mut v);
        let _ = tx.send(v);
    });
    rx
}

/// A program started under ptrace (stopped at its exec), its output
/// collected in the background.
pub struct TracedRun {
    pub tracee: Option<Tracee>,
    guard: KillGuard,
    out: Option<Receiver<Vec<u8>>>,
    err: Option<Receiver<Vec<u8>>>,
}

impl TracedRun {
    /// Spawns `exe args` traced, stdin empty, stdout/stderr captured.
    pub fn spawn(exe: &Path, args: &[&str]) -> TracedRun {
        Self::spawn_env(exe, args, &[])
    }

    /// [`TracedRun::spawn`] with `env` added to the environment.
    pub fn spawn_env(exe: &Path, args: &[&str], env: &[(&str, &str)]) -> TracedRun {
        let mut cmd = Command::new(exe);
        cmd.envs(env.iter().copied());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (tracee, stdio) =
            Tracee::spawn(cmd).unwrap_or_else(|e| panic!("spawn {}: {e}", exe.display()));
        let guard = KillGuard::new(tracee.pid());
        TracedRun {
            tracee: Some(tracee),
            guard,
            out: stdio.stdout.map(reader),
            err: stdio.stderr.map(reader),
        }
    }

    pub fn pid(&self) -> Pid {
        self.guard.pid
    }

    /// Updates the traced program to `new`.
    pub fn apply(&mut self, new: &Path, opts: &ApplyOptions) -> Result<UpdateReport, UpdateError> {
        let t = self.tracee.as_mut().expect("still traced");
        apply_traced(t, new, opts)
    }

    /// Lets the program go (detach) and waits, bounded, for its exit and
    /// output. The status is `Unknown` when the tracer already reaped it
    /// (it ended while being stopped).
    pub fn finish(mut self, timeout: Duration) -> Result<Output, String> {
        if let Some(t) = self.tracee.take() {
            let gone = t.state(self.guard.pid).is_none();
            let detached = t.detach();
            if !gone {
                detached.map_err(|e| format!("detach: {e}"))?;
            }
        }
        let status = self.guard.wait(timeout)?;
        // Bounded: a leftover process of the group could hold a pipe open.
        let text = |h: Option<Receiver<Vec<u8>>>| {
            h.and_then(|h| h.recv_timeout(Duration::from_secs(5)).ok())
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_else(|| "<output pipe not closed>".into())
        };
        Ok(Output {
            stdout: text(self.out.take()),
            stderr: text(self.err.take()),
            status,
        })
    }
}

impl Drop for TracedRun {
    fn drop(&mut self) {
        // A spawned tracee kills its program on drop; the guard makes sure
        // of a detached one.
        drop(self.tracee.take());
        self.guard.kill();
    }
}

/// (all, executable) mappings of `pid` whose file is `path`.
pub fn mappings_of(pid: Pid, path: &Path) -> (usize, usize) {
    let maps = upstare_runtime::target::procfs::read_maps(pid).expect("maps");
    let of: Vec<_> = maps
        .iter()
        .filter(|m| matches!(&m.path, MapPath::File(p) if p == path))
        .collect();
    (of.len(), of.iter().filter(|m| m.perms.exec).count())
}

/// `/proc/PID/maps` as text, for assertion messages.
pub fn maps_text(pid: Pid) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()
}

/// Audits a process just updated (still stopped) from outside: every live
/// value still pointing into the retired image. Returns the stale ones
/// (`value at location (what)`) and the counted exceptions (COPY, read-only).
pub fn audit_after(run: &TracedRun, report: &UpdateReport) -> (Vec<String>, (usize, usize, usize)) {
    use upstare_runtime::engine::state::Image;
    use upstare_runtime::engine::sweep::audit;
    let t = run.tracee.as_ref().expect("traced");
    let r = &report.sweep.retired;
    let bytes = std::fs::read(&report.from).expect("read OLD");
    let tables = upstare_dwarf::read_tables(&bytes).expect("OLD's tables");
    let old = Image {
        path: report.from.clone(),
        bias: upstare_dwarf::LoadBias(r.bias),
        tables,
        text: upstare_dwarf::RuntimeAddr(r.text.start)..upstare_dwarf::RuntimeAddr(r.text.end),
        span: upstare_dwarf::RuntimeAddr(r.span.start)..upstare_dwarf::RuntimeAddr(r.span.end),
    };
    let maps = upstare_runtime::target::procfs::read_maps(run.pid()).expect("maps");
    let rsps: Vec<u64> = t
        .traced()
        .into_iter()
        .filter_map(|tid| t.regs(tid).ok())
        .map(|regs| regs.rsp().0)
        .collect();
    // With the pointer guard, a jmp_buf's mangled return address is seen.
    let guard = t
        .traced()
        .into_iter()
        .find_map(|tid| t.regs(tid).ok())
        .and_then(|regs| {
            upstare_runtime::engine::sweep::pointer_guard(&t.memory(), regs.0.fs_base)
        });
    assert!(guard.is_some(), "no pointer guard read");
    let found = audit(&t.memory(), &maps, &rsps, &old, r, guard);
    assert_eq!(found.bytes_not_scanned, 0, "the audit was capped");
    let stale = found
        .stale()
        .map(|h| format!("{:#x} at {} ({:?})", h.value, h.location, h.class))
        .collect();
    (stale, found.exceptions())
}

/// Sends `input` to `child` and waits (up to `wait`) until each line of
/// `want` has appeared once more in its output than before; fails naming
/// `what` when it does not, or when the child ends first.
pub fn send_and_expect(
    child: &mut upstare_testkit::ChildGuard,
    input: &[u8],
    want: &[&str],
    wait: Duration,
    what: &str,
) {
    let count = |out: &str, w: &str| out.lines().filter(|l| *l == w).count();
    let out = child.stdout_so_far();
    let before: Vec<usize> = want.iter().map(|w| count(&out, w)).collect();
    child.send_stdin(input).expect("send");
    let deadline = Instant::now() + wait;
    loop {
        let out = child.stdout_so_far();
        if want.iter().zip(&before).all(|(w, n)| count(&out, w) > *n) {
            return;
        }
        let status = child.try_status().ok().flatten();
        assert!(
            Instant::now() < deadline && status.is_none(),
            "{what}: no {want:?} (ended: {status:?}): {out}{}",
            child.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
