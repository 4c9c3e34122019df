//! The commit steps that hand the process over to NEW, each planned
//! read-only first ([`CommitPlan`]) and undone if a later one fails:
//! the main program's `DT_FINI*` redirected to NEW's destructors
//! ([`FiniRedirect`]), signal handlers in the old image's code re-registered
//! at the same functions of NEW ([`HandlerMove`]), and the old image's code
//! made non-executable so a stale code pointer traps. A new commit step gets
//! its plan in [`plan_commit`] and its apply and undo in [`apply_commit`].

use super::elf::{ElfError, ElfSummary};
use super::libraries::strip_deleted;
use super::LoadError;
use crate::engine::state::Image;
use crate::memory::{MemError, TargetMemory};
use crate::target::procfs::{self, MemoryMap};
use crate::target::ptrace::Tracee;
use crate::target::remote::{KernelSigaction, RemoteCalls, RemoteError};
use nix::libc;
use nix::unistd::Pid;
use object::elf;
use std::ops::Range;
use std::path::{Path, PathBuf};
use upstare_dwarf::{LinkAddr, LoadBias, RuntimeAddr};

/// Bound on `.dynamic` entries read from the target.
const MAX_DYNAMIC: u64 = 4096;

/// What [`super::LoadedImage::commit`] will do, computed (read-only) beforehand so
/// that an impossible step is found before anything is written.
#[derive(Clone, Debug)]
pub struct CommitPlan {
    /// Signal handlers to re-register.
    pub handlers: Vec<HandlerMove>,
    /// `.dynamic` entries of the old image to rewrite.
    pub fini: FiniRedirect,
    /// The values of the main program's exported symbols (`.dynsym`),
    /// pointed at NEW's: a library loaded later (PostgreSQL's backends
    /// `dlopen` PL/pgSQL) binds the program's functions and variables by
    /// looking them up in the first version's symbol table.
    pub symbols: FiniRedirect,
    /// Exit and fork handlers (and other function pointers) the C library
    /// holds into the old image, pointed at NEW (see `exit_handlers`).
    pub exit_handlers: FiniRedirect,
    /// The C library's slots of COPY-relocated objects (`environ`),
    /// pointed at NEW's copies (see `copies`).
    pub copy_redirect: FiniRedirect,
    /// Executable mappings of the old image to make read-only.
    pub retire: Vec<Range<RuntimeAddr>>,
    /// Things the caller may want to report.
    pub warnings: Vec<String>,
    /// The old image's file.
    pub old_path: PathBuf,
    /// Mappings of the old image unmapped once the commit is done (set by
    /// the update from its sweep: [`super::retire::plan_unmap`]).
    pub unmap: Vec<Range<RuntimeAddr>>,
    /// Epoll registrations whose user data points into the old image (set
    /// by the update from its sweep), registered again with NEW's value.
    pub epoll: Vec<EpollRewrite>,
    /// A signal handler runs on an alternate stack (`SA_ONSTACK`): the
    /// kernel keeps each thread's alternate stack, which `/proc` does not
    /// show and which may lie in the old image's data, so that data is
    /// not unmapped.
    pub on_alt_stack: bool,
}

/// A file registered with an epoll instance whose user data, which the
/// kernel keeps and hands back with every event, points into the old image
/// (a callback, a global connection struct): modified in place
/// (`EPOLL_CTL_MOD`, same events) to carry NEW's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpollRewrite {
    pub epfd: i32,
    pub tfd: i32,
    pub events: u32,
    pub old: u64,
    pub new: u64,
}

/// `epoll_ctl(epfd, EPOLL_CTL_MOD, tfd, {events, data})` in the target.
fn epoll_modify(rc: &mut RemoteCalls<'_>, e: &EpollRewrite, data: u64) -> Result<(), LoadError> {
    // `struct epoll_event` is packed on x86-64: events, then data.
    let mut event = [0u8; 12];
    event[..4].copy_from_slice(&e.events.to_le_bytes());
    event[4..].copy_from_slice(&data.to_le_bytes());
    let at = rc.scratch_alloc(event.len() as u64)?;
    rc.memory().write(at, &event)?;
    let r = rc.syscall_checked(
        &format!("epoll_ctl({}, EPOLL_CTL_MOD, {})", e.epfd, e.tfd),
        libc::SYS_epoll_ctl,
        &[
            e.epfd as u64,
            libc::EPOLL_CTL_MOD as u64,
            e.tfd as u64,
            at.0,
        ],
    );
    rc.scratch_reset();
    r.map(drop).map_err(Into::into)
}

