//! Frames, scopes, statics and functions read from real gcc/clang binaries,
//! checked against what the running program itself reports (addresses of
//! its variables relative to its frame) and against the ELF symbol table.

mod common;

use common::{build, build_flags, code_at, compilers, run, symbol, symbols, Toolchain};
use std::collections::HashMap;
use upstare_dwarf::model::{ArrayDim, Program, Type, VarLocation, Variable};
use upstare_dwarf::{read_program, CfaOffset, LinkAddr, Reg};

/// Each `OFF(v)` prints v's address relative to the CFA (rbp + 16 once the
/// frame is set up) together with the line it is written on: variables are
/// declared on the same line, so the line identifies shadowed ones.
const FRAMES_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#define OFF(v) printf("var %s %s %d %ld\n", __func__, #v, __LINE__, \
    (long)((char *)&(v) - ((char *)__builtin_frame_address(0) + 16)))

int gcounter = 5;
static long sglob[3][4];
__thread int tlsv = 8;

long f8(long a, char b, short c, int d, long e, int f, long g, char h) {
  long x = a + b + c + d + e + f + g + h; OFF(x);
  OFF(a); OFF(b); OFF(c); OFF(d); OFF(e); OFF(f); OFF(g); OFF(h);
  return x;
}

int shadow(int a) {
  int r = a; OFF(r);
  OFF(a);
  {
    int a = 2; OFF(a);
    r += a;
    {
      int a = 3; OFF(a);
      r += a;
    }
  }
  return r;
}

int gotoblk(int x) {
  if (x) goto in;
  x++;
  {
    int y = 4; OFF(y);
  in:
    y = x;
    x = y + 1;
  }
  return x;
}

int vla(int n) {
  int v[n];
  for (int i = 0; i < n; i++) v[i] = i;
  /* Report every frame slot holding the VLA's address. */
  char *cfa = (char *)__builtin_frame_address(0) + 16;
  for (long o = -8; o >= -256; o -= 8)
    if (*(void **)(cfa + o) == (void *)v) printf("vlaslot %ld\n", o);
  return v[n - 1];
}

int counter(void) {
  static int cnt = 0;
  printf("static cnt %p\n", (void *)&cnt);
  return ++cnt;
}

int f(void) { return 1; }
int g(void) { return 2; }
int h(int x) { return x + 3; }
int uses_rbx(int x) { return h(f()) + h(g()) + x; }
int uses_r12(int x) { int a = f() + g() * h(x); return a; }
int vsum(int n, ...) { return n; }
extern char **environ;

int main(int argc, char **argv) {
  (void)argv;
  printf("main %p\n", (void *)&main);
  printf("global gcounter %p\n", (void *)&gcounter);
  printf("global sglob %p\n", (void *)&sglob);
  long r = f8(1, 2, 3, 4, 5, 6, 7, 8) + shadow(argc) + gotoblk(0) + vla(3) + counter()
           + uses_rbx(1) + uses_r12(2) + tlsv + sglob[1][1] + gcounter + vsum(1, 2)
           + (environ != 0);
  return r == 0;
}
"#;

struct Report {
    /// (function, name, line) → CFA offset.
    vars: HashMap<(String, String, u32), i64>,
    /// (function, name) → CFA offsets (several for shadowed names).
    by_name: HashMap<(String, String), Vec<i64>>,
    addrs: HashMap<String, u64>,
    vla_slots: Vec<i64>,
}

fn parse_report(out: &str) -> Report {
    let mut r = Report {
        vars: HashMap::new(),
        by_name: HashMap::new(),
        addrs: HashMap::new(),
        vla_slots: Vec::new(),
    };
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex");
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["var", func, name, line, off] => {
                let off: i64 = off.parse().expect("offset");
                r.vars.insert(
                    (
                        func.to_string(),
                        name.to_string(),
                        line.parse().expect("line"),
                    ),
                    off,
                );
                r.by_name
                    .entry((func.to_string(), name.to_string()))
                    .or_default()
                    .push(off);
            }
            ["main", a] => {
                r.addrs.insert("main".into(), hex(a));
            }
            ["global", name, a] | ["static", name, a] => {
                r.addrs.insert(name.to_string(), hex(a));
            }
            ["vlaslot", o] => r.vla_slots.push(o.parse().expect("slot")),
            _ => {}
        }
    }
    r
}

