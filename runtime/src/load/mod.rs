//! Loading the new version (NEW) into the running process, beside the
//! running image, without running any of its code; and the commit-time
//! steps that hand the process over to it.
//!
//! [`load_image`]:
//! 1. Checks NEW before touching the process: x86-64, position-independent
//!    (an `ET_EXEC` file has fixed addresses, taken by the running image),
//!    no thread-local storage of its own (`PT_TLS`: the process's TLS blocks
//!    are laid out already), a `.upstare` section, every `DT_NEEDED` library
//!    already loaded, every import resolvable. Any refusal leaves the process
//!    untouched.
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
//!      libc keeps pointing at the copy in the *first* executable (the
//!      dynamic linker bound libc's references to it at startup), so NEW's
//!      copy is filled with the current value of that live copy. Later
//!      changes made by libc (`setenv` updating `environ`) go to the old copy
//!      and are not seen by NEW's code reading its own copy.
//!    - `IRELATIVE` (NEW's own IFUNCs): its resolver is called in the process
//!      after every other relocation.
//!
//!    Then `PT_GNU_RELRO` is made read-only. NEW's constructors
//!    (`.init_array`) are not run: its state comes from the old version.
//! 4. Returns a [`LoadedImage`] guard that unmaps NEW again when dropped,
//!    unless it was committed.
//!
//! At commit ([`LoadedImage::plan_commit`], [`LoadedImage::commit`]):
//! signal handlers in the old image's code are re-registered at the same
//! functions of NEW ([`move_signal_handlers`]); the main program's `.dynamic`
//! `DT_FINI`/`DT_FINI_ARRAY`/`DT_FINI_ARRAYSZ` are redirected to NEW's, since
//! the dynamic linker runs the main program's destructors at exit with its
//! `l_addr` (the main program stays the first version, whatever the number
//! of updates: [`redirect_fini`]); and the old image's code is made
//! non-executable so that a stale code pointer traps ([`retire_old_image`]).

pub mod image;

use crate::engine::state::Image;
use crate::memory::{MemError, TargetMemory};
use crate::target::procfs::{self, MemoryMap, ProcError, PAGE_SIZE};
use crate::target::ptrace::Tracee;
use crate::target::remote::{self, KernelSigaction, RemoteCalls, RemoteError};
use nix::libc;
use nix::unistd::Pid;
use object::elf;
use object::read::elf::{
    Dyn as _, FileHeader, ProgramHeader as _, Rela as _, SectionHeader as _, Sym as _,
};
use object::{Endianness, SymbolIndex};
use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
use upstare_dwarf::fdt::FrameTables;
use upstare_dwarf::{LinkAddr, LoadBias, RuntimeAddr};

type Hdr = elf::FileHeader64<Endianness>;

/// ELF files larger than this are refused.
pub const MAX_ELF_SIZE: u64 = 1 << 30;
/// Bound on the dynamic linker's list of loaded objects.
const MAX_LINK_MAP: usize = 4096;
/// Bound on a path read from the target.
const MAX_NAME: usize = 4096;
/// Bound on the size of one COPY-relocated object.
const MAX_COPY: u64 = 16 << 20;
/// Bound on the number of relocations of NEW.
const MAX_RELOCS: usize = 1 << 24;
/// Bound on `.dynamic` entries read from the target.
const MAX_DYNAMIC: u64 = 4096;
/// Offsets in glibc's `struct link_map` / `struct r_debug` (x86-64, stable ABI).
const R_DEBUG_MAP: u64 = 8;
const LM_ADDR: u64 = 0;
const LM_NAME: u64 = 8;
const LM_NEXT: u64 = 24;

/// Why NEW cannot be loaded, or a commit step failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: larger than {cap} bytes")]
    TooLarge { path: PathBuf, cap: u64 },
    #[error("{path}: not a valid ELF file: {reason}")]
    Parse { path: PathBuf, reason: String },
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
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Mem(#[from] MemError),
    #[error(transparent)]
    Proc(#[from] ProcError),
}

fn page_down(a: u64) -> u64 {
    a & !(PAGE_SIZE - 1)
}

fn page_up(a: u64) -> Option<u64> {
    a.checked_add(PAGE_SIZE - 1).map(page_down)
}

/// Read an ELF file, refusing oversized ones before allocating.
fn read_elf(path: &Path) -> Result<Vec<u8>, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_ELF_SIZE {
        return Err(LoadError::TooLarge {
            path: path.to_path_buf(),
            cap: MAX_ELF_SIZE,
        });
    }
    std::fs::read(path).map_err(io)
}

/// One `PT_LOAD` segment (link-time).
#[derive(Clone, Copy, Debug)]
struct Segment {
    vaddr: u64,
    memsz: u64,
    offset: u64,
    filesz: u64,
    flags: u32,
}

impl Segment {
    fn prot(&self) -> i32 {
        let mut p = 0;
        if self.flags & elf::PF_R.0 != 0 {
            p |= libc::PROT_READ;
        }
        if self.flags & elf::PF_W.0 != 0 {
            p |= libc::PROT_WRITE;
        }
        if self.flags & elf::PF_X.0 != 0 {
            p |= libc::PROT_EXEC;
        }
        p
    }
}

/// What the loader needs from an ELF file's headers and `.dynamic`.
#[derive(Debug, Default)]
struct ElfSummary {
    e_type: u16,
    machine: u16,
    loads: Vec<Segment>,
    tls: bool,
    relro: Option<(u64, u64)>,
    dynamic: Option<(u64, u64)>,
    needed: Vec<String>,
    soname: Option<String>,
    fini: Option<u64>,
    fini_array: Option<u64>,
    fini_array_sz: Option<u64>,
    has_tables: bool,
}

