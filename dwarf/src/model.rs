//! The plain model of one binary: functions, their frames, types, globals and
//! the line table, with every stack location normalized to the CFA whatever
//! frame base the compiler used.
//!
//! The same type definitions are stored in the frame-description tables
//! (`crate::fdt`), so the patcher and the runtime see exactly what the reader
//! produced.

use crate::addr::{CfaOffset, LinkAddr, Reg};
use serde::{Deserialize, Serialize};

/// Index into [`Program::types`] (and the FDT's type table).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TypeId(pub u32);

/// Everything upstare needs to know about one binary.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Program {
    /// Functions with code in this binary that have DWARF, sorted by `low`.
    pub functions: Vec<Function>,
    /// All types, addressed by [`TypeId`].
    pub types: Vec<Type>,
    /// Global variables and static locals (with `owner` set), sorted by address.
    pub globals: Vec<Global>,
    /// Source file names, addressed by [`LineRow::file`].
    pub files: Vec<String>,
    /// The line table, sorted by address; rows of all compilation units.
    pub lines: Vec<LineRow>,
    /// Producer strings of the compilation units (`GNU C17 12.2.0 -O0 ...`).
    pub producers: Vec<String>,
    /// Entry addresses of the functions defined here that are declared
    /// `noreturn` (`DW_AT_noreturn`), sorted.
    #[serde(default)]
    pub noreturn_functions: Vec<LinkAddr>,
    /// Names of functions declared `noreturn` without code here (imports
    /// whose declaration the compiler described), sorted.
    #[serde(default)]
    pub noreturn_declarations: Vec<String>,
    /// Addresses of source labels (`DW_TAG_label`), sorted: the possible
    /// targets of a computed `goto *`.
    #[serde(default)]
    pub code_labels: Vec<LinkAddr>,
}

/// How the compiler expressed `DW_AT_frame_base`; recorded for diagnostics,
/// every variable location is already converted to a CFA offset.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum FrameBaseKind {
    /// `DW_OP_call_frame_cfa` (gcc).
    Cfa,
    /// `DW_OP_reg6` (clang): fbreg offsets are rbp-relative, CFA = rbp + 16.
    Rbp,
}

/// One function with code.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Function {
    pub name: String,
    /// First instruction.
    pub low: LinkAddr,
    /// One past the last byte of code.
    pub high: LinkAddr,
    /// Source file index into [`Program::files`], if known.
    pub decl_file: Option<u32>,
    pub decl_line: u32,
    pub frame_base: FrameBaseKind,
    pub return_type: Option<TypeId>,
    pub is_varargs: bool,
    /// Whether the symbol is visible outside its translation unit.
    pub external: bool,
    /// Parameters in declaration order.
    pub params: Vec<Variable>,
    /// Locals of the function body and of all nested lexical blocks.
    pub locals: Vec<Variable>,
    /// Callee-saved registers the prologue saves and where (from CFI, at the
    /// first address after the prologue); includes rbp at CFA-16.
    pub saved_regs: Vec<SavedReg>,
}

/// Where a callee-saved register is saved in a frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SavedReg {
    pub reg: Reg,
    pub offset: CfaOffset,
}

/// A parameter or local variable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Variable {
    pub name: String,
    pub ty: TypeId,
    pub location: VarLocation,
    /// Address ranges `[start, end)` where the variable is in scope: the
    /// function's range for top-level variables, the lexical block's ranges
    /// for nested ones.
    pub scope: Vec<(LinkAddr, LinkAddr)>,
    pub is_param: bool,
    /// Declaration line, 0 if unknown.
    pub decl_line: u32,
}

/// Where a variable's value lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VarLocation {
    /// In the frame at `CFA + offset`.
    Cfa(CfaOffset),
    /// The slot at `CFA + offset` holds the address of the value (VLA).
    CfaIndirect(CfaOffset),
    /// A static local at a fixed address.
    Static(LinkAddr),
    /// The location is valid only in part of the scope or needs registers
    /// (clang location lists, realigned frames). Kept with a description so
    /// consumers can refuse the state precisely.
    Complex(String),
    /// No location (optimized out or never materialized).
    None,
}

