//! Benchmark (not a test): the README's per-pair figures of the real
//! servers. For each pair, the program as built (the old version) is
//! instrumented again here (functions, update points, rewrite time), then
//! a server of the old version is updated while clients keep working:
//! - memcached 1.6.18-1 → +deb12u1 and redis 7.0.15 ~deb12u7 → ~deb12u10
//!   (Debian's security updates), 2 clients each in a set+get loop;
//! - sshd 9.2p1 +deb12u7 → +deb12u10 (security update installed over the
//!   running file, listener + a session's monitor and child updated as
//!   one), a `cat` session echoing a line every 2 ms;
//! - nginx 1.22.1 +deb12u9, identity update of master + 2 workers (its
//!   security update cannot be fetched here), 2 keep-alive clients.
//!
//! The update is `upstare-apply --json` with no SPEC (lines of SPEC: 0);
//! its phases as the report splits them: stop, load, state (check,
//! transfer, rebuild, transformers, sweep), tree-wait (a process waiting
//! for the others of its tree), commit (commit and resume), pause (all of
//! these) of the process paused longest, and the total it reports; the
//! client pause is the longest gap between two replies a client saw.
//! Medians of 3 rounds. `cargo bench -p upstare-runtime --bench
//! real_pause`. Needs the real builds (`scripts/deps`; the first run
//! fetches and builds them).

#[path = "../tests/apply_support/mod.rs"]
mod apply_support;

use std::path::Path;
use std::time::{Duration, Instant};

use apply_support::real::{update, KvClient, Load};
use apply_support::servers::{memcached, nginx, redis, sshd};
use upstare_corpus::real::{build_real, RealBuild, RealPair, MEMCACHED, NGINX, OPENSSH, REDIS};

const ROUNDS: usize = 3;
/// How long the updater and the clients are waited for.
const WAIT: Duration = Duration::from_secs(60);

/// One round's figures, in milliseconds.
#[derive(Clone, Copy)]
struct Round {
    stop: f64,
    load: f64,
    state: f64,
    tree_wait: f64,
    commit: f64,
    pause: f64,
    total: f64,
    client: f64,
}

