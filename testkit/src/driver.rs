//! [`run_with_breakpoints`]: run a real program under ptrace with `int3`
//! breakpoints at link-time addresses of its executable, call back at every
//! hit, and collect its output and exit status. This is the harness the
//! verification tests stand on (clobber registers at update points, read
//! variables at a line, count calls).
//!
//! How it behaves:
//! - The program is spawned stopped at its exec; the load bias is read from
//!   `AT_ENTRY` in `/proc/PID/auxv` minus the ELF entry, and every address
//!   must fall in executable code of the program, else the run is refused.
//! - Threads (clone) are followed. Whenever a breakpoint is hit every other
//!   thread is stopped first (all-stop), so none can run through the
//!   address while the `int3` is lifted to step over it: hit counts are
//!   exact in multi-threaded programs.
//! - `fork`: the child inherits the `int3`s; the driver puts the original
//!   bytes back in the child's copy and detaches it, so children run
//!   untraced and their hits are not reported. `vfork` (and `posix_spawn`):
//!   the child shares the parent's memory, so it is followed until it execs
//!   (then detached) or exits, and its hits are reported like any other
//!   (`HitContext::pid` tells which process).
//! - An `execve` of the program replaces its image: the breakpoints are gone
//!   and no further hits are reported (`RunReport::exec_replaced_image`).
//! - Signals are delivered as they would be without tracing (job-control
//!   stops excepted: a SIGSTOP'd program is resumed at once).
//! - Bounded: total time (the program is killed and the run fails with
//!   [`DriverError::Timeout`]), reported hits per address and in total
//!   (past the limit the breakpoint is removed and the program runs on),
//!   bytes of output kept.
//! - Nothing is left behind: the program leads its own process group; when
//!   it exits, is killed, or the run fails, the group is killed and every
//!   traced task reaped.
//!
//! ```no_run
//! use std::path::Path;
//! use upstare_dwarf::{LinkAddr, Reg};
//! use upstare_runtime::TargetMemory;
//! use upstare_testkit::{run_with_breakpoints, Exit, HitAction, RunLimits};
//!
//! let work = LinkAddr(0x1149); // from the symbol table or DWARF
//! let counter = LinkAddr(0x4014);
//! let report = run_with_breakpoints(
//!     Path::new("/tmp/calls"),
//!     &["5"],
//!     &[work],
//!     |ctx| {
//!         let seen = ctx.memory().read_u32(ctx.runtime(counter)).unwrap_or(0);
//!         ctx.regs.set(Reg::Rdi, u64::from(seen) + 100); // change the argument
//!         HitAction::Continue
//!     },
//!     RunLimits::default(),
//! )?;
//! assert_eq!(report.exit, Exit::Code(0));
//! assert_eq!(report.hits[&work], 5);
//! # Ok::<(), upstare_testkit::DriverError>(())
//! ```

use nix::sys::signal;
use nix::unistd::Pid;
use object::{Object, ObjectKind};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use upstare_dwarf::{LinkAddr, LoadBias, RuntimeAddr};
use upstare_runtime::memory::{MemError, TargetMemory};
use upstare_runtime::target::breakpoint::{
    release_forked_child, BreakpointError, BreakpointSet, ChildMemory, ChildRelease,
    DeferredSignal, StepEnd,
};
use upstare_runtime::target::procfs::{self, ProcError};
use upstare_runtime::target::ptrace::{PtraceError, Regs, Sig, Stop, Tracee};
use upstare_runtime::target::ProcessMemory;

/// Executables larger than this are refused.
pub const MAX_PROGRAM_SIZE: u64 = 1 << 30;
/// How long the output readers may take to reach end-of-file after the
/// program is gone.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);
/// How long the all-stop waits for interrupted threads before going on
/// without those blocked in the kernel (see `hold_others`).
const HOLD_WAIT: Duration = Duration::from_millis(200);

