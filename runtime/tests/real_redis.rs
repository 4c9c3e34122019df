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

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use apply_support::real::{
    check_keys, free_port, runs, store_keys, total_ms, update, wait_until_serving, KvClient, Load,
};
use apply_support::{fresh_copy, TempDir};
use upstare_corpus::real::{build_real, RealBuild, REDIS};
use upstare_testkit::{spawn, ChildGuard};

const WAIT: Duration = Duration::from_secs(20);

fn builds() -> (RealBuild, RealBuild) {
    let old = build_real(&REDIS.recipe, REDIS.old).unwrap_or_else(|e| panic!("{e}"));
    let new = build_real(&REDIS.recipe, REDIS.new).unwrap_or_else(|e| panic!("{e}"));
    (old, new)
}

/// redis on 127.0.0.1, no persistence, up and answering.
fn start(exe: &Path) -> (ChildGuard, SocketAddr) {
    let port = free_port();
    let port_s = port.to_string();
    let args = [
        "--port",
        &port_s,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--protected-mode",
        "no",
    ];
    let child = spawn(exe, &args).unwrap_or_else(|e| panic!("start redis: {e}"));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until_serving::<Redis>(addr, WAIT);
    (child, addr)
}

/// RESP: commands as arrays of bulk strings, replies read by type.
struct Redis {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Redis {
    fn line(&mut self) -> std::io::Result<String> {
        let mut l = String::new();
        if self.reader.read_line(&mut l)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(l.trim_end().to_string())
    }

    fn command(&mut self, args: &[&str]) -> std::io::Result<()> {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.writer.write_all(req.as_bytes())
    }
}

impl KvClient for Redis {
    fn connect(addr: SocketAddr) -> std::io::Result<Redis> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(WAIT))?;
        s.set_nodelay(true)?;
        Ok(Redis {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    fn set(&mut self, key: &str, value: &str) -> std::io::Result<()> {
        self.command(&["SET", key, value])?;
        match self.line()?.as_str() {
            "+OK" => Ok(()),
            other => Err(std::io::Error::other(format!("SET {key}: {other}"))),
        }
    }

    fn get(&mut self, key: &str) -> std::io::Result<Option<String>> {
        self.command(&["GET", key])?;
        let head = self.line()?;
        if head == "$-1" {
            return Ok(None);
        }
        let len: usize = head
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("GET {key}: {head}")))?;
        let value = self.line()?;
        if value.len() != len {
            return Err(std::io::Error::other(format!(
                "GET {key}: {len} bytes announced, got {value}"
            )));
        }
        Ok(Some(value))
    }
}

#[test]
fn redis_identity_update_while_idle_keeps_keys_and_connections() {
    let (old, _) = builds();
    let dir = TempDir::new("real-redis-idle");
    let (child, addr) = start(&old.instrumented);
    let mut held = Redis::connect(addr).expect("connect");
    store_keys(&mut held, 200, "idle");

    let copy = fresh_copy(&old.instrumented, &dir, "identity");
    let report = update(child.pid(), &copy, WAIT * 2);
    assert!(runs(child.pid(), &copy), "the copy is not the running code");

    check_keys(&mut held, 200, "idle", "held connection after the update");
    let mut fresh = Redis::connect(addr).expect("connect after the update");
    check_keys(&mut fresh, 200, "idle", "new connection after the update");
    store_keys(&mut fresh, 10, "after");
    check_keys(&mut held, 10, "after", "held connection sees new keys");
    eprintln!(
        "redis idle identity update: {:.2} ms, {} threads",
        total_ms(&report),
        report["threads"].as_array().map_or(0, Vec::len)
    );
}

#[test]
fn redis_identity_update_under_load_drops_nothing() {
    let (old, _) = builds();
    let dir = TempDir::new("real-redis-load");
    let (child, addr) = start(&old.instrumented);
    let load = Load::start::<Redis>(addr, 2, WAIT * 2);
    std::thread::sleep(Duration::from_millis(300));
    let copy = fresh_copy(&old.instrumented, &dir, "identity");
    let report = update(child.pid(), &copy, WAIT * 2);
    std::thread::sleep(Duration::from_millis(300));
    let gap = load.finish();
    assert!(runs(child.pid(), &copy), "the copy is not the running code");
    eprintln!(
        "redis identity update under load: {:.2} ms reported, longest client gap {:.2} ms",
        total_ms(&report),
        gap.as_secs_f64() * 1000.0
    );
}

#[test]
fn redis_security_update_keeps_a_live_connection_and_its_keys() {
    let (old, new) = builds();
    let (child, addr) = start(&old.instrumented);
    let mut held = Redis::connect(addr).expect("connect");
    store_keys(&mut held, 500, "sec");

    let report = update(child.pid(), &new.instrumented, WAIT * 2);
    assert!(
        runs(child.pid(), &new.instrumented),
        "the security update is not the running code"
    );
    check_keys(
        &mut held,
        500,
        "sec",
        "held connection after the security update",
    );
    let mut fresh = Redis::connect(addr).expect("connect after the update");
    check_keys(
        &mut fresh,
        500,
        "sec",
        "new connection after the security update",
    );
    store_keys(&mut fresh, 10, "post");
    check_keys(&mut held, 10, "post", "held connection sees new keys");
    eprintln!(
        "redis {} -> {}: {:.2} ms reported, {} warnings",
        REDIS.old,
        REDIS.new,
        total_ms(&report),
        report["warnings"].as_array().map_or(0, Vec::len)
    );
}
