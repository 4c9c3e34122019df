//! Process control with ptrace: spawning or seizing a target, per-thread
//! registers, resuming, bounded waiting, and guards that never leave a
//! process behind.
//!
//! This is the crate's only module with `unsafe`: the `pre_exec` hook of a
//! spawn, raw `waitpid`, and the ptrace requests that take a plain signal
//! number (issued raw so that real-time signals can be passed on, which the
//! typed `nix` API cannot express).
//!
//! Every tracee is attached with `PTRACE_SEIZE` (a spawned program is first
//! caught at its exec with `PTRACE_TRACEME`, then handed over to a seize), so
//! `PTRACE_INTERRUPT` works on every thread and new threads and processes
//! start with a `PTRACE_EVENT_STOP`.
//!
//! Linux ties a tracee to the *thread* that attached it: every request and
//! every wait must come from that thread. [`Tracee`] is therefore neither
//! `Send` nor `Sync`.

#![allow(unsafe_code)]

use crate::target::procfs::{self, ProcError};
use crate::target::ProcessMemory;
use nix::errno::Errno;
use nix::libc::{self, c_int, c_void};
use nix::sys::ptrace::{self, Options};
use nix::sys::signal::{self, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command};
use std::time::{Duration, Instant};
use upstare_dwarf::{Reg, RuntimeAddr};

/// How long [`ChildGuard`] and [`Tracee`] cleanup wait for a killed process
/// to be reaped before giving up.
pub const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Tracee::spawn`] waits for each step of the hand-over at exec.
pub const SPAWN_TIMEOUT: Duration = Duration::from_secs(10);

/// A signal number. Real-time signals have no `nix::Signal` variant, so
/// stops and resumes carry the raw number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sig(pub i32);

impl Sig {
    pub const TRAP: Sig = Sig(libc::SIGTRAP);
    pub const STOP: Sig = Sig(libc::SIGSTOP);
    pub const KILL: Sig = Sig(libc::SIGKILL);
    pub const SEGV: Sig = Sig(libc::SIGSEGV);

    /// The `nix` signal, if this is a standard one.
    pub fn to_nix(self) -> Option<Signal> {
        Signal::try_from(self.0).ok()
    }
}

impl fmt::Display for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_nix() {
            Some(s) => f.write_str(s.as_str()),
            None => write!(f, "signal {}", self.0),
        }
    }
}

impl fmt::Debug for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sig({self})")
    }
}

impl From<Signal> for Sig {
    fn from(s: Signal) -> Sig {
        Sig(s as i32)
    }
}

/// `si_code` of a SIGTRAP raised by executing `int3` (x86-64).
pub const SI_KERNEL: i32 = 0x80;
/// `si_code` of a SIGTRAP after a single step.
pub const TRAP_TRACE: i32 = 2;

/// Why a thread stopped (or ended), as reported by `waitpid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGTRAP from an `int3` instruction; rip is one past it.
    Int3,
    /// SIGTRAP after a single step.
    Step,
    /// Signal-delivery stop: the thread is about to receive `sig`
    /// (`code` is its `si_code`). Resume with the signal to deliver it.
    Signal { sig: Sig, code: i32 },
    /// The thread created thread `new` (already traced; it will report an
    /// [`Stop::EventStop`] first).
    Clone { new: Pid },
    /// The process forked `child` (already traced, see `Clone`).
    Fork { child: Pid },
    /// The process vforked `child`, which shares its memory until it execs
    /// or exits (already traced, see `Clone`).
    Vfork { child: Pid },
    /// The vfork child released its parent.
    VforkDone,
    /// The thread completed an `execve`; the address space is new. If a
    /// non-leader thread called it, `former_tid` is its old id and the thread
    /// now has the leader's id.
    Exec { former_tid: Pid },
    /// `PTRACE_EVENT_EXIT`: about to exit with this wait status.
    Exiting { status: i64 },
    /// `PTRACE_EVENT_STOP`: after [`Tracee::interrupt`] or at the start of
    /// an auto-attached thread (`sig` = SIGTRAP), or a group-stop (`sig` =
    /// the stopping signal).
    EventStop { sig: Sig },
    /// A syscall stop (only with `PTRACE_SYSCALL`, which this crate does
    /// not use).
    Syscall,
    /// Another ptrace event.
    OtherEvent { event: i32 },
    /// The thread exited (for the leader: the whole process, with its code).
    Exited { code: i32 },
    /// The thread was killed by a signal.
    Killed { sig: Sig, core: bool },
}

/// How a thread or process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal { sig: Sig, core: bool },
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited with code {c}"),
            Exit::Signal { sig, core } => {
                write!(
                    f,
                    "killed by {sig}{}",
                    if *core { " (core dumped)" } else { "" }
                )
            }
        }
    }
}

impl Stop {
    /// Whether the thread no longer exists after this report.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Stop::Exited { .. } | Stop::Killed { .. })
    }

    /// How the thread ended, for a terminal report.
    pub fn exit(&self) -> Option<Exit> {
        match *self {
            Stop::Exited { code } => Some(Exit::Code(code)),
            Stop::Killed { sig, core } => Some(Exit::Signal { sig, core }),
            _ => None,
        }
    }
}

/// The stop in words (for messages; no debug formatting).
impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Exited { .. } | Stop::Killed { .. } => match self.exit() {
                Some(e) => e.fmt(f),
                None => Ok(()),
            },
            Stop::Exiting { status } => write!(f, "exiting (wait status {status:#x})"),
            Stop::Int3 => f.write_str("int3 trap"),
            Stop::Step => f.write_str("single-step trap"),
            Stop::Signal { sig, code } => write!(f, "{sig} (code {code})"),
            Stop::Syscall => f.write_str("system-call stop"),
            Stop::EventStop { sig } => write!(f, "event stop ({sig})"),
            Stop::Clone { new } => write!(f, "clone of thread {new}"),
            Stop::Fork { child } => write!(f, "fork of process {child}"),
            Stop::Vfork { child } => write!(f, "vfork of process {child}"),
            Stop::VforkDone => f.write_str("vfork done"),
            Stop::Exec { former_tid } => write!(f, "execve (by thread {former_tid})"),
            Stop::OtherEvent { event } => write!(f, "ptrace event {event}"),
        }
    }
}

/// Why a ptrace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PtraceError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{program} (pid {pid}): unexpected {what} while {during}")]
    SpawnHandover {
        program: PathBuf,
        pid: i32,
        during: &'static str,
        what: String,
    },
    #[error("thread {tid}: {op} failed: it no longer exists (exited or killed)")]
    Gone { tid: Pid, op: &'static str },
    #[error("thread {tid}: {op} failed: not in a ptrace-stop (still running?)")]
    NotStopped { tid: Pid, op: &'static str },
    #[error("thread {tid}: {op} failed: {errno}")]
    Op {
        tid: Pid,
        op: &'static str,
        errno: Errno,
    },
    #[error("thread {tid}: no stop reported within {waited:?}")]
    Timeout { tid: Pid, waited: Duration },
    #[error("cannot trace process {pid}: {why}")]
    Refused { pid: i32, why: String },
    #[error("thread {tid} is not traced by this tracee")]
    NotTraced { tid: Pid },
    #[error(transparent)]
    Proc(#[from] ProcError),
}

/// Whether `tid` still exists as a live (non-zombie) task.
fn task_alive(tid: Pid) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{tid}/stat")) else {
        return false;
    };
    // The state letter follows the last ')' (the command name may hold any
    // character, including ')').
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next())
    {
        Some('Z') | Some('X') | Some('x') => false,
        Some(_) => true,
        None => false,
    }
}

