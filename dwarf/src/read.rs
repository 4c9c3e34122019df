//! Reads an x86-64 ELF's DWARF (`.debug_*`), line table and CFI into the
//! plain [`Program`] model.
//!
//! Every stack location is normalized to the CFA: gcc's frame base is
//! `DW_OP_call_frame_cfa` (fbreg n = CFA+n), clang's is `DW_OP_reg6`
//! (fbreg n = rbp+n = CFA+n-16, valid after the prologue).
//!
//! The input is untrusted: every walk is bounded, arithmetic is checked, and
//! nothing is allocated from a size read out of the file without a cap.

use crate::addr::{CfaOffset, LinkAddr, Reg};
use crate::cfi::{CfiError, EhFrameIndex, RegRule};
use crate::model::{
    type_size, ArrayDim, BaseEncoding, FrameBaseKind, Function, Global, LineRow, Member, Program,
    Qualifier, SavedReg, Type, TypeId, VarLocation, Variable,
};
use gimli::{constants as dw, AttributeValue, EndianSlice, LittleEndian, Operation};
use object::{Object, ObjectSection};
use std::borrow::Cow;
use std::collections::HashMap;
use thiserror::Error;

type R<'a> = EndianSlice<'a, LittleEndian>;
type Die<'a> = gimli::DebuggingInformationEntry<R<'a>>;
type Unit<'a> = gimli::Unit<R<'a>>;
/// Address ranges of a lexical scope, shared by the variables in it.
type Scope = std::rc::Rc<Vec<(LinkAddr, LinkAddr)>>;

const MAX_UNITS: usize = 1 << 20;
const MAX_DIES: usize = 1 << 26;
const MAX_DIE_DEPTH: usize = 1024;
const MAX_LINE_ROWS: usize = 1 << 26;
const MAX_RANGES_PER_DIE: usize = 1 << 16;
const MAX_EXPR_OPS: usize = 256;
const MAX_REF_HOPS: usize = 8;
/// Largest debug section we inflate from a compressed one.
const MAX_SECTION_SIZE: u64 = 1 << 30;

/// Why a binary could not be read. Each message is one line naming the
/// section, DIE or function at fault.
#[derive(Debug, Error)]
pub enum ReadError {
    /// The bytes do not start with the ELF magic.
    #[error("not an ELF file (starts with {0:02x?})")]
    NotElf(Vec<u8>),
    /// Shorter than an ELF header.
    #[error("truncated ELF: {len} bytes, the ELF header alone needs 64")]
    Truncated { len: usize },
    /// An ELF for another machine or class.
    #[error("not an x86-64 binary: {class}-bit ELF for machine {machine} ({name})")]
    NotX86_64 {
        class: u8,
        machine: u16,
        name: &'static str,
    },
    /// Big-endian ELF.
    #[error("not an x86-64 binary: big-endian ELF (machine {machine})")]
    BigEndian { machine: u16 },
    /// The ELF structure itself is broken (section headers out of bounds...).
    #[error("corrupt or truncated ELF: {0}")]
    CorruptElf(String),
    /// No `.debug_info`: stripped, or not compiled with `-g`.
    #[error("no DWARF: section .debug_info is missing (stripped binary, or built without -g)")]
    NoDebugInfo,
    /// A section's bytes could not be obtained.
    #[error("cannot read section {section}: {reason}")]
    Section {
        section: &'static str,
        reason: String,
    },
    /// gimli refused to parse part of a DWARF section.
    #[error("corrupt DWARF in section {section}{context}: {err}")]
    CorruptDwarf {
        section: &'static str,
        /// ` (function main)`, ` (DIE 0x2d)` or empty.
        context: String,
        err: gimli::Error,
    },
    /// Well-formed but inconsistent DWARF (dangling reference...).
    #[error("invalid DWARF in section {section}: {what}")]
    Invalid { section: &'static str, what: String },
    /// A hard limit on the size of the input was exceeded.
    #[error("too many {what} in {section} (limit {limit})")]
    TooMany {
        what: &'static str,
        section: &'static str,
        limit: usize,
    },
    /// The CFI (`.eh_frame`) is corrupt.
    #[error(transparent)]
    Cfi(#[from] CfiError),
    /// A dependency panicked on this input; caught so no caller ever sees a
    /// panic. Reports the panic message.
    #[error("internal error while reading DWARF (malformed input?): {0}")]
    Internal(String),
}

fn dw_err(section: &'static str) -> impl Fn(gimli::Error) -> ReadError {
    move |err| ReadError::CorruptDwarf {
        section,
        context: String::new(),
        err,
    }
}

fn dw_err_at(section: &'static str, context: String) -> impl FnOnce(gimli::Error) -> ReadError {
    move |err| ReadError::CorruptDwarf {
        section,
        context,
        err,
    }
}

fn invalid(section: &'static str, what: String) -> ReadError {
    ReadError::Invalid { section, what }
}

/// Names the function whose DIEs produced `e`.
fn in_function(e: ReadError, name: &str) -> ReadError {
    match e {
        ReadError::CorruptDwarf {
            section,
            context,
            err,
        } => ReadError::CorruptDwarf {
            section,
            context: format!("{context} in function `{name}`"),
            err,
        },
        ReadError::Invalid { section, what } => ReadError::Invalid {
            section,
            what: format!("{what} (in function `{name}`)"),
        },
        other => other,
    }
}

/// Reads the functions, frames, types, globals, line table and saved
/// registers of an x86-64 ELF built with `-g`.
///
/// `Function::saved_regs` holds the callee-saved registers whose CFI rule at
/// [`after_prologue`] is "saved at CFA+n"; it is empty when the binary has
/// no `.eh_frame`, no FDE covers the function, or the frame saves rbp
/// through an expression (gcc DRAP frames) — consumers that need rbp at
/// CFA-16 must check for it. Locations that are not plain CFA offsets
/// (location lists, realigned frames, registers) are
/// [`VarLocation::Complex`] with a readable description.
///
/// Never panics: a panic inside a dependency on hostile input is reported
/// as [`ReadError::Internal`].
pub fn read_program(elf: &[u8]) -> Result<Program, ReadError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_inner(elf))) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            Err(ReadError::Internal(msg))
        }
    }
}

fn machine_name(m: u16) -> &'static str {
    match m {
        2 => "SPARC",
        3 => "i386",
        8 => "MIPS",
        20 => "PowerPC",
        21 => "PowerPC64",
        22 => "S390",
        40 => "ARM",
        43 => "SPARCv9",
        62 => "x86-64",
        183 => "AArch64",
        243 => "RISC-V",
        258 => "LoongArch",
        _ => "unknown",
    }
}

/// Checks magic, class, endianness and machine from the raw header bytes, so
/// that a foreign binary gets a precise reason before `object` parses it.
fn check_header(elf: &[u8]) -> Result<(), ReadError> {
    let magic = elf.get(..4).unwrap_or(elf);
    if magic != b"\x7fELF" {
        return Err(ReadError::NotElf(magic.to_vec()));
    }
    // e_ident (16) + e_type (2) + e_machine (2) is all we need to name the
    // machine; the rest of the header is checked by `object`.
    let (Some(&class), Some(&data), Some(m)) = (elf.get(4), elf.get(5), elf.get(18..20)) else {
        return Err(ReadError::Truncated { len: elf.len() });
    };
    let machine = if data == 2 {
        u16::from_be_bytes([m[0], m[1]])
    } else {
        u16::from_le_bytes([m[0], m[1]])
    };
    if data == 2 {
        return Err(ReadError::BigEndian { machine });
    }
    let bits = match class {
        1 => 32,
        2 => 64,
        _ => 0,
    };
    if bits != 64 || machine != 62 {
        return Err(ReadError::NotX86_64 {
            class: bits,
            machine,
            name: machine_name(machine),
        });
    }
    if elf.len() < 64 {
        return Err(ReadError::Truncated { len: elf.len() });
    }
    Ok(())
}

