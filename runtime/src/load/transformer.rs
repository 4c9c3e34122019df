//! The SPEC's C transformers run inside the process: their shared object is
//! written to a private temporary file, mapped beside NEW (file-backed, so
//! `/proc/PID/maps` names it), relocated and linked against the process's
//! libraries like NEW, and each [`Job`] is a remote function call with
//! pointers to a copy of the old value and to the new value in scratch
//! memory; the new value is read back into the pending writes. The object
//! and the scratch memory are unmapped afterwards, whatever happened, in
//! the same remote session.
//!
//! Its constructors are not run (like NEW's). A transformer that faults,
//! does not return within the timeout or returns non-zero fails the update
//! before anything is committed; the registers, signal mask and borrowed
//! code bytes of the thread used are restored by the session.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::libc;
use nix::unistd::Pid;
use upstare_dwarf::elf::ElfFile;
use upstare_dwarf::{LinkAddr, RuntimeAddr};
use upstare_patcher::transformer::TransformerObject;

use super::libraries::Libraries;
use super::LoadError;
use crate::engine::state::Image;
use crate::engine::transform::{read_pending, write_pending, Job};
use crate::engine::Write;
use crate::memory::{MemError, TargetMemory};
use crate::target::ptrace::Tracee;
use crate::target::remote::{RemoteCalls, RemoteError};

/// Why the transformers did not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum TransformerError {
    #[error("transformer object: cannot write its temporary file {path}: {source}")]
    TempFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("transformer object {source_file}: its bytes do not match the hash it was built with")]
    Corrupt { source_file: PathBuf },
    #[error("transformer object {source_file}: {source}")]
    Load {
        source_file: PathBuf,
        #[source]
        source: LoadError,
    },
    #[error("transformer object {source_file}: defines no function {function}")]
    Missing {
        source_file: PathBuf,
        function: String,
    },
    #[error("transformer {function} on {what}: {source}; nothing was changed")]
    Call {
        function: String,
        what: String,
        #[source]
        source: RemoteError,
    },
    #[error("transformer {function} on {what} returned {code} (not 0): the update is refused; nothing was changed")]
    Failed {
        function: String,
        what: String,
        code: i32,
    },
    #[error("transformer {function} on {what}: {source}")]
    Memory {
        function: String,
        what: String,
        #[source]
        source: MemError,
    },
    #[error("the update plan calls C transformers but no transformer object was given (build the PATCH with --spec)")]
    NoObject,
}

/// What the transformers did.
#[derive(Clone, Debug, Default)]
pub struct TransformerRun {
    /// `transformer on what`, in call order.
    pub calls: Vec<String>,
    /// Where the object was mapped.
    pub load_address: u64,
    pub elapsed: Duration,
}

/// The private temporary file the object is mapped from, removed when
/// dropped (the process's mapping of it is gone by then).
struct TempObject {
    dir: PathBuf,
    file: PathBuf,
}

impl TempObject {
    fn write(bytes: &[u8]) -> Result<TempObject, TransformerError> {
        use std::io::Write as _;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut last = None;
        for k in 0..16u32 {
            let dir = base.join(format!("upstare-xf-{}-{nanos}-{k}", std::process::id()));
            // A fresh 0700 directory: nobody else can swap the file.
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    // The name /proc/PID/maps will show.
                    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
                    let file = dir.join("transformers.so");
                    let t = TempObject {
                        dir,
                        file: file.clone(),
                    };
                    let err = |source| TransformerError::TempFile {
                        path: file.clone(),
                        source,
                    };
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o500)
                        .open(&file)
                        .map_err(err)?;
                    f.write_all(bytes).map_err(err)?;
                    f.sync_all().map_err(err)?;
                    return Ok(t);
                }
                Err(e) => last = Some((dir, e)),
            }
        }
        let (path, source) =
            last.unwrap_or_else(|| (base, std::io::Error::other("no directory made")));
        Err(TransformerError::TempFile { path, source })
    }
}