/// Bounds of one run.
#[derive(Clone, Copy, Debug)]
pub struct RunLimits {
    /// Wall-clock limit for the whole run.
    pub timeout: Duration,
    /// Hits reported per address; then that breakpoint is removed.
    pub max_hits_per_addr: u64,
    /// Hits reported in total; then every breakpoint is removed.
    pub max_total_hits: u64,
    /// Bytes kept of stdout and of stderr (the rest is read and dropped).
    pub max_output: usize,
    /// How long a stepped thread or a new fork child may take to report
    /// its stop (a breakpoint on an instruction that blocks, such as a
    /// `syscall`, fails the run after this long).
    pub stop_timeout: Duration,
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits {
            timeout: Duration::from_secs(60),
            max_hits_per_addr: 100_000,
            max_total_hits: 1_000_000,
            max_output: 16 << 20,
            stop_timeout: Duration::from_secs(5),
        }
    }
}

/// What to do after a hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HitAction {
    /// Step over the breakpoint (unless the callback moved rip) and go on.
    Continue,
    /// Remove this breakpoint for good, then go on.
    Disarm,
    /// Kill the program now; the run ends with [`Exit::Killed`].
    Kill,
}

/// A thread stopped at a breakpoint, as seen by the callback.
pub struct HitContext<'a> {
    /// Process of the thread (the program, or a vfork child of it).
    pub pid: Pid,
    /// The thread that hit.
    pub tid: Pid,
    /// The breakpoint's address as given to [`run_with_breakpoints`].
    pub link_addr: LinkAddr,
    /// Its address in the process.
    pub addr: RuntimeAddr,
    /// Load bias of the executable.
    pub load_bias: LoadBias,
    /// 1-based number of this hit at this address.
    pub hit: u64,
    /// The thread's registers, rip already rewound to `addr`. Changes are
    /// written back before the thread resumes; leave rip at `addr` to
    /// execute the instruction under the breakpoint, or move it to jump.
    pub regs: Regs,
    bps: &'a mut BreakpointSet<ProcessMemory>,
}

impl HitContext<'_> {
    /// The program's memory. Reads see `int3` at armed breakpoints (use
    /// [`HitContext::read_code`] for code).
    pub fn memory(&self) -> &ProcessMemory {
        self.bps.memory()
    }
    /// The program's memory, for writes. Do not write over armed
    /// breakpoints.
    pub fn memory_mut(&mut self) -> &mut ProcessMemory {
        self.bps.memory_mut()
    }
    /// Read memory with the original bytes in place of our `int3`s.
    pub fn read_code(&self, addr: RuntimeAddr, buf: &mut [u8]) -> Result<(), MemError> {
        self.bps.read_original(addr, buf)
    }
    /// Runtime address of a link-time address of the executable.
    pub fn runtime(&self, a: LinkAddr) -> RuntimeAddr {
        a.to_runtime(self.load_bias)
    }
}

/// How the program ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `exit(code)`.
    Code(i32),
    /// Killed by a signal.
    Killed(Sig),
}

/// What a run produced.
pub struct RunReport {
    pub exit: Exit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Output was longer than `max_output` (or still open after the grace
    /// period) and was cut.
    pub output_truncated: bool,
    /// Reported hits per address (every requested address is present).
    pub hits: BTreeMap<LinkAddr, u64>,
    /// Some breakpoint reached a hit limit and was removed.
    pub hit_limit_reached: bool,
    pub load_bias: LoadBias,
    /// Distinct threads of the program seen (the main thread included).
    pub threads_seen: usize,
    /// Forked children cleaned of breakpoints and detached.
    pub forks_detached: usize,
    /// vfork children followed.
    pub vforks_followed: usize,
    /// The callback returned [`HitAction::Kill`].
    pub killed_on_request: bool,
    /// The program exec'd another image, which ran without breakpoints.
    pub exec_replaced_image: bool,
}

impl std::fmt::Debug for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunReport")
            .field("exit", &self.exit)
            .field("stdout", &String::from_utf8_lossy(&self.stdout))
            .field("stderr", &String::from_utf8_lossy(&self.stderr))
            .field("output_truncated", &self.output_truncated)
            .field("hits", &self.hits)
            .field("hit_limit_reached", &self.hit_limit_reached)
            .field("load_bias", &self.load_bias)
            .field("threads_seen", &self.threads_seen)
            .field("forks_detached", &self.forks_detached)
            .field("vforks_followed", &self.vforks_followed)
            .field("killed_on_request", &self.killed_on_request)
            .field("exec_replaced_image", &self.exec_replaced_image)
            .finish()
    }
}

