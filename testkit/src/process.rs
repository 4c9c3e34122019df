//! Running corpus programs: a child-process guard that never leaks or hangs.
//!
//! Every child is started in its own process group (pgid = its pid), so the
//! guard can kill the child *and* whatever it forked with one `killpg`, by id.
//! The group is killed while the child is still unreaped (alive or a zombie),
//! so its pid cannot have been reused by then.
//!
//! Exit detection uses `waitid(WEXITED | WNOHANG | WNOWAIT)`: it never consumes
//! a ptrace stop, so a test may trace the child (from any thread of the test
//! process) while this guard owns it. Only a real exit is then reaped.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How long the guard waits for a killed child to become reapable, and for
/// the output pipes to close after the child is gone.
const KILL_GRACE: Duration = Duration::from_secs(3);

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Normal exit with this status code.
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
    /// Someone else (for example a ptrace tracer in the test) reaped it first.
    Unknown,
}

impl ExitStatus {
    /// The exit code, if the process exited normally.
    pub fn code(self) -> Option<i32> {
        match self {
            ExitStatus::Code(c) => Some(c),
            _ => None,
        }
    }

    /// The terminating signal, if a signal killed the process.
    pub fn signal(self) -> Option<i32> {
        match self {
            ExitStatus::Signal(s) => Some(s),
            _ => None,
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
            ExitStatus::Unknown => write!(f, "reaped by someone else (status unknown)"),
        }
    }
}

/// Everything a finished process left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Standard output, decoded lossily as UTF-8.
    pub stdout: String,
    /// Standard error, decoded lossily as UTF-8.
    pub stderr: String,
    /// How it ended.
    pub status: ExitStatus,
}

/// Errors from starting, talking to or waiting for a child process.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The program could not be started.
    #[error("cannot start {path}: {source}")]
    Spawn {
        /// Program that failed to start.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The process did not finish in time; it was killed.
    #[error("{path} (pid {pid}) still running after {timeout:?}; killed it. stdout so far: {stdout:?}, stderr: {stderr:?}")]
    Timeout {
        /// Program that ran too long.
        path: PathBuf,
        /// Its pid.
        pid: u32,
        /// The limit it exceeded.
        timeout: Duration,
        /// Output captured before it was killed.
        stdout: String,
        /// Error output captured before it was killed.
        stderr: String,
    },
    /// No line of standard output matched within the time limit.
    #[error("{path} (pid {pid}): no stdout line {what} within {timeout:?}{}; stdout: {stdout:?}, stderr: {stderr:?}",
        if *.exited { " (the process exited)" } else { "" })]
    NoMatch {
        /// Program being watched.
        path: PathBuf,
        /// Its pid.
        pid: u32,
        /// Description of the awaited line.
        what: String,
        /// The limit.
        timeout: Duration,
        /// Whether the output ended (process gone) before the limit.
        exited: bool,
        /// Output captured so far.
        stdout: String,
        /// Error output captured so far.
        stderr: String,
    },
    /// Writing to the child's standard input failed.
    #[error("{path} (pid {pid}): cannot write to stdin: {source}")]
    Stdin {
        /// Program being fed.
        path: PathBuf,
        /// Its pid.
        pid: u32,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `waitid`/`waitpid` failed unexpectedly.
    #[error("{path} (pid {pid}): wait failed: {errno}")]
    Wait {
        /// Program being waited for.
        path: PathBuf,
        /// Its pid.
        pid: u32,
        /// The error number.
        errno: Errno,
    },
}

/// A growing capture of one output pipe, filled by a reader thread.
#[derive(Default)]
struct Capture {
    state: Mutex<CaptureState>,
    changed: Condvar,
}

#[derive(Default)]
struct CaptureState {
    bytes: Vec<u8>,
    closed: bool,
}

