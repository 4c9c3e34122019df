//! A real server: Debian's memcached 1.6.18 (4 worker threads under
//! libevent, maintenance threads on condition variables), fetched with
//! `apt-get source`, built at -O0 with its own build system, updated live
//! under clients speaking memcached's text protocol on 127.0.0.1:
//! - identity update while idle, and while clients keep a steady load;
//! - Debian's security update (1.6.18-1 → 1.6.18-1+deb12u1) while a client
//!   holds a connection with keys stored: the same connection keeps
//!   working and every key is there;
//! - the fix is there after the live update: memcached in proxy mode (the
//!   code Debian's update patches) answers a get whose key comes after more
//!   than 20 spaces as the fixed version does (CVE-2023-46852), on a
//!   connection held across the update, where the old version routed it;
//! - memcached's own tests (a subset of `t/`, run by `prove`) pass with the
//!   instrumented build as with the plain one, and against a server
//!   live-updated to the security update as against a plain one.
//!
//! Each prints the update latency the tool reports and the longest gap a
//! client saw between replies (figures, not assertions).

mod apply_support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use apply_support::real::{
    kv_identity_idle, kv_identity_under_load, kv_update_keeps_connection, KvClient,
};
use apply_support::servers::memcached::{start, start_with, Memcache};
use upstare_corpus::real::{build_real, build_real_inline, instrument_other, RealBuild, MEMCACHED};
use upstare_testkit::ChildGuard;

fn builds() -> (RealBuild, RealBuild) {
    let old = build_real(&MEMCACHED.recipe, MEMCACHED.old).unwrap_or_else(|e| panic!("{e}"));
    let new = build_real(&MEMCACHED.recipe, MEMCACHED.new).unwrap_or_else(|e| panic!("{e}"));
    (old, new)
}

#[test]
fn memcached_identity_update_while_idle_keeps_keys_and_connections() {
    let (old, _) = builds();
    kv_identity_idle::<Memcache>("memcached", &old.instrumented, &start);
}

#[test]
fn memcached_identity_update_under_load_drops_nothing() {
    let (old, _) = builds();
    kv_identity_under_load::<Memcache>("memcached", &old.instrumented, &start);
}

#[test]
fn memcached_security_update_keeps_a_live_connection_and_its_keys() {
    let (old, new) = builds();
    kv_update_keeps_connection::<Memcache>(
        "memcached",
        &old.instrumented,
        &new.instrumented,
        &start,
    );
}

/// memcached in proxy mode, its lua config (in `dir`) routing gets to the
/// memcached at `backend`; up and answering.
fn start_proxy(
    exe: &Path,
    backend: SocketAddr,
    dir: &apply_support::TempDir,
) -> (ChildGuard, SocketAddr) {
    let config = dir.path().join("proxy.lua");
    std::fs::write(
        &config,
        format!(
            "function mcp_config_pools(old)\n\
             \x20   return mcp.pool({{ mcp.backend(\"b1\", \"127.0.0.1\", {}) }})\n\
             end\n\
             function mcp_config_routes(pool)\n\
             \x20   mcp.attach(mcp.CMD_GET, function(r) return pool(r) end)\n\
             end\n",
            backend.port()
        ),
    )
    .expect("proxy config");
    let proxy_config = format!("proxy_config={}", config.display());
    start_with(exe, &["-o", &proxy_config])
}

impl Memcache {
    /// Sends `request` and returns the reply's lines up to `END`.
    fn until_end(&mut self, request: &str) -> Vec<String> {
        write!(self.writer, "{request}\r\n").expect("send");
        let mut lines = Vec::new();
        for _ in 0..16 {
            let l = self.line().expect("reply line");
            let end = l == "END";
            lines.push(l);
            if end {
                return lines;
            }
        }
        panic!("no END after {lines:?}");
    }
}