fn op_err(tid: Pid, op: &'static str, errno: Errno) -> PtraceError {
    if errno == Errno::ESRCH {
        if task_alive(tid) {
            PtraceError::NotStopped { tid, op }
        } else {
            PtraceError::Gone { tid, op }
        }
    } else {
        PtraceError::Op { tid, op, errno }
    }
}

/// A ptrace request whose `data` is a plain integer (signal number or 0) and
/// whose `addr` is unused.
fn ptrace_int(req: libc::c_uint, tid: Pid, data: c_int) -> Result<(), Errno> {
    // SAFETY: used only for PTRACE_CONT, PTRACE_SINGLESTEP, PTRACE_DETACH,
    // PTRACE_INTERRUPT and PTRACE_LISTEN, which read an integer from `data`
    // and never dereference `addr` or `data`, so no memory of ours is touched.
    let r = unsafe {
        libc::ptrace(
            req,
            tid.as_raw(),
            std::ptr::null_mut::<c_void>(),
            data as libc::c_long as *mut c_void,
        )
    };
    Errno::result(r).map(drop)
}

/// Makes `handler` this process's handler for signal `sig` (restarting
/// interrupted system calls). Used by the updater to turn termination
/// signals into a rollback.
pub fn catch_signal(sig: c_int, handler: extern "C" fn(c_int)) -> Result<(), Errno> {
    let sig = Signal::try_from(sig)?;
    let action = signal::SigAction::new(
        signal::SigHandler::Handler(handler),
        signal::SaFlags::SA_RESTART,
        signal::SigSet::empty(),
    );
    // SAFETY: the handlers passed here only store into an atomic integer,
    // which is async-signal-safe; no other handler is replaced unknowingly
    // (the previous disposition is the default one of a fresh updater).
    unsafe { signal::sigaction(sig, &action) }.map(drop)
}

/// `waitpid(tid, flags)` returning the raw status; `None` when `WNOHANG` found
/// nothing. Retries on EINTR.
fn waitpid_raw(tid: Pid, flags: c_int) -> Result<Option<c_int>, Errno> {
    loop {
        let mut status: c_int = 0;
        // SAFETY: `status` is a live, writable c_int for the whole call.
        let r = unsafe { libc::waitpid(tid.as_raw(), &mut status, flags) };
        match Errno::result(r) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(status)),
        }
    }
}

/// Poll `waitpid_raw` until it reports something or `timeout` passes.
fn waitpid_bounded(tid: Pid, flags: c_int, timeout: Duration) -> Result<Option<c_int>, Errno> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(20);
    loop {
        if let Some(s) = waitpid_raw(tid, flags | libc::WNOHANG)? {
            return Ok(Some(s));
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Ok(None);
        }
        std::thread::sleep(pause.min(timeout - waited));
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

fn describe_status(status: c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit with code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("death by {}", Sig(libc::WTERMSIG(status)))
    } else if libc::WIFSTOPPED(status) {
        format!(
            "stop by {} (event {})",
            Sig(libc::WSTOPSIG(status)),
            (status >> 16) & 0xff
        )
    } else {
        format!("wait status {status:#x}")
    }
}

/// The registers of one thread (`user_regs_struct`).
#[derive(Clone, Copy)]
pub struct Regs(pub libc::user_regs_struct);

impl Regs {
    /// Every register zero (a starting point for tests and synthetic
    /// threads).
    pub fn zeroed() -> Regs {
        Regs(libc::user_regs_struct {
            r15: 0,
            r14: 0,
            r13: 0,
            r12: 0,
            rbp: 0,
            rbx: 0,
            r11: 0,
            r10: 0,
            r9: 0,
            r8: 0,
            rax: 0,
            rcx: 0,
            rdx: 0,
            rsi: 0,
            rdi: 0,
            orig_rax: 0,
            rip: 0,
            cs: 0,
            eflags: 0,
            rsp: 0,
            ss: 0,
            fs_base: 0,
            gs_base: 0,
            ds: 0,
            es: 0,
            fs: 0,
            gs: 0,
        })
    }

    /// Value of a general-purpose register (or rip).
    pub fn get(&self, r: Reg) -> u64 {
        let s = &self.0;
        match r {
            Reg::Rax => s.rax,
            Reg::Rdx => s.rdx,
            Reg::Rcx => s.rcx,
            Reg::Rbx => s.rbx,
            Reg::Rsi => s.rsi,
            Reg::Rdi => s.rdi,
            Reg::Rbp => s.rbp,
            Reg::Rsp => s.rsp,
            Reg::R8 => s.r8,
            Reg::R9 => s.r9,
            Reg::R10 => s.r10,
            Reg::R11 => s.r11,
            Reg::R12 => s.r12,
            Reg::R13 => s.r13,
            Reg::R14 => s.r14,
            Reg::R15 => s.r15,
            Reg::Rip => s.rip,
        }
    }

    /// Set a general-purpose register (or rip).
    pub fn set(&mut self, r: Reg, v: u64) {
        let s = &mut self.0;
        let slot = match r {
            Reg::Rax => &mut s.rax,
            Reg::Rdx => &mut s.rdx,
            Reg::Rcx => &mut s.rcx,
            Reg::Rbx => &mut s.rbx,
            Reg::Rsi => &mut s.rsi,
            Reg::Rdi => &mut s.rdi,
            Reg::Rbp => &mut s.rbp,
            Reg::Rsp => &mut s.rsp,
            Reg::R8 => &mut s.r8,
            Reg::R9 => &mut s.r9,
            Reg::R10 => &mut s.r10,
            Reg::R11 => &mut s.r11,
            Reg::R12 => &mut s.r12,
            Reg::R13 => &mut s.r13,
            Reg::R14 => &mut s.r14,
            Reg::R15 => &mut s.r15,
            Reg::Rip => &mut s.rip,
        };
        *slot = v;
    }

    /// The instruction pointer.
    pub fn rip(&self) -> RuntimeAddr {
        RuntimeAddr(self.0.rip)
    }
    /// Set the instruction pointer.
    pub fn set_rip(&mut self, a: RuntimeAddr) {
        self.0.rip = a.0;
    }
    /// The stack pointer.
    pub fn rsp(&self) -> RuntimeAddr {
        RuntimeAddr(self.0.rsp)
    }
    /// The flags register.
    pub fn eflags(&self) -> u64 {
        self.0.eflags
    }
    /// Syscall number at a syscall stop (`orig_rax`).
    pub fn orig_rax(&self) -> u64 {
        self.0.orig_rax
    }
    /// Whether these are the registers of a thread interrupted in a system
    /// call that the kernel restarts when the thread resumes from a stop on
    /// its signal path (see [`RESTART_CODES`]).
    pub fn in_restartable_syscall(&self) -> bool {
        (self.0.orig_rax as i64) >= 0 && RESTART_CODES.contains(&(self.0.rax as i64))
    }
}

/// `-ERESTARTSYS`, `-ERESTARTNOINTR`, `-ERESTARTNOHAND`,
/// `-ERESTART_RESTARTBLOCK`: results of an interrupted system call that the
/// kernel turns into a restart only on its signal-delivery path (a thread
/// resumed from an interrupt, group or signal-delivery stop); from any
/// other stop (a system-call or event stop) the code reaches the program
/// as the call's result.
pub const RESTART_CODES: [i64; 4] = [-512, -513, -514, -516];