/// A global variable, or a static local when `owner` is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Global {
    pub name: String,
    pub ty: TypeId,
    pub addr: LinkAddr,
    pub size: u64,
    /// Function that declares this static local.
    pub owner: Option<String>,
    /// The compilation unit that defines it (its `DW_AT_name`): two
    /// file-scope statics of one name in two files are two globals.
    pub unit: String,
    pub external: bool,
    /// Thread-local: `addr` is the offset inside the module's TLS block.
    pub tls: bool,
}

/// A C type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Type {
    Void,
    Base {
        name: String,
        size: u64,
        encoding: BaseEncoding,
    },
    Pointer {
        pointee: Option<TypeId>,
    },
    Struct {
        name: Option<String>,
        size: u64,
        members: Vec<Member>,
        /// Only declared here (`struct s;`), no layout.
        declaration: bool,
    },
    Union {
        name: Option<String>,
        size: u64,
        members: Vec<Member>,
        declaration: bool,
    },
    Array {
        element: TypeId,
        /// Dimensions, outermost first.
        dims: Vec<ArrayDim>,
    },
    Enum {
        name: Option<String>,
        size: u64,
        underlying: Option<TypeId>,
        enumerators: Vec<(String, i64)>,
    },
    Typedef {
        name: String,
        target: Option<TypeId>,
    },
    Qualified {
        qualifier: Qualifier,
        target: Option<TypeId>,
    },
    Function {
        ret: Option<TypeId>,
        params: Vec<TypeId>,
        varargs: bool,
    },
}

/// Encoding of a base type.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum BaseEncoding {
    Signed,
    Unsigned,
    SignedChar,
    UnsignedChar,
    Bool,
    Float,
    Complex,
    Other,
}

/// `const`, `volatile`, `restrict`, `_Atomic`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Qualifier {
    Const,
    Volatile,
    Restrict,
    Atomic,
}

/// One dimension of an array type.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum ArrayDim {
    /// Known element count.
    Fixed(u64),
    /// Flexible array member or `extern int a[];`.
    Flexible,
    /// Variable-length array: the count is computed at run time.
    Variable,
}

/// A struct or union member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `None` for anonymous struct/union members.
    pub name: Option<String>,
    pub ty: TypeId,
    /// Byte offset from the start of the aggregate.
    pub offset: u64,
    /// For bitfields: (bit offset from `offset`*8, bit size).
    pub bitfield: Option<(u64, u64)>,
}

/// A row of the line-number program.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct LineRow {
    pub addr: LinkAddr,
    /// Index into [`Program::files`].
    pub file: u32,
    pub line: u32,
    pub column: u32,
    pub is_stmt: bool,
    pub prologue_end: bool,
    /// Marks the first address after a sequence; not a real row.
    pub end_sequence: bool,
}

impl Program {
    /// The function whose code contains `addr`.
    pub fn function_at(&self, addr: LinkAddr) -> Option<&Function> {
        let i = self.functions.partition_point(|f| f.low <= addr);
        let f = self.functions.get(i.checked_sub(1)?)?;
        (addr < f.high).then_some(f)
    }
    /// The function named `name`.
    pub fn function(&self, name: &str) -> Option<&Function> {
        self.functions.iter().find(|f| f.name == name)
    }
    /// The type with id `id`.
    pub fn ty(&self, id: TypeId) -> Option<&Type> {
        self.types.get(id.0 as usize)
    }
    /// Line rows (without end-of-sequence markers) whose address lies in
    /// `[low, high)`, in address order.
    pub fn rows_in(&self, low: LinkAddr, high: LinkAddr) -> &[LineRow] {
        // The reader sorts an end-of-sequence marker before the first row
        // of the sequence starting at the same address; skip it.
        let a = self
            .lines
            .partition_point(|r| r.addr < low || (r.addr == low && r.end_sequence));
        let b = self.lines.partition_point(|r| r.addr < high);
        &self.lines[a..b]
    }
    /// Size in bytes of a type, following typedefs and qualifiers; `None` for
    /// void, functions, VLAs and incomplete types.
    pub fn type_size(&self, id: TypeId) -> Option<u64> {
        type_size(&self.types, id)
    }
    /// A C-like name of a type (`struct point *`, `int[4]`).
    pub fn type_name(&self, id: TypeId) -> String {
        type_name(&self.types, id)
    }
}

