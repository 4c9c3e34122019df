//! The loader on other kinds of input: NEW built by clang, NEW with its own
//! IFUNC (IRELATIVE) and packed relative relocations (RELR), imports from a
//! library other than libc (and one it lacks a symbol of), and symbol
//! versions resolved as the dynamic linker does.

mod remote_support;
use nix::unistd::Pid;
use remote_support::*;
use std::path::{Path, PathBuf};
use upstare_dwarf::RuntimeAddr;
use upstare_runtime::load::{import_slots, load_image, Libraries, LoadError, LoadOptions};
use upstare_runtime::memory::TargetMemory;
use upstare_runtime::target::remote::{entry_gadget, RemoteCalls};
use upstare_runtime::Tracee;
use upstare_testkit::{compile_c, CSource, Toolchain};

const OLD: &str = r#"
#include <stdio.h>
#include <string.h>
#include <unistd.h>
char src[32] = "old";
int main(void) {
    char buf[64] = {0};
    printf("ready %d %zu\n", (int)getpid(), strlen(src));
    fflush(stdout);
    ssize_t r = read(0, buf, sizeof buf - 1);
    printf("old read %zd\n", r);
    return 0;
}
"#;

const NEW: &str = r#"
#include <stdio.h>
#include <string.h>
#include <unistd.h>
char greeting[32] = "new version";
const char *gp = greeting;
int add(int a, int b) { return a + b; }
int (*fp)(int, int) = add;
int call_fp(int a, int b) { return fp(a, b); }
int fmt(char *buf, int n) { return snprintf(buf, 64, "value=%d %s", n, gp); }
FILE *out(void) { return stdout; }
size_t mylen(const char *s) { return strlen(s); }
int main(void) {
    char buf[64] = {0};
    printf("%s %zu\n", gp, mylen(gp));
    ssize_t r = read(0, buf, sizeof buf - 1);
    printf("new read %zd\n", r);
    return 0;
}
"#;

fn read_u64(pid: Pid, a: RuntimeAddr) -> u64 {
    upstare_runtime::ProcessMemory::open(pid)
        .read_u64(a)
        .expect("read target word")
}