fn cfa(v: &Variable) -> i64 {
    match v.location {
        VarLocation::Cfa(CfaOffset(n)) => n,
        ref other => panic!("{} is not at a CFA offset: {other:?}", v.name),
    }
}

fn var<'a>(p: &'a Program, func: &str, name: &str) -> &'a Variable {
    let f = p
        .function(func)
        .unwrap_or_else(|| panic!("no function {func}"));
    f.params
        .iter()
        .chain(&f.locals)
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no variable {name} in {func}"))
}

fn build_and_read(cc: Toolchain) -> (common::Built, Program, Report) {
    build_and_read_flags(cc, &[])
}

fn build_and_read_flags(cc: Toolchain, flags: &[&str]) -> (common::Built, Program, Report) {
    let b = build_flags(cc, "frames", &[("frames.c", FRAMES_C)], flags);
    let p = read_program(&b.bytes).unwrap_or_else(|e| panic!("{cc:?}: {e}"));
    let rep = parse_report(&run(&b.exe));
    (b, p, rep)
}

#[test]
fn every_variable_matches_the_running_program() {
    let mut configs: Vec<(Toolchain, &[&str])> =
        compilers().into_iter().map(|c| (c, &[][..])).collect();
    // DWARF 4: .debug_ranges, 1-based line-table files, DW_FORM_addr.
    configs.push((Toolchain::Gcc, &["-gdwarf-4"]));
    Toolchain::Clang.require();
    configs.push((Toolchain::Clang, &["-gdwarf-4"]));
    for (cc, flags) in configs {
        let (_b, p, rep) = build_and_read_flags(cc, flags);
        if !flags.is_empty() {
            let f = p.function("gotoblk").unwrap();
            assert!(p.files[f.decl_file.unwrap() as usize].ends_with("/frames.c"));
            let y = var(&p, "gotoblk", "y");
            assert_eq!(
                y.scope.len(),
                if cc.is_clang() { 1 } else { 2 },
                "{cc:?} {flags:?}"
            );
        }
        assert_eq!(rep.vars.len(), 14, "{cc:?}: every OFF() reported");
        for ((func, name, line), off) in &rep.vars {
            let f = p.function(func).unwrap();
            let cands: Vec<&Variable> = f
                .params
                .iter()
                .chain(&f.locals)
                .filter(|v| &v.name == name)
                .collect();
            assert!(!cands.is_empty(), "{cc:?}: {func}.{name} missing");
            // Params are declared on the function's line; locals on the OFF line.
            let v = cands
                .iter()
                .find(|v| v.decl_line == *line)
                .or_else(|| cands.iter().find(|v| v.is_param))
                .unwrap_or_else(|| panic!("{cc:?}: {func}.{name} at line {line} not found"));
            assert_eq!(cfa(v), *off, "{cc:?}: {func}.{name} line {line}");
        }
    }
}

#[test]
fn f8_parameters_where_the_compilers_put_them() {
    for cc in compilers() {
        let (_b, p, _) = build_and_read(cc);
        let f = p.function("f8").unwrap();
        let names: Vec<&str> = f.params.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d", "e", "f", "g", "h"], "{cc:?}");
        assert!(f.params.iter().all(|v| v.is_param));
        assert_eq!(
            cfa(var(&p, "f8", "g")),
            0,
            "{cc:?}: g stays in the caller's area"
        );
        if cc.is_clang() {
            assert_eq!(cfa(var(&p, "f8", "a")), -24, "clang: a at rbp-8");
            assert_eq!(cfa(var(&p, "f8", "h")), 8, "clang: h stays at fbreg +24");
        } else {
            assert_eq!(cfa(var(&p, "f8", "a")), -40, "{cc:?}: a at rbp-0x18");
            assert_eq!(
                cfa(var(&p, "f8", "h")),
                -68,
                "{cc:?}: h is copied to rbp-0x34"
            );
        }
        let long = p.type_name(var(&p, "f8", "a").ty);
        assert!(long.starts_with("long"), "{cc:?}: {long}");
        assert_eq!(p.type_name(var(&p, "f8", "h").ty), "char");
    }
}

