//! [`CodeView`]: the read-only view of a binary that the per-function analysis
//! needs beyond the function's own bytes: jump tables in `.rodata`, the names
//! of direct call targets and the PLT stubs of imports.

use super::AnalysisError;
use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind};
use object::{Object, ObjectSection, ObjectSymbol, ObjectSymbolTable, RelocationTarget};
use std::collections::{BTreeMap, HashMap};
use upstare_dwarf::LinkAddr;

/// Most PLT stubs a binary may have before [`CodeView::from_object`] refuses it
/// (a cap on work driven by untrusted section sizes).
pub const MAX_PLT_STUBS: usize = 1 << 20;

/// A read-only view of an ELF file's allocated contents, by link-time address.
///
/// - [`CodeView::read`] reads bytes from any allocated section that has file
///   contents (`.text`, `.rodata`, ...), e.g. a switch's jump table;
/// - [`CodeView::function_name_at`] names the function symbol starting at an
///   address (direct call targets);
/// - [`CodeView::plt_import_at`] names the import a PLT stub jumps to.
///
/// The PLT map is built by decoding `.plt`, `.plt.sec` and `.plt.got`: every
/// stub ends in `jmp [rip+GOT slot]`, and the dynamic relocation
/// (`JUMP_SLOT` in `.rela.plt`, or `GLOB_DAT` in `.rela.dyn` for `.plt.got`)
/// of that GOT slot names the symbol. This works for PIE and `-no-pie`, lazy
/// binding (where `.plt` entries are `jmp [slot]; push n; jmp .plt0`) and
/// IBT stubs (`endbr64; bnd jmp [slot]` in `.plt.sec`), without assuming an
/// entry size. A call targets the stub's first instruction.
#[derive(Clone, Debug, Default)]
pub struct CodeView<'data> {
    /// Allocated sections with file contents, sorted by address.
    sections: Vec<(LinkAddr, &'data [u8])>,
    /// Defined function symbols by start address (first name wins).
    functions: BTreeMap<LinkAddr, String>,
    /// PLT stub start -> imported symbol name.
    plt: BTreeMap<LinkAddr, String>,
    /// GOT slot -> symbol name (dynamic relocations naming a symbol).
    got: BTreeMap<LinkAddr, String>,
}

impl<'data> CodeView<'data> {
    /// Builds the view from a parsed ELF file: every allocated section with
    /// contents, the function symbols of `.symtab` and `.dynsym`, and the
    /// PLT and GOT maps (see the type's documentation).
    pub fn new(file: &object::File<'data>) -> Result<Self, AnalysisError> {
        Self::from_object(file)
    }

    /// A view from explicit parts: allocated section contents by start
    /// address, function symbols by address, the PLT map (stub -> import)
    /// and the GOT map (slot -> symbol).
    pub fn from_parts(
        mut sections: Vec<(LinkAddr, &'data [u8])>,
        functions: BTreeMap<LinkAddr, String>,
        plt: BTreeMap<LinkAddr, String>,
        got: BTreeMap<LinkAddr, String>,
    ) -> Self {
        sections.sort_by_key(|s| s.0);
        CodeView {
            sections,
            functions,
            plt,
            got,
        }
    }

    /// Same as [`CodeView::new`].
    pub fn from_object(file: &object::File<'data>) -> Result<Self, AnalysisError> {
        let mut sections = Vec::new();
        for s in file.sections() {
            let alloc = match s.flags() {
                object::SectionFlags::Elf { sh_flags, .. } => {
                    sh_flags.0 & object::elf::SHF_ALLOC.0 != 0
                }
                _ => true,
            };
            if !alloc || s.kind() == object::SectionKind::UninitializedData {
                continue;
            }
            let name = s.name().unwrap_or("?").to_string();
            let data = s.data().map_err(|e| AnalysisError::Section {
                section: name,
                reason: e.to_string(),
            })?;
            if !data.is_empty() {
                sections.push((LinkAddr(s.address()), data));
            }
        }

        let mut functions = BTreeMap::new();
        let mut add_symbols = |syms: &mut dyn Iterator<Item = object::Symbol<'data, '_>>| {
            for sym in syms {
                if sym.kind() == object::SymbolKind::Text
                    && sym.is_definition()
                    && sym.address() != 0
                {
                    if let Ok(name) = sym.name() {
                        if !name.is_empty() {
                            functions
                                .entry(LinkAddr(sym.address()))
                                .or_insert_with(|| name.to_string());
                        }
                    }
                }
            }
        };
        add_symbols(&mut file.symbols());
        add_symbols(&mut file.dynamic_symbols());

        // GOT slot -> symbol name, from every dynamic relocation naming a symbol.
        let mut slots: HashMap<u64, String> = HashMap::new();
        if let (Some(relocs), Some(dynsym)) =
            (file.dynamic_relocations(), file.dynamic_symbol_table())
        {
            for (offset, reloc) in relocs {
                if let RelocationTarget::Symbol(idx) = reloc.target() {
                    if let Some(name) = dynsym.symbol_by_index(idx).ok().and_then(|s| s.name().ok())
                    {
                        if !name.is_empty() {
                            slots.insert(offset, name.to_string());
                        }
                    }
                }
            }
        }

        let mut plt = BTreeMap::new();
        for secname in [".plt", ".plt.sec", ".plt.got"] {
            let Some(sec) = file.section_by_name(secname) else {
                continue;
            };
            let data = sec.data().map_err(|e| AnalysisError::Section {
                section: secname.to_string(),
                reason: e.to_string(),
            })?;
            scan_plt(secname, sec.address(), data, &slots, &mut plt)?;
        }
        let got = slots.into_iter().map(|(a, n)| (LinkAddr(a), n)).collect();
        Ok(CodeView::from_parts(sections, functions, plt, got))
    }

    /// `len` bytes at `addr`, if they lie inside one allocated section.
    pub fn read(&self, addr: LinkAddr, len: usize) -> Option<&'data [u8]> {
        let i = self.sections.partition_point(|s| s.0 <= addr);
        let (start, data) = *self.sections.get(i.checked_sub(1)?)?;
        let off = usize::try_from(addr.offset_from(start)?).ok()?;
        data.get(off..off.checked_add(len)?)
    }

