//! The ELF objects a process has mapped (its executable, libc, the dynamic
//! linker, the vDSO, retired images of earlier versions): one registry for
//! the unwinder and the stopper (CFI and names of library frames) and for
//! the loader (imports resolved in the dynamic linker's `link_map` order).
//!
//! Each object's bytes are read at most once, on first use, and cached with
//! what is derived from them. Files are read through
//! `/proc/PID/map_files/` when possible, so that a file replaced or deleted
//! on disk since it was mapped is still read as the process sees it;
//! otherwise through the path, after checking that its inode is still the
//! mapped one. The program the process was started from is read through
//! `/proc/PID/exe`, which always names the mapped file.

use super::elf::{self, page_down, page_up, ElfFile, ElfSummary, Segment};
use super::LoadError;
use crate::memory::{MemError, TargetMemory};
use crate::target::procfs::{self, MapPath, MemoryMap, ProcError, PAGE_SIZE};
use crate::target::ProcessMemory;
use nix::unistd::Pid;
use object::elf as E;
use std::cell::OnceCell;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use upstare_dwarf::{CfiError, EhFrameIndex, LinkAddr, LoadBias, RuntimeAddr};

/// Largest vDSO image read from the target.
const MAX_VDSO_SIZE: u64 = 1 << 20;
/// Bound on the dynamic linker's list of loaded objects.
const MAX_LINK_MAP: usize = 4096;
/// Bound on a path read from the target.
const MAX_NAME: usize = 4096;
/// Offsets in glibc's `struct link_map` / `struct r_debug` (x86-64, stable ABI).
const R_DEBUG_MAP: u64 = 8;
const LM_ADDR: u64 = 0;
const LM_NAME: u64 = 8;
const LM_NEXT: u64 = 24;

/// Why a library's bytes, CFI or symbols could not be read.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{name}: {reason}")]
pub struct LibraryError {
    pub name: String,
    pub reason: String,
}

/// Why the file behind a mapping could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} changed on disk since process {pid} mapped it (inode {mapped} mapped, {on_disk} on disk) and /proc/{pid}/map_files is not readable")]
    Replaced {
        pid: i32,
        path: PathBuf,
        mapped: u64,
        on_disk: u64,
    },
}

/// Whether two mappings are of the same file.
pub(super) fn same_file(a: &MemoryMap, b: &MemoryMap) -> bool {
    a.path == b.path
        && a.inode == b.inode
        && a.dev_major == b.dev_major
        && a.dev_minor == b.dev_minor
}

/// Open the file behind mapping `m` of process `pid`: through
/// `/proc/PID/map_files/` (exactly the mapped file, even if replaced on
/// disk), else through its path if the inode still matches.
pub(super) fn open_mapped(pid: Pid, m: &MemoryMap) -> Result<(File, PathBuf), OpenError> {
    let path = m.file().map(Path::to_path_buf).unwrap_or_default();
    let mf = PathBuf::from(format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        m.start.0, m.end.0
    ));
    if let Ok(f) = File::open(&mf) {
        return Ok((f, path));
    }
    let read = |source| OpenError::Read {
        path: path.clone(),
        source,
    };
    let f = File::open(&path).map_err(read)?;
    let meta = f.metadata().map_err(read)?;
    if m.deleted || meta.ino() != m.inode {
        return Err(OpenError::Replaced {
            pid: pid.as_raw(),
            path,
            mapped: m.inode,
            on_disk: meta.ino(),
        });
    }
    Ok((f, path))
}

/// The load biases mapping `m` of a file with `segs` is consistent with:
/// the byte at file offset `o` of segment `s` is at link address `s.vaddr +
/// (o - s.offset)`, and the mapping puts file offset `m.offset` at
/// `m.start`. Two segments can share a page of the file (the last page of
/// rodata is also the first of the RELRO data), so there may be several;
/// segments whose execute permission matches the mapping's come first.
pub(super) fn biases_of_mapping(segs: &[Segment], m: &MemoryMap) -> Vec<LoadBias> {
    let off = m.offset.0;
    let covers = |s: &&Segment| {
        s.filesz > 0 && page_down(s.offset) <= off && off < s.offset.saturating_add(s.filesz)
    };
    let bias = |s: &Segment| {
        let link_of_start = s.vaddr.wrapping_add(off).wrapping_sub(s.offset);
        LoadBias(m.start.0.wrapping_sub(link_of_start))
    };
    let matching = segs
        .iter()
        .filter(covers)
        .filter(|s| s.exec() == m.perms.exec);
    let other = segs
        .iter()
        .filter(covers)
        .filter(|s| s.exec() != m.perms.exec);
    matching.chain(other).map(bias).collect()
}

