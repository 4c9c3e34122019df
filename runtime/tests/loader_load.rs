//! Loading a second, instrumented image (NEW) into a real running process:
//! file-backed mappings, imports bound exactly as the process binds them
//! (IFUNCs included), COPY-relocated data, NEW's functions callable, unload
//! leaving no trace, and the commit steps (destructors, signal handlers,
//! old code made non-executable).

mod remote_support;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use remote_support::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use upstare_dwarf::RuntimeAddr;
use upstare_runtime::engine::state::Image;
use upstare_runtime::load::{self, import_slots, load_image, Libraries, LoadOptions, LoadedImage};
use upstare_runtime::memory::TargetMemory;
use upstare_runtime::target::remote::{entry_gadget, RemoteCalls, RemoteError};
use upstare_runtime::Tracee;
use upstare_testkit::{ChildGuard, Toolchain};

pub const OLD: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

char src[64] = "hello, world";
char dst[64];
int extra;

static void on_usr1(int s) { (void)s; write(1, "old usr1\n", 9); }
__attribute__((destructor)) static void bye(void) { printf("bye old\n"); }

int old_only(int x) { return x * 3; }
extern char **environ;
char **old_env(void) { return environ; }
/* More of libc's IFUNCs, bound before `ready` (enough for NEW's loader to
   call its resolvers in one batch). */
int more_ifuncs(char *b) {
    memset(b, 0, 8);
    return strcmp(b, src) + (strchr(src, 'w') != 0);
}

int main(void) {
    char buf[64] = {0};
    signal(SIGUSR1, on_usr1);
    more_ifuncs(buf);
    size_t n = strlen(src);
    memcpy(dst, src, n + extra);
    printf("ready %d %zu %s\n", (int)getpid(), n, dst);
    fflush(stdout);
    ssize_t r = read(0, buf, sizeof buf - 1);
    printf("old read %zd\n", r);
    return 0;
}
"#;

pub const NEW: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;
char greeting[32] = "new version";
const char *gp = greeting;
int add(int a, int b) { return a + b; }
int (*fp)(int, int) = add;
int call_fp(int a, int b) { return fp(a, b); }
int fmt(char *buf, int n) { return snprintf(buf, 64, "value=%d %s", n, gp); }
size_t mylen(const char *s) { return strlen(s); }
void *mycopy(void *d, const void *s, size_t n) { return memcpy(d, s, n); }
void hello(void) { fputs("hello from new\n", stdout); fflush(stdout); }
int more_ifuncs(char *b) {
    memset(b, 0, 8);
    return strcmp(b, greeting) + (strchr(greeting, 'w') != 0);
}
FILE *out(void) { return stdout; }
char **env(void) { return environ; }

long big_bss[600];
int inited = 1234;
int ctor_ran;
long sum_bss(void) { long s = 0; for (int i = 0; i < 600; i++) s += big_bss[i]; return s; }
int get_inited(void) { return inited; }
int get_ctor_ran(void) { return ctor_ran; }

static void on_usr1(int s) { (void)s; write(1, "new usr1\n", 9); }
__attribute__((constructor)) static void hi(void) { ctor_ran = 1; printf("ctor new\n"); }
__attribute__((destructor)) static void bye(void) { printf("bye new\n"); }

int main(void) {
    char buf[64] = {0};
    signal(SIGUSR1, on_usr1);
    printf("%s %zu\n", gp, mylen(gp));
    ssize_t r = read(0, buf, sizeof buf - 1);
    printf("new read %zd\n", r);
    return 0;
}
"#;

/// OLD running (blocked in read) and seized, NEW built.
struct Setup {
    _dir: TempDir,
    old: PathBuf,
    new: PathBuf,
    child: upstare_testkit::ChildGuard,
    pid: Pid,
    tracee: Tracee,
    running: Image,
}

fn setup(tag: &str, new_src: &str, new_tc: Toolchain, new_flags: &[&str]) -> Setup {
    let dir = TempDir::new(tag);
    let old = build(&dir, "old", OLD, Toolchain::Gcc, &[]);
    let new = build(&dir, "new", new_src, new_tc, new_flags);
    let child = start(&old, &[]);
    let pid = pid_of(&child);
    wait_blocked(pid);
    let tracee = Tracee::seize(pid).expect("seize");
    let running = running_image(pid, &old);
    Setup {
        _dir: dir,
        old,
        new,
        child,
        pid,
        tracee,
        running,
    }
}

