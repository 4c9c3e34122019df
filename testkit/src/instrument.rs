//! Compile-then-instrument: C built with a real toolchain, then rewritten
//! by the rewriter library (the code `upstare-rewrite` runs).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::compile::{compile_c, CSource, Toolchain};
pub use upstare_rewriter::rewrite::PointsMode;

/// Writes an executable with `mode` by write-then-rename: a test running in
/// parallel never sees half a file. The temporary name is unique per call,
/// so two threads writing the same binary never share one.
pub fn write_exe(path: &Path, bytes: &[u8], mode: u32) {
    static N: AtomicU32 = AtomicU32::new(0);
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(format!(
        ".tmp{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// Instruments `exe` into `out` (which may be `exe` itself), keeping
/// `exe`'s permissions. Panics with the rewriter's message if it refuses.
pub fn instrument(exe: &Path, out: &Path) -> PathBuf {
    instrument_with(exe, out, PointsMode::Int3)
}

/// [`instrument`] with update points armed as `mode` says
/// (`PointsMode::Inline`: `upstare-rewrite --inline-points`).
pub fn instrument_with(exe: &Path, out: &Path, points: PointsMode) -> PathBuf {
    let bytes = std::fs::read(exe).unwrap_or_else(|e| panic!("read {}: {e}", exe.display()));
    let mode = std::fs::metadata(exe)
        .unwrap_or_else(|e| panic!("stat {}: {e}", exe.display()))
        .permissions()
        .mode();
    let r = upstare_rewriter::rewrite::rewrite_with(&bytes, points)
        .unwrap_or_else(|e| panic!("instrument {}: {e}", exe.display()));
    write_exe(out, &r.elf, mode);
    out.to_path_buf()
}

/// [`instrument`], rewriting again only when `exe` or this test binary (and
/// so the rewriter linked into it) is newer than `out`, or when this build
/// cannot read `out`'s tables (made in an older table format, or damaged):
/// a stale cached build is rebuilt, never refused forever.
pub fn instrument_to(exe: &Path, out: &Path) -> PathBuf {
    instrument_to_with(exe, out, PointsMode::Int3)
}

/// [`instrument_to`] with update points armed as `mode` says.
pub fn instrument_to_with(exe: &Path, out: &Path, mode: PointsMode) -> PathBuf {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let rewriter = std::env::current_exe().ok().and_then(|p| mtime(&p));
    if let (Some(a), Some(b), Some(r)) = (mtime(exe), mtime(out), rewriter) {
        let readable = || {
            std::fs::read(out)
                .ok()
                .is_some_and(|bytes| upstare_dwarf::read_tables(&bytes).is_ok())
        };
        if a <= b && r <= b && readable() {
            return out.to_path_buf();
        }
    }
    instrument_with(exe, out, mode)
}

/// Compiles C text with `tc` and extra compiler `flags` into `dir/name`
/// and instruments it into `dir/name.up`, which it returns.
pub fn compile_instrumented(
    dir: &Path,
    name: &str,
    src: &str,
    tc: Toolchain,
    flags: &[&str],
) -> PathBuf {
    let exe = dir.join(name);
    compile_c(CSource::Text(src), tc, flags, &exe)
        .unwrap_or_else(|e| panic!("compile {name}: {e}"));
    instrument_to(&exe, &dir.join(format!("{name}.up")))
}
