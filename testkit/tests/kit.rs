//! The kit itself: toolchain flags reach the binaries, compile errors are
//! clear, and the process runner reports statuses, enforces time limits and
//! leaves no process behind.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use upstare_testkit::{
    compile_c, run, spawn, BuildError, CSource, ExitStatus, RunError, TempDir, Toolchain,
};

const T: Duration = Duration::from_secs(20);

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
    let tmp = TempDir::new("kit-flags");
    let dir = tmp.path();
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
    let tmp = TempDir::new("kit-extra");
    let dir = tmp.path();
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
    let tmp = TempDir::new("kit-broken");
    let dir = tmp.path();
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
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(
        leftovers.len(),
        1,
        "temporary files left behind: {leftovers:?}"
    );
}

#[test]
fn run_reports_exit_codes_signals_and_both_streams() {
    let tmp = TempDir::new("kit-status");
    let dir = tmp.path();
    let bin = compile(
        dir,
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
    let tmp = TempDir::new("kit-timeout");
    let dir = tmp.path();
    let bin = compile(
        dir,
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
    let tmp = TempDir::new("kit-drop");
    let dir = tmp.path();
    let bin = compile(
        dir,
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
    let tmp = TempDir::new("kit-stdin");
    let dir = tmp.path();
    let bin = compile(
        dir,
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
