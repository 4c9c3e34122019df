//! Loading the new version (NEW) into the running process, beside the
//! running image, without running any of its code; and the commit steps
//! that hand the process over to it.
//!
//! Where things are:
//! - [`elf`]: an ELF file's bytes parsed once into what everything here
//!   needs (header, segments, `.dynamic`, `.dynsym` with versions,
//!   relocations). Every ELF header of the loader is parsed there.
//! - [`libraries`]: the one registry of the objects the process has mapped
//!   ([`Libraries`]): CFI and function names of library frames for the
//!   unwinder, symbol lookup in the dynamic linker's `link_map` order for
//!   NEW's imports; each object's bytes read once, on first use.
//! - [`image`]: finding the instrumented image the process runs.
//! - `relocs`: NEW checked and its relocations and imports decided as data
//!   (what to write where), before the process is touched. A new relocation
//!   type goes in `relocs::plan_load`; if it needs a new kind of value, that
//!   value is written in `map::map_and_relocate`.
//! - `map`: NEW's segments mapped with remote calls, relocations written.
//! - [`transformer`]: the SPEC's C transformers, mapped beside NEW like it,
//!   called, and unmapped again.
//! - `commit`: the commit steps and their undo. A new commit step gets its
//!   read-only plan in `commit::plan_commit` (a field of [`CommitPlan`]) and
//!   its apply and undo in `commit::apply_commit`.
//!
//! [`load_image`]:
//! 1. Checks NEW before touching the process: x86-64, position-independent
//!    (an `ET_EXEC` file has fixed addresses, taken by the running image),
//!    no thread-local storage of its own (`PT_TLS`: the process's TLS blocks
//!    are laid out already), a `.upstare` section, every `DT_NEEDED` library
//!    already loaded, every import resolvable. Any refusal leaves the process
//!    untouched ([`check_loadable`] does only this).
//! 2. Reserves NEW's whole span with an anonymous `PROT_NONE` mapping made by
//!    the process ([`RemoteCalls`]), then maps each `PT_LOAD` segment over it
//!    from the file (`MAP_FIXED`), so `/proc/PID/maps` names NEW's file; the
//!    rest of the last file page of a segment with `.bss` is zeroed and the
//!    remaining `.bss` is anonymous memory.
//! 3. Applies the dynamic relocations (`.rela.dyn`, `.rela.plt`, `.relr.dyn`)
//!    through `/proc/PID/mem`, binding every import now:
//!    - `RELATIVE`: bias + addend; `64`, `GLOB_DAT`, `JUMP_SLOT`: the symbol's
//!      address in the libraries the process has mapped, searched in the
//!      dynamic linker's order (its `link_map` list), with symbol versions
//!      matched as `ld.so` does. An `STT_GNU_IFUNC` symbol is resolved by
//!      calling its resolver in the process, which returns the
//!      implementation the process uses. Weak undefined symbols are 0.
//!    - `COPY` (`stdout`, `stderr`, `environ`, ...: data that gcc addresses
//!      PC-relative even in PIE, so the executable carries its own copy):
//!      NEW's copy is filled from the live one, the copy the C library's GOT
//!      slots point at (the first executable's, or the previous version's
//!      after an update), and the commit points those slots at NEW's copy
//!      (see `copies`), so that `setenv` and NEW's code use one `environ`.
//!    - `IRELATIVE` (NEW's own IFUNCs): its resolver is called in the process
//!      after every other relocation.
//!
//!    Then `PT_GNU_RELRO` is made read-only. NEW's constructors
//!    (`.init_array`) are not run: its state comes from the old version.
//! 4. Returns a [`LoadedImage`] guard that unmaps NEW again when dropped,
//!    unless it was committed.
//!
//! At commit ([`LoadedImage::plan_commit`], then [`LoadedImage::commit`],
//! or both at once with [`finish_commit`]): signal handlers in the old
//! image's code are re-registered at the same functions of NEW; the main
//! program's `.dynamic` `DT_FINI`/`DT_FINI_ARRAY`/`DT_FINI_ARRAYSZ` are
//! redirected to NEW's, since the dynamic linker runs the main program's
//! destructors at exit with its `l_addr` (the main program stays the first
//! version, whatever the number of updates); and the old image's code is
//! made non-executable so that a stale code pointer traps.

mod commit;
pub mod copies;
pub mod elf;
mod exit_handlers;
pub mod image;
pub mod libraries;
mod map;
mod relocs;
pub mod retire;
pub mod transformer;

pub use commit::{CommitPlan, DynamicWrite, EpollRewrite, FiniRedirect, HandlerMove};
pub use elf::{ElfError, MAX_ELF_SIZE};
pub use libraries::{Libraries, Library, LibraryError, Resolved};
pub use relocs::{import_slots, reloc_name, ImportSlot};

