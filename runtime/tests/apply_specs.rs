//! The corpus pairs that need a SPEC, updated live with the SPEC.toml
//! beside their sources, at every update-point hit of a run (gcc and
//! clang), every line checked against the formulas their headers state:
//! `main_struct_spec` (a new member of main's local, given by the SPEC),
//! `fn_rename` (a function with a running loop renamed), `txn_safety` (no
//! update while transfer() is active: the accounts always add up).

mod apply_support;

use apply_support::*;
use std::path::{Path, PathBuf};
use std::time::Duration;
use upstare_corpus::version_pair;
use upstare_patcher::Spec;
use upstare_runtime::update::ApplyOptions;
use upstare_testkit::{ExitStatus, Toolchain};

const TICKS: i64 = 6;
const TICKS_ARG: &str = "6";
const READY_TIMEOUT: Duration = Duration::from_secs(3);
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// The instrumented pair and its SPEC.toml.
fn pair(name: &str, tc: Toolchain) -> (PathBuf, PathBuf, PathBuf) {
    let p = version_pair(name).unwrap_or_else(|| panic!("no pair {name}"));
    let spec =
        p.v1.source
            .parent()
            .map(|d| d.join("SPEC.toml"))
            .expect("source dir");
    (instrumented(&p.v1, tc), instrumented(&p.v2, tc), spec)
}

/// Checks a whole output; `Ok(last version)`.
type Check = fn(&str) -> Result<u32, String>;

/// The version marker of a line.
fn version(l: &str) -> Result<u32, String> {
    match l.get(..3) {
        Some("v1 ") => Ok(1),
        Some("v2 ") => Ok(2),
        _ => Err(format!("no version marker: {l:?}")),
    }
}

/// Lines in order, each `line(v, t)`, no v1 after v2, then the done line.
fn ticks(stdout: &str, line: fn(u32, i64) -> String) -> Result<u32, String> {
    let lines: Vec<&str> = stdout.lines().collect();
    if lines.len() != TICKS as usize + 1 {
        return Err(format!("{} lines, want {}", lines.len(), TICKS + 1));
    }
    let mut last = 1;
    for (t, l) in lines.iter().enumerate() {
        let v = version(l)?;
        if v < last {
            return Err(format!("v1 ran after v2: {l:?}"));
        }
        let want = if t as i64 == TICKS {
            format!("v{v} done t={TICKS}")
        } else {
            line(v, t as i64)
        };
        if *l != want {
            return Err(format!("tick {t}: got {l:?}, want {want:?}"));
        }
        last = v;
    }
    Ok(last)
}

/// main_struct_spec: fd = 3, bytes = 100n; v2: max_conn = 64 (the SPEC's
/// value), per_conn = bytes / max_conn.
fn main_struct_spec(stdout: &str) -> Result<u32, String> {
    ticks(stdout, |v, t| {
        let n = t + 1;
        match v {
            1 => format!("v1 t={t} fd=3 bytes={}", 100 * n),
            _ => format!(
                "v2 t={t} fd=3 max_conn=64 bytes={} per_conn={}",
                100 * n,
                100 * n / 64
            ),
        }
    })
}

/// fn_rename: each tick adds 50t + 10 to total.
fn fn_rename(stdout: &str) -> Result<u32, String> {
    ticks(stdout, |v, t| {
        let total: i64 = (0..=t).map(|s| 50 * s + 10).sum();
        format!("v{v} t={t} total={total}")
    })
}