#[test]
fn shadowed_variables_have_narrower_scopes() {
    for cc in compilers() {
        let (_b, p, rep) = build_and_read(cc);
        let f = p.function("shadow").unwrap();
        let mut a: Vec<&Variable> = f
            .params
            .iter()
            .chain(&f.locals)
            .filter(|v| v.name == "a")
            .collect();
        assert_eq!(a.len(), 3, "{cc:?}");
        // Outermost (the parameter) first, then by decl line.
        a.sort_by_key(|v| (!v.is_param, v.decl_line));
        assert_eq!(
            a[0].scope,
            vec![(f.low, f.high)],
            "{cc:?}: param spans the function"
        );
        let within = |inner: &Variable, outer: &Variable| {
            inner
                .scope
                .iter()
                .all(|&(lo, hi)| outer.scope.iter().any(|&(olo, ohi)| olo <= lo && hi <= ohi))
        };
        let len = |v: &Variable| v.scope.iter().map(|(l, h)| h.0 - l.0).sum::<u64>();
        for w in a.windows(2) {
            assert!(within(w[1], w[0]), "{cc:?}: scope not nested: {w:?}");
            assert!(len(w[1]) < len(w[0]), "{cc:?}: scope not narrower: {w:?}");
        }
        // Distinct slots, each the one the program used.
        let offs: Vec<i64> = a.iter().map(|v| cfa(v)).collect();
        let mut seen = rep.by_name[&("shadow".to_string(), "a".to_string())].clone();
        seen.sort();
        let mut got = offs.clone();
        got.sort();
        assert_eq!(got, seen, "{cc:?}");
    }
}

#[test]
fn goto_into_block_uses_ranges_under_gcc() {
    for cc in compilers() {
        let (_b, p, _) = build_and_read(cc);
        let f = p.function("gotoblk").unwrap();
        let y = var(&p, "gotoblk", "y");
        assert!(!y.scope.is_empty());
        for &(lo, hi) in &y.scope {
            assert!(
                f.low <= lo && lo < hi && hi <= f.high,
                "{cc:?}: {:?}",
                y.scope
            );
        }
        if !cc.is_clang() {
            // facts §2: the label's nop belongs to the outer scope, so gcc
            // describes the block with DW_AT_ranges (two pieces).
            assert_eq!(y.scope.len(), 2, "{cc:?}: {:?}", y.scope);
        }
    }
}

#[test]
fn vla_is_reached_through_a_frame_slot() {
    for cc in compilers() {
        let (_b, p, rep) = build_and_read(cc);
        let v = var(&p, "vla", "v");
        let arr = p.ty(v.ty).unwrap();
        assert!(
            matches!(arr, Type::Array { dims, .. } if dims == &[ArrayDim::Variable]),
            "{cc:?}: {arr:?}"
        );
        match &v.location {
            VarLocation::CfaIndirect(CfaOffset(n)) => {
                assert!(!cc.is_clang());
                assert!(
                    rep.vla_slots.contains(n),
                    "{cc:?}: slot {n} not in {:?}",
                    rep.vla_slots
                );
            }
            VarLocation::Complex(desc) => {
                // clang describes the VLA with a location list (facts §2).
                assert!(cc.is_clang(), "{cc:?}: {desc}");
                assert!(desc.contains("location list"), "{desc}");
            }
            other => panic!("{cc:?}: VLA location {other:?}"),
        }
        // The loop counter lives in the for-block's scope only.
        let i = var(&p, "vla", "i");
        let f = p.function("vla").unwrap();
        assert!(
            i.scope.iter().all(|&(l, h)| f.low < l && h <= f.high),
            "{cc:?}"
        );
    }
}

