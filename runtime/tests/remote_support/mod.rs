//! Helpers shared by the remote-call and loader tests: build real C programs
//! with the corpus harness (instrumented with the rewriter), start them
//! untraced, look up symbols and addresses.
#![allow(dead_code)]

use nix::unistd::Pid;
use object::{Object, ObjectSymbol};
use std::path::{Path, PathBuf};
use std::time::Duration;
use upstare_dwarf::{FileOffset, LinkAddr, LoadBias, RuntimeAddr};
use upstare_runtime::target::procfs;
pub use upstare_testkit::TempDir;
use upstare_testkit::{compile_c, instrument, CSource, ChildGuard, Toolchain};

/// Compile C text `src` with `toolchain` and `extra` flags into
/// `dir/name`, then instrument it with the rewriter (in place).
pub fn build(
    dir: &TempDir,
    name: &str,
    src: &str,
    toolchain: Toolchain,
    extra: &[&str],
) -> PathBuf {
    let out = dir.path().join(name);
    compile_c(CSource::Text(src), toolchain, extra, &out)
        .unwrap_or_else(|e| panic!("building {name}: {e}"));
    instrument(&out, &out)
}

/// Start `exe` untraced with piped stdio and wait for its `ready` line.
pub fn start(exe: &Path, args: &[&str]) -> ChildGuard {
    let child = upstare_testkit::spawn(exe, args).expect("spawn program");
    child
        .wait_for_line("ready line", Duration::from_secs(20), |l| {
            l.starts_with("ready")
        })
        .expect("program printed its ready line");
    child
}

/// The pid of a started child.
pub fn pid_of(child: &ChildGuard) -> Pid {
    Pid::from_raw(child.pid() as i32)
}

/// Link-time address of symbol `name` in `exe` (.symtab).
pub fn symbol(exe: &Path, name: &str) -> LinkAddr {
    let data = std::fs::read(exe).expect("read exe");
    let file = object::File::parse(&*data).expect("parse exe");
    let sym = file
        .symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("no symbol {name} in {}", exe.display()));
    LinkAddr(sym.address())
}

/// Load bias of `exe` in process `pid`, from its first PT_LOAD's mapping.
pub fn bias_in(pid: Pid, exe: &Path) -> LoadBias {
    use object::read::elf::{FileHeader, ProgramHeader};
    let data = std::fs::read(exe).expect("read exe");
    let hdr = object::elf::FileHeader64::<object::Endianness>::parse(&*data).expect("elf");
    let endian = hdr.endian().expect("endian");
    let ph = hdr
        .program_headers(endian, &*data)
        .expect("phdrs")
        .iter()
        .find(|p| p.p_type(endian) == object::elf::PT_LOAD)
        .expect("a PT_LOAD");
    let maps = procfs::read_maps(pid).expect("maps");
    let canon = std::fs::canonicalize(exe).expect("canonical path");
    procfs::load_bias_from_maps(
        pid,
        &maps,
        &canon,
        FileOffset(ph.p_offset(endian)),
        LinkAddr(ph.p_vaddr(endian)),
    )
    .expect("bias from maps")
}

/// Runtime address of `name` of `exe` running in `pid`.
pub fn runtime_symbol(pid: Pid, exe: &Path, name: &str) -> RuntimeAddr {
    symbol(exe, name).to_runtime(bias_in(pid, exe))
}

/// `/proc/PID/maps` as text.
pub fn maps_text(pid: Pid) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps")
}

/// Permissions (`rw-p`) of the mapping holding `addr`, if any.
pub fn perms_at(pid: Pid, addr: RuntimeAddr) -> Option<String> {
    procfs::read_maps(pid)
        .expect("maps")
        .into_iter()
        .find(|m| m.contains(addr))
        .map(|m| {
            let p = m.perms;
            format!(
                "{}{}{}{}",
                if p.read { 'r' } else { '-' },
                if p.write { 'w' } else { '-' },
                if p.exec { 'x' } else { '-' },
                if p.shared { 's' } else { 'p' }
            )
        })
}

/// Wait until every thread of `pid` sleeps in the kernel (state S), so that
/// a seize catches it blocked in its system call. Bounded.
pub fn wait_blocked(pid: Pid) {
    for _ in 0..2000 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if let Some(i) = stat.rfind(')') {
            if stat[i + 1..].trim_start().starts_with('S') {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("process {pid} never blocked");
}

/// Output of a finished child: (exit code, stdout).
pub fn finish(mut child: ChildGuard, stdin: &[u8]) -> (Option<i32>, String) {
    if !stdin.is_empty() {
        child.send_stdin(stdin).expect("send stdin");
    }
    child.close_stdin();
    let out = child.wait(Duration::from_secs(20)).expect("program ends");
    (out.status.code(), out.stdout)
}

/// The instrumented image `exe` running in `pid` as a state [`Image`]:
/// tables from its `.upstare` section, text from the tables, span over its
/// PT_LOAD segments.
pub fn running_image(pid: Pid, exe: &Path) -> upstare_runtime::engine::state::Image {
    use object::read::elf::{FileHeader, ProgramHeader};
    let data = std::fs::read(exe).expect("read exe");
    let tables = upstare_dwarf::read_tables(&data).expect("tables");
    let bias = bias_in(pid, exe);
    let hdr = object::elf::FileHeader64::<object::Endianness>::parse(&*data).expect("elf");
    let endian = hdr.endian().expect("endian");
    let loads: Vec<(u64, u64)> = hdr
        .program_headers(endian, &*data)
        .expect("phdrs")
        .iter()
        .filter(|p| p.p_type(endian) == object::elf::PT_LOAD)
        .map(|p| (p.p_vaddr(endian), p.p_vaddr(endian) + p.p_memsz(endian)))
        .collect();
    let lo = loads.iter().map(|l| l.0).min().expect("PT_LOAD") & !0xfff;
    let hi = (loads.iter().map(|l| l.1).max().expect("PT_LOAD") + 0xfff) & !0xfff;
    let text_lo = tables.binary.text_addr.to_runtime(bias);
    let text = text_lo..RuntimeAddr(text_lo.0 + tables.binary.text_size);
    upstare_runtime::engine::state::Image {
        path: std::fs::canonicalize(exe).expect("canonical"),
        bias,
        tables,
        text,
        span: LinkAddr(lo).to_runtime(bias)..LinkAddr(hi).to_runtime(bias),
    }
}