/// Start `old` (blocked in read), load `new`, run `check` with NEW's
/// symbol lookup and a remote session, unload, and check that the program
/// then finishes as if nothing happened (its output is `expect_out`).
fn load_and_check(
    old: &Path,
    new: &Path,
    expect_out: impl Fn(Pid) -> String,
    check: impl FnOnce(Pid, &dyn Fn(&str) -> RuntimeAddr, &mut RemoteCalls<'_>),
) {
    let child = start(old, &[]);
    let pid = pid_of(&child);
    wait_blocked(pid);
    let mut tracee = Tracee::seize(pid).expect("seize");
    let running = running_image(pid, old);
    let maps_before = maps_text(pid);
    let bytes = std::fs::read(new).expect("read new");
    let tables = upstare_dwarf::read_tables(&bytes).expect("tables");
    let mut loaded = load_image(
        &mut tracee,
        pid,
        new,
        &bytes,
        tables,
        &running,
        &LoadOptions::default(),
    )
    .expect("load NEW");
    let bias = loaded.image().bias;
    let new_exe = new.to_path_buf();
    let sym = move |n: &str| symbol(&new_exe, n).to_runtime(bias);
    let gadget = entry_gadget(old, running.bias).expect("gadget");
    {
        let mut rc = RemoteCalls::new(loaded.tracee(), pid, gadget).expect("session");
        check(pid, &sym, &mut rc);
        rc.finish().expect("restore");
    }
    loaded.unload().expect("unload");
    assert_eq!(maps_text(pid), maps_before);
    tracee.detach().expect("detach");
    let (code, out) = finish(child, b"12345\n");
    assert_eq!(code, Some(0));
    assert_eq!(out, expect_out(pid));
}

fn fmt_check(sym: &dyn Fn(&str) -> RuntimeAddr, rc: &mut RemoteCalls<'_>) {
    assert_eq!(rc.call(sym("add"), &[2, 3]).expect("add"), 5);
    assert_eq!(rc.call(sym("call_fp"), &[20, 22]).expect("call_fp"), 42);
    let buf = rc.scratch_alloc(64).expect("scratch");
    let n = rc.call(sym("fmt"), &[buf.0, 9]).expect("fmt");
    let text = rc.memory().read_vec(buf, n, 64).expect("buf");
    assert_eq!(String::from_utf8_lossy(&text), "value=9 new version");
}

#[test]
fn clang_built_new_in_a_gcc_built_process() {
    Toolchain::Clang.require();
    let dir = TempDir::new("clang");
    let old = build(&dir, "old", OLD, Toolchain::Gcc, &[]);
    // Debian's clang links without --as-needed: NEW would need libm,
    // which the process lacks (a correct refusal, tested elsewhere).
    let new = build(&dir, "new", NEW, Toolchain::Clang, &["-Wl,--as-needed"]);
    let libs_stdout = |pid: Pid| {
        Libraries::read(pid)
            .expect("libs")
            .lookup_symbol("_IO_2_1_stdout_", None)
            .expect("libc's stdout FILE")
            .addr
    };
    load_and_check(
        &old,
        &new,
        |pid| format!("ready {pid} 3\nold read 6\n"),
        |pid, sym, rc| {
            fmt_check(sym, rc);
            // Extern data through whatever clang chose (COPY or GOT).
            assert_eq!(rc.call(sym("out"), &[]).expect("out"), libs_stdout(pid).0);
            let s = rc.scratch_write(b"four\0").expect("scratch");
            assert_eq!(rc.call(sym("mylen"), &[s.0]).expect("mylen"), 4);
        },
    );
}

#[test]
fn own_ifunc_and_packed_relative_relocations() {
    let dir = TempDir::new("relr");
    let old = build(&dir, "old", OLD, Toolchain::Gcc, &[]);
    let src = format!(
        "{NEW}\nstatic int impl_a(int x) {{ return x + 100; }}\n\
         static void *resolve_f(void) {{ return impl_a; }}\n\
         int f(int) __attribute__((ifunc(\"resolve_f\")));\n\
         int (*pf)(int) = f;\n\
         int use_f(int x) {{ return pf(x); }}\n"
    );
    let new = build(
        &dir,
        "new",
        &src,
        Toolchain::Gcc,
        &["-Wl,-z,pack-relative-relocs"],
    );
    let data = std::fs::read(&new).expect("read");
    let elf = object::File::parse(&*data).expect("elf");
    use object::{Object, ObjectSection};
    assert!(
        elf.sections().any(|s| s.name() == Ok(".relr.dyn")),
        "the linker packed the relative relocations"
    );
    assert!(
        std::process::Command::new("readelf")
            .args(["-rW"])
            .arg(&new)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("R_X86_64_IRELATIVE"))
            .unwrap_or(false),
        "NEW has an IRELATIVE relocation"
    );
    // Where the IRELATIVE relocation writes (link-time).
    use object::read::elf::{FileHeader, Rela, SectionHeader};
    let hdr = object::elf::FileHeader64::<object::Endianness>::parse(&*data).expect("elf");
    let endian = hdr.endian().expect("endian");
    let slot = hdr
        .sections(endian, &*data)
        .expect("sections")
        .iter()
        .filter_map(|s| s.rela(endian, &*data).ok().flatten())
        .flat_map(|(r, _)| r.iter())
        .find(|r| r.r_type(endian, false).0 == 37)
        .map(|r| r.r_offset(endian))
        .expect("IRELATIVE slot");
    let add_link = symbol(&new, "add");
    load_and_check(
        &old,
        &new,
        |pid| format!("ready {pid} 3\nold read 6\n"),
        move |pid, sym, rc| {
            fmt_check(sym, rc);
            assert_eq!(rc.call(sym("use_f"), &[5]).expect("use_f"), 105);
            // The IRELATIVE slot (pf) holds impl_a, what the resolver returned.
            let bias = sym("add").0 - add_link.0;
            assert_eq!(read_u64(pid, RuntimeAddr(bias + slot)), sym("impl_a").0);
        },
    );
}

