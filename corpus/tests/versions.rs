//! The version pairs build with every toolchain, and each version behaves as
//! its description says: it keeps running until told to stop, prints progress
//! lines carrying its own marker, stops cleanly when asked, and the two
//! versions really differ. Later cross-version update tests rely on all of it.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use upstare_corpus::{build, version_pair, version_pairs, Control, Program, VersionPair};
use upstare_testkit::{run, spawn, ChildGuard, ExitStatus, Toolchain};

const LINE_TIMEOUT: Duration = Duration::from_secs(15);
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

fn pair(name: &str) -> VersionPair {
    version_pair(name).unwrap_or_else(|| panic!("no version pair {name}"))
}

fn version(p: &VersionPair, n: u32) -> &Program {
    if n == 1 {
        &p.v1
    } else {
        &p.v2
    }
}

/// Checks that every stdout line of a run carries version `n`'s marker.
fn assert_all_lines_marked(stdout: &str, n: u32, what: &str) {
    let marker = VersionPair::marker(n);
    for line in stdout.lines() {
        assert!(
            line.starts_with(&marker),
            "{what}: line without `{marker}`: {line:?}\n{stdout}"
        );
    }
}

/// The self-terminating run (`Program::args`) ends with exit 0 and only
/// marked lines.
fn check_short_run(p: &Program, n: u32, tc: Toolchain) -> String {
    let bin = build(p, tc).unwrap_or_else(|e| panic!("{e}"));
    let out = run(&bin, p.args, EXIT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let what = format!("{} [{tc}] {:?}", p.name, p.args);
    assert_eq!(out.status, ExitStatus::Code(0), "{what}: {}", out.stderr);
    assert!(out.stdout.lines().count() >= 2, "{what}: {:?}", out.stdout);
    assert_all_lines_marked(&out.stdout, n, &what);
    out.stdout
}

/// Starts the long-running program, waits for a progress line, asks it to
/// quit on stdin and checks it exits cleanly. Returns its stdout.
fn check_stdin_controlled(
    p: &Program,
    n: u32,
    tc: Toolchain,
    progress: &str,
    before_quit: impl Fn(&ChildGuard),
) -> String {
    let bin = build(p, tc).unwrap_or_else(|e| panic!("{e}"));
    let mut child = spawn::<&str>(&bin, &[]).unwrap_or_else(|e| panic!("{e}"));
    let want = format!("{}{progress}", VersionPair::marker(n));
    child
        .wait_for_line(&format!("starting with {want:?}"), LINE_TIMEOUT, |l| {
            l.starts_with(&want)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    before_quit(&child);
    // Still running: it only stops when told to.
    assert_eq!(child.try_status().unwrap_or_else(|e| panic!("{e}")), None);
    child
        .send_stdin(b"quit\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let out = child.wait(EXIT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let what = format!("{} [{tc}] (long run)", p.name);
    assert_eq!(out.status, ExitStatus::Code(0), "{what}: {}", out.stderr);
    assert_all_lines_marked(&out.stdout, n, &what);
    out.stdout
}

fn last_value(stdout: &str, key: &str) -> i64 {
    stdout
        .lines()
        .rev()
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix(key)))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `{key}<number>` in {stdout:?}"))
}

#[test]
fn catalog_lists_every_pair_with_sources() {
    let pairs = version_pairs();
    let names: Vec<&str> = pairs.iter().map(|p| p.name).collect();
    assert_eq!(
        names,
        [
            "loop_body",
            "deep_frames",
            "main_changes",
            "echo_server",
            "threads8",
            "pool",
            "waiters",
            "struct_insert",
            "struct_reorder",
            "nested_array",
            "array_grew",
            "int_widen",
            "narrow_fits",
            "narrow_overflow",
            "enum_renumber",
            "threads4_local",
            "pointer_to_changed",
            "main_struct_spec",
            "fn_rename",
            "xform_member",
            "txn_safety",
            "callback_other_file",
            "callback_void_ptr",
            "heap_list",
            "heap_tree",
            "heap_shared",
            "chroot_sessions",
            "prefork_server",
            "heap_array",
            "heap_hash",
            "heap_locals",
        ]
    );
    for p in &pairs {
        for v in [&p.v1, &p.v2] {
            assert!(
                v.source.is_file(),
                "{}: missing {}",
                p.name,
                v.source.display()
            );
        }
        let v1 = std::fs::read_to_string(&p.v1.source).unwrap_or_default();
        let v2 = std::fs::read_to_string(&p.v2.source).unwrap_or_default();
        assert_ne!(v1, v2, "{}: v1 and v2 are identical", p.name);
    }
}

#[test]
fn loop_body_runs_until_quit_and_versions_differ() {
    let p = pair("loop_body");
    for tc in Toolchain::ALL {
        let a = check_short_run(&p.v1, 1, tc);
        let b = check_short_run(&p.v2, 2, tc);
        assert!(a.contains("v1 done ticks=5 sum=30"), "{a}");
        assert!(b.contains("v2 done ticks=5 total="), "{b}");
        for n in [1, 2] {
            check_stdin_controlled(version(&p, n), n, tc, "tick 3 ", |_| {});
        }
    }
}

#[test]
fn deep_frames_idles_at_the_bottom_and_result_does_not_depend_on_idle_time() {
    let p = pair("deep_frames");
    for tc in Toolchain::ALL {
        for n in [1, 2] {
            let v = version(&p, n);
            let short = check_short_run(v, n, tc);
            let long = check_stdin_controlled(v, n, tc, "bottom tick 2 ", |_| {});
            // An update while idling lands v2 frames whose result must equal a
            // fresh run's: that needs the result to be independent of idle time.
            assert_eq!(
                last_value(&short, "result="),
                last_value(&long, "result="),
                "{}",
                v.name
            );
        }
        let r1 = last_value(&check_short_run(&p.v1, 1, tc), "result=");
        let r2 = last_value(&check_short_run(&p.v2, 2, tc), "result=");
        assert_ne!(r1, r2, "deep_frames: the versions compute the same result");
    }
}

#[test]
fn main_changes_runs_until_quit_and_versions_differ() {
    let p = pair("main_changes");
    for tc in Toolchain::ALL {
        let a = check_short_run(&p.v1, 1, tc);
        let b = check_short_run(&p.v2, 2, tc);
        assert_ne!(last_value(&a, "acc="), last_value(&b, "acc="));
        assert!(b.contains("bonus=100"), "{b}");
        for n in [1, 2] {
            check_stdin_controlled(version(&p, n), n, tc, "main i=3 ", |_| {});
        }
    }
}

#[test]
fn threads8_all_eight_workers_report_then_quit() {
    let p = pair("threads8");
    for tc in Toolchain::ALL {
        for n in [1, 2] {
            let v = version(&p, n);
            check_short_run(v, n, tc);
            check_stdin_controlled(v, n, tc, "started 8 threads", |child| {
                for id in 0..8 {
                    let want = format!("{}worker {id} step ", VersionPair::marker(n));
                    child
                        .wait_for_line(&format!("from worker {id}"), LINE_TIMEOUT, |l| {
                            l.starts_with(&want)
                        })
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            });
        }
    }
}

/// Talks to a running echo server: returns the replies to `lines`.
fn converse(port: u16, lines: &[&str]) -> Vec<String> {
    let stream =
        TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect {port}: {e}"));
    stream
        .set_read_timeout(Some(LINE_TIMEOUT))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut writer = stream.try_clone().unwrap_or_else(|e| panic!("{e}"));
    let mut reader = BufReader::new(stream);
    lines
        .iter()
        .map(|l| {
            writer
                .write_all(format!("{l}\n").as_bytes())
                .unwrap_or_else(|e| panic!("send: {e}"));
            let mut reply = String::new();
            reader
                .read_line(&mut reply)
                .unwrap_or_else(|e| panic!("recv: {e}"));
            reply.trim_end().to_string()
        })
        .collect()
}

fn start_server(bin: &Path, n: u32) -> (ChildGuard, u16) {
    let child = spawn::<&str>(bin, &[]).unwrap_or_else(|e| panic!("{e}"));
    let want = format!("{}listening port=", VersionPair::marker(n));
    let line = child
        .wait_for_line("with the port", LINE_TIMEOUT, |l| l.starts_with(&want))
        .unwrap_or_else(|e| panic!("{e}"));
    let port = line[want.len()..]
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{line:?}: {e}"));
    (child, port)
}

#[test]
fn echo_server_serves_until_quit_and_reply_format_changes() {
    let p = pair("echo_server");
    assert_eq!(p.control, Control::Tcp);
    for tc in Toolchain::ALL {
        for n in [1, 2] {
            let v = version(&p, n);
            check_short_run(v, n, tc);
            let bin = build(v, tc).unwrap_or_else(|e| panic!("{e}"));
            let (mut child, port) = start_server(&bin, n);
            // Two connections: the server survives a client going away.
            let first = converse(port, &["hello", "dynamic update"]);
            let second = converse(port, &["again", "quit"]);
            let out = child.wait(EXIT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                out.status,
                ExitStatus::Code(0),
                "{}: {}",
                v.name,
                out.stderr
            );
            assert_all_lines_marked(&out.stdout, n, v.name);
            assert!(
                out.stdout
                    .contains(&format!("v{n} exit connections=2 served=3")),
                "{}",
                out.stdout
            );
            if n == 1 {
                assert_eq!(first, ["echo: hello", "echo: dynamic update"]);
                assert_eq!(second, ["echo: again", "bye"]);
            } else {
                assert_eq!(
                    first,
                    [
                        "v2 echo #1 (5 bytes): hello",
                        "v2 echo #2 (14 bytes): dynamic update"
                    ]
                );
                assert_eq!(second, ["v2 echo #3 (5 bytes): again", "v2 bye"]);
            }
        }
    }
}

/// Every `Ticks` pair: both versions, with every toolchain, run their short
/// run to a clean exit, one marked line per tick then `vN done t=6`, and the
/// same lines twice (the typed-update tests compute what each line must be).
#[test]
fn tick_pairs_run_their_ticks_and_are_deterministic() {
    let ticks: Vec<VersionPair> = version_pairs()
        .into_iter()
        .filter(|p| p.control == Control::Ticks)
        .collect();
    assert_eq!(ticks.len(), 22);
    for p in &ticks {
        for tc in Toolchain::ALL {
            for n in [1, 2] {
                let v = version(p, n);
                let a = check_short_run(v, n, tc);
                let b = check_short_run(v, n, tc);
                // The 4 workers' lines interleave freely: compare as sets.
                let sorted = |s: &str| {
                    let mut l: Vec<String> = s.lines().map(str::to_string).collect();
                    l.sort();
                    l
                };
                assert_eq!(
                    sorted(&a),
                    sorted(&b),
                    "{} [{tc}] v{n}: two runs differ",
                    p.name
                );
                let last = a.lines().last().unwrap_or_default();
                if p.name == "threads4_local" {
                    assert_eq!(last, format!("v{n} done workers=4"), "{}", p.name);
                    assert_eq!(a.lines().count(), 4 * 6 + 1, "{a}");
                } else {
                    assert!(
                        last.starts_with(&format!("v{n} done t=6")),
                        "{} [{tc}] v{n}: {a}",
                        p.name
                    );
                    assert_eq!(a.lines().count(), 7, "{} [{tc}]: {a}", p.name);
                }
            }
        }
    }
}
