//! An ELF file's bytes parsed into what the loader, the library registry,
//! the image finder and the patcher need. Every ELF header of the project
//! outside the DWARF reader is parsed here; the bytes are handed in (whole,
//! or through an [`object::ReadCache`] so that only the parts needed are
//! read) and treated as hostile: every count is capped and every
//! malformation is an [`ElfError`].

use object::elf;
use object::read::elf::{
    Dyn as _, FileHeader as _, ProgramHeader as _, Rela as _, SectionHeader as _, Sym as _,
};
use object::{Endianness, ReadRef, SymbolIndex};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

type Hdr = elf::FileHeader64<Endianness>;

/// ELF files larger than this are refused.
pub const MAX_ELF_SIZE: u64 = 1 << 30;
/// The page size of x86-64 Linux.
pub const PAGE_SIZE: u64 = 4096;
/// `PROT_READ`, `PROT_WRITE`, `PROT_EXEC` of Linux (`<sys/mman.h>`).
const PROT_READ: i32 = 1;
const PROT_WRITE: i32 = 2;
const PROT_EXEC: i32 = 4;
/// Upper bound on the program headers of one ELF file.
const MAX_SEGMENTS: usize = 1 << 12;
/// Upper bound on the relocations of one ELF file.
const MAX_RELOCS: usize = 1 << 24;

/// Why an ELF file could not be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_ELF_SIZE`].
    #[error("{path}: larger than {cap} bytes")]
    TooLarge { path: PathBuf, cap: u64 },
    /// The bytes are not a well-formed 64-bit little-endian ELF file.
    #[error("{path}: not a valid ELF file: {reason}")]
    Malformed { path: PathBuf, reason: String },
    /// More program headers than anyone builds.
    #[error("{path}: not a valid ELF file: {count} program headers (at most {cap})")]
    TooManySegments {
        path: PathBuf,
        count: usize,
        cap: usize,
    },
    /// More relocations than anyone builds.
    #[error("{path}: not a valid ELF file: more than {cap} relocations")]
    TooManyRelocations { path: PathBuf, cap: usize },
    /// `SHT_REL` (implicit addends) does not exist on x86-64.
    #[error("{path}: not a valid ELF file: SHT_REL relocations on x86-64")]
    RelOnX86_64 { path: PathBuf },
}

pub(crate) fn malformed(path: &Path, e: impl fmt::Display) -> ElfError {
    ElfError::Malformed {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// One `PT_LOAD` segment, in link-time addresses and file offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
    /// `PF_*` flags.
    pub flags: u32,
}

impl Segment {
    /// Whether the segment is code (`PF_X`).
    pub fn exec(&self) -> bool {
        self.flags & elf::PF_X.0 != 0
    }

    /// The `PROT_*` bits its mapping gets.
    pub fn prot(&self) -> i32 {
        let mut p = 0;
        if self.flags & elf::PF_R.0 != 0 {
            p |= PROT_READ;
        }
        if self.flags & elf::PF_W.0 != 0 {
            p |= PROT_WRITE;
        }
        if self.exec() {
            p |= PROT_EXEC;
        }
        p
    }
}

/// An ELF file's header, program headers and `.dynamic`: what is cheap to
/// read (a few pages) and enough to place, check and describe the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ElfSummary {
    /// `e_type` (`ET_DYN` for PIE and libraries, `ET_EXEC` for fixed).
    pub e_type: u16,
    /// `e_machine`.
    pub machine: u16,
    /// `e_entry` (link-time; 0 for most libraries).
    pub entry: u64,
    /// `PT_LOAD` segments, in program-header order.
    pub loads: Vec<Segment>,
    /// Has a `PT_TLS` segment (thread-local variables of its own).
    pub tls: bool,
    /// `PT_GNU_RELRO` (vaddr, memsz).
    pub relro: Option<(u64, u64)>,
    /// `PT_DYNAMIC` (vaddr, memsz).
    pub dynamic: Option<(u64, u64)>,
    /// `DT_NEEDED` names.
    pub needed: Vec<String>,
    /// `DT_SONAME`.
    pub soname: Option<String>,
    /// `DT_FINI`.
    pub fini: Option<u64>,
    /// `DT_FINI_ARRAY`.
    pub fini_array: Option<u64>,
    /// `DT_FINI_ARRAYSZ`.
    pub fini_array_sz: Option<u64>,
    /// File range (offset, size) of the `.upstare` section, if any.
    pub tables: Option<(u64, u64)>,
}