use crate::engine::state::Image;
use crate::memory::{MemError, TargetMemory};
use crate::target::procfs::{self, MemoryMap, ProcError};
use crate::target::ptrace::Tracee;
use crate::target::remote::{self, RemoteCalls, RemoteError};
use nix::unistd::Pid;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use upstare_dwarf::fdt::FrameTables;
use upstare_dwarf::{LinkAddr, RuntimeAddr};

/// Why NEW cannot be loaded, or a commit step failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error("{path}: not an x86-64 ELF file (e_machine {machine})")]
    NotX86_64 { path: PathBuf, machine: u16 },
    #[error(
        "{path}: not position-independent (ELF type EXEC): its fixed addresses cannot be \
         placed beside the running image; build it as PIE (gcc's default)"
    )]
    NotPie { path: PathBuf },
    #[error("{path}: not an executable (ELF type {e_type})")]
    NotExecutable { path: PathBuf, e_type: u16 },
    #[error(
        "{path}: has its own thread-local variables (PT_TLS), which cannot be added to a \
         running process"
    )]
    OwnTls { path: PathBuf },
    #[error("{path}: no .upstare section (instrument it with upstare-rewrite first)")]
    NoTables { path: PathBuf },
    #[error("{path}: needs library {library}, which process {pid} has not loaded")]
    MissingLibrary {
        path: PathBuf,
        library: String,
        pid: i32,
    },
    #[error("{path}: symbol {symbols} not found in the libraries of process {pid}")]
    Unresolved {
        path: PathBuf,
        /// The first unresolved symbols (`name@version`), comma-separated.
        symbols: String,
        pid: i32,
    },
    #[error("{path}: relocation type {kind} at {offset} (symbol {symbol}) is not supported")]
    UnsupportedReloc {
        path: PathBuf,
        kind: u32,
        offset: LinkAddr,
        symbol: String,
    },
    #[error("{path}: {what}")]
    BadLayout { path: PathBuf, what: String },
    #[error("pid {pid}: cannot list its libraries: {reason}")]
    LinkMap { pid: i32, reason: String },
    #[error("pid {pid}: library {path} is no longer the file the process mapped ({reason})")]
    LibraryChanged {
        pid: i32,
        path: PathBuf,
        reason: String,
    },
    #[error("pid {pid}: {path} was mapped at {addr} but /proc/{pid}/maps does not show it there")]
    NotMapped {
        pid: i32,
        path: PathBuf,
        addr: RuntimeAddr,
    },
    #[error("{path}: COPY relocation of {symbol}: {reason}")]
    Copy {
        path: PathBuf,
        symbol: String,
        reason: String,
    },
    #[error("{path}: IFUNC resolver of {symbol} at {resolver} returned {value:#x}")]
    BadIfunc {
        path: PathBuf,
        symbol: String,
        resolver: RuntimeAddr,
        value: u64,
    },
    #[error("running image {path}: its entry point {entry} is not in its code: cannot borrow it")]
    NoGadget { path: PathBuf, entry: RuntimeAddr },
    #[error("cannot read the exported symbols of {path}: {reason}")]
    Symbols { path: PathBuf, reason: String },
    #[error("cannot redirect the destructors of {old} to {new}: {reason}")]
    Fini {
        old: PathBuf,
        new: PathBuf,
        reason: String,
    },
    #[error(
        "signal {sig}: its handler {handler} is code of {old} with no counterpart in the new \
         version ({function})"
    )]
    Handler {
        sig: i32,
        handler: RuntimeAddr,
        old: PathBuf,
        function: String,
    },
    #[error(
        "the gadget {gadget} of the remote session lies in the code of {path}, which is being \
         made non-executable"
    )]
    GadgetInRetired { gadget: RuntimeAddr, path: PathBuf },
    #[error("pid {pid}: no function {symbol} among its libraries, needed to convert heap objects")]
    NoAllocator { pid: i32, symbol: String },
    #[error("pid {pid}: malloc({size}) returned no memory for a moved heap object")]
    OutOfMemory { pid: i32, size: u64 },
    #[error(
        "pid {pid}: the batch of remote {call} calls stopped after {made} of {asked} without \
         an error"
    )]
    BatchShort {
        pid: i32,
        call: &'static str,
        made: usize,
        asked: usize,
    },
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Mem(#[from] MemError),
    #[error(transparent)]
    Proc(#[from] ProcError),
}

/// Options of [`load_image`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Bound on each remote system call and each IFUNC resolver call.
    pub call_timeout: Duration,
    /// The process's maps with the [`Tracee::maps_epoch`] they were read
    /// at (by the stop): used instead of reading them again while the
    /// epoch is unchanged.
    pub maps: Option<(Vec<MemoryMap>, u64)>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            call_timeout: remote::DEFAULT_TIMEOUT,
            maps: None,
        }
    }
}