#[test]
fn memcached_security_update_brings_the_proxy_prefix_check() {
    let (old, new) = builds();
    let dir = apply_support::TempDir::new("real-memcached-proxy");
    let (_backend, backend_addr) = start(&old.instrumented);
    let mut b = Memcache::connect(backend_addr).expect("connect backend");
    b.set("k1", "v1").expect("set k1");
    b.set("k2", "v2").expect("set k2");
    let (proxy, proxy_addr) = start_proxy(&old.instrumented, backend_addr, &dir);
    let mut held = Memcache::connect(proxy_addr).expect("connect proxy");
    let spaced = format!("get{}k1 k2", " ".repeat(40));
    let values = ["VALUE k1 0 2", "v1", "VALUE k2 0 2", "v2", "END"];
    assert_eq!(held.until_end(&spaced), values, "the old version routes it");
    let report =
        apply_support::real::update(proxy.pid(), &new.instrumented, Duration::from_secs(40));
    let refused = [
        "SERVER_ERROR malformed request",
        "SERVER_ERROR malformed request",
        "END",
    ];
    assert_eq!(held.until_end(&spaced), refused, "the updated process");
    assert_eq!(
        held.until_end("get k1 k2"),
        values,
        "a well-formed get still routed"
    );
    // What a fresh start of the fixed version answers, for comparison.
    let (_fixed, fixed_addr) = start_proxy(&new.instrumented, backend_addr, &dir);
    let mut c = Memcache::connect(fixed_addr).expect("connect fixed proxy");
    assert_eq!(
        c.until_end(&spaced),
        refused,
        "the fixed version's own answer"
    );
    eprintln!(
        "memcached proxy security update: {:.2} ms reported",
        apply_support::real::total_ms(&report)
    );
}

/// Both versions instrumented with `--inline-points` (one flag byte arms
/// the process; detours to trampolines instead of `int3` writes).
fn inline_builds() -> (RealBuild, RealBuild) {
    let old = build_real_inline(&MEMCACHED.recipe, MEMCACHED.old).unwrap_or_else(|e| panic!("{e}"));
    let new = build_real_inline(&MEMCACHED.recipe, MEMCACHED.new).unwrap_or_else(|e| panic!("{e}"));
    for b in [&old, &new] {
        apply_support::real::assert_inline_points(&b.instrumented);
    }
    (old, new)
}

#[test]
fn memcached_with_inline_points_identity_update_under_load_drops_nothing() {
    let (old, _) = inline_builds();
    kv_identity_under_load::<Memcache>("memcached (inline points)", &old.instrumented, &start);
}

#[test]
fn memcached_with_inline_points_security_update_keeps_a_live_connection_and_its_keys() {
    let (old, new) = inline_builds();
    kv_update_keeps_connection::<Memcache>(
        "memcached (inline points)",
        &old.instrumented,
        &new.instrumented,
        &start,
    );
}

/// Test files of memcached's own suite (`t/`, what `make test` runs with
/// `prove`: all 82 files take about 7 minutes here), chosen to run in
/// bounded time (about 40 s a run on this machine) and to pass both ways
/// the suite runs: starting its own servers, and against one already
/// running (`T_MEMD_USE_DAEMON`). They cover the text protocol's storage
/// commands, counters, CAS, flags, noreply, touch and get-and-touch, the
/// binary protocol's gets, malformed and malicious input, and a few
/// regressions (issues 14 and 70). Left out: the files that need their
/// own server settings (stats, binary, metaget: they count what a fresh
/// server holds or wait on extstore), extstore, restart, SASL/TLS and
/// proxy files (other builds or setups), and the ones that mostly sleep
/// (expiry, idle timeouts, LRU crawler and slab rebalancing).
const OWN_TESTS: [&str; 13] = [
    "t/getset.t",
    "t/incrdecr.t",
    "t/cas.t",
    "t/flags.t",
    "t/noreply.t",
    "t/getandtouch.t",
    "t/touch.t",
    "t/binary-get.t",
    "t/bogus-commands.t",
    "t/malicious-commands.t",
    "t/multiversioning.t",
    "t/issue_14.t",
    "t/issue_70.t",
];

/// A directory that is a build directory to memcached's tests (they take
/// the working directory for it and run `./memcached-debug` through
/// `./timedrun`): the tree's `t/` and `timedrun`, and `exe` as
/// `memcached-debug`.
fn suite_dir(tree: &Path, exe: &Path, tag: &str) -> apply_support::TempDir {
    let dir = apply_support::TempDir::new(&format!("real-memcached-suite-{tag}"));
    for (target, name) in [
        (tree.join("t"), "t"),
        (tree.join("timedrun"), "timedrun"),
        (exe.to_path_buf(), "memcached-debug"),
    ] {
        std::os::unix::fs::symlink(&target, dir.join(name))
            .unwrap_or_else(|e| panic!("symlink {}: {e}", target.display()));
    }
    dir
}

