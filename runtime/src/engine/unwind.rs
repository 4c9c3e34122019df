//! Unwinding one paused thread into its application frames.
//!
//! Application frames follow the rbp chain (every instrumented function
//! keeps a frame pointer): CFA = rbp + 16, return address at CFA-8, the
//! caller's rbp at CFA-16. Each return address must be a call site of the
//! tables, and each step is cross-checked against the call site's recorded
//! stack depth, so a corrupt chain is refused rather than followed.
//!
//! Library frames (libc has no frame pointers) are unwound with their
//! `.eh_frame` CFI until the pc lands in application code. The same CFI walk
//! checks where the chain ends: below `main` or a thread's start routine
//! there must be library frames only, down to the outermost frame (rip
//! undefined). Reaching application code again means the frames were called
//! back from a library (qsort, a signal handler): such a thread is not
//! unwound.

use crate::engine::state::{AppFrame, CalleeSavedValues, Image};
use crate::load::libraries::{Libraries, Library};
use crate::memory::{MemError, TargetMemory};
use crate::target::ptrace::Regs;
use nix::unistd::Pid;
use std::ops::Range;
use upstare_dwarf::fdt::{CallSite, FunctionTable};
use upstare_dwarf::{CfaRule, LinkAddr, Reg, RegRule, RuntimeAddr};

/// Default bound on the application frames of one thread.
pub const MAX_APP_FRAMES: usize = 100_000;
/// Bound on consecutive library frames (between the top and the first
/// application frame, or below the bottom one).
pub const MAX_LIB_FRAMES: usize = 512;
/// Callee-saved registers tracked per frame (rbp is the chain itself).
pub const TRACKED: [Reg; 5] = [Reg::Rbx, Reg::R12, Reg::R13, Reg::R14, Reg::R15];
const DYNAMIC_DEPTH: i64 = CallSite::DYNAMIC_DEPTH.0;

/// Why a thread could not be unwound. Every variant names the thread.
#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    #[error("thread {tid}: reading {what} at {addr}: {source}")]
    Memory {
        tid: Pid,
        what: String,
        addr: RuntimeAddr,
        #[source]
        source: MemError,
    },
    #[error("thread {tid}: pc {pc} is in {function} but not at an update point")]
    NotAtPoint {
        tid: Pid,
        function: String,
        pc: RuntimeAddr,
    },
    #[error("thread {tid}: pc {pc} is code of the image outside every function of its tables")]
    NoFunction { tid: Pid, pc: RuntimeAddr },
    #[error("thread {tid}: return address {ret} ({function}+{offset:#x}) is not a call site of the tables")]
    NotACallSite {
        tid: Pid,
        function: String,
        offset: u64,
        ret: RuntimeAddr,
    },
    #[error("thread {tid}: frame of {function} at CFA {cfa}: {problem}")]
    BadFrame {
        tid: Pid,
        function: String,
        cfa: RuntimeAddr,
        problem: String,
    },
    #[error("thread {tid}: more than {limit} {what} frames")]
    TooDeep {
        tid: Pid,
        what: &'static str,
        limit: usize,
    },
    #[error("thread {tid}: pc {pc} is neither code of the image nor of a mapped library")]
    UnknownCode { tid: Pid, pc: RuntimeAddr },
    #[error("thread {tid}: cannot read the CFI of {0}", source.name)]
    Library {
        tid: Pid,
        #[source]
        source: crate::load::libraries::LibraryError,
    },
    #[error("thread {tid}: cannot unwind {location}: {reason}")]
    Cfi {
        tid: Pid,
        location: String,
        reason: String,
    },
    #[error("thread {tid}: {function} runs in a signal handler (its caller is the signal frame at {location}); let the handler return")]
    SignalFrame {
        tid: Pid,
        function: String,
        location: String,
    },
    #[error("thread {tid}: {function} was called back from library code ({location}), below which {caller} is active")]
    Callback {
        tid: Pid,
        function: String,
        location: String,
        caller: String,
        /// Where the outermost callback frame returns to in the library.
        return_to: RuntimeAddr,
        /// rsp once it has returned there (that frame's CFA).
        return_rsp: RuntimeAddr,
    },
    #[error("thread {tid}: no application frame on the stack ({location} is the outermost frame)")]
    NoAppFrame { tid: Pid, location: String },
}

