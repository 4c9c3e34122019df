//! `upstare-apply`: update a running process to a new version of its
//! program, in place.

#![forbid(unsafe_code)]

use anyhow::{bail, Result};
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;
use upstare_patcher::patchfile::read_patch;
use upstare_runtime::update::tree::{apply_tree, TreeReport};
use upstare_runtime::update::{apply, signals, ApplyOptions, UpdateError, UpdateReport};

/// Update a running process to a new version of its program, in place: same
/// pid, same open files and connections, every thread's stack and every
/// global carried over.
///
/// Both the running program and NEW must have been instrumented with
/// `upstare-rewrite` (built -O0 -g -fno-omit-frame-pointer). Threads are
/// stopped at update points or while blocked in a safe call (read, accept,
/// nanosleep, pthread_mutex_lock, ...); if one cannot get there within
/// --timeout, nothing changes and the reason names the thread and where it is.
///
/// The process's descendants running the same program (the workers of a
/// pre-forking server, its sessions) are updated with it as one
/// application: every process stopped, then all updated or none;
/// --only-pid updates the one process. Descendants that run another
/// program are left alone and named.
///
/// An identity update (NEW a copy of the running file) must change nothing
/// observable; use it to check a program before a real update.
///
/// With a PATCH (made by `upstare-patch OLD NEW -o PATCH`) instead of --to,
/// it executes the PATCH's plan: NEW is read from the path the PATCH records
/// and must be the NEW it was made for, and a process that does not run OLD
/// is refused untouched. An incomplete PATCH (something needs you) is
/// refused, naming what.
///
/// Examples:
///   upstare-apply --pid 4242 --to ./server-v2.up
///   upstare-apply --pid 4242 ./v1-to-v2.patch
///   upstare-apply --pid 4242 --to ./server-v2.up --dry-run
///   upstare-apply --pid 4242 --to ./server-v2.up --json --timeout 2000
///   upstare-apply --pid 4242 --to ./server-v2.up --spec ./v2.toml
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// The process to update.
    #[arg(long)]
    pid: i32,
    /// The instrumented new version (the default plan is made now).
    #[arg(long, value_name = "NEW", required_unless_present = "patch")]
    to: Option<PathBuf>,
    /// A PATCH file from upstare-patch: its plan is executed.
    #[arg(value_name = "PATCH", conflicts_with = "to")]
    patch: Option<PathBuf>,
    /// Longest time, in milliseconds, the threads may take to reach update
    /// points.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    timeout: u64,
    /// Stop the process, plan and validate the update, then let it go on
    /// unchanged.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Refuse the update, instead of reporting it, when an untyped value
    /// would be left pointing into the old image.
    #[arg(long)]
    strict: bool,
    /// Keep the old blocks of heap objects that moved (their type grew)
    /// allocated instead of freeing them after the update, for debugging.
    #[arg(long)]
    keep_old_heap_objects: bool,
    /// The user's overrides of the default mapping (TOML): renames, values
    /// of what NEW adds, continuation mapping, frames that must not be
    /// active, C transformers (compiled now with `cc`). Every key is
    /// checked against both versions.
    #[arg(long, value_name = "SPEC")]
    spec: Option<PathBuf>,
    /// Update only this process. Without it the process's descendants
    /// that run the same program are updated with it, as one: all or none.
    #[arg(long)]
    only_pid: bool,
}

/// Lowers this process's OOM score as far as it is allowed to: the kernel's
/// OOM killer should pick anything but an updater holding a stopped target.
/// Unprivileged, only back down to the floor a privileged process set;
/// failing that changes nothing.
fn lower_oom_score() {
    for v in ["-1000", "0"] {
        if std::fs::write("/proc/self/oom_score_adj", v).is_ok() {
            return;
        }
    }
}

/// Writes `text` to stdout; a closed stdout (SIGPIPE is caught) is not an
/// error of the update.
fn out(text: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes()).and_then(|()| o.flush());
}

/// Exit status after a termination signal: 128 + its number, as a shell
/// reports a process it killed.
fn signal_status(sig: upstare_runtime::Sig) -> i32 {
    128 + sig.0
}

