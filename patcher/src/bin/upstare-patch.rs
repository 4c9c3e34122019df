//! `upstare-patch`: compare two instrumented versions, print what an update
//! from one to the other would do, and write it as a PATCH file.

#![forbid(unsafe_code)]

use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;
use upstare_patcher::patchfile;
use upstare_patcher::review::render_text;

/// Compare two instrumented versions of a program (OLD, the one running,
/// and NEW) and write the update from OLD to NEW as a PATCH file, without
/// touching any process.
///
/// It prints a review to read before updating anything: every type that
/// changed (members added, removed, moved, retyped, array lengths, enum
/// values), every global changed, added or removed and how its value is
/// carried over, every function whose frame changed, every continuation
/// that no longer exists, and what needs you, each with the SPEC line that
/// would settle it.
///
/// The PATCH records the plan and the identity (build id, SHA-256) of OLD
/// and NEW; `upstare-apply --pid PID PATCH` refuses a process that does not
/// run OLD. When something needs you, the PATCH is still written but marked
/// incomplete, and `upstare-apply` refuses it.
///
/// With --header, it writes C declarations instead, for writing
/// transformers: OLD's versions of the changed types renamed with a `__old`
/// suffix (`struct session__old`), NEW's under their own names, and for each
/// function whose frame changed `struct FUNC__frame__old` and
/// `struct FUNC__frame__new`, one pointer per local.
///
/// Exit status: 0 when nothing needs you, 2 when something does (PATCH
/// written, incomplete), 1 on error.
///
/// Examples:
///   upstare-patch server-v1.up server-v2.up -o v1-to-v2.patch
///   upstare-patch server-v1.up server-v2.up -o v1-to-v2.patch --json | jq .review
///   upstare-patch server-v1.up server-v2.up -o v1-to-v2.patch --spec v2.toml
///   upstare-patch --header server-v1.up server-v2.up -o transformers.h
///   upstare-apply --pid 4242 v1-to-v2.patch
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// The instrumented version the process runs.
    old: PathBuf,
    /// The instrumented version to update to.
    new: PathBuf,
    /// Where to write the PATCH (or, with --header, the C header).
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
    /// Print the plan and the review as JSON instead of text.
    #[arg(long, conflicts_with = "header")]
    json: bool,
    /// Write C declarations for transformers instead of a PATCH.
    #[arg(long)]
    header: bool,
    /// The user's overrides (TOML): renames, values of what NEW adds or of
    /// what has no default mapping, continuation mapping, frames that must
    /// not be active, C transformers (`[transformers]`: compiled with `cc`
    /// against the --header declarations, included as
    /// "upstare_transformers.h", into a shared object carried in the
    /// PATCH). Every key is checked against OLD and NEW.
    #[arg(long, value_name = "SPEC", conflicts_with = "header")]
    spec: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // The library's messages name the file and include their
            // cause: print the top one only.
            eprintln!("upstare-patch: error: {e}");
            std::process::exit(1);
        }
    }
}

fn run(cli: &Cli) -> Result<i32> {
    if cli.header {
        let (old, _) = patchfile::load_binary(&cli.old)?;
        let (new, _) = patchfile::load_binary(&cli.new)?;
        let text = upstare_patcher::header::header(&old, &new);
        patchfile::write_atomic(&cli.output, text.as_bytes())?;
        println!("wrote {}", cli.output.display());
        return Ok(0);
    }
    let (patch, r) = patchfile::make_patch_with_spec(&cli.old, &cli.new, cli.spec.as_deref())?;
    patchfile::write_patch(&cli.output, &patch)?;
    let complete = patch.is_complete();
    if cli.json {
        let v = serde_json::json!({
            "patch": cli.output,
            "complete": complete,
            "old": { "path": cli.old, "build_id": patch.old.build_id_hex(), "sha256": patch.old.sha256_hex() },
            "new": { "path": patch.new_path, "build_id": patch.new.build_id_hex(), "sha256": patch.new.sha256_hex() },
            "review": r,
            "plan": patch.plan,
            "transformers": patch.transformers.as_ref().map(|t| serde_json::json!({
                "source": t.source, "bytes": t.bytes.len(), "sha256": patchfile::hex(&t.sha256),
            })),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "update from {} to {}",
            cli.old.display(),
            patch.new_path.display()
        );
        print!("{}", render_text(&r));
        if let Some(t) = &patch.transformers {
            println!(
                "C transformers: built from {} ({} bytes, sha256 {}), carried in the PATCH",
                t.source.display(),
                t.bytes.len(),
                patchfile::hex(&t.sha256)
            );
            let tp = &patch.plan.transformers;
            for g in &tp.globals {
                for c in &g.calls {
                    println!("    {} on global {}", c.function, c.what);
                }
            }
            for l in &tp.locals {
                for c in &l.calls {
                    println!(
                        "    {} on {}: local {} (every active frame)",
                        c.function, l.function, c.what
                    );
                }
            }
            for f in &tp.frames {
                println!(
                    "    {} on every active frame of {}",
                    f.transformer, f.function
                );
            }
        }
        if complete {
            println!("wrote {}: complete", cli.output.display());
        } else {
            println!(
                "wrote {}: INCOMPLETE, {} item(s) need you (add the SPEC lines above); upstare-apply refuses it as it is",
                cli.output.display(),
                patch.needs_user.len()
            );
        }
    }
    Ok(if complete { 0 } else { 2 })
}
