//! Generated struct evolutions, updated live: a seeded deterministic
//! generator writes programs of 20 global structs each. Per struct, an edit
//! script turns v1's declaration into v2's: members removed, added (with a
//! value in v2's initializer), reordered, widened (char → short → int →
//! long), and nested structs whose inner member widens and which gain a
//! member. v1 sets every member to a known value, then idles in a loop; it
//! is updated to v2 at a random update-point hit after that, and v2 prints
//! every member. The expected value of each member comes from the edit
//! script alone: a kept member keeps v1's value (v2's initializer holds a
//! decoy for it), an added one (top level or nested) has v2's initializer.
//! Zero mismatches over every case; half the programs are built with gcc,
//! half with clang.

mod apply_support;

use apply_support::*;
use std::fmt::Write as _;
use std::time::{Duration, Instant};
use upstare_runtime::update::ApplyOptions;
use upstare_testkit::{ExitStatus, Toolchain};

const PROGRAMS: usize = 20;
const STRUCTS: usize = 20;
const SEED: u64 = 0x5eed_7e57_0001;
/// Ticks of v1's idle loop (each: the loop head and show's entry).
const TICKS: &str = "4";

/// splitmix64: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// A nonzero value that fits a signed integer of `bits`.
    fn value(&mut self, bits: u32) -> i64 {
        // In [-(2^(bits-1) - 1), 2^(bits-1) - 1], computed in i128 (no overflow
        // for 64 bits).
        let max = (1i128 << (bits - 1)) - 1;
        let v = (self.next() as i128).rem_euclid(2 * max + 1) - max;
        if v == 0 {
            1
        } else {
            v as i64
        }
    }
}

/// Integer types in widening order.
const INTS: [(&str, u32); 4] = [("char", 8), ("short", 16), ("int", 32), ("long", 64)];

fn fmt_of(bits: u32) -> &'static str {
    if bits == 64 {
        "%ld"
    } else {
        "%d"
    }
}

/// One member of v2 and where its value comes from.
#[derive(Clone)]
enum Member {
    /// A scalar: v1's type index (None: added in v2), v2's type index.
    Int {
        name: String,
        old: Option<usize>,
        new: usize,
        /// v1's value (kept) or v2's initializer (added): what v2 must print.
        expect: i64,
        /// v2's initializer for a kept member: a decoy that must not show.
        decoy: i64,
    },
    /// A nested struct { int p; short q; } in v1; in v2 { long p; short q;
    /// int r; } (p widened, r added with v2's initializer).
    Nested {
        name: String,
        p: i64,
        q: i64,
        r: i64,
    },
}

/// One struct's evolution.
struct Case {
    /// v1's members in v1's order: (name, type index or None for nested).
    v1: Vec<(String, Option<usize>)>,
    /// v2's members in v2's order.
    v2: Vec<Member>,
    /// v1's values (set at run time), in v1's order; nested: (p, q).
    v1_values: Vec<(i64, i64)>,
    /// The v2 members were shuffled.
    reordered: bool,
}

impl Case {
    /// Edits of each kind: [removed, added, widened, nested, reordered].
    fn kinds(&self) -> [usize; 5] {
        let mut k = [0; 5];
        k[0] = self.v1.len();
        for m in &self.v2 {
            match m {
                Member::Int { old: None, .. } => k[1] += 1,
                Member::Int {
                    old: Some(o), new, ..
                } => {
                    k[0] -= 1;
                    k[2] += usize::from(o != new);
                }
                Member::Nested { .. } => {
                    k[0] -= 1;
                    k[3] += 1;
                }
            }
        }
        k[4] = usize::from(self.reordered);
        k
    }
}