/// First executable mapping of every distinct file, in address order.
pub(super) fn exec_files(maps: &[MemoryMap]) -> Vec<&MemoryMap> {
    let mut out: Vec<&MemoryMap> = Vec::new();
    for m in maps.iter().filter(|m| m.perms.exec && m.file().is_some()) {
        if !out.iter().any(|o| same_file(o, m)) {
            out.push(m);
        }
    }
    out
}

/// One mapping per file that has no executable mapping at all: candidates
/// for retired images (an earlier version, made non-executable by an
/// update), whose CFI still describes the outermost frames (`_start`).
fn non_exec_files(maps: &[MemoryMap]) -> Vec<&MemoryMap> {
    let mut out: Vec<&MemoryMap> = Vec::new();
    for m in maps.iter().filter(|m| m.file().is_some()) {
        let has_exec = maps.iter().any(|o| o.perms.exec && same_file(o, m));
        if !has_exec && !out.iter().any(|o| same_file(o, m)) {
            out.push(m);
        }
    }
    out
}

/// `path` without the ` (deleted)` the kernel appends to a replaced file.
pub(super) fn strip_deleted(path: PathBuf) -> PathBuf {
    match path.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
        Some(p) => PathBuf::from(p),
        None => path,
    }
}

/// A symbol definition in a loaded object's `.dynsym`.
#[derive(Clone, Debug)]
struct Def {
    value: u64,
    size: u64,
    kind: u8,
    version: Option<String>,
    hidden: bool,
}

/// Whether definition `d` satisfies a reference to version `want`, as
/// `ld.so`'s `check_match` decides.
fn version_ok(d: &Def, want: Option<&str>) -> bool {
    match want {
        Some(v) => d.version.as_deref() == Some(v) || (d.version.is_none() && !d.hidden),
        None => !d.hidden,
    }
}

/// What an object offers to the dynamic linker's symbol search, with the
/// summary of the file it was parsed from.
#[derive(Debug, Default)]
struct Exports {
    summary: ElfSummary,
    defs: HashMap<String, Vec<Def>>,
}

impl Exports {
    fn of(file: &ElfFile) -> Exports {
        let mut defs: HashMap<String, Vec<Def>> = HashMap::new();
        for s in &file.dynsyms {
            let global = s.bind == E::STB_GLOBAL.0
                || s.bind == E::STB_WEAK.0
                || s.bind == E::STB_GNU_UNIQUE.0;
            if !s.defined || !global {
                continue;
            }
            defs.entry(s.name.clone()).or_default().push(Def {
                value: s.value,
                size: s.size,
                kind: s.kind,
                version: s.version.clone(),
                hidden: s.hidden,
            });
        }
        Exports {
            summary: file.summary.clone(),
            defs,
        }
    }

    fn find(&self, name: &str, version: Option<&str>) -> Option<&Def> {
        let defs = self.defs.get(name)?;
        // An exact version, else an acceptable one (unversioned first).
        defs.iter()
            .find(|d| version.is_some() && d.version.as_deref() == version)
            .or_else(|| {
                defs.iter()
                    .find(|d| d.version.is_none() && version_ok(d, version))
            })
            .or_else(|| defs.iter().find(|d| version_ok(d, version)))
    }
}

/// Where a library's bytes come from.
#[derive(Clone, Debug)]
enum Source {
    /// A file mapping (read through this mapping's map_files entry or path).
    File(MemoryMap),
    /// The program the process was started from (`/proc/PID/exe`).
    Exe,
    /// The vDSO, read from the target at construction.
    Bytes(Vec<u8>),
}

