//! A real server: Debian's redis 7.0.15 (event loop in epoll_wait, three
//! background I/O threads on condition variables), fetched with `apt-get
//! source`, built at -O0 with the libc allocator by its own makefiles,
//! updated live under clients speaking RESP on 127.0.0.1:
//! - identity update while idle, and while clients keep a steady load;
//! - Debian's security update (7.0.15-1~deb12u7 → 7.0.15-1~deb12u10) while
//!   a client holds a connection with keys stored: the same connection
//!   keeps working and every key is there.
//!
//! Each prints the update latency the tool reports and the longest gap a
//! client saw between replies (figures, not assertions).

mod apply_support;

use std::path::Path;
use std::time::Duration;

use apply_support::real::{
    kv_identity_idle, kv_identity_under_load, kv_update_keeps_connection, KvClient,
};
use apply_support::servers::redis::{start, start_with, Redis};
use upstare_corpus::real::{build_real, build_real_inline, RealBuild, REDIS};
use upstare_testkit::ChildGuard;

fn builds() -> (RealBuild, RealBuild) {
    let old = build_real(&REDIS.recipe, REDIS.old).unwrap_or_else(|e| panic!("{e}"));
    let new = build_real(&REDIS.recipe, REDIS.new).unwrap_or_else(|e| panic!("{e}"));
    (old, new)
}

#[test]
fn redis_identity_update_while_idle_keeps_keys_and_connections() {
    let (old, _) = builds();
    kv_identity_idle::<Redis>("redis", &old.instrumented, &start);
}

#[test]
fn redis_identity_update_under_load_drops_nothing() {
    let (old, _) = builds();
    kv_identity_under_load::<Redis>("redis", &old.instrumented, &start);
}

#[test]
fn redis_security_update_keeps_a_live_connection_and_its_keys() {
    let (old, new) = builds();
    kv_update_keeps_connection::<Redis>("redis", &old.instrumented, &new.instrumented, &start);
}

