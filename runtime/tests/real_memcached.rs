//! A real server: Debian's memcached 1.6.18 (4 worker threads under
//! libevent, maintenance threads on condition variables), fetched with
//! `apt-get source`, built at -O0 with its own build system, updated live
//! under clients speaking memcached's text protocol on 127.0.0.1:
//! - identity update while idle, and while clients keep a steady load;
//! - Debian's security update (1.6.18-1 → 1.6.18-1+deb12u1) while a client
//!   holds a connection with keys stored: the same connection keeps
//!   working and every key is there.
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
use upstare_corpus::real::{build_real, RealBuild, MEMCACHED};
use upstare_testkit::{spawn, ChildGuard};

const WAIT: Duration = Duration::from_secs(20);

fn builds() -> (RealBuild, RealBuild) {
    let old = build_real(&MEMCACHED.recipe, MEMCACHED.old).unwrap_or_else(|e| panic!("{e}"));
    let new = build_real(&MEMCACHED.recipe, MEMCACHED.new).unwrap_or_else(|e| panic!("{e}"));
    (old, new)
}

/// memcached on 127.0.0.1, 4 worker threads, no UDP, up and answering.
fn start(exe: &Path) -> (ChildGuard, SocketAddr) {
    let port = free_port();
    let port_s = port.to_string();
    let args = [
        "-l",
        "127.0.0.1",
        "-p",
        &port_s,
        "-U",
        "0",
        "-t",
        "4",
        "-u",
        "root",
        "-m",
        "64",
    ];
    let child = spawn(exe, &args).unwrap_or_else(|e| panic!("start memcached: {e}"));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until_serving::<Memcache>(addr, WAIT);
    (child, addr)
}

/// memcached's text protocol.
struct Memcache {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Memcache {
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
}

impl KvClient for Memcache {
    fn connect(addr: SocketAddr) -> std::io::Result<Memcache> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(WAIT))?;
        s.set_nodelay(true)?;
        Ok(Memcache {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    fn set(&mut self, key: &str, value: &str) -> std::io::Result<()> {
        write!(self.writer, "set {key} 0 0 {}\r\n{value}\r\n", value.len())?;
        match self.line()?.as_str() {
            "STORED" => Ok(()),
            other => Err(std::io::Error::other(format!("set {key}: {other}"))),
        }
    }

    fn get(&mut self, key: &str) -> std::io::Result<Option<String>> {
        write!(self.writer, "get {key}\r\n")?;
        let first = self.line()?;
        if first == "END" {
            return Ok(None);
        }
        let value = self.line()?;
        let end = self.line()?;
        if !first.starts_with(&format!("VALUE {key} ")) || end != "END" {
            return Err(std::io::Error::other(format!(
                "unexpected reply to get {key}: {first} / {value} / {end}"
            )));
        }
        Ok(Some(value))
    }
}

#[test]
fn memcached_identity_update_while_idle_keeps_keys_and_connections() {
    let (old, _) = builds();
    let dir = TempDir::new("real-mc-idle");
    let (child, addr) = start(&old.instrumented);
    let mut held = Memcache::connect(addr).expect("connect");
    store_keys(&mut held, 200, "idle");

    let copy = fresh_copy(&old.instrumented, &dir, "identity");
    let report = update(child.pid(), &copy, WAIT * 2);
    assert!(runs(child.pid(), &copy), "the copy is not the running code");

    check_keys(&mut held, 200, "idle", "held connection after the update");
    let mut fresh = Memcache::connect(addr).expect("connect after the update");
    check_keys(&mut fresh, 200, "idle", "new connection after the update");
    store_keys(&mut fresh, 10, "after");
    check_keys(&mut held, 10, "after", "held connection sees new keys");
    eprintln!(
        "memcached idle identity update: {:.2} ms, {} threads",
        total_ms(&report),
        report["threads"].as_array().map_or(0, Vec::len)
    );
}

#[test]
fn memcached_identity_update_under_load_drops_nothing() {
    let (old, _) = builds();
    let dir = TempDir::new("real-mc-load");
    let (child, addr) = start(&old.instrumented);
    let load = Load::start::<Memcache>(addr, 2, WAIT * 2);
    std::thread::sleep(Duration::from_millis(300));
    let copy = fresh_copy(&old.instrumented, &dir, "identity");
    let report = update(child.pid(), &copy, WAIT * 2);
    std::thread::sleep(Duration::from_millis(300));
    let gap = load.finish();
    assert!(runs(child.pid(), &copy), "the copy is not the running code");
    eprintln!(
        "memcached identity update under load: {:.2} ms reported, longest client gap {:.2} ms",
        total_ms(&report),
        gap.as_secs_f64() * 1000.0
    );
}

#[test]
fn memcached_security_update_keeps_a_live_connection_and_its_keys() {
    let (old, new) = builds();
    let (child, addr) = start(&old.instrumented);
    let mut held = Memcache::connect(addr).expect("connect");
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
    let mut fresh = Memcache::connect(addr).expect("connect after the update");
    check_keys(
        &mut fresh,
        500,
        "sec",
        "new connection after the security update",
    );
    store_keys(&mut fresh, 10, "post");
    check_keys(&mut held, 10, "post", "held connection sees new keys");
    eprintln!(
        "memcached {} -> {}: {:.2} ms reported, {} warnings",
        MEMCACHED.old,
        MEMCACHED.new,
        total_ms(&report),
        report["warnings"].as_array().map_or(0, Vec::len)
    );
}