/// Build `libfoo.so` (soname libfoo.so) from `src` in `dir/sub`.
fn libfoo(dir: &TempDir, sub: &str, src: &str) -> PathBuf {
    let d = dir.path().join(sub);
    std::fs::create_dir_all(&d).expect("lib dir");
    let out = d.join("libfoo.so");
    compile_c(
        CSource::Text(src),
        Toolchain::Gcc,
        &["-shared", "-fPIC", "-Wl,-soname,libfoo.so"],
        &out,
    )
    .expect("build libfoo");
    d
}

#[test]
fn imports_from_another_library_and_a_missing_symbol() {
    let dir = TempDir::new("libfoo");
    let v1 = libfoo(&dir, "v1", "int foo1(int x) { return x * 10; }\n");
    let v2 = libfoo(
        &dir,
        "v2",
        "int foo1(int x) { return x * 10; }\nint foo2(int x) { return x * 20; }\n",
    );
    let link = |d: &Path| {
        vec![
            "-Wl,--no-as-needed".to_string(),
            format!("-L{}", d.display()),
            "-lfoo".to_string(),
            format!("-Wl,-rpath,{}", d.display()),
        ]
    };
    let old_src = OLD.replace(
        "int main(void) {",
        "int foo1(int);\nint main(void) {\n    if (foo1(1) != 10) return 1;",
    );
    let v1_flags = link(&v1);
    let v1_flags: Vec<&str> = v1_flags.iter().map(String::as_str).collect();
    let old = build(&dir, "old", &old_src, Toolchain::Gcc, &v1_flags);
    let v2_flags = link(&v2);
    let v2_flags: Vec<&str> = v2_flags.iter().map(String::as_str).collect();
    // NEW uses only foo1: resolved in the process's libfoo (v1).
    let new_ok_src = format!("{NEW}\nint foo1(int);\nint use_foo(int x) {{ return foo1(x); }}\n");
    let new_ok = build(&dir, "new_ok", &new_ok_src, Toolchain::Gcc, &v2_flags);
    let v1_canon = std::fs::canonicalize(v1.join("libfoo.so")).expect("canonical");
    load_and_check(
        &old,
        &new_ok,
        |pid| format!("ready {pid} 3\nold read 6\n"),
        |pid, sym, rc| {
            assert_eq!(rc.call(sym("use_foo"), &[4]).expect("use_foo"), 40);
            let libs = Libraries::read(pid).expect("libs");
            let foo1 = libs.lookup_symbol("foo1", None).expect("foo1");
            assert_eq!(foo1.library.path(), Some(v1_canon.as_path()));
        },
    );
    // The library replaced on disk while the process runs (as a package
    // upgrade does): symbols come from the file the process mapped.
    {
        let child = start(&old, &[]);
        let pid = pid_of(&child);
        let tmp = v1.join("libfoo.tmp");
        std::fs::copy(v2.join("libfoo.so"), &tmp).expect("copy");
        std::fs::rename(&tmp, v1.join("libfoo.so")).expect("rename");
        assert!(maps_text(pid).contains("libfoo.so (deleted)"));
        let libs = Libraries::read(pid).expect("libs of a process with a replaced library");
        assert!(libs.lookup_symbol("foo1", None).is_some());
        assert!(
            libs.lookup_symbol("foo2", None).is_none(),
            "foo2 exists only in the file on disk, not in the mapped one"
        );
        drop(child);
        // Put v1 back for what follows.
        libfoo(&dir, "v1", "int foo1(int x) { return x * 10; }\n");
    }
    // NEW also uses foo2, which the process's libfoo lacks.
    let new_bad_src = format!(
        "{NEW}\nint foo1(int);\nint foo2(int);\nint use_foo(int x) {{ return foo1(x) + foo2(x); }}\n"
    );
    let new_bad = build(&dir, "new_bad", &new_bad_src, Toolchain::Gcc, &v2_flags);
    let child = start(&old, &[]);
    let pid = pid_of(&child);
    wait_blocked(pid);
    let mut tracee = Tracee::seize(pid).expect("seize");
    let running = running_image(pid, &old);
    let maps_before = maps_text(pid);
    let bytes = std::fs::read(&new_bad).expect("read");
    let tables = upstare_dwarf::read_tables(&bytes).expect("tables");
    let err = load_image(
        &mut tracee,
        pid,
        &new_bad,
        &bytes,
        tables,
        &running,
        &LoadOptions::default(),
    )
    .expect_err("foo2 cannot be resolved");
    match &err {
        LoadError::Unresolved { symbols, .. } => assert_eq!(symbols, "foo2"),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("symbol foo2 not found"), "{err}");
    assert!(err.to_string().contains(&pid.to_string()), "{err}");
    assert_eq!(maps_text(pid), maps_before);
    tracee.detach().expect("detach");
    let (code, out) = finish(child, b"x\n");
    assert_eq!(code, Some(0));
    assert_eq!(out, format!("ready {pid} 3\nold read 2\n"));
}

