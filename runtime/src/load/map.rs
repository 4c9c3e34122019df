//! Mapping NEW into the process with remote system calls: a `PROT_NONE`
//! reservation of its whole span, each `PT_LOAD` segment mapped over it from
//! a file, `.bss` zeroed, then the [`LoadPlan`]'s relocations written and
//! RELRO made read-only.
//!
//! The file is NEW's own, opened by the process through its path (so
//! `/proc/PID/maps` names it and debuggers find its symbols) when the
//! process resolves paths as the updater does. A chrooted process or one in
//! another mount namespace cannot see that path: it gets NEW through a
//! memfd it creates and the updater fills (through `/proc/PID/fd/N`, else
//! with remote `pwrite64`), recognised in the maps by its name, device and
//! inode.

use super::elf::{page_down, page_up, ElfError, ElfSummary};
use super::relocs::{LoadPlan, RelocValue, MAX_COPY};
use super::{LoadError, LoadReport};
use crate::engine::state::Image;
use crate::memory::TargetMemory;
use crate::target::procfs;
use crate::target::remote::{self, RemoteCalls, RemoteError};
use nix::errno::Errno;
use nix::libc;
use nix::unistd::Pid;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use upstare_dwarf::fdt::FrameTables;
use upstare_dwarf::{LinkAddr, LoadBias, RuntimeAddr};

/// How the process's mapping of NEW is recognised in `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Shown {
    /// By NEW's path, opened by the process.
    Path,
    /// By the memfd's name (`/memfd:NAME (deleted)`), device and inode.
    Memfd {
        name: String,
        dev_major: u32,
        dev_minor: u32,
        inode: u64,
    },
}

impl Shown {
    fn is(&self, m: &procfs::MemoryMap, path: &Path) -> bool {
        match self {
            Shown::Path => m.file() == Some(path),
            Shown::Memfd {
                name,
                dev_major,
                dev_minor,
                inode,
            } => {
                m.file() == Some(Path::new(&format!("/memfd:{name}")))
                    && m.dev_major == *dev_major
                    && m.dev_minor == *dev_minor
                    && m.inode == *inode
            }
        }
    }
}

/// The name of the memfd holding `path` in the process: `upstare:` and
/// the file's name, within the kernel's limit of 249 bytes.
fn memfd_name(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut name = format!("upstare:{file}");
    while name.len() > 200 {
        name.pop();
    }
    name
}

/// `MFD_EXEC`: the memfd may be mapped executable (Linux 6.3+, where a
/// memfd without it or `MFD_NOEXEC_SEAL` draws a warning).
const MFD_EXEC: u32 = 0x10;

/// Open NEW (`path`, whose bytes are `bytes`) in the process: its fd there
/// and how its mapping will show.
fn open_in_target(
    rc: &mut RemoteCalls<'_>,
    pid: Pid,
    path: &Path,
    bytes: &[u8],
) -> Result<(i32, Shown), LoadError> {
    if procfs::shares_root(pid) {
        let fd = rc.openat(path, libc::O_RDONLY | libc::O_CLOEXEC, 0)?;
        return Ok((fd, Shown::Path));
    }
    let name = memfd_name(path);
    let fd = match rc.memfd_create(&name, libc::MFD_CLOEXEC | MFD_EXEC) {
        Err(RemoteError::Syscall {
            errno: Errno::EINVAL,
            ..
        }) => rc.memfd_create(&name, libc::MFD_CLOEXEC)?,
        r => r?,
    };
    let filled = fill_memfd(rc, pid, fd, bytes).and_then(|()| Ok(rc.fstat_identity(fd)?));
    match filled {
        Ok((dev, inode)) => Ok((
            fd,
            Shown::Memfd {
                name,
                dev_major: libc::major(dev),
                dev_minor: libc::minor(dev),
                inode,
            },
        )),
        Err(e) => {
            let _ = rc.close(fd);
            Err(e)
        }
    }
}

