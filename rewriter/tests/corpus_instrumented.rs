//! Every corpus program, instrumented by upstare-rewrite, behaves exactly like
//! the original (stdout, stderr, exit status), for every compiler and PIE
//! combination; and the loaded image is byte-identical. With
//! `--inline-points` the same output, and the original segments differ
//! only by the detours the tables list, each a `jmp` to its trampoline.

use object::{Object, ObjectSegment};
use std::time::Duration;
use upstare_corpus::{build, programs};
use upstare_dwarf::fdt::{Arming, InlinePoints};
use upstare_rewriter::rewrite::{rewrite_with, PointsMode};
use upstare_testkit::{run, Toolchain};

#[test]
fn instrumented_corpus_behaves_like_original() {
    corpus_behaves_like_original(PointsMode::Int3);
}

#[test]
fn inline_points_corpus_behaves_like_original() {
    corpus_behaves_like_original(PointsMode::Inline);
}

fn corpus_behaves_like_original(mode: PointsMode) {
    let (mut points, mut detoured) = (0usize, 0usize);
    // Displaced instructions with a RIP-relative operand (relocated by the
    // BlockEncoder): the test must cover some.
    let mut rip_relative = 0usize;
    let mut compared = 0;
    let mut failures = Vec::new();
    for toolchain in Toolchain::ALL {
        toolchain.require();
        for program in programs() {
            let original = build(&program, toolchain).expect("build corpus program");
            let input = std::fs::read(&original).expect("read binary");
            let rewritten = match rewrite_with(&input, mode) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!(
                        "{} [{}]: rewrite failed: {e}",
                        program.name,
                        toolchain.name()
                    ));
                    continue;
                }
            };
            let up = original.with_extension(match mode {
                PointsMode::Int3 => "up",
                PointsMode::Inline => "inline.up",
            });
            std::fs::write(&up, &rewritten.elf).expect("write instrumented binary");
            std::fs::set_permissions(
                &up,
                std::fs::metadata(&original).expect("stat").permissions(),
            )
            .expect("chmod");
            match &rewritten.tables.arming {
                Arming::Int3 => assert_same_loaded_image(&input, &rewritten.elf, program.name),
                Arming::Inline(inline) => {
                    assert_only_detours_changed(&input, &rewritten.elf, inline, program.name);
                    // Read back from the trampolines (what `--dump --notes`
                    // analyzes), the code is the compiler's again.
                    let restored =
                        upstare_rewriter::inline::restore_original(&rewritten.elf, inline)
                            .expect("restore the original code");
                    assert_only_detours_changed(
                        &input,
                        &restored,
                        &InlinePoints::default(),
                        program.name,
                    );
                    detoured += inline.detours.len();
                    rip_relative += rip_relative_displaced(&input, inline);
                    // `--dump` shows the mode and each point's detour.
                    let shown = upstare_rewriter::dump::render(&rewritten.tables, &[]);
                    assert!(shown.contains("arming: --inline-points"), "{shown}");
                    let lines = shown
                        .lines()
                        .filter(|l| l.contains(" detour trap "))
                        .count();
                    assert!(
                        lines >= inline.detours.len(),
                        "{}: {lines} detour lines",
                        program.name
                    );
                    points += rewritten
                        .tables
                        .functions
                        .iter()
                        .map(|f| f.update_points.len())
                        .sum::<usize>();
                }
            }
            let timeout = Duration::from_secs(20);
            let a = run(&original, program.args, timeout).expect("run original");
            let b = run(&up, program.args, timeout).expect("run instrumented");
            assert_eq!(
                a.status.code(),
                Some(program.expected_exit),
                "{} [{}]: original exited unexpectedly: {}",
                program.name,
                toolchain.name(),
                a.stderr
            );
            if program.deterministic && a != b {
                failures.push(format!(
                    "{} [{}]: instrumented output differs\n--- original\n{}{}\n--- instrumented\n{}{}",
                    program.name,
                    toolchain.name(),
                    a.stdout,
                    a.stderr,
                    b.stdout,
                    b.stderr
                ));
            }
            if !program.deterministic && a.status != b.status {
                failures.push(format!(
                    "{} [{}]: exit status differs",
                    program.name,
                    toolchain.name()
                ));
            }
            compared += 1;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(compared >= 45, "only {compared} program builds compared");
    println!("compared {compared} instrumented program builds with their originals");
    if mode == PointsMode::Inline {
        println!(
            "inline points: {detoured} of {points} update points detoured, \
             {rip_relative} RIP-relative instructions relocated"
        );
        assert!(
            rip_relative > 20,
            "only {rip_relative} RIP-relative displaced"
        );
        assert!(
            detoured * 2 >= points,
            "only {detoured} of {points} detoured"
        );
    }
}

