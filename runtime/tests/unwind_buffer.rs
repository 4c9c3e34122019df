//! The rbp-chain unwinder on a synthetic stack in a byte buffer: three
//! frames (top at a loop update point, a middle frame, main), callee-saved
//! registers saved at different depths, and every way a chain can be
//! corrupt.

use upstare_dwarf::fdt::{
    BinaryInfo, CallSite, Callee, Continuation, FrameTables, FunctionTable, PointKind, UpdatePoint,
};
use upstare_dwarf::model::{FrameBaseKind, SavedReg};
use upstare_dwarf::{CfaOffset, LinkAddr, LoadBias, Reg, RuntimeAddr};
use upstare_runtime::engine::state::Image;
use upstare_runtime::engine::unwind::{Top, UnwindError, Unwinder};
use upstare_runtime::load::libraries::Libraries;
use upstare_runtime::{ByteBuffer, Regs, TargetMemory};

const BIAS: u64 = 0x5555_0000_0000;
/// The thread the buffer stands for.
const T7: nix::unistd::Pid = nix::unistd::Pid::from_raw(7);
const STACK: u64 = 0x7ff0_0000_0000;
const STACK_LEN: u64 = 0x1000;
/// main's CFA; mid's is 32 below (main calls at depth -32), top's 48 below
/// that (mid calls at depth -48); top's rsp at its point is CFA-32.
const MAIN_CFA: u64 = STACK + 0x300;
const MID_CFA: u64 = MAIN_CFA - 32;
const TOP_CFA: u64 = MID_CFA - 48;
/// Where main returns to: not code of the image.
const LIBC_RET: u64 = 0x7fff_dead_0000;

fn saved(reg: Reg, off: i64) -> SavedReg {
    SavedReg {
        reg,
        offset: CfaOffset(off),
    }
}

fn function(name: &str, low: u64, saved_regs: Vec<SavedReg>) -> FunctionTable {
    FunctionTable {
        name: name.into(),
        low: LinkAddr(low),
        high: LinkAddr(low + 0x100),
        decl_file: Some(0),
        decl_line: 1,
        frame_base: FrameBaseKind::Cfa,
        external: true,
        saved_regs,
        body_depth: CfaOffset(-32),
        extent: CfaOffset(-48),
        vars: Vec::new(),
        update_points: Vec::new(),
        call_sites: Vec::new(),
        var_inits: Vec::new(),
    }
}

fn call(call_addr: u64, callee: &str, ordinal: u32, depth: i64) -> CallSite {
    CallSite {
        call_addr: LinkAddr(call_addr),
        return_addr: LinkAddr(call_addr + 5),
        callee: Callee::Direct(callee.into()),
        ordinal,
        stack_depth: CfaOffset(depth),
        live_regs: Vec::new(),
        temp_slots: Vec::new(),
        restart: None,
        file: 0,
        line: 10,
    }
}

fn image(mid_depth: i64) -> Image {
    let mut top = function(
        "top",
        0x1100,
        vec![saved(Reg::Rbp, -16), saved(Reg::Rbx, -24)],
    );
    top.update_points.push(UpdatePoint {
        kind: PointKind::Loop(0),
        addr: LinkAddr(0x1110),
        file: 0,
        line: 5,
        stack_depth: CfaOffset(-32),
    });
    let mut mid = function(
        "mid",
        0x1200,
        vec![
            saved(Reg::Rbp, -16),
            saved(Reg::R12, -24),
            saved(Reg::Rbx, -32),
        ],
    );
    mid.call_sites.push(call(0x1240, "top", 0, mid_depth));
    let mut main = function("main", 0x1300, vec![saved(Reg::Rbp, -16)]);
    main.call_sites.push(call(0x1320, "mid", 0, -32));
    main.call_sites.push(call(0x1340, "mid", 1, -32));
    Image {
        path: "/synthetic".into(),
        bias: LoadBias(BIAS),
        tables: FrameTables {
            binary: BinaryInfo {
                pie: true,
                text_addr: LinkAddr(0x1000),
                text_size: 0x1000,
                ..BinaryInfo::default()
            },
            files: vec!["s.c".into()],
            functions: vec![top, mid, main],
            ..FrameTables::default()
        },
        text: RuntimeAddr(BIAS + 0x1000)..RuntimeAddr(BIAS + 0x2000),
        span: RuntimeAddr(BIAS)..RuntimeAddr(BIAS + 0x4000),
    }
}

