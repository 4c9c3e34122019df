//! `upstare-rewrite`: instrument a `-O0 -g -fno-omit-frame-pointer` x86-64
//! binary with frame-description tables, or show the tables of a binary.

#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use upstare_rewriter::{dump, elf, rewrite};

/// Instrument an x86-64 ELF built with `-O0 -g -fno-omit-frame-pointer` for
/// live updates, or dump the frame-description tables of a binary.
///
/// Rewriting keeps every loaded byte of IN at its address and adds a
/// non-loaded `.upstare` section with, per function, its update points,
/// call sites and frame layout. The result runs exactly like IN.
///
/// Examples:
///   upstare-rewrite server -o server.up
///   upstare-rewrite --dump server.up
///   upstare-rewrite --dump server.up --function main --function handle
///   upstare-rewrite --dump server.up --notes    # why a loop has no update point
///   upstare-rewrite --dump server.up --json | jq '.functions[].name'
///   upstare-rewrite server -o server.up --json  # refusals grouped by reason
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// The binary to instrument (or to dump, with --dump).
    input: PathBuf,
    /// Where to write the instrumented binary (required unless --dump).
    #[arg(short, long, value_name = "OUT")]
    output: Option<PathBuf>,
    /// Print the tables of INPUT instead of rewriting. INPUT may be an
    /// instrumented binary (its tables are decoded) or a plain one (its
    /// tables are computed, nothing is written).
    #[arg(long)]
    dump: bool,
    /// Print JSON: with --dump the tables; when rewriting, a summary, or
    /// on refusal every refused function grouped by reason.
    #[arg(long)]
    json: bool,
    /// With --dump: also explain what is missing (loops without an update
    /// point, calls without a restart address) and why.
    #[arg(long, requires = "dump")]
    notes: bool,
    /// With --dump: show only this function (repeatable).
    #[arg(long = "function", value_name = "NAME", requires = "dump")]
    functions: Vec<String>,
    /// Arm update points with one flag byte instead of one `int3` per
    /// point: each point whose first instructions can be displaced safely
    /// becomes a `jmp` to a trampoline (in a new executable segment) that
    /// traps only while the flag is set; the others keep `int3` and are
    /// listed (with --json: every one, with its reason).
    #[arg(long, conflicts_with = "dump")]
    inline_points: bool,
    /// Overwrite OUT if it exists.
    #[arg(short, long)]
    force: bool,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("upstare-rewrite: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: &Cli) -> Result<()> {
    let input = std::fs::read(&cli.input)
        .with_context(|| format!("cannot read {}", cli.input.display()))?;
    if cli.dump {
        return run_dump(cli, &input);
    }
    let Some(out) = &cli.output else {
        bail!("missing -o OUT (or use --dump to show tables); see --help");
    };
    if out.exists() && !cli.force {
        bail!("{} exists; pass --force to overwrite", out.display());
    }
    let start = Instant::now();
    let mode = if cli.inline_points {
        rewrite::PointsMode::Inline
    } else {
        rewrite::PointsMode::Int3
    };
    let done = match rewrite::rewrite_with(&input, mode) {
        Ok(d) => d,
        Err(e) => {
            if cli.json {
                let groups = rewrite::refusal_groups_of(&e);
                let v = serde_json::json!({ "ok": false, "refused": groups });
                println!("{v}");
            }
            return Err(e).with_context(|| format!("{}", cli.input.display()));
        }
    };
    write_atomically(out, &done.elf, &cli.input)?;
    let t = &done.tables;
    let points: usize = t.functions.iter().map(|f| f.update_points.len()).sum();
    let calls: usize = t.functions.iter().map(|f| f.call_sites.len()).sum();
    let share = if t.binary.text_size > 0 {
        100.0 * done.section_size as f64 / t.binary.text_size as f64
    } else {
        0.0
    };
    let detoured = match &t.arming {
        upstare_dwarf::fdt::Arming::Inline(i) => Some(i.detours.len()),
        upstare_dwarf::fdt::Arming::Int3 => None,
    };
    if cli.json {
        let mut v = serde_json::json!({
            "ok": true,
            "output": out.display().to_string(),
            "functions": t.functions.len(),
            "update_points": points,
            "call_sites": calls,
            "table_bytes": done.section_size,
        });
        if let Some(n) = detoured {
            v["inline_points"] = serde_json::json!({
                "detoured": n,
                "kept_int3": done.kept_int3,
            });
        }
        println!("{v}");
        return Ok(());
    }
    println!(
        "wrote {}: {} functions, {} update points, {} call sites; tables {} bytes ({:.1}% of .text), {:.0} ms",
        out.display(),
        t.functions.len(),
        points,
        calls,
        done.section_size,
        share,
        start.elapsed().as_secs_f64() * 1000.0
    );
    if let Some(n) = detoured {
        // A loop's point can also be its function's entry: one place.
        let places: std::collections::BTreeSet<_> = t
            .functions
            .iter()
            .flat_map(|f| f.update_points.iter().map(|p| p.addr))
            .collect();
        println!(
            "inline points: {n} of {} update points detoured to trampolines, {} keep int3",
            places.len(),
            done.kept_int3.len()
        );
        for k in &done.kept_int3 {
            println!("  {} at {}: {}", k.function, k.point, k.reason);
        }
    }
    Ok(())
}

fn run_dump(cli: &Cli, input: &[u8]) -> Result<()> {
    let tables = match elf::read_tables(input) {
        Ok(t) => t,
        Err(upstare_dwarf::TablesError::NoTables) => {
            rewrite::build_tables(input).with_context(|| format!("{}", cli.input.display()))?
        }
        Err(e) => return Err(e).with_context(|| format!("{}", cli.input.display())),
    };
    for name in &cli.functions {
        if tables.function(name).is_none() {
            bail!("{}: no function named {name}", cli.input.display());
        }
    }
    let mut stdout = std::io::stdout().lock();
    if cli.json {
        let mut t = tables;
        if !cli.functions.is_empty() {
            t.functions.retain(|f| cli.functions.contains(&f.name));
        }
        serde_json::to_writer_pretty(&mut stdout, &t)?;
        writeln!(stdout)?;
    } else {
        stdout.write_all(dump::render(&tables, &cli.functions).as_bytes())?;
    }
    if cli.notes {
        let notes =
            rewrite::analysis_notes(input).with_context(|| format!("{}", cli.input.display()))?;
        writeln!(stdout, "\nnotes:")?;
        for (function, lines) in notes {
            if !cli.functions.is_empty() && !cli.functions.contains(&function) {
                continue;
            }
            for l in lines {
                writeln!(stdout, "  {function}: {l}")?;
            }
        }
    }
    Ok(())
}

/// Writes `data` to a temporary file next to `out` and renames it into place,
/// so a failure never leaves a half-written output. Copies IN's permissions.
fn write_atomically(out: &Path, data: &[u8], input: &Path) -> Result<()> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out.file_name().context("output path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.upstare-tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        std::fs::write(&tmp, data).with_context(|| format!("cannot write {}", tmp.display()))?;
        let perms = std::fs::metadata(input)?.permissions();
        std::fs::set_permissions(&tmp, perms)?;
        std::fs::rename(&tmp, out).with_context(|| format!("cannot create {}", out.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
