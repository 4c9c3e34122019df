//! Benchmark (not a test): what a live update costs a real server
//! afterwards. Each server's throughput after a live update of its old
//! version to Debian's security update, against a fresh start of that
//! same update, in the same run (goal: a ratio of 1.00):
//! - redis 7.0.15 (~deb12u7 → ~deb12u10): `redis-benchmark` from the same
//!   build, SET and GET, 4 clients;
//! - memcached 1.6.18 (-1 → -1+deb12u1): a fixed loop of set + get on one
//!   connection;
//! - nginx 1.22.1 (+deb12u9, a master and 2 workers updated as one; its
//!   security updates cannot be fetched here, so an identity update to a
//!   copy of the same build): a fixed loop of keep-alive `GET /` on one
//!   connection, every reply checked;
//! - sshd 9.2p1 (+deb12u7 → +deb12u10, the listener run with `-r` so that
//!   connections run its code, not the file on disk): a fixed loop of
//!   logins with the real client, each running `true`.
//!
//! Rounds alternate fresh and updated servers; medians of the rounds.
//! `cargo bench -p upstare-runtime --bench real_throughput`. Needs the
//! real builds (`scripts/deps`; the first run fetches and builds them).

#[path = "../tests/apply_support/mod.rs"]
mod apply_support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use apply_support::servers::{memcached, nginx, redis, sshd};
use apply_support::{fresh_copy, TempDir};
use upstare_corpus::real::{build_real, MEMCACHED, NGINX, OPENSSH, REDIS};
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::ChildGuard;

/// A server started by `start`, and its port.
fn serve(start: fn(&Path) -> (ChildGuard, std::net::SocketAddr), exe: &Path) -> (ChildGuard, u16) {
    let (child, addr) = start(exe);
    (child, addr.port())
}

const ROUNDS: usize = 3;
/// Requests per redis-benchmark test and memcached set+get pairs per round.
const REQUESTS: usize = 50_000;
const MEMCACHED_PAIRS: usize = 20_000;
/// Keep-alive `GET /` requests per nginx round.
const NGINX_GETS: usize = 20_000;
/// Logins per sshd round.
const SSH_LOGINS: usize = 20;

fn update(child: &ChildGuard, to: &Path) {
    let opts = ApplyOptions {
        timeout: Duration::from_secs(10),
        ..ApplyOptions::default()
    };
    apply(child.pid() as i32, to, &opts).unwrap_or_else(|e| panic!("update: {e}"));
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

/// Keep-alive `GET /` per second on one connection to nginx at `port`.
fn nginx_gps(addr: std::net::SocketAddr) -> f64 {
    let mut c = nginx::Http::connect(addr).expect("connect");
    let t = Instant::now();
    for i in 0..NGINX_GETS {
        c.get().unwrap_or_else(|e| panic!("GET {i}: {e}"));
    }
    NGINX_GETS as f64 / t.elapsed().as_secs_f64()
}

/// Logins per second to `server`, each running `true` (every one must
/// succeed).
fn sshd_lps(server: &sshd::Sshd) -> f64 {
    let t = Instant::now();
    for _ in 0..SSH_LOGINS {
        assert_eq!(server.run("true"), "");
    }
    SSH_LOGINS as f64 / t.elapsed().as_secs_f64()
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
        let (child, port) = serve(redis::start, &r_new.instrumented);
        fresh.push(redis_rps(&bench, port));
        drop(child);
        let (child, port) = serve(redis::start, &r_old.instrumented);
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
        let (child, port) = serve(memcached::start, &m_new.instrumented);
        fresh.push(memcached_pps(port));
        drop(child);
        let (child, port) = serve(memcached::start, &m_old.instrumented);
        update(&child, &m_new.instrumented);
        after.push(memcached_pps(port));
        drop(child);
    }
    let (f, a) = (median(fresh), median(after));
    println!(
        "memcached set+get: fresh {f:.0} pairs/s, after update {a:.0} pairs/s, ratio {:.3}",
        a / f
    );

    let n_old = build_real(&NGINX.recipe, NGINX.old).unwrap_or_else(|e| panic!("{e}"));
    let (mut fresh, mut after) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let dir = TempDir::new(&format!("bench-nginx-{round}"));
        let copy = fresh_copy(&n_old.instrumented, &dir, "identity");
        let (server, addr) = nginx::start(&copy, &dir);
        fresh.push(nginx_gps(addr));
        drop(server);
        let (server, addr) = nginx::start(&n_old.instrumented, &dir);
        update(&server.master, &copy);
        after.push(nginx_gps(addr));
        drop(server);
    }
    let (f, a) = (median(fresh), median(after));
    println!(
        "nginx keep-alive GET (master + 2 workers, identity update): fresh {f:.0} req/s, after update {a:.0} req/s, ratio {:.3}",
        a / f
    );

    let s_old = build_real(&OPENSSH.recipe, OPENSSH.old).unwrap_or_else(|e| panic!("{e}"));
    let s_new = build_real(&OPENSSH.recipe, OPENSSH.new).unwrap_or_else(|e| panic!("{e}"));
    let (mut fresh, mut after) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let server = sshd::start_with(&s_new.instrumented, "", &["-r"]);
        fresh.push(sshd_lps(&server));
        drop(server);
        let server = sshd::start_with(&s_old.instrumented, "", &["-r"]);
        update(&server.listener, &s_new.instrumented);
        after.push(sshd_lps(&server));
        drop(server);
    }
    let (f, a) = (median(fresh), median(after));
    println!(
        "sshd logins running `true`: fresh {f:.2} logins/s, after update {a:.2} logins/s, ratio {:.3}",
        a / f
    );
}
