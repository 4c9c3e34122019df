//! [`ProcessMemory`]: the memory of a live process, through `/proc/PID/mem`
//! (which, for a tracer, ignores page protection and so can write code) with
//! a `PTRACE_PEEKDATA`/`POKEDATA` fallback when `/proc` is unavailable.

use nix::sys::ptrace;
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use upstare_dwarf::RuntimeAddr;

use crate::memory::{range_end, MemError, MemOp, TargetMemory};

/// Most ranges in one `process_vm_readv`/`process_vm_writev` (the kernel's
/// `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Index of the first of `lens` not entirely within the first `done`
/// bytes (ranges are transferred in order).
fn first_incomplete(lens: impl Iterator<Item = usize>, done: usize) -> usize {
    let mut sum = 0usize;
    for (i, len) in lens.enumerate() {
        sum = sum.saturating_add(len);
        if sum > done {
            return i;
        }
    }
    usize::MAX
}

/// How [`ProcessMemory`] reaches the target.
#[derive(Clone, Debug)]
enum Backend {
    /// An open `/proc/PID/mem`; bound to the address space that existed when
    /// it was opened (reopen after an exec).
    ProcMem(Arc<File>),
    /// Word-sized `PTRACE_PEEKDATA`/`POKEDATA`; only works from the thread
    /// that attached, while the target thread `pid` is ptrace-stopped.
    Ptrace,
}

/// Memory of a live process.
///
/// Opened with [`ProcessMemory::open`] once the process is traced (the kernel
/// lets a tracer write read-only pages, such as code, through
/// `/proc/PID/mem`). The handle is cheap to clone; clones share the file.
/// After the process calls `execve` the handle still refers to the old
/// address space and every access fails: open a new one.
#[derive(Clone, Debug)]
pub struct ProcessMemory {
    pid: Pid,
    backend: Backend,
}

impl ProcessMemory {
    /// Open `/proc/PID/mem` for reading and writing, falling back to ptrace
    /// word access when that file cannot be opened.
    pub fn open(pid: Pid) -> ProcessMemory {
        match Self::open_proc(pid) {
            Ok(m) => m,
            Err(_) => Self::ptrace_only(pid),
        }
    }

    /// Open `/proc/PID/mem`, without fallback.
    pub fn open_proc(pid: Pid) -> Result<ProcessMemory, MemError> {
        let path = format!("/proc/{pid}/mem");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| MemError::Open {
                pid: pid.as_raw(),
                source,
            })?;
        Ok(ProcessMemory {
            pid,
            backend: Backend::ProcMem(Arc::new(file)),
        })
    }

    /// Access through `PTRACE_PEEKDATA`/`POKEDATA` only. `pid` must be a
    /// ptrace-stopped thread of the target traced by the calling thread.
    pub fn ptrace_only(pid: Pid) -> ProcessMemory {
        ProcessMemory {
            pid,
            backend: Backend::Ptrace,
        }
    }

    /// The process (or thread) this handle reads.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Whether this handle uses `/proc/PID/mem` (as opposed to ptrace words).
    pub fn uses_proc_mem(&self) -> bool {
        matches!(self.backend, Backend::ProcMem(_))
    }

    fn proc_access(
        &self,
        file: &File,
        op: MemOp,
        addr: RuntimeAddr,
        len: usize,
        mut step: impl FnMut(&File, u64, usize) -> io::Result<usize>,
    ) -> Result<(), MemError> {
        range_end(op, addr, len)?;
        let mut done = 0usize;
        // Each iteration makes progress or returns, so this is bounded by len.
        while done < len {
            let pos = addr.0 + done as u64;
            match step(file, pos, done) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) if done == 0 => {
                    return Err(MemError::Io {
                        pid: self.pid.as_raw(),
                        op,
                        addr,
                        len,
                        source,
                    })
                }
                Err(_) => break,
            }
        }
        if done < len {
            return Err(MemError::Short {
                pid: self.pid.as_raw(),
                op,
                addr,
                len,
                done,
            });
        }
        Ok(())
    }

    fn peek(&self, addr: u64) -> Result<[u8; 8], MemError> {
        ptrace::read(self.pid, addr as ptrace::AddressType)
            .map(|w| w.to_le_bytes())
            .map_err(|errno| MemError::Ptrace {
                pid: self.pid.as_raw(),
                op: MemOp::Read,
                addr: RuntimeAddr(addr),
                errno,
            })
    }

    fn poke(&self, addr: u64, word: [u8; 8]) -> Result<(), MemError> {
        ptrace::write(
            self.pid,
            addr as ptrace::AddressType,
            i64::from_le_bytes(word),
        )
        .map_err(|errno| MemError::Ptrace {
            pid: self.pid.as_raw(),
            op: MemOp::Write,
            addr: RuntimeAddr(addr),
            errno,
        })
    }
}