fn parse_err(path: &Path, e: impl fmt::Display) -> LoadError {
    LoadError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn summarize(path: &Path, data: &[u8]) -> Result<ElfSummary, LoadError> {
    let hdr = Hdr::parse(data).map_err(|e| parse_err(path, e))?;
    let endian = hdr.endian().map_err(|e| parse_err(path, e))?;
    if endian != Endianness::Little {
        return Err(parse_err(path, "big-endian"));
    }
    let mut s = ElfSummary {
        e_type: hdr.e_type(endian).0,
        machine: hdr.e_machine(endian).0,
        ..ElfSummary::default()
    };
    let phdrs = hdr
        .program_headers(endian, data)
        .map_err(|e| parse_err(path, e))?;
    for ph in phdrs {
        let t = ph.p_type(endian);
        let (vaddr, memsz) = (ph.p_vaddr(endian), ph.p_memsz(endian));
        if t == elf::PT_LOAD {
            s.loads.push(Segment {
                vaddr,
                memsz,
                offset: ph.p_offset(endian),
                filesz: ph.p_filesz(endian),
                flags: ph.p_flags(endian).0,
            });
        } else if t == elf::PT_TLS {
            s.tls = true;
        } else if t == elf::PT_GNU_RELRO {
            s.relro = Some((vaddr, memsz));
        } else if t == elf::PT_DYNAMIC {
            s.dynamic = Some((vaddr, memsz));
        }
    }
    let sections = hdr.sections(endian, data).map_err(|e| parse_err(path, e))?;
    s.has_tables = sections
        .section_by_name(endian, upstare_dwarf::fdt::SECTION_NAME.as_bytes())
        .is_some();
    if let Some((dyns, link)) = sections
        .dynamic(endian, data)
        .map_err(|e| parse_err(path, e))?
    {
        let strings = sections
            .strings(endian, data, link)
            .map_err(|e| parse_err(path, e))?;
        for d in dyns {
            let tag = d.d_tag(endian);
            let val = d.d_val(endian);
            let string = || -> Result<String, LoadError> {
                let b = d.string(endian, strings).map_err(|e| parse_err(path, e))?;
                Ok(String::from_utf8_lossy(b).into_owned())
            };
            if tag == elf::DT_NULL {
                break;
            } else if tag == elf::DT_NEEDED {
                s.needed.push(string()?);
            } else if tag == elf::DT_SONAME {
                s.soname = Some(string()?);
            } else if tag == elf::DT_FINI {
                s.fini = Some(val);
            } else if tag == elf::DT_FINI_ARRAY {
                s.fini_array = Some(val);
            } else if tag == elf::DT_FINI_ARRAYSZ {
                s.fini_array_sz = Some(val);
            }
        }
    }
    Ok(s)
}

/// A symbol definition in a loaded object's `.dynsym`.
#[derive(Clone, Debug)]
struct Def {
    value: u64,
    size: u64,
    kind: u8,
    /// Version name (from `.gnu.version_d`, or `.gnu.version_r` for the
    /// COPY-relocated definitions of an executable); `None` if unversioned.
    version: Option<String>,
    /// Not the default version (`sym@VER` rather than `sym@@VER`).
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

fn read_defs(path: &Path, data: &[u8]) -> Result<HashMap<String, Vec<Def>>, LoadError> {
    let hdr = Hdr::parse(data).map_err(|e| parse_err(path, e))?;
    let endian = hdr.endian().map_err(|e| parse_err(path, e))?;
    let sections = hdr.sections(endian, data).map_err(|e| parse_err(path, e))?;
    let dynsym = sections
        .symbols(endian, data, elf::SHT_DYNSYM)
        .map_err(|e| parse_err(path, e))?;
    let versions = sections
        .versions(endian, data)
        .map_err(|e| parse_err(path, e))?;
    let mut out: HashMap<String, Vec<Def>> = HashMap::new();
    for (i, sym) in dynsym.symbols().iter().enumerate() {
        if sym.st_shndx(endian) == elf::SHN_UNDEF {
            continue;
        }
        let bind = sym.st_bind();
        if bind != elf::STB_GLOBAL && bind != elf::STB_WEAK && bind != elf::STB_GNU_UNIQUE {
            continue;
        }
        let Ok(name) = sym.name(endian, dynsym.strings()) else {
            continue;
        };
        let (version, hidden) = match &versions {
            Some(vt) => {
                let vi = vt.version_index(endian, SymbolIndex(i));
                let v = vt
                    .version(vi.index())
                    .ok()
                    .flatten()
                    .map(|v| String::from_utf8_lossy(v.name()).into_owned());
                (v, vi.is_hidden())
            }
            None => (None, false),
        };
        out.entry(String::from_utf8_lossy(name).into_owned())
            .or_default()
            .push(Def {
                value: sym.st_value(endian),
                size: sym.st_size(endian),
                kind: sym.st_type().0,
                version,
                hidden,
            });
    }
    Ok(out)
}

/// One object (executable or shared library) the dynamic linker loaded.
#[derive(Debug)]
pub struct LoadedObject {
    /// The file.
    pub path: PathBuf,
    /// Its `DT_SONAME`, if any.
    pub soname: Option<String>,
    /// `l_addr`.
    pub bias: LoadBias,
    /// The program the process was started from (first in the list).
    pub is_main: bool,
    defs: HashMap<String, Vec<Def>>,
}

impl LoadedObject {
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

/// Where an imported symbol was found.
#[derive(Clone, Copy, Debug)]
pub struct Resolved<'a> {
    pub object: &'a LoadedObject,
    /// Runtime address of the definition (for an IFUNC: of its resolver).
    pub addr: RuntimeAddr,
    pub size: u64,
    pub ifunc: bool,
    pub tls: bool,
}

/// The objects the dynamic linker loaded into a process, in its search
/// order, with their exported symbols.
#[derive(Debug)]
pub struct ProcessLibraries {
    pub pid: Pid,
    pub objects: Vec<LoadedObject>,
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

impl ProcessLibraries {
    /// The objects process `pid` has loaded, read from the dynamic linker's
    /// `r_debug`/`link_map` list (found through `_r_debug` of the
    /// interpreter at `AT_BASE`), each parsed from its file, checked against
    /// `/proc/PID/maps`.
    pub fn read(pid: Pid) -> Result<ProcessLibraries, LoadError> {
        let lm_err = |reason: String| LoadError::LinkMap {
            pid: pid.as_raw(),
            reason,
        };
        let auxv = procfs::read_auxv(pid)?;
        let at_base = procfs::auxv_value(&auxv, procfs::AT_BASE)?;
        if at_base == 0 {
            return Err(lm_err("no dynamic linker (statically linked?)".into()));
        }
        let maps = procfs::read_maps(pid)?;
        let ldso = maps
            .iter()
            .find(|m| m.start.0 == at_base)
            .and_then(|m| m.file().map(Path::to_path_buf))
            .ok_or_else(|| lm_err(format!("no file mapped at AT_BASE {at_base:#x}")))?;
        let ld_data = read_elf(&mapped_file(pid, &maps, &ldso)?)?;
        let ld_sum = summarize(&ldso, &ld_data)?;
        let ld_first = ld_sum
            .loads
            .iter()
            .map(|s| s.vaddr)
            .min()
            .ok_or_else(|| lm_err(format!("{} has no PT_LOAD", ldso.display())))?;
        let ld_bias = at_base.wrapping_sub(page_down(ld_first));
        let ld_defs = read_defs(&ldso, &ld_data)?;
        let r_debug = ld_defs
            .get("_r_debug")
            .and_then(|d| d.first())
            .map(|d| d.value.wrapping_add(ld_bias))
            .ok_or_else(|| lm_err(format!("{} exports no _r_debug", ldso.display())))?;
        let mem = crate::target::ProcessMemory::open(pid);
        let mut lm = mem.read_u64(RuntimeAddr(r_debug.wrapping_add(R_DEBUG_MAP)))?;
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
        let mut objects = Vec::new();
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
                // Read through /proc/PID/exe: the mapped file even if the
                // path now names another (a rebuilt program).
                let shown = strip_deleted(procfs::exe_path(pid)?);
                let data = read_elf(&PathBuf::from(format!("/proc/{pid}/exe")))?;
                let sum = summarize(&shown, &data)?;
                objects.push(LoadedObject {
                    defs: read_defs(&shown, &data)?,
                    path: shown,
                    soname: sum.soname,
                    bias: LoadBias(l_addr),
                    is_main,
                });
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
            let source = mapped_file(pid, &maps, &canon)?;
            let data = read_elf(&source)?;
            let sum = summarize(&canon, &data)?;
            objects.push(LoadedObject {
                defs: read_defs(&canon, &data)?,
                path: canon,
                soname: sum.soname,
                bias: LoadBias(l_addr),
                is_main,
            });
        }
        if lm != 0 {
            return Err(lm_err(format!("more than {MAX_LINK_MAP} loaded objects")));
        }
        Ok(ProcessLibraries { pid, objects })
    }

    /// Whether a loaded object answers to `DT_NEEDED` name `needed` (its
    /// soname or file name).
    pub fn has_library(&self, needed: &str) -> bool {
        self.objects.iter().any(|o| {
            o.soname.as_deref() == Some(needed)
                || o.path.file_name().and_then(|f| f.to_str()) == Some(needed)
        })
    }

    /// Find `name` (with version `version`) as the dynamic linker would in
    /// the global scope. The main program only provides data (its functions
    /// are the old version's code).
    pub fn lookup(&self, name: &str, version: Option<&str>) -> Option<Resolved<'_>> {
        self.objects.iter().find_map(|o| {
            let d = o.find(name, version)?;
            if o.is_main && d.kind != elf::STT_OBJECT.0 && d.kind != elf::STT_COMMON.0 {
                return None;
            }
            Some(Resolved {
                object: o,
                addr: RuntimeAddr(d.value.wrapping_add(o.bias.0)),
                size: d.size,
                ifunc: d.kind == elf::STT_GNU_IFUNC.0,
                tls: d.kind == elf::STT_TLS.0,
            })
        })
    }
}

/// `path` without the ` (deleted)` the kernel appends to a replaced file.
fn strip_deleted(path: PathBuf) -> PathBuf {
    match path.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
        Some(p) => PathBuf::from(p),
        None => path,
    }
}

