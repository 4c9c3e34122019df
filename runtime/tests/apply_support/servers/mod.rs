//! The real servers the `real_*` tests and the `real_pause` benchmark
//! drive: how each is started on 127.0.0.1 and a client of its protocol.

pub mod memcached;
pub mod nginx;
pub mod redis;
pub mod sshd;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use super::real::{free_port, wait_until_serving, KvClient};
use upstare_testkit::{spawn, ChildGuard};

/// A key-value server `name` started from `exe` with `args` and its port
/// given by `port_args(port)` on a free port, up and answering `C`'s get.
pub fn start_kv<C: KvClient>(
    exe: &Path,
    name: &str,
    port_args: &dyn Fn(&str) -> Vec<String>,
    args: &[&str],
) -> (ChildGuard, SocketAddr) {
    let port = free_port();
    let mut all = port_args(&port.to_string());
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let child = spawn(exe, &all).unwrap_or_else(|e| panic!("start {name}: {e}"));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until_serving::<C>(addr, Duration::from_secs(20));
    (child, addr)
}

/// A connection to `addr` (replies awaited at most `wait`) as a writer and
/// a buffered reader.
pub fn connect(
    addr: SocketAddr,
    wait: Duration,
) -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(wait))?;
    s.set_nodelay(true)?;
    Ok((s.try_clone()?, BufReader::new(s)))
}

/// One reply line without its line end; an error when the connection
/// closed.
pub fn read_line(reader: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut l = String::new();
    if reader.read_line(&mut l)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(l.trim_end().to_string())
}
