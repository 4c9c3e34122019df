//! sshd for the real-server tests and benchmarks: started on 127.0.0.1
//! from its own copy of the program, with its own configuration and keys,
//! driven by the real `ssh` client.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::real::{free_port, runs};
use super::super::TempDir;
use nix::unistd::Pid;
use upstare_runtime::target::procfs;
use upstare_testkit::{run_command, spawn, ChildGuard};

/// The processes descended from `pid`, parents first.
pub fn descendants(pid: u32) -> Vec<u32> {
    let pid = i32::try_from(pid).expect("pid");
    procfs::descendants(Pid::from_raw(pid))
        .into_iter()
        .filter_map(|p| u32::try_from(p.as_raw()).ok())
        .collect()
}

/// Whether process `pid` has ended.
pub fn has_ended(pid: u32) -> bool {
    procfs::has_ended(Pid::from_raw(i32::try_from(pid).expect("pid")))
}

/// How long sshd, the client and the updater are waited for.
pub const WAIT: Duration = Duration::from_secs(30);
/// The unprivileged user the client logs in as (made by `scripts/deps`).
pub const LOGIN: &str = "upstare-ssh";

/// The users `scripts/deps` makes, and sshd's privilege separation
/// directory as Debian's service makes it at start (`RuntimeDirectory`).
pub fn prepare_system() {
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

/// `chmod MODE PATH`.
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// A new ed25519 key without passphrase at `path` (and `path.pub`).
pub fn keygen(path: &Path) {
    keygen_of(path, &["-t", "ed25519"]);
}

/// ssh-keygen with `kind` (type and size options), no passphrase.
pub fn keygen_of(path: &Path, kind: &[&str]) {
    let mut cmd = Command::new("ssh-keygen");
    cmd.arg("-q").args(kind).args(["-N", "", "-f"]).arg(path);
    let out = run_command(cmd, WAIT).unwrap_or_else(|e| panic!("ssh-keygen: {e}"));
    assert_eq!(out.status.code(), Some(0), "ssh-keygen: {}", out.stderr);
}

/// The real client on 127.0.0.1:`port`, logging in as [`LOGIN`] with the
/// key `key`, running `remote`.
pub fn ssh_command(port: u16, key: &Path, remote: &str) -> Command {
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
pub struct Sshd {
    pub dir: TempDir,
    pub exe: PathBuf,
    pub listener: ChildGuard,
    pub port: u16,
}

impl Sshd {
    pub fn pid(&self) -> u32 {
        self.listener.pid()
    }

    /// The real client, logging in with the test key, running `remote`.
    pub fn client(&self, remote: &str) -> Command {
        ssh_command(self.port, &self.dir.join("id"), remote)
    }

    /// Runs `remote` over a new login and returns its standard output.
    pub fn run(&self, remote: &str) -> String {
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
    pub fn sessions(&self) -> Vec<u32> {
        descendants(self.pid())
            .into_iter()
            .filter(|&p| runs(p, &self.exe))
            .collect()
    }
}

/// sshd from a copy of `build` on 127.0.0.1, in the foreground, logging
/// to stderr, with its own configuration and host key.
pub fn start(build: &Path) -> Sshd {
    start_with(build, "", &[])
}

/// `start` with lines added to sshd_config and arguments added to sshd's.
pub fn start_with(build: &Path, more_config: &str, more_args: &[&str]) -> Sshd {
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
         LogLevel VERBOSE\n{more_config}",
        dir.join("host_key").display(),
        keys.display()
    );
    let config_path = dir.join("sshd_config");
    std::fs::write(&config_path, config).expect("sshd_config");
    let config_arg = config_path.to_string_lossy().into_owned();
    let mut args = vec!["-D", "-e", "-f", &config_arg];
    args.extend_from_slice(more_args);
    let listener = spawn(&exe, &args).unwrap_or_else(|e| panic!("start sshd: {e}"));
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
pub struct Session {
    pub client: ChildGuard,
    pub sent: u64,
}

impl Session {
    pub fn open(sshd: &Sshd) -> Session {
        let client = ChildGuard::spawn(sshd.client("cat")).unwrap_or_else(|e| panic!("ssh: {e}"));
        let mut s = Session { client, sent: 0 };
        s.echo().unwrap_or_else(|e| panic!("first echo: {e}"));
        s
    }

    /// Sends a fresh line and waits for it to come back.
    pub fn echo(&mut self) -> Result<(), String> {
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
pub type Echoed = (Session, Result<(Duration, u64), String>);

/// The session echoing lines in a loop until stopped: the longest gap
/// between two echoes, and how many came back.
pub struct Pinger {
    pub stop: Arc<AtomicBool>,
    pub thread: std::thread::JoinHandle<Echoed>,
}

impl Pinger {
    pub fn start(mut session: Session) -> Pinger {
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

    pub fn finish(self) -> (Session, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let (session, r) = self.thread.join().expect("pinger thread");
        let (worst, n) = r.unwrap_or_else(|e| panic!("the session stopped echoing: {e}"));
        assert!(n > 0, "the session echoed nothing while it was watched");
        (session, worst)
    }
}

/// A client logging in again and again, one login at a time, each running
/// a command whose output it checks, until stopped (bounded in time).
pub struct Logins {
    pub stop: Arc<AtomicBool>,
    pub thread: std::thread::JoinHandle<Result<u64, String>>,
}

impl Logins {
    pub fn start(sshd: &Sshd) -> Logins {
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
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .expect("login thread")
            .unwrap_or_else(|e| panic!("a login failed: {e}"))
    }
}

/// `cp NEW FILE.tmp && mv FILE.tmp FILE`: a package upgrade's way of
/// replacing a program that runs (the running processes keep the old inode).
pub fn install_over(new: &Path, file: &Path) {
    let tmp = file.with_extension("dpkg-new");
    std::fs::copy(new, &tmp).expect("copy the new version");
    std::fs::rename(&tmp, file).expect("install the new version");
}