/// Where to read the file mapped in `pid` as `path`: the path itself if it
/// still names the mapped file, else the kernel's handle on the mapped file
/// (`/proc/PID/map_files/START-END`: a library replaced on disk since).
fn mapped_file(pid: Pid, maps: &[MemoryMap], path: &Path) -> Result<PathBuf, LoadError> {
    let changed = |reason: String| LoadError::LibraryChanged {
        pid: pid.as_raw(),
        path: path.to_path_buf(),
        reason,
    };
    let m = maps
        .iter()
        .find(|m| m.file() == Some(path))
        .ok_or_else(|| changed("not in /proc/PID/maps".into()))?;
    use std::os::unix::fs::MetadataExt;
    let same = !m.deleted && std::fs::metadata(path).is_ok_and(|st| st.ino() == m.inode);
    if same {
        return Ok(path.to_path_buf());
    }
    let handle = PathBuf::from(format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        m.start.0, m.end.0
    ));
    match std::fs::metadata(&handle) {
        Ok(st) if st.ino() == m.inode => Ok(handle),
        Ok(_) => Err(changed(
            "replaced on disk, and its mapping shows another file".into(),
        )),
        Err(e) => Err(changed(format!(
            "replaced on disk, and {} is unreadable: {e}",
            handle.display()
        ))),
    }
}

/// What a relocation writes, decided before the process is touched.
#[derive(Clone, Debug)]
enum Value {
    /// NEW's bias plus this.
    Base(u64),
    /// An absolute runtime address.
    Abs(u64),
    /// Call the resolver in the process; add the addend.
    Ifunc {
        resolver: RuntimeAddr,
        addend: u64,
        symbol: String,
    },
    /// NEW's own IFUNC: call bias + resolver.
    LocalIfunc { resolver: u64, symbol: String },
    /// Copy `size` bytes from the live definition.
    Copy {
        src: RuntimeAddr,
        size: u64,
        symbol: String,
    },
}

/// Everything [`load_image`] will do, computed from the files alone.
#[derive(Debug)]
struct Plan {
    segments: Vec<Segment>,
    lo: u64,
    hi: u64,
    relocs: Vec<(u64, Value)>,
    relro: Option<(u64, u64)>,
    entry: u64,
    copies: Vec<(String, u64)>,
}

/// One import slot of an executable (a `GLOB_DAT`, `JUMP_SLOT`, `64` or
/// `COPY` relocation against a symbol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportSlot {
    pub symbol: String,
    pub version: Option<String>,
    /// `R_X86_64_*` type.
    pub kind: u32,
    /// Where the relocation writes (link-time).
    pub offset: LinkAddr,
    pub weak: bool,
}