impl ElfSummary {
    /// Parse the ELF file `data` (named `path` in errors).
    pub fn parse<'d, R: ReadRef<'d>>(path: &Path, data: R) -> Result<ElfSummary, ElfError> {
        let err = |e: object::read::Error| malformed(path, e);
        let hdr = Hdr::parse(data).map_err(err)?;
        let endian = hdr.endian().map_err(err)?;
        if endian != Endianness::Little {
            return Err(malformed(path, "big-endian"));
        }
        let mut s = ElfSummary {
            e_type: hdr.e_type(endian).0,
            machine: hdr.e_machine(endian).0,
            entry: hdr.e_entry(endian),
            ..ElfSummary::default()
        };
        let phdrs = hdr.program_headers(endian, data).map_err(err)?;
        if phdrs.len() > MAX_SEGMENTS {
            return Err(ElfError::TooManySegments {
                path: path.to_path_buf(),
                count: phdrs.len(),
                cap: MAX_SEGMENTS,
            });
        }
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
        let sections = hdr.sections(endian, data).map_err(err)?;
        s.tables = sections
            .section_by_name(endian, crate::fdt::SECTION_NAME.as_bytes())
            .map(|(_, sh)| sh.file_range(endian).unwrap_or((sh.sh_offset(endian), 0)));
        if let Some((dyns, link)) = sections.dynamic(endian, data).map_err(err)? {
            let strings = sections.strings(endian, data, link).map_err(err)?;
            for d in dyns {
                let tag = d.d_tag(endian);
                let val = d.d_val(endian);
                let string = || -> Result<String, ElfError> {
                    let b = d.string(endian, strings).map_err(err)?;
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

    /// Link-time range covering every `PT_LOAD` segment, page-aligned;
    /// `None` without segments or when one wraps.
    pub fn span(&self) -> Option<Range<u64>> {
        let lo = self.loads.iter().map(|s| page_down(s.vaddr)).min()?;
        let hi = self
            .loads
            .iter()
            .map(|s| s.vaddr.checked_add(s.memsz).and_then(page_up))
            .collect::<Option<Vec<u64>>>()?
            .into_iter()
            .max()?;
        Some(lo..hi)
    }
}

/// `a` rounded down to its page.
pub fn page_down(a: u64) -> u64 {
    a & !(PAGE_SIZE - 1)
}

/// `a` rounded up to a page boundary; `None` past the address space.
pub fn page_up(a: u64) -> Option<u64> {
    a.checked_add(PAGE_SIZE - 1).map(page_down)
}

/// One entry of `.dynsym`, with its symbol version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynSymbol {
    pub name: String,
    pub value: u64,
    pub size: u64,
    /// `STT_*`.
    pub kind: u8,
    /// `STB_*`.
    pub bind: u8,
    /// Defined in this file (not `SHN_UNDEF`).
    pub defined: bool,
    /// Version name (from `.gnu.version_d`, or `.gnu.version_r` for a
    /// reference); `None` if unversioned.
    pub version: Option<String>,
    /// Not the default version (`sym@VER` rather than `sym@@VER`).
    pub hidden: bool,
}

/// One `Elf64_Rela` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rela {
    /// Where it writes (link-time).
    pub offset: u64,
    /// `R_X86_64_*`.
    pub kind: u32,
    /// Index into `.dynsym` (0: none).
    pub symbol: u32,
    pub addend: i64,
}

/// The dynamic relocations of a file (those of its `SHF_ALLOC` sections).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Relocations {
    /// `.rela.dyn` and `.rela.plt`, in file order.
    pub rela: Vec<Rela>,
    /// `.relr.dyn` addresses (implicit addend: the word in the file).
    pub relr: Vec<u64>,
}

/// A function symbol (`.symtab` or `.dynsym`), for naming addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionSymbol {
    pub addr: u64,
    pub size: u64,
    pub name: String,
}