/// One library frame between the top of a thread and its first application
/// frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibFrame {
    /// The library's file (or `[vdso]`).
    pub library: String,
    /// The function symbol, when the library has one for `pc`.
    pub symbol: Option<String>,
    /// Where the frame is paused (the thread's rip for the top frame, a
    /// return address for the others).
    pub pc: RuntimeAddr,
    /// Its canonical frame address.
    pub cfa: RuntimeAddr,
}

/// Where the top of the thread is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Top {
    /// At an update point of the first application frame.
    AtPoint,
    /// Inside library code called from the first application frame through
    /// `call`.
    InLibrary {
        /// Library frames, top first.
        frames: Vec<LibFrame>,
        /// The call the first application frame is paused in.
        call: CallSite,
    },
    /// At the return address of `call` in the first application frame: the
    /// call has returned (a thread led out of a library wait is parked
    /// there), so the frame continues at that call site.
    Returned { call: CallSite },
}

/// The application frames of a thread (top first) and how its top looks.
#[derive(Clone, Debug, PartialEq)]
pub struct Unwound {
    pub frames: Vec<AppFrame>,
    pub top: Top,
    /// When the bottom frame is a signal handler's (its caller is the
    /// signal frame the kernel built): the context the signal interrupted,
    /// to be unwound on its own.
    pub below: Option<Interrupted>,
}

/// The context under a thread's bottom application frame when that frame
/// was entered from elsewhere than the thread's start: a signal handler's
/// (the context the signal interrupted, as the kernel saved it in the
/// signal frame) or a callback's (the library code that called it, with
/// application frames under it).
#[derive(Clone, Debug)]
pub struct Interrupted {
    pub kind: InterruptKind,
    /// The registers of that context: all of them, read from the
    /// `ucontext_t` (orig_rax -1); for a callback, those the library has
    /// when the callback returns: rip (the return into the library), rsp,
    /// rbp and the callee-saved registers.
    pub regs: Regs,
}

/// What lies between the bottom frame and the context under it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// A signal frame; the `ucontext_t` is at the handler's CFA.
    Signal { ucontext: RuntimeAddr },
    /// Library frames (`location`: where the callback was called from).
    Callback { location: String },
}

impl PartialEq for Interrupted {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && Reg::ALL
                .iter()
                .all(|&r| self.regs.get(r) == other.regs.get(r))
    }
}

/// Offset of `uc_mcontext.gregs` in x86-64 `ucontext_t` (uc_flags,
/// uc_link, uc_stack).
const UC_GREGS: i64 = 40;
/// Number of general registers the kernel saves there, in its order.
const GREGS: usize = 17;

impl Interrupted {
    /// Read the interrupted registers from the `ucontext_t` at `uc`.
    fn read<M: TargetMemory + ?Sized>(mem: &M, uc: RuntimeAddr) -> Result<Regs, MemError> {
        let at = uc.checked_offset(UC_GREGS).ok_or(MemError::Overflow {
            op: crate::memory::MemOp::Read,
            addr: uc,
            len: GREGS * 8,
        })?;
        let mut g = [0u64; GREGS];
        for (i, v) in g.iter_mut().enumerate() {
            *v = mem.read_u64(RuntimeAddr(at.0.wrapping_add(8 * i as u64)))?;
        }
        let mut r = Regs::zeroed();
        // REG_R8 .. REG_RIP, as <sys/ucontext.h> numbers them.
        let order = [
            Reg::R8,
            Reg::R9,
            Reg::R10,
            Reg::R11,
            Reg::R12,
            Reg::R13,
            Reg::R14,
            Reg::R15,
            Reg::Rdi,
            Reg::Rsi,
            Reg::Rbp,
            Reg::Rbx,
            Reg::Rdx,
            Reg::Rax,
            Reg::Rcx,
            Reg::Rsp,
            Reg::Rip,
        ];
        for (reg, v) in order.iter().zip(g) {
            r.set(*reg, v);
        }
        r.0.orig_rax = u64::MAX;
        Ok(r)
    }
}

/// Register values known while unwinding (`None`: not recoverable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegSet([Option<u64>; 17]);

impl RegSet {
    /// Every register of a stopped thread.
    pub fn from_regs(r: &Regs) -> RegSet {
        let mut s = RegSet::default();
        for reg in Reg::ALL {
            s.0[reg as usize] = Some(r.get(reg));
        }
        s
    }
    pub fn get(&self, r: Reg) -> Option<u64> {
        self.0[r as usize]
    }
    pub fn set(&mut self, r: Reg, v: Option<u64>) {
        self.0[r as usize] = v;
    }
}