/// Write `bytes` into the process's empty memfd `fd`: directly through
/// `/proc/PID/fd/FD` (one write), else with remote `pwrite64`.
fn fill_memfd(rc: &mut RemoteCalls<'_>, pid: Pid, fd: i32, bytes: &[u8]) -> Result<(), LoadError> {
    use std::io::Write;
    let direct = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/fd/{fd}"))
        .and_then(|mut f| f.write_all(bytes));
    if direct.is_ok() {
        return Ok(());
    }
    // Refused (another user's process without the capability): the process
    // writes it itself. The file may hold part of the bytes: rewrite all.
    rc.pwrite_all(fd, bytes, 0)?;
    Ok(())
}

/// Reserve NEW's span in the process, map and relocate NEW there (file
/// `path` whose bytes are `bytes`, as planned by `plan`) and check that
/// `/proc/PID/maps` shows it. Returns the span and bias, and the maps read
/// for the check (the process's maps with NEW in them, used for the rest
/// of the update); on failure the span is unmapped again.
pub(super) fn map_image(
    rc: &mut RemoteCalls<'_>,
    pid: Pid,
    path: &Path,
    bytes: &[u8],
    plan: &LoadPlan,
) -> Result<
    (
        Range<RuntimeAddr>,
        LoadBias,
        LoadReport,
        Vec<procfs::MemoryMap>,
    ),
    LoadError,
