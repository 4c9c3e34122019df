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
    free_port, kv_identity_idle, kv_identity_under_load, kv_update_keeps_connection,
    wait_until_serving, KvClient,
};
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
