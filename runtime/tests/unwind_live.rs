//! The unwinder on a live thread blocked in libc's read: library frames by
//! CFI (libc has no frame pointer), then the rbp chain, with callee-saved
//! values recovered at each frame (gcc keeps call results in rbx across
//! the next call of the same expression).

mod stop_support;

use std::time::Duration;
use stop_support::*;
use upstare_dwarf::fdt::Callee;
use upstare_dwarf::Reg;
use upstare_runtime::engine::unwind::{Top, Unwinder};
use upstare_testkit::{ExitStatus, Toolchain};

const PROG: &str = r#"
#include <stdio.h>
#include <unistd.h>

long k(void)
{
    return 0x123456789;
}

long k2(void)
{
    return 0x7654321ab;
}

long g(void)
{
    char c;
    printf("F g %lx\n", (unsigned long)__builtin_frame_address(0));
    fflush(stdout);
    return k2() + read(0, &c, 1);
}

int main(void)
{
    printf("F main %lx\n", (unsigned long)__builtin_frame_address(0));
    printf("ready\n");
    fflush(stdout);
    long v = k() + g();
    printf("v %lx\n", v);
    return 0;
}
"#;

fn addr(out: &str, name: &str) -> u64 {
    let tag = format!("F {name} ");
    let l = out
        .lines()
        .find_map(|l| l.strip_prefix(&tag))
        .unwrap_or_else(|| panic!("no {tag:?}"));
    u64::from_str_radix(l, 16).unwrap()
}

#[test]
fn library_frames_by_cfi_then_the_rbp_chain_with_callee_saved_values() {
    let d = TempDir::new("unwind");
    let exe = build(&d, "regs", PROG, Toolchain::Gcc);
    let mut child = start(&exe, &[], "ready");
    let pid = pid_of(&child);
    child
        .wait_for_line("g's frame", Duration::from_secs(20), |l| {
            l.starts_with("F g ")
        })
        .unwrap();
    wait_sleeping(pid, &[pid]);
    let out = child.stdout_so_far();
    let (tracee, image, libs) = seize(&child);
    let regs = tracee.regs(pid).unwrap();
    let mem = tracee.memory();
    let u = Unwinder::new(&image, &libs, &mem)
        .unwind(pid, &regs)
        .unwrap_or_else(|e| panic!("{e}"));

    let Top::InLibrary { frames, call } = &u.top else {
        panic!("not in a library: {:?}", u.top);
    };
    assert_eq!(call.callee, Callee::Plt("read".into()));
    assert_eq!(frames[0].symbol.as_deref(), Some("read"));
    assert!(frames[0].library.contains("libc"), "{}", frames[0].library);
    // read's CFA is g's rsp at the call.
    assert_eq!(
        frames.last().unwrap().cfa.0,
        u.frames[0].cfa.0.wrapping_add_signed(call.stack_depth.0)
    );

    let ids: Vec<String> = u
        .frames
        .iter()
        .map(|f| format!("{}@{}", f.function, f.continuation))
        .collect();
    assert_eq!(ids, ["g@call:read#0", "main@call:g#0"]);
    assert_eq!(u.frames[0].cfa.0, addr(&out, "g") + 16);
    assert_eq!(u.frames[1].cfa.0, addr(&out, "main") + 16);
    // g holds k2()'s result in rbx across read; main holds k()'s across g,
    // saved by g's prologue.
    assert!(call.live_regs.contains(&Reg::Rbx), "{call:?}");
    assert_eq!(u.frames[0].callee_saved[&Reg::Rbx], 0x7654321ab);
    assert_eq!(u.frames[1].callee_saved[&Reg::Rbx], 0x123456789);
    tracee.detach().unwrap();

    child.send_stdin(b"x").unwrap();
    let out = child.wait(Duration::from_secs(30)).unwrap();
    assert_eq!(out.status, ExitStatus::Code(0), "{}", out.stderr);
    assert!(out.stdout.ends_with("v 888888935\n"), "{}", out.stdout);
}
