//! The harness itself: toolchain flags reach the binaries, the build cache
//! rebuilds exactly when needed and tolerates parallel builders, and the
//! process runner reports statuses, enforces time limits and leaves no
//! process behind.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use upstare_corpus::{build, Program};
use upstare_testkit::{
    compile_c, run, spawn, target_dir, BuildError, CSource, ExitStatus, RunError, Toolchain,
};

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

fn compile(dir: &Path, name: &str, text: &str) -> PathBuf {
    compile_c(CSource::Text(text), Toolchain::Gcc, &[], &dir.join(name))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Whether `pid` is gone: no /proc entry, or a zombie waiting for its reaper.
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

fn wait_dead(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if is_dead(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn elf_type(bin: &Path) -> u16 {
    let bytes = std::fs::read(bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    assert_eq!(&bytes[..4], b"\x7fELF", "{} is not ELF", bin.display());
    u16::from_le_bytes([bytes[16], bytes[17]])
}

#[test]
fn toolchain_flags_reach_the_binary() {
    const ET_EXEC: u16 = 2;
    const ET_DYN: u16 = 3;
    let dir = scratch("flags");
    for tc in Toolchain::ALL {
        let bin = compile_c(
            CSource::Text("int main(void) { return 0; }\n"),
            tc,
            &[],
            &dir.join(tc.name()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let want = if tc.is_pie() { ET_DYN } else { ET_EXEC };
        assert_eq!(elf_type(&bin), want, "{tc}: wrong ELF type");
        let bytes = std::fs::read(&bin).unwrap_or_default();
        let has = |s: &[u8]| bytes.windows(s.len()).any(|w| w == s);
        assert!(has(b".debug_info"), "{tc}: no DWARF (-g missing?)");
        assert_eq!(
            has(b"clang version"),
            tc == Toolchain::Clang,
            "{tc}: wrong compiler"
        );
        assert!(tc.cflags().contains(&"-fno-omit-frame-pointer"));
    }
    assert_eq!(
        "gcc-nopie".parse::<Toolchain>().ok(),
        Some(Toolchain::GccNoPie)
    );
    assert!(matches!(
        "icc".parse::<Toolchain>(),
        Err(BuildError::UnknownToolchain(_))
    ));
}

#[test]
fn extra_flags_come_after_the_defaults() {
    let dir = scratch("extra");
    let src = "#ifndef MARK\n#error MARK missing\n#endif\nint main(void) { return MARK; }\n";
    let bin = compile_c(
        CSource::Text(src),
        Toolchain::Clang,
        &["-DMARK=5"],
        &dir.join("m"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        run::<&str>(&bin, &[], T).map(|o| o.status).ok(),
        Some(ExitStatus::Code(5))
    );
}

#[test]
fn compile_errors_name_the_source_and_leave_no_output() {
    let dir = scratch("broken");
    let out = dir.join("broken");
    let err = compile_c(CSource::Text("int main( {\n"), Toolchain::Gcc, &[], &out)
        .expect_err("broken C compiled");
    let msg = err.to_string();
    assert!(matches!(err, BuildError::Compile { .. }), "{msg}");
    assert!(
        msg.contains("broken.c"),
        "message does not name the file: {msg}"
    );
    assert!(!out.exists(), "a failed build left {}", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(
        leftovers.len(),
        1,
        "temporary files left behind: {leftovers:?}"
    );
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

#[test]
fn run_reports_exit_codes_signals_and_both_streams() {
    let dir = scratch("status");
    let bin = compile(
        &dir,
        "status",
        "#include <signal.h>\n#include <stdio.h>\n#include <stdlib.h>\n\
         int main(int argc, char **argv) {\n\
           printf(\"out %d\\n\", argc); fprintf(stderr, \"err\\n\"); fflush(NULL);\n\
           if (argc > 2) raise(SIGTERM);\n\
           return argc > 1 ? atoi(argv[1]) : 0;\n}\n",
    );
    let o = run(&bin, &["17"], T).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (o.stdout.as_str(), o.stderr.as_str(), o.status),
        ("out 2\n", "err\n", ExitStatus::Code(17))
    );
    let o = run(&bin, &["1", "x"], T).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.status, ExitStatus::Signal(15));
    assert_eq!(o.status.signal(), Some(15));
    assert_eq!(o.stdout, "out 3\n");
}

#[test]
fn timeout_kills_the_child_and_returns_partial_output() {
    let dir = scratch("timeout");
    let bin = compile(
        &dir,
        "hang",
        "#include <stdio.h>\n#include <unistd.h>\n\
         int main(void) { printf(\"pid %d\\n\", getpid()); fflush(stdout); for (;;) pause(); }\n",
    );
    let start = Instant::now();
    let err = run::<&str>(&bin, &[], Duration::from_millis(300)).expect_err("hang finished");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    match err {
        RunError::Timeout { pid, stdout, .. } => {
            assert_eq!(stdout, format!("pid {pid}\n"));
            assert!(wait_dead(pid), "pid {pid} survived the timeout");
        }
        other => panic!("expected a timeout, got {other}"),
    }
}

#[test]
fn dropping_the_guard_kills_the_child_and_its_forked_children() {
    let dir = scratch("drop");
    let bin = compile(
        &dir,
        "forker",
        "#include <stdio.h>\n#include <unistd.h>\n\
         int main(void) {\n\
           pid_t c = fork();\n\
           if (c == 0) { for (;;) pause(); }\n\
           printf(\"child %d\\n\", (int)c); fflush(stdout);\n\
           for (;;) pause();\n}\n",
    );
    let child = spawn::<&str>(&bin, &[]).unwrap_or_else(|e| panic!("{e}"));
    let pid = child.pid();
    let line = child
        .wait_for_line("child pid", T, |l| l.starts_with("child "))
        .unwrap_or_else(|e| panic!("{e}"));
    let grandchild: u32 = line[6..].parse().unwrap_or_else(|e| panic!("{line}: {e}"));
    assert!(!is_dead(pid) && !is_dead(grandchild));
    drop(child);
    assert!(wait_dead(pid), "child {pid} survived drop");
    assert!(
        wait_dead(grandchild),
        "grandchild {grandchild} survived drop"
    );
}

#[test]
fn stdin_and_line_waiting() {
    let dir = scratch("stdin");
    let bin = compile(
        &dir,
        "upper",
        "#include <ctype.h>\n#include <stdio.h>\n\
         int main(void) { int c; setvbuf(stdout, NULL, _IOLBF, 0);\n\
           while ((c = getchar()) != EOF) putchar(toupper(c));\n\
           puts(\"eof\"); return 3; }\n",
    );
    let mut child = spawn::<&str>(&bin, &[]).unwrap_or_else(|e| panic!("{e}"));
    child
        .send_stdin(b"hello\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let line = child
        .wait_for_line("HELLO", T, |l| l == "HELLO")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(line, "HELLO");
    // A line that never comes: bounded wait, clear error.
    let err = child
        .wait_for_line("nothing", Duration::from_millis(200), |l| l == "never")
        .expect_err("matched a line that was never printed");
    assert!(
        matches!(err, RunError::NoMatch { exited: false, .. }),
        "{err}"
    );
    child.close_stdin();
    let out = child.wait(T).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.stdout, "HELLO\neof\n");
    assert_eq!(out.status.code(), Some(3));
    assert!(
        child.send_stdin(b"late\n").is_err(),
        "wrote to a closed stdin"
    );
}

#[test]
fn missing_program_is_a_spawn_error() {
    let err = run::<&str>(Path::new("/nonexistent/upstare-prog"), &[], T).expect_err("ran nothing");
    assert!(matches!(err, RunError::Spawn { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/upstare-prog"),
        "{err}"
    );
}