/// CRC-64 as redis computes it for DUMP payloads (Jones polynomial,
/// reflected, initial value 0).
fn redis_crc64(bytes: &[u8]) -> u64 {
    const POLY: u64 = 0x95ac_9329_ac4b_c9b5; // 0xad93d23594c935a9 reflected
    let mut crc = 0u64;
    for &b in bytes {
        crc ^= u64::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// A RESTORE payload of a one-field hash in the legacy zipmap encoding
/// whose field length (4) is written in the 5-byte form meant for lengths
/// of 254 and more. The zipmap check of both versions reads it right (the
/// field is `01 00 'X' ff`, its value "v"), but the old version's
/// conversion reads the short form and takes the length bytes for the
/// field and "X" for its value: it answers OK with a hash that is not the
/// one sent. Debian's security update (CVE-2026-25243) makes the check
/// refuse such a length.
fn zipmap_with_long_form_length() -> Vec<u8> {
    // count 1; field: length 254 + u32 4, bytes 01 00 'X' ff; value:
    // length 1, free 0, "v"; end.
    let zipmap = [1u8, 254, 4, 0, 0, 0, 1, 0, b'X', 255, 1, 0, b'v', 255];
    let mut p = vec![9u8, zipmap.len() as u8]; // RDB_TYPE_HASH_ZIPMAP, 6-bit length
    p.extend_from_slice(&zipmap);
    p.extend_from_slice(&9u16.to_le_bytes()); // RDB version 9
    let crc = redis_crc64(&p);
    p.extend_from_slice(&crc.to_le_bytes());
    p
}

#[test]
fn redis_crc64_is_the_one_redis_uses() {
    // The check value of CRC-64/Jones that redis's own crc64 test uses.
    assert_eq!(redis_crc64(b"123456789"), 0xe9c6_d914_c4b8_d9ca);
}

/// The fix is there after the update: on the connection held across it,
/// the old version took the payload (and misread it) and the updated
/// process refuses the same payload as the fixed version does.
#[test]
fn redis_security_update_brings_the_fixed_zipmap_check() {
    let (old, new) = builds();
    let (child, addr) = start(&old.instrumented);
    let mut held = Redis::connect(addr).expect("connect");
    let payload = zipmap_with_long_form_length();
    let restore = |c: &mut Redis, key: &str| -> String {
        c.command_bytes(&[b"RESTORE", key.as_bytes(), b"0", &payload])
            .expect("send RESTORE");
        c.line().expect("RESTORE reply")
    };
    assert_eq!(
        restore(&mut held, "zm-before"),
        "+OK",
        "the old version takes it"
    );
    let misread = |c: &mut Redis| {
        c.command(&["HGET", "zm-before", "\u{4}\0\0\0"])
            .expect("HGET");
        (c.line().expect("reply"), c.line().expect("value"))
    };
    assert_eq!(
        misread(&mut held),
        ("$1".into(), "X".into()),
        "the old version's misreading"
    );
    apply_support::real::update(child.pid(), &new.instrumented, Duration::from_secs(40));
    let after = restore(&mut held, "zm-after");
    assert!(
        after.starts_with("-ERR Bad data format"),
        "the updated process answers {after}"
    );
    // The key restored before the update is still there, as it was.
    assert_eq!(misread(&mut held), ("$1".into(), "X".into()));
    // What a fresh start of the fixed version answers, for comparison.
    let (_fixed, fixed_addr) = start(&new.instrumented);
    let mut c = Redis::connect(fixed_addr).expect("connect");
    assert_eq!(
        restore(&mut c, "zm"),
        after,
        "the fixed version's own answer"
    );
}

/// Units of redis's own test suite run against a server (`--host/--port`:
/// its external-server mode), from the fixed version's tree.
const OWN_UNITS: [&str; 4] = [
    "unit/type/incr",
    "unit/type/string",
    "unit/type/hash",
    "unit/keyspace",
];

/// Runs [`OWN_UNITS`] of the tests in `tree` against the redis at `port`;
/// the number of tests that passed (panics unless all did).
fn own_tests(tree: &Path, port: u16) -> usize {
    let mut cmd = std::process::Command::new("tclsh");
    cmd.current_dir(tree).arg("tests/test_helper.tcl").args([
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--clients",
        "1",
    ]);
    for u in OWN_UNITS {
        cmd.args(["--single", u]);
    }
    let out = upstare_testkit::run_command(cmd, Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("redis's own tests: {e}"));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains("All tests passed without errors!"),
        "redis's own tests on port {port}: {}",
        text.lines()
            .filter(|l| l.contains("[err]") || l.contains("exception"))
            .take(10)
            .collect::<Vec<_>>()
            .join("\n")
    );
    text.lines()
        .filter(|l| l.contains("ok") && l.contains("]: "))
        .count()
}

/// redis with DEBUG enabled (its tests use it), on 127.0.0.1.
fn start_for_own_tests(exe: &Path) -> (ChildGuard, u16) {
    let args = ["--protected-mode", "no", "--enable-debug-command", "yes"];
    let (child, addr) = start_with(exe, &args);
    (child, addr.port())
}

/// redis's own tests pass against a server live-updated from the old
/// version to the fixed one, as many as against the fixed version as
/// Debian's build makes it (not instrumented).
#[test]
fn redis_own_tests_pass_after_a_live_update() {
    let (old, new) = builds();
    let (plain, port) = start_for_own_tests(&new.original);
    let baseline = own_tests(&new.tree, port);
    drop(plain);
    let (child, port) = start_for_own_tests(&old.instrumented);
    apply_support::real::update(child.pid(), &new.instrumented, Duration::from_secs(40));
    let updated = own_tests(&new.tree, port);
    assert_eq!(
        updated, baseline,
        "tests passed after the update vs the plain build"
    );
    assert!(baseline >= 100, "only {baseline} tests ran");
    eprintln!("redis's own tests ({}): {updated} passed after a live update, {baseline} on the plain build", OWN_UNITS.join(", "));
}

/// Both versions instrumented with `--inline-points` (one flag byte arms
/// the process; detours to trampolines instead of `int3` writes).
fn inline_builds() -> (RealBuild, RealBuild) {
    let old = build_real_inline(&REDIS.recipe, REDIS.old).unwrap_or_else(|e| panic!("{e}"));
    let new = build_real_inline(&REDIS.recipe, REDIS.new).unwrap_or_else(|e| panic!("{e}"));
    for b in [&old, &new] {
        apply_support::real::assert_inline_points(&b.instrumented);
    }
    (old, new)
}

#[test]
fn redis_with_inline_points_identity_update_under_load_drops_nothing() {
    let (old, _) = inline_builds();
    kv_identity_under_load::<Redis>("redis (inline points)", &old.instrumented, &start);
}

#[test]
fn redis_with_inline_points_security_update_keeps_a_live_connection_and_its_keys() {
    let (old, new) = inline_builds();
    kv_update_keeps_connection::<Redis>(
        "redis (inline points)",
        &old.instrumented,
        &new.instrumented,
        &start,
    );
}

/// Killing the updater while it stops redis leaves redis running with its
/// keys. Its background threads wait on condition variables: the stop
/// leads them out with a breakpoint at the wait's return, no update point,
/// which the rescue handler must restore too. Before it did not, and redis
/// died of SIGTRAP when the updater was killed at stop moments 2, 3 and 5.
#[test]
fn redis_survives_the_updaters_death_while_it_is_stopped() {
    let (old, new) = builds();
    let mut killed = 0;
    for n in [2, 3, 4, 5, 8] {
        let what = format!("stop:{n}:SIGKILL");
        let (server, addr) = start(&old.instrumented);
        let mut client = Redis::connect(addr).expect("connect");
        client.set("kept", "before").expect("set");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_upstare-apply"));
        cmd.args(["--pid", &server.pid().to_string(), "--to"])
            .arg(&new.instrumented)
            .args(["--timeout", "20000"])
            .env("UPSTARE_TEST_SIGNAL_AT", &what);
        let out = upstare_testkit::run_command(cmd, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        if out.status.signal() == Some(9) {
            killed += 1;
        }
        // Whether the moment was reached (killed, old version) or not
        // (updated), redis answers on the same connection with its key.
        assert_eq!(
            client
                .get("kept")
                .unwrap_or_else(|e| panic!("{what}: {e}\n{}", server.stderr_so_far())),
            Some("before".to_string()),
            "{what}"
        );
        client
            .set("after", "yes")
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    assert!(
        killed >= 3,
        "the updater was killed at only {killed} of 5 moments"
    );
}
