//! Version pairs that run a fixed number of ticks (`Control::Ticks`), and
//! what their tests share: building both versions, checking a whole output
//! line by line against the source's formulas, and a snapshot of the code.

use std::path::{Path, PathBuf};
use std::time::Duration;
use upstare_corpus::version_pair;
use upstare_runtime::update::{ApplyOptions, UpdateError, UpdateReport};
use upstare_testkit::{Output, Toolchain};

use super::{instrumented, TracedRun};

/// Ticks every tick pair runs in the tests (`argv[1]`).
pub const TICKS: i64 = 6;
/// [`TICKS`] as the program's argument.
pub const TICKS_ARG: &str = "6";

/// What the sources say each line must be: `line(n, t)` is the line version
/// `n` prints at tick `t` (`t == TICKS`: its last line, `vN done ...`).
pub type Lines = fn(u32, i64) -> String;

pub fn pair(name: &str, tc: Toolchain) -> (PathBuf, PathBuf) {
    let p = version_pair(name).unwrap_or_else(|| panic!("no version pair {name}"));
    (instrumented(&p.v1, tc), instrumented(&p.v2, tc))
}

/// Runs `v1` for [`TICKS`] ticks with `env`, updates it to `v2` with
/// `opts` (`skip_hits`: where) and lets it run to its end within
/// `timeout`: the update's result and the run's output.
pub fn update_run(
    (v1, v2): (&Path, &Path),
    env: &[(&str, &str)],
    opts: &ApplyOptions,
    timeout: Duration,
) -> (Result<UpdateReport, UpdateError>, Result<Output, String>) {
    let mut run = TracedRun::spawn_env(v1, &[TICKS_ARG], env);
    let r = run.apply(v2, opts);
    (r, run.finish(timeout))
}

/// Checks a whole output of a (maybe) updated run: ticks 0..TICKS then the
/// done line, each exactly once and in order, each the line its version
/// prints at that tick, and no v1 line after the first v2 line. Returns the
/// version of the last line.
pub fn check_lines(stdout: &str, line: Lines) -> Result<u32, String> {
    let lines: Vec<&str> = stdout.lines().collect();
    if lines.len() != TICKS as usize + 1 {
        return Err(format!("{} lines, want {}", lines.len(), TICKS + 1));
    }
    let mut seen_v2 = false;
    let mut last = 1;
    for (t, got) in lines.iter().enumerate() {
        let n = match &got.get(..3) {
            Some("v1 ") => 1,
            Some("v2 ") => 2,
            _ => return Err(format!("line {t} has no version marker: {got:?}")),
        };
        if n == 1 && seen_v2 {
            return Err(format!("v1 code ran after the update: {got:?}"));
        }
        seen_v2 |= n == 2;
        let want = line(n, t as i64);
        if *got != want {
            return Err(format!("tick {t}:\n got {got:?}\nwant {want:?}"));
        }
        last = n;
    }
    Ok(last)
}

/// The bytes of every executable mapping of `pid`, with the maps text.
pub fn code_and_maps(pid: u32) -> (String, Vec<(String, Vec<u8>)>) {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open mem");
    let mut code = Vec::new();
    for l in maps.lines() {
        let mut w = l.split_whitespace();
        let (range, perms) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
        // [vsyscall] cannot be read through /proc/PID/mem.
        if !perms.contains('x') || l.ends_with("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').expect("range");
        let (a, b) = (
            u64::from_str_radix(a, 16).expect("hex"),
            u64::from_str_radix(b, 16).expect("hex"),
        );
        let mut buf = vec![0u8; (b - a) as usize];
        mem.seek(SeekFrom::Start(a)).expect("seek");
        mem.read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("read {l}: {e}"));
        code.push((l.to_string(), buf));
    }
    (maps, code)
}
