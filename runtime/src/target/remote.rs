//! System calls and function calls executed by a stopped, traced thread of
//! the target, as an RAII session ([`RemoteCalls`]) that leaves the thread
//! exactly as it found it.
//!
//! How a session works:
//! - It saves the thread's registers (general and extended: x87/SSE/AVX) and
//!   16 code bytes at a *gadget* address: an executable address the program
//!   will never run again, normally the entry point `_start` of the running
//!   image ([`entry_gadget`]). There it writes `syscall; int3` followed by
//!   an 8-byte signal mask (read by the kernel from there, so no writable
//!   memory is needed before the first call).
//! - A system call sets rax/rdi/rsi/rdx/r10/r8/r9, `orig_rax = -1` (so that
//!   a system call the thread was interrupted in is not restarted now) and
//!   rip = gadget, continues the thread to the `int3`, and reads rax.
//! - A function call sets rip = function, the integer arguments, rsp on a
//!   private stack with the return address pointing at the `int3`, and
//!   continues until that `int3` (bounded by a timeout).
//! - Its first action blocks every signal in the thread, so that signals
//!   arriving meanwhile stay pending in the kernel with their details.
//!   Signals taken before the mask was in place, and the signal the tracer
//!   kept for the thread, are queued again before the original mask is put
//!   back. When the session ends the mask is restored, the gadget bytes and
//!   all registers too; a signal that becomes deliverable at that moment is
//!   left as the one the thread stops for (kept by the [`Tracee`]), so it is
//!   delivered at the next resume exactly as if it had interrupted the
//!   thread where it was.
//! - Scratch memory (strings, structures, the call stack) is a private
//!   anonymous mapping made on first use and removed at the end; the
//!   thread's own stack is never touched.
//!
//! After a session the thread sits in a ptrace signal-delivery-stop with its
//! original registers; resume it with [`Tracee::cont`] without a signal.
//! Breakpoints armed elsewhere must not lie in code a remote call runs. A
//! remote function call abandoned after its timeout leaves whatever it held
//! (a lock taken by the called function) held: call only functions that
//! take no locks, such as IFUNC resolvers.

use crate::memory::TargetMemory;
use crate::target::procfs::{self, ProcError};
use crate::target::ptrace::{ExtRegs, PtraceError, Regs, Sig, Stop, Tracee, SIGINFO_SIZE};
use crate::target::ProcessMemory;
use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use object::read::elf::FileHeader;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use upstare_dwarf::{LoadBias, RuntimeAddr};

/// The x86-64 System V red zone below rsp that a leaf function may use.
pub const RED_ZONE: u64 = 128;
/// Default bound on one remote system call or function call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes borrowed at the gadget address: `syscall; int3`, padding, and an
/// 8-byte signal mask at offset [`MASK_OFFSET`].
pub const GADGET_LEN: usize = 16;
const MASK_OFFSET: u64 = 8;
/// Offset of the `int3` a remote call returns to.
const INT3_OFFSET: u64 = 2;
/// Offset where the thread stops after the `int3`.
const DONE_OFFSET: u64 = 3;
const GADGET_CODE: [u8; 8] = [0x0f, 0x05, 0xcc, 0x90, 0x90, 0x90, 0x90, 0x90];
/// Scratch mapping: data area, then the stack remote calls run on.
const SCRATCH_DATA: u64 = 64 << 10;
const SCRATCH_STACK: u64 = 256 << 10;
/// Bound on stops handled while one remote operation runs.
const MAX_STOPS: usize = 1000;
/// `sizeof(kernel sigset_t)` on x86-64.
const SIGSET_SIZE: u64 = 8;
/// `AT_FDCWD`.
pub const AT_FDCWD: i64 = -100;

