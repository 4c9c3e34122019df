//! A real server: Debian's nginx 1.22.1 (a master and 2 workers, with the
//! modules Debian enables, http_v2 included), fetched with `apt-get
//! source`, built at -O0 by its own configure, updated live as one
//! application (`upstare-apply --pid MASTER` updates the workers with it)
//! under HTTP/1.1 keep-alive clients on 127.0.0.1:
//! - identity update while idle, and while clients keep a steady load;
//! - (Debian's security update 1.22.1-9+deb12u9 → +deb12u11 cannot be
//!   fetched here: the mirror answers 404 for its files.)
//!
//! Each prints the update latency the tool reports and the longest gap a
//! client saw between replies (figures, not assertions).

mod apply_support;

use std::path::Path;
use std::time::Duration;

use apply_support::real::{runs, total_ms, update};
use apply_support::servers::nginx::{start, workers, Http, HttpLoad, WAIT};
use apply_support::{fresh_copy, TempDir};
use upstare_corpus::real::{build_real, build_real_inline, RealBuild, NGINX};

/// The running version. Its security update (1.22.1-9+deb12u10/u11) is
/// listed by `apt-cache showsrc` but the mirror answers 404 for its files,
/// so only identity updates are tested here.
fn old_build() -> RealBuild {
    build_real(&NGINX.recipe, NGINX.old).unwrap_or_else(|e| panic!("{e}"))
}

/// Every process of the tree the report lists runs `exe`, and the report
/// lists the master and both workers.
fn whole_tree_runs(report: &serde_json::Value, master: u32, exe: &Path) {
    let mut pids: Vec<u64> = report["processes"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["pid"].as_u64()).collect())
        .unwrap_or_default();
    pids.sort_unstable();
    let mut want: Vec<u64> = std::iter::once(master)
        .chain(workers(master))
        .map(u64::from)
        .collect();
    want.sort_unstable();
    assert_eq!(
        pids, want,
        "the update did not cover the master and its workers"
    );
    for p in want {
        assert!(
            runs(p as u32, exe),
            "process {p} does not run {}",
            exe.display()
        );
    }
}

#[test]
fn nginx_identity_update_of_master_and_workers_while_idle() {
    let old = old_build();
    let dir = TempDir::new("real-nginx-idle");
    let (child, addr) = start(&old.instrumented, &dir);
    let mut held = Http::connect(addr).expect("connect");
    held.get().expect("first request");

    let copy = fresh_copy(&old.instrumented, &dir, "identity");
    let report = update(child.pid(), &copy, WAIT * 2);
    whole_tree_runs(&report, child.pid(), &copy);
    for i in 0..20 {
        held.get()
            .unwrap_or_else(|e| panic!("held connection, request {i} after the update: {e}"));
    }
    Http::connect(addr)
        .and_then(|mut c| c.get())
        .expect("a new connection after the update");
    eprintln!(
        "nginx idle identity update (master + 2 workers): {:.2} ms",
        total_ms(&report)
    );
}

#[test]
fn nginx_identity_update_under_load_drops_nothing() {
    identity_update_under_load(&old_build().instrumented, "nginx");
}

#[test]
fn nginx_with_inline_points_identity_update_under_load_drops_nothing() {
    let inline = build_real_inline(&NGINX.recipe, NGINX.old).unwrap_or_else(|e| panic!("{e}"));
    apply_support::real::assert_inline_points(&inline.instrumented);
    identity_update_under_load(&inline.instrumented, "nginx (inline points)");
}

/// Identity update of the master and its workers while 2 keep-alive
/// clients send requests: no client sees an error.
fn identity_update_under_load(exe: &Path, name: &str) {
    let dir = TempDir::new("real-nginx-load");
    let (child, addr) = start(exe, &dir);
    let load = HttpLoad::start(addr, 2, WAIT * 2);
    std::thread::sleep(Duration::from_millis(300));
    let copy = fresh_copy(exe, &dir, "identity");
    let report = update(child.pid(), &copy, WAIT * 2);
    std::thread::sleep(Duration::from_millis(300));
    let gap = load.finish();
    whole_tree_runs(&report, child.pid(), &copy);
    eprintln!(
        "{name} identity update under load: {:.2} ms reported, longest client gap {:.2} ms",
        total_ms(&report),
        gap.as_secs_f64() * 1000.0
    );
}
