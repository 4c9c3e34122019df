//! redis for the real-server tests and benchmarks: started on 127.0.0.1,
//! and a client speaking RESP.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use super::super::real::KvClient;
use upstare_testkit::ChildGuard;

const WAIT: Duration = Duration::from_secs(20);

/// redis on 127.0.0.1, no persistence, up and answering.
pub fn start(exe: &Path) -> (ChildGuard, SocketAddr) {
    start_with(exe, &["--daemonize", "no", "--protected-mode", "no"])
}

/// redis on 127.0.0.1 (its port chosen here), no persistence, with
/// `args`; up and answering.
pub fn start_with(exe: &Path, args: &[&str]) -> (ChildGuard, SocketAddr) {
    super::start_kv::<Redis>(
        exe,
        "redis",
        &|port| {
            // What redis writes when told to save (its own tests' DEBUG
            // RELOAD, SAVE) goes under target/, not the test's directory.
            let dir = upstare_testkit::target_dir().join("redis-work").join(port);
            std::fs::create_dir_all(&dir).expect("redis working directory");
            [
                "--port",
                port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &dir.to_string_lossy(),
            ]
            .map(String::from)
            .to_vec()
        },
        args,
    )
}

/// RESP: commands as arrays of bulk strings, replies read by type.
pub struct Redis {
    pub writer: TcpStream,
    pub reader: BufReader<TcpStream>,
}

impl Redis {
    pub fn line(&mut self) -> std::io::Result<String> {
        super::read_line(&mut self.reader)
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
        let (writer, reader) = super::connect(addr, WAIT)?;
        Ok(Redis { writer, reader })
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