/// Give every registration of `rewrites` NEW's value; on a failure put the
/// ones done back and return the error.
fn apply_epoll(rc: &mut RemoteCalls<'_>, rewrites: &[EpollRewrite]) -> Result<(), LoadError> {
    for (i, e) in rewrites.iter().enumerate() {
        if let Err(err) = epoll_modify(rc, e, e.new) {
            revert_epoll(rc, &rewrites[..i]);
            return Err(err);
        }
    }
    Ok(())
}

/// Put the old values back (best effort, each tried).
fn revert_epoll(rc: &mut RemoteCalls<'_>, rewrites: &[EpollRewrite]) {
    for e in rewrites.iter().rev() {
        let _ = epoll_modify(rc, e, e.old);
    }
}

/// A library's GOT slot bound to a COPY-relocated object (see
/// [`super::copies`]): pointed at NEW's copy at the commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyRedirect {
    pub slot: RuntimeAddr,
    /// The live copy NEW's was filled from, and its size.
    pub live: RuntimeAddr,
    pub size: u64,
    /// NEW's copy.
    pub new: RuntimeAddr,
}

/// Work out every commit step for replacing `running` by `new` without
/// changing anything, in stopped thread `tid` of `tracee`. The signal
/// actions are read in the process (a remote session borrowing `gadget`)
/// only when it catches some signal; everything else is read from its
/// memory. `copies` are the libraries' slots bound to NEW's COPY-relocated
/// objects; `fini` what the destructors' redirection needs from the files
/// (worked out before the pause).
/// The signals of `tid` (of `pid`) with a handler, from `/proc`: every
/// signal when the mask cannot be read.
pub(super) fn caught(pid: Pid, tid: Pid) -> u64 {
    let uncatchable = (1u64 << (libc::SIGKILL - 1)) | (1u64 << (libc::SIGSTOP - 1));
    crate::target::remote::caught_signals(pid, tid).unwrap_or(u64::MAX) & !uncatchable
}

/// The signal handlers to move and whether one runs on an alternate stack
/// (see [`plan_signal_handlers`]), read in the load's remote session.
pub(super) type SignalPlan = Result<(Vec<HandlerMove>, bool), LoadError>;

#[allow(clippy::too_many_arguments)]
pub(super) fn plan_commit(
    tracee: &mut Tracee,
    tid: Pid,
    gadget: RuntimeAddr,
    timeout: std::time::Duration,
    running: &Image,
    new: &Image,
    copies: &[CopyRedirect],
    maps: &[MemoryMap],
    fini: &FiniSources,
    signals: Option<SignalPlan>,
) -> Result<CommitPlan, LoadError> {
    let pid = tracee.pid();
    let mapper = function_mapper(running, new);
    // Read with the load (one remote session fewer), else now, in a
    // session of its own, only when some signal is caught.
    let (handlers, on_alt_stack) = match signals {
        Some(read) => read?,
        None => {
            let caught = caught(pid, tid);
            if caught == 0 {
                (Vec::new(), false)
            } else {
                let mut rc = RemoteCalls::with_maps(tracee, tid, gadget, maps)?;
                rc.set_timeout(timeout);
                let handlers = plan_signal_handlers(&mut rc, running, &mapper, caught);
                rc.finish()?;
                handlers?
            }
        }
    };
    let mem = tracee.memory();
    let fini_sources = fini;
    let fini = plan_fini_redirect(&mem, fini_sources, new)?;
    let (symbols, unmatched) = plan_symbol_redirect(&mem, fini_sources, new)?;
    let fs_base = tracee.regs(tid).map_err(RemoteError::from)?.0.fs_base;
    let exit_handlers = FiniRedirect {
        writes: super::exit_handlers::plan_exit_handlers(&mem, maps, fs_base, &mapper)?,
    };
    let retire = plan_retire(maps, running);
    let mut warnings = Vec::new();
    if unmatched > 0 {
        warnings.push(format!(
            "{unmatched} exported symbols of the main program have no counterpart in {}: a \
             library loaded later binds them to the old version",
            new.path.display()
        ));
    }
    // Slots still pointing into the copy NEW's was filled from go to NEW's
    // (at the same offset: an interior pointer stays interior).
    let mut writes = Vec::new();
    for c in copies {
        let Ok(v) = mem.read_u64(c.slot) else {
            continue;
        };
        let Some(off) = v.checked_sub(c.live.0).filter(|&o| o < c.size.max(1)) else {
            continue;
        };
        writes.push(DynamicWrite {
            addr: c.slot,
            tag: "GOT",
            old: v,
            new: c.new.0.wrapping_add(off),
        });
    }
    let copy_redirect = FiniRedirect { writes };
    Ok(CommitPlan {
        handlers,
        fini,
        symbols,
        exit_handlers,
        copy_redirect,
        retire,
        warnings,
        old_path: running.path.clone(),
        unmap: Vec::new(),
        epoll: Vec::new(),
        on_alt_stack,
    })
}

