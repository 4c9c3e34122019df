//! Human-readable rendering of frame tables (`upstare-rewrite --dump`).

use std::fmt::Write;
use upstare_dwarf::fdt::{Arming, Callee, FrameTables, FunctionTable};
use upstare_dwarf::model::{type_name, VarLocation};

/// `file:line`, with the file shortened to its last component.
fn place(tables: &FrameTables, file: u32, line: u32) -> String {
    if line == 0 {
        return "?".into();
    }
    let name = tables
        .files
        .get(file as usize)
        .map(|f| f.rsplit('/').next().unwrap_or(f))
        .unwrap_or("?");
    format!("{name}:{line}")
}

fn location(loc: &VarLocation) -> String {
    match loc {
        VarLocation::Cfa(o) => format!("CFA{:+}", o.0),
        VarLocation::CfaIndirect(o) => format!("*(CFA{:+})", o.0),
        VarLocation::Static(a) => format!("static {a}"),
        VarLocation::Complex(d) => format!("complex: {d}"),
        VarLocation::None => "none".into(),
    }
}

/// Renders every function of `tables`, or only those whose name is in
/// `only` when it is non-empty.
pub fn render(tables: &FrameTables, only: &[String]) -> String {
    let mut out = String::new();
    let b = &tables.binary;
    let _ = writeln!(
        out,
        "binary: {} producer \"{}\", .text {} ({} bytes), {} functions, {} types, {} globals",
        if b.pie { "PIE" } else { "non-PIE" },
        b.producer,
        b.text_addr,
        b.text_size,
        tables.functions.len(),
        tables.types.len(),
        tables.globals.len()
    );
    if let Arming::Inline(i) = &tables.arming {
        let points: usize = tables.functions.iter().map(|f| f.update_points.len()).sum();
        let _ = writeln!(
            out,
            "arming: --inline-points, flag at {}, trampolines {}-{}, {} of {} update points detoured (the others int3)",
            i.flag,
            i.trampolines.0,
            i.trampolines.1,
            i.detours.len(),
            points
        );
    }
    if only.is_empty() {
        for g in &tables.globals {
            let owner = g
                .owner
                .as_deref()
                .map(|o| format!(" (static in {o})"))
                .unwrap_or_default();
            let tls = if g.tls { " tls" } else { "" };
            let _ = writeln!(
                out,
                "global {} : {} at {}{} size {}{}",
                g.name,
                type_name(&tables.types, g.ty),
                g.addr,
                tls,
                g.size,
                owner
            );
        }
    }
    for f in &tables.functions {
        if !only.is_empty() && !only.contains(&f.name) {
            continue;
        }
        render_function(&mut out, tables, f);
    }
    out
}

fn render_function(out: &mut String, tables: &FrameTables, f: &FunctionTable) {
    let decl = place(tables, f.decl_file.unwrap_or(0), f.decl_line);
    let _ = writeln!(
        out,
        "\nfunction {} [{}, {}) {}",
        f.name, f.low, f.high, decl
    );
    let saved: Vec<String> = f
        .saved_regs
        .iter()
        .map(|s| format!("{}@CFA{:+}", s.reg, s.offset.0))
        .collect();
    let _ = writeln!(
        out,
        "  frame: rsp=CFA{:+} after prologue, extent CFA{:+}, saved {}",
        f.body_depth.0,
        f.extent.0,
        if saved.is_empty() {
            "-".into()
        } else {
            saved.join(" ")
        }
    );
    for v in &f.vars {
        let scope: Vec<String> = v.scope.iter().map(|(a, b)| format!("{a}-{b}")).collect();
        let _ = writeln!(
            out,
            "  {:5} {:<16} {:<24} {:<14} scope {}",
            if v.is_param { "param" } else { "local" },
            v.name,
            type_name(&tables.types, v.ty),
            location(&v.location),
            scope.join(",")
        );
    }
    let inline = match &tables.arming {
        Arming::Inline(i) => Some(i),
        Arming::Int3 => None,
    };
    for p in &f.update_points {
        let detour = inline
            .and_then(|i| i.detour_at(p.addr))
            .map(|d| format!(" detour trap {} ({} bytes)", d.trap, d.displaced))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  point {:<8} {} {:<16} rsp=CFA{:+}{detour}",
            p.continuation().to_string(),
            p.addr,
            place(tables, p.file, p.line),
            p.stack_depth.0
        );
    }
    for c in &f.call_sites {
        let kind = match &c.callee {
            Callee::Direct(_) => "direct",
            Callee::Plt(_) => "plt",
            Callee::Indirect => "indirect",
        };
        let live: Vec<&str> = c.live_regs.iter().map(|r| r.name()).collect();
        let temps: Vec<String> = c
            .temp_slots
            .iter()
            .map(|t| format!("CFA{:+}/{}", t.offset.0, t.size))
            .collect();
        let _ = writeln!(
            out,
            "  call  {:<24} {} ret {} {:<8} {:<16} rsp=CFA{:+} live [{}] temps [{}] restart {}",
            c.continuation().to_string(),
            c.call_addr,
            c.return_addr,
            kind,
            place(tables, c.file, c.line),
            c.stack_depth.0,
            live.join(" "),
            temps.join(" "),
            c.restart.map_or("-".into(), |a| a.to_string())
        );
    }
}