/// One mapped ELF object (the image's own file is one too, for the CFI of
/// its PLT and `_start`).
pub struct Library {
    name: String,
    path: Option<PathBuf>,
    pid: Pid,
    bias: LoadBias,
    /// Executable ranges.
    code: Vec<Range<RuntimeAddr>>,
    /// The program the process was started from.
    is_main: bool,
    source: Source,
    bytes: OnceCell<Result<Vec<u8>, LibraryError>>,
    index: OnceCell<Result<EhFrameIndex, LibraryError>>,
    symbols: OnceCell<Vec<elf::FunctionSymbol>>,
    exports: OnceCell<Result<Exports, LibraryError>>,
}

impl fmt::Debug for Library {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Library")
            .field("name", &self.name)
            .field("bias", &format_args!("{:#x}", self.bias.0))
            .field("code", &self.code)
            .finish()
    }
}

impl Library {
    fn new(
        pid: Pid,
        path: Option<PathBuf>,
        bias: LoadBias,
        code: Vec<Range<RuntimeAddr>>,
        source: Source,
    ) -> Library {
        Library {
            name: path
                .as_ref()
                .map_or_else(|| "[vdso]".to_string(), |p| p.display().to_string()),
            path,
            pid,
            bias,
            code,
            is_main: matches!(source, Source::Exe),
            source,
            bytes: OnceCell::new(),
            index: OnceCell::new(),
            symbols: OnceCell::new(),
            exports: OnceCell::new(),
        }
    }

    /// Name for messages: the file path, or `[vdso]`.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The mapped file, `None` for the vDSO.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    /// Runtime = link-time + bias.
    pub fn bias(&self) -> LoadBias {
        self.bias
    }
    /// Whether this is the program the process was started from (after
    /// updates, still the first version).
    pub fn is_main(&self) -> bool {
        self.is_main
    }
    /// Whether `pc` is code of this library.
    pub fn contains(&self, pc: RuntimeAddr) -> bool {
        self.code.iter().any(|r| r.contains(&pc))
    }

    fn error(&self, reason: impl fmt::Display) -> LibraryError {
        LibraryError {
            name: self.name.clone(),
            reason: reason.to_string(),
        }
    }

    /// The object's bytes, read on first use (bounded by
    /// [`elf::MAX_ELF_SIZE`]) and cached.
    pub fn bytes(&self) -> Result<&[u8], LibraryError> {
        self.bytes
            .get_or_init(|| match &self.source {
                Source::Bytes(b) => Ok(b.clone()),
                Source::Exe => {
                    let exe = PathBuf::from(format!("/proc/{}/exe", self.pid));
                    elf::read_file(&exe).map_err(|e| self.error(e))
                }
                Source::File(m) => {
                    let (f, path) = open_mapped(self.pid, m).map_err(|e| self.error(e))?;
                    elf::read_bounded(f, &path).map_err(|e| self.error(e))
                }
            })
            .as_ref()
            .map(Vec::as_slice)
            .map_err(Clone::clone)
    }

    /// Reads and caches now what unwinding through the library needs (its
    /// `.eh_frame` index and its function symbols, which name its frames),
    /// so that a later unwind does not; errors are met again there.
    pub fn warm(&self) {
        let _ = self.eh_frame();
        let _ = self.symbol_at(LinkAddr(0));
    }