/// What loading did.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Relocations applied.
    pub relocations: usize,
    /// IFUNC resolvers called in the process.
    pub ifunc_calls: usize,
    /// COPY-relocated objects (name, size), filled from the live copies.
    pub copies: Vec<(String, u64)>,
    /// Objects the process had loaded (imports were searched in them).
    pub libraries: Vec<PathBuf>,
}

/// NEW mapped and relocated in the process. Dropping it unmaps NEW again
/// (through a remote `munmap` in the same thread) unless it was committed:
/// an update abandoned before its commit leaves no trace.
///
/// The guard holds the [`Tracee`] and dereferences to it, so that while it
/// lives the tracee is used through it (`loaded.memory()`,
/// `loaded.set_regs(..)`) alongside `loaded.image()`;
/// [`LoadedImage::parts`] gives both at once with the tracee mutable.
pub struct LoadedImage<'t> {
    tracee: &'t mut Tracee,
    tid: Pid,
    image: Option<Image>,
    /// Borrowed code of the running image (valid until its retirement).
    running_gadget: RuntimeAddr,
    /// NEW's entry point (never run): the gadget for commit steps.
    new_gadget: RuntimeAddr,
    timeout: Duration,
    report: LoadReport,
    /// The process's maps once NEW was mapped (nothing maps or unmaps
    /// while it is paused, until the commit retires the old code).
    maps: Vec<MemoryMap>,
    /// Heap objects allocated in the process for moved objects of changed
    /// type: freed again unless the update commits.
    heap_allocated: Vec<RuntimeAddr>,
    /// Old heap objects to free once the commit succeeded.
    heap_to_free: Vec<RuntimeAddr>,
    /// The libraries' slots to point at NEW's COPY-relocated objects.
    copy_redirects: Vec<commit::CopyRedirect>,
    /// What redirecting the destructors needs from the files.
    fini: commit::FiniSources,
    /// How many of the retired ranges were left mapped, when they were
    /// unmapped with the commit steps.
    unmapped_at_commit: Option<usize>,
    /// The signal actions, read in the load's session (taken by the
    /// commit plan).
    signals: Option<commit::SignalPlan>,
    /// The [`Tracee::maps_epoch`] `maps` were read at.
    maps_epoch: u64,
    /// When a signal handler runs on an alternate stack: the alternate
    /// stack of the load's thread as its session read it (`Some(None)`: it
    /// has none); `None`: not read (no such handler, or unreadable).
    own_alt_stack: Option<Option<std::ops::Range<u64>>>,
    /// The libraries the load resolved NEW's imports in: freeing their
    /// symbol tables takes about 0.5 ms, so they are handed to the caller
    /// ([`LoadedImage::take_libraries`]) to drop once the process runs.
    libraries: Libraries,
}

impl fmt::Debug for LoadedImage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedImage")
            .field("tid", &self.tid)
            .field("image", &self.image.as_ref().map(|i| (&i.path, i.bias)))
            .finish()
    }
}

/// The gadget address remote calls borrow in `running` (its entry point),
/// for sessions outside a load.
pub fn running_gadget(pid: Pid, running: &Image) -> Result<RuntimeAddr, LoadError> {
    map::running_gadget(pid, running)
}

/// NEW's load worked out while the process still runs: the objects it has
/// mapped and the dynamic linker's order over them, NEW's relocations with
/// every import resolved against them, and the running image's gadget.
/// None of it depends on the paused state; [`load_prepared`] checks that
/// the objects it relied on are still the ones mapped, and works it out
/// again (in the pause) otherwise.
pub struct PreparedLoad {
    canon: PathBuf,
    libs: Libraries,
    plan: relocs::LoadPlan,
    running_gadget: RuntimeAddr,
    /// The process's file mappings the plan was made against.
    files: Vec<MemoryMap>,
    /// The libraries' GOT slots bound to NEW's COPY-relocated objects.
    copy_slots: Vec<copies::BoundSlot>,
    /// What redirecting the destructors needs from the files.
    fini: commit::FiniSources,
}

impl fmt::Debug for PreparedLoad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedLoad")
            .field("path", &self.canon)
            .field("relocations", &self.plan.relocs.len())
            .finish()
    }
}

/// The file-backed mappings of `maps`: what a library loaded or unloaded
/// since changes (the dynamic linker maps every object it loads).
fn file_mappings(maps: &[MemoryMap]) -> Vec<MemoryMap> {
    maps.iter()
        .filter(|m| m.file().is_some())
        .cloned()
        .collect()
}

