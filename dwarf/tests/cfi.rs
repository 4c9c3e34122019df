//! The CFI evaluator on real gcc/clang binaries and on the system's glibc
//! (no frame pointers; `__restore_rt` is a signal frame).

mod common;

use common::{build, code_at, compilers, symbols};
use object::{Object, ObjectSection, ObjectSymbol};
use upstare_dwarf::read::after_prologue;
use upstare_dwarf::{read_program, CfaRule, CfiError, EhFrameIndex, LinkAddr, Reg, RegRule};

const SRC: &str = r#"
#include <stdio.h>
int f(void) { return 1; }
int g(void) { return 2; }
int h(int x) { return x + 3; }
int uses_rbx(int x) { return h(f()) + h(g()) + x; }
int main(void) { printf("%d\n", uses_rbx(1)); return 0; }
"#;

#[test]
fn rows_through_a_gcc_and_clang_function() {
    for cc in compilers() {
        let b = build(cc, "cfi", &[("c.c", SRC)]);
        let p = read_program(&b.bytes).unwrap();
        let idx = EhFrameIndex::from_elf(&b.bytes).unwrap();
        assert!(!idx.is_empty());
        for f in &p.functions {
            // At entry: CFA = rsp+8, return address at CFA-8.
            let entry = idx.unwind_row(f.low).unwrap().expect("FDE at entry");
            assert_eq!(
                entry.cfa,
                CfaRule::RegOffset(Reg::Rsp, 8),
                "{cc:?} {}",
                f.name
            );
            assert_eq!(entry.rule(Reg::Rip), Some(&RegRule::Offset(-8)));
            assert!(!entry.is_signal_frame);
            // After `push rbp` (1 byte): CFA = rsp+16, rbp saved at CFA-16.
            assert_eq!(code_at(&b.bytes, f.low.0, 1), [0x55], "{cc:?}: push rbp");
            let pushed = idx.unwind_row(LinkAddr(f.low.0 + 1)).unwrap().unwrap();
            assert_eq!(
                pushed.cfa,
                CfaRule::RegOffset(Reg::Rsp, 16),
                "{cc:?} {}",
                f.name
            );
            assert_eq!(pushed.rule(Reg::Rbp), Some(&RegRule::Offset(-16)));
            // In the body: CFA = rbp+16.
            let body = idx
                .unwind_row(after_prologue(&p, f).unwrap())
                .unwrap()
                .unwrap();
            assert_eq!(
                body.cfa,
                CfaRule::RegOffset(Reg::Rbp, 16),
                "{cc:?} {}",
                f.name
            );
            assert_eq!(body.rule(Reg::Rbp), Some(&RegRule::Offset(-16)));
            // At the final `ret`: back to rsp+8.
            assert_eq!(code_at(&b.bytes, f.high.0 - 1, 1), [0xc3], "{cc:?}: ret");
            let ret = idx.unwind_row(LinkAddr(f.high.0 - 1)).unwrap().unwrap();
            assert_eq!(
                ret.cfa,
                CfaRule::RegOffset(Reg::Rsp, 8),
                "{cc:?} {}",
                f.name
            );
            assert_eq!(
                idx.fde_range(f.low),
                Some((f.low, f.high)),
                "{cc:?} {}: one FDE per function",
                f.name
            );
        }
        // No FDE outside code.
        assert_eq!(idx.unwind_row(LinkAddr(0)).unwrap(), None);
        assert_eq!(idx.unwind_row(LinkAddr(u64::MAX)).unwrap(), None);
    }
}

#[test]
fn refuses_non_elf() {
    assert!(matches!(
        EhFrameIndex::from_elf(b"not an elf at all"),
        Err(CfiError::Elf(_))
    ));
}

/// Where glibc is on this (Debian) machine.
fn libc() -> Option<Vec<u8>> {
    [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
    ]
    .iter()
    .find_map(|p| std::fs::read(p).ok())
}

