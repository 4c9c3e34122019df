//! Building corpus programs into a cache under the target directory. The
//! compilers, their flags and the compile step itself are
//! `upstare-testkit`'s, shared with every other crate's tests.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use upstare_testkit::{
    command_line, compile_files, target_dir, write_atomic, BuildError, Toolchain, LINK_FLAGS,
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
/// (minus temp names) and the text of every source.
fn build_stamp(toolchain: Toolchain, sources: &[&Path], texts: &[Vec<u8>]) -> String {
    let mut argv = command_line(toolchain, &[], sources[0], Path::new("OUT"));
    argv.extend(sources[1..].iter().map(|s| s.display().to_string()));
    let mut h = std::collections::hash_map::DefaultHasher::new();
    texts.hash(&mut h);
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

    let sources: Vec<&Path> = std::iter::once(program.source.as_path())
        .chain(program.extra_sources.iter().map(PathBuf::as_path))
        .collect();
    let mut texts = Vec::with_capacity(sources.len());
    for s in &sources {
        texts.push(std::fs::read(s).map_err(io_err(s))?);
    }
    let stamp = build_stamp(toolchain, &sources, &texts);
    if sources
        .iter()
        .all(|s| is_fresh(s, &out, &stamp_path, &stamp))
    {
        return Ok(out);
    }
    compile_files(toolchain, &sources, &[], LINK_FLAGS, &out)?;
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
