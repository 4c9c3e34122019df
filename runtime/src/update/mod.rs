//! One live update, end to end, as a per-process transaction: prepare (find
//! the running image, make the plan, stop the world, check the plan against
//! the paused state, load the new version, compute every byte), then commit
//! with an undo log ([`transaction`]) or roll back. Everything before the
//! commit is reversible: a refusal or failure unloads the new image, removes
//! every armed byte and leaves the process exactly as it was.

mod heap_objects;
pub mod signals;
mod survive;
mod timings;
pub mod transaction;
pub mod tree;

pub(crate) use timings::{us, PhaseClock};
pub use timings::{StopDetail, Timings};

use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use upstare_dwarf::RuntimeAddr;

use crate::engine::heap;
use crate::engine::pointers::Remapper;
use crate::engine::rebuild::{self, RebuildError};
use crate::engine::state::Image;
use crate::engine::state::{Readiness, ThreadState};
use crate::engine::transfer::{self, TransferError};
use crate::engine::transform::{self, TransformPlanError};
use crate::engine::Write;
use crate::load::image::{image_file_bytes, open_image_file, running_image, ImageError};
use crate::load::libraries::Libraries;
use crate::load::transformer::{run_transformers, TransformerError};
use crate::load::LoadedImage;
use crate::load::{self, LoadError, LoadOptions};
use crate::stop::{self, StopError, StopOptions};
use crate::target::procfs::{self, MemoryMap, ProcError};
use crate::target::ptrace::{PtraceError, Sig, Tracee};
use nix::unistd::Pid;
use transaction::{CommitError, PreparedState, UndoLog};
use upstare_dwarf::fdt::FrameTables;
use upstare_patcher::transformer::{BuildError, TransformerObject};
use upstare_patcher::{ImageIdentity, Spec, UpdatePlan};

/// How to run an update.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// Longest time the threads may take to reach update points.
    pub timeout: Duration,
    /// Stop, plan and validate, then resume without changing anything.
    pub dry_run: bool,
    /// Let this many update-point hits pass before stopping (tests use it to
    /// update at the k-th point of a run).
    pub skip_hits: u64,
    /// The plan to execute (from a PATCH file); `None` makes the default
    /// plan from the two versions' tables and `spec`.
    pub plan: Option<UpdatePlan>,
    /// The user's overrides (a SPEC file and its path, for messages),
    /// when the plan is made here.
    pub spec: Option<(PathBuf, Spec)>,
    /// The version the process must run (a PATCH's OLD): anything else is
    /// refused before the process is stopped.
    pub expected_old: Option<ImageIdentity>,
    /// The version NEW must be (a PATCH's NEW).
    pub expected_new: Option<ImageIdentity>,
    /// Refuse, instead of reporting, values left pointing into the old
    /// image that nothing can map (and a sweep that could not scan
    /// everything).
    pub strict: bool,
    /// The compiled C transformers the plan calls (a PATCH's); when the
    /// plan is made here from `spec`, they are built from it.
    pub transformers: Option<TransformerObject>,
    /// The former path while the process is paused, for the benchmark's
    /// baseline in the same run: NEW's libraries read and its relocations
    /// planned after the stop, `/proc/PID/maps` read at each step, memory
    /// written one write at a time, every thread's registers set.
    pub legacy_pause: bool,
    /// Keep the old blocks of moved heap objects allocated (not freed after
    /// the commit), for debugging.
    pub keep_old_heap_objects: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            timeout: Duration::from_millis(500),
            dry_run: false,
            skip_hits: 0,
            plan: None,
            spec: None,
            expected_old: None,
            expected_new: None,
            strict: false,
            transformers: None,
            legacy_pause: false,
            keep_old_heap_objects: false,
        }
    }
}

