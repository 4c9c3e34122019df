//! redis for the real-server tests and benchmarks: started on 127.0.0.1,
//! and a client speaking RESP.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use super::super::real::{free_port, wait_until_serving, KvClient};
use upstare_testkit::{spawn, ChildGuard};

const WAIT: Duration = Duration::from_secs(20);

/// redis on 127.0.0.1, no persistence, up and answering.
pub fn start(exe: &Path) -> (ChildGuard, SocketAddr) {
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
pub struct Redis {
    pub writer: TcpStream,
    pub reader: BufReader<TcpStream>,
}

impl Redis {
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

    pub fn command(&mut self, args: &[&str]) -> std::io::Result<()> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.command_bytes(&args)
    }

    /// A command whose arguments are any bytes (a DUMP payload).
    pub fn command_bytes(&mut self, args: &[&[u8]]) -> std::io::Result<()> {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&req)
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