/// Largest stack copied by [`StackSnapshot`].
pub const MAX_SNAPSHOT: usize = 64 << 20;

/// A copy of the live part of a thread's stack, read in one go, so that
/// walking thousands of frames costs one read rather than three per frame.
/// Reads outside the copy go to the underlying memory; writes are refused
/// (a snapshot is for reading).
pub struct StackSnapshot<'m, M: TargetMemory + ?Sized> {
    base: RuntimeAddr,
    bytes: Vec<u8>,
    inner: &'m M,
}

impl<'m, M: TargetMemory + ?Sized> StackSnapshot<'m, M> {
    /// Copy `range` of `inner` (its top `MAX_SNAPSHOT` bytes if larger).
    pub fn new(inner: &'m M, range: Range<RuntimeAddr>) -> Result<Self, MemError> {
        let len = range.end.0.saturating_sub(range.start.0);
        let len = len.min(MAX_SNAPSHOT as u64);
        let base = RuntimeAddr(range.end.0 - len);
        let bytes = inner.read_vec(base, len, MAX_SNAPSHOT)?;
        Ok(StackSnapshot { base, bytes, inner })
    }
}

impl<M: TargetMemory + ?Sized> TargetMemory for StackSnapshot<'_, M> {
    fn read(&self, addr: RuntimeAddr, buf: &mut [u8]) -> Result<(), MemError> {
        let start = addr.0.checked_sub(self.base.0);
        let inside = start.and_then(|s| {
            let s = usize::try_from(s).ok()?;
            let e = s.checked_add(buf.len())?;
            (e <= self.bytes.len()).then_some(s..e)
        });
        match inside {
            Some(r) => {
                buf.copy_from_slice(&self.bytes[r]);
                Ok(())
            }
            None => self.inner.read(addr, buf),
        }
    }

    fn write(&mut self, addr: RuntimeAddr, data: &[u8]) -> Result<(), MemError> {
        Err(MemError::OutOfRange {
            op: crate::memory::MemOp::Write,
            addr,
            len: data.len(),
        })
    }
}

/// Result of one CFI step.
enum CfiStep {
    /// The caller's registers (rsp = this frame's CFA).
    Caller { regs: Box<RegSet>, cfa: RuntimeAddr },
    /// The return address is undefined: this is the outermost frame.
    Outermost,
}

/// Unwinds threads of one process.
pub struct Unwinder<'a, M: TargetMemory + ?Sized> {
    image: &'a Image,
    libs: &'a Libraries,
    mem: &'a M,
    stack: Option<Range<RuntimeAddr>>,
    max_frames: usize,
    verify_end: bool,
    callbacks_below: bool,
}

/// A frame under construction.
struct Cur<'t> {
    func: &'t FunctionTable,
    pc: LinkAddr,
    cfa: RuntimeAddr,
    continuation: upstare_dwarf::fdt::Continuation,
    view: CalleeSavedValues,
}

impl<'a, M: TargetMemory + ?Sized> Unwinder<'a, M> {
    /// An unwinder over `mem` for `image`, using `libs` for library frames.
    /// By default the bottom of every chain is checked with CFI (library
    /// frames only, down to the outermost one) and at most
    /// [`MAX_APP_FRAMES`] application frames are walked.
    pub fn new(image: &'a Image, libs: &'a Libraries, mem: &'a M) -> Self {
        Unwinder {
            image,
            libs,
            mem,
            stack: None,
            max_frames: MAX_APP_FRAMES,
            verify_end: true,
            callbacks_below: false,
        }
    }

    /// Unwind a callback called from library code with application frames
    /// under it (instead of refusing it with [`UnwindError::Callback`]):
    /// the library's context is returned in [`Unwound::below`].
    pub fn with_callbacks_below(mut self, on: bool) -> Self {
        self.callbacks_below = on;
        self
    }

    /// Every CFA must lie in `stack` (the thread's stack mapping).
    pub fn with_stack(mut self, stack: Range<RuntimeAddr>) -> Self {
        self.stack = Some(stack);
        self
    }

    /// Bound the number of application frames.
    pub fn with_max_frames(mut self, n: usize) -> Self {
        self.max_frames = n;
        self
    }

    /// Whether to check with CFI that the chain ends in library frames
    /// down to the outermost frame (default on; a byte-buffer test without
    /// libraries turns it off and ends at the first non-image address).
    pub fn verify_chain_end(mut self, on: bool) -> Self {
        self.verify_end = on;
        self
    }