#[test]
fn glibc_functions_and_the_signal_trampoline() {
    let Some(bytes) = libc() else {
        panic!("glibc not found at /lib/x86_64-linux-gnu/libc.so.6 or /usr/lib/x86_64-linux-gnu/libc.so.6; this test needs it");
    };
    let idx = EhFrameIndex::from_elf(&bytes).unwrap();
    assert!(
        idx.len() > 1000,
        "glibc has thousands of FDEs: {}",
        idx.len()
    );
    let file = object::File::parse(&*bytes).unwrap();
    // Exported functions: CFA = rsp+8 at entry, like every x86-64 function.
    let mut checked = 0;
    for name in [
        "read",
        "write",
        "nanosleep",
        "poll",
        "memcpy",
        "pthread_mutex_lock",
    ] {
        let Some(sym) = file.dynamic_symbols().find(|s| s.name() == Ok(name)) else {
            continue;
        };
        let row = idx
            .unwind_row(LinkAddr(sym.address()))
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: no FDE"));
        assert_eq!(row.cfa, CfaRule::RegOffset(Reg::Rsp, 8), "{name}");
        assert_eq!(row.rule(Reg::Rip), Some(&RegRule::Offset(-8)), "{name}");
        assert!(!row.is_signal_frame);
        checked += 1;
    }
    assert!(checked >= 4);
    // __restore_rt is not exported: find `mov rax,15; syscall` (rt_sigreturn).
    let text = file.section_by_name(".text").unwrap();
    let data = text.data().unwrap();
    let pat = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];
    let pos = data
        .windows(pat.len())
        .position(|w| w == pat)
        .expect("rt_sigreturn trampoline");
    let pc = LinkAddr(text.address() + pos as u64);
    let row = idx.unwind_row(pc).unwrap().expect("__restore_rt has CFI");
    assert!(row.is_signal_frame, "'S' augmentation");
    // CFA = *(rsp + 160) (facts §7): DW_OP_breg7 160, DW_OP_deref.
    assert_eq!(row.cfa, CfaRule::Expression(vec![0x77, 0xa0, 0x01, 0x06]));
    // Registers come from the ucontext: expressions, r8 at rsp+40.
    assert_eq!(
        row.rule(Reg::R8),
        Some(&RegRule::Expression(vec![0x77, 0x28])),
        "r8 at rsp+40"
    );
    assert!(matches!(row.rule(Reg::Rip), Some(RegRule::Expression(_))));
}

#[test]
fn saved_regs_use_the_same_evaluator() {
    let b = build(common::Toolchain::Gcc, "cfisaved", &[("c.c", SRC)]);
    let p = read_program(&b.bytes).unwrap();
    let idx = EhFrameIndex::from_elf(&b.bytes).unwrap();
    let syms = symbols(&b.bytes);
    let f = p.function("uses_rbx").unwrap();
    assert_eq!(common::symbol(&syms, "uses_rbx").addr, f.low.0);
    let row = idx
        .unwind_row(after_prologue(&p, f).unwrap())
        .unwrap()
        .unwrap();
    for s in &f.saved_regs {
        assert_eq!(row.rule(s.reg), Some(&RegRule::Offset(s.offset.0)));
    }
    assert_eq!(f.saved_regs.len(), 2, "rbp and rbx: {:?}", f.saved_regs);
}

/// The runtime calls the evaluator directly (no panic guard): a corrupt
/// `.eh_frame` must give errors, never a panic.
#[test]
fn mutated_eh_frame_never_panics() {
    let b = build(common::Toolchain::Gcc, "cfifuzz", &[("c.c", SRC)]);
    let file = object::File::parse(&*b.bytes).unwrap();
    let sec = file.section_by_name(".eh_frame").unwrap();
    let (off, len) = sec.file_range().unwrap();
    let (off, len) = (off as usize, len as usize);
    let p = read_program(&b.bytes).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut ok, mut err) = (0, 0);
    for _ in 0..2000 {
        let mut m = b.bytes.clone();
        for _ in 0..1 + next() % 3 {
            let at = off + (next() as usize) % len;
            m[at] = next() as u8;
        }
        match EhFrameIndex::from_elf(&m) {
            Err(e) => {
                assert!(!e.to_string().contains('\n'));
                err += 1;
            }
            Ok(idx) => {
                for f in &p.functions {
                    for pc in [f.low.0, f.low.0 + 1, f.low.0 + 4, f.high.0 - 1] {
                        match idx.unwind_row(LinkAddr(pc)) {
                            Ok(_) => ok += 1,
                            Err(_) => err += 1,
                        }
                    }
                }
            }
        }
    }
    assert!(ok > 0 && err > 0, "ok {ok} err {err}");
}
