//! A real server: Debian's PostgreSQL 15.18 (`postgresql-15`), fetched
//! with `apt-get source`, built at -O0 by its own configure and make, the
//! server instrumented with the rewriter's default flags. `initdb` and the
//! server run as the unprivileged `upstare-pg` (from `scripts/deps`; the
//! server refuses root) in a temporary directory, on 127.0.0.1 and a unix
//! socket there, driven by the build's own `psql`:
//! - identity update of the whole process tree as one (`upstare-apply
//!   --pid POSTMASTER`): the postmaster, its checkpointer, background
//!   writer, WAL writer, autovacuum launcher, logical replication launcher
//!   and a backend whose psql session holds a temporary table, a prepared
//!   statement and a `SET`, while that session runs a query every 2 ms;
//!   then the same session goes on with its state, new sessions work, and
//!   the regression suite (`make installcheck-parallel`) passes against
//!   the updated server, as many tests as against the plain build.
//! - (Debian's security update 15.20-0+deb12u1 is listed by `apt-cache
//!   showsrc` but the mirror answers 404 for its files: not testable here.)
//!
//! It prints the update latency the tool reports, each process's pause and
//! the longest gap the session saw between two replies (figures, not
//! assertions).

mod apply_support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use apply_support::real::{free_port, runs, total_ms, update, updated_pids, Pinger};
use apply_support::{fresh_copy, TempDir};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use upstare_corpus::real::{install_postgres, PgInstall, POSTGRESQL};
use upstare_runtime::target::procfs;
use upstare_testkit::{run_command, ChildGuard};

/// The unprivileged user initdb and the server run as.
const USER: &str = "upstare-pg";
const WAIT: Duration = Duration::from_secs(60);
/// The updater's bound: it plans every process of the tree (19,525
/// functions each; tens of seconds in a debug build on a loaded machine).
const UPDATE_WAIT: Duration = Duration::from_secs(400);
/// The regression suite's bound.
const SUITE_WAIT: Duration = Duration::from_secs(900);

/// The server's background processes, by the titles they set.
const BACKGROUND: [&str; 5] = [
    "checkpointer",
    "background writer",
    "walwriter",
    "autovacuum launcher",
    "logical replication launcher",
];

fn old_install() -> PgInstall {
    let install = install_postgres(POSTGRESQL.old).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "postgres {}: built in {:.0} s, instrumented in {:.1} s (0: cached)",
        POSTGRESQL.old, install.build.build_secs, install.build.rewrite_secs
    );
    install
}

/// The uid and gid of [`USER`].
fn user_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == USER).then(|| (f[2].parse().ok(), f[3].parse().ok()))
        })
        .and_then(|(u, g)| Some((u?, g?)))
        .unwrap_or_else(|| panic!("no user {USER}: run scripts/deps"))
}

/// `path` created, owned by [`USER`], mode `mode`.
fn user_dir(path: &Path, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let (uid, gid) = user_ids();
    std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    path.to_path_buf()
}

/// A command of the installation run as [`USER`].
fn as_user(install: &PgInstall, program: &Path) -> Command {
    let (uid, gid) = user_ids();
    let mut cmd = Command::new(program);
    cmd.uid(uid)
        .gid(gid)
        .env("LD_LIBRARY_PATH", install.lib())
        .env("HOME", "/nonexistent");
    cmd
}

/// A running server: its postmaster (killed on drop by its guard, after a
/// fast shutdown was asked for) and where it listens.
struct Pg {
    dir: TempDir,
    install: PgInstall,
    postmaster: ChildGuard,
    port: u16,
}