/// Name a relocation type for messages.
pub fn reloc_name(kind: u32) -> &'static str {
    match kind {
        0 => "R_X86_64_NONE",
        1 => "R_X86_64_64",
        2 => "R_X86_64_PC32",
        5 => "R_X86_64_COPY",
        6 => "R_X86_64_GLOB_DAT",
        7 => "R_X86_64_JUMP_SLOT",
        8 => "R_X86_64_RELATIVE",
        16 => "R_X86_64_DTPMOD64",
        17 => "R_X86_64_DTPOFF64",
        18 => "R_X86_64_TPOFF64",
        37 => "R_X86_64_IRELATIVE",
        _ => "R_X86_64_?",
    }
}

/// Raw relocations of an ELF file: (offset, type, symbol index, addend).
struct RawRelocs {
    rela: Vec<(u64, u32, u32, i64)>,
    /// `.relr.dyn` addresses.
    relr: Vec<u64>,
}

fn raw_relocs(path: &Path, data: &[u8]) -> Result<RawRelocs, LoadError> {
    let hdr = Hdr::parse(data).map_err(|e| parse_err(path, e))?;
    let endian = hdr.endian().map_err(|e| parse_err(path, e))?;
    let sections = hdr.sections(endian, data).map_err(|e| parse_err(path, e))?;
    let mut out = RawRelocs {
        rela: Vec::new(),
        relr: Vec::new(),
    };
    for s in sections.iter() {
        if s.sh_flags(endian).0 & elf::SHF_ALLOC.0 == 0 {
            continue;
        }
        let t = s.sh_type(endian);
        if t == elf::SHT_REL {
            return Err(parse_err(path, "SHT_REL relocations on x86-64"));
        }
        if let Some((relas, _link)) = s.rela(endian, data).map_err(|e| parse_err(path, e))? {
            for r in relas {
                if out.rela.len() >= MAX_RELOCS {
                    return Err(parse_err(path, "too many relocations"));
                }
                out.rela.push((
                    r.r_offset(endian),
                    r.r_type(endian, false).0,
                    r.r_sym(endian, false),
                    r.r_addend(endian),
                ));
            }
        }
        if let Some(relrs) = s.relr(endian, data).map_err(|e| parse_err(path, e))? {
            for a in relrs {
                if out.relr.len() >= MAX_RELOCS {
                    return Err(parse_err(path, "too many relocations"));
                }
                out.relr.push(a);
            }
        }
    }
    Ok(out)
}

/// The import slots of the executable `path` (whose bytes are `data`).
pub fn import_slots(path: &Path, data: &[u8]) -> Result<Vec<ImportSlot>, LoadError> {
    let hdr = Hdr::parse(data).map_err(|e| parse_err(path, e))?;
    let endian = hdr.endian().map_err(|e| parse_err(path, e))?;
    let sections = hdr.sections(endian, data).map_err(|e| parse_err(path, e))?;
    let dynsym = sections
        .symbols(endian, data, elf::SHT_DYNSYM)
        .map_err(|e| parse_err(path, e))?;
    let versions = sections
        .versions(endian, data)
        .map_err(|e| parse_err(path, e))?;
    let mut out = Vec::new();
    for (offset, kind, sym, _) in raw_relocs(path, data)?.rela {
        if sym == 0 {
            continue;
        }
        let (name, version, weak) = symbol_ref(path, endian, &dynsym, versions.as_ref(), sym)?;
        out.push(ImportSlot {
            symbol: name,
            version,
            kind,
            offset: LinkAddr(offset),
            weak,
        });
    }
    Ok(out)
}

type DynSymTable<'d> = object::read::elf::SymbolTable<'d, Hdr, &'d [u8]>;
type VersionTable<'d> = object::read::elf::VersionTable<'d, Hdr>;

/// Name, required version and weakness of symbol `idx` of NEW's `.dynsym`.
fn symbol_ref(
    path: &Path,
    endian: Endianness,
    dynsym: &DynSymTable<'_>,
    versions: Option<&VersionTable<'_>>,
    idx: u32,
) -> Result<(String, Option<String>, bool), LoadError> {
    let sym = dynsym
        .symbol(SymbolIndex(idx as usize))
        .map_err(|e| parse_err(path, e))?;
    let name = sym
        .name(endian, dynsym.strings())
        .map_err(|e| parse_err(path, e))?;
    let version = versions.and_then(|vt| {
        vt.version(vt.version_index(endian, SymbolIndex(idx as usize)).index())
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(v.name()).into_owned())
    });
    Ok((
        String::from_utf8_lossy(name).into_owned(),
        version,
        sym.st_bind() == elf::STB_WEAK,
    ))
}

fn display_sym(name: &str, version: Option<&str>) -> String {
    match version {
        Some(v) => format!("{name}@{v}"),
        None => name.to_string(),
    }
}

/// Everything [`load_image`] checks before it changes the process — NEW's
/// kind, its libraries, every import it needs — without changing anything
/// (for `--dry-run`).
pub fn check_loadable(pid: Pid, new_path: &Path, new_bytes: &[u8]) -> Result<(), LoadError> {
    let canon = std::fs::canonicalize(new_path).map_err(|source| LoadError::Io {
        path: new_path.to_path_buf(),
        source,
    })?;
    let libs = ProcessLibraries::read(pid)?;
    plan_load(&canon, new_bytes, &libs).map(|_| ())
}

