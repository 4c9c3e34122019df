//! The rewriting pipeline: ELF bytes in, frame tables and instrumented ELF out.

use crate::analysis::{self, AnalysisError, CodeView, PointDetour};
use crate::elf::{self, ElfError};
use crate::inline::{InlineError, KeptPoint};
use object::{Object, ObjectSection};
use upstare_dwarf::fdt::{self, Arming, BinaryInfo, EncodeError, FrameTables, FunctionTable};
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
    #[error(transparent)]
    Inline(#[from] InlineError),
    /// Several functions refused: every one, grouped by reason.
    #[error("{}", refusal_summary(.0))]
    Refused(Vec<RewriteError>),
}

/// Function names shown per reason in a refusal summary.
pub const NAMES_SHOWN: usize = 5;

impl RewriteError {
    /// The kind of refusal in a few words (for grouping).
    pub fn reason(&self) -> &'static str {
        match self {
            RewriteError::Analysis(e) => e.reason(),
            RewriteError::ParamNotSpilled { .. } => "parameter not in a stack slot",
            RewriteError::CodeOutOfRange { .. } => "code outside an executable section",
            RewriteError::Refused(_) => "several refusals",
            RewriteError::Read(_) => "unreadable DWARF",
            RewriteError::Parse(_) => "not an ELF file",
            RewriteError::Stripped => "stripped",
            RewriteError::Optimized { .. } => "optimized compilation unit",
            RewriteError::NoFunctions => "no functions",
            RewriteError::Encode(_) => "tables cannot be encoded",
            RewriteError::Elf(_) => "ELF cannot be rewritten",
            RewriteError::Inline(_) => "no room for update-point trampolines",
        }
    }
}

/// Refused functions of one reason.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RefusalGroup {
    pub reason: &'static str,
    /// Every function refused for it, in address order (none for a
    /// refusal of the whole binary).
    pub functions: Vec<String>,
    /// The first refusal's full message.
    pub example: String,
}

/// The refusals of a failed rewrite grouped by reason (see
/// [`refusal_groups`]).
pub fn refusal_groups_of(e: &RewriteError) -> Vec<RefusalGroup> {
    match e {
        RewriteError::Refused(all) => refusal_groups(all),
        one => refusal_groups(std::slice::from_ref(one)),
    }
}

/// Groups per-function refusals by reason, largest group first (ties by
/// reason).
pub fn refusal_groups(errors: &[RewriteError]) -> Vec<RefusalGroup> {
    let mut groups: Vec<RefusalGroup> = Vec::new();
    for e in errors {
        let function = match e {
            RewriteError::Analysis(a) => analysis_function(a),
            RewriteError::ParamNotSpilled { function, .. }
            | RewriteError::CodeOutOfRange { function, .. } => Some(function.as_str()),
            _ => None,
        };
        match groups.iter_mut().find(|g| g.reason == e.reason()) {
            Some(g) => g.functions.extend(function.map(str::to_string)),
            None => groups.push(RefusalGroup {
                reason: e.reason(),
                functions: function.map(str::to_string).into_iter().collect(),
                example: e.to_string(),
            }),
        }
    }
    groups.sort_by(|a, b| {
        b.functions
            .len()
            .cmp(&a.functions.len())
            .then(a.reason.cmp(b.reason))
    });
    groups
}

fn analysis_function(e: &AnalysisError) -> Option<&str> {
    match e {
        AnalysisError::CodeSize { function, .. }
        | AnalysisError::Empty { function }
        | AnalysisError::TooLarge { function }
        | AnalysisError::Decode { function, .. }
        | AnalysisError::NoFramePointer { function, .. }
        | AnalysisError::Realigned { function, .. }
        | AnalysisError::OptimizedCode { function, .. }
        | AnalysisError::BadBranch { function, .. }
        | AnalysisError::UnknownIndirectJump { function, .. }
        | AnalysisError::BadJumpTable { function, .. }
        | AnalysisError::StackConflict { function, .. }
        | AnalysisError::UnknownBodyDepth { function, .. }
        | AnalysisError::UnknownCallTarget { function, .. }
        | AnalysisError::TooComplex { function, .. } => Some(function),
        AnalysisError::Section { .. } | AnalysisError::TooManyStubs { .. } => None,
    }
}

/// One line per reason: count, the first few function names, an example.
fn refusal_summary(errors: &[RewriteError]) -> String {
    if let [one] = errors {
        return one.to_string();
    }
    let groups = refusal_groups(errors);
    let mut out = format!(
        "{} functions refused for {} reason{}:",
        errors.len(),
        groups.len(),
        if groups.len() == 1 { "" } else { "s" }
    );
    for g in &groups {
        let shown: Vec<&str> = g
            .functions
            .iter()
            .take(NAMES_SHOWN)
            .map(String::as_str)
            .collect();
        let more = g.functions.len().saturating_sub(NAMES_SHOWN);
        out.push_str(&format!(
            "\n  {}: {} ({}{}); e.g. {}",
            g.reason,
            g.functions.len(),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            },
            g.example
        ));
    }
    out
}