    /// The library's `.eh_frame` index, read on first use and cached.
    pub fn eh_frame(&self) -> Result<&EhFrameIndex, LibraryError> {
        self.index
            .get_or_init(|| {
                EhFrameIndex::from_elf(self.bytes()?).map_err(|e: CfiError| self.error(e))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The function symbol (from `.symtab` or `.dynsym`) containing
    /// link-time address `pc`, with the offset of `pc` in it. Symbols are
    /// read on first use; `None` when unreadable or not found.
    pub fn symbol_at(&self, pc: LinkAddr) -> Option<(&str, u64)> {
        let syms = self.symbols.get_or_init(|| {
            self.bytes()
                .ok()
                .and_then(|b| elf::function_symbols(Path::new(&self.name), b).ok())
                .unwrap_or_default()
        });
        let i = syms.partition_point(|s| s.addr <= pc.0).checked_sub(1)?;
        // Several symbols may share an address; any of them that covers pc.
        let mut best: Option<&elf::FunctionSymbol> = None;
        for s in syms[..=i]
            .iter()
            .rev()
            .take_while(|s| s.addr == syms[i].addr)
        {
            if s.size == 0 || pc.0 < s.addr.saturating_add(s.size) {
                // Prefer the public name (no leading underscore).
                if best.is_none_or(|b| b.name.starts_with('_') && !s.name.starts_with('_')) {
                    best = Some(s);
                }
            }
        }
        best.map(|s| (s.name.as_str(), pc.0 - s.addr))
    }

    /// Runtime address of the function `name` this object defines (its
    /// default version), if any.
    pub fn function_addr(&self, name: &str) -> Option<RuntimeAddr> {
        let d = self.exports().ok()?.find(name, None)?;
        (d.kind == E::STT_FUNC.0).then(|| RuntimeAddr(d.value.wrapping_add(self.bias().0)))
    }

    /// Its `DT_SONAME` and exported definitions, parsed on first use.
    fn exports(&self) -> Result<&Exports, LibraryError> {
        self.exports
            .get_or_init(|| {
                let file = ElfFile::parse(Path::new(&self.name), self.bytes()?)
                    .map_err(|e| self.error(e))?;
                Ok(Exports::of(&file))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Its `DT_SONAME`, if it has one and it is readable.
    pub fn soname(&self) -> Option<&str> {
        self.exports().ok()?.summary.soname.as_deref()
    }
}

/// Where an imported symbol was found.
#[derive(Clone, Copy, Debug)]
pub struct Resolved<'a> {
    pub library: &'a Library,
    /// Runtime address of the definition (for an IFUNC: of its resolver).
    pub addr: RuntimeAddr,
    pub size: u64,
    pub ifunc: bool,
    pub tls: bool,
}

/// Every ELF object mapped in a process, with its bias; bytes, CFI and
/// symbols are read lazily and cached. Read with [`Libraries::read`], it
/// also knows the dynamic linker's search order.
#[derive(Debug, Default)]
pub struct Libraries {
    pid: Option<Pid>,
    libs: Vec<Library>,
    /// The dynamic linker's `link_map` list: index into `libs` and `l_addr`.
    search: Vec<(usize, LoadBias)>,
}

impl Libraries {
    /// No library at all (for unwinding tests on a byte buffer).
    pub fn empty() -> Libraries {
        Libraries::default()
    }

    /// The objects mapped executable in process `pid` per `maps` (and
    /// retired images). Files that cannot be parsed are skipped; the vDSO
    /// is read from the target (skipped if unreadable).
    pub fn new(pid: Pid, maps: &[MemoryMap]) -> Libraries {
        let mut libs = Libraries {
            pid: Some(pid),
            ..Libraries::default()
        };
        libs.add_new(pid, maps);
        libs
    }

    /// The objects process `pid` has mapped (see [`Libraries::new`]) and
    /// the dynamic linker's search order over them: its `r_debug`/`link_map`
    /// list, found through `_r_debug` of the interpreter at `AT_BASE`. Every
    /// object in that list is parsed now, so that one that cannot be read
    /// is an error here rather than a symbol missing later.
    pub fn read(pid: Pid) -> Result<Libraries, LoadError> {
        let maps = procfs::read_maps(pid)?;
        Self::read_with_maps(pid, &maps)
    }

    /// [`Libraries::read`] with the process's `/proc/PID/maps` already read.
    pub fn read_with_maps(pid: Pid, maps: &[MemoryMap]) -> Result<Libraries, LoadError> {
        let mut libs = Libraries::new(pid, maps);
        libs.search = libs.read_link_map(pid, maps)?;
        for &(i, _) in &libs.search {
            let lib = &libs.libs[i];
            lib.exports().map_err(|e| LoadError::LibraryChanged {
                pid: pid.as_raw(),
                path: lib.path.clone().unwrap_or_default(),
                reason: e.reason,
            })?;
        }
        Ok(libs)
    }

    /// Re-read the maps of `pid` and add objects mapped since (dlopen).
    pub fn refresh(&mut self, pid: Pid) -> Result<(), ProcError> {
        let maps = procfs::read_maps(pid)?;
        self.refresh_with(pid, &maps);
        Ok(())
    }

    /// [`Libraries::refresh`] with the process's maps already read.
    pub fn refresh_with(&mut self, pid: Pid, maps: &[MemoryMap]) {
        self.add_new(pid, maps);
    }

    /// The process these are the objects of; `None` for [`Libraries::empty`].
    pub fn pid(&self) -> Option<Pid> {
        self.pid
    }

    /// The library whose code contains `pc`, with `pc` as a link-time
    /// address of that library.
    pub fn lookup(&self, pc: RuntimeAddr) -> Option<(&Library, LinkAddr)> {
        self.libs
            .iter()
            .find(|l| l.contains(pc))
            .map(|l| (l, pc.to_link(l.bias)))
    }

    /// Every object, in discovery order.
    pub fn iter(&self) -> impl Iterator<Item = &Library> {
        self.libs.iter()
    }

    /// The objects in the dynamic linker's search order (empty unless read
    /// with [`Libraries::read`]); the first is the main program.
    pub fn search_order(&self) -> impl Iterator<Item = &Library> {
        self.search.iter().map(|&(i, _)| &self.libs[i])
    }

    /// Whether an object in the search order answers to `DT_NEEDED` name
    /// `needed` (its soname or file name).
    pub fn has_library(&self, needed: &str) -> bool {
        self.search_order().any(|l| {
            l.soname() == Some(needed)
                || l.path().and_then(Path::file_name).and_then(|f| f.to_str()) == Some(needed)
        })
    }

    /// Find `name` (with version `version`) as the dynamic linker would in
    /// the global scope. The main program only provides data (its functions
    /// are the old version's code).
    pub fn lookup_symbol(&self, name: &str, version: Option<&str>) -> Option<Resolved<'_>> {
        self.search.iter().find_map(|&(i, l_addr)| {
            let lib = &self.libs[i];
            let d = lib.exports().ok()?.find(name, version)?;
            if lib.is_main && d.kind != E::STT_OBJECT.0 && d.kind != E::STT_COMMON.0 {
                return None;
            }
            Some(Resolved {
                library: lib,
                addr: RuntimeAddr(d.value.wrapping_add(l_addr.0)),
                size: d.size,
                ifunc: d.kind == E::STT_GNU_IFUNC.0,
                tls: d.kind == E::STT_TLS.0,
            })
        })
    }

    /// The file `/proc/PID/exe` names: its path and inode.
    fn exe_of(pid: Pid) -> Option<(PathBuf, u64)> {
        let path = procfs::exe_path(pid).map(strip_deleted).ok()?;
        let ino = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?.ino();
        Some((path, ino))
    }

    /// How to read the file behind `m`: through `/proc/PID/exe` when it is
    /// the program the process was started from (`exe`).
    fn source_of(exe: Option<&(PathBuf, u64)>, m: &MemoryMap) -> Source {
        match exe {
            Some((path, ino)) if m.file() == Some(path.as_path()) && m.inode == *ino => Source::Exe,
            _ => Source::File(m.clone()),
        }
    }

    fn add_new(&mut self, pid: Pid, maps: &[MemoryMap]) {
        let exe = Self::exe_of(pid);
        self.add_retired(pid, maps, exe.as_ref());
        for m in exec_files(maps) {
            if self.libs.iter().any(|l| l.contains(m.start)) {
                continue;
            }
            let Ok((f, path)) = open_mapped(pid, m) else {
                continue;
            };
            let cache = object::ReadCache::new(f);
            let Ok(sum) = ElfSummary::parse(&path, &cache) else {
                continue;
            };
            let Some(&bias) = biases_of_mapping(&sum.loads, m).first() else {
                continue;
            };
            let code = maps
                .iter()
                .filter(|o| o.perms.exec && same_file(o, m))
                .map(|o| o.start..o.end)
                .collect();
            let source = Self::source_of(exe.as_ref(), m);
            self.libs
                .push(Library::new(pid, Some(path), bias, code, source));
        }
        let vdso = maps
            .iter()
            .find(|m| m.path == MapPath::Pseudo("[vdso]".into()) && m.perms.exec);
        if let Some(m) = vdso {
            if !self.libs.iter().any(|l| l.contains(m.start)) {
                if let Some(lib) = vdso_library(pid, m) {
                    self.libs.push(lib);
                }
            }
        }
    }

    /// Retired images: their mappings of executable segments count as code
    /// for unwinding (the chain below `main` passes through the first
    /// version's `_start`), although they are no longer executable.
    fn add_retired(&mut self, pid: Pid, maps: &[MemoryMap], exe: Option<&(PathBuf, u64)>) {
        for m in non_exec_files(maps) {
            if self.libs.iter().any(|l| l.path.as_deref() == m.file()) {
                continue;
            }
            let Ok((f, path)) = open_mapped(pid, m) else {
                continue;
            };
            let cache = object::ReadCache::new(f);
            let Ok(sum) = ElfSummary::parse(&path, &cache) else {
                continue;
            };
            let mine: Vec<&MemoryMap> = maps.iter().filter(|o| same_file(o, m)).collect();
            // Making the text read-only merges it with the read-only mapping
            // before it, so look for mappings that cover an executable
            // segment's pages rather than start at them.
            let mut code = Vec::new();
            let mut code_map = None;
            for s in sum.loads.iter().filter(|s| s.exec()) {
                let off = page_down(s.offset);
                let Some(o) = mine
                    .iter()
                    .find(|o| o.offset.0 <= off && off - o.offset.0 < o.len())
                else {
                    continue;
                };
                let start = o.start.0 + (off - o.offset.0);
                let len = page_up(s.filesz.saturating_add(s.offset - off)).unwrap_or(0);
                code.push(RuntimeAddr(start)..RuntimeAddr(start.saturating_add(len).min(o.end.0)));
                code_map.get_or_insert(*o);
            }
            // An update may have unmapped the code of a retired image and
            // kept only its headers and data (`retire.rs`): the first
            // mapping left then places it (the dynamic linker still lists
            // the main program).
            let Some(code_map) = code_map.or_else(|| mine.first().copied()) else {
                continue;
            };
            let Some(&bias) = biases_of_mapping(&sum.loads, code_map).first() else {
                continue;
            };
            let source = Self::source_of(exe, code_map);
            self.libs
                .push(Library::new(pid, Some(path), bias, code, source));
        }
    }

    /// The dynamic linker's `link_map` list as indices into `self.libs`
    /// with each object's `l_addr`. Objects without a file (the vDSO) are
    /// left out.
    fn read_link_map(
        &self,
        pid: Pid,
        maps: &[MemoryMap],
    ) -> Result<Vec<(usize, LoadBias)>, LoadError> {
        let lm_err = |reason: String| LoadError::LinkMap {
            pid: pid.as_raw(),
            reason,
        };
        let auxv = procfs::read_auxv(pid)?;
        let at_base = procfs::auxv_value(&auxv, procfs::AT_BASE)?;
        if at_base == 0 {
            return Err(lm_err("no dynamic linker (statically linked?)".into()));
        }
        let ldso = maps
            .iter()
            .find(|m| m.start.0 == at_base)
            .and_then(|m| m.file().map(Path::to_path_buf))
            .ok_or_else(|| lm_err(format!("no file mapped at AT_BASE {at_base:#x}")))?;
        let ld = self
            .by_path(pid, &ldso)?
            .exports()
            .map_err(|e| changed(pid, &ldso, e.reason))?;
        let ld_first = ld
            .summary
            .loads
            .iter()
            .map(|s| s.vaddr)
            .min()
            .ok_or_else(|| lm_err(format!("{} has no PT_LOAD", ldso.display())))?;
        let ld_bias = at_base.wrapping_sub(page_down(ld_first));
        let r_debug = ld
            .defs
            .get("_r_debug")
            .and_then(|d| d.first())
            .map(|d| d.value.wrapping_add(ld_bias))
            .ok_or_else(|| lm_err(format!("{} exports no _r_debug", ldso.display())))?;
        let mem = ProcessMemory::open(pid);
        let mut lm = mem.read_u64(RuntimeAddr(r_debug.wrapping_add(R_DEBUG_MAP)))?;
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
        let mut out = Vec::new();
        let mut first = true;
        for _ in 0..MAX_LINK_MAP {
            if lm == 0 {
                break;
            }
            let l_addr = mem.read_u64(RuntimeAddr(lm.wrapping_add(LM_ADDR)))?;
            let name_ptr = mem.read_u64(RuntimeAddr(lm.wrapping_add(LM_NAME)))?;
            let next = mem.read_u64(RuntimeAddr(lm.wrapping_add(LM_NEXT)))?;
            let name = if name_ptr == 0 {
                Vec::new()
            } else {
                read_cstr(&mem, name_ptr)?
            };
            let is_main = first;
            first = false;
            lm = next;
            if is_main {
                let i = self.libs.iter().position(|l| l.is_main).ok_or_else(|| {
                    let exe = procfs::exe_path(pid).map(strip_deleted).unwrap_or_default();
                    changed(pid, &exe, "not in /proc/PID/maps".into())
                })?;
                out.push((i, LoadBias(l_addr)));
                continue;
            }
            let path = if name.starts_with(b"/") {
                PathBuf::from(String::from_utf8_lossy(&name).into_owned())
            } else if !name.is_empty() && cwd.is_some() && name.contains(&b'/') {
                // Relative to the process's working directory.
                cwd.as_ref()
                    .map(|c| c.join(String::from_utf8_lossy(&name).into_owned()))
                    .unwrap_or_default()
            } else {
                // The vDSO (no file).
                continue;
            };
            let canon = std::fs::canonicalize(&path).unwrap_or(path);
            let i = self.index_of(pid, &canon)?;
            out.push((i, LoadBias(l_addr)));
        }
        if lm != 0 {
            return Err(lm_err(format!("more than {MAX_LINK_MAP} loaded objects")));
        }
        Ok(out)
    }

    fn index_of(&self, pid: Pid, path: &Path) -> Result<usize, LoadError> {
        self.libs
            .iter()
            .position(|l| l.path() == Some(path))
            .ok_or_else(|| changed(pid, path, "not in /proc/PID/maps".into()))
    }

    fn by_path(&self, pid: Pid, path: &Path) -> Result<&Library, LoadError> {
        Ok(&self.libs[self.index_of(pid, path)?])
    }
}

fn changed(pid: Pid, path: &Path, reason: String) -> LoadError {
    LoadError::LibraryChanged {
        pid: pid.as_raw(),
        path: path.to_path_buf(),
        reason,
    }
}

/// Read a NUL-terminated string of at most `MAX_NAME` bytes.
fn read_cstr(mem: &impl TargetMemory, addr: u64) -> Result<Vec<u8>, MemError> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 256];
    while out.len() < MAX_NAME {
        let at = RuntimeAddr(addr.wrapping_add(out.len() as u64));
        // Stay within the page so that a short string at a page end reads.
        let room = (PAGE_SIZE - (at.0 % PAGE_SIZE)).min(chunk.len() as u64) as usize;
        mem.read(at, &mut chunk[..room])?;
        if let Some(n) = chunk[..room].iter().position(|&b| b == 0) {
            out.extend_from_slice(&chunk[..n]);
            return Ok(out);
        }
        out.extend_from_slice(&chunk[..room]);
    }
    Ok(out)
}

fn vdso_library(pid: Pid, m: &MemoryMap) -> Option<Library> {
    if m.len() > MAX_VDSO_SIZE {
        return None;
    }
    let bytes = ProcessMemory::open(pid)
        .read_vec(m.start, m.len(), MAX_VDSO_SIZE as usize)
        .ok()?;
    let sum = ElfSummary::parse(Path::new("[vdso]"), &*bytes).ok()?;
    let bias = *biases_of_mapping(&sum.loads, m).first()?;
    Some(Library::new(
        pid,
        None,
        bias,
        vec![m.start..m.end],
        Source::Bytes(bytes),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(start: u64, end: u64, perms: &str, offset: u64, path: &str) -> MemoryMap {
        let line = format!("{start:x}-{end:x} {perms} {offset:08x} 08:01 77 {path}\n");
        procfs::parse_maps(&line).unwrap().remove(0)
    }

    fn seg(offset: u64, vaddr: u64, filesz: u64, exec: bool) -> Segment {
        Segment {
            offset,
            vaddr,
            filesz,
            memsz: filesz,
            flags: if exec {
                E::PF_R.0 | E::PF_X.0
            } else {
                E::PF_R.0
            },
        }
    }

    #[test]
    fn bias_pie_and_non_pie() {
        // gcc PIE layout: r-- at 0, r-x at 0x1000, r-- at 0x2000, rw- at 0x3db8.
        let segs = [
            seg(0, 0, 0x628, false),
            seg(0x1000, 0x1000, 0x1a5, true),
            seg(0x2000, 0x2000, 0xf4, false),
            seg(0x2db8, 0x3db8, 0x258, false),
        ];
        let text = map(0x5555_5555_5000, 0x5555_5555_6000, "r-xp", 0x1000, "/x");
        assert_eq!(
            biases_of_mapping(&segs, &text).first(),
            Some(&LoadBias(0x5555_5555_4000))
        );
        // The data mapping starts at page_down(0x3db8) for file page 0x2000.
        let data = map(0x5555_5555_7000, 0x5555_5555_8000, "r--p", 0x2000, "/x");
        let b = biases_of_mapping(&segs, &data);
        assert_eq!(b.len(), 2, "file page 0x2000 holds rodata and data: {b:?}");
        assert!(b.contains(&LoadBias(0x5555_5555_4000)));
        // Non-PIE: link addresses from 0x400000, bias 0.
        let segs = [
            seg(0, 0x400000, 0x5f0, false),
            seg(0x1000, 0x401000, 0x1a5, true),
        ];
        let text = map(0x401000, 0x402000, "r-xp", 0x1000, "/x");
        assert_eq!(biases_of_mapping(&segs, &text).first(), Some(&LoadBias(0)));
        // An offset no segment covers.
        let odd = map(0x900000, 0x901000, "r-xp", 0x9000, "/x");
        assert!(biases_of_mapping(&segs, &odd).is_empty());
    }

    #[test]
    fn own_libraries_have_cfi_and_symbols() {
        let me = Pid::this();
        let maps = procfs::read_maps(me).unwrap();
        let libs = Libraries::new(me, &maps);
        // This test binary's own code is a library to them.
        let f = own_libraries_have_cfi_and_symbols as fn() as usize as u64;
        let (lib, link) = libs.lookup(RuntimeAddr(f)).expect("own code mapped");
        assert!(lib.eh_frame().unwrap().unwind_row(link).unwrap().is_some());
        assert!(lib.is_main(), "the test binary is the process's program");
        // A libc function: found with its public name at offset 0.
        let getpid = nix::libc::getpid as *const () as usize as u64;
        let (libc, link) = libs.lookup(RuntimeAddr(getpid)).expect("libc mapped");
        assert!(libc.name().contains("libc"), "{}", libc.name());
        assert!(!libc.is_main());
        let (name, off) = libc.symbol_at(link).expect("symbol of getpid");
        assert_eq!((name, off), ("getpid", 0));
        assert_eq!(libc.soname(), Some("libc.so.6"));
        // Not read with the link_map: no search order.
        assert_eq!(libs.search_order().count(), 0);
    }

    #[test]
    fn own_search_order_resolves_like_the_dynamic_linker() {
        let me = Pid::this();
        let libs = Libraries::read(me).expect("read own libraries");
        let first = libs.search_order().next().expect("main program");
        assert!(first.is_main());
        assert!(libs.has_library("libc.so.6"));
        let getpid = nix::libc::getpid as *const () as usize as u64;
        let r = libs.lookup_symbol("getpid", None).expect("getpid");
        assert_eq!(r.addr.0, getpid);
        assert!(r.library.name().contains("libc"));
        assert!(libs
            .lookup_symbol("no_such_symbol_anywhere", None)
            .is_none());
    }
}