impl RunReport {
    /// stdout as text (lossy).
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// Total reported hits.
    pub fn total_hits(&self) -> u64 {
        self.hits.values().sum()
    }
}

/// Why a run failed. The program is killed in every case.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{program}: cannot read: {source}")]
    Read {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{program}: larger than {MAX_PROGRAM_SIZE} bytes")]
    TooLarge { program: PathBuf },
    #[error("{program}: not an x86-64 ELF executable: {reason}")]
    NotElf { program: PathBuf, reason: String },
    #[error(
        "{program}: breakpoint address {addr} (runtime {runtime}) is not in executable code \
         of the program"
    )]
    BadAddress {
        program: PathBuf,
        addr: LinkAddr,
        runtime: RuntimeAddr,
    },
    #[error("{program}: still running after {limit:?}; killed")]
    Timeout {
        program: PathBuf,
        limit: Duration,
        /// Output captured until then.
        stdout: Vec<u8>,
        stderr: Vec<u8>,
    },
    #[error("{program}: {source}")]
    Ptrace {
        program: PathBuf,
        #[source]
        source: PtraceError,
    },
    #[error("{program}: {source}")]
    Breakpoint {
        program: PathBuf,
        #[source]
        source: BreakpointError,
    },
    #[error("{program}: {source}")]
    Proc {
        program: PathBuf,
        #[source]
        source: ProcError,
    },
    #[error("{program}: {source}")]
    Mem {
        program: PathBuf,
        #[source]
        source: MemError,
    },
}

/// Internal error before the program name is attached.
enum Fail {
    Ptrace(PtraceError),
    Bp(BreakpointError),
    Proc(ProcError),
    Mem(MemError),
}

impl From<PtraceError> for Fail {
    fn from(e: PtraceError) -> Fail {
        Fail::Ptrace(e)
    }
}
impl From<BreakpointError> for Fail {
    fn from(e: BreakpointError) -> Fail {
        Fail::Bp(e)
    }
}
impl From<ProcError> for Fail {
    fn from(e: ProcError) -> Fail {
        Fail::Proc(e)
    }
}
impl From<MemError> for Fail {
    fn from(e: MemError) -> Fail {
        Fail::Mem(e)
    }
}

impl Fail {
    fn with(self, program: &Path) -> DriverError {
        let program = program.to_path_buf();
        match self {
            Fail::Ptrace(source) => DriverError::Ptrace { program, source },
            Fail::Bp(source) => DriverError::Breakpoint { program, source },
            Fail::Proc(source) => DriverError::Proc { program, source },
            Fail::Mem(source) => DriverError::Mem { program, source },
        }
    }
}

/// Output of one stream, filled by a reader thread.
struct Capture {
    data: Arc<Mutex<(Vec<u8>, bool)>>,
    done: mpsc::Receiver<()>,
}