/// Why a remote operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Ptrace(#[from] PtraceError),
    #[error(transparent)]
    Mem(#[from] crate::memory::MemError),
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error("pid {pid}: remote {call} failed: {errno}")]
    Syscall {
        pid: i32,
        call: String,
        errno: Errno,
    },
    #[error("thread {tid}: remote {op} faulted with {sig} at {rip} (address {addr:#x})")]
    Fault {
        tid: i32,
        op: String,
        sig: Sig,
        rip: RuntimeAddr,
        addr: u64,
    },
    #[error("thread {tid}: remote {op} ended with an unexpected {stop} at {rip}")]
    Unexpected {
        tid: i32,
        op: String,
        stop: String,
        rip: RuntimeAddr,
    },
    #[error("thread {tid}: remote {op} did not finish within {waited:?}")]
    Timeout {
        tid: i32,
        op: String,
        waited: Duration,
    },
    #[error("thread {tid}: the thread ended during remote {op} ({stop})")]
    Ended { tid: i32, op: String, stop: String },
    #[error("thread {tid}: more than {cap} stops during remote {op}")]
    TooManyStops { tid: i32, op: String, cap: usize },
    #[error("remote call of {func}: {n} arguments, at most 6 are supported")]
    TooManyArgs { func: RuntimeAddr, n: usize },
    #[error("remote {call}: {n} arguments, at most 6 are supported")]
    TooManySyscallArgs { call: String, n: usize },
    #[error("pid {pid}: gadget address {addr} is not inside an executable mapping")]
    BadGadget { pid: i32, addr: RuntimeAddr },
    #[error("pid {pid}: remote scratch memory exhausted ({want} bytes wanted, {left} left)")]
    ScratchFull { pid: i32, want: u64, left: u64 },
    #[error("{path}: cannot find its entry point: {reason}")]
    Entry { path: PathBuf, reason: String },
    #[error("thread {tid}: cannot read its signal mask: {reason}")]
    SigMask { tid: i32, reason: String },
}

/// A `struct sigaction` as the kernel's `rt_sigaction` takes it on x86-64.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelSigaction {
    /// `sa_handler` / `sa_sigaction` (0 = SIG_DFL, 1 = SIG_IGN).
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    /// Signals blocked while the handler runs (bit n-1 = signal n).
    pub mask: u64,
}

impl KernelSigaction {
    /// Size in the target.
    pub const SIZE: usize = 32;

    /// The kernel layout.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        for (i, v) in [self.handler, self.flags, self.restorer, self.mask]
            .into_iter()
            .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Decode the kernel layout.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> KernelSigaction {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        KernelSigaction {
            handler: word(0),
            flags: word(1),
            restorer: word(2),
            mask: word(3),
        }
    }
}

/// Runtime address of the entry point (`e_entry`) of the ELF file `path`
/// loaded with `bias`: the usual gadget address for [`RemoteCalls::new`].
pub fn entry_gadget(path: &Path, bias: LoadBias) -> Result<RuntimeAddr, RemoteError> {
    let entry_err = |reason: String| RemoteError::Entry {
        path: path.to_path_buf(),
        reason,
    };
    // The ELF header (64 bytes) is all that is needed.
    let mut data = Vec::with_capacity(64);
    std::io::Read::read_to_end(
        &mut std::io::Read::take(
            std::fs::File::open(path).map_err(|e| entry_err(e.to_string()))?,
            64,
        ),
        &mut data,
    )
    .map_err(|e| entry_err(e.to_string()))?;
    let hdr = object::elf::FileHeader64::<object::Endianness>::parse(&*data)
        .map_err(|e| entry_err(e.to_string()))?;
    let endian = hdr.endian().map_err(|e| entry_err(e.to_string()))?;
    let e_entry = hdr.e_entry(endian);
    if e_entry == 0 {
        return Err(entry_err("e_entry is 0".into()));
    }
    Ok(RuntimeAddr(e_entry.wrapping_add(bias.0)))
}

/// Runtime entry point of the executable process `pid` was started from
/// (`AT_ENTRY`); a gadget address as long as that image stays executable.
pub fn exe_entry(pid: Pid) -> Result<RuntimeAddr, RemoteError> {
    let auxv = procfs::read_auxv(pid)?;
    Ok(RuntimeAddr(procfs::auxv_value(&auxv, procfs::AT_ENTRY)?))
}

/// Decode a raw system call return: -4095..-1 is `-errno`.
pub fn decode_return(rax: u64) -> Result<u64, Errno> {
    let v = rax as i64;
    if (-4095..0).contains(&v) {
        Err(Errno::from_raw((-v) as i32))
    } else {
        Ok(rax)
    }
}