    /// The bytes of `[low, high)` (a function's code), if they lie inside one
    /// allocated section.
    pub fn code(&self, low: LinkAddr, high: LinkAddr) -> Option<&'data [u8]> {
        self.read(low, usize::try_from(high.offset_from(low)?).ok()?)
    }

    /// Name of the function symbol that starts exactly at `addr`.
    pub fn function_name_at(&self, addr: LinkAddr) -> Option<&str> {
        self.functions.get(&addr).map(String::as_str)
    }

    /// Name of the import whose PLT stub starts exactly at `addr`.
    pub fn plt_import_at(&self, addr: LinkAddr) -> Option<&str> {
        self.plt.get(&addr).map(String::as_str)
    }

    /// Name of the symbol whose GOT slot is at `addr` (`call [rip+slot]`
    /// with `-fno-plt`).
    pub fn got_import_at(&self, addr: LinkAddr) -> Option<&str> {
        self.got.get(&addr).map(String::as_str)
    }

    /// The PLT map (stub address -> import name).
    pub fn plt(&self) -> &BTreeMap<LinkAddr, String> {
        &self.plt
    }
}

/// Decodes one PLT section and records `stub start -> name` for every
/// `jmp [rip+slot]` whose slot has a symbol relocation.
fn scan_plt(
    secname: &str,
    base: u64,
    data: &[u8],
    slots: &HashMap<u64, String>,
    out: &mut BTreeMap<LinkAddr, String>,
) -> Result<(), AnalysisError> {
    let mut dec = Decoder::with_ip(64, data, base, DecoderOptions::NONE);
    // Start of the stub being decoded: the first non-nop instruction after the
    // previous unconditional jump.
    let mut stub_start: Option<u64> = None;
    let mut count = 0usize;
    while dec.can_decode() {
        let ins = dec.decode();
        if ins.is_invalid() {
            // Padding or data: resynchronize at the next byte.
            stub_start = None;
            continue;
        }
        if ins.mnemonic() == Mnemonic::Nop || ins.mnemonic() == Mnemonic::Int3 {
            continue;
        }
        let start = *stub_start.get_or_insert(ins.ip());
        if ins.flow_control() == FlowControl::IndirectBranch
            && ins.op_count() == 1
            && ins.op0_kind() == OpKind::Memory
            && ins.is_ip_rel_memory_operand()
        {
            if let Some(name) = slots.get(&ins.ip_rel_memory_address()) {
                count += 1;
                if count > MAX_PLT_STUBS {
                    return Err(AnalysisError::TooManyStubs {
                        section: secname.to_string(),
                    });
                }
                out.entry(LinkAddr(start)).or_insert_with(|| name.clone());
            }
        }
        if matches!(
            ins.flow_control(),
            FlowControl::IndirectBranch | FlowControl::UnconditionalBranch
        ) {
            stub_start = None;
        }
    }
    Ok(())
}
