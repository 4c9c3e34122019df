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
    free_port, kv_identity_idle, kv_identity_under_load, kv_update_keeps_connection,
    wait_until_serving, KvClient,
};
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
    kv_identity_idle::<Redis>("redis", &old.instrumented, &start);
}

#[test]
fn redis_identity_update_under_load_drops_nothing() {
    let (old, _) = builds();
    kv_identity_under_load::<Redis>("redis", &old.instrumented, &start);
}

#[test]
fn redis_security_update_keeps_a_live_connection_and_its_keys() {
    let (old, new) = builds();
    kv_update_keeps_connection::<Redis>("redis", &old.instrumented, &new.instrumented, &start);
}