/// Check NEW and decide every relocation (see the module doc).
fn plan_load(path: &Path, data: &[u8], libs: &ProcessLibraries) -> Result<Plan, LoadError> {
    let sum = summarize(path, data)?;
    let p = || path.to_path_buf();
    if sum.machine != elf::EM_X86_64.0 {
        return Err(LoadError::NotX86_64 {
            path: p(),
            machine: sum.machine,
        });
    }
    if sum.e_type == elf::ET_EXEC.0 {
        return Err(LoadError::NotPie { path: p() });
    }
    if sum.e_type != elf::ET_DYN.0 {
        return Err(LoadError::NotExecutable {
            path: p(),
            e_type: sum.e_type,
        });
    }
    if sum.tls {
        return Err(LoadError::OwnTls { path: p() });
    }
    if !sum.has_tables {
        return Err(LoadError::NoTables { path: p() });
    }
    let missing: Vec<&str> = sum
        .needed
        .iter()
        .filter(|n| !libs.has_library(n))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(LoadError::MissingLibrary {
            path: p(),
            library: missing.join(", "),
            pid: libs.pid.as_raw(),
        });
    }
    let bad = |what: String| LoadError::BadLayout { path: p(), what };
    let mut segments = sum.loads.clone();
    segments.sort_by_key(|s| s.vaddr);
    if segments.is_empty() {
        return Err(bad("no PT_LOAD segment".into()));
    }
    let mut prev_end = 0u64;
    for s in &segments {
        let end = s
            .vaddr
            .checked_add(s.memsz)
            .ok_or_else(|| bad(format!("segment at {:#x} wraps", s.vaddr)))?;
        if s.filesz > s.memsz
            || s.offset
                .checked_add(s.filesz)
                .is_none_or(|e| e > data.len() as u64)
        {
            return Err(bad(format!("segment at {:#x} exceeds the file", s.vaddr)));
        }
        if s.vaddr % PAGE_SIZE != s.offset % PAGE_SIZE {
            return Err(bad(format!(
                "segment at {:#x}: address and file offset {:#x} differ modulo the page size",
                s.vaddr, s.offset
            )));
        }
        if page_down(s.vaddr) < prev_end {
            return Err(bad(format!(
                "segment at {:#x} overlaps the one before",
                s.vaddr
            )));
        }
        prev_end = page_up(end).ok_or_else(|| bad("span wraps".into()))?;
    }
    let lo = page_down(segments[0].vaddr);
    let hi = prev_end;
    let in_image = |off: u64| {
        segments
            .iter()
            .any(|s| s.vaddr <= off && off.checked_add(8).is_some_and(|e| e <= s.vaddr + s.memsz))
    };
    // The file's bytes at link-time address `a` (for RELR's implicit addends).
    let file_word = |a: u64| -> Option<u64> {
        let s = segments
            .iter()
            .find(|s| s.vaddr <= a && a.checked_add(8).is_some_and(|e| e <= s.vaddr + s.filesz))?;
        let off = usize::try_from(s.offset + (a - s.vaddr)).ok()?;
        let b = data.get(off..off.checked_add(8)?)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    };

    let hdr = Hdr::parse(data).map_err(|e| parse_err(path, e))?;
    let endian = hdr.endian().map_err(|e| parse_err(path, e))?;
    let sections = hdr.sections(endian, data).map_err(|e| parse_err(path, e))?;
    let dynsym = sections
        .symbols(endian, data, elf::SHT_DYNSYM)
        .map_err(|e| parse_err(path, e))?;
    let versions = sections
        .versions(endian, data)
        .map_err(|e| parse_err(path, e))?;
    let raw = raw_relocs(path, data)?;

    let mut relocs = Vec::with_capacity(raw.rela.len() + raw.relr.len());
    let mut irelative = Vec::new();
    let mut unresolved: Vec<String> = Vec::new();
    let mut copies = Vec::new();
    for &(offset, kind, symidx, addend) in &raw.rela {
        let addend_u = addend as u64;
        if kind == elf::R_X86_64_NONE.0 {
            continue;
        }
        if !in_image(offset) {
            return Err(bad(format!(
                "{} at {offset:#x} outside every segment",
                reloc_name(kind)
            )));
        }
        let unsupported = |symbol: String| LoadError::UnsupportedReloc {
            path: p(),
            kind,
            offset: LinkAddr(offset),
            symbol,
        };
        if kind == elf::R_X86_64_RELATIVE.0 {
            relocs.push((offset, Value::Base(addend_u)));
            continue;
        }
        if kind == elf::R_X86_64_IRELATIVE.0 {
            irelative.push((
                offset,
                Value::LocalIfunc {
                    resolver: addend_u,
                    symbol: format!("IRELATIVE at {offset:#x}"),
                },
            ));
            continue;
        }
        let by_symbol = kind == elf::R_X86_64_64.0
            || kind == elf::R_X86_64_GLOB_DAT.0
            || kind == elf::R_X86_64_JUMP_SLOT.0;
        let is_copy = kind == elf::R_X86_64_COPY.0;
        if !(by_symbol || is_copy) {
            let name = if symidx == 0 {
                "none".to_string()
            } else {
                symbol_ref(path, endian, &dynsym, versions.as_ref(), symidx)?.0
            };
            return Err(unsupported(format!("{name} ({})", reloc_name(kind))));
        }
        let (name, version, weak) = symbol_ref(path, endian, &dynsym, versions.as_ref(), symidx)?;
        let sym = dynsym
            .symbol(SymbolIndex(symidx as usize))
            .map_err(|e| parse_err(path, e))?;
        let defined_here = sym.st_shndx(endian) != elf::SHN_UNDEF;
        if is_copy {
            let Some(r) = libs.lookup(&name, version.as_deref()) else {
                unresolved.push(display_sym(&name, version.as_deref()));
                continue;
            };
            let size = sym.st_size(endian);
            if size > MAX_COPY || r.size < size {
                return Err(LoadError::Copy {
                    path: p(),
                    symbol: name,
                    reason: format!(
                        "size {size} here, {} in {}",
                        r.size,
                        r.object.path.display()
                    ),
                });
            }
            if !in_image(offset) || offset.checked_add(size).is_none() {
                return Err(bad(format!("COPY of {name} outside every segment")));
            }
            copies.push((name.clone(), size));
            relocs.push((
                offset,
                Value::Copy {
                    src: r.addr,
                    size,
                    symbol: name,
                },
            ));
            continue;
        }
        if defined_here {
            // NEW's own definition (an executable's export): not in the
            // process's scope, so bind to it directly.
            let v = sym.st_value(endian);
            if sym.st_type() == elf::STT_GNU_IFUNC {
                relocs.push((
                    offset,
                    Value::LocalIfunc {
                        resolver: v,
                        symbol: name,
                    },
                ));
            } else if sym.st_type() == elf::STT_TLS {
                return Err(unsupported(name));
            } else {
                relocs.push((offset, Value::Base(v.wrapping_add(addend_u))));
            }
            continue;
        }
        match libs.lookup(&name, version.as_deref()) {
            Some(r) if r.tls => return Err(unsupported(name)),
            Some(r) if r.ifunc => relocs.push((
                offset,
                Value::Ifunc {
                    resolver: r.addr,
                    addend: addend_u,
                    symbol: display_sym(&name, version.as_deref()),
                },
            )),
            Some(r) => relocs.push((offset, Value::Abs(r.addr.0.wrapping_add(addend_u)))),
            None if weak => relocs.push((offset, Value::Abs(0u64.wrapping_add(addend_u)))),
            None => unresolved.push(display_sym(&name, version.as_deref())),
        }
    }
    for &a in &raw.relr {
        let v =
            file_word(a).ok_or_else(|| bad(format!("RELR entry at {a:#x} outside the file")))?;
        relocs.push((a, Value::Base(v)));
    }
    if !unresolved.is_empty() {
        unresolved.sort();
        unresolved.dedup();
        let more = unresolved.len().saturating_sub(8);
        let mut symbols = unresolved
            .into_iter()
            .take(8)
            .collect::<Vec<_>>()
            .join(", ");
        if more > 0 {
            symbols.push_str(&format!(" and {more} more"));
        }
        return Err(LoadError::Unresolved {
            path: p(),
            symbols,
            pid: libs.pid.as_raw(),
        });
    }
    // IRELATIVE last: resolvers may use NEW's other relocated data.
    relocs.extend(irelative);
    let entry = hdr.e_entry(endian);
    Ok(Plan {
        segments,
        lo,
        hi,
        relocs,
        relro: sum.relro,
        entry,
        copies,
    })
}

