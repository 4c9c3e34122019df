//! memcached for the real-server tests and benchmarks: started on
//! 127.0.0.1, and a client speaking its text protocol.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use super::super::real::KvClient;
use upstare_testkit::ChildGuard;

const WAIT: Duration = Duration::from_secs(20);

/// memcached with 64 MB of memory (see [`start_with`]).
pub fn start(exe: &Path) -> (ChildGuard, SocketAddr) {
    start_with(exe, &["-m", "64"])
}

/// memcached on 127.0.0.1 (its port chosen here), 4 worker threads, no
/// UDP, as root, with `args`; up and answering.
pub fn start_with(exe: &Path, args: &[&str]) -> (ChildGuard, SocketAddr) {
    super::start_kv::<Memcache>(
        exe,
        "memcached",
        &|port| {
            [
                "-l",
                "127.0.0.1",
                "-p",
                port,
                "-U",
                "0",
                "-t",
                "4",
                "-u",
                "root",
            ]
            .map(String::from)
            .to_vec()
        },
        args,
    )
}

/// memcached's text protocol.
pub struct Memcache {
    pub writer: TcpStream,
    pub reader: BufReader<TcpStream>,
}

impl Memcache {
    pub fn line(&mut self) -> std::io::Result<String> {
        super::read_line(&mut self.reader)
    }
}

impl KvClient for Memcache {
    fn connect(addr: SocketAddr) -> std::io::Result<Memcache> {
        let (writer, reader) = super::connect(addr, WAIT)?;
        Ok(Memcache { writer, reader })
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
