//! A real server: Debian's OpenSSH 9.2p1 sshd (privilege separation as user
//! `sshd` chrooted to `/run/sshd`, the seccomp-sandboxed pre-authentication
//! child, a re-exec of itself for every connection), fetched with `apt-get
//! source`, built at -O0 by its own configure, on 127.0.0.1 with its own
//! host key and a key made by ssh-keygen at test time, driven by the real
//! `ssh` client logging in as the unprivileged `upstare-ssh` (both users
//! come from `scripts/deps`):
//! - identity update of the idle listener, then a new login runs a command;
//! - Debian's security update (1:9.2p1-2+deb12u7 → +deb12u10) while an
//!   interactive session is open: installed over the file sshd runs (as a
//!   package upgrade does, so that the listener's re-exec for new
//!   connections starts the update too), then the listener, the session's
//!   privileged monitor and its unprivileged child are updated as one; the
//!   same session still echoes what it is sent, and a new login runs the
//!   new version;
//! - an update while a connection is before authentication is refused,
//!   naming the sandboxed child, and changes nothing; once that connection
//!   is gone the update goes through.
//!
//! Each prints the update latency the tool reports and the longest gap the
//! session's client saw between echoes (figures, not assertions).

mod apply_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apply_support::real::{free_port, runs, total_ms, update, update_refused};
use apply_support::{fresh_copy, TempDir};
use nix::unistd::Pid;
use upstare_corpus::real::{build_real, RealBuild, OPENSSH};
use upstare_runtime::target::procfs;
use upstare_testkit::{run_command, spawn, ChildGuard};

/// The processes descended from `pid`, parents first.
fn descendants(pid: u32) -> Vec<u32> {
    let pid = i32::try_from(pid).expect("pid");
    procfs::descendants(Pid::from_raw(pid))
        .into_iter()
        .filter_map(|p| u32::try_from(p.as_raw()).ok())
        .collect()
}

fn has_ended(pid: u32) -> bool {
    procfs::has_ended(Pid::from_raw(i32::try_from(pid).expect("pid")))
}

const WAIT: Duration = Duration::from_secs(30);
/// The unprivileged user the client logs in as (made by `scripts/deps`).
const LOGIN: &str = "upstare-ssh";

fn builds() -> (RealBuild, RealBuild) {
    let old = build_real(&OPENSSH.recipe, OPENSSH.old).unwrap_or_else(|e| panic!("{e}"));
    let new = build_real(&OPENSSH.recipe, OPENSSH.new).unwrap_or_else(|e| panic!("{e}"));
    (old, new)
}

/// The users `scripts/deps` makes, and sshd's privilege separation
/// directory as Debian's service makes it at start (`RuntimeDirectory`).
fn prepare_system() {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    for user in ["sshd", LOGIN] {
        assert!(
            passwd.lines().any(|l| l.starts_with(&format!("{user}:"))),
            "no user {user}: run scripts/deps"
        );
    }
    let run = Path::new("/run/sshd");
    if !run.is_dir() {
        std::fs::create_dir_all(run).expect("mkdir /run/sshd");
    }
    set_mode(run, 0o755);
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn keygen(path: &Path) {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path);
    let out = run_command(cmd, WAIT).unwrap_or_else(|e| panic!("ssh-keygen: {e}"));
    assert_eq!(out.status.code(), Some(0), "ssh-keygen: {}", out.stderr);
}

/// The real client on 127.0.0.1:`port`, logging in as [`LOGIN`] with the
/// key `key`, running `remote`.
fn ssh_command(port: u16, key: &Path, remote: &str) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.args(["-F", "/dev/null", "-p", &port.to_string(), "-i"])
        .arg(key)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            &format!("{LOGIN}@127.0.0.1"),
            remote,
        ]);
    cmd
}

/// A listening sshd started from its own copy of the program (`exe`, the
/// path it re-executes for every connection).
struct Sshd {
    dir: TempDir,
    exe: PathBuf,
    listener: ChildGuard,
    port: u16,
}

impl Sshd {
    fn pid(&self) -> u32 {
        self.listener.pid()
    }

    /// The real client, logging in with the test key, running `remote`.
    fn client(&self, remote: &str) -> Command {
        ssh_command(self.port, &self.dir.join("id"), remote)
    }

    /// Runs `remote` over a new login and returns its standard output.
    fn run(&self, remote: &str) -> String {
        let out = run_command(self.client(remote), WAIT).unwrap_or_else(|e| panic!("ssh: {e}"));
        assert_eq!(
            out.status.code(),
            Some(0),
            "ssh {remote}: {}\nsshd: {}",
            out.stderr,
            self.listener.stderr_so_far()
        );
        out.stdout
    }

    /// The processes of this sshd that run the file at `exe`'s path now
    /// (descendants of the listener: each connection's monitor and child).
    fn sessions(&self) -> Vec<u32> {
        descendants(self.pid())
            .into_iter()
            .filter(|&p| runs(p, &self.exe))
            .collect()
    }
}