/// System calls that the kernel ends with -EINTR (not a restart code) when
/// the thread is merely interrupted by ptrace (`PTRACE_INTERRUPT`):
/// resumed as is, the program would see an EINTR that no signal caused.
pub const EINTR_ON_INTERRUPT: [i64; 4] = [
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_rt_sigtimedwait,
];
/// -EINTR.
const EINTR: i64 = -4;
/// -ERESTARTNOHAND: the kernel's restart code for a signal without handler.
pub const ERESTARTNOHAND: i64 = -514;

/// How long [`Tracee::wait_stop`] polls, yielding, before it sleeps.
pub(crate) const WAIT_SPIN: Duration = Duration::from_micros(200);

/// Bound on the wait for the interrupt stop a thread is moved into before
/// it resumes (see [`Tracee::cont`]).
const PARK_WAIT: Duration = Duration::from_secs(2);

impl PartialEq for Regs {
    fn eq(&self, other: &Regs) -> bool {
        self.0 == other.0
    }
}

impl fmt::Debug for Regs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Regs");
        for r in Reg::ALL {
            d.field(r.name(), &format_args!("{:#x}", self.get(r)));
        }
        d.field("eflags", &format_args!("{:#x}", self.0.eflags))
            .finish()
    }
}

/// Size of the kernel's `siginfo_t`.
pub const SIGINFO_SIZE: usize = 128;
/// `NT_X86_XSTATE`: the register set holding the XSAVE area.
const NT_X86_XSTATE: usize = 0x202;
/// Larger than any XSAVE area (AVX-512 with AMX tiles is about 11 KiB).
const XSTATE_MAX: usize = 32 << 10;

/// The extended register state of one thread: the XSAVE area as
/// `PTRACE_GETREGSET(NT_X86_XSTATE)` returns it (x87, SSE, AVX, AVX-512).
#[derive(Clone, PartialEq, Eq)]
pub struct ExtRegs(pub Vec<u8>);

impl fmt::Debug for ExtRegs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ExtRegs({} bytes)", self.0.len())
    }
}

/// Kills a child process (SIGKILL by pid, and its process group when it
/// leads one) and reaps it on drop, unless it was already reaped.
///
/// The group is only signalled while the leader is unreaped: a zombie leader
/// keeps its id reserved, so the signal cannot reach an unrelated process.
#[derive(Debug)]
pub struct ChildGuard {
    pid: Pid,
    group: bool,
    reaped: bool,
}

impl ChildGuard {
    /// Guard child `pid`; with `kill_group`, `pid` leads its own process group
    /// and the whole group is killed.
    pub fn new(pid: Pid, kill_group: bool) -> ChildGuard {
        ChildGuard {
            pid,
            group: kill_group,
            reaped: false,
        }
    }
    /// The guarded pid.
    pub fn pid(&self) -> Pid {
        self.pid
    }
    /// Whether the child was reaped (the guard will not touch it again).
    pub fn is_reaped(&self) -> bool {
        self.reaped
    }
    /// Record that the child's exit status has been collected elsewhere.
    pub fn mark_reaped(&mut self) {
        self.reaped = true;
    }
    /// SIGKILL the process group's remaining members, leaving the leader
    /// alone (used when the leader has exited but is not yet reaped).
    pub fn kill_group_members(&self) {
        if self.group && !self.reaped {
            let _ = signal::killpg(self.pid, Signal::SIGKILL);
        }
    }
    /// SIGKILL the child (and its group) and wait up to `timeout` for its exit
    /// status. `None` if it was already reaped or did not die in time.
    pub fn kill_and_reap(&mut self, timeout: Duration) -> Option<c_int> {
        if self.reaped {
            return None;
        }
        self.kill_group_members();
        let _ = signal::kill(self.pid, Signal::SIGKILL);
        let start = Instant::now();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            match waitpid_bounded(self.pid, libc::__WALL, left) {
                Ok(Some(s)) if libc::WIFEXITED(s) || libc::WIFSIGNALED(s) => {
                    self.reaped = true;
                    return Some(s);
                }
                // A ptrace stop still queued before the death: keep going.
                Ok(Some(_)) if !left.is_zero() => continue,
                Ok(_) => return None,
                Err(_) => {
                    // ECHILD: someone else reaped it.
                    self.reaped = true;
                    return None;
                }
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill_and_reap(REAP_TIMEOUT);
    }
}

/// What the tracer knows about one traced thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadState {
    /// Resumed (or newly created and not yet reported).
    Running,
    /// In a ptrace-stop that was reported by a wait.
    Stopped,
}

#[derive(Debug)]
struct Track {
    state: ThreadState,
    /// A signal that stopped the thread while seizing, to be delivered when
    /// it is resumed or detached.
    pending_signal: Option<Sig>,
    /// Whether the stop it is in lies on the kernel's signal path (an
    /// interrupt, group or signal-delivery stop), from which a resume
    /// restarts an interrupted system call.
    signal_path: bool,
    /// The registers read in the current stop (a stopped thread's registers
    /// change only through us): each stop reads them once. Forgotten when
    /// the thread is resumed or its registers are set.
    regs: std::cell::Cell<Option<Regs>>,
    /// Whether the registers last set put the thread in a restartable
    /// system call (`orig_rax` and `rax` are stored as given), so that
    /// a resume right after setting them need not read them back.
    restartable_set: std::cell::Cell<Option<bool>>,
}

impl Track {
    fn new(state: ThreadState) -> Track {
        Track {
            state,
            pending_signal: None,
            signal_path: false,
            regs: std::cell::Cell::new(None),
            restartable_set: std::cell::Cell::new(None),
        }
    }

    /// The thread runs (or ran): what was known of its registers is stale.
    fn forget_regs(&self) {
        self.regs.set(None);
        self.restartable_set.set(None);
    }
}

/// The standard streams of a spawned tracee that were set to `piped`.
#[derive(Debug, Default)]
pub struct SpawnedStdio {
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
}

/// A traced process (and the threads and child processes it creates while
/// traced).
///
/// Dropping a spawned tracee kills it (with its process group) and reaps
/// every traced thread; dropping a seized tracee detaches every thread,
/// stopping running ones first, and leaves the process running.
pub struct Tracee {
    pid: Pid,
    guard: Option<ChildGuard>,
    threads: BTreeMap<Pid, Track>,
    /// Threads seen to end, so that later requests say so (capped).
    gone: BTreeSet<Pid>,
    /// A SIGCONT was seen during the session (reported by any thread, or
    /// held). Stop signals taken from the threads meanwhile are not sent
    /// again: two threads' reports do not say which of their signals was
    /// sent first, and a continue after a stop (a shell's `fg` after
    /// Ctrl-Z) is the sequence that happens; a stop sent again after the
    /// continue would leave the process stopped for good.
    continued: bool,
    /// `/proc/PID/mem`, opened on first use and kept (a pause asked for it
    /// a dozen times, an open and a close each); forgotten at an exec,
    /// whose address space is another.
    mem: std::cell::OnceCell<ProcessMemory>,
    /// When the last `PTRACE_DETACH` was asked for: the moment its thread
    /// was let go (the call's return may come much later, when the thread
    /// it woke took this processor).
    released_at: Option<Instant>,
    /// Bumped before every remote operation that may map or unmap memory
    /// in the process: maps read at one epoch are still its maps while the
    /// epoch is unchanged (its threads stopped), and need not be read again.
    maps_epoch: u64,
    /// ptrace calls must come from the attaching thread.
    _not_send: PhantomData<*const ()>,
}