/// The blocked-signal mask of a thread, from `/proc/PID/task/TID/status`.
fn read_sigmask(pid: Pid, tid: Pid) -> Result<u64, RemoteError> {
    read_status_mask(pid, tid, "SigBlk:")
}

/// The signals the process has a handler for (not default, not ignored),
/// from `SigCgt` of `/proc/PID/task/TID/status`: bit `n - 1` for signal
/// `n`. Only these can have a handler in the running image's code.
pub fn caught_signals(pid: Pid, tid: Pid) -> Result<u64, RemoteError> {
    read_status_mask(pid, tid, "SigCgt:")
}

/// The hexadecimal mask on line `key` of `/proc/PID/task/TID/status`.
fn read_status_mask(pid: Pid, tid: Pid, key: &str) -> Result<u64, RemoteError> {
    let err = |reason: String| RemoteError::SigMask {
        tid: tid.as_raw(),
        reason,
    };
    let path = format!("/proc/{pid}/task/{tid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| err(format!("{path}: {e}")))?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .ok_or_else(|| err(format!("{path} has no {key} line")))?;
    u64::from_str_radix(line.trim(), 16).map_err(|_| err(format!("bad {key} {line:?}")))
}

/// How one remote run ended.
enum RunEnd {
    /// Reached the `int3`; rax at that point.
    Done(u64),
    /// Stopped for `sig` after the system call completed (only when the
    /// caller asked for it: the final unmasking).
    SignalAfter(Sig),
}

/// A signal taken from the thread during the session, to be queued again.
#[derive(Clone)]
enum Caught {
    /// With the kernel's siginfo.
    Info([u8; SIGINFO_SIZE]),
    /// Only the number (kept by the tracer before the session).
    Plain(Sig),
}

impl Caught {
    fn sig(&self) -> Sig {
        match self {
            Caught::Info(b) => Sig(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Caught::Plain(s) => *s,
        }
    }
}

/// A remote-execution session in one stopped thread (see the module doc).
/// Dropping it restores the thread; [`RemoteCalls::finish`] does the same
/// and reports failures.
pub struct RemoteCalls<'t> {
    tracee: &'t mut Tracee,
    tid: Pid,
    mem: ProcessMemory,
    regs: Regs,
    ext: ExtRegs,
    gadget: RuntimeAddr,
    gadget_orig: [u8; GADGET_LEN],
    orig_mask: u64,
    masked: bool,
    caught: Vec<Caught>,
    /// Base of the scratch mapping, once made.
    scratch: Option<RuntimeAddr>,
    /// Bytes of the scratch data area in use.
    scratch_used: u64,
    timeout: Duration,
    /// Whether the thread was already restored.
    restored: bool,
}

impl fmt::Debug for RemoteCalls<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteCalls")
            .field("tid", &self.tid)
            .field("gadget", &self.gadget)
            .field("scratch", &self.scratch)
            .finish()
    }
}