/// An ELF file whose bytes are all at hand, parsed: its [`ElfSummary`],
/// `.dynsym` with versions, and dynamic relocations.
#[derive(Clone, Debug)]
pub struct ElfFile {
    pub summary: ElfSummary,
    /// `.dynsym`, index-aligned (entry 0 is the null symbol).
    pub dynsyms: Vec<DynSymbol>,
    pub relocations: Relocations,
}

impl ElfFile {
    /// Parse the whole ELF file `data` (named `path` in errors).
    pub fn parse(path: &Path, data: &[u8]) -> Result<ElfFile, ElfError> {
        let summary = ElfSummary::parse(path, data)?;
        let err = |e: object::read::Error| malformed(path, e);
        let hdr = Hdr::parse(data).map_err(err)?;
        let endian = hdr.endian().map_err(err)?;
        let sections = hdr.sections(endian, data).map_err(err)?;
        let dynsym = sections
            .symbols(endian, data, elf::SHT_DYNSYM)
            .map_err(err)?;
        let versions = sections.versions(endian, data).map_err(err)?;
        let mut dynsyms = Vec::with_capacity(dynsym.len());
        for (i, sym) in dynsym.symbols().iter().enumerate() {
            let name = sym.name(endian, dynsym.strings()).map_err(err)?;
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
            dynsyms.push(DynSymbol {
                name: String::from_utf8_lossy(name).into_owned(),
                value: sym.st_value(endian),
                size: sym.st_size(endian),
                kind: sym.st_type().0,
                bind: sym.st_bind().0,
                defined: sym.st_shndx(endian) != elf::SHN_UNDEF,
                version,
                hidden,
            });
        }
        let mut relocations = Relocations::default();
        let too_many = || ElfError::TooManyRelocations {
            path: path.to_path_buf(),
            cap: MAX_RELOCS,
        };
        for s in sections.iter() {
            if s.sh_flags(endian).0 & elf::SHF_ALLOC.0 == 0 {
                continue;
            }
            if s.sh_type(endian) == elf::SHT_REL {
                return Err(ElfError::RelOnX86_64 {
                    path: path.to_path_buf(),
                });
            }
            if let Some((relas, _link)) = s.rela(endian, data).map_err(err)? {
                for r in relas {
                    if relocations.rela.len() >= MAX_RELOCS {
                        return Err(too_many());
                    }
                    relocations.rela.push(Rela {
                        offset: r.r_offset(endian),
                        kind: r.r_type(endian, false).0,
                        symbol: r.r_sym(endian, false),
                        addend: r.r_addend(endian),
                    });
                }
            }
            if let Some(relrs) = s.relr(endian, data).map_err(err)? {
                for a in relrs {
                    if relocations.relr.len() >= MAX_RELOCS {
                        return Err(too_many());
                    }
                    relocations.relr.push(a);
                }
            }
        }
        Ok(ElfFile {
            summary,
            dynsyms,
            relocations,
        })
    }

    /// `.dynsym` entry `index`.
    pub fn dynsym(&self, path: &Path, index: u32) -> Result<&DynSymbol, ElfError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.dynsyms.get(i))
            .ok_or_else(|| malformed(path, format!("symbol index {index} out of .dynsym")))
    }
}

