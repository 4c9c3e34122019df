//! Compiling C with the real toolchains, and finding the tools a test needs.
//!
//! A missing tool is a failure, never a skip: [`require_tool`] panics naming
//! it, so a machine without clang cannot pass the clang tests by not running
//! them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::process::{run_command, ExitStatus, RunError};

/// Generous: two cores shared by several engineers building at once.
const COMPILE_TIMEOUT: Duration = Duration::from_secs(300);

/// Flags every toolchain uses: the target contract of upstare.
pub const BASE_CFLAGS: &[&str] = &["-O0", "-g", "-fno-omit-frame-pointer"];

/// Libraries every corpus binary links against.
pub const LINK_FLAGS: &[&str] = &["-pthread", "-lm"];

/// A compiler configuration the corpus is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Toolchain {
    /// `gcc -O0 -g -fno-omit-frame-pointer` (PIE, the compiler's default).
    Gcc,
    /// `gcc -O0 -g -fno-omit-frame-pointer -no-pie`.
    GccNoPie,
    /// `clang -O0 -g -fno-omit-frame-pointer` (PIE).
    Clang,
}

impl Toolchain {
    /// Every toolchain, in a fixed order.
    pub const ALL: [Toolchain; 3] = [Toolchain::Gcc, Toolchain::GccNoPie, Toolchain::Clang];

    /// Short name, used in cache paths and messages.
    pub fn name(self) -> &'static str {
        match self {
            Toolchain::Gcc => "gcc",
            Toolchain::GccNoPie => "gcc-nopie",
            Toolchain::Clang => "clang",
        }
    }

    /// The compiler driver executable.
    pub fn compiler(self) -> &'static str {
        match self {
            Toolchain::Gcc | Toolchain::GccNoPie => "gcc",
            Toolchain::Clang => "clang",
        }
    }

    /// Whether the compiler is clang (whose DWARF and code differ from gcc's).
    pub fn is_clang(self) -> bool {
        self == Toolchain::Clang
    }

    /// Whether the output is position independent.
    pub fn is_pie(self) -> bool {
        !matches!(self, Toolchain::GccNoPie)
    }

    /// The exact compile flags (before any extra flags and the sources).
    pub fn cflags(self) -> Vec<&'static str> {
        let mut flags = BASE_CFLAGS.to_vec();
        if self == Toolchain::GccNoPie {
            flags.push("-no-pie");
        }
        flags
    }

    /// Whether the compiler is installed.
    pub fn is_available(self) -> bool {
        have_tool(self.compiler())
    }

    /// Panics, naming the compiler, unless it is installed (see
    /// [`require_tool`]).
    pub fn require(self) {
        require_tool(self.compiler());
    }
}

impl std::fmt::Display for Toolchain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Toolchain {
    type Err = BuildError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Toolchain::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| BuildError::UnknownToolchain(s.to_string()))
    }
}