/// The phases of the process the report shows paused longest.
fn round(report: &serde_json::Value, client: Duration) -> Round {
    let processes = report["processes"].as_array().cloned().unwrap_or_default();
    let timings = processes
        .iter()
        .map(|p| &p["timings"])
        .max_by_key(|t| t["pause_us"].as_u64().unwrap_or(0))
        .unwrap_or(&report["timings"])
        .clone();
    let ms = |names: &[&str]| -> f64 {
        names
            .iter()
            .map(|n| timings[format!("{n}_us")].as_f64().unwrap_or(f64::NAN))
            .sum::<f64>()
            / 1000.0
    };
    Round {
        stop: ms(&["stop"]),
        load: ms(&["load"]),
        state: ms(&["check", "transfer", "rebuild", "transform", "sweep"]),
        tree_wait: ms(&["tree_wait"]),
        commit: ms(&["commit", "resume"]),
        pause: ms(&["pause"]),
        total: report["timings"]["total_us"]
            .as_f64()
            .map_or(f64::NAN, |t| t / 1000.0),
        client: client.as_secs_f64() * 1000.0,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn builds(pair: &RealPair) -> (RealBuild, RealBuild) {
    let old = build_real(&pair.recipe, pair.old).unwrap_or_else(|e| panic!("{e}"));
    let new = build_real(&pair.recipe, pair.new).unwrap_or_else(|e| panic!("{e}"));
    (old, new)
}

/// Functions, update points and the median rewrite time (s) of `exe`.
fn rewrite_figures(exe: &Path) -> (usize, usize, f64) {
    let bytes = std::fs::read(exe).unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
    let mut secs = Vec::new();
    let mut counts = (0, 0);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let r = upstare_rewriter::rewrite::rewrite(&bytes).unwrap_or_else(|e| panic!("{e}"));
        secs.push(t.elapsed().as_secs_f64());
        let points = r.tables.functions.iter().map(|f| f.update_points.len());
        counts = (r.tables.functions.len(), points.sum());
    }
    (counts.0, counts.1, median(secs))
}

/// A key-value server of the old version updated to the new one under
/// 2 clients in a set+get loop.
fn kv_round<C: KvClient>(
    old: &Path,
    new: &Path,
    start: &dyn Fn(&Path) -> (upstare_testkit::ChildGuard, std::net::SocketAddr),
) -> Round {
    let (child, addr) = start(old);
    let load = Load::start::<C>(addr, 2, WAIT);
    std::thread::sleep(Duration::from_millis(300));
    let report = update(child.pid(), new, WAIT);
    std::thread::sleep(Duration::from_millis(300));
    round(&report, load.finish())
}

/// nginx (master + 2 workers) updated to a copy of itself under 2
/// keep-alive clients.
fn nginx_round(exe: &Path) -> Round {
    let dir = apply_support::TempDir::new("bench-real-nginx");
    let (master, addr) = nginx::start(exe, &dir);
    let load = nginx::HttpLoad::start(addr, 2, WAIT);
    std::thread::sleep(Duration::from_millis(300));
    let copy = apply_support::fresh_copy(exe, &dir, "identity");
    let report = update(master.pid(), &copy, WAIT);
    std::thread::sleep(Duration::from_millis(300));
    round(&report, load.finish())
}

/// sshd's security update, installed over the running file, with a
/// session open and echoing.
fn sshd_round(old: &Path, new: &Path) -> Round {
    let server = sshd::start(old);
    let session = sshd::Session::open(&server);
    sshd::install_over(new, &server.exe);
    let pinger = sshd::Pinger::start(session);
    std::thread::sleep(Duration::from_millis(300));
    let report = update(server.pid(), &server.exe, WAIT);
    std::thread::sleep(Duration::from_millis(300));
    let (_session, gap) = pinger.finish();
    round(&report, gap)
}

fn main() {
    println!(
        "| pair | functions | update points | rewrite | stop | load | state | tree-wait | commit | \
         pause | reported total | client pause | SPEC lines |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    type RoundFn = Box<dyn Fn(&RealBuild, &RealBuild) -> Round>;
    let pairs: [(&str, RealPair, RoundFn); 4] = [
        (
            "memcached (security update)",
            MEMCACHED,
            Box::new(|o, n| {
                kv_round::<memcached::Memcache>(&o.instrumented, &n.instrumented, &memcached::start)
            }),
        ),
        (
            "redis (security update)",
            REDIS,
            Box::new(|o, n| {
                kv_round::<redis::Redis>(&o.instrumented, &n.instrumented, &redis::start)
            }),
        ),
        (
            "sshd (security update)",
            OPENSSH,
            Box::new(|o, n| sshd_round(&o.instrumented, &n.instrumented)),
        ),
        (
            "nginx (identity)",
            NGINX,
            Box::new(|o, _| nginx_round(&o.instrumented)),
        ),
    ];
    for (name, pair, run) in pairs {
        let (old, new) = if pair.recipe.package == NGINX.recipe.package {
            // Its security update cannot be fetched here: identity only.
            let old = build_real(&pair.recipe, pair.old).unwrap_or_else(|e| panic!("{e}"));
            (old.clone(), old)
        } else {
            builds(&pair)
        };
        let (functions, points, rewrite) = rewrite_figures(&old.original);
        let rounds: Vec<Round> = (0..ROUNDS).map(|_| run(&old, &new)).collect();
        let m = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        println!(
            "| {name} | {functions} | {points} | {rewrite:.2} s | {:.1} | {:.1} | {:.1} | {:.1} | \
             {:.1} | {:.1} | {:.1} | {:.1} | 0 |",
            m(|r| r.stop),
            m(|r| r.load),
            m(|r| r.state),
            m(|r| r.tree_wait),
            m(|r| r.commit),
            m(|r| r.pause),
            m(|r| r.total),
            m(|r| r.client),
        );
    }
    println!("(milliseconds unless said; medians of {ROUNDS} rounds)");
}