fn main() {
    let cli = Cli::parse();
    // Before anything is touched: from here on SIGINT, SIGTERM, SIGHUP,
    // SIGQUIT and SIGPIPE roll the update back instead of killing us.
    if let Err(e) = signals::catch_termination_signals() {
        eprintln!("upstare-apply: error: cannot catch termination signals: {e}");
        std::process::exit(1);
    }
    lower_oom_score();
    let result = run(&cli);
    signals::flush_target_signals();
    if let Some(counts) = signals::checkpoint_counts() {
        eprintln!("{counts}");
    }
    match result {
        Err(e) => {
            // The library's messages already include their causes: print the
            // top one only (`{:#}` would repeat each cause).
            if cli.json {
                out(&format!(
                    "{}\n",
                    serde_json::json!({ "ok": false, "error": e.to_string() })
                ));
            }
            eprintln!("upstare-apply: error: {e}");
            let status = match e.downcast_ref::<UpdateError>() {
                Some(UpdateError::Interrupted { sig, .. }) => signal_status(*sig),
                _ => signals::pending().map_or(1, signal_status),
            };
            std::process::exit(status);
        }
        Ok(()) => {
            // A signal that came once the commit had begun: the update was
            // finished (stopping half-way would break the process).
            if let Some(sig) = signals::pending() {
                eprintln!(
                    "upstare-apply: received {sig} during the commit: the update was completed first (process {})",
                    cli.pid
                );
                std::process::exit(signal_status(sig));
            }
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    let mut opts = ApplyOptions {
        timeout: Duration::from_millis(cli.timeout),
        dry_run: cli.dry_run,
        strict: cli.strict,
        keep_old_heap_objects: cli.keep_old_heap_objects,
        spec: match &cli.spec {
            Some(path) => Some((path.clone(), upstare_patcher::Spec::read(path)?)),
            None => None,
        },
        ..ApplyOptions::default()
    };
    let new_path = match (&cli.patch, &cli.to) {
        (Some(path), _) => {
            let patch = read_patch(path)?;
            if !patch.is_complete() {
                let items: Vec<String> = patch
                    .needs_user
                    .iter()
                    .map(|n| {
                        // The reason usually names the variable already.
                        if n.why.starts_with(&n.what) {
                            n.why.clone()
                        } else {
                            format!("{}: {}", n.what, n.why)
                        }
                    })
                    .collect();
                bail!(
                    "{} is incomplete: {} item(s) need you: {}; settle them with a SPEC and run upstare-patch again",
                    path.display(),
                    items.len(),
                    items.join("; ")
                );
            }
            opts.plan = Some(patch.plan);
            opts.expected_old = Some(patch.old);
            opts.expected_new = Some(patch.new);
            opts.transformers = patch.transformers;
            patch.new_path
        }
        (None, Some(to)) => to.clone(),
        (None, None) => bail!("give --to NEW or a PATCH file"),
    };
    if cli.only_pid {
        let report = apply(cli.pid, &new_path, &opts)?;
        if cli.json {
            let mut v = serde_json::to_value(&report)?;
            v["ok"] = serde_json::Value::Bool(true);
            out(&format!("{}\n", serde_json::to_string_pretty(&v)?));
        } else {
            out(&report_text(&report));
        }
        return Ok(());
    }
    let tree = apply_tree(cli.pid, &new_path, &opts)?;
    if cli.json {
        // The first process's report at the top (as with --only-pid), every
        // process under `processes`.
        let mut v = match tree.processes.first() {
            Some(first) => serde_json::to_value(first)?,
            None => serde_json::json!({}),
        };
        v["ok"] = serde_json::Value::Bool(true);
        v["processes"] = serde_json::to_value(&tree.processes)?;
        v["other_programs"] = serde_json::to_value(&tree.other_programs)?;
        v["exited"] = serde_json::to_value(&tree.exited)?;
        v["forked"] = serde_json::to_value(&tree.forked)?;
        out(&format!("{}\n", serde_json::to_string_pretty(&v)?));
    } else {
        out(&tree_text(&tree));
    }
    Ok(())
}

/// The report of a tree update in words: each process, then the ones left
/// alone.
fn tree_text(t: &TreeReport) -> String {
    use std::fmt::Write;
    let mut o: String = t.processes.iter().map(report_text).collect();
    if t.processes.len() > 1 {
        let pids: Vec<String> = t.processes.iter().map(|r| r.pid.to_string()).collect();
        let verb = if t.processes.iter().any(|r| r.dry_run) {
            "would be updated"
        } else {
            "updated"
        };
        let _ = writeln!(
            o,
            "{} processes {verb} as one ({}) in {} us",
            t.processes.len(),
            pids.join(", "),
            t.total_us
        );
    }
    for p in &t.forked {
        let _ = writeln!(o, "process {p} was forked during the update and included");
    }
    for p in &t.exited {
        let _ = writeln!(o, "process {p} ended during the update and was dropped");
    }
    for p in &t.other_programs {
        let _ = writeln!(
            o,
            "process {} runs another program ({}): left alone",
            p.pid,
            p.exe.display()
        );
    }
    o
}

/// The report in words.
fn report_text(r: &UpdateReport) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let verb = if r.dry_run { "would update" } else { "updated" };
    let _ = writeln!(
        o,
        "{verb} process {} from {} to {}",
        r.pid,
        r.from.display(),
        r.to.display()
    );
    for t in &r.threads {
        let _ = writeln!(
            o,
            "  thread {}: {}; {}",
            t.tid,
            t.state,
            t.frames.join(" <- ")
        );
    }
    if !r.dry_run {
        let _ = writeln!(
            o,
            "  {} globals copied, {} pointers remapped in {} heap objects, {} bytes written, \
             new image at {:#x}",
            r.globals_copied,
            r.heap_pointers_remapped,
            r.heap_objects,
            r.bytes_written,
            r.new_load_address.unwrap_or(0)
        );
        for c in &r.converted {
            let _ = writeln!(o, "  converted {c}");
        }
        if r.heap_converted_in_place + r.heap_moved > 0 {
            let _ = writeln!(
                o,
                "  heap objects of changed type: {} converted in place, {} moved",
                r.heap_converted_in_place, r.heap_moved
            );
        }
        for (ty, f) in &r.heap_types {
            let _ = writeln!(
                o,
                "  heap {ty}: {} found, {} converted in place, {} moved, {} pointers redirected, {} sweep hits",
                f.found, f.converted_in_place, f.moved, f.pointers_redirected, f.sweep_hits
            );
        }
        let s = &r.sweep;
        let _ = writeln!(
            o,
            "  sweep: {} bytes scanned, {} untyped pointers to functions and {} to globals \
             remapped, {} epoll registrations' data re-registered, {} left stale, untyped aliases \
             of moved heap objects: {} redirected, {} left, exceptions: {} COPY objects, {} \
             read-only data",
            s.bytes_scanned,
            s.remapped_functions,
            s.remapped_globals,
            s.epoll_remapped,
            s.stale,
            s.heap_aliases_redirected,
            s.heap_aliases_left,
            s.copy_exceptions,
            s.readonly_exceptions
        );
        let m = &r.retired;
        if !r.dry_run {
            let _ = writeln!(
                o,
                "  old image: {} mappings unmapped ({} bytes), {} kept{}",
                m.unmapped,
                m.unmapped_bytes,
                m.kept,
                if m.unmap_failed > 0 {
                    format!(", {} could not be unmapped", m.unmap_failed)
                } else {
                    String::new()
                }
            );
            for k in &m.kept_reasons {
                let _ = writeln!(o, "    kept {k}");
            }
        }
    }
    for c in &r.transformed {
        println!("  transformed: {c}");
    }
    for w in &r.warnings {
        let _ = writeln!(o, "  warning: {w}");
    }
    let t = &r.timings;
    let phases: Vec<String> = t
        .phases()
        .iter()
        .map(|(name, us)| format!("{name} {us} us"))
        .collect();
    let _ = writeln!(
        o,
        "  latency: {}; total {} us, of which paused {} us (stop to resume)",
        phases.join(", "),
        t.total_us,
        t.pause_us
    );
    o
}