/// How many of the instructions the detours of `inline` displace (decoded
/// from the original binary `elf`) have a RIP-relative operand.
fn rip_relative_displaced(elf: &[u8], inline: &InlinePoints) -> usize {
    let file = object::File::parse(elf).expect("parse original");
    let mut n = 0;
    for d in &inline.detours {
        let seg = file
            .segments()
            .find(|s| s.address() <= d.point.0 && d.point.0 < s.address() + s.size())
            .expect("point's segment");
        let data = seg.data().expect("data");
        let at = (d.point.0 - seg.address()) as usize;
        let code = &data[at..at + usize::from(d.displaced)];
        let mut dec = iced_x86::Decoder::with_ip(64, code, d.point.0, 0);
        while dec.can_decode() {
            n += usize::from(dec.decode().is_ip_rel_memory_operand());
        }
    }
    n
}

/// The original segments keep their place and size; their bytes differ
/// only at detoured points, each `jmp rel32` to its trampoline (its
/// `int3` 9 bytes in) followed by `int3` filler over the rest of the
/// displaced instructions.
fn assert_only_detours_changed(a: &[u8], b: &[u8], inline: &InlinePoints, name: &str) {
    let fa = object::File::parse(a).expect("parse original");
    let fb = object::File::parse(b).expect("parse instrumented");
    let segs = |f: &object::File<'_>| -> Vec<(u64, u64)> {
        f.segments().map(|s| (s.address(), s.size())).collect()
    };
    let (sa, sb) = (segs(&fa), segs(&fb));
    assert_eq!(sb.len(), sa.len() + 2, "{name}: two new segments");
    for s in &sa {
        assert!(sb.contains(s), "{name}: segment {s:x?} moved or resized");
    }
    let detour_at = |addr: u64| {
        inline
            .detours
            .iter()
            .find(|d| d.point.0 <= addr && addr < d.point.0 + u64::from(d.displaced))
    };
    let mut patched = 0usize;
    for x in fa.segments() {
        let y = fb
            .segments()
            .find(|y| y.address() == x.address())
            .expect("same segment");
        let (dx, dy) = (x.data().expect("data"), y.data().expect("data"));
        assert_eq!(dx.len(), dy.len(), "{name}: segment file size");
        for (i, (p, q)) in dx.iter().zip(dy).enumerate() {
            let addr = x.address() + i as u64;
            let header = x.file_range().0 == 0 && (0x20..0x40).contains(&i);
            if p == q || header {
                continue;
            }
            let d = detour_at(addr)
                .unwrap_or_else(|| panic!("{name}: byte at {addr:#x} changed outside a detour"));
            let off = addr - d.point.0;
            if off == 0 {
                let rel = i32::from_le_bytes(dy[i + 1..i + 5].try_into().expect("rel32"));
                let target = (d.point.0 + 5).wrapping_add_signed(i64::from(rel));
                assert_eq!(*q, 0xe9, "{name}: detour at {} is no jmp", d.point);
                assert_eq!(
                    target + 9,
                    d.trap.0,
                    "{name}: detour at {} jumps elsewhere",
                    d.point
                );
                patched += 1;
            } else if off >= 5 {
                assert_eq!(*q, 0xcc, "{name}: filler at {addr:#x}");
            }
        }
    }
    assert_eq!(patched, inline.detours.len(), "{name}: detours written");
    let notes = |elf: &[u8]| upstare_rewriter::rewrite::analysis_notes(elf).expect("notes");
    if inline.detours.is_empty() {
        return;
    }
    assert_eq!(
        notes(b),
        notes(a),
        "{name}: analysis notes of the rewritten binary"
    );
}