impl Capture {
    fn start(reader: Option<impl Read + Send + 'static>, cap: usize) -> Capture {
        let data = Arc::new(Mutex::new((Vec::new(), false)));
        let (tx, done) = mpsc::channel();
        if let Some(mut r) = reader {
            let d = Arc::clone(&data);
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                loop {
                    match r.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => {
                            let Ok(mut g) = d.lock() else { break };
                            let room = cap.saturating_sub(g.0.len());
                            g.0.extend_from_slice(&chunk[..n.min(room)]);
                            if n > room {
                                g.1 = true;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                let _ = tx.send(());
            });
        } else {
            let _ = tx.send(());
        }
        Capture { data, done }
    }

    /// What was read, and whether it is cut short.
    fn finish(self, grace: Duration) -> (Vec<u8>, bool) {
        let complete = self.done.recv_timeout(grace).is_ok();
        let Ok(mut g) = self.data.lock() else {
            return (Vec::new(), true);
        };
        let truncated = g.1 || !complete;
        (std::mem::take(&mut g.0), truncated)
    }
}

/// Run `program` with `args` under ptrace, with a breakpoint at each
/// link-time address of `addrs` (addresses of the executable, as in its
/// symbols or DWARF), calling `on_hit` at every hit. See the module
/// documentation for threads, forks, signals and limits.
///
/// stdin is `/dev/null`; stdout and stderr are captured; the environment is
/// inherited.
pub fn run_with_breakpoints<S, F>(
    program: &Path,
    args: &[S],
    addrs: &[LinkAddr],
    on_hit: F,
    limits: RunLimits,
) -> Result<RunReport, DriverError>
where
    S: AsRef<OsStr>,
    F: FnMut(&mut HitContext<'_>) -> HitAction,
{
    let start = Instant::now();
    let e_entry = elf_entry(program)?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (tracee, stdio) = Tracee::spawn(cmd).map_err(|e| Fail::from(e).with(program))?;
    let out = Capture::start(stdio.stdout, limits.max_output);
    let err = Capture::start(stdio.stderr, limits.max_output);

    let mut session = Session::new(program, tracee, e_entry, addrs, on_hit, limits)?;
    let deadline = start + limits.timeout;
    let result = session.run(deadline);
    // Whatever happened, nothing of the program survives this point.
    let Session {
        tracee, mut bps, ..
    } = session;
    bps.forget_all();
    drop(bps);
    let final_stop = tracee.kill();
    let (stdout, t1) = out.finish(OUTPUT_GRACE);
    let (stderr, t2) = err.finish(OUTPUT_GRACE);

    match result {
        Ok(mut r) => {
            if r.killed_on_request {
                r.exit = match final_stop {
                    Some(Stop::Exited { code }) => Exit::Code(code),
                    Some(Stop::Killed { sig, .. }) => Exit::Killed(sig),
                    _ => Exit::Killed(Sig::KILL),
                };
            }
            r.stdout = stdout;
            r.stderr = stderr;
            r.output_truncated = t1 || t2;
            Ok(r)
        }
        Err(RunFail::Timeout) => Err(DriverError::Timeout {
            program: program.to_path_buf(),
            limit: limits.timeout,
            stdout,
            stderr,
        }),
        Err(RunFail::Other(f)) => Err(f.with(program)),
    }
}

fn elf_entry(program: &Path) -> Result<LinkAddr, DriverError> {
    let read_err = |source| DriverError::Read {
        program: program.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(program).map_err(read_err)?;
    if meta.len() > MAX_PROGRAM_SIZE {
        return Err(DriverError::TooLarge {
            program: program.to_path_buf(),
        });
    }
    let data = std::fs::read(program).map_err(read_err)?;
    let not_elf = |reason: String| DriverError::NotElf {
        program: program.to_path_buf(),
        reason,
    };
    let file = object::File::parse(&*data).map_err(|e| not_elf(e.to_string()))?;
    if file.format() != object::BinaryFormat::Elf
        || file.architecture() != object::Architecture::X86_64
    {
        return Err(not_elf(format!(
            "{:?} {:?}",
            file.format(),
            file.architecture()
        )));
    }
    if !matches!(file.kind(), ObjectKind::Executable | ObjectKind::Dynamic) {
        return Err(not_elf(format!("object kind {:?}", file.kind())));
    }
    Ok(LinkAddr(file.entry()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Running,
    /// Stopped by the all-stop; resume after the hit.
    Held,
}

#[derive(Debug)]
struct Thread {
    /// Process the thread belongs to.
    tgid: Pid,
    state: St,
    /// A reported stop not yet handled (the thread is stopped).
    pending: Option<Stop>,
    /// Signal to deliver at the next resume.
    deliver: Option<Delivery>,
}

#[derive(Debug, Clone, Copy)]
enum Delivery {
    /// The thread is in this signal's delivery stop: resume with it.
    Sig(Sig),
    /// A signal held back while stepping: restore its siginfo, then deliver.
    Deferred(DeferredSignal),
}

/// Whether a failed request means the thread was killed under us (a
/// SIGKILL takes a thread out of its ptrace-stop).
fn dying(e: &PtraceError) -> bool {
    matches!(e, PtraceError::Gone { .. } | PtraceError::NotStopped { .. })
}

enum RunFail {
    Timeout,
    Other(Fail),
}

impl<T: Into<Fail>> From<T> for RunFail {
    fn from(e: T) -> RunFail {
        RunFail::Other(e.into())
    }
}

struct Session<F> {
    // Field order is drop order: restore breakpoints before the tracee goes.
    bps: BreakpointSet<ProcessMemory>,
    tracee: Tracee,
    on_hit: F,
    limits: RunLimits,
    main: Pid,
    bias: LoadBias,
    link_of: BTreeMap<RuntimeAddr, LinkAddr>,
    threads: BTreeMap<Pid, Thread>,
    seen: BTreeSet<Pid>,
    hits: BTreeMap<LinkAddr, u64>,
    total_hits: u64,
    hit_limit_reached: bool,
    forks_detached: usize,
    vforks_followed: usize,
    exec_replaced_image: bool,
    leader_exit: Option<Exit>,
    killed_on_request: bool,
}

impl<F: FnMut(&mut HitContext<'_>) -> HitAction> Session<F> {
    fn new(
        program: &Path,
        tracee: Tracee,
        e_entry: LinkAddr,
        addrs: &[LinkAddr],
        on_hit: F,
        limits: RunLimits,
    ) -> Result<Session<F>, DriverError> {
        let main = tracee.pid();
        let wrap = |f: Fail| f.with(program);
        let auxv = procfs::read_auxv(main).map_err(|e| wrap(e.into()))?;
        let bias = procfs::load_bias_from_auxv(&auxv, e_entry).map_err(|e| wrap(e.into()))?;
        let exe = procfs::exe_path(main).map_err(|e| wrap(e.into()))?;
        let maps = procfs::read_maps(main).map_err(|e| wrap(e.into()))?;
        let mut link_of = BTreeMap::new();
        for &a in addrs {
            let rt = a.to_runtime(bias);
            let in_code = maps
                .iter()
                .any(|m| m.perms.exec && m.file() == Some(exe.as_path()) && m.contains(rt));
            if !in_code {
                return Err(DriverError::BadAddress {
                    program: program.to_path_buf(),
                    addr: a,
                    runtime: rt,
                });
            }
            link_of.insert(rt, a);
        }
        let mut bps = BreakpointSet::new(tracee.memory());
        for &rt in link_of.keys() {
            bps.arm(rt).map_err(|e| wrap(e.into()))?;
        }
        let mut threads = BTreeMap::new();
        threads.insert(
            main,
            Thread {
                tgid: main,
                state: St::Held,
                pending: None,
                deliver: None,
            },
        );
        Ok(Session {
            bps,
            tracee,
            on_hit,
            limits,
            main,
            bias,
            hits: addrs.iter().map(|&a| (a, 0)).collect(),
            link_of,
            threads,
            seen: [main].into_iter().collect(),
            total_hits: 0,
            hit_limit_reached: false,
            forks_detached: 0,
            vforks_followed: 0,
            exec_replaced_image: false,
            leader_exit: None,
            killed_on_request: false,
        })
    }

    fn run(&mut self, deadline: Instant) -> Result<RunReport, RunFail> {
        self.resume(self.main)?;
        let mut pause = Duration::from_micros(10);
        while self.leader_exit.is_none() {
            if Instant::now() >= deadline {
                return Err(RunFail::Timeout);
            }
            match self.next_stop()? {
                Some((tid, stop)) => {
                    pause = Duration::from_micros(10);
                    if self.handle(tid, stop)? {
                        break;
                    }
                }
                None => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_micros(500));
                }
            }
        }
        Ok(RunReport {
            exit: self.leader_exit.unwrap_or(Exit::Killed(Sig::KILL)),
            stdout: Vec::new(),
            stderr: Vec::new(),
            output_truncated: false,
            hits: std::mem::take(&mut self.hits),
            hit_limit_reached: self.hit_limit_reached,
            load_bias: self.bias,
            threads_seen: self.seen.len(),
            forks_detached: self.forks_detached,
            vforks_followed: self.vforks_followed,
            killed_on_request: self.killed_on_request,
            exec_replaced_image: self.exec_replaced_image,
        })
    }

    /// A stop to handle: a pending one first, else poll running threads.
    fn next_stop(&mut self) -> Result<Option<(Pid, Stop)>, RunFail> {
        if let Some((&tid, _)) = self.threads.iter().find(|(_, t)| t.pending.is_some()) {
            let stop = self.threads.get_mut(&tid).and_then(|t| t.pending.take());
            return Ok(stop.map(|s| (tid, s)));
        }
        let running: Vec<Pid> = self
            .threads
            .iter()
            .filter(|(_, t)| t.state == St::Running)
            .map(|(&tid, _)| tid)
            .collect();
        for tid in running {
            match self.tracee.try_wait(tid) {
                Ok(Some(stop)) => return Ok(Some((tid, stop))),
                Ok(None) => {}
                Err(PtraceError::Gone { .. }) | Err(PtraceError::NotTraced { .. }) => {
                    self.threads.remove(&tid);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    fn tgid(&self, tid: Pid) -> Pid {
        self.threads.get(&tid).map_or(tid, |t| t.tgid)
    }

    fn add_thread(&mut self, tid: Pid, tgid: Pid) {
        if tgid == self.main {
            self.seen.insert(tid);
        }
        self.threads.insert(
            tid,
            Thread {
                tgid,
                state: St::Running,
                pending: None,
                deliver: None,
            },
        );
    }

    /// Resume a stopped thread with its pending delivery. A thread that
    /// died meanwhile is left to be polled for its exit.
    fn resume(&mut self, tid: Pid) -> Result<(), RunFail> {
        let Some(t) = self.threads.get_mut(&tid) else {
            return Ok(());
        };
        t.state = St::Running;
        let delivery = t.deliver.take();
        let r = match delivery {
            None => self.tracee.cont(tid, None),
            Some(Delivery::Sig(s)) => self.tracee.cont(tid, Some(s)),
            Some(Delivery::Deferred(d)) => self
                .tracee
                .set_siginfo(tid, &d.info)
                .and_then(|()| self.tracee.cont(tid, Some(d.sig))),
        };
        match r {
            Ok(()) => Ok(()),
            Err(PtraceError::Gone { .. }) | Err(PtraceError::NotStopped { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Handle one stop; `Ok(true)` ends the run.
    fn handle(&mut self, tid: Pid, stop: Stop) -> Result<bool, RunFail> {
        match stop {
            Stop::Exited { .. } | Stop::Killed { .. } => self.ended(tid, stop),
            Stop::Int3 => return self.on_int3(tid),
            Stop::Signal { sig, .. } => {
                if let Some(t) = self.threads.get_mut(&tid) {
                    t.deliver = Some(Delivery::Sig(sig));
                }
                self.resume(tid)?;
            }
            Stop::Exec { former_tid } => {
                self.on_exec(tid, former_tid)?;
            }
            other => {
                self.on_event(tid, other)?;
                self.resume(tid)?;
            }
        }
        Ok(false)
    }

    fn ended(&mut self, tid: Pid, stop: Stop) {
        self.threads.remove(&tid);
        if tid == self.main {
            self.leader_exit = Some(match stop {
                Stop::Exited { code } => Exit::Code(code),
                Stop::Killed { sig, .. } => Exit::Killed(sig),
                _ => Exit::Killed(Sig::KILL),
            });
        }
    }

    /// Side effects of an event stop (the thread stays stopped).
    fn on_event(&mut self, tid: Pid, stop: Stop) -> Result<(), RunFail> {
        match stop {
            Stop::Clone { new } => {
                let tgid = self.tgid(tid);
                self.add_thread(new, tgid);
            }
            Stop::Vfork { child } => {
                self.vforks_followed += 1;
                self.add_thread(child, child);
            }
            Stop::Fork { child } => self.detach_fork_child(child)?,
            // Interrupt leftovers, group-stops, start of a new thread,
            // unused events: nothing to do.
            _ => {}
        }
        Ok(())
    }

    /// A forked child: copy-on-write memory with our `int3`s in it. Put the
    /// original bytes back and let it go.
    fn detach_fork_child(&mut self, child: Pid) -> Result<(), RunFail> {
        // The one way to let a forked child go (shared with the stopper).
        match release_forked_child(
            &mut self.tracee,
            &self.bps,
            child,
            ChildMemory::Copied,
            self.limits.stop_timeout,
        )? {
            ChildRelease::Detached => self.forks_detached += 1,
            ChildRelease::Ended => {}
        }
        Ok(())
    }

    fn on_exec(&mut self, tid: Pid, former_tid: Pid) -> Result<(), RunFail> {
        let tgid = self.tgid(if self.threads.contains_key(&former_tid) {
            former_tid
        } else {
            tid
        });
        if former_tid != tid {
            self.threads.remove(&former_tid);
        }
        if tgid == self.main || tid == self.main {
            // New image: the int3s went with the old one.
            self.bps.forget_all();
            self.bps.replace_memory(ProcessMemory::open(self.main));
            self.exec_replaced_image = true;
            if !self.threads.contains_key(&tid) {
                self.add_thread(tid, self.main);
            }
            self.resume(tid)
        } else {
            // A vfork child now runs its own image: let it go.
            self.threads.remove(&tid);
            match self.tracee.detach_thread(tid, None) {
                Ok(()) | Err(PtraceError::Gone { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
    }

    /// Stop every running thread but `except` (all-stop). Stops other than
    /// the interrupt's are kept as pending.
    fn hold_others(&mut self, except: Pid) -> Result<(), RunFail> {
        let running: Vec<Pid> = self
            .threads
            .iter()
            .filter(|(&t, th)| t != except && th.state == St::Running)
            .map(|(&t, _)| t)
            .collect();
        let mut asked = BTreeSet::new();
        for tid in running {
            match self.tracee.interrupt(tid) {
                Ok(()) => {
                    asked.insert(tid);
                }
                // Dying: its exit will be polled.
                Err(PtraceError::Gone { .. }) | Err(PtraceError::NotStopped { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // A thread blocked in an uninterruptible or killable wait (a vfork
        // parent, disk I/O) does not stop until the wait ends; but with the
        // interrupt pending it traps before running any user instruction,
        // so it is safe to go on without it and collect its stop later.
        let start = Instant::now();
        let mut pause = Duration::from_micros(10);
        while !asked.is_empty() && start.elapsed() < HOLD_WAIT {
            let mut progressed = false;
            for tid in asked.clone() {
                let stop = match self.tracee.try_wait(tid) {
                    Ok(Some(s)) => s,
                    Ok(None) => continue,
                    Err(PtraceError::Gone { .. }) | Err(PtraceError::NotTraced { .. }) => {
                        asked.remove(&tid);
                        self.threads.remove(&tid);
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                progressed = true;
                asked.remove(&tid);
                match stop {
                    Stop::EventStop { .. } => {
                        if let Some(t) = self.threads.get_mut(&tid) {
                            t.state = St::Held;
                        }
                    }
                    s if s.is_terminal() => self.ended(tid, s),
                    s => {
                        if let Some(t) = self.threads.get_mut(&tid) {
                            t.state = St::Held;
                            t.pending = Some(s);
                        }
                    }
                }
            }
            if !progressed {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_micros(500));
            }
        }
        Ok(())
    }

    /// Resume threads held by [`hold_others`] that have nothing pending.
    fn release_others(&mut self) -> Result<(), RunFail> {
        let held: Vec<Pid> = self
            .threads
            .iter()
            .filter(|(_, t)| t.state == St::Held && t.pending.is_none())
            .map(|(&t, _)| t)
            .collect();
        for tid in held {
            self.resume(tid)?;
        }
        Ok(())
    }

    fn on_int3(&mut self, tid: Pid) -> Result<bool, RunFail> {
        let mut regs = match self.tracee.regs(tid) {
            Ok(r) => r,
            Err(e) if dying(&e) => return self.thread_died(tid),
            Err(e) => return Err(e.into()),
        };
        let Some(addr) = regs.rip().checked_offset(-1) else {
            return self.deliver_trap(tid);
        };
        if !self.bps.is_armed(addr) {
            if self.bps.was_armed(addr) {
                // Trapped just before the breakpoint was removed: execute
                // the original instruction.
                regs.set_rip(addr);
                match self.tracee.set_regs(tid, &regs) {
                    Ok(()) => self.resume(tid)?,
                    Err(e) if dying(&e) => return self.thread_died(tid),
                    Err(e) => return Err(e.into()),
                }
                return Ok(false);
            }
            // The program's own int3.
            return self.deliver_trap(tid);
        }
        regs.set_rip(addr);
        if let Some(t) = self.threads.get_mut(&tid) {
            t.state = St::Held;
        }
        self.hold_others(tid)?;

        let link = self
            .link_of
            .get(&addr)
            .copied()
            .unwrap_or(addr.to_link(self.bias));
        let count = self.hits.entry(link).or_insert(0);
        *count += 1;
        let hit = *count;
        self.total_hits += 1;
        let mut ctx = HitContext {
            pid: self.tgid(tid),
            tid,
            link_addr: link,
            addr,
            load_bias: self.bias,
            hit,
            regs,
            bps: &mut self.bps,
        };
        let action = (self.on_hit)(&mut ctx);
        let regs = ctx.regs;
        match self.tracee.set_regs(tid, &regs) {
            Ok(()) => {}
            // Killed meanwhile (perhaps by the callback): collect its end.
            Err(e) if dying(&e) => return self.thread_died(tid),
            Err(e) => return Err(e.into()),
        }

        if action == HitAction::Kill {
            self.killed_on_request = true;
            return Ok(true);
        }
        if action == HitAction::Disarm || hit >= self.limits.max_hits_per_addr {
            self.hit_limit_reached |= action != HitAction::Disarm;
            self.bps.disarm(addr)?;
        }
        if self.total_hits >= self.limits.max_total_hits {
            self.hit_limit_reached = true;
            self.bps.disarm_all()?;
        }
        if self.bps.is_armed(addr) && regs.rip() == addr {
            let outcome = match self
                .bps
                .step_over(&mut self.tracee, tid, self.limits.stop_timeout)
            {
                Ok(o) => o,
                Err(BreakpointError::Ptrace { source, .. }) if dying(&source) => {
                    return self.thread_died(tid)
                }
                Err(e) => return Err(e.into()),
            };
            for ev in outcome.events {
                self.on_event(tid, ev)?;
            }
            match outcome.end {
                StepEnd::Stepped => {
                    let mut deferred = outcome.deferred.into_iter();
                    if let Some(t) = self.threads.get_mut(&tid) {
                        t.deliver = deferred.next().map(Delivery::Deferred);
                    }
                    // More than one signal in a single step: requeue the
                    // rest (their siginfo is lost; this is rare).
                    for d in deferred {
                        if let Some(s) = d.sig.to_nix() {
                            let _ = signal::kill(tid, s);
                        }
                    }
                }
                StepEnd::Signal(sig) => {
                    if let Some(t) = self.threads.get_mut(&tid) {
                        t.deliver = Some(Delivery::Sig(sig));
                    }
                }
                StepEnd::Ended(stop) => {
                    self.ended(tid, stop);
                }
                StepEnd::Exec(Stop::Exec { former_tid }) => {
                    self.release_others()?;
                    self.on_exec(tid, former_tid)?;
                    return Ok(false);
                }
                StepEnd::Exec(_) => {}
            }
        }
        self.resume(tid)?;
        self.release_others()?;
        Ok(false)
    }

    /// `tid` was killed while we held it: poll it for its end and let the
    /// others go.
    fn thread_died(&mut self, tid: Pid) -> Result<bool, RunFail> {
        if let Some(t) = self.threads.get_mut(&tid) {
            t.state = St::Running;
        }
        self.release_others()?;
        Ok(false)
    }

    fn deliver_trap(&mut self, tid: Pid) -> Result<bool, RunFail> {
        if let Some(t) = self.threads.get_mut(&tid) {
            t.deliver = Some(Delivery::Sig(Sig::TRAP));
        }
        self.resume(tid)?;
        Ok(false)
    }
}

impl TargetMemory for HitContext<'_> {
    fn read(&self, addr: RuntimeAddr, buf: &mut [u8]) -> Result<(), MemError> {
        self.bps.memory().read(addr, buf)
    }
    fn write(&mut self, addr: RuntimeAddr, data: &[u8]) -> Result<(), MemError> {
        self.bps.memory_mut().write(addr, data)
    }
}
