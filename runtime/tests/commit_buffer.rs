//! The commit of an update as a transaction, on byte buffers: every write
//! and register set lands, or — with a fault injected at any step — none
//! does and the target is byte for byte and register for register as it was.

use nix::unistd::Pid;
use upstare_dwarf::RuntimeAddr;
use upstare_runtime::engine::Write;
use upstare_runtime::update::transaction::{commit, CommitError, PreparedState, RegisterFile};
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
    assert_eq!(undo.len(), 5);
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
