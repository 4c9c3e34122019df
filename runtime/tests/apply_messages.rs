//! Errors that explain: a refused `PTRACE_SEIZE` says why (the updater
//! itself, another tracer, a zombie), and no user-facing message carries
//! Rust debug formatting, neither in the texts these paths produce nor in
//! any error format string of the workspace's sources.

mod apply_support;

use apply_support::TempDir;
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_runtime::Tracee;
use upstare_testkit::{run_command, spawn, workspace_root, Toolchain};

const WAIT: Duration = Duration::from_secs(20);

/// What debug formatting of our types and std's looks like in a message.
const DEBUG_MARKS: [&str; 8] = [
    "{ ",
    " }",
    "Some(",
    "None",
    "Sig(",
    "Ok(",
    "Err(",
    "RuntimeAddr(",
];

fn assert_plain(msg: &str) {
    for m in DEBUG_MARKS {
        assert!(!msg.contains(m), "debug formatting ({m}) in: {msg}");
    }
}

/// A regular file to pass as NEW: the refusals below come before it is
/// parsed.
fn some_new(dir: &TempDir) -> PathBuf {
    let p = dir.join("new.up");
    std::fs::write(&p, b"not looked at").expect("write");
    p
}

#[test]
fn refused_seize_says_why() {
    let dir = TempDir::new("apply-messages");
    let new = some_new(&dir);
    let mut messages = Vec::new();

    // The updater itself.
    let e = apply(std::process::id() as i32, &new, &ApplyOptions::default())
        .expect_err("self")
        .to_string();
    assert!(e.contains("upstare-apply itself"), "{e}");
    messages.push(e);

    // Another tracer: this test, holding the program traced.
    let src = "#include <unistd.h>\nint main(void) { for (;;) pause(); }\n";
    let exe = apply_support::build_c(&dir, "pauser", src, Toolchain::Gcc);
    let child = spawn(&exe, &[] as &[&str]).expect("spawn");
    let mut holder = Tracee::seize(Pid::from_raw(child.pid() as i32)).expect("seize");
    for tid in holder.traced() {
        let sig = holder.take_pending_signal(tid);
        holder.cont(tid, sig).expect("cont");
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_upstare-apply"));
    cmd.args(["--pid", &child.pid().to_string(), "--to"])
        .arg(&new);
    let out = run_command(cmd, WAIT).expect("upstare-apply");
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "cannot trace process {}: it is already traced by process {}",
            child.pid(),
            std::process::id()
        )),
        "{}",
        out.stderr
    );
    messages.push(out.stderr.clone());
    holder.detach().expect("detach");

    // A zombie: a child that exited and is not reaped yet.
    let mut z = Command::new("true").spawn().expect("spawn true");
    let zpid = z.id();
    let stat = format!("/proc/{zpid}/stat");
    let mut zombie = false;
    for _ in 0..2000 {
        let s = std::fs::read_to_string(&stat).unwrap_or_default();
        if s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
        {
            zombie = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(zombie, "the child did not become a zombie");
    let e = apply(zpid as i32, &new, &ApplyOptions::default())
        .expect_err("zombie")
        .to_string();
    assert!(e.contains("zombie"), "{e}");
    messages.push(e);
    z.wait().expect("reap");

    for m in &messages {
        println!("{m}");
        assert_plain(m);
    }
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// No error or message format string of the libraries and tools formats a
/// value with `{:?}`, except durations (`200ms`) and quoted text
/// (`{line:?}`, `{text:?}`), which read as plain words; a line marked
/// `debug-name:` takes only a variant's name.
#[test]
fn no_debug_formatting_in_message_formats() {
    let root = workspace_root();
    let mut files = Vec::new();
    for c in ["dwarf/src", "patcher/src", "rewriter/src", "runtime/src"] {
        sources(&root.join(c), &mut files);
    }
    assert!(files.len() > 20, "found only {} sources", files.len());
    let allowed = ["{timeout:?}", "{waited:?}", "{line:?}", "{text:?}"];
    let mut bad = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read source");
        // Unit tests may print whatever helps.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (i, l) in code.lines().enumerate() {
            let t = l.trim_start();
            if t.starts_with("//")
                || l.contains("debug-name:")
                || ["assert", "panic!", "debug_assert", "unreachable!"]
                    .iter()
                    .any(|m| t.starts_with(m))
            {
                continue;
            }
            let mut rest = l.to_string();
            for a in allowed {
                rest = rest.replace(a, "");
            }
            if rest.contains(":?}") || rest.contains(":#?}") {
                bad.push(format!("{}:{}: {}", f.display(), i + 1, l.trim()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "debug formatting in messages:\n{}",
        bad.join("\n")
    );
}
