//! Finding the instrumented image in a running process, and the other ELF
//! objects it has mapped (libc, the dynamic linker, the vDSO), whose CFI the
//! unwinder needs to get through library frames.
//!
//! Files are read through `/proc/PID/map_files/` when possible, so that a
//! file replaced or deleted on disk since it was mapped is still read as the
//! process sees it; otherwise through the path, after checking that its inode
//! is still the mapped one.

use crate::engine::state::Image;
use crate::memory::TargetMemory;
use crate::target::procfs::{self, MapPath, MemoryMap, ProcError, PAGE_SIZE};
use crate::target::ProcessMemory;
use nix::unistd::Pid;
use object::read::elf::{FileHeader, ProgramHeader};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
use std::cell::OnceCell;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use upstare_dwarf::fdt::{self, FrameTables};
use upstare_dwarf::{CfiError, EhFrameIndex, FileOffset, LinkAddr, LoadBias, RuntimeAddr};

/// Largest ELF file read whole (libraries, for their CFI and symbols).
pub const MAX_ELF_SIZE: u64 = 1 << 30;
/// Largest vDSO image read from the target.
const MAX_VDSO_SIZE: u64 = 1 << 20;
/// Upper bound on the segments of one ELF file.
const MAX_SEGMENTS: usize = 1 << 12;

/// Why the running image could not be found or read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is larger than {cap} bytes")]
    TooLarge { path: PathBuf, cap: u64 },
    #[error("{path} changed on disk since process {pid} mapped it (inode {mapped} mapped, {on_disk} on disk) and /proc/{pid}/map_files is not readable")]
    Replaced {
        pid: i32,
        path: PathBuf,
        mapped: u64,
        on_disk: u64,
    },
    #[error("{path}: not a readable ELF file: {reason}")]
    NotElf { path: PathBuf, reason: String },
    #[error(
        "process {pid} runs {exe} which has no .upstare section: instrument it with upstare-rewrite"
    )]
    NoImage { pid: i32, exe: PathBuf },
    #[error("process {pid} has {} executable mappings of files with a .upstare section ({}): expected exactly one", paths.len(), list_paths(paths))]
    Ambiguous { pid: i32, paths: Vec<PathBuf> },
    #[error("{path}: {reason}")]
    Tables { path: PathBuf, reason: String },
    #[error("{path}: the mapping at {start} (file offset {offset}) lies in no PT_LOAD segment")]
    NoSegment {
        path: PathBuf,
        start: RuntimeAddr,
        offset: FileOffset,
    },
    #[error("{path}: inconsistent load bias: {detail}")]
    Bias { path: PathBuf, detail: String },
}

fn list_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One `PT_LOAD` program header.
#[derive(Clone, Copy, Debug)]
struct Segment {
    offset: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
    exec: bool,
}

fn page_down(x: u64) -> u64 {
    x & !(PAGE_SIZE - 1)
}

fn page_up(x: u64) -> Option<u64> {
    x.checked_add(PAGE_SIZE - 1).map(page_down)
}

fn segments<'d, R: object::ReadRef<'d>>(path: &Path, data: R) -> Result<Vec<Segment>, ImageError> {
    let not_elf = |reason: String| ImageError::NotElf {
        path: path.to_path_buf(),
        reason,
    };
    let hdr = object::elf::FileHeader64::<object::Endianness>::parse(data)
        .map_err(|e| not_elf(e.to_string()))?;
    let endian = hdr.endian().map_err(|e| not_elf(e.to_string()))?;
    let phdrs = hdr
        .program_headers(endian, data)
        .map_err(|e| not_elf(e.to_string()))?;
    if phdrs.len() > MAX_SEGMENTS {
        return Err(not_elf(format!("{} program headers", phdrs.len())));
    }
    Ok(phdrs
        .iter()
        .filter(|p| p.p_type(endian) == object::elf::PT_LOAD)
        .map(|p| Segment {
            offset: p.p_offset(endian),
            vaddr: p.p_vaddr(endian),
            filesz: p.p_filesz(endian),
            memsz: p.p_memsz(endian),
            exec: p.p_flags(endian).0 & object::elf::PF_X.0 != 0,
        })
        .collect())
}

/// The load biases mapping `m` of a file with `segs` is consistent with:
/// the byte at file offset `o` of segment `s` is at link address `s.vaddr +
/// (o - s.offset)`, and the mapping puts file offset `m.offset` at
/// `m.start`. Two segments can share a page of the file (the last page of
/// rodata is also the first of the RELRO data), so there may be several;
/// segments whose execute permission matches the mapping's come first.
fn biases_of_mapping(segs: &[Segment], m: &MemoryMap) -> Vec<LoadBias> {
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
        .filter(|s| s.exec == m.perms.exec);
    let other = segs
        .iter()
        .filter(covers)
        .filter(|s| s.exec != m.perms.exec);
    matching.chain(other).map(bias).collect()
}