#[test]
fn statics_and_globals_match_symbols_and_runtime_addresses() {
    for cc in compilers() {
        let (b, p, rep) = build_and_read(cc);
        let syms = symbols(&b.bytes);
        let main = p.function("main").unwrap();
        let bias = rep.addrs["main"].wrapping_sub(main.low.0);
        if cc == Toolchain::GccNoPie {
            assert_eq!(bias, 0);
        }
        // The static local: owner set, address = symbol = runtime - bias.
        let cnt = p
            .globals
            .iter()
            .find(|g| g.name == "cnt")
            .unwrap_or_else(|| panic!("{cc:?}: static cnt missing"));
        assert_eq!(cnt.owner.as_deref(), Some("counter"), "{cc:?}");
        assert!(!cnt.external && !cnt.tls);
        assert_eq!(cnt.size, 4);
        assert_eq!(cnt.addr.0, rep.addrs["cnt"].wrapping_sub(bias), "{cc:?}");
        // gcc names the symbol cnt.0, clang counter.cnt.
        let sym = syms
            .iter()
            .find(|s| s.name == "cnt" || s.name.starts_with("cnt.") || s.name.ends_with(".cnt"))
            .expect("symbol of the static local");
        assert_eq!(cnt.addr.0, sym.addr, "{cc:?}");
        assert_eq!(
            var(&p, "counter", "cnt").location,
            VarLocation::Static(cnt.addr),
            "{cc:?}"
        );
        for name in ["gcounter", "sglob"] {
            let g = p.globals.iter().find(|g| g.name == name).unwrap();
            assert_eq!(g.owner, None);
            assert_eq!(
                g.addr.0,
                rep.addrs[name].wrapping_sub(bias),
                "{cc:?} {name}"
            );
            let s = symbol(&syms, name);
            assert_eq!((g.addr.0, g.size), (s.addr, s.size), "{cc:?} {name}");
        }
        assert!(
            p.globals
                .iter()
                .find(|g| g.name == "gcounter")
                .unwrap()
                .external
        );
        let sglob = p.globals.iter().find(|g| g.name == "sglob").unwrap();
        assert!(!sglob.external);
        assert_eq!(
            p.type_name(sglob.ty),
            "long int[3][4]".replace("long int", &long_name(cc))
        );
        let tls = p.globals.iter().find(|g| g.name == "tlsv").unwrap();
        assert!(tls.tls, "{cc:?}");
        let s = symbol(&syms, "tlsv");
        assert_eq!(s.kind, object::SymbolKind::Tls);
        assert_eq!(tls.addr.0, s.addr, "{cc:?}: TLS offset");
        // Sorted by address (non-TLS first).
        let keys: Vec<(bool, LinkAddr)> = p.globals.iter().map(|g| (g.tls, g.addr)).collect();
        assert!(keys.windows(2).all(|w| w[0] <= w[1]), "{cc:?}");
    }
}

fn long_name(cc: Toolchain) -> String {
    if cc.is_clang() { "long" } else { "long int" }.to_string()
}

#[test]
fn functions_match_the_symbol_table() {
    for cc in compilers() {
        let (b, p, _) = build_and_read(cc);
        let syms = symbols(&b.bytes);
        for name in [
            "f8", "shadow", "gotoblk", "vla", "counter", "f", "g", "h", "main",
        ] {
            let f = p.function(name).unwrap_or_else(|| panic!("{cc:?}: {name}"));
            let s = symbol(&syms, name);
            assert_eq!(s.kind, object::SymbolKind::Text);
            assert_eq!(
                (f.low.0, f.high.0 - f.low.0),
                (s.addr, s.size),
                "{cc:?} {name}"
            );
            assert!(f.external);
            assert_eq!(p.function_at(LinkAddr(f.low.0 + 1)).unwrap().name, name);
            let file = &p.files[f.decl_file.expect("decl file") as usize];
            assert!(file.ends_with("/frames.c"), "{file}");
            assert!(f.decl_line > 0);
        }
        assert!(p.function("vsum").unwrap().is_varargs, "{cc:?}");
        assert!(!p.function("f8").unwrap().is_varargs);
        // A declaration without storage (extern) is not a global here.
        assert!(p.globals.iter().all(|g| g.name != "environ"), "{cc:?}");
        let lows: Vec<LinkAddr> = p.functions.iter().map(|f| f.low).collect();
        assert!(
            lows.windows(2).all(|w| w[0] < w[1]),
            "{cc:?}: sorted by low"
        );
        // Every FUNC symbol covering our code has a Function (no crt code
        // has DWARF here, so we only check ours are all found).
        assert_eq!(
            p.function("main")
                .unwrap()
                .return_type
                .map(|t| p.type_name(t))
                .as_deref(),
            Some("int")
        );
        assert!(
            p.producers
                .iter()
                .any(|s| s.contains(if cc.is_clang() { "clang" } else { "GNU C" })),
            "{:?}",
            p.producers
        );
    }
}