/// Options of [`load_image`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Bound on each remote system call and each IFUNC resolver call.
    pub call_timeout: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            call_timeout: remote::DEFAULT_TIMEOUT,
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
}

impl fmt::Debug for LoadedImage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedImage")
            .field("tid", &self.tid)
            .field("image", &self.image.as_ref().map(|i| (&i.path, i.bias)))
            .finish()
    }
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
    let libs = ProcessLibraries::read(tracee.pid())?;
    load_image_with(
        tracee, tid, new_path, new_bytes, new_tables, &libs, running, opts,
    )
}

/// [`load_image`] with the process's libraries already read.
#[allow(clippy::too_many_arguments)]
pub fn load_image_with<'t>(
    tracee: &'t mut Tracee,
    tid: Pid,
    new_path: &Path,
    new_bytes: &[u8],
    new_tables: FrameTables,
    libs: &ProcessLibraries,
    running: &Image,
    opts: &LoadOptions,
) -> Result<LoadedImage<'t>, LoadError> {
    let canon = std::fs::canonicalize(new_path).map_err(|source| LoadError::Io {
        path: new_path.to_path_buf(),
        source,
    })?;
    let plan = plan_load(&canon, new_bytes, libs)?;
    let pid = tracee.pid();
    let running_gadget = running_gadget(pid, running)?;
    let mut rc = RemoteCalls::new(tracee, tid, running_gadget)?;
    rc.set_timeout(opts.call_timeout);
    let len = plan.hi - plan.lo;
    let base = rc.mmap(
        RuntimeAddr(0),
        len,
        libc::PROT_NONE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        -1,
        0,
    )?;
    let bias = LoadBias(base.0.wrapping_sub(plan.lo));
    let mapped = map_and_relocate(&mut rc, &canon, &plan, bias);
    let mapped = mapped.and_then(|r| {
        let maps = procfs::read_maps(pid)?;
        let shown = maps.iter().any(|m| {
            m.perms.exec
                && m.file() == Some(canon.as_path())
                && base <= m.start
                && m.end.0 <= base.0 + len
        });
        if shown {
            Ok(r)
        } else {
            Err(LoadError::NotMapped {
                pid: pid.as_raw(),
                path: canon.clone(),
                addr: base,
            })
        }
    });
    let report = match mapped {
        Ok(r) => r,
        Err(e) => {
            let _ = rc.munmap(base, len);
            return Err(e);
        }
    };
    if let Err(e) = rc.finish() {
        // Restoring the thread failed (is it gone?): try to unmap NEW in a
        // new session so as not to leave it behind.
        if let Ok(mut again) = RemoteCalls::new(tracee, tid, running_gadget) {
            let _ = again.munmap(base, len);
            let _ = again.finish();
        }
        return Err(e.into());
    }
    let text = if new_tables.binary.text_size > 0 {
        let start = new_tables.binary.text_addr.to_runtime(bias);
        start..RuntimeAddr(start.0.wrapping_add(new_tables.binary.text_size))
    } else {
        let x: Vec<&Segment> = plan
            .segments
            .iter()
            .filter(|s| s.flags & elf::PF_X.0 != 0)
            .collect();
        let lo = x.iter().map(|s| s.vaddr).min().unwrap_or(plan.lo);
        let hi = x.iter().map(|s| s.vaddr + s.memsz).max().unwrap_or(plan.lo);
        LinkAddr(lo).to_runtime(bias)..LinkAddr(hi).to_runtime(bias)
    };
    let image = Image {
        path: canon,
        bias,
        tables: new_tables,
        text,
        span: base..RuntimeAddr(base.0 + len),
    };
    let new_gadget = LinkAddr(plan.entry).to_runtime(bias);
    let mut report = report;
    report.copies = plan.copies.clone();
    report.libraries = libs.objects.iter().map(|o| o.path.clone()).collect();
    Ok(LoadedImage {
        tracee,
        tid,
        image: Some(image),
        running_gadget,
        new_gadget,
        timeout: opts.call_timeout,
        report,
    })
}