impl<'t> RemoteCalls<'t> {
    /// Start a session in stopped thread `tid`, borrowing the code bytes at
    /// `gadget` (an executable address never run again, e.g. `_start`).
    pub fn new(
        tracee: &'t mut Tracee,
        tid: Pid,
        gadget: RuntimeAddr,
    ) -> Result<RemoteCalls<'t>, RemoteError> {
        let maps = procfs::read_maps(tracee.pid())?;
        Self::with_maps(tracee, tid, gadget, &maps)
    }

    /// [`RemoteCalls::new`] with the process's current `/proc/PID/maps`
    /// already read (the update reads them once while the process is
    /// paused, and nothing maps or unmaps code meanwhile).
    pub fn with_maps(
        tracee: &'t mut Tracee,
        tid: Pid,
        gadget: RuntimeAddr,
        maps: &[procfs::MemoryMap],
    ) -> Result<RemoteCalls<'t>, RemoteError> {
        let pid = tracee.pid();
        let regs = tracee.regs(tid)?;
        let ext = tracee.ext_regs(tid)?;
        let end = gadget
            .checked_offset(GADGET_LEN as i64)
            .ok_or(RemoteError::BadGadget {
                pid: pid.as_raw(),
                addr: gadget,
            })?;
        if !maps
            .iter()
            .any(|m| m.perms.exec && m.start <= gadget && end <= m.end)
        {
            return Err(RemoteError::BadGadget {
                pid: pid.as_raw(),
                addr: gadget,
            });
        }
        let orig_mask = read_sigmask(pid, tid)?;
        let mut mem = ProcessMemory::open(pid);
        let mut gadget_orig = [0u8; GADGET_LEN];
        mem.read(gadget, &mut gadget_orig)?;
        let mut code = [0u8; GADGET_LEN];
        code[..8].copy_from_slice(&GADGET_CODE);
        code[8..].copy_from_slice(&u64::MAX.to_le_bytes());
        mem.write(gadget, &code)?;
        let kept = tracee.take_pending_signal(tid);
        let mut rc = RemoteCalls {
            tracee,
            tid,
            mem,
            regs,
            ext,
            gadget,
            gadget_orig,
            orig_mask,
            masked: false,
            caught: kept.map(Caught::Plain).into_iter().collect(),
            scratch: None,
            scratch_used: 0,
            timeout: DEFAULT_TIMEOUT,
            restored: false,
        };
        // Block every signal first (the mask is read from the gadget area),
        // so that nothing is delivered while remote code runs.
        let r = rc.raw_syscall(
            "rt_sigprocmask",
            libc::SYS_rt_sigprocmask,
            &[
                libc::SIG_SETMASK as u64,
                gadget.0 + MASK_OFFSET,
                0,
                SIGSET_SIZE,
            ],
        );
        match r {
            Ok(_) => {
                rc.masked = true;
                Ok(rc)
            }
            Err(e) => {
                // Dropping `rc` restores what was changed.
                Err(e)
            }
        }
    }

    /// Bound each following remote operation by `timeout`.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The thread the session runs in.
    pub fn tid(&self) -> Pid {
        self.tid
    }

    /// The target process.
    pub fn pid(&self) -> Pid {
        self.tracee.pid()
    }

    /// The borrowed gadget address.
    pub fn gadget(&self) -> RuntimeAddr {
        self.gadget
    }

    /// The range of code bytes borrowed at the gadget.
    pub fn gadget_range(&self) -> std::ops::Range<RuntimeAddr> {
        self.gadget..RuntimeAddr(self.gadget.0 + GADGET_LEN as u64)
    }

    /// Registers of the thread as they were when the session started (and
    /// will be again when it ends).
    pub fn saved_regs(&self) -> &Regs {
        &self.regs
    }

    /// Memory of the target process.
    pub fn memory(&mut self) -> &mut ProcessMemory {
        &mut self.mem
    }

    fn op_err_unexpected(&self, op: &str, stop: &Stop, rip: u64) -> RemoteError {
        RemoteError::Unexpected {
            tid: self.tid.as_raw(),
            op: op.to_string(),
            stop: format!("{stop:?}"),
            rip: RuntimeAddr(rip),
        }
    }

    /// Set `regs`, resume, and wait until rip reaches `done` (one past the
    /// `int3`). Asynchronous signals are taken and kept; with
    /// `signal_after`, a signal stop at the `int3` itself ends the run.
    fn run(
        &mut self,
        op: &str,
        regs: &Regs,
        done: u64,
        signal_after: bool,
    ) -> Result<RunEnd, RemoteError> {
        let tid = self.tid;
        self.tracee.set_regs(tid, regs)?;
        self.tracee.cont(tid, None)?;
        let start = Instant::now();
        for _ in 0..MAX_STOPS {
            let left = self.timeout.saturating_sub(start.elapsed());
            let stop = match self.tracee.wait_stop(tid, left) {
                Ok(s) => s,
                Err(PtraceError::Timeout { .. }) => {
                    self.stop_runaway();
                    return Err(RemoteError::Timeout {
                        tid: tid.as_raw(),
                        op: op.to_string(),
                        waited: start.elapsed(),
                    });
                }
                Err(PtraceError::Gone { .. }) => {
                    return Err(RemoteError::Ended {
                        tid: tid.as_raw(),
                        op: op.to_string(),
                        stop: "gone".into(),
                    })
                }
                Err(e) => return Err(e.into()),
            };
            if stop.is_terminal() || matches!(stop, Stop::Exiting { .. }) {
                return Err(RemoteError::Ended {
                    tid: tid.as_raw(),
                    op: op.to_string(),
                    stop: format!("{stop:?}"),
                });
            }
            match stop {
                Stop::Int3 => {
                    let now = self.tracee.regs(tid)?;
                    if now.0.rip == done {
                        return Ok(RunEnd::Done(now.0.rax));
                    }
                    return Err(self.op_err_unexpected(op, &stop, now.0.rip));
                }
                Stop::Signal { sig, code } => {
                    let rip = self.tracee.regs(tid)?.0.rip;
                    let synchronous = [
                        libc::SIGSEGV,
                        libc::SIGBUS,
                        libc::SIGILL,
                        libc::SIGFPE,
                        libc::SIGTRAP,
                        libc::SIGSYS,
                    ]
                    .contains(&sig.0)
                        && code > 0;
                    if synchronous {
                        let info = self.tracee.siginfo_bytes(tid)?;
                        let mut a = [0u8; 8];
                        a.copy_from_slice(&info[16..24]);
                        return Err(RemoteError::Fault {
                            tid: tid.as_raw(),
                            op: op.to_string(),
                            sig,
                            rip: RuntimeAddr(rip),
                            addr: u64::from_le_bytes(a),
                        });
                    }
                    if signal_after && rip == done - 1 {
                        return Ok(RunEnd::SignalAfter(sig));
                    }
                    // Keep it (with its details) and suppress it for now.
                    let info = self.tracee.siginfo_bytes(tid)?;
                    self.caught.push(Caught::Info(info));
                    self.tracee.cont(tid, None)?;
                }
                // A late interrupt from seizing, or a group-stop: go on.
                Stop::EventStop { .. } => self.tracee.cont(tid, None)?,
                other => {
                    let rip = self.tracee.regs(tid).map(|r| r.0.rip).unwrap_or(0);
                    return Err(self.op_err_unexpected(op, &other, rip));
                }
            }
        }
        self.stop_runaway();
        Err(RemoteError::TooManyStops {
            tid: tid.as_raw(),
            op: op.to_string(),
            cap: MAX_STOPS,
        })
    }

    /// Stop the thread after a timeout so that its registers can be
    /// restored (bounded wait).
    fn stop_runaway(&mut self) {
        let tid = self.tid;
        if self.tracee.interrupt(tid).is_err() {
            return;
        }
        if let Ok(Stop::Signal { .. }) = self.tracee.wait_stop(tid, Duration::from_secs(2)) {
            if let Ok(info) = self.tracee.siginfo_bytes(tid) {
                self.caught.push(Caught::Info(info));
            }
        }
    }

    fn raw_syscall(&mut self, name: &str, nr: i64, args: &[u64]) -> Result<u64, RemoteError> {
        if args.len() > 6 {
            return Err(RemoteError::TooManySyscallArgs {
                call: name.to_string(),
                n: args.len(),
            });
        }
        let mut r = self.regs;
        r.0.rax = nr as u64;
        r.0.orig_rax = u64::MAX;
        let slots = [
            &mut r.0.rdi,
            &mut r.0.rsi,
            &mut r.0.rdx,
            &mut r.0.r10,
            &mut r.0.r8,
            &mut r.0.r9,
        ];
        for (slot, &a) in slots.into_iter().zip(args) {
            *slot = a;
        }
        r.0.rip = self.gadget.0;
        // No single-stepping or direction flag left over from the thread.
        r.0.eflags &= !0x500;
        match self.run(name, &r, self.gadget.0 + DONE_OFFSET, false)? {
            RunEnd::Done(rax) => Ok(rax),
            RunEnd::SignalAfter(_) => unreachable_signal(),
        }
    }

    /// Execute system call `nr` with up to 6 arguments; the raw return value
    /// (`-errno` on failure).
    pub fn syscall(&mut self, nr: i64, args: &[u64]) -> Result<i64, RemoteError> {
        self.raw_syscall(&format!("syscall {nr}"), nr, args)
            .map(|v| v as i64)
    }

    /// Execute system call `nr` named `name`; a `-errno` return becomes
    /// [`RemoteError::Syscall`].
    pub fn syscall_checked(
        &mut self,
        name: &str,
        nr: i64,
        args: &[u64],
    ) -> Result<u64, RemoteError> {
        let rax = self.raw_syscall(name, nr, args)?;
        decode_return(rax).map_err(|errno| RemoteError::Syscall {
            pid: self.pid().as_raw(),
            call: name.to_string(),
            errno,
        })
    }

    /// `getpid()` in the target.
    pub fn getpid(&mut self) -> Result<Pid, RemoteError> {
        let v = self.syscall_checked("getpid", libc::SYS_getpid, &[])?;
        Ok(Pid::from_raw(v as i32))
    }

    /// `mmap(addr, len, prot, flags, fd, offset)` in the target.
    pub fn mmap(
        &mut self,
        addr: RuntimeAddr,
        len: u64,
        prot: i32,
        flags: i32,
        fd: i32,
        offset: u64,
    ) -> Result<RuntimeAddr, RemoteError> {
        let v = self.syscall_checked(
            &format!("mmap({addr}, {len:#x}, prot {prot:#x}, flags {flags:#x}, fd {fd}, offset {offset:#x})"),
            libc::SYS_mmap,
            &[
                addr.0,
                len,
                prot as u64,
                flags as u64,
                fd as i64 as u64,
                offset,
            ],
        )?;
        Ok(RuntimeAddr(v))
    }

    /// `munmap(addr, len)` in the target.
    pub fn munmap(&mut self, addr: RuntimeAddr, len: u64) -> Result<(), RemoteError> {
        self.syscall_checked(
            &format!("munmap({addr}, {len:#x})"),
            libc::SYS_munmap,
            &[addr.0, len],
        )
        .map(drop)
    }

    /// `mprotect(addr, len, prot)` in the target.
    pub fn mprotect(&mut self, addr: RuntimeAddr, len: u64, prot: i32) -> Result<(), RemoteError> {
        self.syscall_checked(
            &format!("mprotect({addr}, {len:#x}, {prot:#x})"),
            libc::SYS_mprotect,
            &[addr.0, len, prot as u64],
        )
        .map(drop)
    }

    /// `openat(AT_FDCWD, path, flags, mode)` in the target; the new fd.
    pub fn openat(&mut self, path: &Path, flags: i32, mode: u32) -> Result<i32, RemoteError> {
        use std::os::unix::ffi::OsStrExt;
        let mut bytes = path.as_os_str().as_bytes().to_vec();
        bytes.push(0);
        let mark = self.scratch_used;
        let at = self.scratch_write(&bytes)?;
        let r = self.syscall_checked(
            &format!("openat({})", path.display()),
            libc::SYS_openat,
            &[AT_FDCWD as u64, at.0, flags as u64, u64::from(mode)],
        );
        self.scratch_used = mark;
        Ok(r? as i32)
    }

    /// `close(fd)` in the target.
    pub fn close(&mut self, fd: i32) -> Result<(), RemoteError> {
        self.syscall_checked(
            &format!("close({fd})"),
            libc::SYS_close,
            &[fd as i64 as u64],
        )
        .map(drop)
    }

    /// `rt_sigaction(sig, new, &old)` in the target: install `new` (if any)
    /// and return the action that was in place.
    pub fn rt_sigaction(
        &mut self,
        sig: i32,
        new: Option<&KernelSigaction>,
    ) -> Result<KernelSigaction, RemoteError> {
        let mark = self.scratch_used;
        let r = (|| {
            let old_at = self.scratch_alloc(KernelSigaction::SIZE as u64)?;
            let new_at = match new {
                Some(a) => self.scratch_write(&a.to_bytes())?.0,
                None => 0,
            };
            self.syscall_checked(
                &format!("rt_sigaction({sig})"),
                libc::SYS_rt_sigaction,
                &[sig as u64, new_at, old_at.0, SIGSET_SIZE],
            )?;
            let mut b = [0u8; KernelSigaction::SIZE];
            self.mem.read(old_at, &mut b)?;
            Ok(KernelSigaction::from_bytes(&b))
        })();
        self.scratch_used = mark;
        r
    }

    /// Call the function at `func` with up to 6 integer arguments on a
    /// private stack; its return value (rax).
    pub fn call(&mut self, func: RuntimeAddr, args: &[u64]) -> Result<u64, RemoteError> {
        if args.len() > 6 {
            return Err(RemoteError::TooManyArgs {
                func,
                n: args.len(),
            });
        }
        let base = self.ensure_scratch()?;
        // Stack top at the end of the mapping, 16-byte aligned, then the
        // return address: rsp + 8 is 16-byte aligned at the function entry
        // as the ABI requires.
        let top = (base.0 + SCRATCH_DATA + SCRATCH_STACK - 64) & !15;
        let rsp = top - 8;
        self.mem
            .write_u64(RuntimeAddr(rsp), self.gadget.0 + INT3_OFFSET)?;
        let mut r = self.regs;
        let slots = [
            &mut r.0.rdi,
            &mut r.0.rsi,
            &mut r.0.rdx,
            &mut r.0.rcx,
            &mut r.0.r8,
            &mut r.0.r9,
        ];
        for (slot, &a) in slots.into_iter().zip(args) {
            *slot = a;
        }
        // rax = number of vector registers used by a variadic call.
        r.0.rax = 0;
        r.0.orig_rax = u64::MAX;
        r.0.rsp = rsp;
        r.0.rip = func.0;
        r.0.eflags &= !0x500;
        match self.run(
            &format!("call of {func}"),
            &r,
            self.gadget.0 + DONE_OFFSET,
            false,
        )? {
            RunEnd::Done(rax) => Ok(rax),
            RunEnd::SignalAfter(_) => unreachable_signal(),
        }
    }

    fn ensure_scratch(&mut self) -> Result<RuntimeAddr, RemoteError> {
        if let Some(b) = self.scratch {
            return Ok(b);
        }
        let b = self.mmap(
            RuntimeAddr(0),
            SCRATCH_DATA + SCRATCH_STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )?;
        self.scratch = Some(b);
        Ok(b)
    }

    /// Reserve `len` bytes (16-byte aligned) of scratch memory in the
    /// target, valid until [`RemoteCalls::scratch_reset`] or the end of the
    /// session.
    pub fn scratch_alloc(&mut self, len: u64) -> Result<RuntimeAddr, RemoteError> {
        let base = self.ensure_scratch()?;
        let start = self.scratch_used.next_multiple_of(16);
        let left = SCRATCH_DATA.saturating_sub(start);
        if len > left {
            return Err(RemoteError::ScratchFull {
                pid: self.pid().as_raw(),
                want: len,
                left,
            });
        }
        self.scratch_used = start + len;
        Ok(RuntimeAddr(base.0 + start))
    }

    /// Copy `data` into scratch memory; its address in the target.
    pub fn scratch_write(&mut self, data: &[u8]) -> Result<RuntimeAddr, RemoteError> {
        let at = self.scratch_alloc(data.len() as u64)?;
        self.mem.write(at, data)?;
        Ok(at)
    }

    /// Free all scratch memory handed out so far.
    pub fn scratch_reset(&mut self) {
        self.scratch_used = 0;
    }

    /// End the session: queue kept signals again, remove the scratch
    /// mapping, restore the signal mask, the gadget bytes and every
    /// register. Reports the first failure (everything is still attempted).
    pub fn finish(mut self) -> Result<(), RemoteError> {
        self.restore()
    }

    fn restore(&mut self) -> Result<(), RemoteError> {
        if self.restored {
            return Ok(());
        }
        self.restored = true;
        let mut first: Option<RemoteError> = None;
        let mut note = |r: Result<(), RemoteError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        let mut slot: Option<Sig> = None;
        let caught = std::mem::take(&mut self.caught);
        if self.masked {
            // Queue kept signals again while everything is blocked: they
            // wait in the kernel with their details.
            for c in &caught {
                let r = self.requeue(c);
                if r.is_err() && slot.is_none() && c.sig() != Sig::STOP {
                    slot = Some(c.sig());
                }
                note(r);
            }
            if let Some(b) = self.scratch.take() {
                note(self.munmap(b, SCRATCH_DATA + SCRATCH_STACK));
            }
            // Put the original mask back; a signal that becomes deliverable
            // now is the one the thread stays stopped for.
            let mask_at = RuntimeAddr(self.gadget.0 + MASK_OFFSET);
            let r = (|| {
                self.mem.write_u64(mask_at, self.orig_mask)?;
                let mut r = self.regs;
                r.0.rax = libc::SYS_rt_sigprocmask as u64;
                r.0.orig_rax = u64::MAX;
                r.0.rdi = libc::SIG_SETMASK as u64;
                r.0.rsi = mask_at.0;
                r.0.rdx = 0;
                r.0.r10 = SIGSET_SIZE;
                r.0.rip = self.gadget.0;
                r.0.eflags &= !0x500;
                match self.run("rt_sigprocmask", &r, self.gadget.0 + DONE_OFFSET, true)? {
                    RunEnd::Done(rax) => {
                        decode_return(rax).map_err(|errno| RemoteError::Syscall {
                            pid: self.pid().as_raw(),
                            call: "rt_sigprocmask (restoring the mask)".into(),
                            errno,
                        })?;
                    }
                    RunEnd::SignalAfter(sig) => {
                        if let Some(s) = slot.replace(sig) {
                            // Keep the earlier one in the kernel instead.
                            let _ = signal::kill(self.pid(), Signal::try_from(s.0).ok());
                        }
                    }
                }
                Ok(())
            })();
            note(r);
            // Only signals that cannot be blocked can have been taken since.
            for c in std::mem::take(&mut self.caught) {
                if c.sig() == Sig::STOP {
                    let _ = signal::kill(self.pid(), Signal::SIGSTOP);
                } else if slot.is_none() {
                    slot = Some(c.sig());
                }
            }
        } else {
            for c in &caught {
                if c.sig() == Sig::STOP {
                    let _ = signal::kill(self.pid(), Signal::SIGSTOP);
                } else if slot.is_none() {
                    slot = Some(c.sig());
                }
            }
            if let Some(b) = self.scratch.take() {
                note(self.munmap(b, SCRATCH_DATA + SCRATCH_STACK));
            }
        }
        let gadget = self.gadget;
        let orig = self.gadget_orig;
        note(self.mem.write(gadget, &orig).map_err(RemoteError::from));
        note(
            self.tracee
                .set_regs(self.tid, &self.regs)
                .map_err(Into::into),
        );
        note(
            self.tracee
                .set_ext_regs(self.tid, &self.ext)
                .map_err(Into::into),
        );
        if slot.is_some() {
            note(
                self.tracee
                    .set_pending_signal(self.tid, slot)
                    .map(drop)
                    .map_err(Into::into),
            );
        }
        first.map_or(Ok(()), Err)
    }

    /// Queue a kept signal to the thread again (signals are blocked).
    fn requeue(&mut self, c: &Caught) -> Result<(), RemoteError> {
        let pid = self.pid();
        let tid = self.tid;
        if c.sig() == Sig::STOP {
            // Cannot be blocked; a stop is process-wide anyway.
            let _ = signal::kill(pid, Signal::SIGSTOP);
            return Ok(());
        }
        match c {
            Caught::Info(info) => {
                let mark = self.scratch_used;
                let r = (|| {
                    let at = self.scratch_write(info)?;
                    self.syscall_checked(
                        "rt_tgsigqueueinfo",
                        libc::SYS_rt_tgsigqueueinfo,
                        &[
                            pid.as_raw() as u64,
                            tid.as_raw() as u64,
                            c.sig().0 as u64,
                            at.0,
                        ],
                    )
                })();
                self.scratch_used = mark;
                r.map(drop)
            }
            Caught::Plain(sig) => self
                .syscall_checked(
                    "tgkill",
                    libc::SYS_tgkill,
                    &[pid.as_raw() as u64, tid.as_raw() as u64, sig.0 as u64],
                )
                .map(drop),
        }
    }
}

/// `run` only reports a signal when asked to.
fn unreachable_signal<T>() -> Result<T, RemoteError> {
    Err(RemoteError::Unexpected {
        tid: 0,
        op: "remote run".into(),
        stop: "signal reported without being asked for".into(),
        rip: RuntimeAddr(0),
    })
}

impl Drop for RemoteCalls<'_> {
    fn drop(&mut self) {
        let _ = self.restore();
    }
}
