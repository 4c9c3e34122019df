//! Benchmark (not a test): what a live update costs a real server
//! afterwards. Each server's throughput after a live update of its old
//! version to Debian's security update, against a fresh start of that
//! same update, in the same run (goal: a ratio of 1.00):
//! - redis 7.0.15 (~deb12u7 → ~deb12u10): `redis-benchmark` from the same
//!   build, SET and GET, 4 clients;
//! - memcached 1.6.18 (-1 → -1+deb12u1): a fixed loop of set + get on one
//!   connection.
//!
//! Rounds alternate fresh and updated servers; medians of the rounds.
//! `cargo bench -p upstare-runtime --bench real_throughput`. Needs the
//! real builds (`scripts/deps`; the first run fetches and builds them).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use upstare_corpus::real::{build_real, MEMCACHED, REDIS};
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{spawn, ChildGuard};

const ROUNDS: usize = 3;
/// Requests per redis-benchmark test and memcached set+get pairs per round.
const REQUESTS: usize = 50_000;
const MEMCACHED_PAIRS: usize = 20_000;

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Waits (bounded) until `addr` accepts a connection and answers `probe`
/// with a line.
fn wait_answering(addr: SocketAddr, probe: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut w = s.try_clone().expect("clone");
            let mut line = String::new();
            if w.write_all(probe).is_ok() && BufReader::new(s).read_line(&mut line).is_ok() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{addr} does not answer");
}

fn update(child: &ChildGuard, to: &Path) {
    let opts = ApplyOptions {
        timeout: Duration::from_secs(10),
        ..ApplyOptions::default()
    };
    apply(child.pid() as i32, to, &opts).unwrap_or_else(|e| panic!("update: {e}"));
}

fn redis(exe: &Path) -> (ChildGuard, u16) {
    let port = free_port();
    let p = port.to_string();
    let args = [
        "--port",
        &p,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ];
    let child = spawn(exe, &args).expect("start redis");
    wait_answering(SocketAddr::from(([127, 0, 0, 1], port)), b"PING\r\n");
    (child, port)
}

/// SET and GET requests per second by `redis-benchmark` (`bench`).
fn redis_rps(bench: &Path, port: u16) -> (f64, f64) {
    let out = Command::new(bench)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "-c", "4"])
        .args(["-n", &REQUESTS.to_string(), "-t", "set,get"])
        .output()
        .expect("redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = |name: &str| -> f64 {
        text.split(['\r', '\n'])
            .filter_map(|l| l.strip_prefix(&format!("{name}: ")))
            .filter_map(|r| r.split(" requests per second").next())
            .filter_map(|n| n.trim().parse().ok())
            .next_back()
            .unwrap_or_else(|| panic!("no {name} figure in {text}"))
    };
    (rps("SET"), rps("GET"))
}

fn memcached(exe: &Path) -> (ChildGuard, u16) {
    let port = free_port();
    let p = port.to_string();
    let args = [
        "-l",
        "127.0.0.1",
        "-p",
        &p,
        "-U",
        "0",
        "-t",
        "4",
        "-u",
        "root",
        "-m",
        "64",
    ];
    let child = spawn(exe, &args).expect("start memcached");
    wait_answering(SocketAddr::from(([127, 0, 0, 1], port)), b"version\r\n");
    (child, port)
}

/// set + get pairs per second on one connection, every reply checked.
fn memcached_pps(port: u16) -> f64 {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let mut w = s.try_clone().expect("clone");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let mut expect = |r: &mut BufReader<TcpStream>, want: &str| {
        line.clear();
        r.read_line(&mut line).expect("reply");
        assert!(line.starts_with(want), "{line:?}, want {want}");
    };
    let t = Instant::now();
    for i in 0..MEMCACHED_PAIRS {
        let key = format!("k{}", i % 1000);
        let value = format!("v{i}");
        write!(
            w,
            "set {key} 0 0 {}\r\n{value}\r\nget {key}\r\n",
            value.len()
        )
        .expect("send");
        expect(&mut r, "STORED");
        expect(&mut r, &format!("VALUE {key} "));
        expect(&mut r, &value);
        expect(&mut r, "END");
    }
    MEMCACHED_PAIRS as f64 / t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let r_old = build_real(&REDIS.recipe, REDIS.old).unwrap_or_else(|e| panic!("{e}"));
    let r_new = build_real(&REDIS.recipe, REDIS.new).unwrap_or_else(|e| panic!("{e}"));
    let bench = r_new.tree.join("src/redis-benchmark");
    let m_old = build_real(&MEMCACHED.recipe, MEMCACHED.old).unwrap_or_else(|e| panic!("{e}"));
    let m_new = build_real(&MEMCACHED.recipe, MEMCACHED.new).unwrap_or_else(|e| panic!("{e}"));

    let (mut fresh, mut after) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (child, port) = redis(&r_new.instrumented);
        fresh.push(redis_rps(&bench, port));
        drop(child);
        let (child, port) = redis(&r_old.instrumented);
        update(&child, &r_new.instrumented);
        after.push(redis_rps(&bench, port));
        drop(child);
    }
    println!(
        "throughput after a live update / fresh start of the same version, median of {ROUNDS}"
    );
    for (name, pick) in [("SET", 0usize), ("GET", 1)] {
        let get = |v: &Vec<(f64, f64)>| {
            median(
                v.iter()
                    .map(|p| if pick == 0 { p.0 } else { p.1 })
                    .collect(),
            )
        };
        let (f, a) = (get(&fresh), get(&after));
        println!(
            "redis {name}: fresh {f:.0} req/s, after update {a:.0} req/s, ratio {:.3}",
            a / f
        );
    }

    let (mut fresh, mut after) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (child, port) = memcached(&m_new.instrumented);
        fresh.push(memcached_pps(port));
        drop(child);
        let (child, port) = memcached(&m_old.instrumented);
        update(&child, &m_new.instrumented);
        after.push(memcached_pps(port));
        drop(child);
    }
    let (f, a) = (median(fresh), median(after));
    println!(
        "memcached set+get: fresh {f:.0} pairs/s, after update {a:.0} pairs/s, ratio {:.3}",
        a / f
    );
}