#[test]
fn saved_registers_come_from_cfi_and_match_the_pushes() {
    for cc in compilers() {
        let (b, p, _) = build_and_read(cc);
        let rbp = (Reg::Rbp, CfaOffset(-16));
        let saved = |name: &str| -> Vec<(Reg, CfaOffset)> {
            p.function(name)
                .unwrap()
                .saved_regs
                .iter()
                .map(|s| (s.reg, s.offset))
                .collect()
        };
        for name in ["f8", "shadow", "f", "main"] {
            assert!(
                saved(name).contains(&rbp),
                "{cc:?} {name}: {:?}",
                saved(name)
            );
        }
        let prologue = |name: &str, n: usize| code_at(&b.bytes, p.function(name).unwrap().low.0, n);
        if cc.is_clang() {
            // clang keeps call temporaries in stack slots, never in rbx.
            assert_eq!(saved("uses_rbx"), vec![rbp], "clang");
        } else {
            // push rbp; mov rbp,rsp; push rbx
            assert_eq!(
                prologue("uses_rbx", 5),
                [0x55, 0x48, 0x89, 0xe5, 0x53],
                "{cc:?}"
            );
            assert_eq!(
                saved("uses_rbx"),
                vec![rbp, (Reg::Rbx, CfaOffset(-24))],
                "{cc:?}"
            );
            // push rbp; mov rbp,rsp; push r12; push rbx
            assert_eq!(
                prologue("uses_r12", 7),
                [0x55, 0x48, 0x89, 0xe5, 0x41, 0x54, 0x53],
                "{cc:?}"
            );
            assert_eq!(
                saved("uses_r12"),
                vec![rbp, (Reg::R12, CfaOffset(-24)), (Reg::Rbx, CfaOffset(-32))],
                "{cc:?}"
            );
            // The VLA's saved stack pointer lives in rbx (facts §4).
            assert!(saved("vla").contains(&(Reg::Rbx, CfaOffset(-24))), "{cc:?}");
        }
    }
}

#[test]
fn line_table_rows_and_files() {
    for cc in compilers() {
        let (_b, p, _) = build_and_read(cc);
        assert!(
            p.lines.windows(2).all(|w| w[0].addr <= w[1].addr),
            "{cc:?}: sorted"
        );
        let src = p
            .files
            .iter()
            .position(|f| f.ends_with("/frames.c"))
            .expect("source file listed") as u32;
        let mut dedup = p.files.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), p.files.len(), "{cc:?}: files deduplicated");
        for f in &p.functions {
            let rows = p.rows_in(f.low, f.high);
            assert!(rows.len() >= 2, "{cc:?} {}: {rows:?}", f.name);
            assert_eq!(rows[0].addr, f.low, "{cc:?} {}", f.name);
            assert!(!rows[0].end_sequence);
            assert_eq!(rows[0].file, src);
            assert_eq!(
                rows[0].line, f.decl_line,
                "{cc:?} {}: first row at the declaration",
                f.name
            );
            if cc.is_clang() {
                assert!(
                    rows.iter().any(|r| r.prologue_end),
                    "clang {}: prologue_end",
                    f.name
                );
            } else {
                // facts §2: gcc emits no prologue_end and marks every row is_stmt.
                assert!(
                    rows.iter().all(|r| r.is_stmt && !r.prologue_end),
                    "{cc:?} {}",
                    f.name
                );
            }
        }
        assert!(
            p.lines.iter().any(|r| r.end_sequence),
            "{cc:?}: end_sequence rows kept"
        );
        let last_main = p.function("main").unwrap();
        assert!(
            p.lines
                .iter()
                .any(|r| r.end_sequence && r.addr >= last_main.high),
            "{cc:?}: the sequence ends after the last function"
        );
    }
}