impl Drop for TempObject {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Bytes of argument memory a job needs: its values and, for a frame
/// transformer, the two pointer arrays, each 16-byte aligned.
fn job_size(j: &Job) -> u64 {
    let a = |n: u64| n.next_multiple_of(16);
    let olds: u64 = j.old.iter().flatten().map(|b| a(b.len() as u64)).sum();
    let news: u64 = j.new.iter().flatten().map(|(_, n)| a(*n)).sum();
    let ptrs = if j.frame {
        a(8 * j.old.len().max(1) as u64) + a(8 * j.new.len().max(1) as u64)
    } else {
        0
    };
    olds + news + ptrs + 16
}

/// Maps `object` into the process traced by `tracee` (working in stopped
/// thread `tid`, borrowing `running`'s entry as the gadget), runs every
/// job in order against the pending `writes` (each new value read from
/// them, and written back after its call), and unmaps everything again.
pub fn run_transformers(
    tracee: &mut Tracee,
    tid: Pid,
    running: &Image,
    object: &TransformerObject,
    jobs: &[Job],
    writes: &mut Vec<Write>,
    timeout: Duration,
) -> Result<TransformerRun, TransformerError> {
    let start = Instant::now();
    let source_file = object.source.clone();
    if !object.intact() {
        return Err(TransformerError::Corrupt { source_file });
    }
    let load_err = |source: LoadError| TransformerError::Load {
        source_file: object.source.clone(),
        source,
    };
    let temp = TempObject::write(&object.bytes)?;
    let libs = Libraries::read(tracee.pid()).map_err(load_err)?;
    let plan = super::relocs::plan_load_object(&temp.file, &object.bytes, &libs, false)
        .map_err(load_err)?;
    let elf = ElfFile::parse(&temp.file, &object.bytes).map_err(|e| load_err(e.into()))?;
    let gadget = super::map::running_gadget(tracee.pid(), running).map_err(load_err)?;
    let pid = tracee.pid();
    let mut rc = RemoteCalls::new(tracee, tid, gadget).map_err(|e| load_err(e.into()))?;
    rc.set_timeout(timeout);
    let (span, bias, _, _) =
        match super::map::map_image(&mut rc, pid, &temp.file, &object.bytes, &plan) {
            Ok(m) => m,
            Err(e) => {
                let _ = rc.finish();
                return Err(load_err(e));
            }
        };
    let mut report = TransformerRun {
        load_address: span.start.0,
        ..TransformerRun::default()
    };
    let result = (|| {
        // Every function named, found before anything is called.
        let mut addrs = Vec::with_capacity(jobs.len());
        for j in jobs {
            let sym = elf
                .dynsyms
                .iter()
                .find(|s| s.name == j.function && s.defined && s.value != 0)
                .ok_or_else(|| TransformerError::Missing {
                    source_file: object.source.clone(),
                    function: j.function.clone(),
                })?;
            addrs.push(LinkAddr(sym.value).to_runtime(bias));
        }
        let need = jobs.iter().map(job_size).max().unwrap_or(0);
        if need == 0 {
            return Ok(());
        }
        let len = need.next_multiple_of(4096);
        let buf = rc
            .mmap(
                RuntimeAddr(0),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
            .map_err(|e| load_err(e.into()))?;
        let r = run_jobs(&mut rc, buf, jobs, &addrs, writes, &mut report);
        let _ = rc.munmap(buf, len);
        r
    })();
    // The object goes whatever happened, in this same session.
    let unmapped = rc.munmap(span.start, span.end.0 - span.start.0);
    let finished = rc.finish();
    drop(temp);
    result?;
    unmapped.map_err(|e| load_err(e.into()))?;
    finished.map_err(|e| load_err(e.into()))?;
    report.elapsed = start.elapsed();
    Ok(report)
}

fn run_jobs(
    rc: &mut RemoteCalls<'_>,
    buf: RuntimeAddr,
    jobs: &[Job],
    addrs: &[RuntimeAddr],
    writes: &mut Vec<Write>,
    report: &mut TransformerRun,
) -> Result<(), TransformerError> {
    for (j, &func) in jobs.iter().zip(addrs) {
        let mem_err = |source| TransformerError::Memory {
            function: j.function.clone(),
            what: j.what.clone(),
            source,
        };
        // Lay the arguments out: old copies, new values, pointer arrays.
        let mut cur = buf.0;
        let mut place = |n: u64| {
            let at = cur;
            cur = cur.saturating_add(n.next_multiple_of(16));
            RuntimeAddr(at)
        };
        let mut old_ptrs = Vec::with_capacity(j.old.len());
        for o in &j.old {
            match o {
                Some(b) => {
                    let at = place(b.len() as u64);
                    rc.memory().write(at, b).map_err(mem_err)?;
                    old_ptrs.push(at.0);
                }
                None => old_ptrs.push(0),
            }
        }
        let mut new_ptrs = Vec::with_capacity(j.new.len());
        let mut new_places = Vec::with_capacity(j.new.len());
        for n in &j.new {
            match n {
                Some((addr, len)) => {
                    let bytes = read_pending(rc.memory(), writes, *addr, *len).map_err(mem_err)?;
                    let at = place(*len);
                    rc.memory().write(at, &bytes).map_err(mem_err)?;
                    new_ptrs.push(at.0);
                    new_places.push(Some((at, *addr, *len)));
                }
                None => {
                    new_ptrs.push(0);
                    new_places.push(None);
                }
            }
        }
        let args = if j.frame {
            let arr = |p: &[u64]| {
                let mut b: Vec<u8> = p.iter().flat_map(|x| x.to_le_bytes()).collect();
                if b.is_empty() {
                    b.resize(8, 0);
                }
                b
            };
            let (ob, nb) = (arr(&old_ptrs), arr(&new_ptrs));
            let oa = place(ob.len() as u64);
            let na = place(nb.len() as u64);
            rc.memory().write(oa, &ob).map_err(mem_err)?;
            rc.memory().write(na, &nb).map_err(mem_err)?;
            [oa.0, na.0]
        } else {
            [
                old_ptrs.first().copied().unwrap_or(0),
                new_ptrs.first().copied().unwrap_or(0),
            ]
        };
        let rax = rc
            .call(func, &args)
            .map_err(|source| TransformerError::Call {
                function: j.function.clone(),
                what: j.what.clone(),
                source,
            })?;
        // An `int` return: the low 32 bits.
        let code = rax as u32 as i32;
        if code != 0 {
            return Err(TransformerError::Failed {
                function: j.function.clone(),
                what: j.what.clone(),
                code,
            });
        }
        for (at, addr, len) in new_places.into_iter().flatten() {
            let bytes = rc
                .memory()
                .read_vec(at, len, len as usize)
                .map_err(mem_err)?;
            write_pending(writes, addr, bytes, &j.what);
        }
        report.calls.push(format!("{} on {}", j.function, j.what));
    }
    Ok(())
}

/// Whether `path` is the temporary file of a transformer object (for tests
/// that look for leftovers in `/proc/PID/maps`).
pub fn is_transformer_file(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "transformers.so")
        && path
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|d| d.to_string_lossy().starts_with("upstare-xf-"))
}