    /// The application frames of thread `tid` stopped with `regs`: at an
    /// update point of the image, or inside library code called by it.
    pub fn unwind(&self, tid: Pid, regs: &Regs) -> Result<Unwound, UnwindError> {
        let rip = regs.rip();
        if self.image.is_code(rip) {
            let (func, link) = self.function(tid, rip)?;
            let point = func
                .update_point_at(link)
                .ok_or_else(|| UnwindError::NotAtPoint {
                    tid,
                    function: func.name.clone(),
                    pc: rip,
                })?;
            let (frames, below) = self.chain_from_regs(
                tid,
                regs,
                (func, link),
                point.stack_depth.0,
                point.continuation(),
                "the update point",
            )?;
            return Ok(Unwound {
                frames,
                top: Top::AtPoint,
                below,
            });
        }

        // Inside a library (or the image's PLT): CFI up to application code.
        let mut set = RegSet::from_regs(regs);
        let mut lib_frames = Vec::new();
        let mut exact = true;
        loop {
            let pc = RuntimeAddr(set.get(Reg::Rip).unwrap_or(0));
            if self.image.is_code(pc) && self.in_function(pc) {
                break;
            }
            if lib_frames.len() >= MAX_LIB_FRAMES {
                return Err(UnwindError::TooDeep {
                    tid,
                    what: "library",
                    limit: MAX_LIB_FRAMES,
                });
            }
            let (lib, link) = self.library(tid, pc)?;
            let lookup = if exact {
                link
            } else {
                LinkAddr(link.0.wrapping_sub(1))
            };
            let row = lib
                .eh_frame()
                .map_err(|source| UnwindError::Library { tid, source })?
                .unwind_row(lookup)
                .map_err(|e| cfi_err(tid, lib, link, e.to_string()))?
                .ok_or_else(|| cfi_err(tid, lib, link, "no CFI covers this address".into()))?;
            if row.is_signal_frame && !exact {
                return Err(cfi_err(
                    tid,
                    lib,
                    link,
                    "a signal frame: the thread runs a signal handler".into(),
                ));
            }
            match self.cfi_step(tid, lib, link, &row, &set)? {
                CfiStep::Outermost => {
                    return Err(UnwindError::NoAppFrame {
                        tid,
                        location: describe(lib, link),
                    })
                }
                CfiStep::Caller { regs: next, cfa } => {
                    self.check_in_stack(tid, lib.name(), cfa)?;
                    let prev_sp = set.get(Reg::Rsp).unwrap_or(0);
                    if cfa.0 <= prev_sp {
                        return Err(UnwindError::BadFrame {
                            tid,
                            function: describe(lib, link),
                            cfa,
                            problem: format!("not above the stack pointer {prev_sp:#x}"),
                        });
                    }
                    lib_frames.push(LibFrame {
                        library: lib.name().to_string(),
                        symbol: lib.symbol_at(link).map(|(s, _)| s.to_string()),
                        pc,
                        cfa,
                    });
                    set = *next;
                }
            }
            exact = false;
        }

        // The first application frame, paused in a call.
        let ret = RuntimeAddr(set.get(Reg::Rip).unwrap_or(0));
        let (func, link, call) = self.caller(tid, ret)?;
        let cfa = self.cfa_from_rbp(tid, &func.name, set.get(Reg::Rbp).unwrap_or(0))?;
        let rsp = RuntimeAddr(set.get(Reg::Rsp).unwrap_or(0));
        self.check_depth(tid, func, cfa, rsp, call.stack_depth.0, "its call")?;
        let mut view = CalleeSavedValues::new();
        for r in TRACKED {
            let v = set.get(r).ok_or_else(|| UnwindError::Cfi {
                tid,
                location: format!("{}+{:#x}", func.name, link.0 - func.low.0),
                reason: format!("{r} is not recoverable from the library frames' CFI"),
            })?;
            view.insert(r, v);
        }
        let first = Cur {
            func,
            pc: link,
            cfa,
            continuation: call.continuation(),
            view,
        };
        let (frames, below) = self.chain(tid, first)?;
        Ok(Unwound {
            frames,
            top: Top::InLibrary {
                frames: lib_frames,
                call: call.clone(),
            },
            below,
        })
    }