impl Drop for Pg {
    fn drop(&mut self) {
        // A fast shutdown ends the children and removes the shared memory.
        let pid = Pid::from_raw(i32::try_from(self.postmaster.pid()).unwrap_or(i32::MAX));
        if kill(pid, Signal::SIGINT).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !procfs::has_ended(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for p in procfs::descendants(pid) {
            let _ = kill(p, Signal::SIGKILL);
        }
    }
}

impl Pg {
    /// initdb into a fresh directory, then `server` (a postgres binary of
    /// `install`) on 127.0.0.1 and a socket in that directory.
    fn start(install: &PgInstall, server: &Path) -> Pg {
        let dir = TempDir::new("real-pg");
        let data = user_dir(&dir.join("data"), 0o700);
        let socket = user_dir(&dir.join("socket"), 0o755);
        let mut initdb = as_user(install, &install.bin("initdb"));
        initdb.arg("-D").arg(&data).args([
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        let out = run_command(initdb, WAIT).unwrap_or_else(|e| panic!("initdb: {e}"));
        assert_eq!(out.status.code(), Some(0), "initdb: {}", out.stderr);
        let port = free_port();
        let mut cmd = as_user(install, server);
        cmd.arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&socket)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-c", "fsync=off"]);
        let postmaster = ChildGuard::spawn(cmd).unwrap_or_else(|e| panic!("start postgres: {e}"));
        let pg = Pg {
            dir,
            install: install.clone(),
            postmaster,
            port,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let ready = run_command(pg.psql(&["-c", "SELECT 6*7"]), WAIT)
                .is_ok_and(|o| o.status.code() == Some(0) && o.stdout.trim() == "42");
            if ready && pg.background().len() == BACKGROUND.len() {
                return pg;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not answer on port {port}: {}",
                pg.postmaster.stderr_so_far()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.postmaster.pid()
    }

    /// The last 40 lines the server logged (to its standard error).
    fn log_tail(&self) -> String {
        let log = self.postmaster.stderr_so_far();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The build's psql connecting over TCP (unaligned, tuples only, no
    /// startup file), with `args`.
    fn psql(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.install.bin("psql"));
        cmd.env("LD_LIBRARY_PATH", self.install.lib())
            .env("PGCONNECT_TIMEOUT", "10")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", USER, "-d", "postgres"])
            .args(args);
        cmd
    }

    /// Runs `sql` in a new session and returns its output.
    fn query(&self, sql: &str) -> String {
        let out =
            run_command(self.psql(&["-c", sql]), WAIT).unwrap_or_else(|e| panic!("psql: {e}"));
        assert_eq!(
            out.status.code(),
            Some(0),
            "psql -c {sql}: {}\nserver: {}",
            out.stderr,
            self.postmaster.stderr_so_far()
        );
        out.stdout.trim_end().to_string()
    }

    /// The postmaster's children: `(pid, title)`.
    fn children(&self) -> Vec<(u32, String)> {
        let pid = self.pid();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .map(|p: u32| {
                let title = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                (
                    p,
                    String::from_utf8_lossy(&title)
                        .trim_end_matches('\0')
                        .to_string(),
                )
            })
            .collect()
    }

    /// The background processes running: `(pid, title)`.
    fn background(&self) -> Vec<(u32, String)> {
        self.children()
            .into_iter()
            .filter(|(_, t)| BACKGROUND.iter().any(|b| t == &format!("postgres: {b} ")))
            .collect()
    }
}

/// A psql session on a pipe: each query's one-line answer is tagged with
/// a sequence number so that it is found in the output.
struct Session {
    psql: ChildGuard,
    sent: u64,
}

impl Session {
    fn open(pg: &Pg) -> Session {
        let psql = ChildGuard::spawn(pg.psql(&[])).unwrap_or_else(|e| panic!("psql: {e}"));
        Session { psql, sent: 0 }
    }

    /// Runs `sql` (a statement list with no output) on this session.
    fn run(&mut self, sql: &str) {
        self.psql
            .send_stdin(format!("{sql}\n").as_bytes())
            .unwrap_or_else(|e| panic!("psql: {e}"));
    }

    /// The value of `expr` evaluated on this session, within `wait`.
    fn value(&mut self, expr: &str, wait: Duration) -> Result<String, String> {
        self.sent += 1;
        let tag = format!("r{}:", self.sent);
        self.psql
            .send_stdin(format!("SELECT '{tag}' || ({expr})::text;\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let line = self
            .psql
            .wait_for_line(&tag, wait, |l| l.starts_with(&tag))
            .map_err(|e| e.to_string())?;
        Ok(line[tag.len()..].to_string())
    }

    /// The state made by [`Session::make_state`] is all there.
    fn check_state(&mut self, what: &str) {
        let mut get = |expr: &str| {
            self.value(expr, WAIT)
                .unwrap_or_else(|e| panic!("{what}: {expr}: {e}"))
        };
        assert_eq!(get("(SELECT count(*) FROM kept)"), "1000", "{what}: rows");
        assert_eq!(get("(SELECT sum(i) FROM kept)"), "500500", "{what}: sum");
        assert_eq!(get("current_setting('work_mem')"), "7777kB", "{what}: SET");
        assert_eq!(
            get("(SELECT count(*) FROM pg_prepared_statements WHERE name = 'square')"),
            "1",
            "{what}: prepared statement"
        );
    }

    /// Runs a statement that fails (division by zero): the backend sends
    /// the error and the session answers on, its state there.
    fn raise_error(&mut self, what: &str) {
        let before = self
            .psql
            .stderr_so_far()
            .matches("division by zero")
            .count();
        self.run("\\set ON_ERROR_STOP 0\nSELECT 1/0;");
        self.check_state(&format!("an error {what}"));
        assert!(
            self.psql
                .stderr_so_far()
                .matches("division by zero")
                .count()
                > before,
            "{what}: no error reported: {}",
            self.psql.stderr_so_far()
        );
    }

    /// A temporary table, a prepared statement and a setting.
    fn make_state(&mut self) {
        self.run(
            "CREATE TEMP TABLE kept AS SELECT g AS i FROM generate_series(1, 1000) g;\n\
             PREPARE square(int) AS SELECT 'sq:' || i * i FROM kept WHERE i = $1;\n\
             SET work_mem = '7777kB';",
        );
        self.check_state("before the update");
        self.run("EXECUTE square(12);");
        self.psql
            .wait_for_line("the prepared statement's answer", WAIT, |l| l == "sq:144")
            .unwrap_or_else(|e| panic!("EXECUTE square(12): {e}"));
    }
}

/// One request of the session's query loop: look row `n % 1000 + 1` of
/// its temporary table up (it is there once).
fn look_up(session: &mut Session, n: u64) -> Result<(), String> {
    let k = n % 1000 + 1;
    match session.value(&format!("(SELECT count(*) FROM kept WHERE i = {k})"), WAIT)? {
        v if v == "1" => Ok(()),
        v => Err(format!("row {k}: {v} rows")),
    }
}

/// `make installcheck-parallel` of the build's tree against the server:
/// `(tests passed, tests run)`, from pg_regress's summary.
fn regression_suite(pg: &Pg, tag: &str) -> (u32, u32) {
    let out_dir = user_dir(&pg.dir.join(format!("regress-{tag}")), 0o777);
    // The server writes files there itself (COPY TO, lo_export).
    user_dir(&out_dir.join("results"), 0o777);
    let tree = &pg.install.build.tree;
    let mut cmd = Command::new("make");
    cmd.arg("-C")
        .arg(tree.join("src/test/regress"))
        .arg("installcheck-parallel")
        .arg(format!(
            "bindir={}",
            pg.install.prefix.join("bin").display()
        ))
        .arg(format!(
            "EXTRA_REGRESS_OPTS=--outputdir={}",
            out_dir.display()
        ))
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port.to_string())
        .env("PGUSER", USER)
        .env("LD_LIBRARY_PATH", pg.install.lib());
    let started = Instant::now();
    let out = run_command(cmd, SUITE_WAIT).unwrap_or_else(|e| panic!("installcheck: {e}"));
    let text = format!("{}{}", out.stdout, out.stderr);
    let summary = text
        .lines()
        .find_map(|l| {
            // " All 217 tests passed. " or " 3 of 217 tests failed[, 1 of
            // these failures ignored]. "
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["All", n, "tests", passed, ..] if passed.starts_with("passed") => {
                    let n: u32 = n.parse().ok()?;
                    Some((n, n))
                }
                [failed, "of", run, "tests", f, ..] if f.starts_with("failed") => {
                    let run: u32 = run.parse().ok()?;
                    Some((run.checked_sub(failed.parse().ok()?)?, run))
                }
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("installcheck-parallel printed no summary:\n{text}"));
    eprintln!(
        "postgres regression suite ({tag}): {} of {} passed in {:.0} s",
        summary.0,
        summary.1,
        started.elapsed().as_secs_f64()
    );
    summary
}

// In 1 of 9 runs of 2026-11-30 the held session's backend crashed later
// in the suite, after a reported success. Any error in a live-updated
// backend crashed it then (PostgresMain's sigsetjmp buffer kept the old
// code's return address mangled); the session now raises errors after the
// update and after the suite.
#[test]
fn postgres_identity_update_of_the_whole_tree_keeps_a_session_and_passes_the_regression_suite() {
    let install = old_install();
    let pg = Pg::start(&install, &install.server);
    let mut session = Session::open(&pg);
    session.make_state();
    let backend = pg
        .children()
        .into_iter()
        .find(|(_, t)| t.starts_with(&format!("postgres: {USER} postgres 127.0.0.1")))
        .unwrap_or_else(|| panic!("no backend among {:?}", pg.children()));
    let mut want: Vec<u32> = pg.background().iter().map(|(p, _)| *p).collect();
    want.push(backend.0);
    want.push(pg.pid());
    want.sort_unstable();

    let pinger = Pinger::start(session, UPDATE_WAIT + WAIT, look_up);
    std::thread::sleep(Duration::from_millis(300));
    let copy = fresh_copy(&install.server, &pg.dir, "identity");
    let report = update(pg.pid(), &copy, UPDATE_WAIT);
    std::thread::sleep(Duration::from_millis(300));
    let (mut session, gap) = pinger.finish();

    let pids = updated_pids(&report);
    for p in &want {
        assert!(pids.contains(p), "process {p} not updated: {pids:?}");
        assert!(
            runs(*p, &copy),
            "process {p} does not run {}",
            copy.display()
        );
    }
    session.check_state("the same session after the update");
    session.run("EXECUTE square(42);");
    session
        .psql
        .wait_for_line("the prepared statement's answer", WAIT, |l| l == "sq:1764")
        .unwrap_or_else(|e| panic!("EXECUTE square(42) after the update: {e}"));
    // An error unwinds to PostgresMain's sigsetjmp of before the update
    // (the jmp_buf keeps its return address mangled): the session gets the
    // error and goes on.
    session.raise_error("after the update");
    assert_eq!(
        pg.query("SELECT 6*7"),
        "42",
        "a new session after the update"
    );
    for p in report["processes"].as_array().into_iter().flatten() {
        eprintln!(
            "  pid {}: pause {:.1} ms",
            p["pid"],
            p["timings"]["pause_us"].as_f64().unwrap_or(f64::NAN) / 1000.0
        );
    }
    eprintln!(
        "postgres identity update ({} processes): {:.2} ms reported, longest session gap {:.2} ms",
        pids.len(),
        total_ms(&report),
        gap.as_secs_f64() * 1000.0
    );

    let updated = regression_suite(&pg, "updated");
    let log = pg.log_tail();
    // The held session lived through the suite with its state.
    session.check_state("the same session after the regression suite");
    session.raise_error("after the regression suite");
    drop(session);
    drop(pg);
    let plain = Pg::start(&install, &install.bin("postgres"));
    let baseline = regression_suite(&plain, "plain");
    assert_eq!(
        updated, baseline,
        "regression suite: updated vs plain build; the updated server's log ends:\n{log}"
    );
    assert_eq!(
        updated.0,
        updated.1,
        "every regression test passes; the plain server's log ends:\n{}",
        plain.log_tail()
    );
}