fn gen_case(rng: &mut Rng, case: usize) -> Case {
    let count = 3 + rng.below(4) as usize;
    let mut v1 = Vec::new();
    let mut v1_values = Vec::new();
    let mut v2 = Vec::new();
    for m in 0..count {
        let name = format!("m{m}");
        let nested = rng.chance(20);
        if nested {
            let (p, q) = (rng.value(32), rng.value(16));
            v1.push((name.clone(), None));
            v1_values.push((p, q));
            if !rng.chance(15) {
                let r = rng.value(32);
                v2.push(Member::Nested { name, p, q, r });
            }
            continue;
        }
        let ty = rng.below(4) as usize;
        let value = rng.value(INTS[ty].1);
        v1.push((name.clone(), Some(ty)));
        v1_values.push((value, 0));
        if rng.chance(20) {
            continue; // removed in v2
        }
        let new = if ty < 3 && rng.chance(35) { ty + 1 } else { ty };
        let decoy = rng.value(INTS[ty].1);
        v2.push(Member::Int {
            name,
            old: Some(ty),
            new,
            expect: value,
            decoy,
        });
    }
    for a in 0..rng.below(3) {
        let ty = rng.below(4) as usize;
        let at = rng.below(v2.len() as u64 + 1) as usize;
        let init = rng.value(INTS[ty].1);
        v2.insert(
            at,
            Member::Int {
                name: format!("add{a}"),
                old: None,
                new: ty,
                expect: init,
                decoy: init,
            },
        );
    }
    let reordered = rng.chance(50);
    if reordered {
        // Fisher-Yates: a reordering, members keep their names.
        for i in (1..v2.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            v2.swap(i, j);
        }
    }
    if v2.is_empty() {
        v2.push(Member::Int {
            name: "only".into(),
            old: None,
            new: 2,
            expect: 1000 + case as i64,
            decoy: 1000 + case as i64,
        });
    }
    Case {
        v1,
        v2,
        v1_values,
        reordered,
    }
}

/// C source of version `n` of a program holding `cases`, and for v2 the
/// lines it must print after the update (one per struct).
fn program(cases: &[Case], n: u32) -> (String, Vec<String>) {
    let mut c = String::from("#include <stdio.h>\n#include <stdlib.h>\n\n");
    let mut set = String::new();
    let mut show = String::new();
    let mut expect = Vec::new();
    for (i, cs) in cases.iter().enumerate() {
        if n == 1 {
            let _ = writeln!(c, "struct n{i} {{ int p; short q; }};");
            let _ = writeln!(c, "struct s{i} {{");
            for ((name, ty), (a, b)) in cs.v1.iter().zip(&cs.v1_values) {
                match ty {
                    Some(t) => {
                        let _ = writeln!(c, "    {} {name};", INTS[*t].0);
                        let _ = writeln!(set, "    g{i}.{name} = {a};");
                    }
                    None => {
                        let _ = writeln!(c, "    struct n{i} {name};");
                        let _ = writeln!(set, "    g{i}.{name}.p = {a};\n    g{i}.{name}.q = {b};");
                    }
                }
            }
            let _ = writeln!(c, "}};\nstruct s{i} g{i};\n");
            continue;
        }
        let _ = writeln!(c, "struct n{i} {{ long p; short q; int r; }};");
        let _ = writeln!(c, "struct s{i} {{");
        let mut init = Vec::new();
        let mut fmt = format!("v2 s{i}");
        let mut args = String::new();
        let mut line = format!("v2 s{i}");
        for m in &cs.v2 {
            match m {
                Member::Int {
                    name,
                    old,
                    new,
                    expect,
                    decoy,
                } => {
                    let _ = writeln!(c, "    {} {name};", INTS[*new].0);
                    init.push(format!(".{name} = {decoy}"));
                    if old.is_some() {
                        // v2's own set_all (a fresh run) sets what v1 set.
                        let _ = writeln!(set, "    g{i}.{name} = {expect};");
                    }
                    let _ = write!(fmt, " {name}={}", fmt_of(INTS[*new].1));
                    let _ = write!(args, ", g{i}.{name}");
                    let _ = write!(line, " {name}={expect}");
                }
                Member::Nested { name, p, q, r } => {
                    let _ = writeln!(c, "    struct n{i} {name};");
                    // Decoys for the kept inner members, r's real value.
                    init.push(format!(".{name} = {{ .p = {}, .q = 0, .r = {r} }}", -p - 1));
                    let _ = writeln!(set, "    g{i}.{name}.p = {p};\n    g{i}.{name}.q = {q};");
                    let _ = write!(fmt, " {name}.p=%ld {name}.q=%d {name}.r=%d");
                    let _ = write!(args, ", g{i}.{name}.p, g{i}.{name}.q, g{i}.{name}.r");
                    let _ = write!(line, " {name}.p={p} {name}.q={q} {name}.r={r}");
                }
            }
        }
        let _ = writeln!(c, "}};\nstruct s{i} g{i} = {{ {} }};\n", init.join(", "));
        let _ = writeln!(show, "    printf(\"{fmt}\\n\"{args});");
        expect.push(line);
    }
    let _ = write!(
        c,
        "/* v1 sets every member; v2's copy sets the kept ones alike. */\n\
         static void set_all(void)\n{{\n{set}}}\n\n\
         static void show(long t)\n{{\n    printf(\"v{n} t=%ld\\n\", t);\n{show}}}\n\n\
         int main(int argc, char **argv)\n{{\n\
         \x20   long limit = argc > 1 ? atol(argv[1]) : 4;\n\
         \x20   long t;\n\
         \x20   setvbuf(stdout, NULL, _IOLBF, 0);\n\
         \x20   set_all();\n\
         \x20   for (t = 0; t < limit; t++)\n\
         \x20       show(t);\n\
         \x20   printf(\"v{n} done\\n\");\n\
         \x20   return 0;\n}}\n"
    );
    (c, expect)
}

