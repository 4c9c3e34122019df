//! The FDT codec: round trip, version/magic checks, and a mutation run proving
//! the decoder returns errors (never panics, never over-allocates) on hostile
//! bytes. The libFuzzer target in dwarf/fuzz/ runs the same property
//! open-ended; this is its bounded, deterministic form for every test run.

use upstare_dwarf::fdt::*;
use upstare_dwarf::model::*;
use upstare_dwarf::{CfaOffset, LinkAddr, Reg};
use upstare_testkit::Rng;

fn sample() -> FrameTables {
    let int = TypeId(0);
    let types = vec![
        Type::Base {
            name: "int".into(),
            size: 4,
            encoding: BaseEncoding::Signed,
        },
        Type::Pointer { pointee: Some(int) },
        Type::Struct {
            name: Some("point".into()),
            size: 8,
            members: vec![
                Member {
                    name: Some("x".into()),
                    ty: int,
                    offset: 0,
                    bitfield: None,
                },
                Member {
                    name: Some("y".into()),
                    ty: int,
                    offset: 4,
                    bitfield: Some((0, 3)),
                },
            ],
            declaration: false,
        },
        Type::Array {
            element: int,
            dims: vec![ArrayDim::Fixed(4), ArrayDim::Variable],
        },
    ];
    let var = |name: &str, off: i64, is_param: bool| Variable {
        name: name.into(),
        ty: int,
        location: VarLocation::Cfa(CfaOffset(off)),
        scope: vec![(LinkAddr(0x1139), LinkAddr(0x11a0))],
        is_param,
        decl_line: 3,
    };
    let f = FunctionTable {
        name: "main".into(),
        low: LinkAddr(0x1139),
        high: LinkAddr(0x11a0),
        decl_file: Some(0),
        decl_line: 2,
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
        body_depth: CfaOffset(-48),
        extent: CfaOffset(-56),
        vars: vec![var("argc", -52, true), var("i", -28, false)],
        update_points: vec![
            UpdatePoint {
                kind: PointKind::Entry,
                addr: LinkAddr(0x1148),
                file: 0,
                line: 3,
                stack_depth: CfaOffset(-48),
            },
            UpdatePoint {
                kind: PointKind::Loop(0),
                addr: LinkAddr(0x1160),
                file: 0,
                line: 5,
                stack_depth: CfaOffset(-48),
            },
        ],
        call_sites: vec![CallSite {
            call_addr: LinkAddr(0x1170),
            return_addr: LinkAddr(0x1175),
            callee: Callee::Plt("printf".into()),
            ordinal: 0,
            stack_depth: CfaOffset(-48),
            live_regs: vec![Reg::Rbx],
            temp_slots: vec![TempSlot {
                offset: CfaOffset(-40),
                size: 8,
            }],
            restart: Some(LinkAddr(0x1165)),
            file: 0,
            line: 6,
        }],
        var_inits: Vec::new(),
    };
    FrameTables {
        binary: BinaryInfo {
            pie: true,
            producer: "GNU C17 12.2.0 -O0 -g".into(),
            build_id: vec![1, 2, 3],
            text_addr: LinkAddr(0x1040),
            text_size: 0x200,
        },
        files: vec!["/src/main.c".into()],
        types,
        globals: vec![Global {
            name: "counter".into(),
            ty: int,
            addr: LinkAddr(0x4010),
            size: 4,
            owner: None,
            unit: "t.c".into(),
            external: true,
            tls: false,
        }],
        functions: vec![f],
        arming: Arming::Int3,
    }
}

/// [`sample`] rewritten with `--inline-points`: its first point detoured.
fn inline_sample() -> FrameTables {
    let mut t = sample();
    t.arming = Arming::Inline(InlinePoints {
        flag: LinkAddr(0x9000),
        trampolines: (LinkAddr(0x8000), LinkAddr(0x8040)),
        detours: vec![Detour {
            point: LinkAddr(0x1148),
            trap: LinkAddr(0x8009),
            displaced: 7,
        }],
    });
    t
}

/// A stand-in code digest (the binary's is checked by `read_tables`).
const CODE: Digest = [7; 32];

#[test]
fn round_trip_is_identity() {
    for t in [sample(), inline_sample()] {
        let bytes = encode(&t, &CODE).expect("encode");
        assert_eq!(&bytes[..8], MAGIC);
        let back = decode(&bytes).expect("decode");
        assert_eq!(back.tables, t);
        assert_eq!(back.code_digest, CODE);
    }
    let Arming::Inline(inline) = inline_sample().arming else {
        unreachable!("inline_sample is inline")
    };
    assert_eq!(
        inline.detour_trapping_at(LinkAddr(0x8009)).map(|d| d.point),
        Some(LinkAddr(0x1148))
    );
    assert!(inline.detour_at(LinkAddr(0x1160)).is_none());
}

