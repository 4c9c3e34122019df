//! A real server: Debian's memcached 1.6.18 (4 worker threads under
//! libevent, maintenance threads on condition variables), fetched with
//! `apt-get source`, built at -O0 with its own build system, updated live
//! under clients speaking memcached's text protocol on 127.0.0.1:
//! - identity update while idle, and while clients keep a steady load;
//! - Debian's security update (1.6.18-1 → 1.6.18-1+deb12u1) while a client
//!   holds a connection with keys stored: the same connection keeps
//!   working and every key is there.
//!
//! - the fix is there after the live update: memcached in proxy mode (the
//!   code Debian's update patches) answers a get whose key comes after more
//!   than 20 spaces as the fixed version does (CVE-2023-46852), on a
//!   connection held across the update, where the old version routed it.
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
use upstare_corpus::real::{build_real, build_real_inline, RealBuild, MEMCACHED};
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

/// memcached in proxy mode, its lua config (in `dir`) routing gets to the
/// memcached at `backend`; up and answering.
fn start_proxy(
    exe: &Path,
    backend: SocketAddr,
    dir: &apply_support::TempDir,
) -> (ChildGuard, SocketAddr) {
    let config = dir.path().join("proxy.lua");
    std::fs::write(
        &config,
        format!(
            "function mcp_config_pools(old)\n\
             \x20   return mcp.pool({{ mcp.backend(\"b1\", \"127.0.0.1\", {}) }})\n\
             end\n\
             function mcp_config_routes(pool)\n\
             \x20   mcp.attach(mcp.CMD_GET, function(r) return pool(r) end)\n\
             end\n",
            backend.port()
        ),
    )
    .expect("proxy config");
    let port = free_port();
    let port_s = port.to_string();
    let proxy_config = format!("proxy_config={}", config.display());
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
        "-o",
        &proxy_config,
    ];
    let child = spawn(exe, &args).unwrap_or_else(|e| panic!("start memcached proxy: {e}"));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until_serving::<Memcache>(addr, WAIT);
    (child, addr)
}

impl Memcache {
    /// Sends `request` and returns the reply's lines up to `END`.
    fn until_end(&mut self, request: &str) -> Vec<String> {
        write!(self.writer, "{request}\r\n").expect("send");
        let mut lines = Vec::new();
        for _ in 0..16 {
            let l = self.line().expect("reply line");
            let end = l == "END";
            lines.push(l);
            if end {
                return lines;
            }
        }
        panic!("no END after {lines:?}");
    }
}

#[test]
fn memcached_security_update_brings_the_proxy_prefix_check() {
    let (old, new) = builds();
    let dir = apply_support::TempDir::new("real-memcached-proxy");
    let (_backend, backend_addr) = start(&old.instrumented);
    let mut b = Memcache::connect(backend_addr).expect("connect backend");
    b.set("k1", "v1").expect("set k1");
    b.set("k2", "v2").expect("set k2");
    let (proxy, proxy_addr) = start_proxy(&old.instrumented, backend_addr, &dir);
    let mut held = Memcache::connect(proxy_addr).expect("connect proxy");
    let spaced = format!("get{}k1 k2", " ".repeat(40));
    let values = ["VALUE k1 0 2", "v1", "VALUE k2 0 2", "v2", "END"];
    assert_eq!(held.until_end(&spaced), values, "the old version routes it");
    let report =
        apply_support::real::update(proxy.pid(), &new.instrumented, Duration::from_secs(40));
    let refused = [
        "SERVER_ERROR malformed request",
        "SERVER_ERROR malformed request",
        "END",
    ];
    assert_eq!(held.until_end(&spaced), refused, "the updated process");
    assert_eq!(
        held.until_end("get k1 k2"),
        values,
        "a well-formed get still routed"
    );
    // What a fresh start of the fixed version answers, for comparison.
    let (_fixed, fixed_addr) = start_proxy(&new.instrumented, backend_addr, &dir);
    let mut c = Memcache::connect(fixed_addr).expect("connect fixed proxy");
    assert_eq!(
        c.until_end(&spaced),
        refused,
        "the fixed version's own answer"
    );
    eprintln!(
        "memcached proxy security update: {:.2} ms reported",
        apply_support::real::total_ms(&report)
    );
}

/// Both versions instrumented with `--inline-points` (one flag byte arms
/// the process; detours to trampolines instead of `int3` writes).
fn inline_builds() -> (RealBuild, RealBuild) {
    let old = build_real_inline(&MEMCACHED.recipe, MEMCACHED.old).unwrap_or_else(|e| panic!("{e}"));
    let new = build_real_inline(&MEMCACHED.recipe, MEMCACHED.new).unwrap_or_else(|e| panic!("{e}"));
    for b in [&old, &new] {
        apply_support::real::assert_inline_points(&b.instrumented);
    }
    (old, new)
}

#[test]
fn memcached_with_inline_points_identity_update_under_load_drops_nothing() {
    let (old, _) = inline_builds();
    kv_identity_under_load::<Memcache>("memcached (inline points)", &old.instrumented, &start);
}

#[test]
fn memcached_with_inline_points_security_update_keeps_a_live_connection_and_its_keys() {
    let (old, new) = inline_builds();
    kv_update_keeps_connection::<Memcache>(
        "memcached (inline points)",
        &old.instrumented,
        &new.instrumented,
        &start,
    );
}
