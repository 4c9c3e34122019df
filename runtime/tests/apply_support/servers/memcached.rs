//! memcached for the real-server tests and benchmarks: started on
//! 127.0.0.1, and a client speaking its text protocol.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use super::super::real::{free_port, wait_until_serving, KvClient};
use upstare_testkit::{spawn, ChildGuard};

const WAIT: Duration = Duration::from_secs(20);

/// memcached on 127.0.0.1, 4 worker threads, no UDP, up and answering.
pub fn start(exe: &Path) -> (ChildGuard, SocketAddr) {
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
pub struct Memcache {
    pub writer: TcpStream,
    pub reader: BufReader<TcpStream>,
}

impl Memcache {
    pub fn line(&mut self) -> std::io::Result<String> {
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