    /// Unwind a thread stopped exactly at the return address of a call of
    /// its top application frame (the call has returned).
    pub fn unwind_returned(&self, tid: Pid, regs: &Regs) -> Result<Unwound, UnwindError> {
        let rip = regs.rip();
        let (func, link) = self.function(tid, rip)?;
        let call = self.call_site(tid, func, link, rip)?;
        let (frames, below) = self.chain_from_regs(
            tid,
            regs,
            (func, link),
            call.stack_depth.0,
            call.continuation(),
            "the return of its call",
        )?;
        Ok(Unwound {
            frames,
            top: Top::Returned { call: call.clone() },
            below,
        })
    }

    /// The frames of a thread whose registers are those of its top
    /// application frame (`at`, with rsp at `depth` from the CFA, paused at
    /// `continuation`; `what` names the place in messages).
    fn chain_from_regs(
        &self,
        tid: Pid,
        regs: &Regs,
        at: (&'a FunctionTable, LinkAddr),
        depth: i64,
        continuation: upstare_dwarf::fdt::Continuation,
        what: &str,
    ) -> Result<(Vec<AppFrame>, Option<Interrupted>), UnwindError> {
        let (func, link) = at;
        let cfa = self.cfa_from_rbp(tid, &func.name, regs.get(Reg::Rbp))?;
        self.check_depth(tid, func, cfa, regs.rsp(), depth, what)?;
        let view = TRACKED.iter().map(|&r| (r, regs.get(r))).collect();
        let first = Cur {
            func,
            pc: link,
            cfa,
            continuation,
            view,
        };
        self.chain(tid, first)
    }

    fn in_function(&self, pc: RuntimeAddr) -> bool {
        self.image
            .link(pc)
            .is_some_and(|l| self.image.tables.function_at(l).is_some())
    }

    fn function(
        &self,
        tid: Pid,
        pc: RuntimeAddr,
    ) -> Result<(&'a FunctionTable, LinkAddr), UnwindError> {
        let link = self
            .image
            .link(pc)
            .ok_or(UnwindError::NoFunction { tid, pc })?;
        let f = self
            .image
            .tables
            .function_at(link)
            .ok_or(UnwindError::NoFunction { tid, pc })?;
        Ok((f, link))
    }

    /// The function and call site a return address `ret` returns to. The
    /// call is looked up in the function holding the call instruction
    /// (`ret - 1`): a noreturn call ending a function returns, in
    /// principle, to the next function's first byte.
    fn caller(
        &self,
        tid: Pid,
        ret: RuntimeAddr,
    ) -> Result<(&'a FunctionTable, LinkAddr, &'a CallSite), UnwindError> {
        if let Some(link) = self.image.link(ret) {
            let by_call = link
                .0
                .checked_sub(1)
                .and_then(|l| self.image.tables.function_at(LinkAddr(l)))
                .and_then(|f| f.call_site_returning_to(link).map(|c| (f, c)));
            if let Some((f, c)) = by_call {
                return Ok((f, link, c));
            }
        }
        let (func, link) = self.function(tid, ret)?;
        let call = self.call_site(tid, func, link, ret)?;
        Ok((func, link, call))
    }

    fn call_site(
        &self,
        tid: Pid,
        func: &'a FunctionTable,
        link: LinkAddr,
        ret: RuntimeAddr,
    ) -> Result<&'a CallSite, UnwindError> {
        func.call_site_returning_to(link)
            .ok_or_else(|| UnwindError::NotACallSite {
                tid,
                function: func.name.clone(),
                offset: link.0.wrapping_sub(func.low.0),
                ret,
            })
    }

    fn library(&self, tid: Pid, pc: RuntimeAddr) -> Result<(&'a Library, LinkAddr), UnwindError> {
        self.libs
            .lookup(pc)
            .ok_or(UnwindError::UnknownCode { tid, pc })
    }

    fn read_u64(
        &self,
        tid: Pid,
        what: impl FnOnce() -> String,
        addr: RuntimeAddr,
    ) -> Result<u64, UnwindError> {
        self.mem
            .read_u64(addr)
            .map_err(|source| UnwindError::Memory {
                tid,
                what: what(),
                addr,
                source,
            })
    }

    fn bad_frame(tid: Pid, function: &str, cfa: RuntimeAddr, problem: String) -> UnwindError {
        UnwindError::BadFrame {
            tid,
            function: function.to_string(),
            cfa,
            problem,
        }
    }

