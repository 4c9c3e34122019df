//! System calls and function calls executed by a stopped, traced thread of
//! the target, as an RAII session ([`RemoteCalls`]) that leaves the thread
//! exactly as it found it.
//!
//! How a session works:
//! - It saves the thread's registers (general and extended: x87/SSE/AVX) and
//!   the code bytes at a *gadget* address: an executable address the program
//!   will never run again, normally the entry point `_start` of the running
//!   image ([`entry_gadget`]). Below the thread's red zone it writes a
//!   signal frame holding the thread's registers and mask, and at the
//!   gadget `syscall` followed by code that loads that frame with
//!   `rt_sigreturn` (see [`gadget_code`]).
//! - A system call sets rax/rdi/rsi/rdx/r10/r8/r9, `orig_rax = -1` (so that
//!   a system call the thread was interrupted in is not restarted now) and
//!   rip = gadget, and runs the thread with `PTRACE_SYSCALL` to the exit
//!   stop of that `syscall`, where rax is read.
//! - A function call sets rip = function, the integer arguments, rsp on a
//!   private stack with the return address pointing after the gadget's
//!   `syscall`, and runs until the entry stop of the gadget's
//!   `rt_sigreturn`, which is skipped (bounded by a timeout).
//! - So the updater may die at any moment (SIGKILL, OOM): the kernel
//!   detaches, the thread finishes what it was running and `rt_sigreturn`
//!   gives it back its registers and signal mask (the x87/SSE state is
//!   reset, and an interrupted sleep returns early with EINTR).
//! - Its first action blocks every signal in the thread, so that signals
//!   arriving meanwhile stay pending in the kernel with their details.
//!   Signals taken before the mask was in place, and the signal the tracer
//!   kept for the thread, are queued again before the original mask is put
//!   back. When the session ends the mask is restored, the gadget bytes and
//!   all registers too; a signal that becomes deliverable at that moment is
//!   left as the one the thread stops for (kept by the [`Tracee`]), so it is
//!   delivered at the next resume exactly as if it had interrupted the
//!   thread where it was.
//! - Scratch memory (strings, structures, the call stack, and the code of
//!   the loop [`RemoteCalls::call_each`] runs, in a page of its own made
//!   read-only executable) is a private
//!   anonymous mapping made on first use and removed at the end; of the
//!   thread's own stack only the frame below the red zone is borrowed (and
//!   put back).
//!
//! After a session the thread sits in a ptrace stop with its original
//! registers; resume it with [`Tracee::cont`] without a signal (which
//! restarts a system call it was interrupted in: the session ends in a
//! system-call stop, see [`Tracee::cont`]).
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
/// Bytes borrowed at the gadget address: the code (see [`gadget_code`])
/// and an 8-byte signal mask at offset [`MASK_OFFSET`].
pub const GADGET_LEN: usize = 32;
const MASK_OFFSET: u64 = 24;
/// Offset of the code a remote call returns to, and where a system call
/// op's thread stops (entry and exit stops of the `syscall` at offset 0).
const RETURN_OFFSET: u64 = 2;
/// Where the thread stops at the entry of the `rt_sigreturn` (one past its
/// `syscall`).
const SIGRETURN_STOP: u64 = 22;
/// The signal frame `rt_sigreturn` reads (a kernel `ucontext`), rounded up.
const FRAME_SIZE: u64 = 320;
/// `uc_flags`: `UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS` (cs and ss are
/// restored as saved).
const UC_FLAGS: u64 = 2 | 4;
/// `SS_DISABLE`: the thread's alternate signal stack as "none" until the
/// session reads the real one into the frame.
const SS_DISABLE: u32 = 2;
/// Scratch mapping: data area, then the stack remote calls run on, then
/// one page for the batch loop's code (made executable on first use).
/// The data area holds the argument and result arrays of
/// [`RemoteCalls::call_each`] (16 bytes per call); untouched pages cost
/// nothing (`MAP_NORESERVE`).
const SCRATCH_DATA: u64 = 1 << 20;
const SCRATCH_STACK: u64 = 256 << 10;
const SCRATCH_CODE: u64 = 4096;
const SCRATCH_LEN: u64 = SCRATCH_DATA + SCRATCH_STACK + SCRATCH_CODE;
/// Most bytes a session borrows on the thread's stack below its frame
/// (a path for `openat`).
const STACK_BORROW: u64 = 4096;
/// Bound on the calls one run of the batch loop makes.
pub const MAX_BATCH: usize = 1 << 16;
/// Bound on stops handled while one remote operation runs.
const MAX_STOPS: usize = 1000;
/// `sizeof(kernel sigset_t)` on x86-64.
const SIGSET_SIZE: u64 = 8;
/// `AT_FDCWD`.
pub const AT_FDCWD: i64 = -100;