/// Every loaded segment has the same address, size and bytes.
fn assert_same_loaded_image(a: &[u8], b: &[u8], name: &str) {
    let fa = object::File::parse(a).expect("parse original");
    let fb = object::File::parse(b).expect("parse instrumented");
    let sa: Vec<_> = fa
        .segments()
        .map(|s| (s.address(), s.size(), s.file_range()))
        .collect();
    let sb: Vec<_> = fb
        .segments()
        .map(|s| (s.address(), s.size(), s.file_range()))
        .collect();
    assert_eq!(sa, sb, "{name}: segment layout changed");
    for (x, y) in fa.segments().zip(fb.segments()) {
        let (dx, dy) = (x.data().expect("data"), y.data().expect("data"));
        // The ELF header's e_shoff/e_shnum (0x28..0x40) may differ; nothing else.
        let differs = dx
            .iter()
            .zip(dy)
            .enumerate()
            .any(|(i, (p, q))| p != q && !(x.file_range().0 == 0 && (0x28..0x40).contains(&i)));
        assert!(
            !differs,
            "{name}: loaded bytes of segment at {:#x} changed",
            x.address()
        );
    }
}

/// `upstare-rewrite --inline-points` reports what it did: the text names
/// every point that keeps `int3` with its reason, `--json` gives the count
/// of detours and every kept point; detoured and kept points together are
/// all the update points, and the output's tables agree.
#[test]
fn inline_points_cli_lists_every_point_that_keeps_int3() {
    Toolchain::Gcc.require();
    let dir = upstare_testkit::TempDir::new("inline-cli");
    // matrix has points that keep int3 (a block start right after a short
    // first instruction).
    let p = upstare_corpus::program("matrix").expect("matrix");
    let bin = build(&p, Toolchain::Gcc).expect("build");
    let run_cli = |extra: &[&str], out: &str| {
        let r = std::process::Command::new(env!("CARGO_BIN_EXE_upstare-rewrite"))
            .arg(&bin)
            .arg("-o")
            .arg(dir.path().join(out))
            .arg("--inline-points")
            .args(extra)
            .output()
            .expect("run upstare-rewrite");
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        String::from_utf8(r.stdout).expect("utf-8")
    };
    let json: serde_json::Value =
        serde_json::from_str(&run_cli(&["--json"], "m.json.up")).expect("json");
    let text = run_cli(&[], "m.text.up");
    let bytes = std::fs::read(dir.path().join("m.json.up")).expect("read output");
    let tables = upstare_dwarf::read_tables(&bytes).expect("tables");
    let Arming::Inline(inline) = &tables.arming else {
        panic!("not inline");
    };
    let mut points: Vec<u64> = tables
        .functions
        .iter()
        .flat_map(|f| f.update_points.iter().map(|p| p.addr.0))
        .collect();
    points.sort_unstable();
    points.dedup();
    let kept = json["inline_points"]["kept_int3"]
        .as_array()
        .expect("kept list");
    assert_eq!(
        json["inline_points"]["detoured"].as_u64(),
        Some(inline.detours.len() as u64)
    );
    assert!(!kept.is_empty(), "matrix keeps some int3 points");
    assert_eq!(inline.detours.len() + kept.len(), points.len());
    for k in kept {
        let at = k["point"].as_u64().expect("point");
        assert!(points.contains(&at) && inline.detour_at(upstare_dwarf::LinkAddr(at)).is_none());
        assert!(k["function"].is_string() && !k["reason"].is_null(), "{k}");
    }
    assert!(
        text.contains(&format!(
            "inline points: {} of {} update points detoured to trampolines, {} keep int3",
            inline.detours.len(),
            points.len(),
            kept.len()
        )),
        "{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.contains(" cannot be displaced")
                || l.contains(" inside the displaced bytes")
                || l.contains("function's end"))
            .count(),
        kept.len(),
        "{text}"
    );
}