#[test]
fn four_hundred_generated_struct_evolutions_updated_live() {
    let start = Instant::now();
    let dir = TempDir::new("types-gen");
    let mut rng = Rng(SEED);
    let mut mismatches = Vec::new();
    let mut cases_checked = 0usize;
    let mut kinds = [0usize; 5];
    for p in 0..PROGRAMS {
        let tc = if p % 2 == 0 {
            Toolchain::Gcc
        } else {
            Toolchain::Clang
        };
        let cases: Vec<Case> = (0..STRUCTS)
            .map(|i| gen_case(&mut rng, p * STRUCTS + i))
            .collect();
        for c in &cases {
            for (k, n) in kinds.iter_mut().zip(c.kinds()) {
                *k += n;
            }
        }
        let (src1, _) = program(&cases, 1);
        let (src2, expect) = program(&cases, 2);
        let v1 = build_c(&dir, &format!("gen{p}.v1"), &src1, tc);
        let v2 = build_c(&dir, &format!("gen{p}.v2"), &src2, tc);
        // Hits: main's entry, set_all's entry, then per tick the loop head
        // and show's entry, then the loop's last check. skip_hits = k
        // updates at hit k + 1: from the first loop head (after set_all)
        // to the last show (so v2 prints at least once).
        let (hits, _) = count_hits(&v1, &[TICKS], Some(1000));
        assert!(hits >= 5, "program {p}: {hits} hits");
        let k = 2 + rng.below(hits - 4);
        let mut run = TracedRun::spawn(&v1, &[TICKS]);
        let opts = ApplyOptions {
            timeout: Duration::from_secs(3),
            skip_hits: k,
            ..ApplyOptions::default()
        };
        let report = run.apply(&v2, &opts);
        let out = run.finish(Duration::from_secs(30)).expect("finish");
        if let Err(e) = report {
            panic!("program {p} [{tc}] at hit {k}: update refused: {e}\n{src2}");
        }
        assert_eq!(
            out.status,
            ExitStatus::Code(0),
            "program {p}: {}",
            out.stderr
        );
        // The last tick's lines: one per struct, after "v2 t=...".
        let lines: Vec<&str> = out.stdout.lines().collect();
        let at = lines
            .iter()
            .rposition(|l| l.starts_with("v2 t="))
            .unwrap_or_else(|| panic!("program {p}: no v2 tick:\n{}", out.stdout));
        for (i, want) in expect.iter().enumerate() {
            cases_checked += 1;
            let got = lines.get(at + 1 + i).copied().unwrap_or("<missing>");
            if got != want {
                mismatches.push(format!(
                    "program {p} [{tc}] hit {k} struct s{i}:\n got {got}\nwant {want}"
                ));
            }
        }
    }
    println!(
        "{cases_checked} generated struct evolutions in {PROGRAMS} programs, {} mismatches, {:.1} s",
        mismatches.len(),
        start.elapsed().as_secs_f64()
    );
    println!(
        "edits: {} members removed, {} added, {} widened, {} nested structs changed, {} structs \
         reordered",
        kinds[0], kinds[1], kinds[2], kinds[3], kinds[4]
    );
    assert_eq!(cases_checked, PROGRAMS * STRUCTS);
    // Every kind of edit is exercised many times.
    assert!(kinds.iter().all(|&k| k >= 50), "{kinds:?}");
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