    /// CFA = rbp + 16, checked to be a plausible stack address.
    fn cfa_from_rbp(&self, tid: Pid, function: &str, rbp: u64) -> Result<RuntimeAddr, UnwindError> {
        let cfa = rbp.checked_add(16).map(RuntimeAddr).ok_or_else(|| {
            Self::bad_frame(tid, function, RuntimeAddr(rbp), "rbp + 16 overflows".into())
        })?;
        self.check_in_stack(tid, function, cfa)?;
        Ok(cfa)
    }

    fn check_in_stack(
        &self,
        tid: Pid,
        function: &str,
        cfa: RuntimeAddr,
    ) -> Result<(), UnwindError> {
        if !cfa.0.is_multiple_of(8) {
            return Err(Self::bad_frame(
                tid,
                function,
                cfa,
                "not 8-byte aligned".into(),
            ));
        }
        if cfa.0 < 16 {
            return Err(Self::bad_frame(
                tid,
                function,
                cfa,
                "below the lowest possible stack address".into(),
            ));
        }
        if let Some(s) = &self.stack {
            if cfa.0 - 16 < s.start.0 || cfa > s.end {
                return Err(Self::bad_frame(
                    tid,
                    function,
                    cfa,
                    format!("outside the thread's stack [{}, {})", s.start, s.end),
                ));
            }
        }
        Ok(())
    }

    /// rsp must equal CFA + the recorded depth (unless dynamic).
    fn check_depth(
        &self,
        tid: Pid,
        func: &FunctionTable,
        cfa: RuntimeAddr,
        rsp: RuntimeAddr,
        depth: i64,
        at: &str,
    ) -> Result<(), UnwindError> {
        if depth == DYNAMIC_DEPTH {
            return Ok(());
        }
        if cfa.checked_offset(depth) != Some(rsp) {
            return Err(Self::bad_frame(
                tid,
                &func.name,
                cfa,
                format!(
                    "rsp is {rsp} but the tables put it at CFA{depth:+} at {at} (is rbp the frame pointer?)"
                ),
            ));
        }
        Ok(())
    }

    /// Walk the rbp chain from `first` down to the bottom frame.
    fn chain(
        &self,
        tid: Pid,
        first: Cur<'a>,
    ) -> Result<(Vec<AppFrame>, Option<Interrupted>), UnwindError> {
        let mut frames: Vec<AppFrame> = Vec::new();
        let mut cur = first;
        loop {
            if frames.len() >= self.max_frames {
                return Err(UnwindError::TooDeep {
                    tid,
                    what: "application",
                    limit: self.max_frames,
                });
            }
            let name = &cur.func.name;
            let ret_at = RuntimeAddr(cur.cfa.0 - 8);
            let rbp_at = RuntimeAddr(cur.cfa.0 - 16);
            let ret = RuntimeAddr(self.read_u64(
                tid,
                || format!("the return address of {name}"),
                ret_at,
            )?);
            let saved_rbp = self.read_u64(tid, || format!("the saved rbp of {name}"), rbp_at)?;
            // The caller's view: what this frame saved, else what it sees.
            let mut caller_view = CalleeSavedValues::new();
            for r in TRACKED {
                let v = match cur.func.saved_regs.iter().find(|s| s.reg == r) {
                    Some(s) => {
                        let at = cur.cfa.checked_offset(s.offset.0).ok_or_else(|| {
                            Self::bad_frame(tid, name, cur.cfa, format!("{r} slot overflows"))
                        })?;
                        Some(self.read_u64(tid, || format!("{r} saved by {name}"), at)?)
                    }
                    None => cur.view.get(&r).copied(),
                };
                if let Some(v) = v {
                    caller_view.insert(r, v);
                }
            }
            let callee_cfa = cur.cfa;
            let callee_func = cur.func;
            frames.push(AppFrame {
                function: cur.func.name.clone(),
                pc: cur.pc,
                cfa: cur.cfa,
                continuation: cur.continuation,
                callee_saved: cur.view,
            });
            if !self.image.is_code(ret) {
                if self.verify_end {
                    let mut set = RegSet::default();
                    set.set(Reg::Rip, Some(ret.0));
                    set.set(Reg::Rsp, Some(callee_cfa.0));
                    set.set(Reg::Rbp, Some(saved_rbp));
                    for (r, v) in &caller_view {
                        set.set(*r, Some(*v));
                    }
                    let below = self.verify_bottom(tid, &callee_func.name, set)?;
                    return Ok((frames, below));
                }
                return Ok((frames, None));
            }
            let (func, link, call) = self.caller(tid, ret)?;
            let cfa = self.cfa_from_rbp(tid, &func.name, saved_rbp)?;
            if cfa <= callee_cfa {
                return Err(Self::bad_frame(
                    tid,
                    &func.name,
                    cfa,
                    format!(
                        "not above the frame of its callee {} at {callee_cfa} (a cycle or a corrupt saved rbp)",
                        callee_func.name
                    ),
                ));
            }
            if call.stack_depth.0 != DYNAMIC_DEPTH
                && cfa.checked_offset(call.stack_depth.0) != Some(callee_cfa)
            {
                return Err(Self::bad_frame(
                    tid,
                    &func.name,
                    cfa,
                    format!(
                        "its call {} at depth CFA{:+} implies the callee {} at {:#x}, but that frame is at {callee_cfa}",
                        call.continuation(),
                        call.stack_depth.0,
                        callee_func.name,
                        cfa.0.wrapping_add_signed(call.stack_depth.0)
                    ),
                ));
            }
            cur = Cur {
                func,
                pc: link,
                cfa,
                continuation: call.continuation(),
                view: caller_view,
            };
        }
    }