const DEBUG_SECTIONS: [&str; 13] = [
    ".debug_abbrev",
    ".debug_addr",
    ".debug_aranges",
    ".debug_info",
    ".debug_line",
    ".debug_line_str",
    ".debug_str",
    ".debug_str_offsets",
    ".debug_types",
    ".debug_loc",
    ".debug_loclists",
    ".debug_ranges",
    ".debug_rnglists",
];

fn load_section<'a>(
    file: &object::File<'a>,
    name: &'static str,
) -> Result<Option<Cow<'a, [u8]>>, ReadError> {
    let Some(sec) = file.section_by_name(name) else {
        return Ok(None);
    };
    let err = |e: object::Error| ReadError::Section {
        section: name,
        reason: e.to_string(),
    };
    let c = sec.compressed_data().map_err(err)?;
    if c.format != object::CompressionFormat::None && c.uncompressed_size > MAX_SECTION_SIZE {
        return Err(ReadError::Section {
            section: name,
            reason: format!(
                "compressed section claims {} bytes uncompressed (limit {MAX_SECTION_SIZE})",
                c.uncompressed_size
            ),
        });
    }
    Ok(Some(c.decompress().map_err(err)?))
}

fn read_inner(elf: &[u8]) -> Result<Program, ReadError> {
    check_header(elf)?;
    let file = object::File::parse(elf).map_err(|e| ReadError::CorruptElf(e.to_string()))?;
    if file.section_by_name(".debug_info").is_none() {
        return Err(ReadError::NoDebugInfo);
    }
    let mut store: HashMap<&'static str, Cow<'_, [u8]>> = HashMap::new();
    for name in DEBUG_SECTIONS {
        if let Some(data) = load_section(&file, name)? {
            store.insert(name, data);
        }
    }
    let dwarf = gimli::Dwarf::load(|id| -> Result<R<'_>, ReadError> {
        let data = store.get(id.name()).map_or(&[][..], |c| &c[..]);
        Ok(EndianSlice::new(data, LittleEndian))
    })?;
    let cfi = match EhFrameIndex::from_object(&file) {
        Ok(index) => Some(index),
        Err(CfiError::NoEhFrame) => None,
        Err(e) => return Err(e.into()),
    };
    let mut reader = Reader::load(&dwarf)?;
    reader.build_types()?;
    reader.resolve_declarations()?;
    reader.build_lines()?;
    reader.build_functions_and_globals()?;
    let mut program = reader.finish();
    if let Some(cfi) = &cfi {
        fill_saved_regs(&mut program, cfi)?;
    }
    Ok(program)
}

/// One DIE of a unit, with its tree links.
struct Node<'a> {
    die: Die<'a>,
    parent: Option<usize>,
    children: Vec<usize>,
}

struct UnitInfo<'a> {
    unit: Unit<'a>,
    nodes: Vec<Node<'a>>,
    /// Line-program file index → index into `Reader::files`.
    files: Vec<u32>,
    /// Subtracted from a file index before looking it up in `files`
    /// (DWARF 5 numbers files from 0, earlier versions from 1).
    file_base: u64,
}

/// Internal classification of a location expression.
enum Loc {
    Fb(i64),
    FbDeref(i64),
    Addr(u64),
    Tls(u64),
    Other(String),
}

enum FrameBase {
    Cfa,
    Rbp,
    Other(String),
}

struct Reader<'d, 'a> {
    dwarf: &'d gimli::Dwarf<R<'a>>,
    units: Vec<UnitInfo<'a>>,
    /// `.debug_info` offset of a DIE → (unit, node).
    dies: HashMap<usize, (usize, usize)>,
    /// DWARF 5 type-unit signature → `.debug_info` offset of the type DIE.
    signatures: HashMap<u64, usize>,
    /// `.debug_info` offset of a type DIE → its type.
    type_ids: HashMap<usize, TypeId>,
    /// Unit index of each type, by [`TypeId`] (0 for void).
    type_units: Vec<usize>,
    types: Vec<Type>,
    void: TypeId,
    files: Vec<String>,
    file_ids: HashMap<String, u32>,
    lines: Vec<LineRow>,
    functions: Vec<Function>,
    globals: Vec<Global>,
    producers: Vec<String>,
    noreturn_functions: Vec<LinkAddr>,
    noreturn_declarations: Vec<String>,
    code_labels: Vec<LinkAddr>,
}

/// Marks keys of DIEs in `.debug_types`, whose offsets are a namespace of
/// their own (no file is anywhere near 2^62 bytes).
const DEBUG_TYPES_KEY: usize = 1 << 62;

/// A key unique across `.debug_info` and `.debug_types` for the DIE at
/// `offset` of the unit with `header`.
fn die_key(header: &gimli::UnitHeader<R<'_>>, offset: gimli::UnitOffset) -> Option<usize> {
    if let Some(g) = offset.to_debug_info_offset(header) {
        return Some(g.0);
    }
    offset
        .to_debug_types_offset(header)
        .map(|g| g.0 | DEBUG_TYPES_KEY)
}

fn lossy(r: R<'_>) -> String {
    String::from_utf8_lossy(r.slice()).into_owned()
}

fn is_type_tag(tag: gimli::DwTag) -> bool {
    matches!(
        tag,
        dw::DW_TAG_base_type
            | dw::DW_TAG_unspecified_type
            | dw::DW_TAG_pointer_type
            | dw::DW_TAG_reference_type
            | dw::DW_TAG_rvalue_reference_type
            | dw::DW_TAG_ptr_to_member_type
            | dw::DW_TAG_structure_type
            | dw::DW_TAG_class_type
            | dw::DW_TAG_union_type
            | dw::DW_TAG_array_type
            | dw::DW_TAG_enumeration_type
            | dw::DW_TAG_typedef
            | dw::DW_TAG_const_type
            | dw::DW_TAG_volatile_type
            | dw::DW_TAG_restrict_type
            | dw::DW_TAG_atomic_type
            | dw::DW_TAG_subroutine_type
            | dw::DW_TAG_packed_type
            | dw::DW_TAG_shared_type
            | dw::DW_TAG_immutable_type
    )
}

fn flag(die: &Die<'_>, at: gimli::DwAt) -> bool {
    matches!(die.attr_value(at), Some(AttributeValue::Flag(true)))
}

fn udata(die: &Die<'_>, at: gimli::DwAt) -> Option<u64> {
    die.attr(at).and_then(|a| a.udata_value())
}

