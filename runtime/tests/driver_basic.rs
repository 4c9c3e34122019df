//! `run_with_breakpoints` on single-threaded real programs: hit counts,
//! reading globals and writing registers at hits, every instruction of a
//! function, limits, the three builds, and refusals.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use upstare_dwarf::{LinkAddr, Reg};
use upstare_runtime::*;
use upstare_testkit::{
    run_with_breakpoints, DriverError, Exit, HitAction, HitContext, RunLimits, RunReport, Toolchain,
};

fn run(
    exe: &Path,
    args: &[&str],
    addrs: &[LinkAddr],
    on_hit: impl FnMut(&mut HitContext<'_>) -> HitAction,
) -> RunReport {
    run_with_breakpoints(exe, args, addrs, on_hit, RunLimits::default())
        .unwrap_or_else(|e| panic!("run of {} failed: {e}", exe.display()))
}

/// Parse "before I counter=C" lines.
fn printed_counters(stdout: &str) -> Vec<u32> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("before "))
        .map(|l| l.split("counter=").nth(1).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn function_called_n_times_is_hit_n_times_in_every_build() {
    let d = TempDir::new("calls");
    for (i, build) in [Toolchain::Gcc, Toolchain::GccNoPie, Toolchain::Clang]
        .into_iter()
        .enumerate()
    {
        let exe = compile(&d, &format!("calls{i}"), progs::CALLS, build);
        let work = symbol(&exe, "work");
        let main = symbol(&exe, "main");
        let plain = run_plain(&exe, &["13"]);
        let r = run(&exe, &["13"], &[work, main], |_| HitAction::Continue);
        assert_eq!(r.exit, Exit::Code(0), "{build:?}: {r:?}");
        assert_eq!(r.hits[&work], 13, "{build:?}");
        assert_eq!(r.hits[&main], 1, "{build:?}");
        assert_eq!(
            r.stdout_str(),
            plain.stdout,
            "{build:?}: output changed by tracing"
        );
        assert_eq!(r.threads_seen, 1);
        match build {
            Toolchain::GccNoPie => assert_eq!(r.load_bias.0, 0),
            _ => {
                assert_ne!(
                    r.load_bias.0, 0,
                    "{build:?}: PIE loaded at its link address?"
                );
                assert_eq!(r.load_bias.0 % 4096, 0);
            }
        }
    }
}

#[test]
fn global_read_at_hit_matches_what_the_program_prints() {
    let d = TempDir::new("global");
    let exe = compile(&d, "calls", progs::CALLS, Toolchain::Gcc);
    let work = symbol(&exe, "work");
    let counter = symbol(&exe, "counter");
    let mut seen = Vec::new();
    let r = run(&exe, &["9"], &[work], |ctx| {
        let v = ctx.memory().read_u32(ctx.runtime(counter)).unwrap();
        seen.push(v);
        HitAction::Continue
    });
    let printed = printed_counters(&r.stdout_str());
    assert_eq!(printed, (0..9).collect::<Vec<u32>>());
    assert_eq!(
        seen, printed,
        "value read at the hit differs from the printed one"
    );
}

#[test]
fn writing_rdi_at_entry_changes_the_argument() {
    let d = TempDir::new("rdi");
    let exe = compile(&d, "calls", progs::CALLS, Toolchain::Gcc);
    let work = symbol(&exe, "work");
    let r = run(&exe, &["5"], &[work], |ctx| {
        assert_eq!(ctx.regs.rip(), ctx.addr);
        ctx.regs.set(Reg::Rdi, 100 + ctx.hit);
        HitAction::Continue
    });
    let out = r.stdout_str();
    for i in 0..5u64 {
        let want = format!("work({i})={}\n", 2 * (100 + i + 1));
        assert!(out.contains(&want), "missing {want:?} in\n{out}");
    }
    let total: u64 = (1..=5).map(|k| 100 + k).sum();
    assert!(out.contains(&format!("total={total} counter=5\n")), "{out}");
}

#[test]
fn writing_a_global_at_a_hit_changes_output() {
    let d = TempDir::new("wglobal");
    let exe = compile(&d, "calls", progs::CALLS, Toolchain::Gcc);
    let work = symbol(&exe, "work");
    let counter = symbol(&exe, "counter");
    let r = run(&exe, &["3"], &[work], |ctx| {
        if ctx.hit == 2 {
            let a = ctx.runtime(counter);
            ctx.memory_mut().write_u32(a, 1000).unwrap();
        }
        HitAction::Continue
    });
    assert!(
        r.stdout_str().contains("total=3 counter=1002\n"),
        "{}",
        r.stdout_str()
    );
}

#[test]
fn breakpoint_on_every_instruction_of_a_function() {
    let d = TempDir::new("everyinsn");
    for (i, build) in [Toolchain::Gcc, Toolchain::Clang].into_iter().enumerate() {
        let exe = compile(&d, &format!("calls{i}"), progs::CALLS, build);
        let insns = instructions(&exe, "work");
        let plain = run_plain(&exe, &["6"]);
        let mut order: Vec<LinkAddr> = Vec::new();
        let r = run(&exe, &["6"], &insns, |ctx| {
            // Code read through the context hides our int3s.
            let mut b = [0u8; 1];
            ctx.read_code(ctx.addr, &mut b).unwrap();
            assert_ne!(b[0], 0xcc, "read_code shows an int3 at {}", ctx.addr);
            if ctx.hit == 1 {
                order.push(ctx.link_addr);
            }
            HitAction::Continue
        });
        assert_eq!(r.stdout_str(), plain.stdout, "{build:?}");
        // `work` has no branch: every instruction runs once per call, in
        // address order.
        for a in &insns {
            assert_eq!(r.hits[a], 6, "{build:?}: instruction {a}");
        }
        assert_eq!(order, insns, "{build:?}");
    }
}

#[test]
fn disarm_and_hit_limits_keep_the_program_correct() {
    let d = TempDir::new("limits");
    let exe = compile(&d, "calls", progs::CALLS, Toolchain::Gcc);
    let work = symbol(&exe, "work");
    let main = symbol(&exe, "main");
    let plain = run_plain(&exe, &["20"]);

    let r = run(&exe, &["20"], &[work], |_| HitAction::Disarm);
    assert_eq!(r.hits[&work], 1);
    assert!(!r.hit_limit_reached);
    assert_eq!(r.stdout_str(), plain.stdout);

    let limits = RunLimits {
        max_hits_per_addr: 3,
        ..RunLimits::default()
    };
    let r = run_with_breakpoints(
        &exe,
        &["20"],
        &[work, main],
        |_| HitAction::Continue,
        limits,
    )
    .unwrap();
    assert_eq!(r.hits[&work], 3);
    assert_eq!(r.hits[&main], 1);
    assert!(r.hit_limit_reached);
    assert_eq!(r.stdout_str(), plain.stdout);

    let limits = RunLimits {
        max_total_hits: 4,
        ..RunLimits::default()
    };
    let r = run_with_breakpoints(
        &exe,
        &["20"],
        &[work, main],
        |_| HitAction::Continue,
        limits,
    )
    .unwrap();
    assert_eq!(r.total_hits(), 4);
    assert!(r.hit_limit_reached);
    assert_eq!(r.stdout_str(), plain.stdout);
}

#[test]
fn moving_rip_skips_the_function_body() {
    // At work's entry, return to the caller at once with rax = 77: the
    // program then prints 77 for every call and counts nothing.
    let d = TempDir::new("jump");
    let exe = compile(&d, "calls", progs::CALLS, Toolchain::Gcc);
    let work = symbol(&exe, "work");
    let r = run(&exe, &["3"], &[work], |ctx| {
        let ret = ctx.memory().read_u64(ctx.regs.rsp()).unwrap();
        ctx.regs.set(Reg::Rax, 77);
        ctx.regs.set(Reg::Rip, ret);
        ctx.regs.set(Reg::Rsp, ctx.regs.get(Reg::Rsp) + 8);
        HitAction::Continue
    });
    let out = r.stdout_str();
    assert!(out.contains("work(2)=77\n"), "{out}");
    assert!(out.contains("total=0 counter=0\n"), "{out}");
    assert_eq!(r.hits[&work], 3);
}

#[test]
fn kill_action_ends_the_run() {
    let d = TempDir::new("killact");
    let exe = compile(&d, "calls", progs::CALLS, Toolchain::Gcc);
    let work = symbol(&exe, "work");
    let r = run(&exe, &["50"], &[work], |ctx| {
        if ctx.hit == 3 {
            HitAction::Kill
        } else {
            HitAction::Continue
        }
    });
    assert!(r.killed_on_request);
    assert_eq!(r.exit, Exit::Killed(Sig::KILL));
    assert_eq!(r.hits[&work], 3);
}

#[test]
fn hits_report_the_thread_and_process() {
    let d = TempDir::new("ids");
    let exe = compile(&d, "calls", progs::CALLS, Toolchain::Gcc);
    let work = symbol(&exe, "work");
    let mut ids = BTreeMap::new();
    run(&exe, &["2"], &[work], |ctx| {
        *ids.entry((ctx.pid, ctx.tid)).or_insert(0) += 1;
        HitAction::Continue
    });
    assert_eq!(ids.len(), 1);
    let (&(pid, tid), &n) = ids.iter().next().unwrap();
    assert_eq!(pid, tid, "single-threaded: the main thread hits");
    assert_eq!(n, 2);
}

#[test]
fn refusals_are_clear_errors() {
    let d = TempDir::new("refuse");
    let exe = compile(&d, "calls", progs::CALLS, Toolchain::Gcc);
    let counter = symbol(&exe, "counter");
    // A data address is not code.
    let e = run_with_breakpoints(
        &exe,
        &["1"],
        &[counter],
        |_| HitAction::Continue,
        RunLimits::default(),
    )
    .unwrap_err();
    assert!(
        matches!(e, DriverError::BadAddress { addr, .. } if addr == counter),
        "{e}"
    );
    assert!(e.to_string().contains("not in executable code"), "{e}");

    let missing = d.path().join("no-such-program");
    let e = run_with_breakpoints(
        &missing,
        &[] as &[&str],
        &[],
        |_| HitAction::Continue,
        RunLimits::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("no-such-program"), "{e}");

    let text = d.path().join("calls.c");
    let e = run_with_breakpoints(
        &text,
        &[] as &[&str],
        &[],
        |_| HitAction::Continue,
        RunLimits::default(),
    )
    .unwrap_err();
    assert!(matches!(e, DriverError::NotElf { .. }), "{e}");
}