/// Where the C code to compile comes from.
#[derive(Debug, Clone, Copy)]
pub enum CSource<'a> {
    /// An existing `.c` file.
    File(&'a Path),
    /// C text; written next to the output as `<out>.c` before compiling.
    Text(&'a str),
}

/// Errors from building C programs.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The compiler is not installed.
    #[error("compiler `{0}` not found in PATH (scripts/deps installs it)")]
    ToolMissing(&'static str),
    /// No toolchain has this name.
    #[error("unknown toolchain `{0}` (expected gcc, gcc-nopie or clang)")]
    UnknownToolchain(String),
    /// A file could not be read, written or renamed.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The compiler rejected the source.
    #[error("{toolchain} failed to compile {source_file} ({status}):\n{stderr}")]
    Compile {
        /// The source file.
        source_file: PathBuf,
        /// The toolchain used.
        toolchain: Toolchain,
        /// How the compiler exited.
        status: ExitStatus,
        /// The compiler's diagnostics.
        stderr: String,
    },
    /// The compiler could not be run or did not finish.
    #[error("running {toolchain} on {source_file}: {error}")]
    Run {
        /// The source file.
        source_file: PathBuf,
        /// The toolchain used.
        toolchain: Toolchain,
        /// What went wrong.
        error: Box<RunError>,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// True if an executable named `name` is on `PATH`.
pub fn have_tool(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(name))
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR"));
    corpus.parent().unwrap_or(corpus).to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` if set, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir), // join keeps absolute paths
        _ => workspace_root().join("target"),
    }
}

/// A file name unique to this process and call, next to `path`, for
/// write-then-rename.
fn temp_sibling(path: &Path, suffix: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}.{n}{suffix}", std::process::id()))
}

/// Writes `bytes` to `path` atomically (unique temp file, then rename), so
/// a test running in parallel never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    let tmp = temp_sibling(path, "");
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

/// The full compiler command line `compile_c` runs for `src` -> `out`, as
/// strings: the toolchain's flags, `extra_flags`, the output, the source and
/// [`LINK_FLAGS`].
pub fn command_line(
    toolchain: Toolchain,
    extra_flags: &[&str],
    src: &Path,
    out: &Path,
) -> Vec<String> {
    command_line_of(toolchain, extra_flags, &[src], LINK_FLAGS, out)
}

fn command_line_of(
    toolchain: Toolchain,
    flags: &[&str],
    sources: &[&Path],
    libs: &[&str],
    out: &Path,
) -> Vec<String> {
    let mut argv = vec![toolchain.compiler().to_string()];
    argv.extend(toolchain.cflags().iter().map(|s| s.to_string()));
    argv.extend(flags.iter().map(|s| s.to_string()));
    argv.push("-o".into());
    argv.push(out.display().to_string());
    argv.extend(sources.iter().map(|s| s.display().to_string()));
    argv.extend(libs.iter().map(|s| s.to_string()));
    argv
}

/// Compiles C source with `toolchain` (its exact flags, then `extra_flags`,
/// linked with `-pthread -lm`) into `out`. The output appears atomically: the
/// compiler writes a unique temporary name that is then renamed to `out`, so
/// parallel builds never see a half-written file. Returns `out`.
pub fn compile_c(
    source: CSource<'_>,
    toolchain: Toolchain,
    extra_flags: &[&str],
    out: &Path,
) -> Result<PathBuf, BuildError> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let src_path = match source {
        CSource::File(p) => p.to_path_buf(),
        CSource::Text(text) => {
            let mut name = out.as_os_str().to_os_string();
            name.push(".c");
            let p = PathBuf::from(name);
            write_atomic(&p, text.as_bytes())?;
            p
        }
    };
    compile_files(toolchain, &[&src_path], extra_flags, LINK_FLAGS, out)
}

/// Compiles the C files `sources` with `toolchain`: the command line is the
/// toolchain's flags, `flags`, `-o OUT`, the sources, then `libs` (nothing
/// else is added, for tests that need an exact command line). The output
/// appears atomically, as with [`compile_c`]. Returns `out`.
pub fn compile_files(
    toolchain: Toolchain,
    sources: &[&Path],
    flags: &[&str],
    libs: &[&str],
    out: &Path,
) -> Result<PathBuf, BuildError> {
    if !toolchain.is_available() {
        return Err(BuildError::ToolMissing(toolchain.compiler()));
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    // Named by its first source in messages.
    let source_file = sources.first().map(|p| p.to_path_buf()).unwrap_or_default();
    let tmp_out = temp_sibling(out, "");
    let argv = command_line_of(toolchain, flags, sources, libs, &tmp_out);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    let output = match run_command(cmd, COMPILE_TIMEOUT) {
        Ok(o) => o,
        Err(error) => {
            let _ = std::fs::remove_file(&tmp_out);
            return Err(BuildError::Run {
                source_file,
                toolchain,
                error: Box::new(error),
            });
        }
    };
    if output.status != ExitStatus::Code(0) {
        let _ = std::fs::remove_file(&tmp_out);
        return Err(BuildError::Compile {
            source_file,
            toolchain,
            status: output.status,
            stderr: output.stderr,
        });
    }
    std::fs::rename(&tmp_out, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp_out);
        io_err(out)(e)
    })?;
    Ok(out.to_path_buf())
}

/// Panics, naming the tool, unless an executable `name` is on `PATH`: a test
/// that needs gcc, clang, gdb, strip or objdump fails without it instead of
/// passing by doing nothing.
pub fn require_tool(name: &str) {
    assert!(
        have_tool(name),
        "`{name}` is not installed (not on PATH); this test needs it (scripts/deps installs it)"
    );
}