/// Work out NEW's load (see [`PreparedLoad`]) against process `pid` whose
/// current maps are `maps`, without changing the process.
pub fn prepare_load(
    pid: Pid,
    maps: &[MemoryMap],
    new_path: &Path,
    new_bytes: &[u8],
    running: &Image,
) -> Result<PreparedLoad, LoadError> {
    let canon = canonical(new_path)?;
    let libs = Libraries::read_with_maps(pid, maps)?;
    let plan = relocs::plan_load(&canon, new_bytes, &libs)?;
    let running_gadget = map::running_gadget(pid, running)?;
    let names: Vec<String> = plan.copies.iter().map(|(n, _)| n.clone()).collect();
    let copy_slots = copies::bound_slots(&libs, &names);
    let fini = commit::FiniSources::read(pid, &canon, new_bytes)?;
    Ok(PreparedLoad {
        canon,
        libs,
        plan,
        running_gadget,
        files: file_mappings(maps),
        copy_slots,
        fini,
    })
}

/// Load NEW (`new_path`, whose bytes are `new_bytes` and tables
/// `new_tables`) into the process traced by `tracee`, working in stopped
/// thread `tid`, beside `running` (see the module doc). Imports are
/// resolved against the libraries the process has loaded now.
pub fn load_image<'t>(
    tracee: &'t mut Tracee,
    tid: Pid,
    new_path: &Path,
    new_bytes: &[u8],
    new_tables: FrameTables,
    running: &Image,
    opts: &LoadOptions,
) -> Result<LoadedImage<'t>, LoadError> {
    let maps = procfs::read_maps(tracee.pid())?;
    let prep = prepare_load(tracee.pid(), &maps, new_path, new_bytes, running)?;
    load_prepared(tracee, tid, prep, new_bytes, new_tables, running, opts)
}

/// [`load_image`] with the load worked out beforehand by [`prepare_load`]
/// (before the process was paused). The process's maps are read once here
/// (and once more after NEW is mapped, to check it, kept for the rest of
/// the update: [`LoadedImage::maps`]).
pub fn load_prepared<'t>(
    tracee: &'t mut Tracee,
    tid: Pid,
    prep: PreparedLoad,
    new_bytes: &[u8],
    new_tables: FrameTables,
    running: &Image,
    opts: &LoadOptions,
) -> Result<LoadedImage<'t>, LoadError> {
    let pid = tracee.pid();
    let maps = match &opts.maps {
        Some((maps, epoch)) if *epoch == tracee.maps_epoch() => maps.clone(),
        _ => procfs::read_maps(pid)?,
    };
    // A library loaded or unloaded since the plan was made: make it again.
    let prep = if file_mappings(&maps) == prep.files {
        prep
    } else {
        prepare_load(pid, &maps, &prep.canon, new_bytes, running)?
    };
    let PreparedLoad {
        canon,
        libs,
        mut plan,
        running_gadget,
        copy_slots,
        fini,
        ..
    } = prep;
    let mut rc = RemoteCalls::with_maps(tracee, tid, running_gadget, &maps)?;
    rc.set_timeout(opts.call_timeout);
    // A COPY-relocated object is filled from the copy the C library uses
    // (where its slot points: the previous version's copy after an
    // update), not always from the first executable's.
    let mut copy_objects = Vec::new();
    for (off, value) in plan.relocs.iter_mut() {
        let relocs::RelocValue::Copy { src, size, symbol } = value else {
            continue;
        };
        let slots: Vec<RuntimeAddr> = copy_slots
            .iter()
            .filter(|s| &s.symbol == symbol)
            .map(|s| s.addr)
            .collect();
        if let Some(live) = slots
            .first()
            .and_then(|&a| rc.memory().read_u64(a).ok())
            .filter(|&v| v != 0)
        {
            *src = RuntimeAddr(live);
        }
        copy_objects.push((slots, *src, *size, *off));
    }
    let (span, bias, mut report, maps) = map::map_image(&mut rc, pid, &canon, new_bytes, &plan)?;
    let maps_epoch = rc.maps_epoch();
    let image = Image {
        path: canon,
        bias,
        text: map::text_range(&plan, &new_tables, bias),
        tables: new_tables,
        span,
    };
    // The commit moves the handlers in the old image: their actions are
    // read now, in this session, rather than in one of their own.
    let caught = commit::caught(pid, tid);
    let signals = (caught != 0).then(|| {
        commit::plan_signal_handlers(
            &mut rc,
            running,
            &commit::function_mapper(running, &image),
            caught,
        )
    });
    let signals = Some(signals.unwrap_or(Ok((Vec::new(), false))));
    // A handler runs on an alternate stack: where each thread's is (this
    // thread's was read as its session began).
    let on_alt_stack = matches!(&signals, Some(Ok((_, true))));
    let own_alt_stack = on_alt_stack.then(|| rc.alt_stack().ok()).flatten();
    let span = image.span.clone();
    if let Err(e) = rc.finish() {
        // Restoring the thread failed (is it gone?): try to unmap NEW in a
        // new session so as not to leave it behind.
        if let Ok(mut again) = RemoteCalls::new(tracee, tid, running_gadget) {
            let _ = again.munmap(span.start, span.end.0 - span.start.0);
            let _ = again.finish();
        }
        return Err(e.into());
    }
    let new_gadget = LinkAddr(plan.entry).to_runtime(bias);
    report.copies = plan.copies;
    let copy_redirects = copy_objects
        .into_iter()
        .flat_map(|(slots, live, size, off)| {
            let new = LinkAddr(off).to_runtime(bias);
            slots.into_iter().map(move |slot| commit::CopyRedirect {
                slot,
                live,
                size,
                new,
            })
        })
        .collect();
    report.libraries = libs
        .search_order()
        .filter_map(|l| l.path().map(Path::to_path_buf))
        .collect();
    Ok(LoadedImage {
        tracee,
        tid,
        image: Some(image),
        running_gadget,
        new_gadget,
        timeout: opts.call_timeout,
        report,
        maps,
        heap_allocated: Vec::new(),
        heap_to_free: Vec::new(),
        copy_redirects,
        fini,
        unmapped_at_commit: None,
        signals,
        libraries: libs,
        maps_epoch,
        own_alt_stack,
    })
}