fn join_path(dir: &str, name: &str) -> String {
    if dir.is_empty() || name.starts_with('/') {
        name.to_string()
    } else if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn reg_name(n: u16) -> String {
    match Reg::from_dwarf(n) {
        Some(r) => r.name().to_string(),
        None => format!("r{n}"),
    }
}

/// A short human-readable rendering of a location expression, for
/// [`VarLocation::Complex`].
fn describe_ops(ops: &[Operation<R<'_>>]) -> String {
    let parts: Vec<String> = ops
        .iter()
        .map(|op| match op {
            Operation::FrameOffset { offset } => format!("fbreg {offset}"),
            Operation::RegisterOffset {
                register, offset, ..
            } => format!("breg{} ({}) {offset:+}", register.0, reg_name(register.0)),
            Operation::Register { register } => {
                format!("reg{} ({})", register.0, reg_name(register.0))
            }
            Operation::Deref { .. } => "deref".into(),
            Operation::Address { address } => format!("addr {address:#x}"),
            Operation::AddressIndex { index } => format!("addrx {}", index.0),
            Operation::UnsignedConstant { value } => format!("const {value}"),
            Operation::SignedConstant { value } => format!("const {value}"),
            Operation::PlusConstant { value } => format!("plus_uconst {value}"),
            Operation::TLS => "tls".into(),
            Operation::CallFrameCFA => "call_frame_cfa".into(),
            Operation::StackValue => "stack_value".into(),
            Operation::Piece {
                size_in_bits,
                bit_offset,
            } => match bit_offset {
                Some(b) => format!("bit_piece {size_in_bits} {b}"),
                None => format!("piece {}", size_in_bits / 8),
            },
            Operation::EntryValue { .. } => "entry_value".into(),
            Operation::ImplicitValue { .. } => "implicit_value".into(),
            Operation::ImplicitPointer { .. } => "implicit_pointer".into(),
            // Only the operation's name (the variant), never its fields.
            other => format!("{other:?}") // debug-name: the variant only
                .split(|c: char| !c.is_ascii_alphanumeric())
                .next()
                .unwrap_or("operation")
                .to_lowercase(),
        })
        .collect();
    parts.join(", ")
}

impl<'d, 'a> Reader<'d, 'a> {
    /// Reads every unit's DIE tree into memory (iteratively, with bounded
    /// depth) and assigns a [`TypeId`] to every type DIE.
    fn load(dwarf: &'d gimli::Dwarf<R<'a>>) -> Result<Self, ReadError> {
        let mut r = Reader {
            dwarf,
            units: Vec::new(),
            dies: HashMap::new(),
            signatures: HashMap::new(),
            type_ids: HashMap::new(),
            type_units: vec![0],
            types: vec![Type::Void],
            void: TypeId(0),
            files: Vec::new(),
            file_ids: HashMap::new(),
            lines: Vec::new(),
            functions: Vec::new(),
            globals: Vec::new(),
            producers: Vec::new(),
            noreturn_functions: Vec::new(),
            noreturn_declarations: Vec::new(),
            code_labels: Vec::new(),
        };
        let mut total_dies = 0usize;
        let mut headers = dwarf.units();
        while let Some(header) = headers.next().map_err(dw_err(".debug_info"))? {
            r.load_unit(header, ".debug_info", &mut total_dies)?;
        }
        // DWARF 4 type units (-fdebug-types-section) live in their own
        // section; DWARF 5 ones are in .debug_info and were read above.
        let mut headers = dwarf.type_units();
        while let Some(header) = headers.next().map_err(dw_err(".debug_types"))? {
            r.load_unit(header, ".debug_types", &mut total_dies)?;
        }
        Ok(r)
    }

    fn load_unit(
        &mut self,
        header: gimli::UnitHeader<R<'a>>,
        section: &'static str,
        total_dies: &mut usize,
    ) -> Result<(), ReadError> {
        if self.units.len() >= MAX_UNITS {
            return Err(ReadError::TooMany {
                what: "units",
                section,
                limit: MAX_UNITS,
            });
        }
        let ctx = format!(" (unit at {:#x})", header.offset().0);
        let unit = self
            .dwarf
            .unit(header)
            .map_err(dw_err_at(section, ctx.clone()))?;
        let ui = self.units.len();
        let mut nodes: Vec<Node<'a>> = Vec::new();
        let mut path: Vec<usize> = Vec::new();
        let mut cursor = unit.entries();
        while let Some(die) = cursor.next_dfs().map_err(dw_err_at(section, ctx.clone()))? {
            *total_dies += 1;
            if *total_dies > MAX_DIES {
                return Err(ReadError::TooMany {
                    what: "DIEs",
                    section,
                    limit: MAX_DIES,
                });
            }
            let depth = usize::try_from(die.depth()).map_err(|_| {
                invalid(
                    section,
                    format!(
                        "DIE at unit offset {:#x}{ctx} is outside its unit's tree",
                        die.offset().0
                    ),
                )
            })?;
            if depth > path.len() || depth > MAX_DIE_DEPTH {
                return Err(invalid(
                    section,
                    format!(
                        "DIE at unit offset {:#x}{ctx}: bad nesting depth {depth}",
                        die.offset().0
                    ),
                ));
            }
            path.truncate(depth);
            let idx = nodes.len();
            let parent = path.last().copied();
            if let Some(p) = parent {
                nodes[p].children.push(idx);
            }
            path.push(idx);
            nodes.push(Node {
                die: die.clone(),
                parent,
                children: Vec::new(),
            });
        }
        drop(cursor);
        for (ni, node) in nodes.iter().enumerate() {
            let Some(key) = die_key(&unit.header, node.die.offset()) else {
                continue;
            };
            self.dies.insert(key, (ui, ni));
            if is_type_tag(node.die.tag()) {
                let id =
                    TypeId(
                        u32::try_from(self.types.len()).map_err(|_| ReadError::TooMany {
                            what: "types",
                            section,
                            limit: u32::MAX as usize,
                        })?,
                    );
                self.types.push(Type::Void);
                self.type_units.push(ui);
                self.type_ids.insert(key, id);
            }
        }
        if let gimli::UnitType::Type {
            type_signature,
            type_offset,
        } = unit.header.type_()
        {
            if let Some(key) = die_key(&unit.header, type_offset) {
                self.signatures.insert(type_signature.0, key);
            }
        }
        self.units.push(UnitInfo {
            unit,
            nodes,
            files: Vec::new(),
            file_base: 0,
        });
        Ok(())
    }

    fn finish(mut self) -> Program {
        self.functions.sort_by_key(|f| (f.low, f.high));
        self.globals
            .sort_by(|a, b| (a.tls, a.addr, &a.name).cmp(&(b.tls, b.addr, &b.name)));
        // End-of-sequence markers first at equal addresses, so a function
        // starting where the previous sequence ends begins with its own row.
        self.lines.sort_by_key(|r| (r.addr, !r.end_sequence));
        for v in [&mut self.noreturn_functions, &mut self.code_labels] {
            v.sort();
            v.dedup();
        }
        self.noreturn_declarations.sort();
        self.noreturn_declarations.dedup();
        Program {
            functions: self.functions,
            types: self.types,
            globals: self.globals,
            files: self.files,
            lines: self.lines,
            producers: self.producers,
            noreturn_functions: self.noreturn_functions,
            noreturn_declarations: self.noreturn_declarations,
            code_labels: self.code_labels,
        }
    }

    fn die_ctx(&self, ui: usize, ni: usize) -> String {
        let u = &self.units[ui];
        match die_key(&u.unit.header, u.nodes[ni].die.offset()) {
            Some(k) if k & DEBUG_TYPES_KEY != 0 => {
                format!(" (DIE at .debug_types+{:#x})", k & !DEBUG_TYPES_KEY)
            }
            Some(k) => format!(" (DIE at {k:#x})"),
            None => String::new(),
        }
    }

    /// The [`die_key`] a reference attribute points to.
    fn ref_target(&self, ui: usize, v: AttributeValue<R<'a>>) -> Option<usize> {
        match v {
            AttributeValue::UnitRef(o) => die_key(&self.units[ui].unit.header, o),
            AttributeValue::DebugInfoRef(o) => Some(o.0),
            AttributeValue::DebugTypesRef(sig) => self.signatures.get(&sig.0).copied(),
            _ => None,
        }
    }

    /// Finds attribute `at` on the DIE, or on the DIE its
    /// `DW_AT_abstract_origin` / `DW_AT_specification` leads to.
    fn attr_follow(
        &self,
        ui: usize,
        ni: usize,
        at: gimli::DwAt,
    ) -> Option<(usize, usize, AttributeValue<R<'a>>)> {
        let (mut u, mut n) = (ui, ni);
        for _ in 0..MAX_REF_HOPS {
            let die = &self.units[u].nodes[n].die;
            if let Some(v) = die.attr_value(at) {
                return Some((u, n, v));
            }
            let next = die
                .attr_value(dw::DW_AT_abstract_origin)
                .or_else(|| die.attr_value(dw::DW_AT_specification))?;
            let g = self.ref_target(u, next)?;
            (u, n) = *self.dies.get(&g)?;
        }
        None
    }

    fn name(&self, ui: usize, ni: usize) -> Result<Option<String>, ReadError> {
        let Some((u, n, v)) = self.attr_follow(ui, ni, dw::DW_AT_name) else {
            return Ok(None);
        };
        let s = self
            .dwarf
            .attr_string(&self.units[u].unit, v)
            .map_err(dw_err_at(".debug_str", self.die_ctx(u, n)))?;
        Ok(Some(lossy(s)))
    }

    /// The type a `DW_AT_type` (possibly through an abstract origin) names;
    /// `Ok(None)` when absent (void).
    fn type_of(&self, ui: usize, ni: usize) -> Result<Option<TypeId>, ReadError> {
        let Some((u, n, v)) = self.attr_follow(ui, ni, dw::DW_AT_type) else {
            return Ok(None);
        };
        let mut target = self.ref_target(u, v);
        // A stub of a type moved to a type unit (-fdebug-types-section)
        // names it by signature.
        for _ in 0..MAX_REF_HOPS {
            let Some(&(tu, tn)) = target.and_then(|g| self.dies.get(&g)) else {
                break;
            };
            match self.units[tu].nodes[tn].die.attr_value(dw::DW_AT_signature) {
                Some(sig) => target = self.ref_target(tu, sig),
                None => break,
            }
        }
        match target.and_then(|g| self.type_ids.get(&g)) {
            Some(id) => Ok(Some(*id)),
            None => Err(invalid(
                ".debug_info",
                format!(
                    "DW_AT_type{} refers to {} which is not a type DIE",
                    self.die_ctx(u, n),
                    target.map_or("an unresolvable reference".into(), |g| format!("{g:#x}"))
                ),
            )),
        }
    }

    /// The DIE a `DW_AT_type` points to (for size lookups during type
    /// construction, before the types exist).
    fn type_die(&self, ui: usize, ni: usize) -> Option<(usize, usize)> {
        let v = self.units[ui].nodes[ni].die.attr_value(dw::DW_AT_type)?;
        let g = self.ref_target(ui, v)?;
        self.dies.get(&g).copied()
    }

    /// Byte size of the type DIE (ui, ni), through typedefs and qualifiers.
    fn die_byte_size(&self, ui: usize, ni: usize) -> Option<u64> {
        let (mut u, mut n) = (ui, ni);
        for _ in 0..MAX_REF_HOPS * 4 {
            let die = &self.units[u].nodes[n].die;
            if let Some(s) = udata(die, dw::DW_AT_byte_size) {
                return Some(s);
            }
            if die.tag() == dw::DW_TAG_pointer_type {
                return Some(8);
            }
            (u, n) = self.type_die(u, n)?;
        }
        None
    }

    fn children_with(&self, ui: usize, ni: usize, tag: gimli::DwTag) -> Vec<usize> {
        let nodes = &self.units[ui].nodes;
        nodes[ni]
            .children
            .iter()
            .copied()
            .filter(|&c| nodes[c].die.tag() == tag)
            .collect()
    }

    fn build_types(&mut self) -> Result<(), ReadError> {
        let mut built: Vec<(TypeId, Type)> = Vec::new();
        for ui in 0..self.units.len() {
            for ni in 0..self.units[ui].nodes.len() {
                let die = &self.units[ui].nodes[ni].die;
                let Some(key) = die_key(&self.units[ui].unit.header, die.offset()) else {
                    continue;
                };
                let Some(&id) = self.type_ids.get(&key) else {
                    continue;
                };
                let ty = self.build_type(ui, ni)?;
                built.push((id, ty));
            }
        }
        for (id, ty) in built {
            if let Some(slot) = self.types.get_mut(id.0 as usize) {
                *slot = ty;
            }
        }
        Ok(())
    }

    /// Resolves declared-only structs and unions by name in other units
    /// ([`crate::resolve`]); a declaration whose tag has rival definitions
    /// stays opaque.
    fn resolve_declarations(&mut self) -> Result<(), ReadError> {
        let names: Vec<String> = (0..self.units.len())
            .map(|ui| {
                self.name(ui, 0)
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| format!("compilation unit #{ui}"))
            })
            .collect();
        let units = &self.type_units;
        let unit_of = |id: TypeId| {
            units
                .get(id.0 as usize)
                .and_then(|u| names.get(*u))
                .cloned()
                .unwrap_or_else(|| "an unknown unit".into())
        };
        crate::resolve::resolve_declarations(&mut self.types, &unit_of);
        Ok(())
    }

    fn build_type(&self, ui: usize, ni: usize) -> Result<Type, ReadError> {
        let die = &self.units[ui].nodes[ni].die;
        let name = self.name(ui, ni)?;
        let size = udata(die, dw::DW_AT_byte_size);
        let qualified = |q| -> Result<Type, ReadError> {
            Ok(Type::Qualified {
                qualifier: q,
                target: self.type_of(ui, ni)?,
            })
        };
        Ok(match die.tag() {
            dw::DW_TAG_base_type => {
                let encoding = match die.attr_value(dw::DW_AT_encoding) {
                    Some(AttributeValue::Encoding(e)) => match e {
                        dw::DW_ATE_signed => BaseEncoding::Signed,
                        dw::DW_ATE_unsigned => BaseEncoding::Unsigned,
                        dw::DW_ATE_signed_char => BaseEncoding::SignedChar,
                        dw::DW_ATE_unsigned_char => BaseEncoding::UnsignedChar,
                        dw::DW_ATE_boolean => BaseEncoding::Bool,
                        dw::DW_ATE_float => BaseEncoding::Float,
                        dw::DW_ATE_complex_float => BaseEncoding::Complex,
                        _ => BaseEncoding::Other,
                    },
                    _ => BaseEncoding::Other,
                };
                Type::Base {
                    name: name.unwrap_or_default(),
                    size: size.unwrap_or(0),
                    encoding,
                }
            }
            dw::DW_TAG_pointer_type
            | dw::DW_TAG_reference_type
            | dw::DW_TAG_rvalue_reference_type => Type::Pointer {
                pointee: self.type_of(ui, ni)?,
            },
            dw::DW_TAG_structure_type | dw::DW_TAG_class_type | dw::DW_TAG_union_type => {
                let members = self.members(ui, ni)?;
                let declaration = flag(die, dw::DW_AT_declaration);
                if die.tag() == dw::DW_TAG_union_type {
                    Type::Union {
                        name,
                        size: size.unwrap_or(0),
                        members,
                        declaration,
                    }
                } else {
                    Type::Struct {
                        name,
                        size: size.unwrap_or(0),
                        members,
                        declaration,
                    }
                }
            }
            dw::DW_TAG_array_type => {
                let element = self.type_of(ui, ni)?.unwrap_or(self.void);
                let mut dims = Vec::new();
                for &c in &self.units[ui].nodes[ni].children {
                    let sub = &self.units[ui].nodes[c].die;
                    if sub.tag() == dw::DW_TAG_subrange_type {
                        dims.push(subrange_dim(sub));
                    } else if sub.tag() == dw::DW_TAG_enumeration_type {
                        dims.push(ArrayDim::Variable);
                    }
                }
                if dims.is_empty() {
                    dims.push(ArrayDim::Flexible);
                }
                Type::Array { element, dims }
            }
            dw::DW_TAG_enumeration_type => {
                let underlying = self.type_of(ui, ni)?;
                let mut enumerators = Vec::new();
                for c in self.children_with(ui, ni, dw::DW_TAG_enumerator) {
                    let e = &self.units[ui].nodes[c].die;
                    // gcc writes negative values as sdata and others in the
                    // smallest data form, zero extended (200 is data1 0xc8
                    // even in an enum whose underlying type is int).
                    let value = match e.attr_value(dw::DW_AT_const_value) {
                        Some(AttributeValue::Udata(v)) => v as i64,
                        Some(v) => const_i64(&v).unwrap_or(0),
                        None => 0,
                    };
                    enumerators.push((self.name(ui, c)?.unwrap_or_default(), value));
                }
                Type::Enum {
                    name,
                    size: size.unwrap_or(0),
                    underlying,
                    enumerators,
                }
            }
            dw::DW_TAG_typedef => Type::Typedef {
                name: name.unwrap_or_default(),
                target: self.type_of(ui, ni)?,
            },
            dw::DW_TAG_const_type => qualified(Qualifier::Const)?,
            dw::DW_TAG_volatile_type => qualified(Qualifier::Volatile)?,
            dw::DW_TAG_restrict_type => qualified(Qualifier::Restrict)?,
            dw::DW_TAG_atomic_type => qualified(Qualifier::Atomic)?,
            dw::DW_TAG_subroutine_type => {
                let mut params = Vec::new();
                let mut varargs = false;
                for &c in &self.units[ui].nodes[ni].children {
                    match self.units[ui].nodes[c].die.tag() {
                        dw::DW_TAG_formal_parameter => {
                            params.push(self.type_of(ui, c)?.unwrap_or(self.void))
                        }
                        dw::DW_TAG_unspecified_parameters => varargs = true,
                        _ => {}
                    }
                }
                Type::Function {
                    ret: self.type_of(ui, ni)?,
                    params,
                    varargs,
                }
            }
            // Not C (or a qualifier C never emits): an opaque void keeps
            // references from dangling.
            _ => Type::Void,
        })
    }

    fn members(&self, ui: usize, ni: usize) -> Result<Vec<Member>, ReadError> {
        let mut out = Vec::new();
        for c in self.children_with(ui, ni, dw::DW_TAG_member) {
            let die = &self.units[ui].nodes[c].die;
            let ctx = || self.die_ctx(ui, c);
            let ty = self.type_of(ui, c)?.unwrap_or(self.void);
            let byte_off = match die.attr_value(dw::DW_AT_data_member_location) {
                None => 0,
                Some(AttributeValue::Exprloc(e)) => {
                    // DWARF 2/3 style: DW_OP_plus_uconst n.
                    let ops = self.ops(ui, c, e)?;
                    match ops.as_slice() {
                        [Operation::PlusConstant { value }] => *value,
                        _ => {
                            return Err(invalid(
                                ".debug_info",
                                format!(
                                    "member{} has a computed location ({})",
                                    ctx(),
                                    describe_ops(&ops)
                                ),
                            ))
                        }
                    }
                }
                Some(v) => v.udata_value().ok_or_else(|| {
                    invalid(
                        ".debug_info",
                        format!(
                            "member{} has an unsupported DW_AT_data_member_location",
                            ctx()
                        ),
                    )
                })?,
            };
            let bitfield = match udata(die, dw::DW_AT_bit_size) {
                None => None,
                Some(bits) => {
                    let overflow =
                        || invalid(".debug_info", format!("bitfield{} offset overflows", ctx()));
                    let total = if let Some(d) = udata(die, dw::DW_AT_data_bit_offset) {
                        d
                    } else if let Some(bo) = udata(die, dw::DW_AT_bit_offset) {
                        // DWARF 2/3: bit_offset counts from the most
                        // significant bit of the storage unit.
                        let storage = udata(die, dw::DW_AT_byte_size)
                            .or_else(|| {
                                self.type_die(ui, c)
                                    .and_then(|(u, n)| self.die_byte_size(u, n))
                            })
                            .unwrap_or(0);
                        let from_lsb = storage
                            .checked_mul(8)
                            .and_then(|s| s.checked_sub(bo))
                            .and_then(|s| s.checked_sub(bits))
                            .ok_or_else(overflow)?;
                        byte_off
                            .checked_mul(8)
                            .and_then(|b| b.checked_add(from_lsb))
                            .ok_or_else(overflow)?
                    } else {
                        byte_off.checked_mul(8).ok_or_else(overflow)?
                    };
                    out.push(Member {
                        name: self.name(ui, c)?,
                        ty,
                        offset: total / 8,
                        bitfield: Some((total % 8, bits)),
                    });
                    continue;
                }
            };
            out.push(Member {
                name: self.name(ui, c)?,
                ty,
                offset: byte_off,
                bitfield,
            });
        }
        Ok(out)
    }

    fn ops(
        &self,
        ui: usize,
        ni: usize,
        e: gimli::Expression<R<'a>>,
    ) -> Result<Vec<Operation<R<'a>>>, ReadError> {
        let mut out = Vec::new();
        let mut it = e.operations(self.units[ui].unit.encoding());
        while let Some(op) = it
            .next()
            .map_err(dw_err_at(".debug_info", self.die_ctx(ui, ni)))?
        {
            if out.len() >= MAX_EXPR_OPS {
                return Err(ReadError::TooMany {
                    what: "operations in one location expression",
                    section: ".debug_info",
                    limit: MAX_EXPR_OPS,
                });
            }
            out.push(op);
        }
        Ok(out)
    }

    fn classify(
        &self,
        ui: usize,
        ni: usize,
        e: gimli::Expression<R<'a>>,
    ) -> Result<Loc, ReadError> {
        let ops = self.ops(ui, ni, e)?;
        Ok(match ops.as_slice() {
            [Operation::FrameOffset { offset }] => Loc::Fb(*offset),
            [Operation::FrameOffset { offset }, Operation::Deref {
                size: 8,
                space: false,
                ..
            }] => Loc::FbDeref(*offset),
            [Operation::Address { address }] => Loc::Addr(*address),
            [Operation::AddressIndex { index }] => Loc::Addr(
                self.dwarf
                    .address(&self.units[ui].unit, *index)
                    .map_err(dw_err_at(".debug_addr", self.die_ctx(ui, ni)))?,
            ),
            [Operation::UnsignedConstant { value }, Operation::TLS] => Loc::Tls(*value),
            _ => Loc::Other(describe_ops(&ops)),
        })
    }

    fn frame_base(&self, ui: usize, ni: usize) -> Result<FrameBase, ReadError> {
        let die = &self.units[ui].nodes[ni].die;
        Ok(match die.attr_value(dw::DW_AT_frame_base) {
            None => FrameBase::Other("none".into()),
            Some(AttributeValue::Exprloc(e)) => {
                let ops = self.ops(ui, ni, e)?;
                match ops.as_slice() {
                    [Operation::CallFrameCFA] => FrameBase::Cfa,
                    [Operation::Register { register }] if register.0 == Reg::Rbp.dwarf() => {
                        FrameBase::Rbp
                    }
                    _ => FrameBase::Other(describe_ops(&ops)),
                }
            }
            Some(_) => FrameBase::Other("location list".into()),
        })
    }

    /// Address ranges of a DIE with code, `[begin, end)`, empty ones and
    /// tombstones (discarded sections) dropped.
    fn ranges(&self, ui: usize, ni: usize) -> Result<Vec<(u64, u64)>, ReadError> {
        let unit = &self.units[ui].unit;
        let die = &self.units[ui].nodes[ni].die;
        let ctx = || self.die_ctx(ui, ni);
        let mut out = Vec::new();
        if let Some(v) = die.attr_value(dw::DW_AT_ranges) {
            let Some(mut list) = self
                .dwarf
                .attr_ranges(unit, v)
                .map_err(dw_err_at(".debug_rnglists", ctx()))?
            else {
                return Ok(out);
            };
            while let Some(r) = list.next().map_err(dw_err_at(".debug_rnglists", ctx()))? {
                if out.len() >= MAX_RANGES_PER_DIE {
                    return Err(ReadError::TooMany {
                        what: "address ranges for one DIE",
                        section: ".debug_rnglists",
                        limit: MAX_RANGES_PER_DIE,
                    });
                }
                if r.end > r.begin && r.begin != 0 && !unit.header.is_tombstone_address(r.begin) {
                    out.push((r.begin, r.end));
                }
            }
            return Ok(out);
        }
        let Some(low_v) = die.attr_value(dw::DW_AT_low_pc) else {
            return Ok(out);
        };
        let Some(low) = self
            .dwarf
            .attr_address(unit, low_v)
            .map_err(dw_err_at(".debug_addr", ctx()))?
        else {
            return Ok(out);
        };
        let high = match die.attr_value(dw::DW_AT_high_pc) {
            None => return Ok(out),
            Some(AttributeValue::Udata(len)) => low.checked_add(len),
            Some(v) => {
                if let Some(len) = v.udata_value().filter(|_| {
                    // DWARF 4+: a constant class form is a length.
                    !matches!(
                        v,
                        AttributeValue::Addr(_) | AttributeValue::DebugAddrIndex(_)
                    )
                }) {
                    low.checked_add(len)
                } else {
                    self.dwarf
                        .attr_address(unit, v)
                        .map_err(dw_err_at(".debug_addr", ctx()))?
                }
            }
        };
        let Some(high) = high else {
            return Err(invalid(
                ".debug_info",
                format!("DW_AT_high_pc{} overflows the address space", ctx()),
            ));
        };
        if high > low && low != 0 && !unit.header.is_tombstone_address(low) {
            out.push((low, high));
        }
        Ok(out)
    }

    fn intern_file(&mut self, path: String) -> Result<u32, ReadError> {
        if let Some(&id) = self.file_ids.get(&path) {
            return Ok(id);
        }
        let id = u32::try_from(self.files.len()).map_err(|_| ReadError::TooMany {
            what: "source files",
            section: ".debug_line",
            limit: u32::MAX as usize,
        })?;
        self.files.push(path.clone());
        self.file_ids.insert(path, id);
        Ok(id)
    }

    fn build_lines(&mut self) -> Result<(), ReadError> {
        for ui in 0..self.units.len() {
            let unit = &self.units[ui].unit;
            let is_cu = self.units[ui]
                .nodes
                .first()
                .is_some_and(|n| n.die.tag() == dw::DW_TAG_compile_unit);
            if is_cu {
                if let Some(p) = self.name_attr_string(ui, 0, dw::DW_AT_producer)? {
                    self.producers.push(p);
                }
            }
            let Some(program) = unit.line_program.clone() else {
                continue;
            };
            let comp_dir = unit.comp_dir.map(lossy).unwrap_or_default();
            let header = program.header().clone();
            let mut paths = Vec::new();
            for fe in header.file_names() {
                let name = lossy(
                    self.dwarf
                        .attr_string(unit, fe.path_name())
                        .map_err(dw_err(".debug_line"))?,
                );
                let path = if name.starts_with('/') {
                    name
                } else {
                    let mut dir = match fe.directory(&header) {
                        Some(d) => lossy(
                            self.dwarf
                                .attr_string(unit, d)
                                .map_err(dw_err(".debug_line"))?,
                        ),
                        None => String::new(),
                    };
                    if !dir.starts_with('/') {
                        dir = join_path(&comp_dir, &dir);
                    }
                    join_path(&dir, &name)
                };
                paths.push(path);
            }
            let file_base = if header.version() >= 5 { 0 } else { 1 };
            let is_tomb = |a: u64| a == 0 || unit.header.is_tombstone_address(a);
            let mut rows = program.rows();
            // Rows with their raw file index, mapped once the unit's file
            // table is interned.
            let mut seq: Vec<(LineRow, u64)> = Vec::new();
            let mut seq_ok = true;
            let mut raw_rows: Vec<(LineRow, u64)> = Vec::new();
            while let Some((_, row)) = rows.next_row().map_err(dw_err(".debug_line"))? {
                if self.lines.len() + raw_rows.len() + seq.len() >= MAX_LINE_ROWS {
                    return Err(ReadError::TooMany {
                        what: "line-table rows",
                        section: ".debug_line",
                        limit: MAX_LINE_ROWS,
                    });
                }
                let addr = row.address();
                if seq.is_empty() {
                    seq_ok = !is_tomb(addr);
                }
                let lr = LineRow {
                    addr: LinkAddr(addr),
                    file: 0,
                    line: row
                        .line()
                        .map_or(0, |l| u32::try_from(l.get()).unwrap_or(u32::MAX)),
                    column: match row.column() {
                        gimli::ColumnType::LeftEdge => 0,
                        gimli::ColumnType::Column(c) => u32::try_from(c.get()).unwrap_or(u32::MAX),
                    },
                    is_stmt: row.is_stmt(),
                    prologue_end: row.prologue_end(),
                    end_sequence: row.end_sequence(),
                };
                seq.push((lr, row.file_index()));
                if row.end_sequence() {
                    if seq_ok {
                        raw_rows.append(&mut seq);
                    }
                    seq.clear();
                }
            }
            if seq_ok {
                raw_rows.append(&mut seq);
            }
            let mut map = Vec::new();
            for p in paths {
                map.push(self.intern_file(p)?);
            }
            for (mut row, fidx) in raw_rows {
                let mapped = fidx
                    .checked_sub(file_base)
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| map.get(i).copied());
                row.file = match mapped {
                    Some(f) => f,
                    // DWARF 4 file 0 ("no file") or an index past the table.
                    None if row.end_sequence => 0,
                    None => {
                        return Err(invalid(
                            ".debug_line",
                            format!(
                                "row at {} refers to file {fidx}, not in the header",
                                row.addr
                            ),
                        ))
                    }
                };
                self.lines.push(row);
            }
            self.units[ui].files = map;
            self.units[ui].file_base = file_base;
        }
        Ok(())
    }

    fn name_attr_string(
        &self,
        ui: usize,
        ni: usize,
        at: gimli::DwAt,
    ) -> Result<Option<String>, ReadError> {
        let Some(v) = self.units[ui].nodes[ni].die.attr_value(at) else {
            return Ok(None);
        };
        let s = self
            .dwarf
            .attr_string(&self.units[ui].unit, v)
            .map_err(dw_err_at(".debug_str", self.die_ctx(ui, ni)))?;
        Ok(Some(lossy(s)))
    }

    fn decl_file(&self, ui: usize, ni: usize) -> Option<u32> {
        let (u, _, v) = self.attr_follow(ui, ni, dw::DW_AT_decl_file)?;
        let idx = match v {
            AttributeValue::FileIndex(i) => i,
            other => other.udata_value()?,
        };
        let unit = &self.units[u];
        let i = usize::try_from(idx.checked_sub(unit.file_base)?).ok()?;
        unit.files.get(i).copied()
    }

    fn decl_line(&self, ui: usize, ni: usize) -> u32 {
        self.attr_follow(ui, ni, dw::DW_AT_decl_line)
            .and_then(|(_, _, v)| v.udata_value())
            .map_or(0, |l| u32::try_from(l).unwrap_or(u32::MAX))
    }

    /// The address of a `DW_TAG_label` (none for labels the compiler
    /// removed).
    fn label_addr(&self, ui: usize, ni: usize) -> Option<LinkAddr> {
        let unit = &self.units[ui].unit;
        let v = self.units[ui].nodes[ni].die.attr_value(dw::DW_AT_low_pc)?;
        let a = self.dwarf.attr_address(unit, v).ok()??;
        (a != 0 && !unit.header.is_tombstone_address(a)).then_some(LinkAddr(a))
    }

    fn build_functions_and_globals(&mut self) -> Result<(), ReadError> {
        for ui in 0..self.units.len() {
            for ni in 0..self.units[ui].nodes.len() {
                let node = &self.units[ui].nodes[ni];
                match node.die.tag() {
                    dw::DW_TAG_subprogram => {
                        let noreturn = self
                            .attr_follow(ui, ni, dw::DW_AT_noreturn)
                            .is_some_and(|(_, _, v)| matches!(v, AttributeValue::Flag(true)));
                        if let Some((f, statics)) = self.function(ui, ni)? {
                            if noreturn {
                                self.noreturn_functions.push(f.low);
                            }
                            self.functions.push(f);
                            self.globals.extend(statics);
                        } else if noreturn {
                            if let Some(name) = self.name(ui, ni)? {
                                self.noreturn_declarations.push(name);
                            }
                        }
                    }
                    dw::DW_TAG_label => {
                        if let Some(addr) = self.label_addr(ui, ni) {
                            self.code_labels.push(addr);
                        }
                    }
                    dw::DW_TAG_variable if node.parent == Some(0) => {
                        if let Some(g) = self.global(ui, ni)? {
                            self.globals.push(g);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn global(&self, ui: usize, ni: usize) -> Result<Option<Global>, ReadError> {
        let die = &self.units[ui].nodes[ni].die;
        let Some(AttributeValue::Exprloc(e)) = die.attr_value(dw::DW_AT_location) else {
            // Declarations (extern) and constants folded away have no
            // storage of their own here.
            return Ok(None);
        };
        let (addr, tls) = match self.classify(ui, ni, e)? {
            Loc::Addr(a) if a != 0 => (a, false),
            Loc::Tls(off) => (off, true),
            _ => return Ok(None),
        };
        let ty = self.type_of(ui, ni)?.unwrap_or(self.void);
        let external = self
            .attr_follow(ui, ni, dw::DW_AT_external)
            .is_some_and(|(_, _, v)| matches!(v, AttributeValue::Flag(true)));
        Ok(Some(Global {
            name: self.name(ui, ni)?.unwrap_or_default(),
            ty,
            addr: LinkAddr(addr),
            size: type_size(&self.types, ty).unwrap_or(0),
            owner: None,
            unit: self.unit_name(ui),
            external,
            tls,
        }))
    }

    /// The function of subprogram DIE (ui, ni), with its static locals;
    /// `None` for declarations and subprograms without code.
    fn function(&self, ui: usize, ni: usize) -> Result<Option<(Function, Vec<Global>)>, ReadError> {
        let die = &self.units[ui].nodes[ni].die;
        if flag(die, dw::DW_AT_declaration) {
            return Ok(None);
        }
        let ranges = self.ranges(ui, ni)?;
        // Hot/cold split functions (never at -O0) list the entry part first.
        let Some(&(low, high)) = ranges.first() else {
            return Ok(None);
        };
        let name = self
            .name(ui, ni)?
            .unwrap_or_else(|| format!("<anonymous@{low:#x}>"));
        self.function_body(ui, ni, low, high, name.clone())
            .map(Some)
            .map_err(|e| in_function(e, &name))
    }

    /// Frame base, parameters, locals and statics of a function with code.
    fn function_body(
        &self,
        ui: usize,
        ni: usize,
        low: u64,
        high: u64,
        name: String,
    ) -> Result<(Function, Vec<Global>), ReadError> {
        let fb = self.frame_base(ui, ni)?;
        let frame_base = match fb {
            FrameBase::Rbp => FrameBaseKind::Rbp,
            _ => FrameBaseKind::Cfa,
        };
        let external = self
            .attr_follow(ui, ni, dw::DW_AT_external)
            .is_some_and(|(_, _, v)| matches!(v, AttributeValue::Flag(true)));
        let fn_scope = vec![(LinkAddr(low), LinkAddr(high))];
        let mut params = Vec::new();
        let mut locals = Vec::new();
        let mut statics = Vec::new();
        let mut is_varargs = false;
        // Iterative pre-order walk: (node, scope, top level?).
        let mut stack: Vec<(usize, Scope, bool)> = Vec::new();
        let top = std::rc::Rc::new(fn_scope);
        for &c in self.units[ui].nodes[ni].children.iter().rev() {
            stack.push((c, top.clone(), true));
        }
        let mut visited = 0usize;
        while let Some((c, scope, top_level)) = stack.pop() {
            visited += 1;
            if visited > MAX_DIES {
                return Err(ReadError::TooMany {
                    what: "DIEs in one function",
                    section: ".debug_info",
                    limit: MAX_DIES,
                });
            }
            let tag = self.units[ui].nodes[c].die.tag();
            match tag {
                dw::DW_TAG_formal_parameter | dw::DW_TAG_variable => {
                    let is_param = tag == dw::DW_TAG_formal_parameter;
                    if is_param && !top_level {
                        continue;
                    }
                    if let Some((v, g)) = self.variable(ui, c, &fb, &scope, is_param, &name)? {
                        if is_param {
                            params.push(v);
                        } else {
                            locals.push(v);
                        }
                        if let Some(g) = g {
                            statics.push(g);
                        }
                    }
                }
                dw::DW_TAG_unspecified_parameters if top_level => is_varargs = true,
                dw::DW_TAG_lexical_block => {
                    let r = self.ranges(ui, c)?;
                    let inner = if r.is_empty() {
                        // A block without code: its variables live in the
                        // enclosing scope's range.
                        scope.clone()
                    } else {
                        std::rc::Rc::new(
                            r.into_iter()
                                .map(|(a, b)| (LinkAddr(a), LinkAddr(b)))
                                .collect(),
                        )
                    };
                    for &cc in self.units[ui].nodes[c].children.iter().rev() {
                        stack.push((cc, inner.clone(), false));
                    }
                }
                // Nested functions and inlined instances have frames of
                // their own.
                _ => {}
            }
        }
        let f = Function {
            decl_file: self.decl_file(ui, ni),
            decl_line: self.decl_line(ui, ni),
            return_type: self.type_of(ui, ni)?,
            name,
            low: LinkAddr(low),
            high: LinkAddr(high),
            frame_base,
            is_varargs,
            external,
            params,
            locals,
            saved_regs: Vec::new(),
        };
        Ok((f, statics))
    }

    /// The name of unit `ui` (`DW_AT_name`: the main source file).
    fn unit_name(&self, ui: usize) -> String {
        self.units
            .get(ui)
            .and_then(|u| u.unit.name)
            .map(lossy)
            .unwrap_or_default()
    }

    fn variable(
        &self,
        ui: usize,
        ni: usize,
        fb: &FrameBase,
        scope: &[(LinkAddr, LinkAddr)],
        is_param: bool,
        fname: &str,
    ) -> Result<Option<(Variable, Option<Global>)>, ReadError> {
        let die = &self.units[ui].nodes[ni].die;
        if flag(die, dw::DW_AT_declaration) {
            return Ok(None);
        }
        let name = self.name(ui, ni)?.unwrap_or_default();
        let ty = self.type_of(ui, ni)?.unwrap_or(self.void);
        let adjust = |n: i64| -> Result<i64, ReadError> {
            match fb {
                FrameBase::Cfa => Ok(n),
                FrameBase::Rbp => n.checked_sub(16).ok_or_else(|| {
                    invalid(
                        ".debug_info",
                        format!("fbreg {n} of `{name}` in {fname} overflows"),
                    )
                }),
                FrameBase::Other(_) => Ok(n),
            }
        };
        let frame_desc = match fb {
            FrameBase::Other(d) => Some(d.as_str()),
            _ => None,
        };
        let mut global = None;
        let location = match die.attr_value(dw::DW_AT_location) {
            None => VarLocation::None,
            Some(AttributeValue::Exprloc(e)) => match self.classify(ui, ni, e)? {
                Loc::Fb(n) | Loc::FbDeref(n) if frame_desc.is_some() => {
                    VarLocation::Complex(format!(
                        "fbreg {n} with frame base {}",
                        frame_desc.unwrap_or_default()
                    ))
                }
                Loc::Fb(n) => VarLocation::Cfa(CfaOffset(adjust(n)?)),
                Loc::FbDeref(n) => VarLocation::CfaIndirect(CfaOffset(adjust(n)?)),
                Loc::Addr(a) => {
                    global = Some((a, false));
                    VarLocation::Static(LinkAddr(a))
                }
                Loc::Tls(off) => {
                    global = Some((off, true));
                    VarLocation::Complex(format!("thread-local static at TLS offset {off:#x}"))
                }
                Loc::Other(desc) => VarLocation::Complex(desc),
            },
            Some(v) => VarLocation::Complex(self.describe_loclist(ui, ni, v)?),
        };
        let global = global.map(|(addr, tls)| Global {
            name: name.clone(),
            ty,
            addr: LinkAddr(addr),
            size: type_size(&self.types, ty).unwrap_or(0),
            owner: Some(fname.to_string()),
            unit: self.unit_name(ui),
            external: false,
            tls,
        });
        Ok(Some((
            Variable {
                name,
                ty,
                location,
                scope: scope.to_vec(),
                is_param,
                decl_line: self.decl_line(ui, ni),
            },
            global,
        )))
    }

    fn describe_loclist(
        &self,
        ui: usize,
        ni: usize,
        v: AttributeValue<R<'a>>,
    ) -> Result<String, ReadError> {
        const SHOWN: usize = 8;
        let unit = &self.units[ui].unit;
        let ctx = || self.die_ctx(ui, ni);
        let Some(mut list) = self
            .dwarf
            .attr_locations(unit, v)
            .map_err(dw_err_at(".debug_loclists", ctx()))?
        else {
            return Ok("unsupported location form".into());
        };
        let mut parts = Vec::new();
        let mut n = 0usize;
        while let Some(entry) = list.next().map_err(dw_err_at(".debug_loclists", ctx()))? {
            n += 1;
            if n > MAX_RANGES_PER_DIE {
                break;
            }
            if parts.len() < SHOWN {
                let ops = self.ops(ui, ni, entry.data)?;
                parts.push(format!(
                    "[{:#x},{:#x}): {}",
                    entry.range.begin,
                    entry.range.end,
                    describe_ops(&ops)
                ));
            }
        }
        let more = if n > SHOWN {
            format!("; {} more", n - SHOWN)
        } else {
            String::new()
        };
        Ok(format!("location list: {}{more}", parts.join("; ")))
    }
}

fn subrange_dim(sub: &Die<'_>) -> ArrayDim {
    let lower = match sub.attr_value(dw::DW_AT_lower_bound) {
        None => Some(0i64),
        Some(v) => const_i64(&v),
    };
    if let Some(v) = sub.attr_value(dw::DW_AT_count) {
        return match v.udata_value() {
            Some(n) if is_const(&v) => ArrayDim::Fixed(n),
            _ => ArrayDim::Variable,
        };
    }
    match sub.attr_value(dw::DW_AT_upper_bound) {
        None => ArrayDim::Flexible,
        Some(v) if is_const(&v) => match (const_i64(&v), lower) {
            (Some(u), Some(l)) => {
                let n = i128::from(u) - i128::from(l) + 1;
                ArrayDim::Fixed(u64::try_from(n.max(0)).unwrap_or(u64::MAX))
            }
            _ => ArrayDim::Variable,
        },
        Some(_) => ArrayDim::Variable,
    }
}

fn is_const(v: &AttributeValue<R<'_>>) -> bool {
    matches!(
        v,
        AttributeValue::Data1(_)
            | AttributeValue::Data2(_)
            | AttributeValue::Data4(_)
            | AttributeValue::Data8(_)
            | AttributeValue::Sdata(_)
            | AttributeValue::Udata(_)
    )
}

/// A constant bound as a signed value. Fixed-size data forms are zero
/// extended (gcc writes the bound 255 of `char[256]` as data1 0xff); only
/// data8 and sdata carry negative values (-1: an empty array).
fn const_i64(v: &AttributeValue<R<'_>>) -> Option<i64> {
    Some(match *v {
        AttributeValue::Data1(x) => i64::from(x),
        AttributeValue::Data2(x) => i64::from(x),
        AttributeValue::Data4(x) => i64::from(x),
        // Reinterpreting all 64 bits is what the producer meant.
        AttributeValue::Data8(x) => x as i64,
        AttributeValue::Sdata(x) => x,
        AttributeValue::Udata(x) => i64::try_from(x).unwrap_or(i64::MAX),
        _ => return None,
    })
}

/// The address at which a function's frame is fully set up: the first line
/// row marked `prologue_end` (clang), else the second row (gcc: the first
/// instruction after the parameter spills, which follow `sub rsp`).
pub fn after_prologue(program: &Program, f: &Function) -> Option<LinkAddr> {
    let rows = program.rows_in(f.low, f.high);
    rows.iter()
        .filter(|r| !r.end_sequence && r.addr > f.low)
        .find(|r| r.prologue_end)
        .or_else(|| rows.iter().find(|r| !r.end_sequence && r.addr > f.low))
        .map(|r| r.addr)
}

fn fill_saved_regs(program: &mut Program, cfi: &EhFrameIndex) -> Result<(), ReadError> {
    let mut all = Vec::new();
    for f in &program.functions {
        let mut saved = Vec::new();
        if let Some(pc) = after_prologue(program, f) {
            if let Some(row) = cfi.unwind_row(pc)? {
                for (reg, rule) in &row.regs {
                    if let (true, RegRule::Offset(n)) = (reg.is_callee_saved(), rule) {
                        saved.push(SavedReg {
                            reg: *reg,
                            offset: CfaOffset(*n),
                        });
                    }
                }
            }
        }
        // rbp (CFA-16) first, then the pushes in order.
        saved.sort_by_key(|s| std::cmp::Reverse(s.offset));
        all.push(saved);
    }
    for (f, s) in program.functions.iter_mut().zip(all) {
        f.saved_regs = s;
    }
    Ok(())
}