/// The running image's entry point, checked to be its code.
fn running_gadget(pid: Pid, running: &Image) -> Result<RuntimeAddr, LoadError> {
    // The program's own entry (AT_ENTRY) when it is the running image: exact
    // even if its file was replaced on disk since.
    let at_entry = procfs::read_auxv(pid)
        .ok()
        .and_then(|a| procfs::auxv_value(&a, procfs::AT_ENTRY).ok())
        .map(RuntimeAddr)
        .filter(|a| running.span.contains(a));
    let g = match at_entry {
        Some(a) => a,
        None => remote::entry_gadget(&running.path, running.bias)?,
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

/// Map NEW's segments into the reserved span at `bias` and relocate them.
fn map_and_relocate(
    rc: &mut RemoteCalls<'_>,
    path: &Path,
    plan: &Plan,
    bias: LoadBias,
) -> Result<LoadReport, LoadError> {
    let fd = rc.openat(path, libc::O_RDONLY | libc::O_CLOEXEC, 0)?;
    let r = map_segments(rc, fd, plan, bias);
    let closed = rc.close(fd);
    r?;
    closed?;
    let at = |off: u64| LinkAddr(off).to_runtime(bias);
    let mut report = LoadReport::default();
    let mut ifuncs: HashMap<u64, u64> = HashMap::new();
    for (off, v) in &plan.relocs {
        let value = match v {
            Value::Base(x) => bias.0.wrapping_add(*x),
            Value::Abs(x) => *x,
            Value::Ifunc {
                resolver,
                addend,
                symbol,
            } => {
                let impl_addr = match ifuncs.get(&resolver.0) {
                    Some(&a) => a,
                    None => {
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
            Value::LocalIfunc { resolver, symbol } => {
                let r = RuntimeAddr(bias.0.wrapping_add(*resolver));
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
            Value::Copy { src, size, symbol } => {
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
        rc.memory().write_u64(at(*off), value)?;
        report.relocations += 1;
    }
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
    plan: &Plan,
    bias: LoadBias,
) -> Result<(), LoadError> {
    let at = |off: u64| LinkAddr(off).to_runtime(bias);
    for s in &plan.segments {
        let start = page_down(s.vaddr);
        let file_end = s.vaddr + s.filesz;
        let mem_end = s.vaddr + s.memsz;
        let mut anon_start = start;
        if s.filesz > 0 {
            let map_end = page_up(file_end).unwrap_or(file_end);
            rc.mmap(
                at(start),
                map_end - start,
                s.prot(),
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                fd,
                page_down(s.offset),
            )?;
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

/// What [`LoadedImage::commit`] will do, computed (read-only) beforehand so
/// that an impossible step is found before anything is written.
#[derive(Clone, Debug)]
pub struct CommitPlan {
    /// Signal handlers to re-register.
    pub handlers: Vec<HandlerMove>,
    /// `.dynamic` entries of the old image to rewrite.
    pub fini: FiniRedirect,
    /// Executable mappings of the old image to make read-only.
    pub retire: Vec<Range<RuntimeAddr>>,
    /// Things the caller may want to report.
    pub warnings: Vec<String>,
    /// The old image's file.
    pub old_path: PathBuf,
}

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

    /// What loading did.
    pub fn report(&self) -> &LoadReport {
        &self.report
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
        let pid = self.tracee.pid();
        let mut rc = RemoteCalls::new(self.tracee, self.tid, self.new_gadget)?;
        rc.set_timeout(self.timeout);
        let mapper = function_mapper(running, new);
        let handlers = plan_signal_handlers(&mut rc, running, &mapper);
        let fini = handlers
            .as_ref()
            .ok()
            .map(|_| plan_fini_redirect(&*rc.memory(), pid, new));
        rc.finish()?;
        let handlers = handlers?;
        let fini = match fini {
            Some(f) => f?,
            None => FiniRedirect::default(),
        };
        let retire = plan_retire(pid, running)?;
        let mut warnings = Vec::new();
        for (name, _) in &self.report.copies {
            if name == "environ" || name == "__environ" {
                warnings.push(format!(
                    "{name}: the new version reads its own copy, set from the current value; \
                     later setenv/putenv update the copy libc uses (in {})",
                    running.path.display()
                ));
            }
        }
        Ok(CommitPlan {
            handlers,
            fini,
            retire,
            warnings,
            old_path: running.path.clone(),
        })
    }

    /// Apply `plan`: redirect the destructors, move the signal handlers,
    /// make the old image's code non-executable. On failure the steps done
    /// are undone and the guard (dropped) unloads NEW. Returns NEW's image.
    pub fn commit(mut self, plan: &CommitPlan) -> Result<Image, LoadError> {
        let mut rc = RemoteCalls::new(self.tracee, self.tid, self.new_gadget)?;
        rc.set_timeout(self.timeout);
        let applied = apply_commit(&mut rc, plan);
        let finished = rc.finish();
        applied?;
        finished?;
        Ok(self
            .image
            .take()
            .expect("image present until commit or unload"))
    }

    /// Unmap NEW (the update is abandoned).
    pub fn unload(mut self) -> Result<(), LoadError> {
        self.unload_inner()
    }

    fn unload_inner(&mut self) -> Result<(), LoadError> {
        let Some(image) = self.image.take() else {
            return Ok(());
        };
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

fn apply_commit(rc: &mut RemoteCalls<'_>, plan: &CommitPlan) -> Result<(), LoadError> {
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
    let undo = |rc: &mut RemoteCalls<'_>, retired: &[Range<RuntimeAddr>]| {
        for r in retired {
            let _ = rc.mprotect(
                r.start,
                r.end.0 - r.start.0,
                libc::PROT_READ | libc::PROT_EXEC,
            );
        }
        let _ = revert_signal_handlers(rc, &plan.handlers);
        let _ = plan.fini.revert(rc.memory());
    };
    if let Err(e) = apply_signal_handlers(rc, &plan.handlers) {
        undo(rc, &[]);
        return Err(e);
    }
    for (i, r) in plan.retire.iter().enumerate() {
        if let Err(e) = rc.mprotect(r.start, r.end.0 - r.start.0, libc::PROT_READ) {
            undo(rc, &plan.retire[..i]);
            return Err(e.into());
        }
    }
    Ok(())
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

/// Maps a code address of `running` to the same function of `new` by name:
/// only function entries map (a handler is a function).
pub fn function_mapper<'a>(
    running: &'a Image,
    new: &'a Image,
) -> impl Fn(RuntimeAddr) -> Option<RuntimeAddr> + 'a {
    move |a: RuntimeAddr| {
        let link = running.link(a)?;
        let f = running.tables.function_at(link)?;
        if f.low != link {
            return None;
        }
        let nf = new.tables.function(&f.name)?;
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
pub fn plan_signal_handlers(
    rc: &mut RemoteCalls<'_>,
    running: &Image,
    map: &dyn Fn(RuntimeAddr) -> Option<RuntimeAddr>,
) -> Result<Vec<HandlerMove>, LoadError> {
    let mut out = Vec::new();
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let old = match rc.rt_sigaction(sig, None) {
            Ok(a) => a,
            Err(RemoteError::Syscall { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
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
    Ok(out)
}

/// Install the planned actions.
pub fn apply_signal_handlers(
    rc: &mut RemoteCalls<'_>,
    moves: &[HandlerMove],
) -> Result<(), LoadError> {
    for m in moves {
        rc.rt_sigaction(m.sig, Some(&m.new))?;
    }
    Ok(())
}

/// Put the old actions back.
pub fn revert_signal_handlers(
    rc: &mut RemoteCalls<'_>,
    moves: &[HandlerMove],
) -> Result<(), LoadError> {
    for m in moves {
        rc.rt_sigaction(m.sig, Some(&m.old))?;
    }
    Ok(())
}

/// Re-register every signal handler that is code of `running` at the
/// function `map` gives (see [`function_mapper`]); returns what moved.
pub fn move_signal_handlers(
    rc: &mut RemoteCalls<'_>,
    running: &Image,
    map: &dyn Fn(RuntimeAddr) -> Option<RuntimeAddr>,
) -> Result<Vec<HandlerMove>, LoadError> {
    let moves = plan_signal_handlers(rc, running, map)?;
    if let Err(e) = apply_signal_handlers(rc, &moves) {
        let _ = revert_signal_handlers(rc, &moves);
        return Err(e);
    }
    Ok(moves)
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
        for w in &self.writes {
            mem.write_u64(w.addr, w.new)?;
        }
        Ok(())
    }
    /// Write the old values back.
    pub fn revert(&self, mem: &mut impl TargetMemory) -> Result<(), MemError> {
        for w in &self.writes {
            mem.write_u64(w.addr, w.old)?;
        }
        Ok(())
    }
}

/// The program the process was started from, as the dynamic linker knows
/// it (the first `link_map` entry): its file and bias (`l_addr`, from
/// `AT_ENTRY`). After updates this is still the first version.
pub fn main_program(pid: Pid) -> Result<(PathBuf, LoadBias), LoadError> {
    let (exe, bias, _) = main_program_data(pid)?;
    Ok((exe, bias))
}

/// [`main_program`] and the bytes of its file (read through
/// `/proc/PID/exe`, so a program rebuilt in place since is no problem).
fn main_program_data(pid: Pid) -> Result<(PathBuf, LoadBias, Vec<u8>), LoadError> {
    let exe = strip_deleted(procfs::exe_path(pid)?);
    let data = read_elf(&PathBuf::from(format!("/proc/{pid}/exe")))?;
    let hdr = Hdr::parse(&*data).map_err(|e| parse_err(&exe, e))?;
    let endian = hdr.endian().map_err(|e| parse_err(&exe, e))?;
    let auxv = procfs::read_auxv(pid)?;
    let bias = procfs::load_bias_from_auxv(&auxv, LinkAddr(hdr.e_entry(endian)))?;
    Ok((exe, bias, data))
}

/// Compute how to make the dynamic linker run NEW's destructors at exit.
/// It runs the *main program's* `DT_FINI_ARRAY` and `DT_FINI` as `l_addr +
/// d_ptr`, reading the entries of that program's `.dynamic` in memory when
/// the process exits (it keeps pointers to the entries, not their values).
/// The main program is the first version even after several updates
/// ([`main_program`]), so each of its `d_ptr` becomes NEW's runtime address
/// minus the main program's bias.
pub fn plan_fini_redirect(
    mem: &impl TargetMemory,
    pid: Pid,
    new: &Image,
) -> Result<FiniRedirect, LoadError> {
    let (main_path, main_bias, main_data) = main_program_data(pid)?;
    let fini_err = |reason: String| LoadError::Fini {
        old: main_path.clone(),
        new: new.path.clone(),
        reason,
    };
    let old_sum = summarize(&main_path, &main_data)?;
    let new_sum = summarize(&new.path, &read_elf(&new.path)?)?;
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
    for i in 0..count {
        let at = RuntimeAddr(base.0.wrapping_add(i * 16));
        let tag = mem.read_u64(at)?;
        let val_at = RuntimeAddr(at.0.wrapping_add(8));
        let old = mem.read_u64(val_at)?;
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

/// [`plan_fini_redirect`] and apply it (through `/proc/PID/mem`, which
/// writes the read-only RELRO pages too).
pub fn redirect_fini(
    mem: &mut impl TargetMemory,
    pid: Pid,
    new: &Image,
) -> Result<FiniRedirect, LoadError> {
    let plan = plan_fini_redirect(&*mem, pid, new)?;
    plan.apply(mem)?;
    Ok(plan)
}

/// The executable mappings of `running` in process `pid`.
pub fn plan_retire(pid: Pid, running: &Image) -> Result<Vec<Range<RuntimeAddr>>, LoadError> {
    Ok(procfs::read_maps(pid)?
        .into_iter()
        .filter(|m| {
            m.perms.exec
                && m.file() == Some(running.path.as_path())
                && m.start < running.span.end
                && running.span.start < m.end
        })
        .map(|m| m.start..m.end)
        .collect())
}

/// Make the executable mappings of `running` read-only (`PROT_READ`), so a
/// stale pointer into old code traps. The session's gadget must not be in
/// them (use NEW's entry point). Returns the ranges changed.
pub fn retire_old_image(
    rc: &mut RemoteCalls<'_>,
    running: &Image,
) -> Result<Vec<Range<RuntimeAddr>>, LoadError> {
    let ranges = plan_retire(rc.pid(), running)?;
    let g = rc.gadget_range();
    if ranges.iter().any(|r| r.start < g.end && g.start < r.end) {
        return Err(LoadError::GadgetInRetired {
            gadget: g.start,
            path: running.path.clone(),
        });
    }
    for r in &ranges {
        rc.mprotect(r.start, r.end.0 - r.start.0, libc::PROT_READ)?;
    }
    Ok(ranges)
}
