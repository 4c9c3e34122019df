//! The rewriting pipeline: ELF bytes in, frame tables and instrumented ELF out.

use crate::analysis::{self, AnalysisError, CodeView};
use crate::elf::{self, ElfError};
use object::{Object, ObjectSection};
use upstare_dwarf::fdt::{self, BinaryInfo, EncodeError, FrameTables, FunctionTable};
use upstare_dwarf::model::Program;
use upstare_dwarf::read::{read_program, ReadError};
use upstare_dwarf::LinkAddr;

/// Why a binary was refused or could not be rewritten. Every message is one
/// line naming the function or section at fault.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("not a readable ELF file: {0}")]
    Parse(String),
    #[error("no symbol table (.symtab): the binary is stripped")]
    Stripped,
    #[error("compilation unit built with optimization ({producer}): upstare needs -O0")]
    Optimized { producer: String },
    #[error("function {function}: parameter {param} is not in a stack slot (optimized code?): upstare needs -O0")]
    ParamNotSpilled { function: String, param: String },
    #[error("no function with debug information in the binary")]
    NoFunctions,
    #[error("function {function}: code range {low}..{high} is not inside an executable section")]
    CodeOutOfRange {
        function: String,
        low: LinkAddr,
        high: LinkAddr,
    },
    #[error(transparent)]
    Analysis(#[from] AnalysisError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error(transparent)]
    Elf(#[from] ElfError),
}

/// The result of rewriting one binary.
pub struct Rewritten {
    /// The instrumented ELF.
    pub elf: Vec<u8>,
    /// The tables it carries.
    pub tables: FrameTables,
    /// Size of the encoded `.upstare` section.
    pub section_size: usize,
}

/// Builds the frame tables of `input` without writing anything.
pub fn build_tables(input: &[u8]) -> Result<FrameTables, RewriteError> {
    let file = object::File::parse(input).map_err(|e| RewriteError::Parse(e.to_string()))?;
    if file.section_by_name(".symtab").is_none() {
        return Err(RewriteError::Stripped);
    }
    let program = read_program(input)?;
    check_conformance(&program)?;
    let view = CodeView::new(&file).map_err(RewriteError::Analysis)?;
    let mut functions: Vec<FunctionTable> = Vec::with_capacity(program.functions.len());
    for f in &program.functions {
        let code = function_code(&view, f)?;
        functions.push(analysis::analyze_function(f, &program, code, &view)?);
        check_params_spilled(f)?;
    }
    let text = file.section_by_name(".text");
    let binary = BinaryInfo {
        pie: file.kind() == object::ObjectKind::Dynamic,
        producer: program.producers.first().cloned().unwrap_or_default(),
        build_id: file
            .build_id()
            .ok()
            .flatten()
            .map(<[u8]>::to_vec)
            .unwrap_or_default(),
        text_addr: LinkAddr(text.as_ref().map_or(0, |s| s.address())),
        text_size: text.as_ref().map_or(0, |s| s.size()),
    };
    Ok(FrameTables {
        binary,
        files: program.files,
        types: program.types,
        globals: program.globals,
        functions,
    })
}

/// Why each function lacks what it lacks: loops without an update point,
/// calls without a restart address (the analysis' notes), per function in
/// address order. `input` may be the original or the instrumented binary
/// (its code is the same).
pub fn analysis_notes(input: &[u8]) -> Result<Vec<(String, Vec<String>)>, RewriteError> {
    let file = object::File::parse(input).map_err(|e| RewriteError::Parse(e.to_string()))?;
    let program = read_program(input)?;
    let view = CodeView::new(&file).map_err(RewriteError::Analysis)?;
    let mut out = Vec::new();
    for f in &program.functions {
        let code = function_code(&view, f)?;
        let (_, details) = analysis::analyze_function_detailed(f, &program, code, &view)?;
        if !details.notes.is_empty() {
            out.push((f.name.clone(), details.notes));
        }
    }
    Ok(out)
}

/// Rewrites `input`: builds its tables and attaches them.
pub fn rewrite(input: &[u8]) -> Result<Rewritten, RewriteError> {
    let tables = build_tables(input)?;
    // The tables are bound to the loaded bytes they describe, which the
    // output keeps (checked by `attach_tables`).
    let code = upstare_dwarf::code_digest(input).map_err(|e| RewriteError::Parse(e.to_string()))?;
    let section = fdt::encode(&tables, &code)?;
    let elf = elf::attach_tables(input, &section)?;
    Ok(Rewritten {
        elf,
        tables,
        section_size: section.len(),
    })
}

/// The machine code of `f`, which must lie inside an executable section.
fn function_code<'a>(
    view: &CodeView<'a>,
    f: &upstare_dwarf::model::Function,
) -> Result<&'a [u8], RewriteError> {
    view.code(f.low, f.high)
        .ok_or_else(|| RewriteError::CodeOutOfRange {
            function: f.name.clone(),
            low: f.low,
            high: f.high,
        })
}

/// Refuses binaries outside the target contract (see DESIGN.md): stripped,
/// optimized, no functions. Per-function code shape (frame pointer,
/// realignment) is checked by the analysis.
fn check_conformance(program: &Program) -> Result<(), RewriteError> {
    for producer in &program.producers {
        if let Some(level) = optimization_flag(producer) {
            if level != "-O0" {
                return Err(RewriteError::Optimized {
                    producer: producer.clone(),
                });
            }
        }
    }
    if program.functions.is_empty() {
        return Err(RewriteError::NoFunctions);
    }
    Ok(())
}

/// clang does not record its flags in DW_AT_producer; optimized code shows in
/// parameters that never reach a stack slot. Checked after the code analysis,
/// which gives the precise reason for realigned frames (whose parameters are
/// rsp-relative).
fn check_params_spilled(f: &upstare_dwarf::model::Function) -> Result<(), RewriteError> {
    match f
        .params
        .iter()
        .find(|p| matches!(p.location, upstare_dwarf::model::VarLocation::Complex(_)))
    {
        Some(p) => Err(RewriteError::ParamNotSpilled {
            function: f.name.clone(),
            param: p.name.clone(),
        }),
        None => Ok(()),
    }
}

/// The last `-O…` flag of a producer string (gcc records its flags there).
fn optimization_flag(producer: &str) -> Option<&str> {
    producer.split_whitespace().rfind(|w| w.starts_with("-O"))
}

#[cfg(test)]
mod tests {
    use super::optimization_flag;

    #[test]
    fn last_optimization_flag_wins() {
        assert_eq!(
            optimization_flag("GNU C17 12.2.0 -mtune=generic -O2 -g -O0"),
            Some("-O0")
        );
        assert_eq!(optimization_flag("GNU C17 12.2.0 -g -O2"), Some("-O2"));
        assert_eq!(optimization_flag("Debian clang version 14.0.6"), None);
    }
}