/// Beyond this many threads, their alternate signal stacks are not read
/// (a remote session each): the old image's writable data is kept instead.
const MAX_ALT_STACK_THREADS: usize = 16;

/// The alternate signal stacks of every traced thread of the process:
/// `own`, that of thread `tid`, and one remote session in each other
/// thread (borrowing `gadget`, checked against `maps`). `None` when one
/// cannot be read, or there are more than [`MAX_ALT_STACK_THREADS`]
/// threads.
pub fn alt_stacks(
    tracee: &mut Tracee,
    tid: Pid,
    own: Option<std::ops::Range<u64>>,
    gadget: RuntimeAddr,
    maps: &[MemoryMap],
) -> Option<Vec<std::ops::Range<u64>>> {
    let threads = tracee.traced();
    if threads.len() > MAX_ALT_STACK_THREADS {
        return None;
    }
    let mut out: Vec<std::ops::Range<u64>> = own.into_iter().collect();
    for t in threads.into_iter().filter(|&t| t != tid) {
        let rc = RemoteCalls::with_maps(tracee, t, gadget, maps).ok()?;
        let stack = rc.alt_stack();
        rc.finish().ok()?;
        out.extend(stack.ok()?);
    }
    Some(out)
}

/// Unmaps `ranges` (the retired image's mappings) through `rc`, ranges
/// that touch in one munmap (their union holds nothing else), stopping at
/// the first failure. Returns how many were not unmapped.
fn unmap_ranges(rc: &mut RemoteCalls<'_>, ranges: &[std::ops::Range<RuntimeAddr>]) -> usize {
    let mut runs: Vec<(std::ops::Range<RuntimeAddr>, usize)> = Vec::new();
    for r in ranges {
        match runs.last_mut() {
            Some((run, n)) if run.end == r.start => {
                run.end = r.end;
                *n += 1;
            }
            _ => runs.push((r.clone(), 1)),
        }
    }
    let done: usize = runs
        .iter()
        .take_while(|(r, _)| rc.munmap(r.start, r.end.0 - r.start.0).is_ok())
        .map(|(_, n)| n)
        .sum();
    ranges.len() - done
}