    /// Below the bottom application frame (`function`, whose caller's
    /// registers are `set`) only library frames may follow, ending in the
    /// outermost frame; or the signal frame under a handler, whose
    /// interrupted context is returned.
    fn verify_bottom(
        &self,
        tid: Pid,
        function: &str,
        mut set: RegSet,
    ) -> Result<Option<Interrupted>, UnwindError> {
        let start = set;
        // Where the application frames were entered from, for messages.
        let mut entered_from: Option<String> = None;
        let return_to = RuntimeAddr(set.get(Reg::Rip).unwrap_or(0));
        let return_rsp = RuntimeAddr(set.get(Reg::Rsp).unwrap_or(0));
        for _ in 0..MAX_LIB_FRAMES {
            let pc = RuntimeAddr(set.get(Reg::Rip).unwrap_or(0));
            if pc.0 == 0 {
                return Ok(None);
            }
            if self.image.is_code(pc) && self.in_function(pc) {
                // Called back from library code, with application frames
                // under it: the library's context when the callback
                // returns is the one to unwind on its own.
                if !self.callbacks_below {
                    let caller = self
                        .function(tid, pc)
                        .map(|(f, _)| f.name.clone())
                        .unwrap_or_default();
                    return Err(UnwindError::Callback {
                        tid,
                        function: function.to_string(),
                        location: entered_from.unwrap_or_else(|| format!("{pc}")),
                        caller,
                        return_to,
                        return_rsp,
                    });
                }
                let mut regs = Regs::zeroed();
                for r in [
                    Reg::Rip,
                    Reg::Rsp,
                    Reg::Rbp,
                    Reg::Rbx,
                    Reg::R12,
                    Reg::R13,
                    Reg::R14,
                    Reg::R15,
                ] {
                    regs.set(r, start.get(r).unwrap_or(0));
                }
                regs.0.orig_rax = u64::MAX;
                return Ok(Some(Interrupted {
                    kind: InterruptKind::Callback {
                        location: entered_from.unwrap_or_else(|| format!("{pc}")),
                    },
                    regs,
                }));
            }
            let (lib, link) = self.library(tid, pc)?;
            entered_from.get_or_insert_with(|| describe(lib, link));
            let lookup = LinkAddr(link.0.wrapping_sub(1));
            let row = lib
                .eh_frame()
                .map_err(|source| UnwindError::Library { tid, source })?
                .unwind_row(lookup)
                .map_err(|e| cfi_err(tid, lib, link, e.to_string()))?
                .ok_or_else(|| {
                    cfi_err(tid, lib, link, "no CFI covers this return address".into())
                })?;
            if row.is_signal_frame {
                // The handler's caller is the signal frame itself: the
                // context it interrupted is in the ucontext at its CFA.
                if entered_from.is_some() && pc != return_to {
                    return Err(UnwindError::SignalFrame {
                        tid,
                        function: function.to_string(),
                        location: describe(lib, link),
                    });
                }
                let regs = Interrupted::read(self.mem, return_rsp).map_err(|source| {
                    UnwindError::Memory {
                        tid,
                        what: format!("the signal frame under {function}"),
                        addr: return_rsp,
                        source,
                    }
                })?;
                // The kernel builds the frame below the interrupted stack
                // pointer.
                if regs.rsp().0 <= return_rsp.0 {
                    return Err(UnwindError::BadFrame {
                        tid,
                        function: format!("the signal frame under {function}"),
                        cfa: return_rsp,
                        problem: format!("the interrupted rsp {} is not above it", regs.rsp()),
                    });
                }
                return Ok(Some(Interrupted {
                    kind: InterruptKind::Signal {
                        ucontext: return_rsp,
                    },
                    regs,
                }));
            }
            match self.cfi_step(tid, lib, link, &row, &set)? {
                CfiStep::Outermost => return Ok(None),
                CfiStep::Caller { regs, cfa } => {
                    let prev_sp = set.get(Reg::Rsp).unwrap_or(0);
                    if cfa.0 <= prev_sp {
                        return Err(UnwindError::BadFrame {
                            tid,
                            function: describe(lib, link),
                            cfa,
                            problem: format!("not above the stack pointer {prev_sp:#x}"),
                        });
                    }
                    self.check_in_stack(tid, lib.name(), cfa)?;
                    set = *regs;
                }
            }
        }
        Err(UnwindError::TooDeep {
            tid,
            what: "library",
            limit: MAX_LIB_FRAMES,
        })
    }