> {
    let len = plan.hi - plan.lo;
    let (fd, shown) = open_in_target(rc, pid, path, bytes)?;
    // Segments whose file offset is their distance from the image's start
    // (linkers lay the read-only and code segments out so) are in place in
    // one read-only mapping of the file over the whole span, which is also
    // the span's reservation: fewer calls into the paused process than a
    // reservation and one mmap per segment.
    let whole = plan
        .segments
        .first()
        .is_some_and(|s| s.filesz > 0 && page_down(s.vaddr) == plan.lo && page_down(s.offset) == 0);
    let reserved = if whole {
        rc.mmap(
            RuntimeAddr(0),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            fd,
            0,
        )
    } else {
        rc.mmap(
            RuntimeAddr(0),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    let base = match reserved {
        Ok(b) => b,
        Err(e) => {
            let _ = rc.close(fd);
            return Err(e.into());
        }
    };
    let bias = LoadBias(base.0.wrapping_sub(plan.lo));
    let mapped = map_and_relocate(rc, fd, path, plan, bias, whole);
    let mapped = mapped.and_then(|r| {
        let maps = procfs::read_maps(pid)?;
        let on_show = maps.iter().any(|m| {
            m.perms.exec && shown.is(m, path) && base <= m.start && m.end.0 <= base.0 + len
        });
        if on_show {
            Ok((r, maps))
        } else {
            Err(LoadError::NotMapped {
                pid: pid.as_raw(),
                path: path.to_path_buf(),
                addr: base,
            })
        }
    });
    match mapped {
        Ok((report, maps)) => Ok((base..RuntimeAddr(base.0 + len), bias, report, maps)),
        Err(e) => {
            let _ = rc.munmap(base, len);
            Err(e)
        }
    }
}

/// The running image's entry point, checked to be its code.
pub(super) fn running_gadget(pid: Pid, running: &Image) -> Result<RuntimeAddr, LoadError> {
    // The program's own entry (AT_ENTRY) when it is the running image: exact
    // even if its file was replaced on disk since.
    let at_entry = procfs::read_auxv(pid)
        .ok()
        .and_then(|a| procfs::auxv_value(&a, procfs::AT_ENTRY).ok())
        .map(RuntimeAddr)
        .filter(|a| running.span.contains(a));
    let g = match at_entry {
        Some(a) => a,
        None => {
            let file = std::fs::File::open(&running.path).map_err(|source| ElfError::Io {
                path: running.path.clone(),
                source,
            })?;
            let entry = ElfSummary::parse(&running.path, &object::ReadCache::new(file))?.entry;
            if entry == 0 {
                return Err(LoadError::NoGadget {
                    path: running.path.clone(),
                    entry: RuntimeAddr(0),
                });
            }
            LinkAddr(entry).to_runtime(running.bias)
        }
    };
    let end = RuntimeAddr(g.0.saturating_add(remote::GADGET_LEN as u64));
    if !(running.span.contains(&g) && end <= running.span.end) {
        return Err(LoadError::NoGadget {
            path: running.path.clone(),
            entry: g,
        });
    }
    Ok(g)
}

/// From how many distinct imported IFUNC resolvers they are called in one
/// batch (which first maps the batch loop's code: two remote calls more).
const BATCH_RESOLVERS_FROM: usize = 4;

/// Map NEW's segments into the reserved span at `bias` and relocate them.
/// Map NEW's segments through `fd` (closed here) at `bias` (with `whole`,
/// the file is already mapped over the span, see [`map_image`]), then
/// write its relocations.
fn map_and_relocate(
    rc: &mut RemoteCalls<'_>,
    fd: i32,
    path: &Path,
    plan: &LoadPlan,
    bias: LoadBias,
    whole: bool,
) -> Result<LoadReport, LoadError> {
    let r = map_segments(rc, fd, plan, bias, whole);
    let closed = rc.close(fd);
    r?;
    closed?;
    let at = |off: u64| LinkAddr(off).to_runtime(bias);
    let mut report = LoadReport::default();
    let mut ifuncs: HashMap<u64, u64> = HashMap::new();
    // Relocated words are written in batches (one system call for many),
    // flushed before any code of the process runs (an IFUNC resolver may
    // read what was relocated before it) and at the end.
    let mut pending: Vec<(RuntimeAddr, [u8; 8])> = Vec::new();
    // The imports' IFUNC resolvers (code of other objects, which reads
    // nothing of NEW) called in one batch: one remote call for all rather
    // than one each (redis: 26 resolvers, 3.7 ms one by one).
    let mut resolvers: Vec<RuntimeAddr> = plan
        .relocs
        .iter()
        .filter_map(|(_, v)| match v {
            RelocValue::Ifunc { resolver, .. } => Some(*resolver),
            _ => None,
        })
        .collect();
    resolvers.sort_unstable();
    resolvers.dedup();
    if resolvers.len() >= BATCH_RESOLVERS_FROM {
        let mut got = Vec::with_capacity(resolvers.len());
        rc.call_all(&resolvers, &mut got)?;
        report.ifunc_calls += resolvers.len();
        for (r, a) in resolvers.iter().zip(got) {
            // A zero is refused below, naming the symbol.
            if a != 0 {
                ifuncs.insert(r.0, a);
            }
        }
    }
    let flush = |rc: &mut RemoteCalls<'_>, pending: &mut Vec<(RuntimeAddr, [u8; 8])>| {
        let ranges: Vec<(RuntimeAddr, &[u8])> =
            pending.iter().map(|(a, b)| (*a, b.as_slice())).collect();
        let r = rc.memory().write_ranges(&ranges).map_err(|(_, e)| e);
        pending.clear();
        r
    };
    for (off, v) in &plan.relocs {
        let value = match v {
            RelocValue::Base(x) => bias.0.wrapping_add(*x),
            RelocValue::Abs(x) => *x,
            RelocValue::Ifunc {
                resolver,
                addend,
                symbol,
            } => {
                let impl_addr = match ifuncs.get(&resolver.0) {
                    Some(&a) => a,
                    None => {
                        flush(rc, &mut pending)?;
                        let a = rc.call(*resolver, &[])?;
                        report.ifunc_calls += 1;
                        if a == 0 {
                            return Err(LoadError::BadIfunc {
                                path: path.to_path_buf(),
                                symbol: symbol.clone(),
                                resolver: *resolver,
                                value: a,
                            });
                        }
                        ifuncs.insert(resolver.0, a);
                        a
                    }
                };
                impl_addr.wrapping_add(*addend)
            }
            RelocValue::LocalIfunc { resolver, symbol } => {
                let r = RuntimeAddr(bias.0.wrapping_add(*resolver));
                flush(rc, &mut pending)?;
                let a = rc.call(r, &[])?;
                report.ifunc_calls += 1;
                if a == 0 {
                    return Err(LoadError::BadIfunc {
                        path: path.to_path_buf(),
                        symbol: symbol.clone(),
                        resolver: r,
                        value: a,
                    });
                }
                a
            }
            RelocValue::Copy { src, size, symbol } => {
                flush(rc, &mut pending)?;
                let bytes = rc
                    .memory()
                    .read_vec(*src, *size, MAX_COPY as usize)
                    .map_err(|e| LoadError::Copy {
                        path: path.to_path_buf(),
                        symbol: symbol.clone(),
                        reason: e.to_string(),
                    })?;
                rc.memory().write(at(*off), &bytes)?;
                report.relocations += 1;
                continue;
            }
        };
        pending.push((at(*off), value.to_le_bytes()));
        report.relocations += 1;
    }
    flush(rc, &mut pending)?;
    if let Some((vaddr, memsz)) = plan.relro {
        let start = page_down(vaddr);
        let end = page_down(vaddr.saturating_add(memsz));
        if end > start {
            rc.mprotect(at(start), end - start, libc::PROT_READ)?;
        }
    }
    Ok(report)
}

fn map_segments(
    rc: &mut RemoteCalls<'_>,
    fd: i32,
    plan: &LoadPlan,
    bias: LoadBias,
    whole: bool,
) -> Result<(), LoadError> {
    let at = |off: u64| LinkAddr(off).to_runtime(bias);
    for s in &plan.segments {
        let start = page_down(s.vaddr);
        let file_end = s.vaddr + s.filesz;
        let mem_end = s.vaddr + s.memsz;
        let mut anon_start = start;
        if s.filesz > 0 {
            let map_end = page_up(file_end).unwrap_or(file_end);
            if whole && start.checked_sub(plan.lo) == Some(page_down(s.offset)) {
                // In place in the whole-file mapping: only its protection.
                if s.prot() != libc::PROT_READ {
                    rc.mprotect(at(start), map_end - start, s.prot())?;
                }
            } else {
                rc.mmap(
                    at(start),
                    map_end - start,
                    s.prot(),
                    libc::MAP_PRIVATE | libc::MAP_FIXED,
                    fd,
                    page_down(s.offset),
                )?;
            }
            anon_start = map_end;
            if s.memsz > s.filesz {
                // The rest of the last file page is .bss: zero it.
                let zero_end = map_end.min(mem_end);
                if zero_end > file_end {
                    let zeros = vec![0u8; (zero_end - file_end) as usize];
                    rc.memory().write(at(file_end), &zeros)?;
                }
            }
        }
        let anon_end = page_up(mem_end).unwrap_or(mem_end);
        if anon_end > anon_start {
            rc.mmap(
                at(anon_start),
                anon_end - anon_start,
                s.prot(),
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )?;
        }
    }
    Ok(())
}

/// NEW's code range at `bias`: the tables' `.text`, else the span of its
/// executable segments.
pub(super) fn text_range(
    plan: &LoadPlan,
    tables: &FrameTables,
    bias: LoadBias,
) -> Range<RuntimeAddr> {
    if tables.binary.text_size > 0 {
        let start = tables.binary.text_addr.to_runtime(bias);
        return start..RuntimeAddr(start.0.wrapping_add(tables.binary.text_size));
    }
    let code = || plan.segments.iter().filter(|s| s.exec());
    let lo = code().map(|s| s.vaddr).min().unwrap_or(plan.lo);
    // plan_load checked that no segment wraps.
    let hi = code()
        .map(|s| s.vaddr.saturating_add(s.memsz))
        .max()
        .unwrap_or(plan.lo);
    LinkAddr(lo).to_runtime(bias)..LinkAddr(hi).to_runtime(bias)
}
