//! Updating processes that cannot see NEW's path: the sessions of
//! `corpus/versions/chroot_sessions` chroot into an empty directory and
//! become nobody before serving, so NEW reaches them through a memfd
//! (`runtime/src/load/map.rs`). Runs as root (chroot needs it); run as
//! another user it fails saying so.

mod apply_support;

use apply_support::instrumented;
use apply_support::lines::{field, wait_for_lines, LineClient};
use nix::unistd::Pid;
use std::path::PathBuf;
use std::time::Duration;
use upstare_corpus::version_pair;
use upstare_runtime::update::tree::apply_tree;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{spawn, ChildGuard, TempDir, Toolchain};

const WAIT: Duration = Duration::from_secs(20);
const SESSIONS: usize = 3;

/// This process's effective user id (the second field of `Uid:` in
/// `/proc/self/status`).
fn effective_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("a Uid: line")
}

/// The server of `chroot_sessions` (v1) with a session per live
/// connection, each answered once, chrooted into an empty directory and
/// running as nobody.
struct Sessions {
    v2: PathBuf,
    server: ChildGuard,
    port: u16,
    clients: Vec<LineClient>,
    pids: Vec<Pid>,
    /// Bind it (a pattern's `..` drops it): sessions started later chroot
    /// into it.
    _jail: TempDir,
}

fn start_sessions(tc: Toolchain) -> Sessions {
    assert!(
        effective_uid() == 0,
        "this test needs root: the sessions of chroot_sessions call chroot() and setuid(nobody)"
    );
    let pair = version_pair("chroot_sessions").expect("chroot_sessions pair");
    let (v1, v2) = (instrumented(&pair.v1, tc), instrumented(&pair.v2, tc));
    let jail = TempDir::new("jail");
    let server = spawn(&v1, &[jail.path()]).expect("spawn");
    let listening = server
        .wait_for_line("listening", WAIT, |l| l.starts_with("v1 listening"))
        .expect("listening");
    let port = field(&listening, "port") as u16;
    let mut clients: Vec<LineClient> = (0..SESSIONS).map(|_| LineClient::connect(port)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.ask(&format!("hello {i}")), format!("echo: hello {i}"));
    }
    // The replies may come before the sessions' lines are read.
    let pids: Vec<Pid> = wait_for_lines(&server, "v1 session pid=", SESSIONS, WAIT)
        .iter()
        .map(|l| {
            assert_eq!(field(l, "uid"), 65534, "the session dropped root: {l}");
            Pid::from_raw(field(l, "pid") as i32)
        })
        .collect();
    for &pid in &pids {
        let root = std::fs::read_link(format!("/proc/{pid}/root")).expect("root link");
        assert_eq!(root, jail.path(), "session {pid} is chrooted");
    }
    // Now each session sits in recv on its connection.
    std::thread::sleep(Duration::from_millis(50));
    Sessions {
        v2,
        server,
        port,
        clients,
        pids,
        _jail: jail,
    }
}

fn chrooted_sessions_are_updated(tc: Toolchain) {
    let Sessions {
        v2,
        server,
        mut clients,
        pids: sessions,
        _jail: _kept,
        ..
    } = start_sessions(tc);
    let opts = ApplyOptions {
        timeout: Duration::from_millis(3000),
        ..ApplyOptions::default()
    };
    // A dry run meets everything a real update would (NEW loaded through
    // the memfd, then unloaded) and changes nothing.
    let dry = ApplyOptions {
        dry_run: true,
        ..opts.clone()
    };
    let maps_before = apply_support::maps_text(sessions[0]);
    apply(sessions[0].as_raw(), &v2, &dry).unwrap_or_else(|e| panic!("dry run: {e}"));
    assert_eq!(apply_support::maps_text(sessions[0]), maps_before);
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.ask(&format!("still {i}")), format!("echo: still {i}"));
    }
    for &pid in &sessions {
        apply(pid.as_raw(), &v2, &opts).unwrap_or_else(|e| panic!("update of session {pid}: {e}"));
        let maps = apply_support::maps_text(pid);
        assert!(
            maps.lines()
                .any(|l| l.contains(" r-xp ") && l.contains("/memfd:upstare:")),
            "NEW is mapped from its memfd in {pid}:\n{maps}"
        );
    }
    for (i, c) in clients.iter_mut().enumerate() {
        // Two lines served before the update: v2 numbers this one 3.
        let line = format!("after {i}");
        assert_eq!(
            c.ask(&line),
            format!("v2 echo #3 ({} bytes): {line}", line.len())
        );
        assert_eq!(c.ask("quit"), "v2 bye");
    }
    for &pid in &sessions {
        server
            .wait_for_line("session ends as v2", WAIT, |l| {
                l == format!("v2 session pid={pid} ended served=3")
            })
            .expect("v2 ends the session");
    }
}

/// The same server updated from its parent: the parent (which sees NEW's
/// path) and its chrooted sessions (which do not) as one application.
fn chrooted_sessions_are_updated_with_their_parent(tc: Toolchain) {
    let Sessions {
        v2,
        server,
        port,
        mut clients,
        _jail: _kept,
        ..
    } = start_sessions(tc);
    let opts = ApplyOptions {
        timeout: Duration::from_millis(3000),
        ..ApplyOptions::default()
    };
    let tree = apply_tree(server.pid() as i32, &v2, &opts)
        .unwrap_or_else(|e| panic!("update of the tree: {e}"));
    assert_eq!(
        tree.processes.len(),
        SESSIONS + 1,
        "the parent and its sessions"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        let line = format!("after {i}");
        assert_eq!(
            c.ask(&line),
            format!("v2 echo #2 ({} bytes): {line}", line.len())
        );
    }
    // The parent runs v2: a new connection gets a v2 session.
    let mut fresh = LineClient::connect(port);
    assert_eq!(fresh.ask("new"), "v2 echo #1 (3 bytes): new");
    server
        .wait_for_line("a v2 session", WAIT, |l| {
            l.starts_with("v2 session pid=") && l.ends_with("uid=65534")
        })
        .expect("v2 session");
}

#[test]
fn chrooted_sessions_are_updated_with_their_parent_gcc() {
    chrooted_sessions_are_updated_with_their_parent(Toolchain::Gcc);
}

#[test]
fn chrooted_sessions_are_updated_with_their_parent_clang() {
    chrooted_sessions_are_updated_with_their_parent(Toolchain::Clang);
}

#[test]
fn chrooted_sessions_are_updated_gcc() {
    chrooted_sessions_are_updated(Toolchain::Gcc);
}

#[test]
fn chrooted_sessions_are_updated_clang() {
    chrooted_sessions_are_updated(Toolchain::Clang);
}