fn read_u64(pid: Pid, a: RuntimeAddr) -> u64 {
    upstare_runtime::ProcessMemory::open(pid)
        .read_u64(a)
        .expect("read target word")
}

/// Slot values by symbol name, for GLOB_DAT/JUMP_SLOT slots of `exe` loaded
/// with `bias` in `pid`.
fn slot_values(pid: Pid, exe: &Path, bias: upstare_dwarf::LoadBias) -> BTreeMap<String, u64> {
    let data = std::fs::read(exe).expect("read");
    import_slots(exe, &data)
        .expect("slots")
        .into_iter()
        .filter(|s| s.kind == 6 || s.kind == 7)
        .map(|s| (s.symbol.clone(), read_u64(pid, s.offset.to_runtime(bias))))
        .collect()
}

/// Loads `exe` (instrumented) into the seized process next to `running`.
fn load<'t>(
    tracee: &'t mut Tracee,
    pid: Pid,
    exe: &Path,
    running: &Image,
) -> Result<LoadedImage<'t>, load::LoadError> {
    let bytes = std::fs::read(exe).expect("read new");
    // No tables (an uninstrumented NEW): the loader must refuse it.
    let tables = upstare_dwarf::read_tables(&bytes).unwrap_or_default();
    load_image(
        tracee,
        pid,
        exe,
        &bytes,
        tables,
        running,
        &LoadOptions::default(),
    )
}

/// Lets OLD go: detaches, with `usr1` sends SIGUSR1 and waits for the
/// handler's line, then ends the program with `stdin` and expects exit 0
/// and the ready line followed by `rest` on stdout.
fn let_go(tracee: Tracee, child: ChildGuard, usr1: bool, stdin: &[u8], rest: &str) {
    let pid = pid_of(&child);
    tracee.detach().expect("detach");
    if usr1 {
        signal::kill(pid, Signal::SIGUSR1).expect("kill");
        child
            .wait_for_line("handler", Duration::from_secs(10), |l| l.ends_with("usr1"))
            .expect("handler ran");
    }
    let (code, out) = finish(child, stdin);
    assert_eq!(code, Some(0));
    assert_eq!(out, format!("ready {pid} 12 hello, world\n{rest}"));
}