impl Capture {
    fn lock(&self) -> MutexGuard<'_, CaptureState> {
        // A reader thread cannot panic while holding the lock, but stay usable if one did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock().bytes).into_owned()
    }

    fn spawn_reader(self: &Arc<Self>, mut pipe: impl Read + Send + 'static) -> JoinHandle<()> {
        let cap = Arc::clone(self);
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        cap.lock().bytes.extend_from_slice(&buf[..n]);
                        cap.changed.notify_all();
                    }
                }
            }
            cap.lock().closed = true;
            cap.changed.notify_all();
        })
    }

    /// Waits until the pipe is closed or the deadline passes; true if closed.
    fn wait_closed(&self, deadline: Instant) -> bool {
        let mut st = self.lock();
        while !st.closed {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

/// Owns a running child process (and its process group): kills it by pid on
/// drop or timeout, and captures its stdout/stderr in the background.
pub struct ChildGuard {
    path: PathBuf,
    pid: Pid,
    stdin: Option<ChildStdin>,
    stdout: Arc<Capture>,
    stderr: Arc<Capture>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl std::fmt::Debug for ChildGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildGuard")
            .field("path", &self.path)
            .field("pid", &self.pid)
            .field("status", &self.status)
            .finish()
    }
}

impl ChildGuard {
    /// Starts `cmd` with piped stdin/stdout/stderr in a new process group.
    /// Any stdio settings already on `cmd` are replaced.
    pub fn spawn(mut cmd: Command) -> Result<ChildGuard, RunError> {
        use std::os::unix::process::CommandExt;
        let path = PathBuf::from(cmd.get_program());
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().map_err(|source| RunError::Spawn {
            path: path.clone(),
            source,
        })?;
        let raw_pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        let stdout = Arc::new(Capture::default());
        let stderr = Arc::new(Capture::default());
        let mut readers = Vec::with_capacity(2);
        if let Some(out) = child.stdout.take() {
            readers.push(stdout.spawn_reader(out));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(stderr.spawn_reader(err));
        }
        // From here on this guard reaps the child; dropping std's handle neither
        // kills nor waits.
        Ok(ChildGuard {
            path,
            pid: Pid::from_raw(raw_pid),
            stdin: child.stdin.take(),
            stdout,
            stderr,
            readers,
            status: None,
        })
    }

    /// The child's process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    /// The program this guard started.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `data` to the child's standard input and flushes it.
    pub fn send_stdin(&mut self, data: &[u8]) -> Result<(), RunError> {
        let result = match self.stdin.as_mut() {
            Some(pipe) => pipe.write_all(data).and_then(|()| pipe.flush()),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "stdin already closed",
            )),
        };
        result.map_err(|source| RunError::Stdin {
            path: self.path.clone(),
            pid: self.pid(),
            source,
        })
    }

    /// Closes the child's standard input (it reads end-of-file).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Standard output captured so far.
    pub fn stdout_so_far(&self) -> String {
        self.stdout.text()
    }

    /// Standard error captured so far.
    pub fn stderr_so_far(&self) -> String {
        self.stderr.text()
    }

    /// Waits until a complete stdout line satisfies `pred` and returns it
    /// (without the newline). Lines are scanned from the start of the output,
    /// so the first matching line wins. Fails when the limit passes or stdout
    /// closes first.
    pub fn wait_for_line(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, RunError> {
        let deadline = Instant::now() + timeout;
        let mut scanned = 0usize; // bytes already split into complete lines
        let mut st = self.stdout.lock();
        loop {
            while let Some(nl) = st.bytes[scanned..].iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&st.bytes[scanned..scanned + nl]).into_owned();
                scanned += nl + 1;
                if pred(&line) {
                    return Ok(line);
                }
            }
            let now = Instant::now();
            if st.closed || now >= deadline {
                let exited = st.closed;
                let stdout = String::from_utf8_lossy(&st.bytes).into_owned();
                drop(st);
                return Err(RunError::NoMatch {
                    path: self.path.clone(),
                    pid: self.pid(),
                    what: what.to_string(),
                    timeout,
                    exited,
                    stdout,
                    stderr: self.stderr.text(),
                });
            }
            st = self
                .stdout
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Checks without blocking whether the child has exited; reaps it if so.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>, RunError> {
        if self.status.is_some() {
            return Ok(self.status);
        }
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(self.pid), flags) {
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(Errno::EINVAL) => {
                // Terminated (EINVAL: a status nix cannot decode). Kill stragglers
                // in its group while the pid is still held by the zombie, then reap.
                let _ = killpg(self.pid, Signal::SIGKILL);
                Ok(Some(self.reap()))
            }
            Ok(_) => Ok(None), // alive, or a ptrace/job-control stop: not ours to consume
            Err(Errno::ECHILD) => {
                self.status = Some(ExitStatus::Unknown);
                Ok(self.status)
            }
            Err(Errno::EINTR) => Ok(None),
            Err(errno) => Err(RunError::Wait {
                path: self.path.clone(),
                pid: self.pid(),
                errno,
            }),
        }
    }

    /// Reaps a child known to have terminated.
    fn reap(&mut self) -> ExitStatus {
        let status = match waitpid(self.pid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(_, code)) => ExitStatus::Code(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => ExitStatus::Signal(sig as i32),
            _ => ExitStatus::Unknown,
        };
        self.status = Some(status);
        status
    }

    /// Waits for the child to exit, at most `timeout`; on timeout kills it and
    /// returns [`RunError::Timeout`] with the output captured so far.
    pub fn wait(&mut self, timeout: Duration) -> Result<Output, RunError> {
        let deadline = Instant::now() + timeout;
        let mut nap = Duration::from_millis(1);
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(self.collect(status, deadline.max(Instant::now() + KILL_GRACE)));
            }
            if Instant::now() >= deadline {
                let out = self.kill();
                return Err(RunError::Timeout {
                    path: self.path.clone(),
                    pid: self.pid(),
                    timeout,
                    stdout: out.stdout,
                    stderr: out.stderr,
                });
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(20));
        }
    }

    /// Kills the child's process group now (SIGKILL), reaps the child and
    /// returns what it printed. Idempotent.
    pub fn kill(&mut self) -> Output {
        let deadline = Instant::now() + KILL_GRACE;
        if self.status.is_none() {
            // The child is not reaped yet, so this pid/pgid still belongs to it.
            // Kill the pid too, in case the child left its process group.
            let _ = killpg(self.pid, Signal::SIGKILL);
            let _ = kill(self.pid, Signal::SIGKILL);
            let mut nap = Duration::from_millis(1);
            while Instant::now() < deadline {
                match self.try_status() {
                    Ok(Some(_)) => break,
                    Ok(None) => {}
                    Err(_) => {
                        self.status = Some(ExitStatus::Unknown);
                        break;
                    }
                }
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(20));
            }
        }
        let status = self.status.unwrap_or(ExitStatus::Unknown);
        self.collect(status, deadline)
    }

    /// Closes stdin, waits (bounded) for the output pipes to close and returns
    /// the captured output.
    fn collect(&mut self, status: ExitStatus, deadline: Instant) -> Output {
        self.stdin = None;
        let closed = self.stdout.wait_closed(deadline) & self.stderr.wait_closed(deadline);
        if closed {
            for r in self.readers.drain(..) {
                let _ = r.join();
            }
        }
        // Otherwise some process outside the group still holds a pipe: leave the
        // reader threads detached rather than hang.
        Output {
            stdout: self.stdout.text(),
            stderr: self.stderr.text(),
            status,
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill();
        }
    }
}

/// Starts `path` with `args` (stdin, stdout and stderr piped).
pub fn spawn<S: AsRef<std::ffi::OsStr>>(path: &Path, args: &[S]) -> Result<ChildGuard, RunError> {
    let mut cmd = Command::new(path);
    cmd.args(args);
    ChildGuard::spawn(cmd)
}

/// Runs `path` with `args` and empty stdin to completion, at most `timeout`
/// (then it is killed and [`RunError::Timeout`] returned).
pub fn run<S: AsRef<std::ffi::OsStr>>(
    path: &Path,
    args: &[S],
    timeout: Duration,
) -> Result<Output, RunError> {
    let mut child = spawn(path, args)?;
    child.close_stdin();
    child.wait(timeout)
}

/// Runs a prepared command to completion with empty stdin, at most `timeout`.
pub fn run_command(cmd: Command, timeout: Duration) -> Result<Output, RunError> {
    let mut child = ChildGuard::spawn(cmd)?;
    child.close_stdin();
    child.wait(timeout)
}
