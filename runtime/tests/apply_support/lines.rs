//! A line-protocol TCP client for the corpus servers (`echo_server`,
//! `chroot_sessions`, `prefork_server`): one line out, one line back.

use std::io::{BufRead, BufReader, Write as _};
use std::net::TcpStream;
use std::time::Duration;

/// How long a reply may take.
const REPLY_WAIT: Duration = Duration::from_secs(20);

/// One connection to a server on 127.0.0.1.
pub struct LineClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl LineClient {
    /// Connects to `127.0.0.1:port`.
    pub fn connect(port: u16) -> LineClient {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect to port {port}: {e}"));
        stream
            .set_read_timeout(Some(REPLY_WAIT))
            .expect("read timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone the stream"));
        LineClient {
            reader,
            writer: stream,
        }
    }

    /// Sends `line` and returns the reply line without its newline.
    pub fn ask(&mut self, line: &str) -> String {
        self.send(line);
        self.reply_to(line)
    }

    /// Sends `line` without waiting for its reply (requests pipelined).
    pub fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| panic!("send {line:?}: {e}"));
    }

    /// The next reply line without its newline (`line` names the request
    /// in messages; empty when the server closed the connection).
    pub fn reply_to(&mut self, line: &str) -> String {
        let mut reply = String::new();
        self.reader
            .read_line(&mut reply)
            .unwrap_or_else(|e| panic!("reply to {line:?}: {e}"));
        reply.trim_end().to_string()
    }
}

/// The number after `key=` in `line`.
pub fn field(line: &str, key: &str) -> i64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Waits until `child` has printed `n` lines starting with `prefix` and
/// returns them (the first `n`, in order).
pub fn wait_for_lines(
    child: &upstare_testkit::ChildGuard,
    prefix: &str,
    n: usize,
    timeout: Duration,
) -> Vec<String> {
    // wait_for_line scans from the start: the n-th such line means all
    // are there.
    let seen = std::cell::Cell::new(0usize);
    child
        .wait_for_line(&format!("{n} lines {prefix:?}"), timeout, |l| {
            if l.starts_with(prefix) {
                seen.set(seen.get() + 1);
            }
            seen.get() == n
        })
        .unwrap_or_else(|e| panic!("{e}"));
    child
        .stdout_so_far()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .take(n)
        .map(str::to_string)
        .collect()
}