fn stack() -> ByteBuffer {
    let mut m = ByteBuffer::with_region(RuntimeAddr(STACK), vec![0u8; STACK_LEN as usize]).unwrap();
    let mut put = |a: u64, v: u64| m.write_u64(RuntimeAddr(a), v).unwrap();
    // top's frame: return into mid after its call, mid's rbp, mid's rbx.
    put(TOP_CFA - 8, BIAS + 0x1245);
    put(TOP_CFA - 16, MID_CFA - 16);
    put(TOP_CFA - 24, 0xB1);
    // mid's frame: return into main after its second call to mid; main's
    // rbp; main's r12 and rbx.
    put(MID_CFA - 8, BIAS + 0x1345);
    put(MID_CFA - 16, MAIN_CFA - 16);
    put(MID_CFA - 24, 0xC12);
    put(MID_CFA - 32, 0xC0);
    // main's frame: returns into libc; saved rbp is garbage (glibc's 1).
    put(MAIN_CFA - 8, LIBC_RET);
    put(MAIN_CFA - 16, 1);
    m
}

fn regs() -> Regs {
    let mut r = Regs::zeroed();
    r.set(Reg::Rip, BIAS + 0x1110);
    r.set(Reg::Rsp, TOP_CFA - 32);
    r.set(Reg::Rbp, TOP_CFA - 16);
    r.set(Reg::Rbx, 0xA0);
    r.set(Reg::R12, 0xA12);
    r.set(Reg::R13, 0xA13);
    r.set(Reg::R14, 0xA14);
    r.set(Reg::R15, 0xA15);
    r
}

fn unwind(
    img: &Image,
    mem: &ByteBuffer,
    r: &Regs,
) -> Result<upstare_runtime::engine::unwind::Unwound, UnwindError> {
    let libs = Libraries::empty();
    Unwinder::new(img, &libs, mem)
        .verify_chain_end(false)
        .with_stack(RuntimeAddr(STACK)..RuntimeAddr(STACK + STACK_LEN))
        .unwind(T7, r)
}

