//! Building corpus programs into a cache under the target directory. The
//! compilers, their flags and the compile step itself are
//! `upstare-testkit`'s, shared with every other crate's tests.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use upstare_testkit::{
    command_line, compile_c, target_dir, write_atomic, BuildError, CSource, Toolchain,
};

use crate::Program;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cache directory for one toolchain: `<target>/corpus/<toolchain>/`.
pub fn cache_dir(toolchain: Toolchain) -> PathBuf {
    target_dir().join("corpus").join(toolchain.name())
}

/// A stamp of everything that determines a cached binary: the command line
/// (minus temp names) and the source text.
fn build_stamp(toolchain: Toolchain, source: &Path, text: &[u8]) -> String {
    let argv = command_line(toolchain, &[], source, Path::new("OUT"));
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    format!("{}\nsource-hash {:016x}\n", argv.join(" "), h.finish())
}

/// Builds `program` with `toolchain` into the cache
/// (`<target>/corpus/<toolchain>/<name>`), reusing the cached binary unless
/// the source is newer or its text or the flags changed. Safe when several
/// test processes build the same program at once.
pub fn build(program: &Program, toolchain: Toolchain) -> Result<PathBuf, BuildError> {
    let out = cache_dir(toolchain).join(program.name);
    let mut stamp_path = out.as_os_str().to_os_string();
    stamp_path.push(".stamp");
    let stamp_path = PathBuf::from(stamp_path);

    let text = std::fs::read(&program.source).map_err(io_err(&program.source))?;
    let stamp = build_stamp(toolchain, &program.source, &text);
    if is_fresh(&program.source, &out, &stamp_path, &stamp) {
        return Ok(out);
    }
    compile_c(CSource::File(&program.source), toolchain, &[], &out)?;
    write_atomic(&stamp_path, stamp.as_bytes())?;
    Ok(out)
}

fn is_fresh(source: &Path, out: &Path, stamp_path: &Path, stamp: &str) -> bool {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let (Some(src_time), Some(bin_time)) = (mtime(source), mtime(out)) else {
        return false;
    };
    src_time <= bin_time
        && std::fs::read_to_string(stamp_path)
            .map(|s| s == stamp)
            .unwrap_or(false)
}