/// Apply `plan` through `rc`: redirect the destructors, move the signal
/// handlers, make the old image's code non-executable; on failure undo
/// the steps done, in reverse order.
pub(super) fn apply_commit(rc: &mut RemoteCalls<'_>, plan: &CommitPlan) -> Result<(), LoadError> {
    let gadget = rc.gadget_range();
    if plan
        .retire
        .iter()
        .any(|r| r.start < gadget.end && gadget.start < r.end)
    {
        return Err(LoadError::GadgetInRetired {
            gadget: gadget.start,
            path: plan.old_path.clone(),
        });
    }
    plan.fini.apply(rc.memory())?;
    if let Err(e) = plan.symbols.apply(rc.memory()) {
        let _ = plan.symbols.revert(rc.memory());
        let _ = plan.fini.revert(rc.memory());
        return Err(e.into());
    }
    if let Err(e) = plan.exit_handlers.apply(rc.memory()) {
        let _ = plan.exit_handlers.revert(rc.memory());
        let _ = plan.symbols.revert(rc.memory());
        let _ = plan.fini.revert(rc.memory());
        return Err(e.into());
    }
    if let Err(e) = plan.copy_redirect.apply(rc.memory()) {
        let _ = plan.copy_redirect.revert(rc.memory());
        let _ = plan.exit_handlers.revert(rc.memory());
        let _ = plan.symbols.revert(rc.memory());
        let _ = plan.fini.revert(rc.memory());
        return Err(e.into());
    }
    if let Err(e) = apply_signal_handlers(rc, &plan.handlers) {
        revert_before_epoll(rc, plan);
        return Err(e);
    }
    if let Err(e) = apply_epoll(rc, &plan.epoll) {
        revert_before_epoll(rc, plan);
        return Err(e);
    }
    for (i, r) in plan.retire.iter().enumerate() {
        if let Err(e) = rc.mprotect(r.start, r.end.0 - r.start.0, libc::PROT_READ) {
            undo_commit(rc, plan, &plan.retire[..i]);
            return Err(e.into());
        }
    }
    Ok(())
}

/// Undo [`apply_commit`] with `retired` made non-executable so far: code
/// executable again, handlers and destructors back to the old image (best
/// effort: each step is tried).
pub(super) fn undo_commit(
    rc: &mut RemoteCalls<'_>,
    plan: &CommitPlan,
    retired: &[Range<RuntimeAddr>],
) {
    for r in retired {
        let _ = rc.mprotect(
            r.start,
            r.end.0 - r.start.0,
            libc::PROT_READ | libc::PROT_EXEC,
        );
    }
    revert_epoll(rc, &plan.epoll);
    revert_before_epoll(rc, plan);
}

/// Undo the steps of [`apply_commit`] before the epoll registrations
/// (best effort: each step is tried).
fn revert_before_epoll(rc: &mut RemoteCalls<'_>, plan: &CommitPlan) {
    let _ = revert_signal_handlers(rc, &plan.handlers);
    let _ = plan.copy_redirect.revert(rc.memory());
    let _ = plan.exit_handlers.revert(rc.memory());
    let _ = plan.symbols.revert(rc.memory());
    let _ = plan.fini.revert(rc.memory());
}

