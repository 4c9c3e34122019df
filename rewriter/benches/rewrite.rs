//! Benchmark (not a test): rewriting a generated C program with many
//! functions, and the size of the tables as a share of `.text`.
//!
//! `cargo bench -p upstare-rewriter --bench rewrite [-- FUNCTIONS]`
//! (default 5000 functions). Needs gcc.

use std::fmt::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// A program of `n` functions of varied shapes: loops, calls with call
/// temporaries, switches, struct parameters, many parameters.
fn generate(n: usize) -> String {
    let mut s = String::from(
        "#include <stdio.h>\nstruct pair { long a, b; };\nstruct big { long v[5]; };\nvolatile long sink;\n",
    );
    for i in 0..n {
        let _ = writeln!(s, "long f{i}(long x, int y, struct pair p);");
    }
    for i in 0..n {
        let callee = |k: usize| (i * 7 + k * 13 + 1) % n;
        match i % 5 {
            0 => {
                let _ = writeln!(
                    s,
                    "long f{i}(long x, int y, struct pair p) {{\n  long acc = p.a;\n  for (int k = 0; k < y; k++) {{\n    if (k == 3) continue;\n    acc += k * x;\n  }}\n  return acc + p.b;\n}}"
                );
            }
            1 => {
                let _ = writeln!(
                    s,
                    "long f{i}(long x, int y, struct pair p) {{\n  if (y <= 0) return x;\n  struct pair q = {{p.b, p.a}};\n  return f{}(x + 1, y - 1, q) + f{}(x, y - 2, p) * 2;\n}}",
                    callee(1),
                    callee(2)
                );
            }
            2 => {
                let _ = writeln!(
                    s,
                    "long f{i}(long x, int y, struct pair p) {{\n  long r = 0;\n  switch (y & 7) {{\n  case 0: r = x; break;\n  case 1: r = p.a; break;\n  case 2: r = p.b; break;\n  case 3: r = x * 3; break;\n  case 4: r = x - p.a; break;\n  case 5: r = -x; break;\n  default: r = 7;\n  }}\n  int n = 0;\n  while (n < 3) {{ sink = r + n; n++; }}\n  return r;\n}}"
                );
            }
            3 => {
                let _ = writeln!(
                    s,
                    "long f{i}(long x, int y, struct pair p) {{\n  char buf[64];\n  int len = snprintf(buf, sizeof buf, \"%ld-%d\", x, y);\n  long t = 0;\n  do {{ t += buf[--len]; }} while (len > 0);\n  return t + p.a;\n}}"
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "long f{i}(long x, int y, struct pair p) {{\n  long v[8];\n  for (int k = 0; k < 8; k++) v[k] = x ^ k;\n  return v[y & 7] + (y > 0 ? f{}(x, y - 1, p) : 0);\n}}",
                    callee(3)
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "int main(int argc, char **argv) {{\n  struct pair p = {{argc, 2}};\n  printf(\"%ld\\n\", f0(1, 3, p));\n  return 0;\n}}"
    );
    s
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5000);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-rewrite");
    std::fs::create_dir_all(&dir).expect("create bench dir");
    let src = dir.join(format!("gen{n}.c"));
    let bin = dir.join(format!("gen{n}"));
    std::fs::write(&src, generate(n)).expect("write source");
    let t = Instant::now();
    let status = Command::new("gcc")
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc failed");
    let compile = t.elapsed();
    let input = std::fs::read(&bin).expect("read binary");

    // Warm once, then take the best of three: rewriting is deterministic work.
    let mut best = f64::INFINITY;
    let mut result = None;
    for _ in 0..4 {
        let t = Instant::now();
        let r = upstare_rewriter::rewrite::rewrite(&input).expect("rewrite");
        best = best.min(t.elapsed().as_secs_f64());
        result = Some(r);
    }
    let r = result.expect("at least one run");
    let points: usize = r
        .tables
        .functions
        .iter()
        .map(|f| f.update_points.len())
        .sum();
    let calls: usize = r.tables.functions.iter().map(|f| f.call_sites.len()).sum();
    let text = r.tables.binary.text_size as f64;
    println!("functions           {}", r.tables.functions.len());
    println!("update points       {points}");
    println!("call sites          {calls}");
    println!(
        "gcc compile         {:.2} s (for scale)",
        compile.as_secs_f64()
    );
    println!("rewrite (best of 3) {:.3} s", best);
    println!(
        "tables              {} bytes = {:.1}% of .text ({} bytes); file grows {:.1}%",
        r.section_size,
        100.0 * r.section_size as f64 / text,
        text,
        100.0 * (r.elf.len() as f64 - input.len() as f64) / input.len() as f64
    );
}
