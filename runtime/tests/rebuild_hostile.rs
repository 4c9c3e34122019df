//! The stack engine with hostile or inconsistent tables (they come from a
//! file): every case is a refusal naming the frame, never a panic or an
//! out-of-frame write.

use std::collections::BTreeMap;
use upstare_dwarf::fdt::*;
use upstare_dwarf::model::*;
use upstare_dwarf::{CfaOffset, LinkAddr, LoadBias, Reg, RuntimeAddr};
use upstare_runtime::engine::pointers::Remapper;
use upstare_runtime::engine::rebuild::{frame_writes, place_frames, RebuildError};
use upstare_runtime::engine::state::{AppFrame, Image, Readiness, ThreadState};
use upstare_runtime::{ByteBuffer, Regs, TargetMemory};

const STACK_TOP: u64 = 0x7fff_0000_1000;
const BIAS: u64 = 0x5555_0000_0000;
const MAIN_CFA: u64 = STACK_TOP - 0x100;
const WORK_CFA: u64 = MAIN_CFA - 48;

fn var(name: &str, off: i64, low: u64, high: u64) -> Variable {
    Variable {
        name: name.into(),
        ty: TypeId(0),
        location: VarLocation::Cfa(CfaOffset(off)),
        scope: vec![(LinkAddr(low), LinkAddr(high))],
        is_param: false,
        decl_line: 1,
    }
}

fn function(name: &str, low: u64, depth: i64, vars: Vec<Variable>) -> FunctionTable {
    FunctionTable {
        name: name.into(),
        low: LinkAddr(low),
        high: LinkAddr(low + 0x100),
        decl_file: None,
        decl_line: 1,
        frame_base: FrameBaseKind::Cfa,
        external: true,
        saved_regs: vec![SavedReg {
            reg: Reg::Rbp,
            offset: CfaOffset(-16),
        }],
        body_depth: CfaOffset(depth),
        extent: CfaOffset(depth),
        vars,
        update_points: vec![],
        call_sites: vec![],
        var_inits: Vec::new(),
    }
}

/// main [0x1000,0x1100) calls work at 0x1050 with a temporary at CFA-40;
/// work sits at its loop point 0x1140.
fn image() -> Image {
    let mut main = function("main", 0x1000, -48, vec![var("total", -24, 0x1000, 0x1100)]);
    main.call_sites.push(CallSite {
        call_addr: LinkAddr(0x1050),
        return_addr: LinkAddr(0x1055),
        callee: Callee::Direct("work".into()),
        ordinal: 0,
        stack_depth: CfaOffset(-48),
        live_regs: vec![],
        temp_slots: vec![TempSlot {
            offset: CfaOffset(-40),
            size: 8,
        }],
        restart: None,
        file: 0,
        line: 5,
    });
    let mut work = function("work", 0x1100, -32, vec![var("i", -24, 0x1100, 0x1200)]);
    work.update_points.push(UpdatePoint {
        kind: PointKind::Loop(0),
        addr: LinkAddr(0x1140),
        file: 0,
        line: 12,
        stack_depth: CfaOffset(-32),
    });
    Image {
        path: "/t".into(),
        bias: LoadBias(BIAS),
        tables: FrameTables {
            binary: BinaryInfo {
                pie: true,
                ..BinaryInfo::default()
            },
            files: vec!["t.c".into()],
            types: vec![Type::Base {
                name: "long".into(),
                size: 8,
                encoding: BaseEncoding::Signed,
            }],
            globals: vec![],
            functions: vec![main, work],
            arming: Default::default(),
        },
        text: RuntimeAddr(BIAS + 0x1000)..RuntimeAddr(BIAS + 0x2000),
        span: RuntimeAddr(BIAS)..RuntimeAddr(BIAS + 0x5000),
    }
}

/// A new version whose main gained a local (so main is rebuilt variable by
/// variable and its call's temporaries and arguments are mapped), then
/// spoiled by `spoil`.
fn new_image(spoil: impl FnOnce(&mut FunctionTable, &mut FunctionTable)) -> Image {
    let mut img = image();
    let (main, rest) = img.tables.functions.split_at_mut(1);
    main[0].vars.push(var("added", -32, 0x1000, 0x1100));
    spoil(&mut main[0], &mut rest[0]);
    img
}

fn zeroed_regs() -> Regs {
    // libc::user_regs_struct has no Default; build it field by field.
    Regs(libc::user_regs_struct {
        r15: 0,
        r14: 0,
        r13: 0,
        r12: 0,
        rbp: WORK_CFA - 16,
        rbx: 0,
        r11: 0,
        r10: 0,
        r9: 0,
        r8: 0,
        rax: 0,
        rcx: 0,
        rdx: 0,
        rsi: 0,
        rdi: 0,
        orig_rax: 0,
        rip: BIAS + 0x1140,
        cs: 0,
        eflags: 0,
        rsp: WORK_CFA - 32,
        ss: 0,
        fs_base: 0,
        gs_base: 0,
        ds: 0,
        es: 0,
        fs: 0,
        gs: 0,
    })
}