#[test]
fn three_frames_with_callee_saved_views() {
    let img = image(-48);
    let u = unwind(&img, &stack(), &regs()).unwrap();
    assert_eq!(u.top, Top::AtPoint);
    let got: Vec<(&str, u64, u64, String)> = u
        .frames
        .iter()
        .map(|f| {
            (
                f.function.as_str(),
                f.pc.0,
                f.cfa.0,
                f.continuation.to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("top", 0x1110, TOP_CFA, "loop#0".to_string()),
            ("mid", 0x1245, MID_CFA, "call:top#0".to_string()),
            ("main", 0x1345, MAIN_CFA, "call:mid#1".to_string()),
        ]
    );
    assert_eq!(u.frames[0].continuation, Continuation::Loop(0));
    let view = |i: usize, r: Reg| u.frames[i].callee_saved.get(&r).copied();
    // top sees the thread's registers.
    assert_eq!(view(0, Reg::Rbx), Some(0xA0));
    assert_eq!(view(0, Reg::R12), Some(0xA12));
    // mid: rbx from top's slot, r12..r15 unchanged by top.
    assert_eq!(view(1, Reg::Rbx), Some(0xB1));
    assert_eq!(view(1, Reg::R12), Some(0xA12));
    assert_eq!(view(1, Reg::R15), Some(0xA15));
    // main: rbx and r12 from mid's slots, r13 passed through both.
    assert_eq!(view(2, Reg::Rbx), Some(0xC0));
    assert_eq!(view(2, Reg::R12), Some(0xC12));
    assert_eq!(view(2, Reg::R13), Some(0xA13));
    // rbp is the chain, never a tracked value.
    assert_eq!(view(2, Reg::Rbp), None);
    assert_eq!(u.frames[2].callee_saved.len(), 5);
}

#[test]
fn a_saved_rbp_pointing_at_its_own_frame_is_a_cycle() {
    let img = image(-48);
    let mut m = stack();
    m.write_u64(RuntimeAddr(TOP_CFA - 16), TOP_CFA - 16)
        .unwrap();
    let e = unwind(&img, &m, &regs()).unwrap_err();
    assert!(
        matches!(&e, UnwindError::BadFrame { tid, function, .. } if function == "mid" && *tid == T7),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("not above the frame of its callee top"),
        "{e}"
    );
}

#[test]
fn a_saved_rbp_outside_the_stack_is_refused() {
    let img = image(-48);
    let mut m = stack();
    m.write_u64(RuntimeAddr(MID_CFA - 16), 0x10).unwrap();
    let e = unwind(&img, &m, &regs()).unwrap_err();
    assert!(
        matches!(&e, UnwindError::BadFrame { function, .. } if function == "main"),
        "{e}"
    );
    // Without stack bounds the frame must still be readable.
    let libs = Libraries::empty();
    let e = Unwinder::new(&img, &libs, &m)
        .verify_chain_end(false)
        .unwind(T7, &regs())
        .unwrap_err();
    // CFA 0x20 is below mid's frame: refused as not above its callee.
    assert!(matches!(e, UnwindError::BadFrame { .. }), "{e}");
    // A frame beyond the buffer: the read fails and says what and where.
    let far = STACK + 0x10_0000;
    let mut r = regs();
    r.set(Reg::Rbp, far - 16);
    r.set(Reg::Rsp, far - 32);
    let e = Unwinder::new(&img, &libs, &m)
        .verify_chain_end(false)
        .unwind(T7, &r)
        .unwrap_err();
    match &e {
        UnwindError::Memory {
            tid, what, addr, ..
        } if *tid == T7 => {
            assert_eq!(what, "the return address of top", "{e}");
            assert_eq!(*addr, RuntimeAddr(far - 8));
        }
        other => panic!("{other}"),
    }
}

#[test]
fn an_unknown_return_address_names_the_function() {
    let img = image(-48);
    let mut m = stack();
    m.write_u64(RuntimeAddr(TOP_CFA - 8), BIAS + 0x1244)
        .unwrap();
    let e = unwind(&img, &m, &regs()).unwrap_err();
    assert!(
        matches!(&e, UnwindError::NotACallSite { function, offset: 0x44, .. } if function == "mid"),
        "{e}"
    );
    assert!(e.to_string().contains("thread 7"), "{e}");
    // Into the image's text but no function of the tables.
    m.write_u64(RuntimeAddr(TOP_CFA - 8), BIAS + 0x1800)
        .unwrap();
    let e = unwind(&img, &m, &regs()).unwrap_err();
    assert!(matches!(e, UnwindError::NoFunction { .. }), "{e}");
}

#[test]
fn the_call_sites_stack_depth_must_match_the_chain() {
    // mid claims to call top at depth -40: top's CFA would be 8 higher.
    let img = image(-40);
    let e = unwind(&img, &stack(), &regs()).unwrap_err();
    assert!(
        matches!(&e, UnwindError::BadFrame { function, .. } if function == "mid"),
        "{e}"
    );
    assert!(e.to_string().contains("call:top#0"), "{e}");
}

#[test]
fn the_top_must_be_at_a_point_with_the_recorded_depth() {
    let img = image(-48);
    let mut r = regs();
    r.set(Reg::Rip, BIAS + 0x1111);
    assert!(matches!(
        unwind(&img, &stack(), &r).unwrap_err(),
        UnwindError::NotAtPoint { .. }
    ));
    let mut r = regs();
    r.set(Reg::Rsp, TOP_CFA - 40);
    let e = unwind(&img, &stack(), &r).unwrap_err();
    assert!(e.to_string().contains("rsp is"), "{e}");
    // rbp not 8-aligned.
    let mut r = regs();
    r.set(Reg::Rbp, TOP_CFA - 15);
    assert!(matches!(
        unwind(&img, &stack(), &r).unwrap_err(),
        UnwindError::BadFrame { .. }
    ));
    // A pc in no library and not in the image.
    let mut r = regs();
    r.set(Reg::Rip, 0x1234);
    assert!(matches!(
        unwind(&img, &stack(), &r).unwrap_err(),
        UnwindError::UnknownCode {
            pc: RuntimeAddr(0x1234),
            ..
        }
    ));
}

#[test]
fn the_walk_is_bounded() {
    let img = image(-48);
    let libs = Libraries::empty();
    let m = stack();
    let e = Unwinder::new(&img, &libs, &m)
        .verify_chain_end(false)
        .with_max_frames(2)
        .unwind(T7, &regs())
        .unwrap_err();
    assert!(matches!(e, UnwindError::TooDeep { limit: 2, .. }), "{e}");
    // With the end verified, main's return into unknown code is refused.
    let e = Unwinder::new(&img, &libs, &m)
        .unwind(T7, &regs())
        .unwrap_err();
    assert!(
        matches!(
            e,
            UnwindError::UnknownCode {
                pc: RuntimeAddr(LIBC_RET),
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_stack_snapshot_reads_like_the_memory_it_copies() {
    use upstare_runtime::engine::unwind::StackSnapshot;
    let img = image(-48);
    let m = stack();
    // Copy from top's rsp to the end of the stack.
    let mut snap = StackSnapshot::new(
        &m,
        RuntimeAddr(TOP_CFA - 32)..RuntimeAddr(STACK + STACK_LEN),
    )
    .unwrap();
    let libs = Libraries::empty();
    let from_snap = Unwinder::new(&img, &libs, &snap)
        .verify_chain_end(false)
        .unwind(T7, &regs())
        .unwrap();
    assert_eq!(from_snap, unwind(&img, &m, &regs()).unwrap());
    // Below the copy: read through; beyond every region: the error.
    assert_eq!(snap.read_u64(RuntimeAddr(STACK)).unwrap(), 0);
    assert!(snap.read_u64(RuntimeAddr(STACK + STACK_LEN - 4)).is_err());
    assert!(snap.write_u64(RuntimeAddr(TOP_CFA - 8), 0).is_err());
    assert_eq!(
        snap.read_u64(RuntimeAddr(TOP_CFA - 8)).unwrap(),
        BIAS + 0x1245
    );
}
