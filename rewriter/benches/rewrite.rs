//! Benchmark (not a test): rewriting a generated C program with many
//! functions, and the size of the tables as a share of `.text`.
//!
//! `cargo bench -p upstare-rewriter --bench rewrite [-- FUNCTIONS]`
//! (default 5000 functions). Needs gcc.

#[path = "../tests/common/gen.rs"]
mod gen;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5000);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-rewrite");
    std::fs::create_dir_all(&dir).expect("create bench dir");
    let src = dir.join(format!("gen{n}.c"));
    let bin = dir.join(format!("gen{n}"));
    std::fs::write(&src, gen::generate(n)).expect("write source");
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