#[test]
fn new_image_is_mapped_bound_like_the_process_and_callable_then_unloaded() {
    let mut s = setup("load", NEW, Toolchain::Gcc, &[]);
    let pid = s.pid;
    let maps_before = maps_text(pid);
    let regs_before = s.tracee.regs(pid).expect("regs");
    let libs = Libraries::read(pid).expect("libraries");
    assert!(libs.search_order().next().expect("main program").is_main());
    assert!(libs.has_library("libc.so.6"));
    let mut loaded = load(&mut s.tracee, pid, &s.new, &s.running).expect("load NEW");
    let new_canon = std::fs::canonicalize(&s.new).expect("canonical");
    assert_eq!(loaded.image().path, new_canon);
    let (new_bias, new_span) = (loaded.image().bias, loaded.image().span.clone());
    let new_exe = s.new.clone();
    let sym = move |n: &str| symbol(&new_exe, n).to_runtime(new_bias);
    assert!(loaded.report().relocations > 10, "{:?}", loaded.report());
    // memcpy, memset, strchr, strcmp, strlen: resolvers called in one
    // batch (from 4), checked below against what the dynamic linker bound.
    assert!(loaded.report().ifunc_calls >= 4, "{:?}", loaded.report());
    let copies: Vec<&str> = loaded
        .report()
        .copies
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(
        copies.contains(&"stdout")
            && (copies.contains(&"environ") || copies.contains(&"__environ")),
        "{copies:?}"
    );

    // /proc/PID/maps names NEW's file, executable, inside the span.
    let maps = upstare_runtime::target::procfs::read_maps(pid).expect("maps");
    let code: Vec<_> = maps
        .iter()
        .filter(|m| m.file() == Some(new_canon.as_path()))
        .collect();
    assert!(code.iter().any(|m| m.perms.exec && !m.perms.write));
    assert!(code.iter().any(|m| m.perms.write && !m.perms.exec));
    assert!(code
        .iter()
        .all(|m| new_span.start <= m.start && m.end <= new_span.end));
    assert_eq!(perms_at(pid, sym("add")).as_deref(), Some("r-xp"));
    // RELRO made read-only: the GOT of GLOB_DAT entries.
    let bytes = std::fs::read(&s.new).expect("read new");
    let slots = import_slots(&s.new, &bytes).expect("slots");
    let glob = slots.iter().find(|x| x.kind == 6).expect("a GLOB_DAT");
    assert_eq!(
        perms_at(pid, glob.offset.to_runtime(new_bias)).as_deref(),
        Some("r--p")
    );

    // Every import NEW shares with OLD holds what the process bound for
    // OLD (lazily bound entries that still point into OLD's PLT excepted).
    let old_vals = slot_values(pid, &s.old, s.running.bias);
    let new_vals = slot_values(pid, &s.new, new_bias);
    let mut compared = Vec::new();
    for (name, &nv) in &new_vals {
        let Some(&ov) = old_vals.get(name) else {
            continue;
        };
        if s.running.span.contains(&RuntimeAddr(ov)) {
            continue;
        }
        assert_eq!(nv, ov, "import {name}: NEW {nv:#x}, OLD {ov:#x}");
        compared.push(name.as_str());
    }
    for must in [
        "printf",
        "strlen",
        "memcpy",
        "read",
        "signal",
        "fflush",
        "__libc_start_main",
        "__cxa_finalize",
        "memset",
        "strcmp",
        "strchr",
    ] {
        assert!(
            compared.contains(&must),
            "{must} not compared: {compared:?}"
        );
    }
    // IFUNCs: the implementation, not the resolver.
    for ifunc in ["strlen", "memcpy", "memset", "strcmp", "strchr"] {
        let r = libs.lookup_symbol(ifunc, None).expect("libc defines it");
        assert!(r.ifunc, "{ifunc} is an IFUNC in libc");
        assert_ne!(new_vals[ifunc], r.addr.0, "{ifunc} bound to its resolver");
    }
    // Weak undefined: 0.
    assert_eq!(new_vals.get("__gmon_start__"), Some(&0));

    // NEW's functions run in the process.
    let gadget = entry_gadget(&s.old, s.running.bias).expect("gadget");
    let stdout_copy = libs
        .lookup_symbol("stdout", Some("GLIBC_2.2.5"))
        .expect("stdout")
        .addr;
    assert!(
        s.running.span.contains(&stdout_copy),
        "libc uses OLD's copy"
    );
    let libc_stdout = libs
        .lookup_symbol("_IO_2_1_stdout_", None)
        .expect("libc FILE")
        .addr;
    assert_eq!(read_u64(pid, stdout_copy), libc_stdout.0);
    let environ = libs.lookup_symbol("environ", None).expect("environ");
    // OLD names environ, so it has a COPY that libc uses: the live one.
    assert!(environ.library.is_main(), "{}", environ.library.name());
    let environ_copy = environ.addr;
    {
        let mut rc = RemoteCalls::new(loaded.tracee(), pid, gadget).expect("session");
        assert_eq!(rc.call(sym("add"), &[2, 3]).expect("add"), 5);
        assert_eq!(rc.call(sym("call_fp"), &[20, 22]).expect("call_fp"), 42);
        let buf = rc.scratch_alloc(64).expect("scratch");
        let n = rc.call(sym("fmt"), &[buf.0, 7]).expect("fmt");
        let text = rc.memory().read_vec(buf, n, 64).expect("buf");
        assert_eq!(String::from_utf8_lossy(&text), "value=7 new version");
        let s6 = rc.scratch_write(b"abcdef\0").expect("scratch");
        assert_eq!(rc.call(sym("mylen"), &[s6.0]).expect("mylen"), 6);
        let d = rc.scratch_alloc(16).expect("scratch");
        assert_eq!(
            rc.call(sym("mycopy"), &[d.0, s6.0, 7]).expect("mycopy"),
            d.0
        );
        assert_eq!(rc.memory().read_vec(d, 7, 64).expect("copied"), b"abcdef\0");
        assert_eq!(rc.call(sym("out"), &[]).expect("out"), libc_stdout.0);
        assert_eq!(
            rc.call(sym("env"), &[]).expect("env"),
            read_u64(pid, environ_copy)
        );
        rc.call(sym("hello"), &[]).expect("hello");
        // .data as in the file, .bss zero, constructors not run.
        assert_eq!(rc.call(sym("get_inited"), &[]).expect("inited"), 1234);
        assert_eq!(rc.call(sym("sum_bss"), &[]).expect("sum_bss"), 0);
        assert_eq!(rc.call(sym("get_ctor_ran"), &[]).expect("ctor_ran"), 0);
        rc.finish().expect("restore");
    }
    // The guard dereferences to the tracee: use both together.
    {
        let new_img = loaded.image();
        let mem = loaded.memory();
        let inited = new_img.runtime(symbol(&s.new, "inited"));
        assert_eq!(mem.read_u32(inited).expect("inited"), 1234);
        assert_eq!(loaded.regs(pid).expect("regs"), regs_before);
        loaded.set_regs(pid, &regs_before).expect("set regs");
    }

    loaded.unload().expect("unload");
    assert_eq!(
        maps_text(pid),
        maps_before,
        "unload leaves the maps as before"
    );
    assert_eq!(s.tracee.regs(pid).expect("regs"), regs_before);
    let_go(
        s.tracee,
        s.child,
        false,
        b"data\n",
        "hello from new\nold read 5\nbye old\n",
    );
}

