//! A real server: Debian's OpenSSH 9.2p1 sshd (privilege separation as user
//! `sshd` chrooted to `/run/sshd`, the seccomp-sandboxed pre-authentication
//! child, a re-exec of itself for every connection), fetched with `apt-get
//! source`, built at -O0 by its own configure, on 127.0.0.1 with its own
//! host key and a key made by ssh-keygen at test time, driven by the real
//! `ssh` client logging in as the unprivileged `upstare-ssh` (both users
//! come from `scripts/deps`):
//! - identity update of the idle listener, then a new login runs a command;
//! - identity update of the listener tree while a client keeps logging in
//!   and a session echoes: no login fails, the session echoes on;
//! - Debian's security update (1:9.2p1-2+deb12u7 → +deb12u10) while an
//!   interactive session is open: installed over the file sshd runs (as a
//!   package upgrade does, so that the listener's re-exec for new
//!   connections starts the update too), then the listener, the session's
//!   privileged monitor and its unprivileged child are updated as one; the
//!   same session still echoes what it is sent, and a new login runs the
//!   new version;
//! - the fix observable: with `-r` (connections forked, not re-executed),
//!   a client announcing a P-256 key as P-384 logs in before the live
//!   update and is refused after it (CVE-2026-35387);
//! - an update while a connection is before authentication is refused,
//!   naming the sandboxed child, and changes nothing; once that connection
//!   is gone the update goes through.
//!
//! Each prints the update latency the tool reports and the longest gap the
//! session's client saw between echoes (figures, not assertions).

mod apply_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use apply_support::fresh_copy;
use apply_support::real::{runs, total_ms, update, update_refused, updated_pids};
use apply_support::servers::sshd::{
    descendants, has_ended, install_over, keygen_of, set_mode, start, start_with, Logins, Pinger,
    Session, Sshd, LOGIN, WAIT,
};
use upstare_corpus::real::{build_real, RealBuild, OPENSSH};
use upstare_testkit::run_command;

fn builds() -> (RealBuild, RealBuild) {
    let old = build_real(&OPENSSH.recipe, OPENSSH.old).unwrap_or_else(|e| panic!("{e}"));
    let new = build_real(&OPENSSH.recipe, OPENSSH.new).unwrap_or_else(|e| panic!("{e}"));
    (old, new)
}

#[test]
fn sshd_identity_update_of_the_idle_listener_then_a_new_login_runs_a_command() {
    let (old, _) = builds();
    let sshd = start(&old.instrumented);
    assert_eq!(sshd.run("echo upstare-$((6*7))"), "upstare-42\n");

    let copy = fresh_copy(&sshd.exe, &sshd.dir, "identity");
    let report = update(sshd.pid(), &copy, WAIT * 2);
    assert_eq!(updated_pids(&report), vec![sshd.pid()], "only the listener");
    assert!(runs(sshd.pid(), &copy), "the copy is not the running code");
    for i in 0..3 {
        assert_eq!(
            sshd.run(&format!("echo login-{i}-$((6*7))")),
            format!("login-{i}-42\n")
        );
    }
    // A login now re-executes the file sshd was started from, no longer
    // the listener's: its processes are still sshd's and are updated with
    // the listener.
    let mut session = Session::open(&sshd);
    let session_pids = sshd.sessions();
    assert_eq!(session_pids.len(), 2, "monitor and child: {session_pids:?}");
    let again = fresh_copy(&sshd.exe, &sshd.dir, "again");
    let second = update(sshd.pid(), &again, WAIT * 2);
    let mut want: Vec<u32> = std::iter::once(sshd.pid()).chain(session_pids).collect();
    want.sort_unstable();
    assert_eq!(updated_pids(&second), want, "listener, monitor and child");
    for &p in &want {
        assert!(runs(p, &again), "process {p} does not run the copy");
    }
    session.echo().expect("the session after the second update");
    eprintln!(
        "sshd idle identity update of the listener: {:.2} ms reported; \
         again with a session re-executed from the first file: {:.2} ms",
        total_ms(&report),
        total_ms(&second)
    );
}