/// Size in bytes of `id` in `types`, following typedefs and qualifiers.
pub fn type_size(types: &[Type], id: TypeId) -> Option<u64> {
    let mut cur = id;
    // Bounded: a hostile table may contain typedef cycles.
    for _ in 0..64 {
        match types.get(cur.0 as usize)? {
            Type::Void | Type::Function { .. } => return None,
            Type::Base { size, .. } | Type::Enum { size, .. } => return Some(*size),
            Type::Struct {
                size, declaration, ..
            }
            | Type::Union {
                size, declaration, ..
            } => return (!declaration).then_some(*size),
            Type::Pointer { .. } => return Some(8),
            Type::Array { element, dims } => {
                let mut n: u64 = 1;
                for d in dims {
                    match d {
                        ArrayDim::Fixed(c) => n = n.checked_mul(*c)?,
                        ArrayDim::Flexible => n = 0,
                        ArrayDim::Variable => return None,
                    }
                }
                if n == 0 {
                    return Some(0);
                }
                // Element types are never arrays-of-self; recursion depth is
                // bounded by the loop counter of the nested call.
                return n.checked_mul(type_size(types, *element)?);
            }
            Type::Typedef { target, .. } | Type::Qualified { target, .. } => cur = (*target)?,
        }
    }
    None
}

/// A C-like spelling of `id` in `types`.
pub fn type_name(types: &[Type], id: TypeId) -> String {
    fn go(types: &[Type], id: Option<TypeId>, depth: u32) -> String {
        if depth > 16 {
            return "...".into();
        }
        let Some(id) = id else { return "void".into() };
        match types.get(id.0 as usize) {
            None => format!("<bad type {}>", id.0),
            Some(Type::Void) => "void".into(),
            Some(Type::Base { name, .. }) => name.clone(),
            Some(Type::Typedef { name, .. }) => name.clone(),
            Some(Type::Pointer { pointee }) => format!("{} *", go(types, *pointee, depth + 1)),
            Some(Type::Struct { name, .. }) => {
                format!("struct {}", name.as_deref().unwrap_or("<anon>"))
            }
            Some(Type::Union { name, .. }) => {
                format!("union {}", name.as_deref().unwrap_or("<anon>"))
            }
            Some(Type::Enum { name, .. }) => {
                format!("enum {}", name.as_deref().unwrap_or("<anon>"))
            }
            Some(Type::Array { element, dims }) => {
                let mut s = go(types, Some(*element), depth + 1);
                for d in dims {
                    match d {
                        ArrayDim::Fixed(n) => s.push_str(&format!("[{n}]")),
                        ArrayDim::Flexible => s.push_str("[]"),
                        ArrayDim::Variable => s.push_str("[*]"),
                    }
                }
                s
            }
            Some(Type::Qualified { qualifier, target }) => {
                let q = match qualifier {
                    Qualifier::Const => "const",
                    Qualifier::Volatile => "volatile",
                    Qualifier::Restrict => "restrict",
                    Qualifier::Atomic => "_Atomic",
                };
                format!("{q} {}", go(types, *target, depth + 1))
            }
            Some(Type::Function {
                ret,
                params,
                varargs,
            }) => {
                let mut p: Vec<String> = params
                    .iter()
                    .map(|t| go(types, Some(*t), depth + 1))
                    .collect();
                if *varargs {
                    p.push("...".into());
                }
                format!("{} ({})", go(types, *ret, depth + 1), p.join(", "))
            }
        }
    }
    go(types, Some(id), 0)
}