    /// Apply one CFI row to the registers of a library frame.
    fn cfi_step(
        &self,
        tid: Pid,
        lib: &Library,
        link: LinkAddr,
        row: &upstare_dwarf::UnwindRow,
        set: &RegSet,
    ) -> Result<CfiStep, UnwindError> {
        let fail = |reason: String| cfi_err(tid, lib, link, reason);
        let cfa =
            match &row.cfa {
                CfaRule::RegOffset(r, off) => {
                    let base = set.get(*r).ok_or_else(|| {
                        fail(format!("the CFA is based on {r}, which is not recoverable"))
                    })?;
                    base.checked_add_signed(*off)
                        .map(RuntimeAddr)
                        .ok_or_else(|| fail(format!("CFA {r}{off:+} overflows")))?
                }
                CfaRule::Expression(_) => return Err(fail(
                    "the CFA is a DWARF expression (a signal frame or a PLT stub): not supported"
                        .into(),
                )),
            };
        let value = |r: Reg, rule: Option<&RegRule>| -> Result<Option<u64>, UnwindError> {
            Ok(match rule {
                None | Some(RegRule::SameValue) => set.get(r),
                Some(RegRule::Undefined) => None,
                Some(RegRule::Offset(n)) => {
                    let at = cfa
                        .checked_offset(*n)
                        .ok_or_else(|| fail(format!("{r} slot CFA{n:+} overflows")))?;
                    Some(self.read_u64(
                        tid,
                        || format!("{r} saved by {}", describe(lib, link)),
                        at,
                    )?)
                }
                Some(RegRule::ValOffset(n)) => Some(
                    cfa.checked_offset(*n)
                        .ok_or_else(|| fail(format!("{r} = CFA{n:+} overflows")))?
                        .0,
                ),
                Some(RegRule::Register(o)) => set.get(*o),
                Some(RegRule::Expression(_)) | Some(RegRule::ValExpression(_)) => {
                    return Err(fail(format!(
                        "{r} is given by a DWARF expression: not supported"
                    )))
                }
            })
        };
        let rip = match row.rule(Reg::Rip) {
            Some(RegRule::Undefined) => return Ok(CfiStep::Outermost),
            None => return Err(fail("no rule for the return address".into())),
            rule => value(Reg::Rip, rule)?,
        };
        let mut next = RegSet::default();
        next.set(Reg::Rip, rip);
        next.set(Reg::Rsp, Some(cfa.0));
        for r in [Reg::Rbx, Reg::Rbp, Reg::R12, Reg::R13, Reg::R14, Reg::R15] {
            next.set(r, value(r, row.rule(r))?);
        }
        if rip.is_none() {
            return Ok(CfiStep::Outermost);
        }
        Ok(CfiStep::Caller {
            regs: Box::new(next),
            cfa,
        })
    }
}

/// `symbol+offset in library` (or the address) of a library pc, for messages.
pub(crate) fn describe(lib: &Library, link: LinkAddr) -> String {
    match lib.symbol_at(link) {
        Some((s, off)) => format!("{s}+{off:#x} in {}", lib.name()),
        None => format!("{link} in {}", lib.name()),
    }
}

fn cfi_err(tid: Pid, lib: &Library, link: LinkAddr, reason: String) -> UnwindError {
    UnwindError::Cfi {
        tid,
        location: describe(lib, link),
        reason,
    }
}
