//! The stack engine on byte buffers: an identity rebuild reproduces the
//! stack exactly; a rebuild for a version whose callee gained a local moves
//! the frames above it and carries every variable, return address, saved
//! rbp and saved rbx to its new place.

use std::collections::BTreeMap;
use upstare_dwarf::fdt::*;
use upstare_dwarf::model::*;
use upstare_dwarf::{CfaOffset, LinkAddr, LoadBias, Reg, RuntimeAddr};
use upstare_runtime::engine::pointers::Remapper;
use upstare_runtime::engine::rebuild::{frame_writes, place_frames};
use upstare_runtime::engine::state::{AppFrame, Image, Readiness, ThreadState};
use upstare_runtime::{ByteBuffer, Regs, TargetMemory};

const STACK_TOP: u64 = 0x7fff_0000_1000;
const BIAS: u64 = 0x5555_0000_0000;

fn var(name: &str, off: i64, ty: u32, low: u64, high: u64) -> Variable {
    Variable {
        name: name.into(),
        ty: TypeId(ty),
        location: VarLocation::Cfa(CfaOffset(off)),
        scope: vec![(LinkAddr(low), LinkAddr(high))],
        is_param: false,
        decl_line: 1,
    }
}

/// main [0x1000,0x1100) calls work [0x1100,0x1200) at 0x1050 (returns to
/// 0x1055); work sits at its loop#0 point 0x1140. `extra` adds a local to
/// work (its frame grows by 16 bytes).
fn tables(extra: bool) -> FrameTables {
    let types = vec![
        Type::Base {
            name: "long".into(),
            size: 8,
            encoding: BaseEncoding::Signed,
        },
        Type::Pointer {
            pointee: Some(TypeId(0)),
        },
    ];
    let main = FunctionTable {
        name: "main".into(),
        low: LinkAddr(0x1000),
        high: LinkAddr(0x1100),
        decl_file: None,
        decl_line: 1,
        frame_base: FrameBaseKind::Cfa,
        external: true,
        saved_regs: vec![SavedReg {
            reg: Reg::Rbp,
            offset: CfaOffset(-16),
        }],
        body_depth: CfaOffset(-48),
        extent: CfaOffset(-48),
        vars: vec![
            var("total", -24, 0, 0x1000, 0x1100),
            var("p", -32, 1, 0x1000, 0x1100),
        ],
        update_points: vec![],
        call_sites: vec![CallSite {
            call_addr: LinkAddr(0x1050),
            return_addr: LinkAddr(0x1055),
            callee: Callee::Direct("work".into()),
            ordinal: 0,
            stack_depth: CfaOffset(-48),
            live_regs: vec![],
            temp_slots: vec![],
            restart: None,
            file: 0,
            line: 5,
        }],
        var_inits: Vec::new(),
    };
    let mut vars = vec![
        var("i", -32, 0, 0x1100, 0x1200),
        var("ptr", -40, 1, 0x1100, 0x1200),
    ];
    let depth = if extra {
        vars.push(var("added", -56, 0, 0x1100, 0x1200));
        -64
    } else {
        -48
    };
    let work = FunctionTable {
        name: "work".into(),
        low: LinkAddr(0x1100),
        high: LinkAddr(0x1200),
        decl_file: None,
        decl_line: 9,
        frame_base: FrameBaseKind::Cfa,
        external: true,
        saved_regs: vec![
            SavedReg {
                reg: Reg::Rbp,
                offset: CfaOffset(-16),
            },
            SavedReg {
                reg: Reg::Rbx,
                offset: CfaOffset(-24),
            },
        ],
        body_depth: CfaOffset(depth),
        extent: CfaOffset(depth),
        vars,
        update_points: vec![UpdatePoint {
            kind: PointKind::Loop(0),
            addr: LinkAddr(0x1140),
            file: 0,
            line: 12,
            stack_depth: CfaOffset(depth),
        }],
        call_sites: vec![],
        var_inits: Vec::new(),
    };
    FrameTables {
        binary: BinaryInfo {
            pie: true,
            ..BinaryInfo::default()
        },
        files: vec!["t.c".into()],
        types,
        globals: vec![],
        functions: vec![main, work],
        arming: Default::default(),
    }
}

fn image(extra: bool, bias: u64) -> Image {
    Image {
        path: "/t".into(),
        bias: LoadBias(bias),
        tables: tables(extra),
        text: RuntimeAddr(bias + 0x1000)..RuntimeAddr(bias + 0x2000),
        span: RuntimeAddr(bias)..RuntimeAddr(bias + 0x5000),
    }
}