/// sshd from a copy of `build` on 127.0.0.1, in the foreground, logging
/// to stderr, with its own configuration and host key.
fn start(build: &Path) -> Sshd {
    prepare_system();
    let dir = TempDir::new("real-sshd");
    // The monitor reads authorized_keys as the user logging in.
    set_mode(dir.path(), 0o755);
    let exe = dir.join("sshd");
    std::fs::copy(build, &exe).expect("copy sshd");
    keygen(&dir.join("host_key"));
    keygen(&dir.join("id"));
    let keys = dir.join("authorized_keys");
    std::fs::copy(dir.join("id.pub"), &keys).expect("authorized_keys");
    set_mode(&keys, 0o644);
    let port = free_port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile none\n\
         AuthorizedKeysFile {}\nStrictModes no\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nAllowUsers {LOGIN}\n\
         LogLevel VERBOSE\n",
        dir.join("host_key").display(),
        keys.display()
    );
    let config_path = dir.join("sshd_config");
    std::fs::write(&config_path, config).expect("sshd_config");
    let config_arg = config_path.to_string_lossy().into_owned();
    let listener =
        spawn(&exe, &["-D", "-e", "-f", &config_arg]).unwrap_or_else(|e| panic!("start sshd: {e}"));
    let deadline = Instant::now() + WAIT;
    while !listener.stderr_so_far().contains("Server listening on") {
        assert!(
            Instant::now() < deadline,
            "sshd did not listen: {}",
            listener.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Sshd {
        dir,
        exe,
        listener,
        port,
    }
}

/// An interactive session running `cat`: every line sent comes back.
struct Session {
    client: ChildGuard,
    sent: u64,
}

impl Session {
    fn open(sshd: &Sshd) -> Session {
        let client = ChildGuard::spawn(sshd.client("cat")).unwrap_or_else(|e| panic!("ssh: {e}"));
        let mut s = Session { client, sent: 0 };
        s.echo().unwrap_or_else(|e| panic!("first echo: {e}"));
        s
    }

    /// Sends a fresh line and waits for it to come back.
    fn echo(&mut self) -> Result<(), String> {
        self.sent += 1;
        let line = format!("upstare echo {}", self.sent);
        self.client
            .send_stdin(format!("{line}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        self.client
            .wait_for_line(&line, WAIT, |l| l == line)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// What the echo loop ends with: the session back, and the longest gap
/// and how many echoes came back (or the first error).
type Echoed = (Session, Result<(Duration, u64), String>);

/// The session echoing lines in a loop until stopped: the longest gap
/// between two echoes, and how many came back.
struct Pinger {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Echoed>,
}

impl Pinger {
    fn start(mut session: Session) -> Pinger {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let (mut worst, mut n) = (Duration::ZERO, 0u64);
            let mut last = Instant::now();
            let deadline = last + WAIT * 2;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Err(e) = session.echo() {
                    return (session, Err(e));
                }
                worst = worst.max(last.elapsed());
                last = Instant::now();
                n += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (session, Ok((worst, n)))
        });
        Pinger { stop, thread }
    }

    fn finish(self) -> (Session, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let (session, r) = self.thread.join().expect("pinger thread");
        let (worst, n) = r.unwrap_or_else(|e| panic!("the session stopped echoing: {e}"));
        assert!(n > 0, "the session echoed nothing while it was watched");
        (session, worst)
    }
}

/// A client logging in again and again, one login at a time, each running
/// a command whose output it checks, until stopped (bounded in time).
struct Logins {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<u64, String>>,
}

impl Logins {
    fn start(sshd: &Sshd) -> Logins {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let (port, key) = (sshd.port, sshd.dir.join("id"));
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + WAIT * 4;
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                let remote = format!("echo login-{n}-$((6*7))");
                let out = run_command(ssh_command(port, &key, &remote), WAIT)
                    .map_err(|e| format!("login {n}: {e}"))?;
                if out.status.code() != Some(0) || out.stdout != format!("login-{n}-42\n") {
                    return Err(format!(
                        "login {n}: exit {:?}, printed {:?}, said {}",
                        out.status.code(),
                        out.stdout,
                        out.stderr
                    ));
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(n)
        });
        Logins { stop, thread }
    }

    /// Stops the loop: how many logins went through (panics on the first
    /// that failed).
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .expect("login thread")
            .unwrap_or_else(|e| panic!("a login failed: {e}"))
    }
}

/// The pids of the processes an update report lists.
fn updated_pids(report: &serde_json::Value) -> Vec<u32> {
    let mut pids: Vec<u32> = report["processes"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["pid"].as_u64())
                .filter_map(|p| u32::try_from(p).ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids
}

/// `cp NEW FILE.tmp && mv FILE.tmp FILE`: a package upgrade's way of
/// replacing a program that runs (the running processes keep the old inode).
fn install_over(new: &Path, file: &Path) {
    let tmp = file.with_extension("dpkg-new");
    std::fs::copy(new, &tmp).expect("copy the new version");
    std::fs::rename(&tmp, file).expect("install the new version");
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
