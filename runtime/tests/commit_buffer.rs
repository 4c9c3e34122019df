//! The commit of an update as a transaction, on byte buffers: every write
//! and register set lands, or — with a fault injected at any step — none
//! does and the target is byte for byte and register for register as it was.

use nix::unistd::Pid;
use upstare_dwarf::RuntimeAddr;
use upstare_runtime::engine::Write;
use upstare_runtime::update::transaction::{
    commit, commit_with, CommitError, CommitMode, PreparedState, RegisterFile,
};
use upstare_runtime::{ByteBuffer, Regs, TargetMemory};

const DATA: u64 = 0x10_000;
const T100: Pid = Pid::from_raw(100);
const T101: Pid = Pid::from_raw(101);
const STACK: u64 = 0x7ff0_0000;

fn target() -> (ByteBuffer, RegisterFile) {
    let mut mem = ByteBuffer::with_region(RuntimeAddr(DATA), (0..=255u8).collect()).expect("data");
    mem.add_region(RuntimeAddr(STACK), vec![0x11; 512])
        .expect("stack");
    let mut regs = RegisterFile::default();
    for (tid, rip) in [(T100, 0x1000), (T101, 0x2000)] {
        let mut r = Regs::zeroed();
        r.0.rip = rip;
        r.0.rsp = STACK + 256;
        regs.threads.insert(tid, r);
    }
    (mem, regs)
}

fn write(addr: u64, bytes: &[u8], what: &str) -> Write {
    Write {
        addr: RuntimeAddr(addr),
        bytes: bytes.to_vec(),
        what: what.into(),
    }
}

fn snapshot(mem: &ByteBuffer) -> Vec<(RuntimeAddr, Vec<u8>)> {
    mem.regions().map(|(a, b)| (a, b.to_vec())).collect()
}

fn new_regs(rip: u64) -> Regs {
    let mut r = Regs::zeroed();
    r.0.rip = rip;
    r
}

fn prepared() -> PreparedState {
    PreparedState {
        writes: vec![
            write(DATA + 8, &[0xaa; 8], "global counter"),
            write(STACK + 16, &[0xbb; 64], "thread 100 frame main"),
            // Overlaps the first write: the undo log must restore in reverse.
            write(DATA + 12, &[0xcc; 8], "global other"),
        ],
        regs: vec![(T100, new_regs(0x5000)), (T101, new_regs(0x6000))],
    }
}

#[test]
fn a_commit_writes_everything_in_order_and_sets_every_thread() {
    let (mut mem, mut regs) = target();
    let undo = commit(&prepared(), &mut mem, &mut regs).expect("commit");
    // Two ranges (the overlapping globals are one) and two register sets.
    assert_eq!(undo.len(), 4);
    assert_eq!(
        mem.read_vec(RuntimeAddr(DATA + 8), 12, 64).expect("read"),
        [0xaa, 0xaa, 0xaa, 0xaa, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc]
    );
    assert_eq!(
        mem.read_vec(RuntimeAddr(STACK + 16), 64, 64).expect("read"),
        [0xbb; 64]
    );
    assert_eq!(regs.threads[&T100].0.rip, 0x5000);
    assert_eq!(regs.threads[&T101].0.rip, 0x6000);
}

#[test]
fn rolling_back_a_commit_restores_every_byte_and_register() {
    let (mut mem, mut regs) = target();
    let (mem0, regs0) = (snapshot(&mem), regs.clone());
    let undo = commit(&prepared(), &mut mem, &mut regs).expect("commit");
    undo.roll_back(&mut mem, &mut regs);
    assert_eq!(snapshot(&mem), mem0);
    assert_eq!(regs, regs0);
}

#[test]
fn a_write_that_fails_part_way_leaves_the_target_as_it_was() {
    // Fault injected at each write position in turn.
    for at in 0..=3 {
        let (mut mem, mut regs) = target();
        let (mem0, regs0) = (snapshot(&mem), regs.clone());
        let mut state = prepared();
        state
            .writes
            .insert(at, write(0xdead_0000, &[1, 2, 3], "global unmapped"));
        match commit(&state, &mut mem, &mut regs) {
            Err(e @ CommitError::Memory { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("global unmapped") && msg.contains("rolled back"),
                    "{msg}"
                );
            }
            other => panic!("fault at {at}: {other:?}"),
        }
        assert_eq!(snapshot(&mem), mem0, "memory after a fault at write {at}");
        assert_eq!(regs, regs0, "registers after a fault at write {at}");
    }
}

