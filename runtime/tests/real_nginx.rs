//! A real server: Debian's nginx 1.22.1 (a master and 2 workers, with the
//! modules Debian enables, http_v2 included), fetched with `apt-get
//! source`, built at -O0 by its own configure, updated live as one
//! application (`upstare-apply --pid MASTER` updates the workers with it)
//! under HTTP/1.1 keep-alive clients on 127.0.0.1:
//! - identity update while idle, and while clients keep a steady load;
//! - (Debian's security update 1.22.1-9+deb12u9 → +deb12u11 cannot be
//!   fetched here: the mirror answers 404 for its files.)
//!
//! Each prints the update latency the tool reports and the longest gap a
//! client saw between replies (figures, not assertions).

mod apply_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apply_support::real::{free_port, runs, total_ms, update};
use apply_support::{fresh_copy, TempDir};
use upstare_corpus::real::{build_real, build_real_inline, RealBuild, NGINX};
use upstare_testkit::{spawn, ChildGuard};

const WAIT: Duration = Duration::from_secs(20);
const BODY: &str = "upstare says hello\n";

/// The running version. Its security update (1.22.1-9+deb12u10/u11) is
/// listed by `apt-cache showsrc` but the mirror answers 404 for its files,
/// so only identity updates are tested here.
fn old_build() -> RealBuild {
    build_real(&NGINX.recipe, NGINX.old).unwrap_or_else(|e| panic!("{e}"))
}

/// The master (killed on drop by its guard) and its workers, killed by pid
/// first: a worker outlives a killed master and would keep the port.
struct Nginx {
    master: ChildGuard,
    workers: Vec<u32>,
}