/// Maps a code address of `running` to the same function of `new` by name:
/// only function entries map (a handler is a function).
pub(super) fn function_mapper<'a>(
    running: &'a Image,
    new: &'a Image,
) -> impl Fn(RuntimeAddr) -> Option<RuntimeAddr> + 'a {
    move |a: RuntimeAddr| {
        let link = running.link(a)?;
        let f = running.tables.function_at(link)?;
        if f.low != link {
            return None;
        }
        let nf = new.tables.counterpart(&f.name, f, &running.tables)?;
        Some(new.runtime(nf.low))
    }
}

/// One signal handler to re-register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerMove {
    pub sig: i32,
    /// The action in place (handler in the old image).
    pub old: KernelSigaction,
    /// The same action with the handler in NEW.
    pub new: KernelSigaction,
}

/// Read every signal's action; for each whose handler is code of `running`,
/// the action to install instead (same flags, mask and restorer, handler
/// mapped by `map`). A handler that does not map is an error.
pub(super) fn plan_signal_handlers(
    rc: &mut RemoteCalls<'_>,
    running: &Image,
    map: &dyn Fn(RuntimeAddr) -> Option<RuntimeAddr>,
    caught: u64,
) -> Result<(Vec<HandlerMove>, bool), LoadError> {
    let mut out = Vec::new();
    let mut on_alt_stack = false;
    // One remote rt_sigaction per signal with a handler (`caught`), rather
    // than per signal: each is a round trip into the paused process.
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP || caught & (1u64 << (sig - 1)) == 0 {
            continue;
        }
        let old = match rc.rt_sigaction(sig, None) {
            Ok(a) => a,
            Err(RemoteError::Syscall { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        on_alt_stack |= old.flags & SA_ONSTACK != 0;
        let h = RuntimeAddr(old.handler);
        if !running.span.contains(&h) {
            continue;
        }
        let to = map(h).ok_or_else(|| LoadError::Handler {
            sig,
            handler: h,
            old: running.path.clone(),
            function: running
                .link(h)
                .and_then(|l| running.tables.function_at(l))
                .map_or_else(|| "no function".to_string(), |f| f.name.clone()),
        })?;
        out.push(HandlerMove {
            sig,
            old,
            new: KernelSigaction {
                handler: to.0,
                ..old
            },
        });
    }
    Ok((out, on_alt_stack))
}

/// `SA_ONSTACK`: the handler runs on the thread's alternate signal stack.
const SA_ONSTACK: u64 = 0x0800_0000;

/// Install the planned actions.
fn apply_signal_handlers(rc: &mut RemoteCalls<'_>, moves: &[HandlerMove]) -> Result<(), LoadError> {
    for m in moves {
        rc.rt_sigaction(m.sig, Some(&m.new))?;
    }
    Ok(())
}

/// Put the old actions back.
fn revert_signal_handlers(
    rc: &mut RemoteCalls<'_>,
    moves: &[HandlerMove],
) -> Result<(), LoadError> {
    for m in moves {
        rc.rt_sigaction(m.sig, Some(&m.old))?;
    }
    Ok(())
}

/// One `.dynamic` value to rewrite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamicWrite {
    /// Address of the entry's `d_un`.
    pub addr: RuntimeAddr,
    pub tag: &'static str,
    pub old: u64,
    pub new: u64,
}

/// The old image's `DT_FINI*` values pointed at NEW's destructors.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FiniRedirect {
    pub writes: Vec<DynamicWrite>,
}

impl FiniRedirect {
    /// Write the new values.
    pub fn apply(&self, mem: &mut impl TargetMemory) -> Result<(), MemError> {
        write_words(mem, self.writes.iter().map(|w| (w.addr, w.new)))
    }
    /// Write the old values back.
    pub fn revert(&self, mem: &mut impl TargetMemory) -> Result<(), MemError> {
        write_words(mem, self.writes.iter().map(|w| (w.addr, w.old)))
    }
}

/// Most bytes one write of [`write_words`] covers.
const WORDS_SPAN: u64 = 64 << 10;