fn canonical(path: &Path) -> Result<PathBuf, LoadError> {
    std::fs::canonicalize(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Everything [`load_image`] checks before it changes the process — NEW's
/// kind, its libraries, every import it needs — without changing anything
/// (for `--dry-run`).
pub fn check_loadable(pid: Pid, new_path: &Path, new_bytes: &[u8]) -> Result<(), LoadError> {
    let canon = canonical(new_path)?;
    let libs = Libraries::read(pid)?;
    relocs::plan_load(&canon, new_bytes, &libs).map(|_| ())
}

/// The symbol version of glibc's allocator functions on x86-64.
const ALLOCATOR_VERSION: &str = "GLIBC_2.2.5";

impl<'t> LoadedImage<'t> {
    /// NEW as an [`Image`].
    pub fn image(&self) -> &Image {
        // Only `commit` and `unload` (which consume the guard) take it.
        self.image
            .as_ref()
            .expect("image present until commit or unload")
    }

    /// The tracee, while the guard holds it.
    pub fn tracee(&mut self) -> &mut Tracee {
        self.tracee
    }

    /// NEW's image and the tracee at once.
    pub fn parts(&mut self) -> (&Image, &mut Tracee) {
        (
            self.image
                .as_ref()
                .expect("image present until commit or unload"),
            self.tracee,
        )
    }

    /// The process's `/proc/PID/maps` read once NEW was mapped.
    pub fn maps(&self) -> &[MemoryMap] {
        &self.maps
    }

    /// What loading did.
    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    /// When a handler runs on an alternate stack: the load thread's
    /// alternate stack as its session read it (`Some(None)`: it has none;
    /// `None`: not read), for [`alt_stacks`].
    pub fn own_alt_stack(&self) -> Option<Option<std::ops::Range<u64>>> {
        self.own_alt_stack.clone()
    }

    /// The running image's gadget remote sessions borrow.
    pub fn running_gadget(&self) -> RuntimeAddr {
        self.running_gadget
    }

    /// The epoch [`LoadedImage::maps`] were read at: they are still the
    /// process's maps while [`Tracee::maps_epoch`] is this.
    pub fn maps_epoch(&self) -> u64 {
        self.maps_epoch
    }

    /// The libraries NEW's imports were resolved in, to be dropped once
    /// the process runs again (freeing them is not pause work).
    pub fn take_libraries(&mut self) -> Libraries {
        std::mem::take(&mut self.libraries)
    }

    /// The thread remote work is done in.
    pub fn tid(&self) -> Pid {
        self.tid
    }

    /// Work out every commit step against the running image `running`
    /// without changing anything (reads signal actions in the process).
    pub fn plan_commit(&mut self, running: &Image) -> Result<CommitPlan, LoadError> {
        let new = self
            .image
            .as_ref()
            .expect("image present until commit or unload");
        commit::plan_commit(
            self.tracee,
            self.tid,
            self.new_gadget,
            self.timeout,
            running,
            new,
            &self.copy_redirects,
            &self.maps,
            &self.fini,
            self.signals.take(),
        )
    }

    /// Apply `plan`: redirect the destructors, move the signal handlers,
    /// make the old image's code non-executable. On failure the steps done
    /// are undone and the guard (dropped) unloads NEW. Returns NEW's image.
    pub fn commit(self, plan: &CommitPlan) -> Result<Image, LoadError> {
        self.commit_freeing(plan).map(|(image, _, _)| image)
    }

    /// [`LoadedImage::commit`]; once committed, the old heap objects
    /// registered with [`LoadedImage::free_after_commit`] are freed. Also
    /// returns how many could not be (left allocated: a leak, never a
    /// wrong value).
    pub fn commit_freeing(mut self, plan: &CommitPlan) -> Result<(Image, usize, usize), LoadError> {
        self.commit_steps(plan)?;
        Ok(self.finish_committed(plan))
    }

    /// The reversible part of [`LoadedImage::commit`]: `plan`'s steps
    /// applied (undone again on failure); the guard still unloads NEW
    /// unless [`LoadedImage::finish_committed`] follows, so that an update
    /// of several processes can take them back with
    /// [`LoadedImage::revert_steps`].
    pub fn commit_steps(&mut self, plan: &CommitPlan) -> Result<(), LoadError> {
        let mut rc = RemoteCalls::with_maps(self.tracee, self.tid, self.new_gadget, &self.maps)?;
        rc.set_timeout(self.timeout);
        let applied = commit::apply_commit(&mut rc, plan);
        let finished = rc.finish();
        applied?;
        finished?;
        Ok(())
    }

    /// [`LoadedImage::commit_steps`] of an update that commits alone (no
    /// other process's commit may still take it back): once the steps are
    /// applied, the retired image's code is unmapped in the same remote
    /// session (one session less in the pause), unless old heap objects
    /// are to be freed first ([`LoadedImage::finish_committed`] then does
    /// both, in that order).
    pub fn commit_steps_alone(&mut self, plan: &CommitPlan) -> Result<(), LoadError> {
        if !self.heap_to_free.is_empty() || plan.unmap.is_empty() {
            return self.commit_steps(plan);
        }
        let mut rc = RemoteCalls::with_maps(self.tracee, self.tid, self.new_gadget, &self.maps)?;
        rc.set_timeout(self.timeout);
        // Code about to be unmapped in this session need not be made
        // non-executable first (one remote call per range fewer), unless
        // the unmap fails: then it is, before the session ends.
        let covered = |r: &std::ops::Range<RuntimeAddr>| {
            plan.unmap
                .iter()
                .any(|u| u.start <= r.start && r.end <= u.end)
        };
        let (skipped, kept): (Vec<_>, Vec<_>) = plan.retire.iter().cloned().partition(covered);
        let trimmed = CommitPlan {
            retire: kept,
            ..plan.clone()
        };
        let applied = commit::apply_commit(&mut rc, &trimmed);
        let left = applied.is_ok().then(|| unmap_ranges(&mut rc, &plan.unmap));
        let mut protect_failed = None;
        if left.is_some_and(|n| n > 0) {
            let maps = procfs::read_maps(rc.pid()).unwrap_or_default();
            for r in &skipped {
                let still = maps
                    .iter()
                    .any(|m| m.start < r.end && r.start < m.end && m.perms.exec);
                if still {
                    if let Err(e) = rc.mprotect(r.start, r.end.0 - r.start.0, nix::libc::PROT_READ)
                    {
                        protect_failed.get_or_insert(e);
                    }
                }
            }
        }
        let finished = rc.finish();
        applied?;
        self.unmapped_at_commit = left;
        if let Some(e) = protect_failed {
            return Err(e.into());
        }
        finished?;
        Ok(())
    }

    /// Undo the steps [`LoadedImage::commit_steps`] applied (best effort).
    pub fn revert_steps(&mut self, plan: &CommitPlan) -> Result<(), LoadError> {
        // NEW's code is executable throughout (the old image's is not yet).
        let mut rc = RemoteCalls::with_maps(self.tracee, self.tid, self.new_gadget, &self.maps)?;
        rc.set_timeout(self.timeout);
        commit::undo_commit(&mut rc, plan, &plan.retire);
        rc.finish()?;
        Ok(())
    }

    /// After [`LoadedImage::commit_steps`]: NEW and the heap objects
    /// allocated for it belong to the program; the old objects registered
    /// with [`LoadedImage::free_after_commit`] are freed. NEW's image and
    /// how many could not be freed.
    pub fn finish_committed(mut self, plan: &CommitPlan) -> (Image, usize, usize) {
        // Committed: the new objects now belong to the program.
        self.heap_allocated.clear();
        let old = std::mem::take(&mut self.heap_to_free);
        let unfreed = self.free_objects(&old, self.new_gadget);
        let not_unmapped = match self.unmapped_at_commit.take() {
            Some(left) => left,
            None => self.unmap_retired(&plan.unmap),
        };
        let image = self
            .image
            .take()
            .expect("image present until commit or unload");
        (image, unfreed, not_unmapped)
    }

    /// The address of the process's own allocator function `symbol`
    /// (`malloc`, `free`, `malloc_usable_size`), as its libraries export it.
    fn allocator_fn(&self, symbol: &str) -> Result<RuntimeAddr, LoadError> {
        let pid = self.tracee.pid();
        let libs = Libraries::read(pid)?;
        // Programs bind the allocator at its x86-64 base version; a
        // preloaded allocator (glibc's checking one) defines only that, as a
        // non-default version, and an unversioned lookup would skip it for
        // libc's own — whose blocks the program's `free` would then reject.
        libs.lookup_symbol(symbol, Some(ALLOCATOR_VERSION))
            .or_else(|| libs.lookup_symbol(symbol, None))
            .filter(|r| !r.ifunc && !r.tls)
            .map(|r| r.addr)
            .ok_or_else(|| LoadError::NoAllocator {
                pid: pid.as_raw(),
                symbol: symbol.to_string(),
            })
    }

    /// `malloc_usable_size` of each of `chunks` in the process, one remote
    /// session, one call per chunk of [`remote::MAX_BATCH`]. Call it only on addresses already checked to be chunk
    /// starts: the allocator trusts its argument.
    pub fn usable_sizes(&mut self, chunks: &[RuntimeAddr]) -> Result<Vec<u64>, LoadError> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let f = self.allocator_fn("malloc_usable_size")?;
        let mut rc = RemoteCalls::new(self.tracee, self.tid, self.running_gadget)?;
        rc.set_timeout(self.timeout);
        let args: Vec<u64> = chunks.iter().map(|c| c.0).collect();
        let mut sizes = Vec::with_capacity(args.len());
        let made = rc.call_each(f, &args, false, &mut sizes);
        let finished = rc.finish();
        made?;
        finished?;
        if sizes.len() != chunks.len() {
            return Err(LoadError::BatchShort {
                pid: self.tracee.pid().as_raw(),
                call: "malloc_usable_size",
                made: sizes.len(),
                asked: chunks.len(),
            });
        }
        Ok(sizes)
    }

    /// Allocates one object of each of `sizes` bytes with the process's own
    /// `malloc` (so the program can `free` it later), in one remote session
    /// (one call per chunk of [`remote::MAX_BATCH`]; the first NULL ends it).
    /// Every allocation is freed again unless [`LoadedImage::commit`]
    /// succeeds — on a failure here too.
    pub fn heap_allocate(&mut self, sizes: &[u64]) -> Result<Vec<RuntimeAddr>, LoadError> {
        if sizes.is_empty() {
            return Ok(Vec::new());
        }
        let f = self.allocator_fn("malloc")?;
        // Resolved before anything is allocated: a rollback needs it.
        self.allocator_fn("free")?;
        let pid = self.tracee.pid().as_raw();
        let mut rc = RemoteCalls::new(self.tracee, self.tid, self.running_gadget)?;
        rc.set_timeout(self.timeout);
        let mut blocks = Vec::with_capacity(sizes.len());
        let made = rc.call_each(f, sizes, true, &mut blocks);
        let finished = rc.finish();
        let out: Vec<RuntimeAddr> = blocks
            .iter()
            .take_while(|&&a| a != 0)
            .map(|&a| RuntimeAddr(a))
            .collect();
        // The first size without a block: malloc returned NULL for it, or
        // the loop stopped short (which is no better).
        let err = match made {
            Err(e) => Some(e.into()),
            Ok(()) => sizes.get(out.len()).map(|&size| {
                if out.len() < blocks.len() {
                    LoadError::OutOfMemory { pid, size }
                } else {
                    LoadError::BatchShort {
                        pid,
                        call: "malloc",
                        made: blocks.len(),
                        asked: sizes.len(),
                    }
                }
            }),
        };
        // Recorded even on failure, so the guard frees them.
        self.heap_allocated.extend(out.iter().copied());
        if let Some(e) = err {
            return Err(e);
        }
        finished?;
        Ok(out)
    }

    /// Old heap objects to `free` in the process once the commit succeeded.
    pub fn free_after_commit(&mut self, objects: Vec<RuntimeAddr>) {
        self.heap_to_free = objects;
    }

    /// Frees `objects` with the process's `free`, in one remote session;
    /// the number that could not be freed (best effort: the first failure
    /// ends the session). `gadget` is code that is executable now (the
    /// running image's before the commit, NEW's after it).
    fn free_objects(&mut self, objects: &[RuntimeAddr], gadget: RuntimeAddr) -> usize {
        if objects.is_empty() {
            return 0;
        }
        let Ok(f) = self.allocator_fn("free") else {
            return objects.len();
        };
        let Ok(mut rc) = RemoteCalls::new(self.tracee, self.tid, gadget) else {
            return objects.len();
        };
        rc.set_timeout(self.timeout);
        let args: Vec<u64> = objects.iter().map(|o| o.0).collect();
        let mut done = Vec::with_capacity(args.len());
        // Best effort: what was freed before a failure counts.
        let _ = rc.call_each(f, &args, false, &mut done);
        let _ = rc.finish();
        objects.len().saturating_sub(done.len())
    }

    /// Unmaps the retired image's `ranges` after the commit, in one remote
    /// session (best effort: the update is committed; what fails stays
    /// mapped, as before). Returns how many were not unmapped.
    fn unmap_retired(&mut self, ranges: &[std::ops::Range<RuntimeAddr>]) -> usize {
        if ranges.is_empty() {
            return 0;
        }
        let Ok(mut rc) = RemoteCalls::new(self.tracee, self.tid, self.new_gadget) else {
            return ranges.len();
        };
        rc.set_timeout(self.timeout);
        let left = unmap_ranges(&mut rc, ranges);
        let _ = rc.finish();
        left
    }

    /// Unmap NEW (the update is abandoned).
    pub fn unload(mut self) -> Result<(), LoadError> {
        self.unload_inner()
    }

    fn unload_inner(&mut self) -> Result<(), LoadError> {
        let Some(image) = self.image.take() else {
            return Ok(());
        };
        // The objects allocated for the update go first, while the
        // allocator still sees the process as it was.
        let allocated = std::mem::take(&mut self.heap_allocated);
        self.free_objects(&allocated, self.running_gadget);
        let mut rc = RemoteCalls::new(self.tracee, self.tid, self.running_gadget)?;
        rc.set_timeout(self.timeout);
        let len = image.span.end.0 - image.span.start.0;
        let r = rc.munmap(image.span.start, len);
        let f = rc.finish();
        r?;
        f?;
        Ok(())
    }
}

impl std::ops::Deref for LoadedImage<'_> {
    type Target = Tracee;
    fn deref(&self) -> &Tracee {
        self.tracee
    }
}

impl std::ops::DerefMut for LoadedImage<'_> {
    fn deref_mut(&mut self) -> &mut Tracee {
        self.tracee
    }
}

impl Drop for LoadedImage<'_> {
    fn drop(&mut self) {
        let _ = self.unload_inner();
    }
}

/// Load, plan and commit in one go for callers that have validated
/// everything else: returns NEW's image and adds the plan's warnings.
pub fn finish_commit(
    mut loaded: LoadedImage<'_>,
    running: &Image,
    warnings: &mut Vec<String>,
) -> Result<Image, LoadError> {
    let plan = loaded.plan_commit(running)?;
    warnings.extend(plan.warnings.iter().cloned());
    loaded.commit(&plan)
}