/// Detours the runtime would follow into the wrong place are refused: at
/// an address that is no update point, displacing past the function's
/// end or fewer bytes than a `jmp rel32`, trapping outside the
/// trampolines, overlapping, a flag inside code.
#[test]
fn bad_detours_are_rejected() {
    let edits: [fn(&mut InlinePoints); 7] = [
        |i| i.detours[0].point = LinkAddr(0x1149),
        |i| i.detours[0].displaced = 4,
        |i| i.detours[0].displaced = 200,
        |i| i.detours[0].trap = LinkAddr(0x8040),
        |i| i.flag = LinkAddr(0x1150),
        |i| i.trampolines = (LinkAddr(0x8040), LinkAddr(0x8000)),
        |i| {
            let mut second = i.detours[0];
            second.point = LinkAddr(0x1160);
            i.detours.insert(0, second);
        },
    ];
    for (n, edit) in edits.iter().enumerate() {
        let mut t = inline_sample();
        if let Arming::Inline(i) = &mut t.arming {
            edit(i);
        }
        let bytes = encode(&t, &CODE).expect("encode");
        assert!(
            matches!(decode(&bytes), Err(DecodeError::Invalid(_))),
            "edit {n} accepted"
        );
    }
}

#[test]
fn every_changed_byte_is_refused() {
    let bytes = encode(&sample(), &CODE).expect("encode");
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x20;
        let e = decode(&b).expect_err("a changed section decoded");
        // Magic, version and length have their own messages; every other
        // byte (reserved field, digests, payload) is the checksum's.
        if !(0..16).contains(&i) || (10..12).contains(&i) {
            assert_eq!(e, DecodeError::TablesChecksum, "byte {i}");
        }
    }
}

#[test]
fn header_checks_name_the_problem() {
    let bytes = encode(&sample(), &CODE).expect("encode");
    assert_eq!(decode(&bytes[..5]), Err(DecodeError::TooShort(5)));
    let mut bad = bytes.clone();
    bad[0] ^= 0xff;
    assert_eq!(decode(&bad), Err(DecodeError::BadMagic));
    // Another version (older tables lack the initializers of locals).
    let mut other = bytes.clone();
    other[8] = 2;
    assert_eq!(decode(&other), Err(DecodeError::UnsupportedVersion(2)));
    let truncated = &bytes[..bytes.len() - 1];
    assert!(matches!(
        decode(truncated),
        Err(DecodeError::LengthMismatch { .. })
    ));
}

#[test]
fn dangling_references_are_rejected() {
    let mut t = sample();
    t.functions[0].vars[0].ty = TypeId(99);
    let bytes = encode(&t, &CODE).expect("encode");
    assert!(matches!(decode(&bytes), Err(DecodeError::Invalid(_))));
    let mut t = sample();
    t.functions[0].update_points[0].addr = LinkAddr(0x9999);
    let bytes = encode(&t, &CODE).expect("encode");
    assert!(matches!(decode(&bytes), Err(DecodeError::Invalid(_))));
    // An initializer of a variable that does not exist, or outside the
    // function.
    let mut t = sample();
    let low = t.functions[0].low;
    t.functions[0].var_inits.push(upstare_dwarf::fdt::VarInit {
        var: 99,
        addr: low,
        constant: None,
    });
    let bytes = encode(&t, &CODE).expect("encode");
    assert!(matches!(decode(&bytes), Err(DecodeError::Invalid(_))));
    let mut t = sample();
    t.functions[0].var_inits.push(upstare_dwarf::fdt::VarInit {
        var: 0,
        addr: LinkAddr(0x9999),
        constant: Some(vec![0; 8]),
    });
    let bytes = encode(&t, &CODE).expect("encode");
    assert!(matches!(decode(&bytes), Err(DecodeError::Invalid(_))));
}

/// The checksum refuses any changed section (above); behind it, the
/// payload decoder itself must still never panic nor over-allocate.
#[test]
fn mutated_payloads_never_panic() {
    let valid = encode(&inline_sample(), &CODE).expect("encode")[HEADER_LEN..].to_vec();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut accepted = 0usize;
    for round in 0..20_000 {
        let mut b = valid.clone();
        match round % 4 {
            // flip a few bytes
            0 => {
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(b.len());
                    b[i] = rng.next_u64() as u8;
                }
            }
            // truncate
            1 => b.truncate(rng.below(b.len())),
            // huge varint lengths (allocation bombs)
            2 => {
                let i = rng.below(b.len());
                for j in i..(i + 5).min(b.len()) {
                    b[j] = 0xff;
                }
            }
            // random bytes
            _ => {
                let n = rng.below(512);
                b = (0..n).map(|_| rng.next_u64() as u8).collect();
            }
        }
        if decode_payload(&b).is_ok() {
            accepted += 1;
        }
    }
    // Most mutations must be caught; a decoder that accepts everything is broken.
    assert!(accepted < 20_000 / 2, "accepted {accepted} mutated inputs");
}
