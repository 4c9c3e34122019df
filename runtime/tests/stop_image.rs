//! Finding the running image in a live process: exact bias (checked against
//! the kernel's AT_ENTRY), text and span for PIE and non-PIE; clear refusals
//! when no file or two files with a `.upstare` section are executable.

mod stop_support;

use nix::unistd::Pid;
use object::{Object, ObjectSection};
use std::time::Duration;
use stop_support::*;
use upstare_dwarf::LinkAddr;
use upstare_runtime::load::image::{running_image, ImageError};
use upstare_runtime::target::procfs;
use upstare_testkit::{compile_c, CSource, Toolchain};

const PROG: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

long zeroed[512];
int initialized = 7;

int main(int argc, char **argv)
{
    if (argc > 1) {
        /* Map another instrumented binary executable, as a loader would. */
        int fd = open(argv[1], O_RDONLY);
        void *p = mmap(0, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0x1000);
        if (fd < 0 || p == MAP_FAILED)
            return 2;
    }
    zeroed[511] = initialized;
    printf("ready\n");
    fflush(stdout);
    char c;
    return (int)read(0, &c, 1) - 1;
}
"#;

fn check(tc: Toolchain) {
    let d = TempDir::new("image");
    let exe = build(&d, "prog", PROG, tc);
    let mut child = start(&exe, &[], "ready");
    let pid = pid_of(&child);
    let maps = procfs::read_maps(pid).unwrap();
    let image = running_image(pid, &maps).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(image.path, exe);

    // The bias, independently: the kernel's entry point minus e_entry.
    let bytes = std::fs::read(&exe).unwrap();
    let file = object::File::parse(&*bytes).unwrap();
    let auxv = procfs::read_auxv(pid).unwrap();
    let bias = procfs::load_bias_from_auxv(&auxv, LinkAddr(file.entry())).unwrap();
    assert_eq!(image.bias, bias);
    if !tc.is_pie() {
        assert_eq!(image.bias.0, 0);
    }
    let text = file.section_by_name(".text").unwrap();
    assert_eq!(image.text.start, LinkAddr(text.address()).to_runtime(bias));
    assert_eq!(image.text.end.0 - image.text.start.0, text.size());
    // The span covers .bss (anonymous memory past the file), and the
    // globals read through it hold what the program wrote.
    let g = |name: &str| {
        image
            .tables
            .globals
            .iter()
            .find(|g| g.name == name)
            .unwrap()
    };
    let z = g("zeroed");
    let end = z.addr.to_runtime(image.bias).0 + z.size;
    assert!(image.span.start <= z.addr.to_runtime(image.bias) && end <= image.span.end.0);
    let last = z.addr.to_runtime(image.bias).0 + 511 * 8;
    let tracee = upstare_runtime::Tracee::seize(pid).unwrap();
    use upstare_runtime::TargetMemory;
    assert_eq!(
        tracee
            .memory()
            .read_u64(upstare_dwarf::RuntimeAddr(last))
            .unwrap(),
        7
    );
    assert!(image.link(upstare_dwarf::RuntimeAddr(last)).is_some());
    assert!(image.is_code(image.runtime(image.tables.function("main").unwrap().low)));
    tracee.detach().unwrap();
    child.send_stdin(b"x").unwrap();
    assert_eq!(
        child.wait(Duration::from_secs(20)).unwrap().status,
        upstare_testkit::ExitStatus::Code(0)
    );
}

#[test]
fn bias_text_and_span_pie() {
    check(Toolchain::Gcc);
}

#[test]
fn bias_text_and_span_non_pie() {
    check(Toolchain::GccNoPie);
}

#[test]
fn bias_text_and_span_clang() {
    check(Toolchain::Clang);
}

#[test]
fn refusals_name_the_process_and_the_files() {
    let d = TempDir::new("image-refusals");
    // Not instrumented.
    let plain = d.path().join("plain");
    compile_c(CSource::Text(PROG), Toolchain::Gcc, &[], &plain).unwrap();
    let mut child = start(&plain, &[], "ready");
    let pid = pid_of(&child);
    let e = running_image(pid, &procfs::read_maps(pid).unwrap()).unwrap_err();
    assert!(matches!(e, ImageError::NoImage { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "process {pid} runs {} which has no .upstare section: instrument it with upstare-rewrite",
            plain.display()
        )
    );
    child.send_stdin(b"x").unwrap();
    child.wait(Duration::from_secs(20)).unwrap();

    // Two executable files with tables: which one runs is ambiguous.
    let exe = build(&d, "prog", PROG, Toolchain::Gcc);
    let other = build(&d, "other", PROG, Toolchain::Clang);
    let mut child = start(&exe, &[other.to_str().unwrap()], "ready");
    let pid: Pid = pid_of(&child);
    let e = running_image(pid, &procfs::read_maps(pid).unwrap()).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, ImageError::Ambiguous { .. }), "{text}");
    assert!(text.contains(&exe.display().to_string()), "{text}");
    assert!(text.contains(&other.display().to_string()), "{text}");
    child.send_stdin(b"x").unwrap();
    child.wait(Duration::from_secs(20)).unwrap();
}