#[test]
fn dropping_the_guard_unloads() {
    let mut s = setup("drop", NEW, Toolchain::Gcc, &[]);
    let pid = s.pid;
    let maps_before = maps_text(pid);
    {
        let loaded = load(&mut s.tracee, pid, &s.new, &s.running).expect("load NEW");
        assert!(maps_text(pid).contains(loaded.image().path.to_str().expect("utf-8")));
    }
    assert_eq!(maps_text(pid), maps_before);
    let_go(s.tracee, s.child, false, b"x\n", "old read 2\nbye old\n");
}

#[test]
fn commit_moves_signal_handlers_and_destructors_to_new() {
    let mut s = setup("commit", NEW, Toolchain::Gcc, &[]);
    let pid = s.pid;
    let mut loaded = load(&mut s.tracee, pid, &s.new, &s.running).expect("load NEW");
    let new_bias = loaded.image().bias;
    let mut plan = loaded.plan_commit(&s.running).expect("plan commit");
    // SIGUSR1's handler moves from OLD's on_usr1 to NEW's.
    assert_eq!(plan.handlers.len(), 1, "{:?}", plan.handlers);
    let h = &plan.handlers[0];
    assert_eq!(h.sig, libc::SIGUSR1);
    assert_eq!(
        h.old.handler,
        symbol(&s.old, "on_usr1").to_runtime(s.running.bias).0
    );
    assert_eq!(
        h.new.handler,
        symbol(&s.new, "on_usr1").to_runtime(new_bias).0
    );
    assert_eq!(
        (h.new.flags, h.new.mask, h.new.restorer),
        (h.old.flags, h.old.mask, h.old.restorer)
    );
    let tags: Vec<&str> = plan.fini.writes.iter().map(|w| w.tag).collect();
    assert_eq!(tags, ["DT_FINI", "DT_FINI_ARRAY", "DT_FINI_ARRAYSZ"]);
    // OLD's main is still on the stack here (no stack rebuild in this
    // test): keep its code executable.
    assert!(!plan.retire.is_empty());
    plan.retire.clear();
    let new = loaded.commit(&plan).expect("commit");
    // The new image stays mapped after the guard is gone.
    assert_eq!(
        perms_at(pid, new.runtime(symbol(&s.new, "add"))).as_deref(),
        Some("r-xp")
    );
    let_go(
        s.tracee,
        s.child,
        true,
        b"abc\n",
        "new usr1\nold read 4\nbye new\n",
    );
}