/// The load bias given by mapping `m` (an executable mapping: one segment
/// only is executable at any file page in practice).
fn bias_of_mapping(path: &Path, segs: &[Segment], m: &MemoryMap) -> Result<LoadBias, ImageError> {
    biases_of_mapping(segs, m)
        .first()
        .copied()
        .ok_or_else(|| ImageError::NoSegment {
            path: path.to_path_buf(),
            start: m.start,
            offset: m.offset,
        })
}

/// Whether two mappings are of the same file.
fn same_file(a: &MemoryMap, b: &MemoryMap) -> bool {
    a.path == b.path
        && a.inode == b.inode
        && a.dev_major == b.dev_major
        && a.dev_minor == b.dev_minor
}

/// Open the file behind mapping `m` of process `pid`: through
/// `/proc/PID/map_files/` (exactly the mapped file, even if replaced on
/// disk), else through its path if the inode still matches.
fn open_mapped(pid: Pid, m: &MemoryMap) -> Result<(File, PathBuf), ImageError> {
    let path = m.file().map(Path::to_path_buf).unwrap_or_default();
    let mf = PathBuf::from(format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        m.start.0, m.end.0
    ));
    if let Ok(f) = File::open(&mf) {
        return Ok((f, path));
    }
    let f = File::open(&path).map_err(|source| ImageError::Read {
        path: path.clone(),
        source,
    })?;
    let meta = f.metadata().map_err(|source| ImageError::Read {
        path: path.clone(),
        source,
    })?;
    if m.deleted || meta.ino() != m.inode {
        return Err(ImageError::Replaced {
            pid: pid.as_raw(),
            path,
            mapped: m.inode,
            on_disk: meta.ino(),
        });
    }
    Ok((f, path))
}

fn read_capped(f: File, path: &Path) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    f.take(MAX_ELF_SIZE + 1)
        .read_to_end(&mut out)
        .map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if out.len() as u64 > MAX_ELF_SIZE {
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            cap: MAX_ELF_SIZE,
        });
    }
    Ok(out)
}

/// What a quick look at an exec-mapped file found.
struct Candidate {
    /// One mapping of the file (the first executable one).
    map: MemoryMap,
    tables: FrameTables,
    segs: Vec<Segment>,
}

/// Read the `.upstare` section of the file behind `m`, if it has one,
/// without reading the whole file (libc is large and has none).
fn probe(pid: Pid, m: &MemoryMap) -> Result<Option<Candidate>, ImageError> {
    let (f, path) = open_mapped(pid, m)?;
    let cache = object::ReadCache::new(f);
    let file = match object::File::parse(&cache) {
        Ok(file) => file,
        // Not an ELF file we can read (a mapped data file): not an image.
        Err(_) => return Ok(None),
    };
    let Some(section) = file.section_by_name(fdt::SECTION_NAME) else {
        return Ok(None);
    };
    let tables_err = |reason: String| ImageError::Tables {
        path: path.clone(),
        reason,
    };
    if section.size() > fdt::MAX_SECTION_SIZE as u64 {
        return Err(tables_err(format!(
            "section {} of {} bytes exceeds the limit",
            fdt::SECTION_NAME,
            section.size()
        )));
    }
    let data = section
        .data()
        .map_err(|e| tables_err(format!("section {}: {e}", fdt::SECTION_NAME)))?;
    let tables = fdt::decode(data).map_err(|e| tables_err(e.to_string()))?;
    let segs = segments(&path, &cache)?;
    Ok(Some(Candidate {
        map: m.clone(),
        tables,
        segs,
    }))
}