/// Identity update of the listener tree while a client keeps logging in
/// and a held session echoes. A login in its pre-authentication phase has
/// a sandboxed child, which makes the update refused (and nothing
/// changed): it is tried again, a bounded number of times, until it finds
/// a moment between two logins' sandboxes. No login fails, the session
/// echoes on, and the listener runs the copy.
#[test]
fn sshd_identity_update_while_clients_log_in_drops_no_login() {
    let (old, _) = builds();
    let sshd = start(&old.instrumented);
    let pinger = Pinger::start(Session::open(&sshd));
    let logins = Logins::start(&sshd);
    std::thread::sleep(Duration::from_millis(500));
    let copy = fresh_copy(&sshd.exe, &sshd.dir, "identity");
    let (mut refused, mut report) = (0u32, None);
    for _ in 0..40 {
        match apply_support::real::try_update(sshd.pid(), &copy, WAIT * 2) {
            Ok(r) => {
                report = Some(r);
                break;
            }
            Err(e) => {
                assert!(
                    e.contains("seccomp") && e.contains("nothing was changed"),
                    "refused for another reason than a login's sandbox: {e}"
                );
                assert!(
                    runs(sshd.pid(), &sshd.exe) && !runs(sshd.pid(), &copy),
                    "a refused update changed the listener"
                );
                refused += 1;
                std::thread::sleep(Duration::from_millis(37));
            }
        }
    }
    let report = report.unwrap_or_else(|| panic!("refused {refused} times, never went through"));
    std::thread::sleep(Duration::from_millis(500));
    let logged_in = logins.finish();
    let (mut session, gap) = pinger.finish();
    assert!(runs(sshd.pid(), &copy), "the copy is not the running code");
    assert!(logged_in >= 2, "only {logged_in} logins during the test");
    session.echo().expect("the session after the update");
    assert_eq!(sshd.run("echo after-$((6*7))"), "after-42\n");
    eprintln!(
        "sshd identity update under logins: {:.2} ms reported, {} processes updated \
         ({} forked during it, {} ended), {refused} refusals before (a login's sandbox), \
         {logged_in} logins, longest gap the session saw {:.2} ms",
        total_ms(&report),
        updated_pids(&report).len(),
        report["forked"].as_array().map_or(0, Vec::len),
        report["exited"].as_array().map_or(0, Vec::len),
        gap.as_secs_f64() * 1000.0
    );
}

#[test]
fn sshd_security_update_keeps_a_live_session_and_new_logins_run_the_fix() {
    let (old, new) = builds();
    let sshd = start(&old.instrumented);
    let session = Session::open(&sshd);
    // The session's privileged monitor (root) and its unprivileged child
    // (the user's), both re-executed from sshd's path.
    let session_pids = sshd.sessions();
    assert_eq!(session_pids.len(), 2, "monitor and child: {session_pids:?}");

    install_over(&new.instrumented, &sshd.exe);
    let pinger = Pinger::start(session);
    std::thread::sleep(Duration::from_millis(200));
    let report = update(sshd.pid(), &sshd.exe, WAIT * 2);
    std::thread::sleep(Duration::from_millis(200));
    let (mut session, gap) = pinger.finish();

    let mut want: Vec<u32> = std::iter::once(sshd.pid())
        .chain(session_pids.iter().copied())
        .collect();
    want.sort_unstable();
    assert_eq!(
        updated_pids(&report),
        want,
        "the listener and the session were not updated as one"
    );
    // Each runs the new version (the path names the installed file; the
    // old, replaced one shows as deleted).
    for &p in &want {
        assert!(runs(p, &sshd.exe), "process {p} does not run the update");
    }
    for i in 0..5 {
        session
            .echo()
            .unwrap_or_else(|e| panic!("echo {i} after the update: {e}"));
    }
    assert_eq!(sshd.run("echo after-$((6*7))"), "after-42\n");
    // A new login's processes start the installed update.
    let mut second = Session::open(&sshd);
    let fresh: Vec<u32> = sshd
        .sessions()
        .into_iter()
        .filter(|p| !want.contains(p))
        .collect();
    assert_eq!(
        fresh.len(),
        2,
        "the new login's monitor and child: {fresh:?}"
    );
    for p in fresh {
        let exe = std::fs::read_link(format!("/proc/{p}/exe")).expect("exe");
        assert_eq!(exe, sshd.exe, "process {p} of a new login");
    }
    second.echo().expect("second session");
    session
        .echo()
        .expect("first session after the second login");
    let processes = report["processes"].as_array().cloned().unwrap_or_default();
    for p in &processes {
        eprintln!("sshd process {}: timings {}", p["pid"], p["timings"]);
    }
    let paused: Vec<String> = processes
        .iter()
        .map(|p| {
            format!(
                "{} {:.2} ms",
                p["pid"],
                p["timings"]["pause_us"].as_f64().unwrap_or(f64::NAN) / 1000.0
            )
        })
        .collect();
    eprintln!(
        "sshd {} -> {} with a live session (listener + monitor + child): {:.2} ms reported, \
         paused per process: {}; longest gap the session saw {:.2} ms",
        OPENSSH.old,
        OPENSSH.new,
        total_ms(&report),
        paused.join(", "),
        gap.as_secs_f64() * 1000.0
    );
}

