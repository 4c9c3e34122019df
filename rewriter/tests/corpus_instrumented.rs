//! Every corpus program, instrumented by upstare-rewrite, behaves exactly like
//! the original (stdout, stderr, exit status), for every compiler and PIE
//! combination; and the loaded image is byte-identical.

use object::{Object, ObjectSegment};
use std::time::Duration;
use upstare_corpus::{build, programs};
use upstare_testkit::{run, Toolchain};

#[test]
fn instrumented_corpus_behaves_like_original() {
    let mut compared = 0;
    let mut failures = Vec::new();
    for toolchain in Toolchain::ALL {
        toolchain.require();
        for program in programs() {
            let original = build(&program, toolchain).expect("build corpus program");
            let input = std::fs::read(&original).expect("read binary");
            let rewritten = match upstare_rewriter::rewrite::rewrite(&input) {
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
            let up = original.with_extension("up");
            std::fs::write(&up, &rewritten.elf).expect("write instrumented binary");
            std::fs::set_permissions(
                &up,
                std::fs::metadata(&original).expect("stat").permissions(),
            )
            .expect("chmod");
            assert_same_loaded_image(&input, &rewritten.elf, program.name);
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
