//! What a refusal says: where each thread that did not get ready is, and
//! why; the errors of stopping the world.

use super::classify::{unwind_thread, NotReadyReason};
use super::stopper::Stopper;
use crate::engine::unwind::Top;
use crate::target::breakpoint::BreakpointError;
use crate::target::procfs::ProcError;
use crate::target::ptrace::{Exit, PtraceError, Regs, Sig};
use nix::unistd::Pid;
use std::fmt;
use std::time::Duration;
use upstare_dwarf::fdt::{FrameTables, FunctionTable};
use upstare_dwarf::{LinkAddr, RuntimeAddr};

/// Where a thread that is not ready is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// In a function of the image.
    App {
        function: String,
        /// Nearest preceding source position the tables know.
        file: String,
        line: u32,
    },
    /// In library code (or the image's PLT).
    Library {
        library: String,
        symbol: Option<String>,
        /// The first application frame below, if the library frames could
        /// be unwound: function, file, line of its call.
        called_from: Option<(String, String, u32)>,
    },
    /// Nowhere known.
    Unknown,
}

/// One thread that did not become ready in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReadyThread {
    /// Its thread id.
    pub tid: Pid,
    /// Where it was last stopped.
    pub rip: RuntimeAddr,
    /// That place in source terms.
    pub location: Location,
    /// Why it is not ready (the last classification).
    pub reason: NotReadyReason,
}

impl fmt::Display for NotReadyThread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "thread {} ", self.tid)?;
        match &self.location {
            Location::App {
                function,
                file,
                line,
            } => write!(f, "in {function} ({file}:{line})")?,
            Location::Library {
                library,
                symbol,
                called_from,
            } => {
                let lib = short(library);
                match symbol {
                    Some(s) => write!(f, "in {s} ({lib})")?,
                    None => write!(f, "in {lib}")?,
                }
                if let Some((func, file, line)) = called_from {
                    write!(f, " called from {func} ({file}:{line})")?;
                }
            }
            Location::Unknown => f.write_str("at an unknown place")?,
        }
        write!(f, " at {}: {}", self.rip, self.reason)
    }
}

fn short(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Why the world could not be stopped. Whatever the error, no breakpoint
/// is left in the process (unless the process is gone) and signals held
/// back are queued again.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error("process {pid}: {} thread(s) did not reach an update point or a safe blocking call within {timeout:?}:\n{}", threads.len(), lines(threads))]
    NotReady {
        pid: i32,
        timeout: Duration,
        threads: Vec<NotReadyThread>,
    },
    #[error("process {pid} has {count} threads, more than the limit of {limit}")]
    TooManyThreads {
        pid: i32,
        count: usize,
        limit: usize,
    },
    #[error("process {pid} ended while being stopped ({how})")]
    Gone {
        pid: i32,
        /// What was seen, in words.
        how: String,
        /// Its exit status, when the end of the process was seen.
        status: Option<Exit>,
    },
    #[error("process {pid} called execve while being stopped: it runs another program now")]
    Exec { pid: i32 },
    #[error("process {pid}: {skipped} of {wanted} update-point hits passed within {waited:?}")]
    SkipTimeout {
        pid: i32,
        skipped: u64,
        wanted: u64,
        waited: Duration,
    },
    #[error("process {pid}: thread {tid} did not stop within {waited:?} when asked to")]
    NoStop {
        pid: i32,
        tid: Pid,
        waited: Duration,
    },
    #[error("process {pid}: the updater received {sig} while stopping the threads")]
    Interrupted { pid: i32, sig: Sig },
    #[error(transparent)]
    Ptrace(#[from] PtraceError),
    #[error(transparent)]
    Breakpoint(#[from] BreakpointError),
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// What had to be in place before the update points were armed (the
    /// rescue handler) could not be put there.
    #[error(transparent)]
    Rescue(Box<crate::target::rescue::RescueError>),
}

fn lines(threads: &[NotReadyThread]) -> String {
    threads
        .iter()
        .map(|t| format!("  {t}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Stopper<'_, '_> {
    /// Where each thread that is not ready is, and why.
    pub(super) fn diagnose(&mut self) -> Vec<NotReadyThread> {
        let tids: Vec<Pid> = self.waiting.keys().copied().collect();
        let mut out = Vec::new();
        for tid in tids {
            // What its update points said is more telling than where it
            // was last seen.
            let Some(reason) = self
                .waiting
                .get(&tid)
                .map(|w| w.at_point.clone().unwrap_or_else(|| w.reason.clone()))
            else {
                continue;
            };
            let Ok(regs) = self.tracee.regs(tid) else {
                out.push(NotReadyThread {
                    tid,
                    rip: RuntimeAddr(0),
                    location: Location::Unknown,
                    reason,
                });
                continue;
            };
            let location = self.locate(tid, &regs);
            out.push(NotReadyThread {
                tid,
                rip: regs.rip(),
                location,
                reason,
            });
        }
        out
    }

    fn locate(&mut self, tid: Pid, regs: &Regs) -> Location {
        let rip = regs.rip();
        let tables = &self.image.tables;
        if let Some(f) = self.image.link(rip).and_then(|l| tables.function_at(l)) {
            let (file, line) = nearest_line(tables, f, rip.to_link(self.image.bias));
            return Location::App {
                function: f.name.clone(),
                file,
                line,
            };
        }
        let Some((lib, link)) = self.libs.lookup(rip) else {
            return Location::Unknown;
        };
        let symbol = lib.symbol_at(link).map(|(s, _)| s.to_string());
        let library = lib.name().to_string();
        let stack = self.stack_of(regs.rsp());
        let called_from = unwind_thread(self.image, self.libs, &self.mem, stack, tid, regs)
            .ok()
            .and_then(|u| match u.top {
                Top::InLibrary { call, .. } => {
                    let f = u.frames.first()?;
                    Some((f.function.clone(), file_name(tables, call.file), call.line))
                }
                Top::AtPoint | Top::Returned { .. } => None,
            });
        Location::Library {
            library,
            symbol,
            called_from,
        }
    }
}

fn file_name(tables: &FrameTables, file: u32) -> String {
    tables
        .files
        .get(file as usize)
        .map(|f| short(f).to_string())
        .unwrap_or_else(|| "?".into())
}

/// The source position of the last update point or call site at or before
/// `pc` in `f` (the function's declaration line if none).
fn nearest_line(tables: &FrameTables, f: &FunctionTable, pc: LinkAddr) -> (String, u32) {
    let points = f
        .update_points
        .iter()
        .filter(|p| p.line != 0)
        .map(|p| (p.addr, p.file, p.line));
    let calls = f
        .call_sites
        .iter()
        .filter(|c| c.line != 0)
        .map(|c| (c.call_addr, c.file, c.line));
    let best = points
        .chain(calls)
        .filter(|(a, _, _)| *a <= pc)
        .max_by_key(|(a, _, _)| *a);
    match best {
        Some((_, file, line)) => (file_name(tables, file), line),
        None => (
            f.decl_file
                .map(|d| file_name(tables, d))
                .unwrap_or_else(|| "?".into()),
            f.decl_line,
        ),
    }
}
