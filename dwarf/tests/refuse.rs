//! Bad input gets a clear one-line error, never a panic.

mod common;

use common::{build, Toolchain};
use std::process::Command;
use upstare_dwarf::{read_program, ReadError};

const SRC: &str = "#include <stdio.h>\nint sq(int x) { return x * x; }\n\
                   int main(void) { printf(\"%d\\n\", sq(3)); return 0; }\n";

/// Deterministic xorshift, so a failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn one_line(e: &ReadError) -> String {
    let s = e.to_string();
    assert!(!s.contains('\n') && !s.is_empty(), "not one line: {s:?}");
    s
}

#[test]
fn random_bytes_are_not_elf() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let bytes: Vec<u8> = (0..4096).map(|_| rng.next() as u8).collect();
    let e = read_program(&bytes).unwrap_err();
    assert!(matches!(e, ReadError::NotElf(_)), "{e}");
    assert!(one_line(&e).contains("not an ELF"));
    assert!(matches!(
        read_program(&[]).unwrap_err(),
        ReadError::NotElf(_)
    ));
    assert!(matches!(
        read_program(b"\x7fEL").unwrap_err(),
        ReadError::NotElf(_)
    ));
}

#[test]
fn truncated_elf() {
    let b = build(Toolchain::Gcc, "trunc", &[("t.c", SRC)]);
    let e = read_program(&b.bytes[..40]).unwrap_err();
    assert!(matches!(e, ReadError::Truncated { len: 40 }), "{e}");
    assert!(one_line(&e).contains("truncated"));
    // Header intact, section headers (at the end of the file) cut off.
    let e = read_program(&b.bytes[..b.bytes.len() / 2]).unwrap_err();
    assert!(matches!(e, ReadError::CorruptElf(_)), "{e}");
    assert!(one_line(&e).contains("corrupt or truncated ELF"));
}

#[test]
fn foreign_machines_are_named() {
    let b = build(Toolchain::Gcc, "machine", &[("m.c", SRC)]);
    let mut arm = b.bytes.clone();
    arm[18..20].copy_from_slice(&40u16.to_le_bytes());
    let e = read_program(&arm).unwrap_err();
    assert!(
        matches!(
            e,
            ReadError::NotX86_64 {
                class: 64,
                machine: 40,
                name: "ARM"
            }
        ),
        "{e}"
    );
    assert!(one_line(&e).contains("ARM"));
    let mut aarch64 = b.bytes.clone();
    aarch64[18..20].copy_from_slice(&183u16.to_le_bytes());
    assert!(one_line(&read_program(&aarch64).unwrap_err()).contains("AArch64"));
    // An i386-like header: ELFCLASS32, EM_386.
    let mut i386 = b.bytes.clone();
    i386[4] = 1;
    i386[18..20].copy_from_slice(&3u16.to_le_bytes());
    let e = read_program(&i386).unwrap_err();
    assert!(
        matches!(
            e,
            ReadError::NotX86_64 {
                class: 32,
                machine: 3,
                ..
            }
        ),
        "{e}"
    );
    assert!(one_line(&e).contains("i386"));
    let mut be = b.bytes.clone();
    be[5] = 2;
    assert!(matches!(
        read_program(&be).unwrap_err(),
        ReadError::BigEndian { .. }
    ));
}

#[test]
fn stripped_binaries_have_no_dwarf() {
    common::require_tool("strip");
    for args in [&["--strip-debug"][..], &[][..]] {
        let b = build(Toolchain::Gcc, "strip", &[("s.c", SRC)]);
        let out = b.dir.join("stripped");
        let st = Command::new("strip")
            .args(args)
            .arg("-o")
            .arg(&out)
            .arg(&b.exe)
            .status()
            .unwrap();
        assert!(st.success());
        let e = read_program(&std::fs::read(&out).unwrap()).unwrap_err();
        assert!(matches!(e, ReadError::NoDebugInfo), "{args:?}: {e}");
        assert!(one_line(&e).contains(".debug_info"));
    }
}

/// Corrupting bytes anywhere (DWARF, CFI, headers) or truncating the file
/// yields `Ok` or a `ReadError`, never a panic (which `read_program` would
/// report as `Internal`).
#[test]
fn mutated_binaries_never_panic() {
    Toolchain::Clang.require();
    let configs = vec![Toolchain::Gcc, Toolchain::Clang];
    for cc in configs {
        let b = build(cc, "fuzz", &[("f.c", SRC)]);
        let file = object::File::parse(&*b.bytes).unwrap();
        // Target the sections the reader parses, where mutations matter.
        let mut ranges = Vec::new();
        for name in [
            ".debug_info",
            ".debug_abbrev",
            ".debug_line",
            ".debug_str",
            ".debug_line_str",
            ".debug_addr",
            ".debug_rnglists",
            ".debug_loclists",
            ".debug_str_offsets",
            ".eh_frame",
            ".eh_frame_hdr",
        ] {
            use object::{Object, ObjectSection};
            if let Some((off, len)) = file.section_by_name(name).and_then(|s| s.file_range()) {
                ranges.push((off as usize, len as usize));
            }
        }
        assert!(ranges.len() >= 5, "{cc:?}: {ranges:?}");
        let mut rng = Rng(0xdead_beef_cafe_f00d);
        let mut outcomes = std::collections::BTreeMap::new();
        let mut naming_function = 0;
        for i in 0..3000 {
            let mut m = b.bytes.clone();
            if i % 10 == 9 {
                m.truncate(rng.below(m.len()));
            } else {
                let (off, len) = ranges[rng.below(ranges.len())];
                for _ in 0..1 + rng.below(4) {
                    let at = off + rng.below(len.max(1));
                    m[at] = match rng.below(3) {
                        0 => rng.next() as u8,
                        1 => 0xff,
                        _ => m[at] ^ (1 << rng.below(8)),
                    };
                }
            }
            let r = read_program(&m);
            if let Err(ReadError::Internal(msg)) = &r {
                panic!("{cc:?} iteration {i}: panic inside the reader: {msg}");
            }
            let (key, msg) = match &r {
                Ok(_) => ("ok".to_string(), String::new()),
                Err(e) => (
                    format!("{e:?}")
                        .split(['(', ' ', '{'])
                        .next()
                        .unwrap()
                        .to_string(),
                    one_line(e),
                ),
            };
            if msg.contains("in function `") {
                naming_function += 1;
            }
            outcomes.entry(key).or_insert((0, msg)).0 += 1;
        }
        for (k, (n, example)) in &outcomes {
            eprintln!("{cc:?}: {n:5} x {k}  e.g. {example}");
        }
        assert!(
            outcomes.len() > 2,
            "mutations should produce several outcomes"
        );
        // Errors inside a function's DIEs name the function.
        assert!(naming_function > 0, "{cc:?}: no error named its function");
    }
}