#[test]
fn a_second_update_redirects_destructors_and_handlers_again() {
    let mut s = setup("twice", NEW, Toolchain::Gcc, &[]);
    let pid = s.pid;
    let new2_src = NEW
        .replace("\"new usr1\\n\", 9", "\"new2 usr1\\n\", 10")
        .replace("bye new\\n", "bye new2\\n");
    assert_ne!(new2_src, NEW);
    let new2 = build(&s._dir, "new2", &new2_src, Toolchain::Gcc, &[]);
    let load_commit = |t: &mut Tracee, exe: &Path, running: &Image| -> Image {
        let mut loaded = load(t, pid, exe, running).expect("load");
        let mut plan = loaded.plan_commit(running).expect("plan");
        assert_eq!(plan.handlers.len(), 1);
        assert_eq!(plan.fini.writes.len(), 3);
        // OLD's main stays on the stack in this test: keep code executable.
        plan.retire.clear();
        loaded.commit(&plan).expect("commit")
    };
    let v1 = load_commit(&mut s.tracee, &s.new, &s.running);
    let v2 = load_commit(&mut s.tracee, &new2, &v1);
    assert_ne!(v1.bias, v2.bias);
    let_go(
        s.tracee,
        s.child,
        true,
        b"abc\n",
        "new2 usr1\nold read 4\nbye new2\n",
    );
}

#[test]
fn a_program_rebuilt_in_place_loads_from_the_same_path() {
    let mut s = setup("inplace", NEW, Toolchain::Gcc, &[]);
    let pid = s.pid;
    // Replace OLD's file by NEW (rename: the running inode survives, the
    // kernel shows the mapping as deleted).
    let tmp = s._dir.path().join("old.tmp");
    std::fs::copy(&s.new, &tmp).expect("copy");
    std::fs::rename(&tmp, &s.old).expect("rename");
    assert!(maps_text(pid).contains("(deleted)"));
    let maps_before = maps_text(pid);
    let mut loaded =
        load(&mut s.tracee, pid, &s.old, &s.running).expect("load the rebuilt program");
    let new_img_bias = loaded.image().bias;
    let gadget = upstare_runtime::target::remote::exe_entry(pid).expect("entry");
    {
        let mut rc = RemoteCalls::new(loaded.tracee(), pid, gadget).expect("session");
        let add = symbol(&s.new, "add").to_runtime(new_img_bias);
        assert_eq!(rc.call(add, &[1, 2]).expect("add"), 3);
        let out = symbol(&s.new, "out").to_runtime(new_img_bias);
        let libs = Libraries::read(pid).expect("libs");
        assert!(libs.search_order().next().expect("main program").is_main());
        let libc_stdout = libs
            .lookup_symbol("_IO_2_1_stdout_", None)
            .expect("FILE")
            .addr;
        assert_eq!(rc.call(out, &[]).expect("out"), libc_stdout.0);
        rc.finish().expect("restore");
    }
    loaded.unload().expect("unload");
    assert_eq!(maps_text(pid), maps_before);
    let_go(s.tracee, s.child, false, b"z\n", "old read 2\nbye old\n");
}

#[test]
fn retiring_the_old_image_makes_stale_code_pointers_trap() {
    let mut s = setup("retire", NEW, Toolchain::Gcc, &[]);
    let pid = s.pid;
    let old_canon = std::fs::canonicalize(&s.old).expect("canonical");
    let loaded = load(&mut s.tracee, pid, &s.new, &s.running).expect("load NEW");
    let mut warnings = Vec::new();
    let new = load::finish_commit(loaded, &s.running, &mut warnings).expect("commit");
    let maps = upstare_runtime::target::procfs::read_maps(pid).expect("maps");
    assert!(
        !maps
            .iter()
            .any(|m| m.file() == Some(old_canon.as_path()) && m.perms.exec),
        "no executable mapping of OLD left:\n{}",
        maps_text(pid)
    );
    assert!(maps
        .iter()
        .any(|m| m.file() == Some(new.path.as_path()) && m.perms.exec));
    // A call into OLD's code now faults; NEW's code still runs.
    let gadget = entry_gadget(&new.path, new.bias).expect("gadget");
    let old_fn = symbol(&s.old, "old_only").to_runtime(s.running.bias);
    {
        let mut rc = RemoteCalls::new(&mut s.tracee, pid, gadget).expect("session");
        match rc.call(old_fn, &[5]) {
            Err(RemoteError::Fault { sig, rip, .. }) => {
                assert_eq!(sig.0, libc::SIGSEGV);
                assert_eq!(rip, old_fn);
            }
            other => panic!("call into retired code: {other:?}"),
        }
        let add = new.runtime(symbol(&s.new, "add"));
        assert_eq!(rc.call(add, &[40, 2]).expect("add"), 42);
        // The old entry point cannot be a gadget any more.
        drop(rc);
        let old_gadget = entry_gadget(&s.old, s.running.bias).expect("entry");
        assert!(matches!(
            RemoteCalls::new(&mut s.tracee, pid, old_gadget),
            Err(RemoteError::BadGadget { .. })
        ));
    }
    drop(s.tracee);
    drop(s.child);
}