impl TargetMemory for ProcessMemory {
    fn read(&self, addr: RuntimeAddr, buf: &mut [u8]) -> Result<(), MemError> {
        match &self.backend {
            Backend::ProcMem(file) => {
                let len = buf.len();
                self.proc_access(file, MemOp::Read, addr, len, |f, pos, done| {
                    f.read_at(&mut buf[done..], pos)
                })
            }
            Backend::Ptrace => {
                let end = range_end(MemOp::Read, addr, buf.len())?;
                let mut cur = addr.0;
                while cur < end {
                    // Aligned word reads; the last one may reach past `end`,
                    // so it is clamped to the word below when it would wrap.
                    let word_addr = cur & !7;
                    let word = self.peek(word_addr)?;
                    let skip = (cur - word_addr) as usize;
                    let n = (8 - skip).min((end - cur) as usize);
                    let at = (cur - addr.0) as usize;
                    buf[at..at + n].copy_from_slice(&word[skip..skip + n]);
                    cur += n as u64;
                }
                Ok(())
            }
        }
    }

    /// One `process_vm_readv` per [`IOV_MAX`] ranges; what it could not
    /// read (an unreadable page, a kernel without it) is read range by range
    /// through `/proc/PID/mem`, which also says why a range fails.
    fn read_ranges(
        &self,
        ranges: &mut [(RuntimeAddr, &mut [u8])],
    ) -> Result<(), (usize, MemError)> {
        if !self.uses_proc_mem() {
            for (i, (addr, buf)) in ranges.iter_mut().enumerate() {
                self.read(*addr, buf).map_err(|e| (i, e))?;
            }
            return Ok(());
        }
        let mut base = 0;
        for chunk in ranges.chunks_mut(IOV_MAX) {
            let n = chunk.len();
            for (i, (addr, buf)) in chunk.iter().enumerate() {
                range_end(MemOp::Read, *addr, buf.len()).map_err(|e| (base + i, e))?;
            }
            let remote: Vec<RemoteIoVec> = chunk
                .iter()
                .map(|(a, b)| RemoteIoVec {
                    base: a.0 as usize,
                    len: b.len(),
                })
                .collect();
            let want: usize = remote.iter().map(|r| r.len).sum();
            let got = {
                let mut local: Vec<IoSliceMut<'_>> =
                    chunk.iter_mut().map(|(_, b)| IoSliceMut::new(b)).collect();
                process_vm_readv(self.pid, &mut local, &remote).unwrap_or(0)
            };
            if got < want {
                let from = first_incomplete(remote.iter().map(|r| r.len), got).min(n);
                for (i, (addr, buf)) in chunk.iter_mut().enumerate().skip(from) {
                    self.read(*addr, buf).map_err(|e| (base + i, e))?;
                }
            }
            base += n;
        }
        Ok(())
    }

    /// One `process_vm_writev` per [`IOV_MAX`] ranges (writable memory);
    /// what it could not store (code, read-only data) is written range by
    /// range through `/proc/PID/mem`, which ignores page protection.
    fn write_ranges(&mut self, ranges: &[(RuntimeAddr, &[u8])]) -> Result<(), (usize, MemError)> {
        if !self.uses_proc_mem() {
            for (i, (addr, data)) in ranges.iter().enumerate() {
                self.write(*addr, data).map_err(|e| (i, e))?;
            }
            return Ok(());
        }
        let mut base = 0;
        for chunk in ranges.chunks(IOV_MAX) {
            let n = chunk.len();
            for (i, (addr, data)) in chunk.iter().enumerate() {
                range_end(MemOp::Write, *addr, data.len()).map_err(|e| (base + i, e))?;
            }
            let remote: Vec<RemoteIoVec> = chunk
                .iter()
                .map(|(a, d)| RemoteIoVec {
                    base: a.0 as usize,
                    len: d.len(),
                })
                .collect();
            let local: Vec<IoSlice<'_>> = chunk.iter().map(|(_, d)| IoSlice::new(d)).collect();
            let want: usize = remote.iter().map(|r| r.len).sum();
            let got = process_vm_writev(self.pid, &local, &remote).unwrap_or(0);
            if got < want {
                let from = first_incomplete(remote.iter().map(|r| r.len), got).min(n);
                for (i, (addr, data)) in chunk.iter().enumerate().skip(from) {
                    self.write(*addr, data).map_err(|e| (base + i, e))?;
                }
            }
            base += n;
        }
        Ok(())
    }

    fn write(&mut self, addr: RuntimeAddr, data: &[u8]) -> Result<(), MemError> {
        match &self.backend {
            Backend::ProcMem(file) => {
                self.proc_access(file, MemOp::Write, addr, data.len(), |f, pos, done| {
                    f.write_at(&data[done..], pos)
                })
            }
            Backend::Ptrace => {
                let end = range_end(MemOp::Write, addr, data.len())?;
                let mut cur = addr.0;
                while cur < end {
                    // Read-modify-write of whole aligned words.
                    let word_addr = cur & !7;
                    let mut word = self.peek(word_addr)?;
                    let skip = (cur - word_addr) as usize;
                    let n = (8 - skip).min((end - cur) as usize);
                    let at = (cur - addr.0) as usize;
                    word[skip..skip + n].copy_from_slice(&data[at..at + n]);
                    self.poke(word_addr, word)?;
                    cur += n as u64;
                }
                Ok(())
            }
        }
    }
}