fn setup() -> (ByteBuffer, ThreadState) {
    let base = STACK_TOP - 0x1000;
    let mut mem = ByteBuffer::with_region(RuntimeAddr(base), vec![0u8; 0x1000]).expect("region");
    for (a, v) in [
        (MAIN_CFA - 8, 0x7f00_dead_beef),
        (MAIN_CFA - 16, 1),
        (MAIN_CFA - 24, 1234),
        (MAIN_CFA - 40, 99), // the call's temporary
        (WORK_CFA - 8, BIAS + 0x1055),
        (WORK_CFA - 16, MAIN_CFA - 16),
        (WORK_CFA - 24, 7),
    ] {
        mem.write_u64(RuntimeAddr(a), v).expect("write");
    }
    let frames = vec![
        AppFrame {
            function: "work".into(),
            pc: LinkAddr(0x1140),
            cfa: RuntimeAddr(WORK_CFA),
            continuation: Continuation::Loop(0),
            callee_saved: BTreeMap::new(),
        },
        AppFrame {
            function: "main".into(),
            pc: LinkAddr(0x1055),
            cfa: RuntimeAddr(MAIN_CFA),
            continuation: Continuation::Call {
                callee: "work".into(),
                ordinal: 0,
            },
            callee_saved: BTreeMap::new(),
        },
    ];
    let thread = ThreadState {
        tid: nix::unistd::Pid::from_raw(1),
        regs: zeroed_regs(),
        readiness: Readiness::AtPoint,
        frames,
        below: None,
        beneath: false,
        library_view: None,
    };
    (mem, thread)
}

fn rebuild(new: &Image) -> Result<Vec<(u64, usize)>, RebuildError> {
    rebuild_from(&image(), new)
}

fn rebuild_from(old: &Image, new: &Image) -> Result<Vec<(u64, usize)>, RebuildError> {
    let (mem, thread) = setup();
    let update_plan = upstare_patcher::default_plan(&old.tables, &new.tables);
    let mut remap = Remapper::new(&update_plan, old, new);
    let layout = place_frames(&thread, &update_plan, old, new, &mut remap)?;
    let plan = frame_writes(&mem, &thread, &layout, &update_plan, old, new, &mut remap)?;
    Ok(plan
        .writes
        .iter()
        .map(|w| (w.addr.0, w.bytes.len()))
        .collect())
}

fn refused(new: &Image, why: &str) {
    refused_from(&image(), new, why)
}

fn refused_from(old: &Image, new: &Image, why: &str) {
    match rebuild_from(old, new) {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(why), "{msg}");
        }
        Ok(w) => panic!("not refused; writes {w:x?}"),
    }
}

#[test]
fn a_sound_change_is_rebuilt_within_the_frames() {
    let writes = rebuild(&new_image(|_, _| {})).expect("rebuild");
    // main's frame (48 bytes below its CFA) and work's (32).
    assert_eq!(writes, vec![(MAIN_CFA - 48, 48), (WORK_CFA - 32, 32)]);
}

#[test]
fn stack_arguments_above_the_body_are_refused() {
    // A call depth above the body depth would be a negative argument area.
    let new = new_image(|m, _| m.call_sites[0].stack_depth = CfaOffset(-32));
    refused(&new, "main at call:work#0");
    // The same in both versions: the shapes agree, the area does not exist.
    let mut old = image();
    old.tables.functions[0].call_sites[0].stack_depth = CfaOffset(-32);
    refused_from(&old, &new, "stack arguments");
}

#[test]
fn a_temporary_outside_the_frame_is_refused() {
    for off in [-(1i64 << 40), -4, 8, i64::MIN, i64::MAX] {
        let new = new_image(|m, _| m.call_sites[0].temp_slots[0].offset = CfaOffset(off));
        refused(&new, "outside its frame");
    }
    let new = new_image(|m, _| m.call_sites[0].temp_slots[0].size = 4);
    refused(&new, "changed size");
}

#[test]
fn a_variable_outside_the_frame_is_refused() {
    for off in [-(1i64 << 40), -4, i64::MIN] {
        let new = new_image(|m, _| m.vars[0].location = VarLocation::Cfa(CfaOffset(off)));
        refused(&new, "outside its frame");
    }
}

#[test]
fn absurd_frame_sizes_are_refused() {
    for depth in [i64::MIN, -(1i64 << 40)] {
        let new = new_image(|_, w| {
            w.extent = CfaOffset(depth);
            w.update_points[0].stack_depth = CfaOffset(depth);
        });
        refused(&new, "too large");
    }
}