#[test]
fn a_thread_whose_registers_cannot_be_set_rolls_back_memory_and_other_threads() {
    let (mut mem, mut regs) = target();
    let (mem0, regs0) = (snapshot(&mem), regs.clone());
    let mut state = prepared();
    state.regs.push((Pid::from_raw(999), new_regs(0x7000)));
    match commit(&state, &mut mem, &mut regs) {
        Err(e @ CommitError::Registers { tid, .. }) if tid.as_raw() == 999 => {
            assert!(e.to_string().contains("thread 999"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(snapshot(&mem), mem0);
    assert_eq!(regs, regs0);
}

/// A pseudo-random sequence (xorshift), so the cases are the same each run.
fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Many small writes, overlapping, adjacent or a few bytes apart, over both
/// regions (a stack frame's locals, a run of globals).
fn many_writes(seed: &mut u64, n: usize) -> Vec<Write> {
    (0..n)
        .map(|i| {
            let (base, size) = if rng(seed).is_multiple_of(2) {
                (DATA, 256)
            } else {
                (STACK, 512)
            };
            let len = 1 + rng(seed) % 16;
            let off = rng(seed) % (size - len);
            let byte = (rng(seed) & 0xff) as u8;
            write(base + off, &vec![byte; len as usize], &format!("write {i}"))
        })
        .collect()
}

#[test]
fn batched_and_one_by_one_commits_leave_the_same_bytes_and_roll_back_alike() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for case in 0..200 {
        let n = 1 + (rng(&mut seed) % 40) as usize;
        let state = PreparedState {
            writes: many_writes(&mut seed, n),
            regs: vec![(T100, new_regs(0x5000))],
        };
        let (mut a, mut ra) = target();
        let (mut b, mut rb) = target();
        let (mem0, regs0) = (snapshot(&a), ra.clone());
        let ua = commit_with(&state, &mut a, &mut ra, CommitMode::OneByOne).expect("one by one");
        let ub = commit_with(&state, &mut b, &mut rb, CommitMode::Batched).expect("batched");
        assert_eq!(snapshot(&a), snapshot(&b), "case {case}: bytes");
        assert_eq!(ra, rb, "case {case}: registers");
        assert!(
            ub.len() <= ua.len(),
            "case {case}: batching made more steps"
        );
        ub.roll_back(&mut b, &mut rb);
        assert_eq!(snapshot(&b), mem0, "case {case}: rolled-back bytes");
        assert_eq!(rb, regs0, "case {case}: rolled-back registers");
    }
}

#[test]
fn a_batched_commit_with_a_fault_anywhere_leaves_the_target_as_it_was() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for case in 0..100 {
        let mut writes = many_writes(&mut seed, 12);
        let at = (rng(&mut seed) % 13) as usize;
        // Unmapped, or running off the end of a region.
        let bad = if case % 2 == 0 {
            write(0xdead_0000, &[1, 2, 3], "global unmapped")
        } else {
            write(DATA + 250, &[7; 16], "global unmapped")
        };
        writes.insert(at, bad);
        let (mut mem, mut regs) = target();
        let (mem0, regs0) = (snapshot(&mem), regs.clone());
        let state = PreparedState {
            writes,
            regs: vec![(T100, new_regs(0x5000))],
        };
        match commit(&state, &mut mem, &mut regs) {
            Err(e @ CommitError::Memory { .. }) => {
                assert!(e.to_string().contains("rolled back"), "{e}");
            }
            other => panic!("case {case}: {other:?}"),
        }
        assert_eq!(snapshot(&mem), mem0, "case {case}: memory");
        assert_eq!(regs, regs0, "case {case}: registers");
    }
}

#[test]
fn a_batched_commit_names_the_write_that_failed() {
    let (mut mem, mut regs) = target();
    let mut state = prepared();
    // Starts in the data region and runs past its end: the range it is
    // merged into cannot be read, and this write is the one to blame.
    state.writes.push(write(DATA + 20, &[5; 4], "global near"));
    state
        .writes
        .push(write(DATA + 250, &[7; 16], "global past the end"));
    match commit(&state, &mut mem, &mut regs) {
        Err(e @ CommitError::Memory { .. }) => {
            assert!(e.to_string().contains("global past the end"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn threads_whose_registers_do_not_change_are_not_written() {
    let (mut mem, mut regs) = target();
    let same = regs.threads[&T101];
    let state = PreparedState {
        writes: Vec::new(),
        regs: vec![(T100, new_regs(0x5000)), (T101, same)],
    };
    let undo = commit(&state, &mut mem, &mut regs).expect("commit");
    // Only thread 100's registers were set (and recorded).
    assert_eq!(undo.len(), 1);
    assert_eq!(regs.threads[&T101], same);
    let undo = commit_with(&state, &mut mem, &mut regs, CommitMode::OneByOne).expect("commit");
    assert_eq!(undo.len(), 2);
}