/// Writes 8-byte `words` (address, value), close ones (a table's entries,
/// within [`WORDS_SPAN`] of the first) as one read of their span, patched,
/// and one write, rather than one write each: the memory they sit in may
/// be read-only (`.dynsym`), which only `/proc/PID/mem` writes, a range at
/// a time. The bytes between them are written back as read: the process
/// is stopped.
fn write_words(
    mem: &mut impl TargetMemory,
    words: impl Iterator<Item = (RuntimeAddr, u64)>,
) -> Result<(), MemError> {
    let mut words: Vec<(RuntimeAddr, u64)> = words.collect();
    words.sort_by_key(|w| w.0);
    let mut i = 0;
    while i < words.len() {
        let start = words[i].0;
        let mut j = i + 1;
        while j < words.len()
            && words[j].0 .0 >= words[j - 1].0 .0.saturating_add(8)
            && words[j].0 .0.saturating_add(8) - start.0 <= WORDS_SPAN
        {
            j += 1;
        }
        if j - i == 1 {
            mem.write_u64(start, words[i].1)?;
        } else {
            let end = words[j - 1].0 .0 + 8;
            let mut bytes = vec![0u8; (end - start.0) as usize];
            mem.read(start, &mut bytes)?;
            for &(a, v) in &words[i..j] {
                let at = (a.0 - start.0) as usize;
                bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            mem.write(start, &bytes)?;
        }
        i = j;
    }
    Ok(())
}

/// The summary of the ELF file at `source`, reading only the parts needed
/// (named `shown` in errors).
fn summary_of(shown: &Path, source: &Path) -> Result<ElfSummary, LoadError> {
    let file = std::fs::File::open(source).map_err(|source| ElfError::Io {
        path: shown.to_path_buf(),
        source,
    })?;
    Ok(ElfSummary::parse(shown, &object::ReadCache::new(file))?)
}

/// What redirecting the destructors needs from the files, read before
/// the pause: the program the process was started from, as the dynamic
/// linker knows it (the first `link_map` entry: its file, bias `l_addr`
/// from `AT_ENTRY`, and summary, read through `/proc/PID/exe` so that a
/// program rebuilt in place since is no problem; after updates this is
/// still the first version), and NEW's summary.
pub struct FiniSources {
    main_path: PathBuf,
    main_bias: LoadBias,
    main: ElfSummary,
    new: ElfSummary,
    /// The main program's exported symbols NEW also exports: where the
    /// `st_value` of each one's `.dynsym` entry is (link-time, in the main
    /// program) and NEW's link-time address of it ([`plan_symbol_redirect`]).
    symbols: Vec<(LinkAddr, LinkAddr)>,
    /// The main program's exported symbols NEW lacks.
    unmatched_symbols: usize,
}

impl FiniSources {
    /// Read them for process `pid` and NEW (`new_path`, whose contents
    /// are `new_bytes`).
    pub fn read(pid: Pid, new_path: &Path, new_bytes: &[u8]) -> Result<FiniSources, LoadError> {
        let exe = strip_deleted(procfs::exe_path(pid)?);
        let main = summary_of(&exe, &PathBuf::from(format!("/proc/{pid}/exe")))?;
        let auxv = procfs::read_auxv(pid)?;
        let main_bias = procfs::load_bias_from_auxv(&auxv, LinkAddr(main.entry))?;
        let new = ElfSummary::parse(new_path, new_bytes)?;
        let main_bytes =
            std::fs::read(format!("/proc/{pid}/exe")).map_err(|source| ElfError::Io {
                path: exe.clone(),
                source,
            })?;
        let (symbols, unmatched_symbols) =
            exported_symbol_pairs(&exe, &main_bytes, new_path, new_bytes)?;
        Ok(FiniSources {
            main_path: exe,
            main_bias,
            main,
            new,
            symbols,
            unmatched_symbols,
        })
    }
}

/// Compute how to make the dynamic linker run NEW's destructors at exit.
/// It runs the *main program's* `DT_FINI_ARRAY` and `DT_FINI` as `l_addr +
/// d_ptr`, reading the entries of that program's `.dynamic` in memory when
/// the process exits (it keeps pointers to the entries, not their values).
/// The main program is the first version even after several updates
/// ([`FiniSources`]), so each of its `d_ptr` becomes NEW's runtime address
/// minus the main program's bias. Its `.dynamic` is read in one piece.
fn plan_fini_redirect(
    mem: &impl TargetMemory,
    sources: &FiniSources,
    new: &Image,
) -> Result<FiniRedirect, LoadError> {
    let (main_path, main_bias, old_sum, new_sum) = (
        &sources.main_path,
        sources.main_bias,
        &sources.main,
        &sources.new,
    );
    let fini_err = |reason: String| LoadError::Fini {
        old: main_path.clone(),
        new: new.path.clone(),
        reason,
    };
    let Some((dyn_vaddr, dyn_size)) = old_sum.dynamic else {
        return Err(fini_err("the main program has no PT_DYNAMIC".into()));
    };
    let base = LinkAddr(dyn_vaddr).to_runtime(main_bias);
    let count = (dyn_size / 16).min(MAX_DYNAMIC);
    let to_old_bias = |link: u64| {
        LinkAddr(link)
            .to_runtime(new.bias)
            .0
            .wrapping_sub(main_bias.0)
    };
    let mut writes = Vec::new();
    let mut seen = (false, false);
    let mut entries = vec![0u8; (count * 16) as usize];
    mem.read(base, &mut entries)?;
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    for (i, e) in (0..count).zip(entries.chunks_exact(16)) {
        let at = RuntimeAddr(base.0.wrapping_add(i * 16));
        let tag = word(&e[..8]);
        let val_at = RuntimeAddr(at.0.wrapping_add(8));
        let old = word(&e[8..]);
        let (name, new_val) = if tag == elf::DT_NULL.0 as u64 {
            break;
        } else if tag == elf::DT_FINI.0 as u64 {
            seen.0 = true;
            let f = new_sum
                .fini
                .ok_or_else(|| fini_err("the new version has no DT_FINI".into()))?;
            ("DT_FINI", to_old_bias(f))
        } else if tag == elf::DT_FINI_ARRAY.0 as u64 {
            seen.1 = true;
            match new_sum.fini_array {
                Some(a) => ("DT_FINI_ARRAY", to_old_bias(a)),
                // Keep the pointer; DT_FINI_ARRAYSZ becomes 0.
                None => continue,
            }
        } else if tag == elf::DT_FINI_ARRAYSZ.0 as u64 {
            (
                "DT_FINI_ARRAYSZ",
                new_sum.fini_array.and(new_sum.fini_array_sz).unwrap_or(0),
            )
        } else {
            continue;
        };
        writes.push(DynamicWrite {
            addr: val_at,
            tag: name,
            old,
            new: new_val,
        });
    }
    if new_sum.fini.is_some() && !seen.0 {
        return Err(fini_err(
            "the new version has DT_FINI, the main program none".into(),
        ));
    }
    if new_sum.fini_array.is_some() && !seen.1 {
        return Err(fini_err(
            "the new version has DT_FINI_ARRAY, the main program none".into(),
        ));
    }
    Ok(FiniRedirect { writes })
}

/// Bound on the main program's exported symbols redirected.
const MAX_DYNSYM: usize = 1 << 20;

/// The main program's exported symbols (`.dynsym` definitions of code
/// and data) that NEW exports too, as (where the entry's `st_value` is in
/// the main program, NEW's address), link-time; and how many NEW lacks.
/// Worked out from the two files before the process is paused.
fn exported_symbol_pairs(
    main_path: &Path,
    main_bytes: &[u8],
    new_path: &Path,
    new_bytes: &[u8],
) -> Result<(Vec<(LinkAddr, LinkAddr)>, usize), LoadError> {
    use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
    let sym_err = |path: &Path, e: object::Error| LoadError::Symbols {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let main = object::File::parse(main_bytes).map_err(|e| sym_err(main_path, e))?;
    let Some(dynsym) = main.section_by_name(".dynsym") else {
        return Ok((Vec::new(), 0));
    };
    let new_file = object::File::parse(new_bytes).map_err(|e| sym_err(new_path, e))?;
    let exported = |s: &object::Symbol<'_, '_>| {
        s.is_definition() && matches!(s.kind(), SymbolKind::Text | SymbolKind::Data)
    };
    let new_syms: std::collections::HashMap<&str, u64> = new_file
        .dynamic_symbols()
        .filter(|s| exported(s))
        .filter_map(|s| Some((s.name().ok()?, s.address())))
        .collect();
    let mut pairs = Vec::new();
    let mut unmatched = 0;
    for s in main
        .dynamic_symbols()
        .filter(|s| exported(s))
        .take(MAX_DYNSYM)
    {
        let Ok(name) = s.name() else { continue };
        let Some(&to) = new_syms.get(name) else {
            unmatched += 1;
            continue;
        };
        // Elf64_Sym: st_value after st_name (4), st_info, st_other (1
        // each) and st_shndx (2).
        let Some(entry) = (s.index().0 as u64)
            .checked_mul(24)
            .and_then(|o| dynsym.address().checked_add(o))
            .and_then(|a| a.checked_add(8))
        else {
            continue;
        };
        pairs.push((LinkAddr(entry), LinkAddr(to)));
    }
    Ok((pairs, unmatched))
}

/// Point the main program's exported symbols at NEW: the dynamic linker
/// resolves a library loaded later (`dlopen`) against the first version's
/// `.dynsym`, whose `st_value`s are relative to its bias; each becomes
/// NEW's runtime address minus that bias. Only the entries that change are
/// written; how many exported symbols NEW lacks is returned with them.
fn plan_symbol_redirect(
    mem: &impl TargetMemory,
    sources: &FiniSources,
    new: &Image,
) -> Result<(FiniRedirect, usize), LoadError> {
    let main_bias = sources.main_bias;
    let mut writes = Vec::new();
    // Every st_value read in one batch (a program exporting its symbols,
    // as redis does, has thousands: one read each took 4.8 ms).
    let mut values = vec![[0u8; 8]; sources.symbols.len()];
    {
        let mut ranges: Vec<(RuntimeAddr, &mut [u8])> = sources
            .symbols
            .iter()
            .zip(values.iter_mut())
            .map(|(&(entry, _), v)| (entry.to_runtime(main_bias), v.as_mut_slice()))
            .collect();
        mem.read_ranges(&mut ranges).map_err(|(_, e)| e)?;
    }
    for (&(entry, to), old) in sources.symbols.iter().zip(values) {
        let addr = entry.to_runtime(main_bias);
        let old = u64::from_le_bytes(old);
        let value = new.runtime(to).0.wrapping_sub(main_bias.0);
        if old != value {
            writes.push(DynamicWrite {
                addr,
                tag: "st_value",
                old,
                new: value,
            });
        }
    }
    Ok((FiniRedirect { writes }, sources.unmatched_symbols))
}

/// The executable mappings of `running` per `maps` (the process's, read
/// after NEW was mapped).
fn plan_retire(maps: &[MemoryMap], running: &Image) -> Vec<Range<RuntimeAddr>> {
    maps.iter()
        .filter(|m| {
            m.perms.exec
                && m.file() == Some(running.path.as_path())
                && m.start < running.span.end
                && running.span.start < m.end
        })
        .map(|m| m.start..m.end)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ByteBuffer;

    #[test]
    fn words_close_together_are_written_in_one_span_keeping_the_bytes_between() {
        // A table of 24-byte entries (st_value at +8) and one word far away.
        let base = 0x10_000u64;
        let far = base + 2 * WORDS_SPAN;
        let mut mem = ByteBuffer::with_region(RuntimeAddr(base), vec![0xaa; 4096]).expect("table");
        mem.add_region(RuntimeAddr(far), vec![0xbb; 16])
            .expect("far");
        let words = (0..100u64)
            .map(|i| (RuntimeAddr(base + 24 * i + 8), i))
            .chain(std::iter::once((RuntimeAddr(far), 7u64)));
        write_words(&mut mem, words).expect("written");
        let mut table = vec![0u8; 2400];
        mem.read(RuntimeAddr(base), &mut table).expect("read");
        for i in 0..100usize {
            let at = 24 * i;
            assert_eq!(&table[at..at + 8], &[0xaa; 8], "entry {i} before its value");
            assert_eq!(
                &table[at + 8..at + 16],
                &(i as u64).to_le_bytes(),
                "entry {i}"
            );
            assert_eq!(
                &table[at + 16..at + 24],
                &[0xaa; 8],
                "entry {i} after its value"
            );
        }
        assert_eq!(mem.read_u64(RuntimeAddr(far)).expect("far"), 7);
        // The region past the table's span is untouched.
        let mut rest = vec![0u8; 4096 - 2400];
        mem.read(RuntimeAddr(base + 2400), &mut rest).expect("rest");
        assert!(rest.iter().all(|&b| b == 0xaa));
    }
}