/// The function symbols (`STT_FUNC`, `STT_GNU_IFUNC`) of `.symtab` and
/// `.dynsym` at a non-zero address, sorted by address then name, without
/// duplicates.
pub fn function_symbols(path: &Path, data: &[u8]) -> Result<Vec<FunctionSymbol>, ElfError> {
    let err = |e: object::read::Error| malformed(path, e);
    let hdr = Hdr::parse(data).map_err(err)?;
    let endian = hdr.endian().map_err(err)?;
    let sections = hdr.sections(endian, data).map_err(err)?;
    let mut out = Vec::new();
    for kind in [elf::SHT_SYMTAB, elf::SHT_DYNSYM] {
        let table = sections.symbols(endian, data, kind).map_err(err)?;
        for sym in table.symbols() {
            let t = sym.st_type();
            let addr = sym.st_value(endian);
            if (t != elf::STT_FUNC && t != elf::STT_GNU_IFUNC) || addr == 0 {
                continue;
            }
            let Some(name) = sym
                .name(endian, table.strings())
                .ok()
                .and_then(|n| std::str::from_utf8(n).ok())
            else {
                continue;
            };
            out.push(FunctionSymbol {
                addr,
                size: sym.st_size(endian),
                name: name.to_string(),
            });
        }
    }
    out.sort_by(|a, b| (a.addr, &a.name).cmp(&(b.addr, &b.name)));
    out.dedup_by(|a, b| a.addr == b.addr && a.name == b.name);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test binary: a real PIE with `.dynamic`, `.dynsym`, relocations.
    fn own_bytes() -> Vec<u8> {
        std::fs::read("/proc/self/exe").expect("read own executable")
    }

    #[test]
    fn summary_of_a_compiled_binary() {
        let bytes = own_bytes();
        let p = Path::new("self");
        let s = ElfSummary::parse(p, &*bytes).expect("summary");
        assert_eq!(s.machine, elf::EM_X86_64.0);
        assert!(s.e_type == elf::ET_DYN.0 || s.e_type == elf::ET_EXEC.0);
        assert_ne!(s.entry, 0);
        assert!(s.loads.iter().any(Segment::exec), "{:?}", s.loads);
        assert!(s.dynamic.is_some());
        assert!(s.needed.iter().any(|n| n.starts_with("libc.so")), "{s:?}");
        assert_eq!(s.tables, None, "a test binary is not instrumented");
        let span = s.span().expect("span");
        assert!(span.start < span.end && span.start.is_multiple_of(PAGE_SIZE));
        // The same summary through a reader that reads only what it needs.
        let file = std::fs::File::open("/proc/self/exe").expect("open");
        let cache = object::ReadCache::new(file);
        assert_eq!(ElfSummary::parse(p, &cache).expect("summary"), s);
        let f = ElfFile::parse(p, &bytes).expect("parse");
        assert_eq!(f.summary, s);
        assert!(f.dynsyms.iter().any(|d| d.name == "getpid" && !d.defined));
        assert!(!f.relocations.rela.is_empty() || !f.relocations.relr.is_empty());
        assert!(f.dynsym(p, u32::MAX).is_err());
        let funcs = function_symbols(p, &bytes).expect("symbols");
        assert!(funcs.windows(2).all(|w| w[0].addr <= w[1].addr));
        assert!(funcs
            .iter()
            .any(|f| f.name.contains("summary_of_a_compiled_binary")));
    }

    #[test]
    fn truncated_and_hostile_bytes_are_errors() {
        let bytes = own_bytes();
        let p = Path::new("hostile");
        // Every prefix up to past the program headers, and a few beyond.
        let mut cuts: Vec<usize> = (0..1024.min(bytes.len())).collect();
        cuts.extend((1024..bytes.len()).step_by(bytes.len() / 64 + 1));
        for cut in cuts {
            let data = &bytes[..cut];
            // Never a panic; an error or (for long prefixes) a summary.
            let _ = ElfSummary::parse(p, data);
            let _ = ElfFile::parse(p, data);
            let _ = function_symbols(p, data);
        }
        assert!(matches!(
            ElfSummary::parse(p, &bytes[..10]),
            Err(ElfError::Malformed { .. })
        ));
        assert!(ElfFile::parse(p, &[]).is_err());
        // Garbage in the program header fields: counts and offsets.
        let mut bad = bytes.clone();
        // e_phnum past the cap (0xffff itself means "see section 0").
        bad[0x38..0x3a].copy_from_slice(&0xfff0u16.to_le_bytes());
        assert!(ElfSummary::parse(p, &*bad).is_err());
        let mut bad = bytes.clone();
        bad[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes()); // e_phoff
        assert!(ElfSummary::parse(p, &*bad).is_err());
        let mut bad = bytes.clone();
        bad[0x28..0x30].copy_from_slice(&(u64::MAX - 8).to_le_bytes()); // e_shoff
        assert!(ElfFile::parse(p, &bad).is_err());
        // Big-endian is refused, not misread.
        let mut bad = bytes.clone();
        bad[5] = 2;
        assert!(ElfSummary::parse(p, &*bad).is_err());
        // Messages name the file, not a debug dump.
        let e = ElfSummary::parse(p, &bytes[..10]).unwrap_err().to_string();
        assert!(e.starts_with("hostile: not a valid ELF file"), "{e}");
    }
}