#[test]
fn sshd_update_during_a_login_is_refused_naming_the_sandboxed_child() {
    let (old, _) = builds();
    let sshd = start(&old.instrumented);
    // A client that sent its version and nothing more: the connection's
    // unprivileged child waits for the key exchange in its seccomp sandbox.
    let addr = SocketAddr::from(([127, 0, 0, 1], sshd.port));
    let mut raw = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    raw.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut reader = BufReader::new(raw.try_clone().expect("clone"));
    let mut banner = String::new();
    reader.read_line(&mut banner).expect("server version");
    assert!(banner.starts_with("SSH-2.0-OpenSSH_9.2p1"), "{banner}");
    raw.write_all(b"SSH-2.0-upstare_probe\r\n")
        .expect("send version");
    let deadline = Instant::now() + WAIT;
    let sandboxed = loop {
        let child = descendants(sshd.pid()).into_iter().find(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .is_ok_and(|s| s.lines().any(|l| l.replace(['\t', ' '], "") == "Seccomp:2"))
        });
        if let Some(p) = child {
            break p;
        }
        assert!(Instant::now() < deadline, "no sandboxed child appeared");
        std::thread::sleep(Duration::from_millis(20));
    };

    let copy = fresh_copy(&sshd.exe, &sshd.dir, "identity");
    let error = update_refused(sshd.pid(), &copy, WAIT * 2);
    assert!(
        error.contains(&format!("process {sandboxed} (sshd: "))
            && error.contains("seccomp")
            && error.contains("nothing was changed"),
        "{error}"
    );
    // Nothing changed: the listener runs its file, the sandboxed child
    // lives on and goes on with its key exchange.
    assert!(runs(sshd.pid(), &sshd.exe) && !runs(sshd.pid(), &copy));
    let mut kexinit = [0u8; 64];
    reader
        .read_exact(&mut kexinit)
        .expect("the sandboxed child's key exchange");
    assert!(!has_ended(sandboxed));
    assert_eq!(sshd.run("echo during-$((6*7))"), "during-42\n");

    // Once that connection is gone, the update goes through.
    drop(reader);
    drop(raw);
    let deadline = Instant::now() + WAIT;
    while !has_ended(sandboxed) {
        assert!(Instant::now() < deadline, "the sandboxed child did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = update(sshd.pid(), &copy, WAIT * 2);
    assert!(runs(sshd.pid(), &copy), "the copy is not the running code");
    assert_eq!(sshd.run("echo after-$((6*7))"), "after-42\n");
    eprintln!(
        "sshd update after the refused one: {:.2} ms reported",
        total_ms(&report)
    );
}

/// A client that announces `ecdsa-sha2-nistp384` for a NIST P-256 key
/// (paramiko, its algorithm name replaced), logs in with `key` and runs
/// `echo upstare-$((6*7))`: prints `accepted upstare-42` or `refused`.
const CURVE_LIE: &str = r#"
import sys, paramiko
from paramiko.auth_handler import AuthHandler
plain = AuthHandler._finalize_pubkey_algorithm
def lie(self, key_type):
    if key_type == "ecdsa-sha2-nistp256":
        return "ecdsa-sha2-nistp384"
    return plain(self, key_type)
AuthHandler._finalize_pubkey_algorithm = lie
key = paramiko.ECDSAKey.from_private_key_file(sys.argv[2])
c = paramiko.SSHClient()
c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
try:
    c.connect("127.0.0.1", port=int(sys.argv[1]), username=sys.argv[3], pkey=key,
              look_for_keys=False, allow_agent=False, timeout=10, banner_timeout=10,
              auth_timeout=10)
except paramiko.AuthenticationException:
    print("refused")
    sys.exit(0)
_, out, _ = c.exec_command("echo upstare-$((6*7))", timeout=10)
print("accepted " + out.read().decode().strip())
"#;

/// What sshd answers the curve-lying client.
fn curve_lie(sshd: &Sshd, key: &Path) -> String {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg("-c")
        .arg(CURVE_LIE)
        .arg(sshd.port.to_string())
        .arg(key)
        .arg(LOGIN);
    let out = run_command(cmd, WAIT).unwrap_or_else(|e| panic!("python3 paramiko: {e}"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "the paramiko client failed (scripts/deps installs python3-paramiko): {}",
        out.stderr
    );
    out.stdout.trim().to_string()
}

/// CVE-2026-35387 (fixed in +deb12u10): with an ECDSA algorithm in
/// `PubkeyAcceptedAlgorithms`, the old sshd takes a key of any other curve
/// announced under that name. With `-r` the listener forks its connections
/// without re-executing, so each login runs the listener's code: before the
/// live update the lying client logs in, after it (the file on disk still
/// the old version) it is refused with the fixed version's own message,
/// while honest logins go on.
#[test]
fn sshd_security_update_brings_the_ecdsa_curve_check_to_new_logins() {
    let (old, new) = builds();
    let sshd = start_with(
        &old.instrumented,
        "PubkeyAcceptedAlgorithms ecdsa-sha2-nistp384,ssh-ed25519\n",
        &["-r"],
    );
    let p256 = sshd.dir.join("id_p256");
    keygen_of(&p256, &["-t", "ecdsa", "-b", "256", "-m", "PEM"]);
    set_mode(&p256, 0o600);
    let keys = sshd.dir.join("authorized_keys");
    let mut authorized = std::fs::read_to_string(&keys).expect("authorized_keys");
    authorized.push_str(&std::fs::read_to_string(p256.with_extension("pub")).expect("p256 key"));
    std::fs::write(&keys, authorized).expect("authorized_keys");

    assert_eq!(sshd.run("echo before-$((6*7))"), "before-42\n");
    assert_eq!(
        curve_lie(&sshd, &p256),
        "accepted upstare-42",
        "the old version takes the P-256 key announced as P-384 (the bug)\nsshd: {}",
        sshd.listener.stderr_so_far()
    );

    let report = update(sshd.pid(), &new.instrumented, WAIT * 2);
    assert_eq!(updated_pids(&report), vec![sshd.pid()], "only the listener");
    assert!(
        runs(sshd.pid(), &new.instrumented),
        "the listener runs the update"
    );

    assert_eq!(
        curve_lie(&sshd, &p256),
        "refused",
        "after the live update\nsshd: {}",
        sshd.listener.stderr_so_far()
    );
    let log = sshd.listener.stderr_so_far();
    assert!(
        log.contains("key type mismatch for decoded key (received ecdsa-sha2-nistp256, expected ecdsa-sha2-nistp384)"),
        "the refusal is not the fixed version's check: {log}"
    );
    assert_eq!(sshd.run("echo after-$((6*7))"), "after-42\n");
    eprintln!(
        "sshd {} -> {} (no re-exec): {:.2} ms reported; the curve check refuses after it",
        OPENSSH.old,
        OPENSSH.new,
        total_ms(&report)
    );
}