/// A non-PIE image: LinkAddr ranges are fixed.
#[test]
fn non_pie_new_is_refused_and_the_process_is_unchanged() {
    let s = setup("nopie", NEW, Toolchain::GccNoPie, &[]);
    refused(s, |e| {
        assert!(matches!(e, load::LoadError::NotPie { .. }), "{e:?}");
        assert!(e.to_string().contains("not position-independent"), "{e}");
    });
}

#[test]
fn new_needing_a_library_the_process_lacks_is_refused() {
    let src = NEW.replace(
        "int add(int a, int b) { return a + b; }",
        "#include <zlib.h>\nint add(int a, int b) { return a + b + (zlibVersion() == 0); }",
    );
    let s = setup(
        "nolib",
        &src,
        Toolchain::Gcc,
        &["-Wl,--no-as-needed", "-lz"],
    );
    assert!(
        !maps_text(s.pid).contains("libz"),
        "the process must not have libz already"
    );
    let maps_now = maps_text(s.pid);
    refused(s, |e| {
        match e {
            // -lm of the harness is kept by --no-as-needed too: every
            // missing library is named.
            load::LoadError::MissingLibrary { library, .. } => {
                let names: Vec<&str> = library.split(", ").collect();
                assert!(names.contains(&"libz.so.1"), "{library}");
                for n in names {
                    assert!(
                        !maps_now.contains(n.trim_end_matches(".so.1").trim_end_matches(".so.6")),
                        "{n} is mapped"
                    );
                }
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("needs library libz.so.1"), "{e}");
    });
}

#[test]
fn new_with_its_own_thread_locals_is_refused() {
    let src = NEW.replace(
        "int add(int a, int b) { return a + b; }",
        "__thread int tls_counter;\nint add(int a, int b) { tls_counter++; return a + b; }",
    );
    let s = setup("tls", &src, Toolchain::Gcc, &[]);
    refused(s, |e| {
        assert!(matches!(e, load::LoadError::OwnTls { .. }), "{e:?}");
        assert!(e.to_string().contains("PT_TLS"), "{e}");
    });
}

#[test]
fn uninstrumented_new_is_refused() {
    let s = setup("plain", NEW, Toolchain::Gcc, &[]);
    // Rebuild NEW without the rewriter.
    let plain = s._dir.path().join("plain");
    upstare_testkit::compile_c(
        upstare_testkit::CSource::Text(NEW),
        Toolchain::Gcc,
        &[],
        &plain,
    )
    .expect("build");
    let s = Setup { new: plain, ..s };
    refused(s, |e| {
        assert!(matches!(e, load::LoadError::NoTables { .. }), "{e:?}");
        assert!(e.to_string().contains("no .upstare section"), "{e}");
    });
}

#[test]
fn new_for_another_machine_is_refused() {
    let s = setup("machine", NEW, Toolchain::Gcc, &[]);
    let mut bytes = std::fs::read(&s.new).expect("read");
    // e_machine = EM_AARCH64.
    bytes[18..20].copy_from_slice(&183u16.to_le_bytes());
    let other = s._dir.path().join("aarch64");
    std::fs::write(&other, &bytes).expect("write");
    let s = Setup { new: other, ..s };
    refused(s, |e| {
        assert!(
            matches!(e, load::LoadError::NotX86_64 { machine: 183, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("not an x86-64 ELF file"), "{e}");
    });
}

/// Load NEW, expect a refusal checked by `check`, then show the process
/// unchanged: same maps and registers, and the output of an undisturbed run.
fn refused(mut s: Setup, check: impl FnOnce(&load::LoadError)) {
    let pid = s.pid;
    let maps_before = maps_text(pid);
    let regs_before = s.tracee.regs(pid).expect("regs");
    let err = load(&mut s.tracee, pid, &s.new, &s.running).expect_err("NEW must be refused");
    check(&err);
    assert!(!err.to_string().contains('\n'), "one line: {err}");
    assert_eq!(maps_text(pid), maps_before);
    assert_eq!(s.tracee.regs(pid).expect("regs"), regs_before);
    let_go(s.tracee, s.child, false, b"same\n", "old read 5\nbye old\n");
}