impl fmt::Debug for Tracee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracee")
            .field("pid", &self.pid)
            .field("spawned", &self.guard.is_some())
            .field("threads", &self.threads)
            .finish()
    }
}

impl Tracee {
    /// Options set on every tracee: follow threads, forks, vforks and execs;
    /// system-call stops marked (`SIGTRAP | 0x80`). Never
    /// `PTRACE_O_EXITKILL` on a seized process: if the updater dies, the
    /// kernel detaches and the process must live on.
    pub fn options() -> Options {
        Options::PTRACE_O_TRACESYSGOOD
            | Options::PTRACE_O_TRACECLONE
            | Options::PTRACE_O_TRACEFORK
            | Options::PTRACE_O_TRACEVFORK
            | Options::PTRACE_O_TRACEEXEC
    }

    /// Start `cmd` traced, stopped right after its `execve` (the executable
    /// and the dynamic linker are mapped; no instruction of the program ran).
    ///
    /// The program becomes the leader of a new process group, is killed if
    /// the tracer dies (`PTRACE_O_EXITKILL`), and is killed with its group
    /// when the `Tracee` is dropped. Streams that `cmd` sets to `piped` are
    /// returned.
    pub fn spawn(mut cmd: Command) -> Result<(Tracee, SpawnedStdio), PtraceError> {
        let program = PathBuf::from(cmd.get_program());
        cmd.process_group(0);
        // SAFETY: the hook runs in the forked child before exec; it only makes
        // the ptrace(PTRACE_TRACEME) system call and converts an errno into an
        // io::Error, which is async-signal-safe and allocates nothing.
        unsafe {
            cmd.pre_exec(|| ptrace::traceme().map_err(io::Error::from));
        }
        let mut child = cmd.spawn().map_err(|source| PtraceError::Spawn {
            program: program.clone(),
            source,
        })?;
        let stdio = SpawnedStdio {
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
        };
        // The pid fits: the kernel's pid_t is an i32.
        let pid = Pid::from_raw(child.id() as i32);
        // Dropping `child` neither waits nor kills; the guard owns it now.
        drop(child);
        let guard = ChildGuard::new(pid, true);
        let handover = |during: &'static str, what: String| PtraceError::SpawnHandover {
            program: program.clone(),
            pid: pid.as_raw(),
            during,
            what,
        };
        let wait = |flags: c_int, during: &'static str| -> Result<c_int, PtraceError> {
            match waitpid_bounded(pid, flags, SPAWN_TIMEOUT) {
                Ok(Some(s)) => Ok(s),
                Ok(None) => Err(handover(during, "timeout".into())),
                Err(e) => Err(handover(during, format!("wait error {e}"))),
            }
        };

        // 1. PTRACE_TRACEME makes the exec stop with a plain SIGTRAP.
        let s = wait(libc::__WALL, "waiting for the exec stop")?;
        if !(libc::WIFSTOPPED(s) && libc::WSTOPSIG(s) == libc::SIGTRAP) {
            return Err(handover("waiting for the exec stop", describe_status(s)));
        }
        // 2. Hand over to PTRACE_SEIZE: detach into a SIGSTOP group-stop (no
        //    user instruction runs: the signal is taken on the way out of
        //    the kernel), seize the stopped process, which re-traps with
        //    PTRACE_EVENT_STOP.
        ptrace_int(libc::PTRACE_DETACH, pid, libc::SIGSTOP)
            .map_err(|e| handover("detaching from the exec stop", e.to_string()))?;
        let s = wait(libc::WUNTRACED, "waiting for the SIGSTOP")?;
        if !(libc::WIFSTOPPED(s) && libc::WSTOPSIG(s) == libc::SIGSTOP) {
            return Err(handover("waiting for the SIGSTOP", describe_status(s)));
        }
        ptrace::seize(pid, Self::options() | Options::PTRACE_O_EXITKILL)
            .map_err(|e| handover("seizing", e.to_string()))?;
        let s = wait(libc::__WALL, "waiting for the seize stop")?;
        if !(libc::WIFSTOPPED(s) && (s >> 16) == libc::PTRACE_EVENT_STOP) {
            return Err(handover("waiting for the seize stop", describe_status(s)));
        }
        let mut threads = BTreeMap::new();
        threads.insert(pid, Track::new(ThreadState::Stopped));
        Ok((
            Tracee {
                pid,
                guard: Some(guard),
                threads,
                gone: BTreeSet::new(),
                continued: false,
                mem: std::cell::OnceCell::new(),
                released_at: None,
                maps_epoch: 0,
                _not_send: PhantomData,
            },
            stdio,
        ))
    }

    /// Attach to every thread of the running process `pid` and stop them all.
    /// Threads created meanwhile are caught too (bounded number of rounds).
    /// A signal that arrived as a thread was stopped is kept and delivered
    /// at the next [`Tracee::cont`] without signal, or at detach.
    pub fn seize(pid: Pid) -> Result<Tracee, PtraceError> {
        let mut t = Tracee {
            pid,
            guard: None,
            threads: BTreeMap::new(),
            gone: BTreeSet::new(),
            continued: false,
            mem: std::cell::OnceCell::new(),
            released_at: None,
            maps_epoch: 0,
            _not_send: PhantomData,
        };
        const ROUNDS: usize = 64;
        for _ in 0..ROUNDS {
            let fresh: Vec<Pid> = procfs::list_tasks(pid)?
                .into_iter()
                .filter(|tid| !t.threads.contains_key(tid))
                .collect();
            if fresh.is_empty() {
                return Ok(t);
            }
            for &tid in &fresh {
                match ptrace::seize(tid, Self::options()) {
                    Ok(()) => {}
                    // The thread exited between listing and seizing.
                    Err(Errno::ESRCH) => continue,
                    Err(Errno::EPERM) => {
                        let why = crate::target::permission::reason(
                            &crate::target::permission::facts(pid),
                        );
                        return Err(PtraceError::Refused {
                            pid: pid.as_raw(),
                            why: why.unwrap_or_else(|| {
                                "the kernel refused (EPERM) for a reason not found in /proc: \
                                 is it setuid or otherwise not dumpable, or is a security \
                                 module (SELinux, AppArmor) denying it?"
                                    .into()
                            }),
                        });
                    }
                    Err(e) => return Err(op_err(tid, "PTRACE_SEIZE", e)),
                }
                t.threads.insert(tid, Track::new(ThreadState::Running));
                t.interrupt(tid)?;
            }
            for &tid in &fresh {
                if !t.threads.contains_key(&tid) {
                    continue;
                }
                t.stop_after_interrupt(tid)?;
            }
        }
        // Threads keep appearing: refuse rather than loop forever.
        Err(PtraceError::Op {
            tid: pid,
            op: "seizing all threads (they keep being created)",
            errno: Errno::EAGAIN,
        })
    }

    /// Stop again every traced thread that was resumed (after
    /// [`Tracee::cont`]), as [`Tracee::seize`] left them: each in a
    /// ptrace-stop, a signal reported instead of the interrupt kept for the
    /// next resume. A thread that exited meanwhile is forgotten.
    pub fn halt_all(&mut self) -> Result<(), PtraceError> {
        let running: Vec<Pid> = self
            .threads
            .iter()
            .filter(|(_, t)| t.state == ThreadState::Running)
            .map(|(&tid, _)| tid)
            .collect();
        let mut asked = Vec::with_capacity(running.len());
        for tid in running {
            match self.interrupt(tid) {
                Ok(()) => asked.push(tid),
                Err(PtraceError::Gone { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        for tid in asked {
            if !self.threads.contains_key(&tid) {
                continue;
            }
            match self.stop_after_interrupt(tid) {
                Ok(()) | Err(PtraceError::Gone { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Wait for `tid` to stop after an interrupt, keeping a signal it
    /// reports instead. Any other first stop (an event such as a clone in
    /// progress, whose new thread is now tracked) also leaves it stopped.
    fn stop_after_interrupt(&mut self, tid: Pid) -> Result<(), PtraceError> {
        if let Stop::Signal { sig, .. } = self.wait_stop(tid, Duration::from_secs(5))? {
            self.keep_signal(tid, sig);
        }
        Ok(())
    }

    /// Change the ptrace options of stopped thread `tid` (every tracee
    /// starts with [`Tracee::options`]).
    pub fn set_options(&self, tid: Pid, options: Options) -> Result<(), PtraceError> {
        self.track(tid, "PTRACE_SETOPTIONS")?;
        ptrace::setoptions(tid, options).map_err(|e| op_err(tid, "PTRACE_SETOPTIONS", e))
    }

    /// The process id (thread-group leader) of the traced program.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Whether this tracee was started by [`Tracee::spawn`].
    pub fn is_spawned(&self) -> bool {
        self.guard.is_some()
    }

    /// Thread ids of the main process, from `/proc/PID/task`.
    pub fn tasks(&self) -> Result<Vec<Pid>, PtraceError> {
        Ok(procfs::list_tasks(self.pid)?)
    }

    /// Every thread (of any process) this tracer currently traces.
    pub fn traced(&self) -> Vec<Pid> {
        self.threads.keys().copied().collect()
    }

    /// What the tracer knows about `tid`, `None` if it is not traced.
    pub fn state(&self, tid: Pid) -> Option<ThreadState> {
        self.threads.get(&tid).map(|t| t.state)
    }

    /// Take the signal kept for `tid` while seizing, if any.
    pub fn take_pending_signal(&mut self, tid: Pid) -> Option<Sig> {
        self.threads
            .get_mut(&tid)
            .and_then(|t| t.pending_signal.take())
    }

    /// `sig`, unless it is a stop signal and a SIGCONT is pending in the
    /// process: sending a stop removes a pending SIGCONT, so that one came
    /// after the stop was taken from the thread, and the kernel would have
    /// discarded the stop (delivered now, it would stop the process after
    /// its continue).
    fn unless_continued(&self, sig: Option<Sig>) -> Option<Sig> {
        match sig {
            Some(s) if is_stop_signal(s) && self.stop_cancelled() => None,
            other => other,
        }
    }

    /// Whether a stop signal taken from a thread during this session must
    /// not be sent again: a SIGCONT was seen in the session (see
    /// `continued`) or is pending in the process (sent after the stop was
    /// taken; sending the stop now would discard it).
    pub fn stop_cancelled(&self) -> bool {
        self.continued || sigcont_pending(self.pid)
    }

    /// A SIGCONT reached the process: the stop signals kept for any thread
    /// are discarded, as the kernel discards pending ones, and those taken
    /// from now on in this session are not sent again either (see
    /// `continued`).
    pub fn saw_continue(&mut self) {
        self.continued = true;
        drop_kept_stops(&mut self.threads);
    }

    /// Keep `sig`, reported while `tid` was being stopped, for its resume (a
    /// signal already kept stays first); a SIGCONT discards the stop signals
    /// kept on every thread.
    fn keep_signal(&mut self, tid: Pid, sig: Sig) {
        if sig.0 == libc::SIGCONT {
            self.saw_continue();
        }
        if let Some(t) = self.threads.get_mut(&tid) {
            t.pending_signal.get_or_insert(sig);
        }
    }

    /// Keep `sig` for `tid`, to be delivered at its next [`Tracee::cont`]
    /// without signal (or at detach), replacing what was kept. Returns the
    /// signal kept before. Used to put back a signal taken with
    /// [`Tracee::take_pending_signal`].
    pub fn set_pending_signal(
        &mut self,
        tid: Pid,
        sig: Option<Sig>,
    ) -> Result<Option<Sig>, PtraceError> {
        self.track(tid, "keeping a signal")?;
        let t = self
            .threads
            .get_mut(&tid)
            .ok_or(PtraceError::NotTraced { tid })?;
        let before = std::mem::replace(&mut t.pending_signal, sig);
        if sig.is_some_and(|s| s.0 == libc::SIGCONT) {
            self.saw_continue();
        }
        Ok(before)
    }

    /// Extended register state (x87, SSE, AVX, AVX-512, ...: the XSAVE area,
    /// `NT_X86_XSTATE`) of stopped thread `tid`.
    pub fn ext_regs(&self, tid: Pid) -> Result<ExtRegs, PtraceError> {
        self.track(tid, "PTRACE_GETREGSET")?;
        let mut buf = vec![0u8; XSTATE_MAX];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast::<c_void>(),
            iov_len: buf.len(),
        };
        // SAFETY: `iov` describes `buf`, which is live and writable for the
        // whole call; the kernel writes at most `iov_len` bytes into it and
        // updates `iov_len` to the size written.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_GETREGSET,
                tid.as_raw(),
                NT_X86_XSTATE as *mut c_void,
                (&mut iov as *mut libc::iovec).cast::<c_void>(),
            )
        };
        Errno::result(r).map_err(|e| op_err(tid, "PTRACE_GETREGSET", e))?;
        buf.truncate(iov.iov_len.min(XSTATE_MAX));
        Ok(ExtRegs(buf))
    }

    /// The blocked-signal mask of stopped thread `tid` (bit `n - 1` for
    /// signal `n`): one call, where `/proc/PID/task/TID/status` takes an
    /// open, reads and a close.
    pub fn sigmask(&self, tid: Pid) -> Result<u64, PtraceError> {
        self.track(tid, "PTRACE_GETSIGMASK")?;
        let mut mask = 0u64;
        // SAFETY: the kernel writes `addr` (8, the size of the kernel's
        // sigset_t) bytes to `data`, which points at `mask`, a live u64.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_GETSIGMASK,
                tid.as_raw(),
                std::mem::size_of::<u64>() as *mut c_void,
                (&mut mask as *mut u64).cast::<c_void>(),
            )
        };
        Errno::result(r)
            .map(|_| mask)
            .map_err(|e| op_err(tid, "PTRACE_GETSIGMASK", e))
    }

    /// Restore the extended register state of stopped thread `tid` (as read
    /// by [`Tracee::ext_regs`]).
    pub fn set_ext_regs(&self, tid: Pid, regs: &ExtRegs) -> Result<(), PtraceError> {
        self.track(tid, "PTRACE_SETREGSET")?;
        let mut buf = regs.0.clone();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast::<c_void>(),
            iov_len: buf.len(),
        };
        // SAFETY: `iov` describes `buf`, live for the whole call; the kernel
        // only reads `iov_len` bytes from it.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_SETREGSET,
                tid.as_raw(),
                NT_X86_XSTATE as *mut c_void,
                (&mut iov as *mut libc::iovec).cast::<c_void>(),
            )
        };
        Errno::result(r)
            .map(drop)
            .map_err(|e| op_err(tid, "PTRACE_SETREGSET", e))
    }

    /// The epoch of the process's maps (see [`Tracee::maps_may_change`]).
    pub fn maps_epoch(&self) -> u64 {
        self.maps_epoch
    }

    /// Said before a remote operation that may map or unmap memory (a
    /// system call such as mmap, any function call): maps read before are
    /// stale from now on.
    pub fn maps_may_change(&mut self) {
        self.maps_epoch = self.maps_epoch.wrapping_add(1);
    }

    /// Memory of the main process (`/proc/PID/mem`, ptrace fallback),
    /// opened once and shared by the handles this returns; opened again
    /// after an exec this tracee saw.
    pub fn memory(&self) -> ProcessMemory {
        self.mem
            .get_or_init(|| ProcessMemory::open(self.pid))
            .clone()
    }

    fn track(&self, tid: Pid, op: &'static str) -> Result<&Track, PtraceError> {
        match self.threads.get(&tid) {
            Some(t) => Ok(t),
            None if self.gone.contains(&tid) => Err(PtraceError::Gone { tid, op }),
            None => Err(PtraceError::NotTraced { tid }),
        }
    }

    fn set_state(&mut self, tid: Pid, state: ThreadState) {
        if let Some(t) = self.threads.get_mut(&tid) {
            t.state = state;
            t.forget_regs();
        }
    }

    /// Registers of stopped thread `tid` (read once per stop).
    pub fn regs(&self, tid: Pid) -> Result<Regs, PtraceError> {
        let track = self.track(tid, "PTRACE_GETREGS")?;
        if let Some(r) = track.regs.get() {
            return Ok(r);
        }
        let r = ptrace::getregs(tid)
            .map(Regs)
            .map_err(|e| op_err(tid, "PTRACE_GETREGS", e))?;
        track.regs.set(Some(r));
        Ok(r)
    }

    /// Set the registers of stopped thread `tid`.
    pub fn set_regs(&self, tid: Pid, regs: &Regs) -> Result<(), PtraceError> {
        let track = self.track(tid, "PTRACE_SETREGS")?;
        // Read back when next asked: the kernel may adjust some (flags).
        track.forget_regs();
        ptrace::setregs(tid, regs.0).map_err(|e| op_err(tid, "PTRACE_SETREGS", e))?;
        track
            .restartable_set
            .set(Some(regs.in_restartable_syscall()));
        Ok(())
    }

    /// Whether stopped thread `tid` is in a restartable system call, from
    /// the registers known in this stop when they are.
    fn restartable(&self, tid: Pid, op: &'static str) -> Result<bool, PtraceError> {
        let track = self.track(tid, op)?;
        match (track.regs.get(), track.restartable_set.get()) {
            (Some(r), _) => Ok(r.in_restartable_syscall()),
            (None, Some(known)) => Ok(known),
            (None, None) => Ok(self.regs(tid)?.in_restartable_syscall()),
        }
    }

    /// `siginfo` of the signal that stopped `tid`.
    pub fn siginfo(&self, tid: Pid) -> Result<libc::siginfo_t, PtraceError> {
        self.track(tid, "PTRACE_GETSIGINFO")?;
        ptrace::getsiginfo(tid).map_err(|e| op_err(tid, "PTRACE_GETSIGINFO", e))
    }

    /// `siginfo` of the signal that stopped `tid`, as the kernel's raw 128
    /// bytes (to pass back to the target, e.g. to `rt_tgsigqueueinfo`).
    pub fn siginfo_bytes(&self, tid: Pid) -> Result<[u8; SIGINFO_SIZE], PtraceError> {
        self.track(tid, "PTRACE_GETSIGINFO")?;
        let mut buf = [0u8; SIGINFO_SIZE];
        // SAFETY: the kernel writes exactly sizeof(siginfo_t) = 128 bytes to
        // `data`, which points at `buf`, 128 writable bytes live for the call.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_GETSIGINFO,
                tid.as_raw(),
                std::ptr::null_mut::<c_void>(),
                buf.as_mut_ptr().cast::<c_void>(),
            )
        };
        Errno::result(r).map_err(|e| op_err(tid, "PTRACE_GETSIGINFO", e))?;
        Ok(buf)
    }

    /// Replace the `siginfo` of the signal `tid` is stopped for (to deliver
    /// a saved signal with its original details).
    pub fn set_siginfo(&self, tid: Pid, info: &libc::siginfo_t) -> Result<(), PtraceError> {
        self.track(tid, "PTRACE_SETSIGINFO")?;
        ptrace::setsiginfo(tid, info).map_err(|e| op_err(tid, "PTRACE_SETSIGINFO", e))
    }

    /// Queue a signal taken from thread `tid` (of the traced process) back
    /// on that thread, to be received when it runs again: used when a
    /// signal that arrived while stopping the world was held back. Keeps
    /// the original `siginfo` where the kernel allows it
    /// (`rt_tgsigqueueinfo`, which refuses codes only the kernel may send
    /// to another process), else sends it with `tgkill` (code `SI_TKILL`).
    /// A stop signal is dropped once a SIGCONT was seen in the session or
    /// while one is pending.
    pub fn requeue_signal(&self, tid: Pid, info: &libc::siginfo_t) -> Result<(), PtraceError> {
        self.track(tid, "requeueing a signal")?;
        let (tgid, sig) = (self.pid.as_raw(), info.si_signo);
        // Sending a stop removes a pending SIGCONT: one pending now came
        // after the stop was taken, and the kernel would have discarded
        // the stop.
        if self.unless_continued(Some(Sig(sig))).is_none() {
            return Ok(());
        }
        // SAFETY: rt_tgsigqueueinfo only reads sizeof(siginfo_t) bytes from
        // its last argument, which points at `info`, a live reference.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_tgsigqueueinfo,
                tgid,
                tid.as_raw(),
                sig,
                info as *const libc::siginfo_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        // SAFETY: tgkill takes three integers and touches no memory of ours.
        let r = unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid.as_raw(), sig) };
        Errno::result(r)
            .map(drop)
            .map_err(|e| op_err(tid, "tgkill", e))
    }

    fn resume(
        &mut self,
        req: libc::c_uint,
        op: &'static str,
        tid: Pid,
        sig: Option<Sig>,
    ) -> Result<(), PtraceError> {
        self.park_for_restart(tid, op)?;
        let pending = self.track(tid, op)?.pending_signal;
        let sig = self.unless_continued(sig.or(pending));
        ptrace_int(req, tid, sig.map_or(0, |s| s.0)).map_err(|e| op_err(tid, op, e))?;
        if let Some(t) = self.threads.get_mut(&tid) {
            t.state = ThreadState::Running;
            t.pending_signal = None;
            t.forget_regs();
        }
        Ok(())
    }

    /// A stopped thread interrupted in a restartable system call (see
    /// [`RESTART_CODES`]) but not in a stop on the signal path (the end of
    /// a remote call session, a system-call stop, registers set there) is
    /// moved into an interrupt stop first, so that the kernel restarts the
    /// call when it resumes instead of showing the program the restart
    /// code. No instruction runs meanwhile; a signal reported on the way
    /// is kept for the resume.
    fn park_for_restart(&mut self, tid: Pid, op: &'static str) -> Result<(), PtraceError> {
        if self.track(tid, op)?.signal_path || !self.restartable(tid, op)? {
            return Ok(());
        }
        let cont = |tid: Pid| {
            ptrace_int(libc::PTRACE_CONT, tid, 0).map_err(|e| op_err(tid, "PTRACE_CONT", e))
        };
        self.interrupt(tid)?;
        cont(tid)?;
        self.set_state(tid, ThreadState::Running);
        for _ in 0..16 {
            match self.wait_stop(tid, PARK_WAIT)? {
                Stop::EventStop { .. } => return Ok(()),
                end if end.is_terminal() => {
                    return Err(PtraceError::Gone {
                        tid,
                        op: "moving into an interrupt stop",
                    })
                }
                Stop::Signal { sig, .. } => {
                    self.keep_signal(tid, sig);
                    cont(tid)?;
                }
                _ => cont(tid)?,
            }
            self.set_state(tid, ThreadState::Running);
        }
        Err(PtraceError::Timeout {
            tid,
            waited: PARK_WAIT,
        })
    }

    /// A thread our interrupt (not a signal: a group-stop reports its
    /// signal) made fail with EINTR (see [`EINTR_ON_INTERRUPT`]) gets the
    /// restart code the kernel uses for a signal without handler, so that
    /// every resume restarts the call: also when the update is refused
    /// before the world is stopped.
    fn undo_interrupt_eintr(&mut self, tid: Pid) -> Result<(), PtraceError> {
        let mut regs = self.regs(tid)?;
        let nr = regs.0.orig_rax as i64;
        if regs.0.rax as i64 == EINTR && EINTR_ON_INTERRUPT.contains(&nr) {
            regs.0.rax = ERESTARTNOHAND as u64;
            self.set_regs(tid, &regs)?;
        }
        Ok(())
    }

    /// Resume `tid`, delivering `sig` (or the signal kept while seizing).
    /// A thread interrupted in a restartable system call restarts it.
    pub fn cont(&mut self, tid: Pid, sig: Option<Sig>) -> Result<(), PtraceError> {
        // The program runs: it may map or unmap memory.
        self.maps_may_change();
        self.resume(libc::PTRACE_CONT, "PTRACE_CONT", tid, sig)
    }

    /// Resume `tid` until its next system-call entry or exit stop
    /// (`PTRACE_SYSCALL`, reported as [`Stop::Syscall`]).
    pub fn syscall_step(&mut self, tid: Pid) -> Result<(), PtraceError> {
        self.resume(libc::PTRACE_SYSCALL, "PTRACE_SYSCALL", tid, None)
    }

    /// Execute one instruction of `tid` (delivering `sig` first, if any).
    pub fn step(&mut self, tid: Pid, sig: Option<Sig>) -> Result<(), PtraceError> {
        self.resume(libc::PTRACE_SINGLESTEP, "PTRACE_SINGLESTEP", tid, sig)
    }

    /// Ask running thread `tid` to stop; it reports a [`Stop::EventStop`]
    /// (or another stop that happened first, after which the interrupt may
    /// still produce a later `EventStop`, to be resumed like any other).
    pub fn interrupt(&mut self, tid: Pid) -> Result<(), PtraceError> {
        self.track(tid, "PTRACE_INTERRUPT")?;
        ptrace_int(libc::PTRACE_INTERRUPT, tid, 0).map_err(|e| op_err(tid, "PTRACE_INTERRUPT", e))
    }

    /// Non-blocking: the next stop of `tid`, if one is pending.
    ///
    /// When the leader of a spawned program exits, the rest of its process
    /// group is killed before the exit is collected, so that nothing the
    /// program started outlives it.
    pub fn try_wait(&mut self, tid: Pid) -> Result<Option<Stop>, PtraceError> {
        self.track(tid, "waitpid")?;
        if tid == self.pid {
            if let Some(g) = &self.guard {
                // Peek without reaping: while the leader is a zombie its
                // process group id cannot be reused.
                let flags = WaitPidFlag::WEXITED
                    | WaitPidFlag::WNOHANG
                    | WaitPidFlag::WNOWAIT
                    | WaitPidFlag::__WALL;
                if let Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) =
                    waitid(Id::Pid(tid), flags)
                {
                    g.kill_group_members();
                }
            }
        }
        let status = match waitpid_raw(tid, libc::__WALL | libc::WNOHANG) {
            Ok(None) => return Ok(None),
            Ok(Some(s)) => s,
            Err(Errno::ECHILD) => {
                self.forget(tid);
                return Err(PtraceError::Gone { tid, op: "waitpid" });
            }
            Err(e) => return Err(op_err(tid, "waitpid", e)),
        };
        let stop = self.decode(tid, status)?;
        match stop {
            None => Ok(None),
            Some(s) if s.is_terminal() => {
                self.forget(tid);
                Ok(Some(s))
            }
            Some(s) => {
                self.set_state(tid, ThreadState::Stopped);
                if let Some(t) = self.threads.get_mut(&tid) {
                    t.signal_path = matches!(
                        s,
                        Stop::EventStop { .. } | Stop::Signal { .. } | Stop::Int3 | Stop::Step
                    );
                }
                if s == (Stop::EventStop { sig: Sig::TRAP }) {
                    self.undo_interrupt_eintr(tid)?;
                }
                Ok(Some(s))
            }
        }
    }

    /// Wait (polling, never blocking) up to `timeout` for the next stop of
    /// `tid`.
    pub fn wait_stop(&mut self, tid: Pid, timeout: Duration) -> Result<Stop, PtraceError> {
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            if let Some(s) = self.try_wait(tid)? {
                return Ok(s);
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(PtraceError::Timeout { tid, waited });
            }
            // Most stops come within microseconds (a remote system call, a
            // resumed thread reaching its breakpoint): yield the processor
            // first, since the shortest sleep costs tens of microseconds
            // of timer slack on each of the many stops of a pause.
            if waited < WAIT_SPIN {
                std::thread::yield_now();
                continue;
            }
            std::thread::sleep(pause.min(timeout - waited));
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    fn forget(&mut self, tid: Pid) {
        const MAX_GONE: usize = 1 << 16;
        if self.threads.remove(&tid).is_some() {
            if self.gone.len() >= MAX_GONE {
                self.gone.clear();
            }
            self.gone.insert(tid);
        }
        if tid == self.pid {
            if let Some(g) = &mut self.guard {
                g.mark_reaped();
            }
        }
    }

    fn adopt(&mut self, tid: Pid) {
        self.threads
            .entry(tid)
            .or_insert(Track::new(ThreadState::Running));
    }

    fn event_msg(&self, tid: Pid) -> Result<u64, PtraceError> {
        ptrace::getevent(tid)
            .map(|v| v as u64)
            .map_err(|e| op_err(tid, "PTRACE_GETEVENTMSG", e))
    }

    fn decode(&mut self, tid: Pid, status: c_int) -> Result<Option<Stop>, PtraceError> {
        if libc::WIFEXITED(status) {
            return Ok(Some(Stop::Exited {
                code: libc::WEXITSTATUS(status),
            }));
        }
        if libc::WIFSIGNALED(status) {
            return Ok(Some(Stop::Killed {
                sig: Sig(libc::WTERMSIG(status)),
                core: libc::WCOREDUMP(status),
            }));
        }
        if !libc::WIFSTOPPED(status) {
            return Ok(None);
        }
        let sig = Sig(libc::WSTOPSIG(status));
        let event = (status >> 16) & 0xff;
        // Ids from the kernel are pids; they fit an i32.
        let new_pid = |v: u64| Pid::from_raw(v as i32);
        let stop = match event {
            0 if sig.0 == libc::SIGTRAP | 0x80 => Stop::Syscall,
            0 => {
                // The thread may die between the stop and this query; then
                // report the stop without its code.
                let code = ptrace::getsiginfo(tid).map(|i| i.si_code).unwrap_or(0);
                match (sig, code) {
                    (Sig::TRAP, SI_KERNEL) => Stop::Int3,
                    (Sig::TRAP, TRAP_TRACE) => Stop::Step,
                    _ => Stop::Signal { sig, code },
                }
            }
            libc::PTRACE_EVENT_CLONE => {
                let new = new_pid(self.event_msg(tid)?);
                self.adopt(new);
                Stop::Clone { new }
            }
            libc::PTRACE_EVENT_FORK => {
                let child = new_pid(self.event_msg(tid)?);
                self.adopt(child);
                Stop::Fork { child }
            }
            libc::PTRACE_EVENT_VFORK => {
                let child = new_pid(self.event_msg(tid)?);
                self.adopt(child);
                Stop::Vfork { child }
            }
            libc::PTRACE_EVENT_VFORK_DONE => Stop::VforkDone,
            libc::PTRACE_EVENT_EXEC => {
                // Handles opened before now read the former address space.
                self.mem = std::cell::OnceCell::new();
                self.maps_may_change();
                let former_tid = new_pid(self.event_msg(tid)?);
                if former_tid != tid {
                    self.threads.remove(&former_tid);
                }
                Stop::Exec { former_tid }
            }
            libc::PTRACE_EVENT_EXIT => Stop::Exiting {
                status: self.event_msg(tid)? as i64,
            },
            libc::PTRACE_EVENT_STOP => Stop::EventStop { sig },
            other => Stop::OtherEvent { event: other },
        };
        Ok(Some(stop))
    }

    /// Detach from stopped thread `tid` (delivering `sig`, or the signal kept
    /// while seizing) and stop tracking it.
    pub fn detach_thread(&mut self, tid: Pid, sig: Option<Sig>) -> Result<(), PtraceError> {
        // Detached where it is, it would show the program a restart code.
        let parked = self.park_for_restart(tid, "PTRACE_DETACH");
        if let Err(PtraceError::Gone { .. }) = parked {
            self.threads.remove(&tid);
            return parked;
        }
        let pending = self.track(tid, "PTRACE_DETACH")?.pending_signal;
        let sig = self.unless_continued(sig.or(pending));
        self.released_at = Some(Instant::now());
        let r = ptrace_int(libc::PTRACE_DETACH, tid, sig.map_or(0, |s| s.0));
        self.threads.remove(&tid);
        r.map_err(|e| op_err(tid, "PTRACE_DETACH", e))
    }

    /// Stop (if running) and detach every traced thread; the program keeps
    /// running. Bounded: a thread that does not stop within 2 s is skipped
    /// and reported in the error.
    pub fn detach(self) -> Result<(), PtraceError> {
        self.detach_timed().0
    }

    /// [`Tracee::detach`], with the moment the last thread was let go (just
    /// before its `PTRACE_DETACH`; `None` if no thread was detached).
    pub fn detach_timed(mut self) -> (Result<(), PtraceError>, Option<Instant>) {
        let r = self.detach_all();
        // A spawned program detached on purpose must not be killed on drop.
        if let Some(g) = &mut self.guard {
            g.mark_reaped();
            // `spawn` handed the program over in a SIGSTOP group-stop, which
            // the kernel re-enters at detach: end it so the program runs on.
            let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGCONT);
        }
        (r, self.released_at)
    }

    fn detach_all(&mut self) -> Result<(), PtraceError> {
        let mut first_err = None;
        let tids: Vec<Pid> = self.threads.keys().copied().collect();
        for &tid in &tids {
            if self.state(tid) == Some(ThreadState::Running) {
                let _ = self.interrupt(tid);
            }
        }
        for tid in tids {
            if self.state(tid) == Some(ThreadState::Running) {
                match self.wait_stop(tid, Duration::from_secs(2)) {
                    Ok(Stop::Signal { sig, .. }) => {
                        self.keep_signal(tid, sig);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        first_err.get_or_insert(e);
                        continue;
                    }
                }
            }
            if self.threads.contains_key(&tid) {
                if let Err(e) = self.detach_thread(tid, None) {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// SIGKILL the program (its process group, for a spawned one) and reap
    /// every traced thread. Returns the leader's final stop if it was seen.
    pub fn kill(mut self) -> Option<Stop> {
        self.kill_and_reap()
    }

    fn kill_and_reap(&mut self) -> Option<Stop> {
        if let Some(g) = &self.guard {
            g.kill_group_members();
        }
        let _ = signal::kill(self.pid, Signal::SIGKILL);
        // Traced threads are zombies until their tracer reaps them, and the
        // leader is only reported after the others: reap them all.
        let mut tids: BTreeSet<Pid> = self.threads.keys().copied().collect();
        if let Ok(t) = procfs::list_tasks(self.pid) {
            tids.extend(t);
        }
        let mut leader_stop = None;
        let start = Instant::now();
        let mut pause = Duration::from_micros(50);
        while !tids.is_empty() && start.elapsed() < REAP_TIMEOUT {
            for tid in tids.clone() {
                if tid != self.pid {
                    // Other processes we trace (vfork children) die with
                    // the group or on their own; make sure.
                    let _ = signal::kill(tid, Signal::SIGKILL);
                }
                match waitpid_raw(tid, libc::__WALL | libc::WNOHANG) {
                    Ok(Some(s)) if libc::WIFEXITED(s) || libc::WIFSIGNALED(s) => {
                        if tid == self.pid {
                            leader_stop = self.decode(tid, s).ok().flatten();
                        }
                        tids.remove(&tid);
                        self.forget(tid);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        tids.remove(&tid);
                        self.forget(tid);
                    }
                }
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
        self.threads.clear();
        leader_stop
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        if self.guard.as_ref().is_some_and(|g| !g.is_reaped()) {
            self.kill_and_reap();
        } else if self.guard.is_none() {
            let _ = self.detach_all();
        }
        // A spawned tracee whose leader was reaped may still trace threads
        // of other processes it started (vfork children): reap them too.
        if self.guard.is_some() && !self.threads.is_empty() {
            for tid in self.traced() {
                let _ = signal::kill(tid, Signal::SIGKILL);
                let _ = waitpid_bounded(tid, libc::__WALL, Duration::from_millis(500));
            }
        }
    }
}

/// Stop signals (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU): a SIGCONT discards
/// those sent before it, as the kernel does with pending ones.
fn is_stop_signal(sig: Sig) -> bool {
    [libc::SIGSTOP, libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU].contains(&sig.0)
}

/// Forget the stop signals kept for every thread (a SIGCONT came after
/// them): delivered at the resume, they would stop the process after the
/// continue that should have cancelled them.
fn drop_kept_stops(threads: &mut BTreeMap<Pid, Track>) {
    for t in threads.values_mut() {
        if t.pending_signal.is_some_and(is_stop_signal) {
            t.pending_signal = None;
        }
    }
}

/// Whether a SIGCONT is pending for process `pid` or any of its threads
/// (`ShdPnd`, `SigPnd` of `/proc/PID/task/*/status`; bounded by the
/// thread-count cap of the task listing).
fn sigcont_pending(pid: Pid) -> bool {
    let bit = 1u64 << (libc::SIGCONT - 1);
    let Ok(tasks) = procfs::list_tasks(pid) else {
        return false;
    };
    tasks.iter().any(|tid| {
        procfs::read_task_status(pid, *tid).is_ok_and(|text| {
            text.lines()
                .filter_map(|l| {
                    l.strip_prefix("SigPnd:")
                        .or_else(|| l.strip_prefix("ShdPnd:"))
                })
                .filter_map(|v| u64::from_str_radix(v.trim(), 16).ok())
                .any(|set| set & bit != 0)
        })
    })
}