/// First executable mapping of every distinct file, in address order.
fn exec_files(maps: &[MemoryMap]) -> Vec<&MemoryMap> {
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

/// Bias, text and span of a candidate, checked against every mapping of
/// its file.
fn locate(
    maps: &[MemoryMap],
    c: &Candidate,
) -> Result<(LoadBias, Range<RuntimeAddr>, Range<RuntimeAddr>), ImageError> {
    let path = c.map.file().map(Path::to_path_buf).unwrap_or_default();
    let bias_err = |detail: String| ImageError::Bias {
        path: path.clone(),
        detail,
    };
    let bias = bias_of_mapping(&path, &c.segs, &c.map)?;
    let mine: Vec<&MemoryMap> = maps.iter().filter(|m| same_file(m, &c.map)).collect();
    for m in &mine {
        // Mappings past the file's segments (none expected) say nothing.
        let possible = biases_of_mapping(&c.segs, m);
        if !possible.is_empty() && !possible.contains(&bias) {
            return Err(bias_err(format!(
                "the executable mapping at {} implies bias {:#x}, the mapping at {} (file offset {}) implies {:#x}",
                c.map.start, bias.0, m.start, m.offset, possible[0].0
            )));
        }
    }
    if !c.tables.binary.pie && bias.0 != 0 {
        return Err(bias_err(format!(
            "a non-PIE executable loaded with bias {:#x}",
            bias.0
        )));
    }
    let bin = &c.tables.binary;
    let text_start = bin.text_addr.to_runtime(bias);
    let text_end = text_start
        .0
        .checked_add(bin.text_size)
        .map(RuntimeAddr)
        .ok_or_else(|| bias_err(format!(".text at {text_start} overflows")))?;
    let text_mapped = mine
        .iter()
        .any(|m| m.perms.exec && m.start <= text_start && text_end <= m.end);
    if !text_mapped {
        return Err(bias_err(format!(
            ".text [{text_start}, {text_end}) is not inside one executable mapping of the file"
        )));
    }
    let lo = c.segs.iter().map(|s| page_down(s.vaddr)).min();
    let hi = c
        .segs
        .iter()
        .map(|s| s.vaddr.checked_add(s.memsz).and_then(page_up))
        .collect::<Option<Vec<u64>>>()
        .and_then(|v| v.into_iter().max());
    let (Some(lo), Some(hi)) = (lo, hi) else {
        return Err(bias_err("no PT_LOAD segment, or one that overflows".into()));
    };
    let span = LinkAddr(lo).to_runtime(bias)..LinkAddr(hi).to_runtime(bias);
    if span.start > span.end
        || mine
            .iter()
            .any(|m| m.start < span.start || m.end > span.end)
    {
        return Err(bias_err(format!(
            "its mappings do not fit the segments' span [{}, {})",
            span.start, span.end
        )));
    }
    Ok((bias, text_start..text_end, span))
}

/// The instrumented image process `pid` runs: the one file mapped
/// executable that carries a `.upstare` section (after an update the old
/// image is no longer executable, so the newest is the only candidate).
///
/// Its bias is exact for PIE and non-PIE alike: computed from the segment
/// that covers the file offset of its executable mapping. `text` is the
/// tables' `.text` range; `span` covers every segment (`.bss` included).
pub fn running_image(pid: Pid, maps: &[MemoryMap]) -> Result<Image, ImageError> {
    let mut found = Vec::new();
    let mut unreadable = Vec::new();
    for m in exec_files(maps) {
        match probe(pid, m) {
            Ok(Some(c)) => found.push(c),
            Ok(None) => {}
            // A corrupt .upstare section is the image, broken: say so.
            Err(e @ ImageError::Tables { .. }) => return Err(e),
            // Some other file we cannot read: only worth reporting if no
            // image is found.
            Err(e) => unreadable.push(e),
        }
    }
    if found.len() > 1 {
        return Err(ImageError::Ambiguous {
            pid: pid.as_raw(),
            paths: found
                .iter()
                .filter_map(|c| c.map.file().map(Path::to_path_buf))
                .collect(),
        });
    }
    let Some(c) = found.pop() else {
        if let Some(e) = unreadable.into_iter().next() {
            return Err(e);
        }
        let exe =
            procfs::exe_path(pid).unwrap_or_else(|_| PathBuf::from(format!("/proc/{pid}/exe")));
        return Err(ImageError::NoImage {
            pid: pid.as_raw(),
            exe,
        });
    };
    let (bias, text, span) = locate(maps, &c)?;
    Ok(Image {
        path: c.map.file().map(Path::to_path_buf).unwrap_or_default(),
        bias,
        tables: c.tables,
        text,
        span,
    })
}

/// Why a library's CFI or symbols could not be read.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{name}: {reason}")]
pub struct LibraryError {
    pub name: String,
    pub reason: String,
}

/// A function symbol of a library.
#[derive(Clone, Debug)]
struct Sym {
    addr: u64,
    size: u64,
    name: String,
}

/// Where a library's bytes come from.
#[derive(Clone, Debug)]
enum Source {
    /// A file mapping (read through this mapping's map_files entry or path).
    File(MemoryMap),
    /// The vDSO, read from the target at construction.
    Bytes(Vec<u8>),
}

/// One mapped ELF object other than the application code proper (the
/// image's own file is included too, for the CFI of its PLT and `_start`).
pub struct Library {
    name: String,
    path: Option<PathBuf>,
    pid: Pid,
    bias: LoadBias,
    /// Executable ranges.
    code: Vec<Range<RuntimeAddr>>,
    source: Source,
    index: OnceCell<Result<EhFrameIndex, LibraryError>>,
    symbols: OnceCell<Vec<Sym>>,
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
    /// Whether `pc` is code of this library.
    pub fn contains(&self, pc: RuntimeAddr) -> bool {
        self.code.iter().any(|r| r.contains(&pc))
    }

    fn bytes(&self) -> Result<Vec<u8>, LibraryError> {
        let err = |reason: String| LibraryError {
            name: self.name.clone(),
            reason,
        };
        match &self.source {
            Source::Bytes(b) => Ok(b.clone()),
            Source::File(m) => {
                let (f, path) = open_mapped(self.pid, m).map_err(|e| err(e.to_string()))?;
                read_capped(f, &path).map_err(|e| err(e.to_string()))
            }
        }
    }

    /// The library's `.eh_frame` index, read on first use and cached.
    pub fn eh_frame(&self) -> Result<&EhFrameIndex, LibraryError> {
        self.index
            .get_or_init(|| {
                let bytes = self.bytes()?;
                EhFrameIndex::from_elf(&bytes).map_err(|e: CfiError| LibraryError {
                    name: self.name.clone(),
                    reason: e.to_string(),
                })
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The function symbol (from `.symtab` or `.dynsym`) containing
    /// link-time address `pc`, with the offset of `pc` in it. Symbols are
    /// read on first use; `None` when unreadable or not found.
    pub fn symbol_at(&self, pc: LinkAddr) -> Option<(&str, u64)> {
        let syms = self
            .symbols
            .get_or_init(|| self.read_symbols().unwrap_or_default());
        let i = syms.partition_point(|s| s.addr <= pc.0).checked_sub(1)?;
        // Several symbols may share an address; any of them that covers pc.
        let mut best: Option<&Sym> = None;
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

    fn read_symbols(&self) -> Result<Vec<Sym>, LibraryError> {
        let bytes = self.bytes()?;
        let file = object::File::parse(&*bytes).map_err(|e| LibraryError {
            name: self.name.clone(),
            reason: e.to_string(),
        })?;
        let mut syms: Vec<Sym> = file
            .symbols()
            .chain(file.dynamic_symbols())
            .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0)
            .filter_map(|s| {
                Some(Sym {
                    addr: s.address(),
                    size: s.size(),
                    name: s.name().ok()?.to_string(),
                })
            })
            .collect();
        syms.sort_by(|a, b| (a.addr, &a.name).cmp(&(b.addr, &b.name)));
        syms.dedup_by(|a, b| a.addr == b.addr && a.name == b.name);
        Ok(syms)
    }
}

/// Every executable ELF object mapped in a process, with its bias; CFI and
/// symbols are read lazily and cached.
#[derive(Debug, Default)]
pub struct Libraries {
    libs: Vec<Library>,
}

impl Libraries {
    /// No library at all (for unwinding tests on a byte buffer).
    pub fn empty() -> Libraries {
        Libraries::default()
    }

    /// The objects mapped executable in process `pid` per `maps`. Files
    /// that cannot be parsed are skipped; the vDSO is read from the target
    /// (skipped if unreadable).
    pub fn new(pid: Pid, maps: &[MemoryMap]) -> Libraries {
        let mut libs = Libraries::default();
        libs.add_new(pid, maps);
        libs
    }

    /// Re-read the maps of `pid` and add objects mapped since (dlopen).
    pub fn refresh(&mut self, pid: Pid) -> Result<(), ProcError> {
        let maps = procfs::read_maps(pid)?;
        self.add_new(pid, &maps);
        Ok(())
    }

    fn add_new(&mut self, pid: Pid, maps: &[MemoryMap]) {
        self.add_retired(pid, maps);
        for m in exec_files(maps) {
            if self.libs.iter().any(|l| l.contains(m.start)) {
                continue;
            }
            let Ok((f, path)) = open_mapped(pid, m) else {
                continue;
            };
            let cache = object::ReadCache::new(f);
            let Ok(segs) = segments(&path, &cache) else {
                continue;
            };
            let Ok(bias) = bias_of_mapping(&path, &segs, m) else {
                continue;
            };
            let code = maps
                .iter()
                .filter(|o| o.perms.exec && same_file(o, m))
                .map(|o| o.start..o.end)
                .collect();
            self.libs.push(Library {
                name: path.display().to_string(),
                path: Some(path),
                pid,
                bias,
                code,
                source: Source::File(m.clone()),
                index: OnceCell::new(),
                symbols: OnceCell::new(),
            });
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
    fn add_retired(&mut self, pid: Pid, maps: &[MemoryMap]) {
        for m in non_exec_files(maps) {
            if self.libs.iter().any(|l| l.path.as_deref() == m.file()) {
                continue;
            }
            let Ok((f, path)) = open_mapped(pid, m) else {
                continue;
            };
            let cache = object::ReadCache::new(f);
            let Ok(segs) = segments(&path, &cache) else {
                continue;
            };
            let mine: Vec<&MemoryMap> = maps.iter().filter(|o| same_file(o, m)).collect();
            // Making the text read-only merges it with the read-only mapping
            // before it, so look for mappings that cover an executable
            // segment's pages rather than start at them.
            let mut code = Vec::new();
            let mut code_map = None;
            for s in segs.iter().filter(|s| s.exec) {
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
            let Some(code_map) = code_map else {
                continue;
            };
            let Ok(bias) = bias_of_mapping(&path, &segs, code_map) else {
                continue;
            };
            self.libs.push(Library {
                name: path.display().to_string(),
                path: Some(path),
                pid,
                bias,
                code,
                source: Source::File(code_map.clone()),
                index: OnceCell::new(),
                symbols: OnceCell::new(),
            });
        }
    }

    /// The library whose code contains `pc`, with `pc` as a link-time
    /// address of that library.
    pub fn lookup(&self, pc: RuntimeAddr) -> Option<(&Library, LinkAddr)> {
        self.libs
            .iter()
            .find(|l| l.contains(pc))
            .map(|l| (l, pc.to_link(l.bias)))
    }

    /// Every library, in discovery order.
    pub fn iter(&self) -> impl Iterator<Item = &Library> {
        self.libs.iter()
    }
}

fn vdso_library(pid: Pid, m: &MemoryMap) -> Option<Library> {
    if m.len() > MAX_VDSO_SIZE {
        return None;
    }
    let bytes = ProcessMemory::open(pid)
        .read_vec(m.start, m.len(), MAX_VDSO_SIZE as usize)
        .ok()?;
    let name = "[vdso]";
    let segs = segments(Path::new(name), &*bytes).ok()?;
    let bias = bias_of_mapping(Path::new(name), &segs, m).ok()?;
    Some(Library {
        name: name.into(),
        path: None,
        pid,
        bias,
        code: vec![m.start..m.end],
        source: Source::Bytes(bytes),
        index: OnceCell::new(),
        symbols: OnceCell::new(),
    })
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
            exec,
        }
    }

    #[test]
    fn bias_pie_and_non_pie() {
        let p = Path::new("/x");
        // gcc PIE layout: r-- at 0, r-x at 0x1000, r-- at 0x2000, rw- at 0x3db8.
        let segs = [
            seg(0, 0, 0x628, false),
            seg(0x1000, 0x1000, 0x1a5, true),
            seg(0x2000, 0x2000, 0xf4, false),
            seg(0x2db8, 0x3db8, 0x258, false),
        ];
        let text = map(0x5555_5555_5000, 0x5555_5555_6000, "r-xp", 0x1000, "/x");
        assert_eq!(
            bias_of_mapping(p, &segs, &text).unwrap(),
            LoadBias(0x5555_5555_4000)
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
        assert_eq!(bias_of_mapping(p, &segs, &text).unwrap(), LoadBias(0));
        // An offset no segment covers.
        let odd = map(0x900000, 0x901000, "r-xp", 0x9000, "/x");
        assert!(matches!(
            bias_of_mapping(p, &segs, &odd),
            Err(ImageError::NoSegment { .. })
        ));
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
        // A libc function: found with its public name at offset 0.
        let getpid = nix::libc::getpid as *const () as usize as u64;
        let (libc, link) = libs.lookup(RuntimeAddr(getpid)).expect("libc mapped");
        assert!(libc.name().contains("libc"), "{}", libc.name());
        let (name, off) = libc.symbol_at(link).expect("symbol of getpid");
        assert_eq!((name, off), ("getpid", 0));
        // Not an image: the test binary has no .upstare section.
        let e = running_image(me, &maps).unwrap_err();
        assert!(
            e.to_string()
                .contains("no .upstare section: instrument it with upstare-rewrite"),
            "{e}"
        );
    }
}