const CU_A: &str = "int second(int);\nint main(void) {\n  return second(1) - 2;\n}\n";
const CU_B: &str = "int second(int x) {\n  int y = x + 1;\n  return y;\n}\n";

#[test]
fn two_compilation_units() {
    for cc in compilers() {
        let b = build(cc, "twocu", &[("a.c", CU_A), ("b.c", CU_B)]);
        let p = read_program(&b.bytes).unwrap();
        assert_eq!(p.producers.len(), 2, "{cc:?}: {:?}", p.producers);
        let m = p.function("main").unwrap();
        let s = p.function("second").unwrap();
        assert!(p.files[m.decl_file.unwrap() as usize].ends_with("/a.c"));
        assert!(p.files[s.decl_file.unwrap() as usize].ends_with("/b.c"));
        // The first CU's sequence ends where the second's starts: the second
        // function's rows must start with its own first row.
        let rows = p.rows_in(s.low, s.high);
        assert_eq!(rows[0].addr, s.low, "{cc:?}");
        assert!(!rows[0].end_sequence, "{cc:?}: {rows:?}");
        assert_eq!(rows[0].line, 1);
        assert!(cfa(var(&p, "second", "x")) < 0);
    }
}

const REALIGN_C: &str = r#"
#include <stdio.h>
struct l24 { long a, b, c; };
int realign(int x) { _Alignas(32) int a = x; int b = x + 1; printf("%p %p\n", (void *)&a, (void *)&b); return a + b; }
int drap(int n) { _Alignas(32) int a = n; int v[n]; v[0] = a; printf("%p\n", (void *)&a); return v[0]; }
struct l24 mk(long x) { struct l24 s = {x, x + 1, x + 2}; return s; }
int main(void) { return realign(1) + drap(2) + (int)mk(3).b - 9; }
"#;

/// Realigned frames (rsp/rbx-based), DRAP frames (rbp-based, CFA from an
/// expression) and clang's NRVO (rdi-based) cannot be expressed as CFA
/// offsets: they are Complex, with the register named (facts §2, §9).
#[test]
fn realigned_drap_and_register_locations_are_complex() {
    let complex = |p: &Program, func: &str, name: &str| match &var(p, func, name).location {
        VarLocation::Complex(d) => d.clone(),
        other => panic!("{func}.{name}: {other:?}"),
    };
    for cc in compilers() {
        let b = build(cc, "realign", &[("r.c", REALIGN_C)]);
        let p = read_program(&b.bytes).unwrap();
        assert!(
            complex(&p, "realign", "a").starts_with("breg7 (rsp)"),
            "{cc:?}"
        );
        if cc.is_clang() {
            assert!(complex(&p, "drap", "a").starts_with("breg3 (rbx)"));
            assert!(complex(&p, "drap", "v").contains("location list"));
            assert_eq!(complex(&p, "mk", "s"), "breg5 (rdi) +0", "clang NRVO");
        } else {
            assert!(
                complex(&p, "drap", "a").starts_with("breg6 (rbp)"),
                "{cc:?}"
            );
            assert!(complex(&p, "drap", "v").ends_with("deref"), "{cc:?}");
            // The DRAP frame's rbp is saved through an expression, not at
            // a CFA offset, so no saved register is reported.
            assert!(p.function("drap").unwrap().saved_regs.is_empty(), "{cc:?}");
            assert!(matches!(var(&p, "mk", "s").location, VarLocation::Cfa(_)));
        }
    }
}