#[test]
fn symbol_versions_resolve_as_the_dynamic_linker_does() {
    let dir = TempDir::new("versions");
    let old = build(&dir, "old", OLD, Toolchain::Gcc, &[]);
    let child = start(&old, &[]);
    let pid = pid_of(&child);
    let libs = Libraries::read(pid).expect("libs");
    let paths: Vec<String> = libs.search_order().map(|o| o.name().to_string()).collect();
    let main = libs.search_order().next().expect("main program");
    assert!(main.is_main(), "{paths:?}");
    assert_eq!(
        main.path(),
        Some(std::fs::canonicalize(&old).expect("canonical").as_path())
    );
    assert!(paths.iter().any(|p| p.ends_with("libc.so.6")), "{paths:?}");
    assert!(paths.iter().any(|p| p.contains("ld-linux")), "{paths:?}");
    let addr = |n: &str, v: Option<&str>| libs.lookup_symbol(n, v).map(|r| (r.addr, r.ifunc));
    // memcpy@@GLIBC_2.14 (an IFUNC) is not memcpy@GLIBC_2.2.5 (memmove
    // semantics); an unversioned reference gets the default.
    let new_memcpy = addr("memcpy", Some("GLIBC_2.14")).expect("memcpy@2.14");
    let old_memcpy = addr("memcpy", Some("GLIBC_2.2.5")).expect("memcpy@2.2.5");
    assert_ne!(new_memcpy.0, old_memcpy.0);
    assert!(new_memcpy.1);
    assert_eq!(addr("memcpy", None), Some(new_memcpy));
    let cond = addr("pthread_cond_wait", None).expect("default");
    assert_eq!(addr("pthread_cond_wait", Some("GLIBC_2.3.2")), Some(cond));
    assert_ne!(
        addr("pthread_cond_wait", Some("GLIBC_2.2.5")).expect("old"),
        cond
    );
    assert_eq!(addr("memcpy", Some("GLIBC_9.99")), None);
    assert_eq!(addr("no_such_symbol_anywhere", None), None);
    // OLD names stdout (COPY into OLD) but not environ (libc's own).
    assert!(libs
        .lookup_symbol("stdout", None)
        .expect("stdout")
        .library
        .is_main());
    let environ = libs.lookup_symbol("environ", None).expect("environ");
    assert!(
        environ.library.name().ends_with("libc.so.6"),
        "{}",
        environ.library.name()
    );
    // Every import slot of OLD names a symbol found (or weak).
    let data = std::fs::read(&old).expect("read");
    for s in import_slots(&old, &data).expect("slots") {
        assert!(
            s.weak
                || libs
                    .lookup_symbol(&s.symbol, s.version.as_deref())
                    .is_some(),
            "{s:?}"
        );
    }
    drop(child);
}