/// txn_safety: tick t moves 5 + t % 3 from account t % 2 to the other; v1
/// moves it whole, v2 keeps 1 as a fee. The transfer of the tick the update
/// happens in may have run in either version (the update may come between
/// it and the print, never inside it: the SPEC forbids that). The accounts
/// and fees always add up to 1000.
fn txn_safety(stdout: &str) -> Result<u32, String> {
    let lines: Vec<&str> = stdout.lines().collect();
    if lines.len() != TICKS as usize + 1 {
        return Err(format!("{} lines, want {}", lines.len(), TICKS + 1));
    }
    // Possible (a, b, fees, v2 code has run) states.
    let mut states = vec![([600i64, 400i64], 0i64, false)];
    let mut last = 1;
    for (t, l) in lines.iter().enumerate() {
        let v = version(l)?;
        if v < last {
            return Err(format!("v1 ran after v2: {l:?}"));
        }
        last = v;
        if t as i64 == TICKS {
            if *l != format!("v{v} done t={TICKS}") {
                return Err(format!("last line {l:?}"));
            }
            break;
        }
        let t = t as i64;
        let (from, to, amount) = ((t % 2) as usize, ((t + 1) % 2) as usize, 5 + t % 3);
        let mut next = Vec::new();
        for (acct, fees, switched) in &states {
            // Which version's transfer may have run this tick.
            let choices: &[u32] = match (v, switched) {
                (1, _) => &[1],
                (_, true) => &[2],
                (_, false) => &[1, 2],
            };
            for &tv in choices {
                let mut a = *acct;
                let mut f = *fees;
                a[from] -= amount;
                if tv == 1 {
                    a[to] += amount;
                } else {
                    a[to] += amount - 1;
                    f += 1;
                }
                let want = match v {
                    1 => format!("v1 t={t} a={} b={} sum={}", a[0], a[1], a[0] + a[1]),
                    _ => format!(
                        "v2 t={t} a={} b={} fees={f} sum={}",
                        a[0],
                        a[1],
                        a[0] + a[1] + f
                    ),
                };
                if *l == want {
                    next.push((a, f, v == 2));
                }
            }
        }
        if next.is_empty() {
            return Err(format!("tick {t}: {l:?} is no state the sources allow"));
        }
        if !l.ends_with("sum=1000") {
            return Err(format!("tick {t}: the accounts do not add up: {l:?}"));
        }
        states = next;
    }
    Ok(last)
}

fn sweep(name: &str, tc: Toolchain, check: Check) {
    let (v1, v2, spec_path) = pair(name, tc);
    // txn_safety's update waits for transfer() to return by letting the
    // threads run a little: paced, the run is still there when it is ready.
    let args: &[&str] = if name == "txn_safety" {
        &[TICKS_ARG, "20"]
    } else {
        &[TICKS_ARG]
    };
    let spec = Spec::read(&spec_path).unwrap_or_else(|e| panic!("{e}"));
    for (n, exe) in [(1, &v1), (2, &v2)] {
        let out = baseline(exe, args);
        assert_eq!(check(&out.stdout), Ok(n), "fresh v{n}:\n{}", out.stdout);
    }
    let (hits, more) = count_hits(&v1, args, Some(10_000));
    assert!(!more && hits > TICKS as u64, "{hits} hits");
    let mut failures = Vec::new();
    for k in 0..hits {
        let mut run = TracedRun::spawn(&v1, args);
        let opts = ApplyOptions {
            timeout: READY_TIMEOUT,
            skip_hits: k,
            spec: Some((spec_path.clone(), spec.clone())),
            ..ApplyOptions::default()
        };
        let r = run.apply(&v2, &opts);
        let out = run
            .finish(RUN_TIMEOUT)
            .unwrap_or_else(|e| panic!("hit {k}: {e}"));
        match r {
            Ok(_) => {
                if out.status != ExitStatus::Code(0) {
                    failures.push(format!("hit {k}: status {:?}", out.status));
                }
                match check(&out.stdout) {
                    Ok(2) => {}
                    Ok(_) => failures.push(format!("hit {k}: updated, but v1 ended")),
                    Err(e) => failures.push(format!("hit {k}: {e}\n{}", out.stdout)),
                }
            }
            Err(e) => failures.push(format!("hit {k}: refused: {e}")),
        }
    }
    println!("{name} [{tc}]: {hits}/{hits} hits updated with the SPEC");
    assert!(
        failures.is_empty(),
        "{name} [{tc}]:\n{}",
        failures.join("\n")
    );
}

/// The SPEC the pair's header shows is the file beside it.
fn spec_path_exists(p: &Path) {
    assert!(p.is_file(), "{}", p.display());
}

macro_rules! spec_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::*;
                #[test]
                fn gcc() {
                    spec_path_exists(&pair(stringify!($name), Toolchain::Gcc).2);
                    sweep(stringify!($name), Toolchain::Gcc, super::$name);
                }
                #[test]
                fn clang() {
                    sweep(stringify!($name), Toolchain::Clang, super::$name);
                }
            }
        )*
    };
}

spec_tests!(main_struct_spec, fn_rename, txn_safety);