/// The gadget's code, which survives the death of the tracer.
///
/// ```text
/// +0  syscall                  ; a system call op (entry and exit stops
///                              ; at +2, with PTRACE_SYSCALL)
/// +2  mov rdi, rax             ; a remote function call returns here
/// +5  movabs rsp, FRAME        ; the signal frame holding the thread's
/// +15 mov eax, 15              ; original registers and mask, then
/// +20 syscall                  ; rt_sigreturn: the thread is itself again
/// +22 int3; nop                ; never reached
/// +24 mask                     ; 8 bytes: every signal blocked
/// ```
///
/// While the tracer lives the thread never gets past +2 (a function call's
/// `rt_sigreturn` is stopped at its entry and skipped). If the tracer dies
/// at any moment, the kernel lets the thread go on: it finishes the system
/// call or function it was running and returns to its own code and mask,
/// instead of hitting a trap with no one to catch it.
fn gadget_code(frame: RuntimeAddr) -> [u8; GADGET_LEN] {
    let mut c = [0u8; GADGET_LEN];
    c[0..2].copy_from_slice(&[0x0f, 0x05]);
    c[2..5].copy_from_slice(&[0x48, 0x89, 0xc7]);
    c[5..7].copy_from_slice(&[0x48, 0xbc]);
    c[7..15].copy_from_slice(&frame.0.to_le_bytes());
    c[15..20].copy_from_slice(&[0xb8, 0x0f, 0x00, 0x00, 0x00]);
    c[20..22].copy_from_slice(&[0x0f, 0x05]);
    c[22..24].copy_from_slice(&[0xcc, 0x90]);
    c[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    c
}

/// The batch loop run by [`RemoteCalls::call_each`]: calls `func` once per
/// word of the input array, storing each result in the output array.
/// Arguments (System V): rdi = func, rsi = input array, rdx = output
/// array, rcx = count, r8 = nonzero to stop after the first zero result.
/// Returns the input cursor where it stopped (input + 8 * calls made).
/// Entered with rsp = 8 (mod 16); five pushes make it 0 (mod 16) at each
/// `call`, as the ABI requires; the callee-saved registers it uses are
/// pushed and popped.
///
/// ```text
/// +0  push rbx; push r12; push r13; push r14; push r15
/// +9  mov rbx, rdi              ; func
/// +12 mov r12, rsi              ; input cursor
/// +15 mov r13, rdx              ; output cursor
/// +18 lea r14, [rsi + rcx*8]    ; input end (count bounded by the caller)
/// +22 mov r15, r8               ; stop at a zero result
/// +25 loop: cmp r12, r14
/// +28 jae done
/// +30 mov rdi, [r12]            ; the argument
/// +34 xor eax, eax              ; no vector registers (variadic ABI)
/// +36 call rbx
/// +38 mov [r13], rax            ; the result
/// +42 add r12, 8
/// +46 add r13, 8
/// +50 test r15, r15
/// +53 jz loop
/// +55 test rax, rax
/// +58 jnz loop
/// +60 done: mov rax, r12
/// +63 pop r15; pop r14; pop r13; pop r12; pop rbx; ret
/// ```
const BATCH_CODE: [u8; 73] = [
    0x53, // push rbx
    0x41, 0x54, // push r12
    0x41, 0x55, // push r13
    0x41, 0x56, // push r14
    0x41, 0x57, // push r15
    0x48, 0x89, 0xfb, // mov rbx, rdi
    0x49, 0x89, 0xf4, // mov r12, rsi
    0x49, 0x89, 0xd5, // mov r13, rdx
    0x4c, 0x8d, 0x34, 0xce, // lea r14, [rsi + rcx*8]
    0x4d, 0x89, 0xc7, // mov r15, r8
    0x4d, 0x39, 0xf4, // loop (+25): cmp r12, r14
    0x73, 0x1e, // jae done (+60)
    0x49, 0x8b, 0x3c, 0x24, // mov rdi, [r12]
    0x31, 0xc0, // xor eax, eax
    0xff, 0xd3, // call rbx
    0x49, 0x89, 0x45, 0x00, // mov [r13 + 0], rax
    0x49, 0x83, 0xc4, 0x08, // add r12, 8
    0x49, 0x83, 0xc5, 0x08, // add r13, 8
    0x4d, 0x85, 0xff, // test r15, r15
    0x74, 0xe2, // jz loop (+25)
    0x48, 0x85, 0xc0, // test rax, rax
    0x75, 0xdd, // jnz loop (+25)
    0x4c, 0x89, 0xe0, // done (+60): mov rax, r12
    0x41, 0x5f, // pop r15
    0x41, 0x5e, // pop r14
    0x41, 0x5d, // pop r13
    0x41, 0x5c, // pop r12
    0x5b, // pop rbx
    0xc3, // ret
];

/// Where [`JMP_RDI`] sits in the batch code page, after [`BATCH_CODE`].
const JMP_RDI_AT: u64 = 80;
/// `jmp rdi`: given to the batch loop as its function, it makes the loop
/// call each word of its input array (a function taking no argument, such
/// as an IFUNC resolver) instead of one function with each word.
const JMP_RDI: [u8; 2] = [0xff, 0xe7];

/// `-ERESTART_RESTARTBLOCK`: `rt_sigreturn` cancels the restart block.
const RESTARTBLOCK: i64 = -516;

/// A kernel `ucontext` for `rt_sigreturn` that puts back `regs` (in the form
/// the kernel would resume them: an interrupted system call is restarted)
/// and the signal mask `mask`. No FPU state: `rt_sigreturn` then resets it
/// (at update points and in blocking calls no vector register is live).
fn sigreturn_frame(regs: &Regs, mask: u64) -> [u8; FRAME_SIZE as usize] {
    let mut r = regs.0;
    if regs.in_restartable_syscall() {
        let rax = r.rax as i64;
        if rax != RESTARTBLOCK {
            r.rax = r.orig_rax;
            r.rip = r.rip.wrapping_sub(2);
        } else {
            // The restart block is cancelled by rt_sigreturn: the call
            // returns EINTR, as after a signal handler.
            r.rax = (-(libc::EINTR as i64)) as u64;
        }
    }
    let mut b = [0u8; FRAME_SIZE as usize];
    let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
    put(0, &UC_FLAGS.to_le_bytes());
    put(24, &SS_DISABLE.to_le_bytes());
    let gregs = [
        r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp, r.rbx, r.rdx,
        r.rax, r.rcx, r.rsp, r.rip, r.eflags,
    ];
    for (i, v) in gregs.iter().enumerate() {
        put(40 + 8 * i, &v.to_le_bytes());
    }
    // Selectors are 16 bits; the values fit.
    put(184, &(r.cs as u16).to_le_bytes());
    put(190, &(r.ss as u16).to_le_bytes());
    put(296, &mask.to_le_bytes());
    b
}

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
        tid: Pid,
        op: String,
        sig: Sig,
        rip: RuntimeAddr,
        addr: u64,
    },
    #[error("thread {tid}: remote {op} ended with an unexpected {stop} at {rip}")]
    Unexpected {
        tid: Pid,
        op: String,
        stop: String,
        rip: RuntimeAddr,
    },
    #[error("thread {tid}: remote {op} did not finish within {waited:?}")]
    Timeout {
        tid: Pid,
        op: String,
        waited: Duration,
    },
    #[error("thread {tid}: the thread ended during remote {op} ({stop})")]
    Ended { tid: Pid, op: String, stop: String },
    #[error("thread {tid}: more than {cap} stops during remote {op}")]
    TooManyStops { tid: Pid, op: String, cap: usize },
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
    SigMask { tid: Pid, reason: String },
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

