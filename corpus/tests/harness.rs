//! The corpus build cache: it rebuilds exactly when needed and tolerates
//! parallel builders. (The compile step and the process runner it uses are
//! tested with the kit, `testkit/tests/kit.rs`.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use upstare_corpus::{build, Program};
use upstare_testkit::{run, target_dir, BuildError, ExitStatus, Toolchain};

const T: Duration = Duration::from_secs(20);

/// A fresh scratch directory under the target dir, unique to this test.
fn scratch(test: &str) -> PathBuf {
    let dir = target_dir()
        .join("corpus")
        .join("harness-tests")
        .join(format!("{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

#[test]
fn build_cache_rebuilds_only_when_the_source_changes() {
    let dir = scratch("cache");
    let source = dir.join("probe.c");
    std::fs::write(
        &source,
        "#include <stdio.h>\nint main(void) { puts(\"one\"); return 0; }\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let name: &'static str =
        Box::leak(format!("cache-probe-{}", std::process::id()).into_boxed_str());
    let prog = Program {
        name,
        source: source.clone(),
        deterministic: true,
        expected_exit: 0,
        args: &[],
        features: &[],
        extra_sources: Vec::new(),
    };
    let bin = build(&prog, Toolchain::Gcc).unwrap_or_else(|e| panic!("{e}"));
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let built = mtime(&bin);
    assert_eq!(build(&prog, Toolchain::Gcc).ok().as_ref(), Some(&bin));
    assert_eq!(mtime(&bin), built, "rebuilt an up-to-date program");
    assert_eq!(
        run::<&str>(&bin, &[], T).map(|o| o.stdout).ok().as_deref(),
        Some("one\n")
    );

    std::fs::write(
        &source,
        "#include <stdio.h>\nint main(void) { puts(\"two\"); return 0; }\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let bin2 = build(&prog, Toolchain::Gcc).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        run::<&str>(&bin2, &[], T).map(|o| o.stdout).ok().as_deref(),
        Some("two\n")
    );
    let _ = std::fs::remove_file(&bin2);
}

#[test]
fn parallel_builds_of_one_program_all_succeed() {
    let dir = scratch("parallel");
    let source = dir.join("par.c");
    std::fs::write(&source, "int main(void) { return 9; }\n").unwrap_or_else(|e| panic!("{e}"));
    let name: &'static str =
        Box::leak(format!("par-probe-{}", std::process::id()).into_boxed_str());
    let prog = Program {
        name,
        source,
        deterministic: true,
        expected_exit: 9,
        args: &[],
        features: &[],
        extra_sources: Vec::new(),
    };
    let results: Vec<Result<PathBuf, BuildError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| build(&prog, Toolchain::Clang)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| panic!("builder panicked")))
            .collect()
    });
    for r in results {
        let bin = r.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            run::<&str>(&bin, &[], T).map(|o| o.status).ok(),
            Some(ExitStatus::Code(9))
        );
    }
}