impl Nginx {
    fn pid(&self) -> u32 {
        self.master.pid()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        for &w in &self.workers {
            if let Ok(pid) = i32::try_from(w) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// nginx's master with 2 workers on 127.0.0.1, serving `BODY` at `/`.
fn start(exe: &Path, dir: &TempDir) -> (Nginx, SocketAddr) {
    let port = free_port();
    for sub in ["logs", "html"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
    }
    std::fs::write(dir.join("html/index.html"), BODY).expect("index.html");
    let conf = format!(
        "worker_processes 2;\ndaemon off;\nmaster_process on;\nerror_log logs/error.log;\n\
         pid logs/nginx.pid;\nevents {{ worker_connections 64; }}\n\
         http {{ access_log off; keepalive_timeout 60; keepalive_requests 1000000000;\n\
         server {{ listen 127.0.0.1:{port}; location / {{ root html; }} }} }}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).expect("nginx.conf");
    let prefix = dir.path().to_string_lossy().into_owned();
    let child = spawn(exe, &["-p", &prefix, "-c", "nginx.conf"])
        .unwrap_or_else(|e| panic!("start nginx: {e}"));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + WAIT;
    loop {
        let pids = workers(child.pid());
        if pids.len() == 2 && Http::connect(addr).and_then(|mut c| c.get()).is_ok() {
            let nginx = Nginx {
                master: child,
                workers: pids,
            };
            return (nginx, addr);
        }
        assert!(Instant::now() < deadline, "nginx did not answer on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The master's children (its workers).
fn workers(master: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// An HTTP/1.1 keep-alive connection.
struct Http {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Http {
    fn connect(addr: SocketAddr) -> std::io::Result<Http> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(WAIT))?;
        s.set_nodelay(true)?;
        Ok(Http {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// `GET /` on this connection: an error unless 200 with `BODY`.
    fn get(&mut self) -> std::io::Result<()> {
        self.writer
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
        let mut status = String::new();
        if self.reader.read_line(&mut status)? == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        let mut length = None;
        loop {
            let mut h = String::new();
            if self.reader.read_line(&mut h)? == 0 {
                return Err(std::io::Error::other("connection closed in the headers"));
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse::<usize>().ok();
            }
        }
        let len = length.ok_or_else(|| std::io::Error::other("no Content-Length"))?;
        let mut body = vec![0u8; len.min(1 << 20)];
        self.reader.read_exact(&mut body)?;
        if !status.starts_with("HTTP/1.1 200") || body != BODY.as_bytes() {
            return Err(std::io::Error::other(format!(
                "unexpected reply: {} / {}",
                status.trim_end(),
                String::from_utf8_lossy(&body)
            )));
        }
        Ok(())
    }
}

/// Every process of the tree the report lists runs `exe`, and the report
/// lists the master and both workers.
fn whole_tree_runs(report: &serde_json::Value, master: u32, exe: &Path) {
    let mut pids: Vec<u64> = report["processes"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["pid"].as_u64()).collect())
        .unwrap_or_default();
    pids.sort_unstable();
    let mut want: Vec<u64> = std::iter::once(master)
        .chain(workers(master))
        .map(u64::from)
        .collect();
    want.sort_unstable();
    assert_eq!(
        pids, want,
        "the update did not cover the master and its workers"
    );
    for p in want {
        assert!(
            runs(p as u32, exe),
            "process {p} does not run {}",
            exe.display()
        );
    }
}

#[test]
fn nginx_identity_update_of_master_and_workers_while_idle() {
    let old = old_build();
    let dir = TempDir::new("real-nginx-idle");
    let (child, addr) = start(&old.instrumented, &dir);
    let mut held = Http::connect(addr).expect("connect");
    held.get().expect("first request");

    let copy = fresh_copy(&old.instrumented, &dir, "identity");
    let report = update(child.pid(), &copy, WAIT * 2);
    whole_tree_runs(&report, child.pid(), &copy);
    for i in 0..20 {
        held.get()
            .unwrap_or_else(|e| panic!("held connection, request {i} after the update: {e}"));
    }
    Http::connect(addr)
        .and_then(|mut c| c.get())
        .expect("a new connection after the update");
    eprintln!(
        "nginx idle identity update (master + 2 workers): {:.2} ms",
        total_ms(&report)
    );
}

#[test]
fn nginx_identity_update_under_load_drops_nothing() {
    identity_update_under_load(&old_build().instrumented, "nginx");
}

#[test]
fn nginx_with_inline_points_identity_update_under_load_drops_nothing() {
    let inline = build_real_inline(&NGINX.recipe, NGINX.old).unwrap_or_else(|e| panic!("{e}"));
    apply_support::real::assert_inline_points(&inline.instrumented);
    identity_update_under_load(&inline.instrumented, "nginx (inline points)");
}

/// Identity update of the master and its workers while 2 keep-alive
/// clients send requests: no client sees an error.
fn identity_update_under_load(exe: &Path, name: &str) {
    let dir = TempDir::new("real-nginx-load");
    let (child, addr) = start(exe, &dir);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || -> Result<(u64, Duration), String> {
                let mut c = Http::connect(addr).map_err(|e| e.to_string())?;
                let (mut n, mut worst) = (0u64, Duration::ZERO);
                let mut last = Instant::now();
                let deadline = last + WAIT * 2;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    c.get().map_err(|e| format!("request {n}: {e}"))?;
                    worst = worst.max(last.elapsed());
                    last = Instant::now();
                    n += 1;
                }
                Ok((n, worst))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let copy = fresh_copy(exe, &dir, "identity");
    let report = update(child.pid(), &copy, WAIT * 2);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let mut gap = Duration::ZERO;
    for c in clients {
        let (n, w) = c
            .join()
            .expect("client thread")
            .unwrap_or_else(|e| panic!("a client saw an error: {e}"));
        assert!(n > 0, "a client made no request");
        gap = gap.max(w);
    }
    whole_tree_runs(&report, child.pid(), &copy);
    eprintln!(
        "{name} identity update under load: {:.2} ms reported, longest client gap {:.2} ms",
        total_ms(&report),
        gap.as_secs_f64() * 1000.0
    );
}
