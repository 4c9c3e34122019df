//! nginx for the real-server tests and benchmarks: a master and 2
//! workers on 127.0.0.1, and an HTTP/1.1 keep-alive client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::real::free_port;
use super::super::TempDir;
use upstare_testkit::{spawn, ChildGuard};

/// How long nginx and the updater are waited for.
pub const WAIT: Duration = Duration::from_secs(20);
/// What nginx serves at `/`.
pub const BODY: &str = "upstare says hello\n";
/// The master (killed on drop by its guard) and its workers, killed by pid
/// first: a worker outlives a killed master and would keep the port.
pub struct Nginx {
    pub master: ChildGuard,
    pub workers: Vec<u32>,
}

impl Nginx {
    pub fn pid(&self) -> u32 {
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
pub fn start(exe: &Path, dir: &TempDir) -> (Nginx, SocketAddr) {
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
pub fn workers(master: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// An HTTP/1.1 keep-alive connection.
pub struct Http {
    pub writer: TcpStream,
    pub reader: BufReader<TcpStream>,
}

impl Http {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Http> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(WAIT))?;
        s.set_nodelay(true)?;
        Ok(Http {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// `GET /` on this connection: an error unless 200 with `BODY`.
    pub fn get(&mut self) -> std::io::Result<()> {
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

/// Clients each on its own keep-alive connection, sending `GET /` in a
/// loop and checking every reply, timing the longest gap between two.
pub struct HttpLoad {
    stop: Arc<AtomicBool>,
    clients: Vec<std::thread::JoinHandle<Result<(u64, Duration), String>>>,
}

impl HttpLoad {
    /// Starts `clients` clients on `addr` (each stops by itself after
    /// `limit`).
    pub fn start(addr: SocketAddr, clients: usize, limit: Duration) -> HttpLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || -> Result<(u64, Duration), String> {
                    let mut c = Http::connect(addr).map_err(|e| e.to_string())?;
                    let (mut n, mut worst) = (0u64, Duration::ZERO);
                    let mut last = Instant::now();
                    let deadline = last + limit;
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
        HttpLoad { stop, clients }
    }

    /// Stops the clients; panics if one saw an error or made no request.
    /// Returns the longest gap any client saw.
    pub fn finish(self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        let mut gap = Duration::ZERO;
        for c in self.clients {
            let (n, w) = c
                .join()
                .expect("client thread")
                .unwrap_or_else(|e| panic!("a client saw an error: {e}"));
            assert!(n > 0, "a client made no request");
            gap = gap.max(w);
        }
        gap
    }
}