/// The signals the process has a handler for (not default, not ignored),
/// from `SigCgt` of `/proc/PID/task/TID/status`: bit `n - 1` for signal
/// `n`. Only these can have a handler in the running image's code.
pub fn caught_signals(pid: Pid, tid: Pid) -> Result<u64, RemoteError> {
    read_status_mask(pid, tid, "SigCgt:")
}

/// The hexadecimal mask on line `key` of `/proc/PID/task/TID/status`.
fn read_status_mask(pid: Pid, tid: Pid, key: &str) -> Result<u64, RemoteError> {
    let err = |reason: String| RemoteError::SigMask { tid, reason };
    let path = format!("/proc/{pid}/task/{tid}/status");
    let text = procfs::read_task_status(pid, tid).map_err(|e| err(e.to_string()))?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .ok_or_else(|| err(format!("{path} has no {key} line")))?;
    u64::from_str_radix(line.trim(), 16).map_err(|_| err(format!("bad {key} {line:?}")))
}

/// What a remote run executes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RunKind {
    /// The `syscall` at the gadget: ends at its exit stop.
    Syscall,
    /// A function returning to the gadget: ends when its `rt_sigreturn` is
    /// stopped and skipped.
    Call,
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
    /// The signal frame on the thread's stack (below its red zone) and the
    /// bytes it covers.
    frame: RuntimeAddr,
    frame_orig: Vec<u8>,
    orig_mask: u64,
    masked: bool,
    caught: Vec<Caught>,
    /// Base of the scratch mapping, once made.
    scratch: Option<RuntimeAddr>,
    /// Bytes of the scratch data area in use.
    scratch_used: u64,
    /// Whether the batch loop's code is in place (and executable).
    batch_ready: bool,
    timeout: Duration,
    /// Whether the thread was already restored.
    restored: bool,
    /// Whether the thread's alternate signal stack was read into the frame
    /// (see [`RemoteCalls::alt_stack`]).
    alt_stack_read: bool,
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
        let orig_mask = tracee.sigmask(tid)?;
        let mut mem = tracee.memory();
        let mut gadget_orig = [0u8; GADGET_LEN];
        mem.read(gadget, &mut gadget_orig)?;
        // The frame first, the gadget that points at it second: at every
        // moment a thread that runs on without us finds both in place.
        let frame = RuntimeAddr(regs.0.rsp.wrapping_sub(RED_ZONE + FRAME_SIZE) & !63);
        let mut frame_orig = vec![0u8; FRAME_SIZE as usize];
        mem.read(frame, &mut frame_orig)?;
        mem.write(frame, &sigreturn_frame(&regs, orig_mask))?;
        if let Err(e) = mem.write(gadget, &gadget_code(frame)) {
            let _ = mem.write(frame, &frame_orig);
            return Err(e.into());
        }
        let kept = tracee.take_pending_signal(tid);
        let mut rc = RemoteCalls {
            tracee,
            tid,
            mem,
            regs,
            ext,
            gadget,
            gadget_orig,
            frame,
            frame_orig,
            orig_mask,
            masked: false,
            caught: kept.map(Caught::Plain).into_iter().collect(),
            scratch: None,
            scratch_used: 0,
            batch_ready: false,
            timeout: DEFAULT_TIMEOUT,
            restored: false,
            alt_stack_read: false,
        };
        // The thread's alternate signal stack into the frame, so that an
        // rt_sigreturn keeps it (a failure leaves "none", which is right
        // for almost every thread).
        rc.alt_stack_read = rc
            .raw_syscall("sigaltstack", libc::SYS_sigaltstack, &[0, frame.0 + 16])
            .is_ok_and(|r| r == 0);
        // Block every signal (the mask is read from the gadget area), so
        // that nothing is delivered while remote code runs.
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
            tid: self.tid,
            op: op.to_string(),
            stop: stop.to_string(),
            rip: RuntimeAddr(rip),
        }
    }

    /// Set `regs`, resume to the next system-call stop, and go on until the
    /// op is over (`kind`): rax at the exit stop of the gadget's `syscall`,
    /// or rdi (the function's result) when its `rt_sigreturn` is stopped.
    /// Either way the thread ends in a system-call exit stop at the gadget,
    /// where a tracer's death sends it through `rt_sigreturn` back to its own
    /// state. Asynchronous signals are taken and kept.
    fn run(&mut self, op: &str, regs: &Regs, kind: RunKind) -> Result<u64, RemoteError> {
        let tid = self.tid;
        // A function may map memory (malloc); so may these system calls.
        let maps_change = match kind {
            RunKind::Call => true,
            RunKind::Syscall => [
                libc::SYS_mmap,
                libc::SYS_munmap,
                libc::SYS_mprotect,
                libc::SYS_mremap,
                libc::SYS_brk,
                libc::SYS_shmat,
                libc::SYS_shmdt,
                libc::SYS_pkey_mprotect,
                libc::SYS_remap_file_pages,
                libc::SYS_madvise,
            ]
            .contains(&(regs.0.rax as i64)),
        };
        if maps_change {
            self.tracee.maps_may_change();
        }
        let ret_at = self.gadget.0 + RETURN_OFFSET;
        self.tracee.set_regs(tid, regs)?;
        // The thread now points at remote code: a moment faults are
        // injected at in tests.
        crate::update::signals::checkpoint_remote();
        self.tracee.syscall_step(tid)?;
        let start = Instant::now();
        // Syscall: the entry stop was seen. Call: the function's result,
        // once its rt_sigreturn was stopped and skipped.
        let mut entered = false;
        let mut result = 0u64;
        for _ in 0..MAX_STOPS {
            let left = self.timeout.saturating_sub(start.elapsed());
            let stop = match self.tracee.wait_stop(tid, left) {
                Ok(s) => s,
                Err(PtraceError::Timeout { .. }) => {
                    self.stop_runaway();
                    return Err(RemoteError::Timeout {
                        tid,
                        op: op.to_string(),
                        waited: start.elapsed(),
                    });
                }
                Err(PtraceError::Gone { .. }) => {
                    return Err(RemoteError::Ended {
                        tid,
                        op: op.to_string(),
                        stop: "gone".into(),
                    })
                }
                Err(e) => return Err(e.into()),
            };
            if stop.is_terminal() || matches!(stop, Stop::Exiting { .. }) {
                return Err(RemoteError::Ended {
                    tid,
                    op: op.to_string(),
                    stop: stop.to_string(),
                });
            }
            match stop {
                Stop::Syscall => {
                    let now = self.tracee.regs(tid)?;
                    match kind {
                        RunKind::Syscall if now.0.rip == ret_at => {
                            if entered {
                                return Ok(now.0.rax);
                            }
                            entered = true;
                        }
                        RunKind::Syscall => {
                            return Err(self.op_err_unexpected(op, &stop, now.0.rip))
                        }
                        RunKind::Call
                            if !entered
                                && now.0.rip == self.gadget.0 + SIGRETURN_STOP
                                && now.0.orig_rax == libc::SYS_rt_sigreturn as u64 =>
                        {
                            // The function returned. Skip the rt_sigreturn
                            // (orig_rax -1) and park at +2: a death of the
                            // tracer from here still ends in it.
                            result = now.0.rdi;
                            entered = true;
                            let mut r = now;
                            r.0.orig_rax = u64::MAX;
                            r.0.rip = ret_at;
                            self.tracee.set_regs(tid, &r)?;
                        }
                        RunKind::Call if entered => {
                            if now.0.rip == ret_at {
                                return Ok(result);
                            }
                            return Err(self.op_err_unexpected(op, &stop, now.0.rip));
                        }
                        // A system call the function makes.
                        RunKind::Call => {}
                    }
                    self.tracee.syscall_step(tid)?;
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
                            tid,
                            op: op.to_string(),
                            sig,
                            rip: RuntimeAddr(rip),
                            addr: u64::from_le_bytes(a),
                        });
                    }
                    // Keep it (with its details) and suppress it for now.
                    let info = self.tracee.siginfo_bytes(tid)?;
                    self.caught.push(Caught::Info(info));
                    self.tracee.syscall_step(tid)?;
                }
                // A late interrupt from seizing, or a group-stop: go on.
                Stop::EventStop { .. } => self.tracee.syscall_step(tid)?,
                other => {
                    let rip = self.tracee.regs(tid).map(|r| r.0.rip).unwrap_or(0);
                    return Err(self.op_err_unexpected(op, &other, rip));
                }
            }
        }
        self.stop_runaway();
        Err(RemoteError::TooManyStops {
            tid,
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
        self.run(name, &r, RunKind::Syscall)
    }

    /// The thread's alternate signal stack, as the session read it when it
    /// began: `Ok(None)` when it has none (or it is disabled), an error
    /// when it could not be read.
    pub fn alt_stack(&self) -> Result<Option<std::ops::Range<u64>>, RemoteError> {
        if !self.alt_stack_read {
            return Err(RemoteError::Ended {
                tid: self.tid,
                op: "sigaltstack".into(),
                stop: "the thread's alternate signal stack could not be read".into(),
            });
        }
        // A kernel stack_t: ss_sp, ss_flags (and padding), ss_size.
        let mut b = [0u8; 24];
        self.mem.read(RuntimeAddr(self.frame.0 + 16), &mut b)?;
        let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
        let (sp, flags, size) = (word(0), word(8) as u32, word(16));
        if flags & SS_DISABLE != 0 || size == 0 {
            return Ok(None);
        }
        Ok(Some(sp..sp.saturating_add(size)))
    }

    /// The tracee's [`Tracee::maps_epoch`] now.
    pub fn maps_epoch(&self) -> u64 {
        self.tracee.maps_epoch()
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
        let name = format!("openat({})", path.display());
        let args = |at: RuntimeAddr| [AT_FDCWD as u64, at.0, flags as u64, u64::from(mode)];
        // The path on the thread's stack below the borrowed frame when it
        // can go there: no scratch mapping (two remote calls) for a path.
        if let Some((at, orig)) = self.stack_write(&bytes) {
            let r = self.syscall_checked(&name, libc::SYS_openat, &args(at));
            self.mem.write(at, &orig)?;
            return Ok(r? as i32);
        }
        let mark = self.scratch_used;
        let at = self.scratch_write(&bytes)?;
        let r = self.syscall_checked(&name, libc::SYS_openat, &args(at));
        self.scratch_used = mark;
        Ok(r? as i32)
    }

    /// Writes `data` (at most [`STACK_BORROW`] bytes) on the thread's
    /// stack below the session's signal frame, where nothing of the thread
    /// lives (below its red zone) and nothing else of the session goes;
    /// the address and the bytes it held, to be written back once used.
    /// `None` when it does not fit or that memory cannot be read and
    /// written (the stack's lowest page).
    fn stack_write(&mut self, data: &[u8]) -> Option<(RuntimeAddr, Vec<u8>)> {
        let len = data.len() as u64;
        if len > STACK_BORROW {
            return None;
        }
        let at = RuntimeAddr(self.frame.0.checked_sub(len + 16)? & !15);
        let mut orig = vec![0u8; data.len()];
        self.mem.read(at, &mut orig).ok()?;
        self.mem.write(at, data).ok()?;
        Some((at, orig))
    }

    /// `memfd_create(name, flags)` in the target: an anonymous file no path
    /// lookup reaches (so it works in any root or mount namespace); the fd.
    pub fn memfd_create(&mut self, name: &str, flags: u32) -> Result<i32, RemoteError> {
        let mut bytes = name.as_bytes().to_vec();
        bytes.push(0);
        let mark = self.scratch_used;
        let at = self.scratch_write(&bytes)?;
        let r = self.syscall_checked(
            &format!("memfd_create({name})"),
            libc::SYS_memfd_create,
            &[at.0, u64::from(flags)],
        );
        self.scratch_used = mark;
        Ok(r? as i32)
    }

    /// Write all of `data` at `offset` of the target's file `fd` with
    /// `pwrite64`, through scratch memory in chunks.
    pub fn pwrite_all(&mut self, fd: i32, data: &[u8], offset: u64) -> Result<(), RemoteError> {
        const CHUNK: usize = 32 << 10;
        let mark = self.scratch_used;
        let buf = self.scratch_alloc(CHUNK as u64);
        let r = buf.and_then(|buf| {
            let mut done = 0usize;
            while done < data.len() {
                let end = data.len().min(done + CHUNK);
                self.mem.write(buf, &data[done..end])?;
                let n = self.syscall_checked(
                    &format!("pwrite64({fd})"),
                    libc::SYS_pwrite64,
                    &[
                        fd as i64 as u64,
                        buf.0,
                        (end - done) as u64,
                        offset.saturating_add(done as u64),
                    ],
                )?;
                if n == 0 {
                    return Err(RemoteError::Syscall {
                        pid: self.pid().as_raw(),
                        call: format!("pwrite64({fd})"),
                        errno: Errno::EIO,
                    });
                }
                done += (n as usize).min(end - done);
            }
            Ok(())
        });
        self.scratch_used = mark;
        r
    }

    /// Device and inode of the target's file `fd` (`fstat`).
    pub fn fstat_identity(&mut self, fd: i32) -> Result<(u64, u64), RemoteError> {
        let mark = self.scratch_used;
        let r = self
            .scratch_alloc(std::mem::size_of::<libc::stat>() as u64)
            .and_then(|at| {
                self.syscall_checked(
                    &format!("fstat({fd})"),
                    libc::SYS_fstat,
                    &[fd as i64 as u64, at.0],
                )?;
                // struct stat on x86-64 begins with st_dev then st_ino.
                let mut b = [0u8; 16];
                self.mem.read(at, &mut b)?;
                let word = |i: usize| {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(&b[i..i + 8]);
                    u64::from_le_bytes(w)
                };
                Ok((word(0), word(8)))
            });
        self.scratch_used = mark;
        r
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
            .write_u64(RuntimeAddr(rsp), self.gadget.0 + RETURN_OFFSET)?;
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
        self.run(&format!("call of {func}"), &r, RunKind::Call)
    }

    /// Calls the function at `func` once with each of `args` as its only
    /// integer argument, in order, with one remote run per chunk of up to
    /// [`MAX_BATCH`] calls (a loop in scratch memory makes the calls, see
    /// `BATCH_CODE`). The result of each call made is pushed to
    /// `results`, on an error too (the calls of the chunks finished before
    /// it), so that what was allocated can be freed. With `stop_at_zero`
    /// the calls end after the first that returns 0 (the last result then
    /// is that 0).
    pub fn call_each(
        &mut self,
        func: RuntimeAddr,
        args: &[u64],
        stop_at_zero: bool,
        results: &mut Vec<u64>,
    ) -> Result<(), RemoteError> {
        if args.is_empty() {
            return Ok(());
        }
        let code = self.ensure_batch_code()?;
        let mark = self.scratch_used;
        let r = (|| {
            // Input and output arrays side by side in what is left.
            let left = SCRATCH_DATA.saturating_sub(self.scratch_used.next_multiple_of(16));
            let chunk = usize::try_from(left / 16)
                .unwrap_or(MAX_BATCH)
                .min(MAX_BATCH);
            if chunk == 0 {
                return Err(RemoteError::ScratchFull {
                    pid: self.pid().as_raw(),
                    want: 16,
                    left,
                });
            }
            let len = chunk.min(args.len()) as u64 * 8;
            let input = self.scratch_alloc(len)?;
            let output = self.scratch_alloc(len)?;
            let mut bytes = Vec::with_capacity(len as usize);
            for part in args.chunks(chunk) {
                bytes.clear();
                bytes.extend(part.iter().flat_map(|a| a.to_le_bytes()));
                self.mem.write(input, &bytes)?;
                let n = part.len() as u64;
                let end = self.call(
                    code,
                    &[func.0, input.0, output.0, n, u64::from(stop_at_zero)],
                )?;
                // The cursor comes back from the target: bounded by what
                // was asked.
                let made = end.saturating_sub(input.0) / 8;
                let made = made.min(n) as usize;
                let mut out = vec![0u8; made * 8];
                self.mem.read(output, &mut out)?;
                results.extend(out.chunks_exact(8).map(|w| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(w);
                    u64::from_le_bytes(b)
                }));
                if made < part.len() || (stop_at_zero && results.last() == Some(&0)) {
                    break;
                }
            }
            Ok(())
        })();
        self.scratch_used = mark;
        r
    }

    /// Calls each function of `funcs` (none takes an argument: IFUNC
    /// resolvers) in one remote call of the batch loop, pushing each result
    /// to `results`, in order. The loop's scratch code costs a mapping and
    /// a protection change on first use in the session: worth it from a few
    /// functions on.
    pub fn call_all(
        &mut self,
        funcs: &[RuntimeAddr],
        results: &mut Vec<u64>,
    ) -> Result<(), RemoteError> {
        if funcs.is_empty() {
            return Ok(());
        }
        let code = self.ensure_batch_code()?;
        let words: Vec<u64> = funcs.iter().map(|f| f.0).collect();
        let before = results.len();
        self.call_each(RuntimeAddr(code.0 + JMP_RDI_AT), &words, false, results)?;
        let made = results.len() - before;
        if made < funcs.len() {
            return Err(RemoteError::Ended {
                tid: self.tid,
                op: format!("call of {}", funcs[made]),
                stop: format!("the batch stopped after {made} of {} calls", funcs.len()),
            });
        }
        Ok(())
    }

    /// The batch loop's code at the end of the scratch mapping, written
    /// and made read-only executable on first use in the session.
    fn ensure_batch_code(&mut self) -> Result<RuntimeAddr, RemoteError> {
        let base = self.ensure_scratch()?;
        let code = RuntimeAddr(base.0 + SCRATCH_DATA + SCRATCH_STACK);
        if !self.batch_ready {
            self.mem.write(code, &BATCH_CODE)?;
            self.mem.write(RuntimeAddr(code.0 + JMP_RDI_AT), &JMP_RDI)?;
            self.mprotect(code, SCRATCH_CODE, libc::PROT_READ | libc::PROT_EXEC)?;
            self.batch_ready = true;
        }
        Ok(code)
    }

    fn ensure_scratch(&mut self) -> Result<RuntimeAddr, RemoteError> {
        if let Some(b) = self.scratch {
            return Ok(b);
        }
        let b = self.mmap(
            RuntimeAddr(0),
            SCRATCH_LEN,
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
                note(self.munmap(b, SCRATCH_LEN));
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
                // A signal that becomes deliverable now stays pending in
                // the kernel and is delivered when the thread runs again,
                // where it was.
                let rax = self.run("rt_sigprocmask", &r, RunKind::Syscall)?;
                decode_return(rax).map_err(|errno| RemoteError::Syscall {
                    pid: self.pid().as_raw(),
                    call: "rt_sigprocmask (restoring the mask)".into(),
                    errno,
                })?;
                Ok(())
            })();
            note(r);
            // Only signals that cannot be blocked can have been taken since.
            for c in std::mem::take(&mut self.caught) {
                if c.sig() == Sig::STOP {
                    self.resend_stop();
                } else if slot.is_none() {
                    slot = Some(c.sig());
                }
            }
        } else {
            for c in &caught {
                if c.sig() == Sig::STOP {
                    self.resend_stop();
                } else if slot.is_none() {
                    slot = Some(c.sig());
                }
            }
            if let Some(b) = self.scratch.take() {
                note(self.munmap(b, SCRATCH_LEN));
            }
        }
        // Registers first: until they are back, a tracer's death must find
        // the gadget and the frame in place.
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
        let gadget = self.gadget;
        let orig = self.gadget_orig;
        note(self.mem.write(gadget, &orig).map_err(RemoteError::from));
        let frame = self.frame;
        let frame_orig = std::mem::take(&mut self.frame_orig);
        note(
            self.mem
                .write(frame, &frame_orig)
                .map_err(RemoteError::from),
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

    /// Sends again a SIGSTOP taken from the thread, unless a SIGCONT came
    /// after it: the kernel would have discarded the stop then, and the
    /// SIGCONT (blocked during the session, so still pending) must not be
    /// lost to a stop sent after it.
    fn resend_stop(&self) {
        if self.tracee.stop_cancelled() {
            return;
        }
        let _ = signal::kill(self.pid(), Signal::SIGSTOP);
    }

    /// Queue a kept signal to the thread again (signals are blocked).
    fn requeue(&mut self, c: &Caught) -> Result<(), RemoteError> {
        let pid = self.pid();
        let tid = self.tid;
        if c.sig() == Sig::STOP {
            // Cannot be blocked; a stop is process-wide anyway.
            self.resend_stop();
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

impl Drop for RemoteCalls<'_> {
    fn drop(&mut self) {
        let _ = self.restore();
    }
}