/// The result of rewriting one binary.
pub struct Rewritten {
    /// The instrumented ELF.
    pub elf: Vec<u8>,
    /// The tables it carries.
    pub tables: FrameTables,
    /// Size of the encoded `.upstare` section.
    pub section_size: usize,
    /// With `--inline-points`: the update points that keep `int3` arming,
    /// and why.
    pub kept_int3: Vec<KeptPoint>,
}

/// Builds the frame tables of `input` without writing anything.
pub fn build_tables(input: &[u8]) -> Result<FrameTables, RewriteError> {
    build(input).map(|(t, _)| t)
}

/// The tables of `input` and, per update point (with its function's name),
/// what a detour would displace.
fn build(input: &[u8]) -> Result<(FrameTables, Vec<(String, PointDetour)>), RewriteError> {
    let file = object::File::parse(input).map_err(|e| RewriteError::Parse(e.to_string()))?;
    if file.section_by_name(".symtab").is_none() {
        return Err(RewriteError::Stripped);
    }
    let program = read_program(input)?;
    check_conformance(&program)?;
    let view = CodeView::new(&file).map_err(RewriteError::Analysis)?;
    let mut functions: Vec<FunctionTable> = Vec::with_capacity(program.functions.len());
    // Every function is analyzed: all refusals are reported at once.
    let mut refused: Vec<RewriteError> = Vec::new();
    let mut detours = Vec::new();
    for f in &program.functions {
        let table = function_code(&view, f).and_then(|code| {
            let t = analysis::analyze_function_detailed(f, &program, code, &view)?;
            check_params_spilled(f)?;
            Ok(t)
        });
        match table {
            Ok((t, details)) => {
                detours.extend(details.detours.into_iter().map(|d| (t.name.clone(), d)));
                functions.push(t);
            }
            // Binary-wide problems are not a function's.
            Err(RewriteError::Analysis(
                e @ (AnalysisError::Section { .. } | AnalysisError::TooManyStubs { .. }),
            )) => return Err(e.into()),
            Err(e) => refused.push(e),
        }
    }
    match refused.len() {
        0 => {}
        1 => return Err(refused.remove(0)),
        _ => return Err(RewriteError::Refused(refused)),
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
    let tables = FrameTables {
        binary,
        files: program.files,
        types: program.types,
        globals: program.globals,
        functions,
        arming: Arming::Int3,
    };
    Ok((tables, detours))
}

/// Why each function lacks what it lacks: loops without an update point,
/// calls without a restart address (the analysis' notes), per function in
/// address order. `input` may be the original or the instrumented binary
/// (its code is the same).
pub fn analysis_notes(input: &[u8]) -> Result<Vec<(String, Vec<String>)>, RewriteError> {
    // Rewritten with --inline-points: the analysis sees the code as it was.
    let restored = match upstare_dwarf::read_tables(input) {
        Ok(FrameTables {
            arming: Arming::Inline(inline),
            ..
        }) => Some(crate::inline::restore_original(input, &inline)?),
        _ => None,
    };
    let input = restored.as_deref().unwrap_or(input);
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

/// How update points are armed in the output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PointsMode {
    /// The code is left as it is; the runtime writes `int3` at each point.
    #[default]
    Int3,
    /// `--inline-points`: detours to trampolines testing one flag byte
    /// (see [`crate::inline`]).
    Inline,
}

/// Rewrites `input`: builds its tables and attaches them.
pub fn rewrite(input: &[u8]) -> Result<Rewritten, RewriteError> {
    rewrite_with(input, PointsMode::Int3)
}

/// Rewrites `input` with update points armed as `mode` says.
pub fn rewrite_with(input: &[u8], mode: PointsMode) -> Result<Rewritten, RewriteError> {
    // Said first: the code of a binary rewritten with --inline-points is
    // not the compiler's any more.
    if elf::has_tables(input) {
        return Err(ElfError::AlreadyInstrumented.into());
    }
    let (mut tables, detours) = build(input)?;
    let mut kept = Vec::new();
    let with_code = match mode {
        PointsMode::Int3 => None,
        PointsMode::Inline => {
            let done = crate::inline::add_trampolines(input, &detours)?;
            tables.arming = Arming::Inline(done.inline);
            kept = done.kept;
            Some(done.elf)
        }
    };
    let loaded = with_code.as_deref().unwrap_or(input);
    // The tables are bound to the loaded bytes they describe, which the
    // output keeps (checked by `attach_tables`).
    let code =
        upstare_dwarf::code_digest(loaded).map_err(|e| RewriteError::Parse(e.to_string()))?;
    let section = fdt::encode(&tables, &code)?;
    let elf = elf::attach_tables(loaded, &section)?;
    Ok(Rewritten {
        elf,
        tables,
        section_size: section.len(),
        kept_int3: kept,
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