/// A stack: main's CFA at STACK_TOP-0x100, work's CFA 48 bytes lower.
fn setup() -> (ByteBuffer, ThreadState) {
    let base = STACK_TOP - 0x1000;
    let mut mem = ByteBuffer::with_region(RuntimeAddr(base), vec![0u8; 0x1000]).expect("region");
    let main_cfa = STACK_TOP - 0x100;
    let work_cfa = main_cfa - 48;
    let w = |m: &mut ByteBuffer, a: u64, v: u64| m.write_u64(RuntimeAddr(a), v).expect("write");
    w(&mut mem, main_cfa - 8, 0x7f00_dead_beef); // main's return into libc
    w(&mut mem, main_cfa - 16, 1); // main's saved rbp (garbage 1, as glibc leaves it)
    w(&mut mem, main_cfa - 24, 1234); // total
    w(&mut mem, main_cfa - 32, main_cfa - 24); // p = &total (a stack pointer)
    w(&mut mem, work_cfa - 8, BIAS + 0x1055); // return address
    w(&mut mem, work_cfa - 16, main_cfa - 16); // saved rbp
    w(&mut mem, work_cfa - 24, 0xb0b); // saved rbx (main's value)
    w(&mut mem, work_cfa - 32, 7); // i
    w(&mut mem, work_cfa - 40, work_cfa - 32); // ptr = &i
    let mut regs: Regs = Regs::zeroed();
    regs.0.rip = BIAS + 0x1140;
    regs.0.rbp = work_cfa - 16;
    regs.0.rsp = work_cfa - 48;
    regs.0.rbx = 0x5a5a; // work's own rbx
    let frames = vec![
        AppFrame {
            function: "work".into(),
            pc: LinkAddr(0x1140),
            cfa: RuntimeAddr(work_cfa),
            continuation: Continuation::Loop(0),
            callee_saved: BTreeMap::from([(Reg::Rbx, 0x5a5a)]),
        },
        AppFrame {
            function: "main".into(),
            pc: LinkAddr(0x1055),
            cfa: RuntimeAddr(main_cfa),
            continuation: Continuation::Call {
                callee: "work".into(),
                ordinal: 0,
            },
            callee_saved: BTreeMap::from([(Reg::Rbx, 0xb0b)]),
        },
    ];
    (
        mem,
        ThreadState {
            tid: nix::unistd::Pid::from_raw(1),
            regs,
            readiness: Readiness::AtPoint,
            frames,
            below: None,
            beneath: false,
            library_view: None,
        },
    )
}

fn apply(mem: &mut ByteBuffer, thread: &ThreadState, old: &Image, new: &Image) -> Regs {
    let update_plan = upstare_patcher::default_plan(&old.tables, &new.tables);
    let mut remap = Remapper::new(&update_plan, old, new);
    let layout = place_frames(thread, &update_plan, old, new, &mut remap).expect("place");
    let plan =
        frame_writes(&*mem, thread, &layout, &update_plan, old, new, &mut remap).expect("writes");
    for w in &plan.writes {
        mem.write(w.addr, &w.bytes).expect("commit");
    }
    plan.regs
}

#[test]
fn identity_rebuild_reproduces_the_stack() {
    let (mut mem, thread) = setup();
    let before: Vec<u8> = mem.regions().flat_map(|(_, b)| b.to_vec()).collect();
    let (old, new) = (image(false, BIAS), image(false, BIAS));
    let regs = apply(&mut mem, &thread, &old, &new);
    let after: Vec<u8> = mem.regions().flat_map(|(_, b)| b.to_vec()).collect();
    assert_eq!(before, after, "identity rebuild changed the stack");
    assert_eq!(regs.0.rip, thread.regs.0.rip);
    assert_eq!(regs.0.rsp, thread.regs.0.rsp);
    assert_eq!(regs.0.rbp, thread.regs.0.rbp);
    assert_eq!(regs.0.rbx, 0x5a5a);
    assert_eq!(regs.0.orig_rax, u64::MAX);
}

#[test]
fn identity_to_a_new_load_address_rewrites_return_addresses() {
    let (mut mem, thread) = setup();
    let new_bias = BIAS + 0x10_0000;
    let (old, new) = (image(false, BIAS), image(false, new_bias));
    let regs = apply(&mut mem, &thread, &old, &new);
    let work_cfa = STACK_TOP - 0x100 - 48;
    assert_eq!(
        mem.read_u64(RuntimeAddr(work_cfa - 8)).expect("ret"),
        new_bias + 0x1055
    );
    assert_eq!(regs.0.rip, new_bias + 0x1140);
}

#[test]
fn grown_frame_keeps_values_and_links() {
    let (mut mem, thread) = setup();
    let (old, new) = (image(false, BIAS), image(true, BIAS));
    let regs = apply(&mut mem, &thread, &old, &new);
    let main_cfa = STACK_TOP - 0x100;
    let work_cfa = main_cfa - 48; // main's call depth did not change
    let r = |a: u64| mem.read_u64(RuntimeAddr(a)).expect("read");
    assert_eq!(r(main_cfa - 24), 1234, "main's total");
    assert_eq!(
        r(main_cfa - 32),
        main_cfa - 24,
        "main's p still points at total"
    );
    assert_eq!(r(work_cfa - 8), BIAS + 0x1055, "return address");
    assert_eq!(r(work_cfa - 16), main_cfa - 16, "saved rbp");
    assert_eq!(r(work_cfa - 24), 0xb0b, "main's rbx saved by work");
    assert_eq!(r(work_cfa - 32), 7, "i");
    assert_eq!(r(work_cfa - 40), work_cfa - 32, "ptr still points at i");
    assert_eq!(r(work_cfa - 56), 0, "the new local starts as zero");
    assert_eq!(regs.0.rsp, work_cfa - 64, "rsp at the new frame's depth");
    assert_eq!(regs.0.rbp, work_cfa - 16);
}

#[test]
fn missing_continuation_is_refused_by_name() {
    let (mem, thread) = setup();
    let old = image(false, BIAS);
    let mut new = image(false, BIAS);
    new.tables.functions[1].update_points.clear();
    let update_plan = upstare_patcher::default_plan(&old.tables, &new.tables);
    let mut remap = Remapper::new(&update_plan, &old, &new);
    let err = place_frames(&thread, &update_plan, &old, &new, &mut remap).expect_err("must refuse");
    let msg = err.to_string();
    assert!(msg.contains("work") && msg.contains("loop#0"), "{msg}");
    drop(mem);
}