/// Why an update did not happen. Every variant before `Commit` leaves the
/// process as it was.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("no process with pid {pid}")]
    NoProcess { pid: i32 },
    #[error("process {pid}: {source}")]
    Proc {
        pid: i32,
        #[source]
        source: ProcError,
    },
    #[error("{0}")]
    Ptrace(#[from] PtraceError),
    #[error("{0}")]
    Image(#[from] ImageError),
    #[error("{path}: {why}")]
    New { path: PathBuf, why: String },
    #[error("process {pid} runs {path}, not the version this PATCH was made for ({why}); nothing was changed")]
    NotOld {
        pid: i32,
        path: PathBuf,
        why: String,
    },
    #[error("{path} is not the NEW this PATCH was made for ({why}); nothing was changed")]
    NotNew { path: PathBuf, why: String },
    #[error("{0}")]
    Stop(#[from] StopError),
    #[error("{0}")]
    Transfer(#[from] TransferError),
    #[error("{0}")]
    Heap(#[from] crate::engine::heap::HeapError),
    #[error("{0}")]
    Rebuild(Box<RebuildError>),
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("{what}: {len} bytes at {addr} are not in a writable mapping of the process")]
    NotWritable {
        what: String,
        addr: RuntimeAddr,
        len: usize,
    },
    #[error("{0}")]
    Commit(#[from] CommitError),
    #[error("process {pid}: after {waited_ms} ms a frame the SPEC forbids during an update is still active ({frame}); nothing was changed")]
    Unsafe {
        pid: i32,
        waited_ms: u64,
        frame: String,
    },
    #[error("{0}")]
    Spec(#[from] upstare_patcher::SpecError),
    #[error("process {pid}: {count} value(s) would be left pointing into the old image with no place in the new one (first: {first}); refused (--strict); nothing was changed")]
    Stale {
        pid: i32,
        count: usize,
        first: String,
    },
    #[error("process {pid}: {count} untyped value(s) point at or into heap objects of changed type (first: {first}); refused (--strict); nothing was changed")]
    UntypedAlias {
        pid: i32,
        count: usize,
        first: String,
    },
    #[error("{0}")]
    Build(Box<BuildError>),
    #[error("{0}")]
    TransformPlan(Box<TransformPlanError>),
    #[error("{0}")]
    Transformer(Box<TransformerError>),
    #[error("{0}; nothing was changed")]
    Input(#[from] upstare_patcher::input::InputError),
    #[error("{path}: {why}; nothing was changed")]
    Unrelated { path: PathBuf, why: String },
    #[error("{0}")]
    Rescue(Box<crate::target::rescue::RescueError>),
    #[error("interrupted by {sig}: the update was rolled back, process {pid} runs as before")]
    Interrupted { pid: i32, sig: Sig },
    #[error("process {pid}: the commit failed on purpose (UPSTARE_TEST_FAIL_COMMIT)")]
    InjectedFault { pid: i32 },
    #[error("process {pid} changed while its update was planned: it no longer runs {path} where it did (an exec); nothing was changed")]
    ChangedWhilePlanned { pid: i32, path: PathBuf },
    #[error("process {pid} ({title}) runs under a seccomp filter the updater does not (mode {mode}, {filters} filter(s)): the system calls an update makes in the process would be refused or kill it; nothing was changed{hint}")]
    Sandboxed {
        pid: i32,
        /// Its command line or process title.
        title: String,
        mode: u8,
        /// How many filters, or `unknown`.
        filters: String,
        /// What to do about it, when known (sshd's pre-authentication
        /// child ends with its login).
        hint: String,
    },
    #[error("{source}; the update of the process tree was rolled back ({committed} process(es) had committed and were put back), every process runs as before")]
    TreeRolledBack {
        pid: i32,
        committed: usize,
        source: Box<UpdateError>,
    },
    /// The thread updating one process of a tree ended without saying how
    /// (it panicked): the tree was put back.
    #[error("process {pid}: {what}; every process of the tree was put back as it was")]
    MemberThread { pid: i32, what: String },
}

/// `Err(Interrupted)` if the updater received a termination signal and the
/// commit has not begun; marks a [`signals::Phase::Transfer`] moment.
fn interrupted(pid: i32) -> Result<(), UpdateError> {
    signals::checkpoint(signals::Phase::Transfer);
    match signals::interruption() {
        Some(sig) => Err(UpdateError::Interrupted { pid, sig }),
        None => Ok(()),
    }
}

/// While alive, a termination signal no longer stops the update (it is
/// finished, then reported).
struct CommitWindow;

impl CommitWindow {
    fn open() -> CommitWindow {
        signals::begin_commit();
        CommitWindow
    }
}

impl Drop for CommitWindow {
    fn drop(&mut self) {
        signals::end_commit();
    }
}

// Boxed: the transformer errors are large and rare.
impl From<BuildError> for UpdateError {
    fn from(e: BuildError) -> Self {
        UpdateError::Build(Box::new(e))
    }
}

impl From<TransformPlanError> for UpdateError {
    fn from(e: TransformPlanError) -> Self {
        UpdateError::TransformPlan(Box::new(e))
    }
}

impl From<TransformerError> for UpdateError {
    fn from(e: TransformerError) -> Self {
        UpdateError::Transformer(Box::new(e))
    }
}

impl From<RebuildError> for UpdateError {
    fn from(e: RebuildError) -> Self {
        UpdateError::Rebuild(Box::new(e))
    }
}

/// One thread in the report.
#[derive(Clone, Debug, Serialize)]
pub struct ThreadReport {
    pub tid: i32,
    /// `at update point` or `blocked in read (syscall 0)`.
    pub state: String,
    /// `function@continuation`, top first (the old version's frames).
    pub frames: Vec<String>,
}

/// What an update did.
#[derive(Clone, Debug, Serialize)]
pub struct UpdateReport {
    pub pid: i32,
    pub from: PathBuf,
    pub to: PathBuf,
    pub dry_run: bool,
    pub threads: Vec<ThreadReport>,
    pub globals_copied: usize,
    /// Globals and frame locals whose type changed, converted: what, and
    /// how, in words.
    pub converted: Vec<String>,
    /// Heap objects reached through typed pointers, and the pointers in
    /// them that were changed (callbacks, addresses of globals).
    pub heap_objects: usize,
    pub heap_pointers_remapped: usize,
    /// Heap objects of changed type converted where they were.
    pub heap_converted_in_place: usize,
    /// Heap objects of changed type moved to a new block (the old freed).
    pub heap_moved: usize,
    /// Per heap type (`struct node`): objects found, converted in place,
    /// moved, pointers redirected, sweep hits.
    pub heap_types: std::collections::BTreeMap<String, heap::HeapTypeFigures>,
    /// Times the threads were let run again because a frame the SPEC
    /// forbids during an update was active.
    pub safety_retries: u32,
    pub bytes_written: usize,
    /// The sweep for untyped values pointing into the old image.
    pub sweep: crate::engine::sweep::SweepSummary,
    /// The old image's mappings unmapped after the commit, and those kept.
    pub retired: crate::load::retire::RetiredMappings,
    pub new_load_address: Option<u64>,
    /// Each C transformer call: `xf_session on global acct`.
    pub transformed: Vec<String>,
    pub warnings: Vec<String>,
    pub timings: Timings,
}

/// Largest NEW read: far above any instrumented program, far below what
/// would strain the updater's memory.
pub const MAX_NEW_SIZE: u64 = 1 << 30;

/// Reads NEW whole: a regular file of at most [`MAX_NEW_SIZE`] bytes (a
/// FIFO, a device or a huge file is refused without waiting on it).
pub fn read_new(new_path: &Path) -> Result<Vec<u8>, UpdateError> {
    Ok(upstare_patcher::input::read_regular(
        new_path,
        MAX_NEW_SIZE,
    )?)
}

/// Updates process `pid` to the instrumented binary `new_path`: reads NEW,
/// then seizes the process, runs the update and detaches whatever
/// happened. NEW is read completely before the first ptrace call, so a bad
/// input never keeps the process stopped.
pub fn apply(pid: i32, new_path: &Path, opts: &ApplyOptions) -> Result<UpdateReport, UpdateError> {
    let clock = PhaseClock::start();
    if pid <= 0 || !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(UpdateError::NoProcess { pid });
    }
    let new_bytes = read_new(new_path)?;
    check_tables_unseized(pid, new_path, &new_bytes)?;
    signals::set_target(pid);
    interrupted(pid)?;
    // Planned while the process runs; the seize stops it.
    let mut planned = plan_unseized(Pid::from_raw(pid), new_path, &new_bytes, opts, clock)?;
    let mut tracee = seize_planned(&mut planned)?;
    let result = apply_planned(&mut tracee, planned, new_path, new_bytes, opts);
    let (detached, released) = tracee.detach_timed();
    match result {
        Ok((mut r, mut clock, leftovers)) => {
            detached?;
            // The pause ends when the last thread is let go: the detach's
            // return can come milliseconds later, when the woken thread
            // took this processor.
            r.timings.finish_at(&mut clock, released);
            drop(leftovers);
            Ok(r)
        }
        Err(e) => Err(e),
    }
}

/// Refuses a process restricted by a seccomp filter the updater itself
/// does not run under (sshd's pre-authentication child): the remote system
/// calls of an update (mmap of NEW, memfd_create, ...) would be denied, or
/// kill it. Checked on every thread before anything is stopped.
pub(crate) fn check_not_sandboxed(pid: Pid) -> Result<(), UpdateError> {
    let ours = procfs::seccomp(Pid::this()).map_err(|source| UpdateError::Proc {
        pid: pid.as_raw(),
        source,
    })?;
    for tid in procfs::list_tasks(pid).unwrap_or_else(|_| vec![pid]) {
        // A thread that ended meanwhile has nothing to say.
        let Ok(theirs) = procfs::seccomp(tid) else {
            continue;
        };
        if theirs.restricts_beyond(ours) {
            let title = procfs::command_line(pid);
            let hint = if title.starts_with("sshd:") {
                "; it is sshd's sandboxed pre-authentication child, which ends when its login \
                 completes or times out (LoginGraceTime): update again then"
                    .to_string()
            } else {
                String::new()
            };
            return Err(UpdateError::Sandboxed {
                pid: pid.as_raw(),
                title,
                mode: theirs.mode,
                filters: theirs
                    .filters
                    .map_or_else(|| "unknown".to_string(), |n| n.to_string()),
                hint,
            });
        }
    }
    Ok(())
}

/// Tables that do not match their binary (NEW's, or those of the image the
/// process runs: a section that does not decode, or does not match its
/// checksums) are refused before the first ptrace call. Other problems (a
/// NEW that is no instrumented ELF file, a process whose maps cannot be
/// read) are left to the usual order, where the seize says why first.
fn check_tables_unseized(pid: i32, new_path: &Path, new_bytes: &[u8]) -> Result<(), UpdateError> {
    use upstare_dwarf::TablesError;
    if let Err(e @ (TablesError::CodeChanged | TablesError::Decode(_))) =
        upstare_dwarf::read_tables(new_bytes)
    {
        return Err(UpdateError::New {
            path: new_path.to_path_buf(),
            why: e.to_string(),
        });
    }
    let p = nix::unistd::Pid::from_raw(pid);
    if let Ok(maps) = procfs::read_maps(p) {
        if let Err(e @ ImageError::Tables { .. }) = running_image(p, &maps) {
            return Err(e.into());
        }
    }
    Ok(())
}

/// Whether `len` bytes at `addr` lie in writable mappings. They may span
/// several adjacent ones: `.bss` continues from the last file-backed page of
/// the data segment into anonymous memory.
fn writable(maps: &[MemoryMap], addr: RuntimeAddr, len: usize) -> bool {
    let Some(end) = addr.0.checked_add(len as u64) else {
        return false;
    };
    let mut cur = addr.0;
    // Each step moves past one mapping, so this ends within maps.len() steps.
    for _ in 0..=maps.len() {
        if cur >= end {
            return true;
        }
        match maps
            .iter()
            .find(|m| m.perms.write && m.start.0 <= cur && cur < m.end.0)
        {
            Some(m) => cur = m.end.0,
            None => return false,
        }
    }
    cur >= end
}

/// The warnings of a sweep: stale values by location (the first few), what
/// was not scanned.
fn sweep_warnings(r: &crate::engine::sweep::SweepResult) -> Vec<String> {
    const SHOWN: usize = 8;
    let mut out = Vec::new();
    let stale: Vec<_> = r.stale().collect();
    for h in stale.iter().take(SHOWN) {
        let what = match &h.class {
            crate::engine::sweep::Class::OtherCode { what }
            | crate::engine::sweep::Class::OldData { what } => what.clone(),
            crate::engine::sweep::Class::PastEnd { global } => {
                format!("one past the end of global {global} (ambiguous)")
            }
            _ => String::new(),
        };
        out.push(format!(
            "untyped value {:#x} at {} points into the old image ({what}); left unchanged",
            h.value, h.location
        ));
    }
    if stale.len() > SHOWN {
        out.push(format!(
            "{} more untyped values point into the old image; left unchanged",
            stale.len() - SHOWN
        ));
    }
    if r.bytes_not_scanned > 0 {
        out.push(format!(
            "the sweep for pointers into the old image stopped after {} bytes: {} bytes not scanned",
            r.bytes_scanned, r.bytes_not_scanned
        ));
    }
    if r.hits_dropped > 0 {
        out.push(format!(
            "{} sweep hits beyond the first {} not listed",
            r.hits_dropped,
            r.hits.len()
        ));
    }
    for u in &r.unreadable {
        out.push(format!("the sweep could not read {u}"));
    }
    if !r.shared_unswept.is_empty() {
        let bytes: u64 = r.shared_unswept.iter().map(|(_, n)| *n).sum();
        let names: Vec<&str> = r
            .shared_unswept
            .iter()
            .take(3)
            .map(|(name, _)| name.as_str())
            .collect();
        let more = r.shared_unswept.len().saturating_sub(names.len());
        out.push(format!(
            "{bytes} bytes of memory shared with other processes were not swept ({}{}), over the \
             sweep's limit for shared memory: a pointer into the old image kept there is neither \
             remapped nor reported (--strict refuses)",
            names.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }
    out
}

/// How long the threads run between two tries when a frame the SPEC
/// forbids is active.
const SAFETY_RETRY: Duration = Duration::from_millis(2);

/// The first active frame a `[safety]` rule of the plan forbids:
/// `thread T: FUNCTION@CONTINUATION`.
fn forbidden_frame(threads: &[ThreadState], plan: &UpdatePlan) -> Option<String> {
    threads
        .iter()
        .flat_map(|t| t.with_interrupted())
        .find_map(|t| {
            t.frames.iter().find_map(|f| {
                plan.inactive
                    .iter()
                    .any(|r| r.forbids(&f.function, &f.continuation))
                    .then(|| format!("thread {}: {}@{}", t.tid, f.function, f.continuation))
            })
        })
}

fn thread_report(t: &ThreadState) -> ThreadReport {
    let parts = t.with_interrupted();
    let state = parts
        .iter()
        .map(|p| readiness_text(&p.readiness))
        .collect::<Vec<_>>()
        .join("; under it: ");
    ThreadReport {
        tid: t.tid.as_raw(),
        state,
        frames: parts
            .iter()
            .flat_map(|p| p.frames.iter())
            .map(|f| format!("{}@{}", f.function, f.continuation))
            .collect(),
    }
}

fn readiness_text(r: &Readiness) -> String {
    match r {
        Readiness::AtPoint => "at update point".into(),
        Readiness::Blocked { callee, syscall } => {
            format!("blocked in {callee} (syscall {syscall})")
        }
        Readiness::InLibrary { callee, syscall } => {
            format!("waiting in {callee} (syscall {syscall}), left in place")
        }
        Readiness::CallbackReturned { callee } => {
            format!("its callback under {callee} returned into the library, left in place")
        }
        Readiness::Returned { callee } => {
            format!("woken from {callee}, returns 0 (a spurious wake-up)")
        }
        Readiness::Relock { callee, .. } => {
            format!("woken from {callee}, re-acquires its mutex and returns 0 (a spurious wake-up)")
        }
        Readiness::UnderSignal { callee } => {
            format!("interrupted in {callee} by the signal, left in place")
        }
        Readiness::UnderCallback { callee } => {
            format!("in {callee}, which called back: left in place")
        }
    }
}

/// The update on an already seized (all threads stopped) tracee. The tracee
/// stays attached; the caller resumes it (detach or continue).
pub fn apply_traced(
    tracee: &mut Tracee,
    new_path: &Path,
    opts: &ApplyOptions,
) -> Result<UpdateReport, UpdateError> {
    let clock = PhaseClock::start();
    let new_bytes = read_new(new_path)?;
    let (mut r, mut clock, _leftovers) =
        apply_traced_bytes(tracee, new_path, new_bytes, opts, clock)?;
    // The caller resumes the threads: nothing more to time here.
    r.timings.finish(&mut clock);
    Ok(r)
}

/// What an update leaves to free (tables, plan, images, file contents):
/// dropped by the caller once the process runs again, because freeing
/// them for a large program takes milliseconds the process need not wait.
pub(crate) type Leftovers = Box<dyn std::any::Any + Send>;

/// [`apply_traced`] with NEW already read (`new_bytes`, the contents of
/// `new_path`). Every phase up to the commit is timed on `clock`, started
/// by the caller; the caller times the resume.
fn apply_traced_bytes(
    tracee: &mut Tracee,
    new_path: &Path,
    new_bytes: Vec<u8>,
    opts: &ApplyOptions,
    clock: PhaseClock,
) -> Result<(UpdateReport, PhaseClock, Leftovers), UpdateError> {
    let planned = plan_update(tracee.pid(), new_path, &new_bytes, opts, clock)?;
    apply_planned(tracee, planned, new_path, new_bytes, opts)
}

/// [`plan_update`] of a process not yet seized. When planning fails, a
/// process the updater may not trace says why first (the seize's reason).
fn plan_unseized(
    pid: Pid,
    new_path: &Path,
    new_bytes: &[u8],
    opts: &ApplyOptions,
    clock: PhaseClock,
) -> Result<Planned, UpdateError> {
    plan_update(pid, new_path, new_bytes, opts, clock).map_err(|e| {
        // Dropped at once: detached as it was.
        match Tracee::seize(pid) {
            Ok(_) => e,
            Err(seize) => seize.into(),
        }
    })
}

/// Seizes (stops) a process planned while it ran: its pause starts here,
/// the time it ran since its plan counts as planning. Refused when it no
/// longer maps the image it was planned for (it exec'd meanwhile).
fn seize_planned(planned: &mut Planned) -> Result<Tracee, UpdateError> {
    planned.timings.plan_us += planned.clock.lap();
    let pid = Pid::from_raw(planned.pid);
    let tracee = Tracee::seize(pid)?;
    let maps = procfs::read_maps(pid).map_err(|source| UpdateError::Proc {
        pid: planned.pid,
        source,
    })?;
    // Nothing of the process has run since: the stop starts from these.
    let maps = std::sync::Arc::new(maps);
    planned.seized_maps = Some(maps.clone());
    let still = maps.iter().any(|m| {
        m.perms.exec
            && m.file() == Some(planned.old.path.as_path())
            && m.contains(planned.old.text.start)
    });
    if !still {
        return Err(UpdateError::ChangedWhilePlanned {
            pid: planned.pid,
            path: planned.old.path.clone(),
        });
    }
    Ok(tracee)
}

/// The update of a planned process, seized: stop, compute, commit.
fn apply_planned(
    tracee: &mut Tracee,
    mut planned: Planned,
    new_path: &Path,
    new_bytes: Vec<u8>,
    opts: &ApplyOptions,
) -> Result<(UpdateReport, PhaseClock, Leftovers), UpdateError> {
    let (threads, safety_retries) = stop_process(tracee, &mut planned, opts)?;
    let mut ready = compute(
        tracee,
        planned,
        threads,
        safety_retries,
        new_path,
        &new_bytes,
        opts,
    )?;
    if opts.dry_run {
        // Nothing committed: NEW is unloaded (timed as the commit).
        let (report, clock, leftovers) = ready.dry_finish();
        return Ok((report, clock, Box::new((leftovers, new_bytes))));
    }
    // Phase 6: commit, with an undo log so a failure is rolled back. A
    // termination signal from here on is reported once it is finished.
    let _window = CommitWindow::open();
    commit_ready(&mut ready, true)?;
    let (report, clock, leftovers) = ready.finish();
    Ok((report, clock, Box::new((leftovers, new_bytes))))
}

/// What phase 1 found and decided for one process, before it is paused.
struct Planned {
    /// The process's own clock: its report's phases are laps of it.
    clock: PhaseClock,
    pid: i32,
    old: Image,
    old_bytes: Vec<u8>,
    new_tables: FrameTables,
    plan: UpdatePlan,
    object: Option<TransformerObject>,
    libs: Libraries,
    prepared_load: Option<load::PreparedLoad>,
    /// The code remote calls borrow in the running image (its entry
    /// point), looked up before the pause; `None`: looked up in it (the
    /// former pause, `legacy_pause`).
    gadget: Option<RuntimeAddr>,
    /// What arming the update points writes, worked out before the pause
    /// (`None` along the former pause).
    arming: Option<std::sync::Arc<stop::ArmingPlan>>,
    /// NEW's canonical path (for the report) and the process's `AT_PHDR`,
    /// looked up before the pause (`None`: in it, along the former pause).
    facts: Option<(PathBuf, Option<u64>)>,
    /// What the sweep needs from the two files alone.
    sweep_files: crate::engine::sweep::SweepFiles,
    /// The process's descriptors and epoll instances before the pause.
    fds: Option<procfs::FdScan>,
    /// Its maps as read right after the seize (taken by the first stop).
    seized_maps: Option<std::sync::Arc<Vec<procfs::MemoryMap>>>,
    /// The maps the stop last read, with the [`Tracee::maps_epoch`] they
    /// were read at: the load's, while nothing changed them.
    stop_maps: Option<(Vec<procfs::MemoryMap>, u64)>,
    timings: Timings,
}

/// Phase 1 for process `pid`: what runs, and what it becomes (no process
/// changes). `clock` was started when this process's update began.
fn plan_update(
    pid_: Pid,
    new_path: &Path,
    new_bytes: &[u8],
    opts: &ApplyOptions,
    mut clock: PhaseClock,
) -> Result<Planned, UpdateError> {
    let pid = pid_.as_raw();
    let proc_err = |source| UpdateError::Proc { pid, source };
    let new_err = |why: String| UpdateError::New {
        path: new_path.to_path_buf(),
        why,
    };
    let mut timings = Timings::default();

    // Phase 1: what runs, and what it becomes (no process changes).
    check_not_sandboxed(pid_)?;
    let maps = procfs::read_maps(pid_).map_err(proc_err)?;
    let old = running_image(pid_, &maps)?;
    if let Some(expected) = &opts.expected_old {
        // The file exactly as mapped, hashed before anything is stopped.
        let f = open_image_file(pid_, &maps, &old)?;
        let actual = ImageIdentity::of_reader(f, &old.tables.binary.build_id).map_err(|e| {
            UpdateError::NotOld {
                pid,
                path: old.path.clone(),
                why: format!("cannot read it: {e}"),
            }
        })?;
        if let Some(why) = expected.mismatch(&actual) {
            return Err(UpdateError::NotOld {
                pid,
                path: old.path.clone(),
                why,
            });
        }
    }
    // NEW must be another file: the same file mapped a second time cannot be
    // told apart from the retired image by later updates.
    if let Ok(meta) = std::fs::metadata(new_path) {
        use std::os::unix::fs::MetadataExt;
        let dev = meta.dev();
        let same = maps.iter().any(|m| {
            m.perms.exec
                && m.file() == Some(old.path.as_path())
                && m.inode == meta.ino()
                && u64::from(m.dev_major) == nix::sys::stat::major(dev)
                && u64::from(m.dev_minor) == nix::sys::stat::minor(dev)
        });
        if same {
            return Err(new_err(format!(
                "is the file process {pid} runs ({}); update to a copy of it",
                old.path.display()
            )));
        }
    }
    let new_tables = upstare_dwarf::read_tables(new_bytes).map_err(|e| new_err(e.to_string()))?;
    if let Some(expected) = &opts.expected_new {
        let actual = ImageIdentity::of_bytes(new_bytes, &new_tables);
        if let Some(why) = expected.mismatch(&actual) {
            return Err(UpdateError::NotNew {
                path: new_path.to_path_buf(),
                why,
            });
        }
    }
    // A non-PIE NEW could only be mapped at its link addresses, which the
    // running image occupies: refuse before the process is even paused.
    if !new_tables.binary.pie {
        return Err(LoadError::NotPie {
            path: new_path.to_path_buf(),
        }
        .into());
    }
    // OLD's file as mapped (initial values, the sweep), read before the
    // pause.
    let old_bytes = image_file_bytes(pid_, &maps, &old)?;
    // What maps to what is decided from the two tables alone, before the
    // process is paused.
    let mut object = opts.transformers.clone();
    let plan: UpdatePlan = match &opts.plan {
        Some(plan) => plan.clone(),
        None => {
            let mut plan = match &opts.spec {
                Some((path, spec)) => {
                    spec.check(path, &old.tables, &new_tables)?;
                    // The C transformers are compiled now, before the
                    // process is paused.
                    if object.is_none() {
                        object = upstare_patcher::transformer::build(
                            path,
                            spec,
                            &old.tables,
                            &new_tables,
                        )?;
                    }
                    upstare_patcher::plan_with_spec(&old.tables, &new_tables, spec)
                }
                None => upstare_patcher::default_plan(&old.tables, &new_tables),
            };
            // OLD's initial values, so data the program never changed
            // follows NEW.
            let initial =
                upstare_patcher::initial::initial_values(&old.path, &old.tables, &old_bytes)
                    .map_err(ImageError::from)?;
            plan.attach_initial_values(initial);
            plan
        }
    };
    if let Some(u) = &plan.unrelated {
        return Err(UpdateError::Unrelated {
            path: new_path.to_path_buf(),
            why: u.to_string(),
        });
    }
    let transforms = !plan.transformers.is_empty();
    if transforms && object.is_none() {
        return Err(TransformerError::NoObject.into());
    }
    let libs = Libraries::new(pid_, &maps);
    // The call frame information and symbols of every library, read now
    // rather than by the first unwind through it in the pause (a thread
    // blocked in libc: 0.4 ms for libc's symbols); a library that cannot
    // be read is met again there.
    for lib in libs.iter() {
        lib.warm();
    }
    // NEW's relocations and imports, resolved while the process runs. A
    // process not yet that far (its libraries not loaded: stopped at its
    // start) is planned for again in the pause, which reports the refusal.
    let prepared_load = if opts.legacy_pause {
        None
    } else {
        load::prepare_load(pid_, &maps, new_path, new_bytes, &old).ok()
    };
    let gadget = if opts.legacy_pause {
        None
    } else {
        load::running_gadget(pid_, &old).ok()
    };
    let arming = (!opts.legacy_pause)
        .then(|| std::sync::Arc::new(stop::ArmingPlan::lazy_of(&old, &old_bytes)));
    let facts = (!opts.legacy_pause).then(|| (canonical_or_given(new_path), program_headers(pid_)));

    // What the sweep needs from the two files alone.
    let sweep_files =
        crate::engine::sweep::SweepFiles::new(&old_bytes, new_bytes, &plan, &old, &new_tables);
    // Which descriptors are epoll instances: one call per descriptor, not
    // in the pause (a server's thousands of connections).
    let fds = (!opts.legacy_pause)
        .then(|| procfs::FdScan::of(pid_).ok())
        .flatten();
    timings.plan_us = clock.lap();
    Ok(Planned {
        clock,
        pid,
        old,
        old_bytes,
        new_tables,
        plan,
        object,
        libs,
        prepared_load,
        gadget,
        arming,
        facts,
        sweep_files,
        fds,
        seized_maps: None,
        stop_maps: None,
        timings,
    })
}

/// `path` made canonical, or as given when it cannot be.
fn canonical_or_given(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Where the process's program headers are (`AT_PHDR`), if known.
fn program_headers(pid: Pid) -> Option<u64> {
    procfs::read_auxv(pid)
        .ok()
        .and_then(|a| procfs::auxv_value(&a, procfs::AT_PHDR).ok())
}

/// Phase 2: every thread of the process stopped at an update point or in
/// a safe call; how many times the threads were let run again for a
/// `[safety]` rule.
fn stop_process(
    tracee: &mut Tracee,
    planned: &mut Planned,
    opts: &ApplyOptions,
) -> Result<(Vec<ThreadState>, u32), UpdateError> {
    let pid = planned.pid;
    let (old, plan, libs) = (&planned.old, &planned.plan, &mut planned.libs);
    // Phase 2: stop every thread at an update point or in a safe call.
    // With frames that must not be active (SPEC [safety]), the threads are
    // let run again until none is, within the time limit.
    let t = Instant::now();
    let deadline = t + opts.timeout;
    let mut skip_hits = opts.skip_hits;
    let mut safety_retries = 0u32;
    // Breakpoints are armed only while the world is being stopped: the
    // rescue handler covers exactly that span, so that the process lives on
    // if the updater is killed meanwhile.
    signals::set_stopping(true);
    // The rescue handler is installed before anything is armed: at once
    // along the former pause, else only if some thread is not ready when
    // classified (none armed, no handler: two remote sessions saved).
    let mut rescue = None;
    if planned.gadget.is_none() {
        match survive::install(tracee, old) {
            Ok(r) => rescue = r,
            Err(e) => {
                signals::set_stopping(false);
                return Err(e);
            }
        }
    }
    let (gadget, arming) = (planned.gadget, planned.arming.clone());
    // The maps read at the seize serve the first stop, unless the rescue
    // handler was mapped since (along the former pause).
    let mut seized_maps = planned.seized_maps.take().filter(|_| gadget.is_some());
    let mut asked = gadget.is_none();
    let mut detail = timings::StopDetail::default();
    let stopped = (|| loop {
        interrupted(pid)?;
        let mut before_arming = |tr: &mut Tracee,
                                 batch: &[(upstare_dwarf::RuntimeAddr, u8)]|
         -> Result<(), StopError> {
            if let (false, Some(g), Some(a)) = (asked, gadget, &arming) {
                asked = true;
                rescue = survive::install_at(tr, old, g, a).map_err(StopError::Rescue)?;
            }
            // Breakpoints about to be armed (update points or others): in
            // the rescue handler's table first.
            if let (false, Some(r)) = (batch.is_empty(), rescue.as_mut()) {
                r.add(tr, batch).map_err(StopError::Rescue)?;
            }
            Ok(())
        };
        let stopped = stop::stop_the_world_armed_by(
            tracee,
            old,
            libs,
            &StopOptions {
                timeout: deadline.saturating_duration_since(Instant::now()),
                skip_hits,
                arming: arming.clone(),
                // Only the first stop: the threads run between retries.
                maps: seized_maps.take(),
                ..StopOptions::default()
            },
            &mut before_arming,
        )
        .map_err(|e| match e {
            StopError::Interrupted { pid, sig } => UpdateError::Interrupted { pid, sig },
            StopError::Rescue(e) => UpdateError::Rescue(e),
            e => e.into(),
        })?;
        skip_hits = 0;
        detail.add(&stopped.timings, stopped.breakpoints_armed);
        let Some(busy) = forbidden_frame(&stopped.threads, plan) else {
            return Ok((stopped.threads, stopped.maps));
        };
        if Instant::now() + SAFETY_RETRY >= deadline {
            return Err(UpdateError::Unsafe {
                pid,
                waited_ms: u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
                frame: busy,
            });
        }
        for tid in tracee.traced() {
            let sig = tracee.take_pending_signal(tid);
            tracee.cont(tid, sig)?;
        }
        std::thread::sleep(SAFETY_RETRY);
        tracee.halt_all()?;
        safety_retries = safety_retries.saturating_add(1);
    })();
    let t_unrescue = Instant::now();
    let removed = rescue.map_or(Ok(()), |r| survive::remove(tracee, r));
    detail.unrescue_us = timings::us(t_unrescue.elapsed());
    planned.timings.stop_detail = detail;
    signals::set_stopping(false);
    let (threads, stop_maps) = stopped?;
    removed?;
    planned.stop_maps = Some(stop_maps);
    planned.timings.stop_us = planned.clock.lap();
    interrupted(pid)?;

    Ok((threads, safety_retries))
}

/// What the commit adds to the report.
struct CommitFacts {
    globals_copied: usize,
    converted: Vec<String>,
    heap_objects: usize,
    heap_pointers_remapped: usize,
    heap_converted_in_place: usize,
    heap_moved: usize,
    heap_types: std::collections::BTreeMap<String, heap::HeapTypeFigures>,
    frames: Vec<Vec<String>>,
}

/// One process ready to commit: NEW loaded (unloaded again when this is
/// dropped uncommitted), every byte and register computed.
struct Ready<'t> {
    loaded: LoadedImage<'t>,
    commit_plan: load::CommitPlan,
    /// What of the old image is unmapped once every process committed.
    unmap: crate::load::retire::UnmapPlan,
    prepared: PreparedState,
    threads: Vec<ThreadState>,
    report: UpdateReport,
    facts: CommitFacts,
    warnings: Vec<String>,
    timings: Timings,
    clock: PhaseClock,
    legacy_pause: bool,
    /// What the update leaves to free once the process runs again.
    leftovers: Leftovers,
    /// Its commit was timed already (in a tree: what follows is waiting
    /// for the other processes' commits).
    commit_timed: bool,
}

/// Phases 3 to 5: check the paused state against the plan, load NEW and
/// compute every byte of the new state.
#[allow(clippy::too_many_arguments)]
fn compute<'t>(
    tracee: &'t mut Tracee,
    planned: Planned,
    threads: Vec<ThreadState>,
    safety_retries: u32,
    new_path: &Path,
    new_bytes: &[u8],
    opts: &ApplyOptions,
) -> Result<Ready<'t>, UpdateError> {
    let Planned {
        mut clock,
        pid,
        old,
        old_bytes,
        new_tables,
        plan,
        object,
        libs,
        prepared_load,
        gadget: _,
        arming: _,
        facts,
        sweep_files,
        fds: fds_before,
        seized_maps: _,
        stop_maps,
        mut timings,
    } = planned;
    let proc_err = |source| UpdateError::Proc { pid, source };
    let transforms = !plan.transformers.is_empty();
    // Every set of frames to map: each thread's, and under a signal
    // handler the context the signal interrupted (its registers stay in
    // the signal frame); `owner` gives each part's thread.
    let (parts, owner): (Vec<ThreadState>, Vec<usize>) = threads
        .iter()
        .enumerate()
        .flat_map(|(i, t)| {
            t.with_interrupted().into_iter().map(move |p| {
                let mut part = p.clone();
                part.below = None;
                (part, i)
            })
        })
        .unzip();
    // Phase 3: does the paused state map onto the new version? (plan and
    // tables only)
    transfer::check_globals(&plan, &tracee.memory(), &old)?;
    rebuild::check_frames(&parts, &plan, &old.tables, &new_tables)?;
    let mut warnings = plan.warnings.clone();
    timings.check_us = clock.lap();
    let mut report = UpdateReport {
        pid,
        from: old.path.clone(),
        to: facts
            .as_ref()
            .map_or_else(|| canonical_or_given(new_path), |(to, _)| to.clone()),
        dry_run: opts.dry_run,
        threads: threads.iter().map(thread_report).collect(),
        globals_copied: 0,
        converted: Vec::new(),
        heap_objects: 0,
        heap_pointers_remapped: 0,
        heap_converted_in_place: 0,
        heap_moved: 0,
        heap_types: Default::default(),
        safety_retries,
        bytes_written: 0,
        sweep: Default::default(),
        retired: Default::default(),
        new_load_address: None,
        transformed: Vec::new(),
        warnings: Vec::new(),
        timings: Timings::default(),
    };
    interrupted(pid)?;
    // A dry run goes on: it loads NEW, computes every byte (conversions,
    // transformers on copies, the heap walk, the sweep), then unloads
    // everything before the commit, so it meets every refusal a real
    // update would.

    // Phase 4: load the new version (undone on drop unless committed).
    let tid = threads.first().map_or(Pid::from_raw(pid), |t| t.tid);
    let mut loaded = match prepared_load {
        Some(prep) => load::load_prepared(
            tracee,
            tid,
            prep,
            new_bytes,
            new_tables,
            &old,
            &LoadOptions {
                maps: stop_maps,
                ..LoadOptions::default()
            },
        )?,
        None => load::load_image(
            tracee,
            tid,
            new_path,
            new_bytes,
            new_tables,
            &old,
            &LoadOptions::default(),
        )?,
    };
    let load_libs = loaded.take_libraries();
    let (own_alt_stack, load_tid, running_gadget) = (
        loaded.own_alt_stack(),
        loaded.tid(),
        loaded.running_gadget(),
    );
    let mut commit_plan = loaded.plan_commit(&old)?;
    warnings.extend(commit_plan.warnings.iter().cloned());
    timings.load_us = clock.lap();
    interrupted(pid)?;

    // The maps with NEW in them, read by the load: nothing maps or unmaps
    // while the process is paused.
    let (maps_now, maps_now_epoch) = if opts.legacy_pause {
        let epoch = loaded.tracee().maps_epoch();
        (procfs::read_maps(loaded.pid()).map_err(proc_err)?, epoch)
    } else {
        (loaded.maps().to_vec(), loaded.maps_epoch())
    };
    // Phase 5: compute every byte of the new state. The heap objects of
    // changed type first: where they go must be known before any pointer
    // to them is remapped, and blocks for moved ones are allocated now.
    let heap_ranges = heap::heap_ranges(&maps_now, &parts, [&old, loaded.image()]);
    let mut heap_objects = heap_objects::find(&mut loaded, &old, &parts, &plan, &heap_ranges)?;
    heap_objects::place(&mut loaded, &mut heap_objects, &heap_ranges)?;
    let (new, tr) = loaded.parts();
    // A dry run unloads NEW again: no address to report.
    report.new_load_address = (!opts.dry_run).then_some(new.bias.0);
    let mut mem = tr.memory();
    let mut remap = Remapper::new(&plan, &old, new);
    remap.set_heap_moves(heap_objects.moves());
    let mut layouts = Vec::with_capacity(parts.len());
    for th in &parts {
        layouts.push(rebuild::place_frames(th, &plan, &old, new, &mut remap)?);
    }
    let globals = transfer::transfer_globals(&mem, &plan, &old, new, &mut remap)?;
    interrupted(pid)?;
    let heap = heap::transfer_heap(&old.tables.types, &heap_objects, &mut remap)?;
    heap::write_moved(&mut mem, &heap)?;
    timings.transfer_us = clock.lap();
    let mut plans = Vec::with_capacity(parts.len());
    for (th, layout) in parts.iter().zip(&layouts) {
        plans.push(rebuild::frame_writes(
            &mem, th, layout, &plan, &old, new, &mut remap,
        )?);
    }
    let mut writes: Vec<Write> = globals
        .writes
        .iter()
        .chain(heap.writes.iter())
        .chain(plans.iter().flat_map(|p| p.writes.iter()))
        .cloned()
        .collect();
    timings.rebuild_us = clock.lap();
    // The C transformers, after the default conversion: each reads the
    // value computed so far and its result replaces it in the writes.
    if let (true, Some(object)) = (transforms, &object) {
        let jobs = transform::jobs(&mem, &plan, &old, new, &parts, &layouts, &writes)?;
        let run = run_transformers(tr, tid, &old, object, &jobs, &mut writes, opts.timeout)?;
        report.transformed = run.calls;
    }
    timings.transform_us = clock.lap();
    // After the typed walk and the transformers: every value still
    // pointing into the old image.
    let old_elf = &old_bytes;
    let rsps: Vec<u64> = plans.iter().map(|p| p.regs.rsp().0).collect();
    let pending: Vec<&Write> = writes.iter().collect();
    let heap_moves = heap_objects.moves();
    // Threads left in library code keep their registers: what they hold
    // of the old image is remapped with the rest.
    // (An interrupted context's registers are in its signal frame, which
    // the sweep scans with the stack; a library's under a callback are in
    // the callback's frames or final registers.)
    // glibc's pointer guard (one per process): a jmp_buf keeps its return
    // address mangled with it.
    let pointer_guard = plans
        .first()
        .map(|p| p.regs.0.fs_base)
        .and_then(|fs| crate::engine::sweep::pointer_guard(&mem, fs));
    let mut kept_regs: Vec<(nix::unistd::Pid, &mut crate::target::ptrace::Regs)> = parts
        .iter()
        .zip(plans.iter_mut())
        .filter(|(th, _)| {
            // A callback's frames carry the library's callee-saved values
            // back to it (in their final registers too).
            !th.beneath
                && (th.library_view.is_some()
                    || matches!(
                        th.readiness,
                        Readiness::InLibrary { .. } | Readiness::CallbackReturned { .. }
                    ))
        })
        .map(|(_, p)| (p.tid, &mut p.regs))
        .collect();
    // Read again if remote sessions may have mapped or unmapped memory
    // since the load (the heap walk's and the transformers' scratch memory:
    // swept from the load's maps, it was reported as unreadable memory).
    let maps_swept = if tr.maps_epoch() == maps_now_epoch {
        maps_now.clone()
    } else {
        procfs::read_maps(nix::unistd::Pid::from_raw(pid)).map_err(proc_err)?
    };
    // The user data of epoll registrations lives in the kernel: swept too,
    // and re-registered at the commit when it points into the old image.
    let epoll: Vec<(procfs::EpollRegistration, bool)> =
        procfs::epoll_registrations(nix::unistd::Pid::from_raw(pid), fds_before.as_ref())
            .map_err(proc_err)?
            .into_iter()
            .map(|r| {
                let current = procfs::fd_identity(nix::unistd::Pid::from_raw(pid), r.tfd)
                    == Some((r.ino, r.sdev));
                (r, current)
            })
            .collect();
    // /proc/PID/timers exists only with CONFIG_CHECKPOINT_RESTORE: without
    // it the timers' values go unseen, which is said (and refused when
    // strict).
    let timers = match procfs::posix_timers(nix::unistd::Pid::from_raw(pid)) {
        Ok(t) => t,
        Err(e) if opts.strict => return Err(proc_err(e)),
        Err(e) => {
            warnings.push(format!(
                "the POSIX timers' signal values were not swept: {e}"
            ));
            Vec::new()
        }
    };
    let (swept, retired) = crate::engine::sweep::sweep_update(
        &mem,
        &maps_swept,
        &rsps,
        &old,
        new,
        &mut remap,
        &pending,
        old_elf,
        &sweep_files,
        &heap_moves,
        &mut kept_regs,
        pointer_guard,
        &epoll,
        &timers,
    );
    drop(kept_regs);
    let sweep_writes = swept.writes();
    warnings.extend(sweep_warnings(&swept));
    let aliases = heap_objects::alias_lines(&remap.untyped_aliases, &swept, &|a| {
        heap_objects::site_of(new, &old.tables.types, &heap_objects, a)
    });
    if let (true, Some(first)) = (opts.strict, aliases.first()) {
        return Err(UpdateError::UntypedAlias {
            pid,
            count: aliases.len(),
            first: first.clone(),
        });
    }
    warnings.extend(heap_objects::alias_warnings(&aliases));
    let heap_types = heap_objects::type_figures(&heap, &remap.heap_redirects, &swept);
    if opts.strict {
        if let Some(h) = swept.stale().next() {
            return Err(UpdateError::Stale {
                pid,
                count: swept.stale().count(),
                first: format!("{:#x} at {}", h.value, h.location),
            });
        }
        if swept.bytes_not_scanned > 0 {
            return Err(UpdateError::Stale {
                pid,
                count: 0,
                first: format!("{} bytes not scanned", swept.bytes_not_scanned),
            });
        }
        if let Some((name, bytes)) = swept.shared_unswept.first() {
            return Err(UpdateError::Stale {
                pid,
                count: 0,
                first: format!("{bytes} bytes of {name}, shared with other processes, not swept"),
            });
        }
    }
    report.sweep = crate::engine::sweep::SweepSummary::of(&swept, &retired);
    // What of the old image nothing needs once the commit is done.
    let phdr = match &facts {
        Some((_, phdr)) => *phdr,
        None => program_headers(nix::unistd::Pid::from_raw(pid)),
    };
    let unmap =
        crate::load::retire::plan_unmap(&mem, &maps_swept, &old, &retired, old_elf, &swept, phdr);
    let mut unmap = unmap;
    if commit_plan.on_alt_stack
        && unmap
            .unmap
            .iter()
            .any(|r| writable(&maps_swept, r.start, 1))
    {
        // An alternate signal stack in the old image's data would be
        // unmapped under a handler that runs on it: writable ranges that
        // hold one are kept, or all of them when the threads' alternate
        // stacks are not known. Read only now that writable data would go
        // (a remote session in each thread but the load's).
        let alt_stacks = own_alt_stack
            .and_then(|own| load::alt_stacks(tr, load_tid, own, running_gadget, &maps_swept));
        let alt_stacks = alt_stacks.as_deref();
        let (keep, go): (Vec<_>, Vec<_>) = unmap.unmap.into_iter().partition(|r| {
            writable(&maps_swept, r.start, 1)
                && alt_stacks.is_none_or(|stacks| {
                    stacks
                        .iter()
                        .any(|s| s.start < r.end.0 && r.start.0 < s.end)
                })
        });
        unmap.unmap = go;
        unmap.keep.extend(keep.into_iter().map(|r| {
            (
                r,
                "writable data kept: a signal handler runs on an alternate stack (SA_ONSTACK), which the kernel keeps per thread and which lies here or could not be read".to_string(),
            )
        }));
    }
    commit_plan.unmap = unmap.unmap.clone();
    commit_plan.epoll = swept
        .epoll_remaps
        .iter()
        .map(|(r, new)| crate::load::EpollRewrite {
            epfd: r.epfd,
            tfd: r.tfd,
            events: r.events,
            old: r.data,
            new: *new,
        })
        .collect();
    drop(pending);
    writes.extend(sweep_writes);
    for w in &writes {
        if !writable(&maps_now, w.addr, w.bytes.len()) {
            return Err(UpdateError::NotWritable {
                what: w.what.clone(),
                addr: w.addr,
                len: w.bytes.len(),
            });
        }
    }
    if let Some(&value) = remap.dangling_heap.first() {
        return Err(heap::HeapError::DanglingInterior { value }.into());
    }
    if !remap.dangling_data.is_empty() {
        warnings.push(format!(
            "{} pointer(s) into old globals or locals point at parts the new version no longer has (a removed member or element); left pointing at the old bytes",
            remap.dangling_data.len()
        ));
    }
    if !remap.dangling_code.is_empty() {
        warnings.push(format!(
            "{} pointer(s) into old code name no function of the new version; left unchanged",
            remap.dangling_code.len()
        ));
    }
    for p in &plans {
        warnings.extend(p.warnings.iter().cloned());
    }
    warnings.extend(heap.warnings.iter().cloned());
    timings.sweep_us = clock.lap();

    let prepared = PreparedState {
        writes,
        regs: parts
            .iter()
            .zip(&plans)
            .filter(|(part, _)| !part.beneath)
            .map(|(_, p)| (p.tid, p.regs))
            .collect(),
    };
    let globals_copied = globals.copied;
    let converted: Vec<String> = globals
        .converted_names
        .iter()
        .chain(plans.iter().flat_map(|p| p.converted.iter()))
        .cloned()
        .collect();
    let mut frames: Vec<Vec<String>> = vec![Vec::new(); threads.len()];
    for (p, &i) in plans.iter().zip(&owner) {
        frames[i].extend(p.frames.iter().cloned());
    }
    drop(remap);
    // The last moment a termination signal rolls the update back.
    interrupted(pid)?;

    if !opts.keep_old_heap_objects {
        loaded.free_after_commit(heap_objects.moved_from());
    }
    Ok(Ready {
        loaded,
        commit_plan,
        unmap,
        prepared,
        threads,
        report,
        facts: CommitFacts {
            globals_copied,
            converted,
            heap_objects: heap.objects,
            heap_pointers_remapped: heap.writes.len() - heap.converted_in_place,
            heap_converted_in_place: heap.converted_in_place,
            heap_moved: heap.moved.len(),
            heap_types,
            frames,
        },
        warnings,
        timings,
        clock,
        legacy_pause: opts.legacy_pause,
        leftovers: Box::new((old, plan, libs, old_bytes, sweep_files, load_libs)),
        commit_timed: false,
    })
}

impl Ready<'_> {
    /// In a tree, the time since this process's last phase was spent on
    /// the other processes: timed as waiting.
    fn lap_tree_wait(&mut self) {
        self.timings.tree_wait_us += self.clock.lap();
    }

    /// Its commit just ended: timed now, not when the tree's last process
    /// has committed.
    fn lap_commit(&mut self) {
        self.timings.commit_us = self.clock.lap();
        self.commit_timed = true;
    }

    /// The report of a dry run (nothing committed): NEW unloaded (timed
    /// as the commit), the clock for the caller to time the resume, and
    /// what is left to free once the process runs.
    fn dry_finish(self) -> (UpdateReport, PhaseClock, Leftovers) {
        let Ready {
            loaded,
            mut report,
            warnings,
            mut timings,
            mut clock,
            leftovers,
            ..
        } = self;
        drop(loaded);
        timings.commit_us = clock.lap();
        report.warnings = warnings;
        report.timings = timings;
        (report, clock, leftovers)
    }

    /// After [`commit_ready`]: NEW belongs to the program; the report (its
    /// resume not yet timed: [`Timings::finish`] with the clock once the
    /// process runs) and what is left to free then.
    fn finish(self) -> (UpdateReport, PhaseClock, Leftovers) {
        let commit_timed = self.commit_timed;
        let Ready {
            loaded,
            commit_plan,
            unmap,
            prepared,
            threads,
            mut report,
            facts,
            mut warnings,
            mut timings,
            mut clock,
            leftovers,
            ..
        } = self;
        let (new_image, unfreed, not_unmapped) = loaded.finish_committed(&commit_plan);
        report.retired = unmap.report(not_unmapped);
        if unfreed > 0 {
            warnings.push(format!(
                "{unfreed} old heap object(s) of changed type could not be freed after the update (left allocated)"
            ));
        }
        report.bytes_written = prepared.bytes();
        report.globals_copied = facts.globals_copied;
        report.converted = facts.converted;
        report.heap_objects = facts.heap_objects;
        report.heap_pointers_remapped = facts.heap_pointers_remapped;
        report.heap_converted_in_place = facts.heap_converted_in_place;
        report.heap_moved = facts.heap_moved;
        report.heap_types = facts.heap_types;
        report.threads = threads
            .iter()
            .zip(facts.frames)
            .map(|(t, frames)| ThreadReport {
                frames,
                ..thread_report(t)
            })
            .collect();
        if commit_timed {
            timings.tree_wait_us += clock.lap();
        } else {
            timings.commit_us = clock.lap();
        }
        report.warnings = warnings;
        report.timings = timings;
        (
            report,
            clock,
            Box::new((leftovers, new_image, threads, prepared)),
        )
    }
}

/// Commit `ready`'s writes and registers with an undo log, then the load's
/// commit steps; on failure everything is put back (the guard unloads NEW
/// when `ready` is dropped). The undo log, kept until the whole update
/// commits. `alone`: no other process's commit can take this one back,
/// so the retired code may go with the commit steps.
fn commit_ready(ready: &mut Ready<'_>, alone: bool) -> Result<UndoLog, UpdateError> {
    let mode = if ready.legacy_pause {
        transaction::CommitMode::OneByOne
    } else {
        transaction::CommitMode::Batched
    };
    let tr = ready.loaded.tracee();
    let mut mem = tr.memory();
    let undo = transaction::commit_with(&ready.prepared, &mut mem, tr, mode)?;
    let stepped = if alone && !ready.legacy_pause {
        ready.loaded.commit_steps_alone(&ready.commit_plan)
    } else {
        ready.loaded.commit_steps(&ready.commit_plan)
    };
    if let Err(e) = stepped {
        let tr = ready.loaded.tracee();
        let mut mem = tr.memory();
        undo.roll_back(&mut mem, tr);
        return Err(e.into());
    }
    Ok(undo)
}

/// Take back a [`commit_ready`] that succeeded: the load's commit steps,
/// then the writes and registers from `undo` (best effort, each step
/// tried); the guard unloads NEW when `ready` is dropped.
fn revert_ready(ready: &mut Ready<'_>, undo: UndoLog) {
    let _ = ready.loaded.revert_steps(&ready.commit_plan);
    let tr = ready.loaded.tracee();
    let mut mem = tr.memory();
    undo.roll_back(&mut mem, tr);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::procfs::{MapPath, Perms};
    use upstare_dwarf::FileOffset;

    fn map(start: u64, end: u64, write: bool) -> MemoryMap {
        MemoryMap {
            start: RuntimeAddr(start),
            end: RuntimeAddr(end),
            perms: Perms {
                read: true,
                write,
                exec: false,
                shared: false,
            },
            offset: FileOffset(0),
            dev_major: 0,
            dev_minor: 0,
            inode: 0,
            path: MapPath::Anonymous,
            deleted: false,
        }
    }

    #[test]
    fn writes_may_span_adjacent_writable_mappings() {
        // .rodata, .data (file page), .bss (anonymous), a gap, more memory.
        let maps = [
            map(0x1000, 0x2000, false),
            map(0x2000, 0x3000, true),
            map(0x3000, 0x5000, true),
            map(0x6000, 0x7000, true),
        ];
        let w = |a: u64, n: usize| writable(&maps, RuntimeAddr(a), n);
        assert!(w(0x2460, 10000)); // a .bss array across the page boundary
        assert!(w(0x2000, 0x3000));
        assert!(w(0x4ff8, 8));
        assert!(w(0x2000, 0));
        assert!(!w(0x1ff8, 16)); // starts in read-only data
        assert!(!w(0x4ff8, 16)); // runs into the gap
        assert!(!w(0x5000, 1));
        assert!(!w(u64::MAX - 3, 8));
    }
}