/// Runs [`OWN_TESTS`] with `prove -v` in `dir` (see [`suite_dir`]), each
/// file starting its own servers, or, with `daemon`, every file talking to
/// the memcached already running there (`T_MEMD_USE_DAEMON`, the suite's
/// own switch). The assertions that passed and those that failed (TAP
/// `ok` / `not ok` lines; skipped ones in neither).
fn own_tests(dir: &Path, daemon: Option<SocketAddr>) -> (usize, usize, String) {
    let mut cmd = std::process::Command::new("prove");
    cmd.current_dir(dir).arg("-v").args(OWN_TESTS);
    if let Some(addr) = daemon {
        cmd.env("T_MEMD_USE_DAEMON", addr.to_string());
    }
    let out = upstare_testkit::run_command(cmd, Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("memcached's own tests: {e}"));
    let (mut passed, mut failed) = (0, 0);
    for l in out.stdout.lines().map(str::trim_start) {
        if l.contains("# skip") || l.contains("# SKIP") {
            continue;
        }
        let number = |rest: &str| rest.starts_with(|c: char| c.is_ascii_digit());
        if l.strip_prefix("ok ").is_some_and(number) {
            passed += 1;
        } else if l.strip_prefix("not ok ").is_some_and(number) {
            failed += 1;
        }
    }
    let failures = out
        .stdout
        .lines()
        .chain(out.stderr.lines())
        .filter(|l| l.contains("not ok") || l.contains("Failed") || l.contains("Dubious"))
        .take(20)
        .collect::<Vec<_>>()
        .join("\n");
    (passed, failed, failures)
}

/// memcached's own tests pass with the instrumented build of its test
/// program (`memcached-debug`, which they start themselves) as with the
/// plain build: the same assertions pass, and none fails.
#[test]
fn memcached_own_tests_pass_with_the_instrumented_build_as_with_the_plain_one() {
    let (_, new) = builds();
    let instrumented = instrument_other(&MEMCACHED.recipe, MEMCACHED.new, &new, "memcached-debug")
        .unwrap_or_else(|e| panic!("{e}"));
    let plain_dir = suite_dir(&new.tree, &new.tree.join("memcached-debug"), "plain");
    let (baseline, failed, why) = own_tests(plain_dir.path(), None);
    assert_eq!(failed, 0, "the plain build fails:\n{why}");
    let up_dir = suite_dir(&new.tree, &instrumented, "instrumented");
    let (passed, failed, why) = own_tests(up_dir.path(), None);
    assert_eq!(failed, 0, "the instrumented build fails:\n{why}");
    assert_eq!(passed, baseline, "assertions passed: instrumented vs plain");
    assert!(baseline >= 100, "only {baseline} assertions ran");
    eprintln!(
        "memcached's own tests ({}): {passed} passed with the instrumented build, \
         {baseline} with the plain one",
        OWN_TESTS.join(", ")
    );
}

/// memcached's own tests, pointed at an already running server, pass
/// against one live-updated from the old version to the security update
/// as against a fresh start of the update's plain build (not
/// instrumented): the same assertions pass, and none fails.
#[test]
fn memcached_own_tests_pass_against_a_live_updated_server() {
    let (old, new) = builds();
    let dir = suite_dir(&new.tree, &new.tree.join("memcached-debug"), "daemon");
    let (plain, addr) = start(&new.original);
    let (baseline, failed, why) = own_tests(dir.path(), Some(addr));
    assert_eq!(failed, 0, "against the plain build:\n{why}");
    drop(plain);
    let (child, addr) = start(&old.instrumented);
    apply_support::real::update(child.pid(), &new.instrumented, Duration::from_secs(40));
    let (passed, failed, why) = own_tests(dir.path(), Some(addr));
    assert_eq!(failed, 0, "against the live-updated server:\n{why}");
    assert_eq!(passed, baseline, "assertions passed: updated vs plain");
    assert!(baseline >= 100, "only {baseline} assertions ran");
    eprintln!(
        "memcached's own tests against a running server: {passed} passed after a live update, \
         {baseline} against the plain build"
    );
}
