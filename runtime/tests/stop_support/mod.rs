//! Helpers for the stop/unwind tests: build a C program with the real
//! compiler, instrument it with the rewriter, run it, seize it.
#![allow(dead_code)]

use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::time::Duration;
use upstare_runtime::engine::state::Image;
use upstare_runtime::load::image::running_image;
use upstare_runtime::load::libraries::Libraries;
use upstare_runtime::target::procfs;
use upstare_runtime::Tracee;
pub use upstare_testkit::TempDir;
use upstare_testkit::{compile_instrumented, ChildGuard, Toolchain};

/// Compile `src` with `tc` and instrument it; returns the instrumented
/// binary (`<name>.up`).
pub fn build(dir: &TempDir, name: &str, src: &str, tc: Toolchain) -> PathBuf {
    build_with(dir, name, src, tc, &[])
}

/// [`build`] with extra compiler flags.
pub fn build_with(dir: &TempDir, name: &str, src: &str, tc: Toolchain, flags: &[&str]) -> PathBuf {
    compile_instrumented(dir.path(), name, src, tc, flags)
}

/// Start `exe` and wait (bounded) for a stdout line equal to `ready`.
pub fn start(exe: &Path, args: &[&str], ready: &str) -> ChildGuard {
    let child = upstare_testkit::spawn(exe, args).expect("spawn");
    child
        .wait_for_line("ready line", Duration::from_secs(20), |l| l == ready)
        .expect("program reports ready");
    child
}

pub fn pid_of(child: &ChildGuard) -> Pid {
    Pid::from_raw(child.pid() as i32)
}

/// Seize the child; return the tracee, its image and libraries.
pub fn seize(child: &ChildGuard) -> (Tracee, Image, Libraries) {
    let pid = pid_of(child);
    let tracee = Tracee::seize(pid).expect("seize");
    let maps = procfs::read_maps(pid).expect("maps");
    let image = running_image(pid, &maps).expect("running image");
    let libs = Libraries::new(pid, &maps);
    (tracee, image, libs)
}

/// Wait (bounded) for a number of threads to exist in `pid`.
pub fn wait_threads(pid: Pid, n: usize) {
    let start = std::time::Instant::now();
    while procfs::list_tasks(pid).map(|t| t.len()).unwrap_or(0) < n {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "threads did not start"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Wait (bounded) until every listed thread sleeps in the kernel (state S).
pub fn wait_sleeping(pid: Pid, tids: &[Pid]) {
    let start = std::time::Instant::now();
    loop {
        let all = tids.iter().all(|t| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{t}/stat"))
                .ok()
                .and_then(|s| {
                    s.rfind(')')
                        .map(|i| s[i + 1..].trim_start().starts_with('S'))
                })
                .unwrap_or(false)
        });
        if all {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "threads did not block"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The image's `.text` in the process equals the file's: no `int3` left.
pub fn assert_code_intact(tracee: &Tracee, image: &Image) {
    use object::{Object, ObjectSection};
    use upstare_runtime::TargetMemory;
    let bytes = std::fs::read(&image.path).expect("read image file");
    let file = object::File::parse(&*bytes).expect("parse image file");
    let text = file.section_by_name(".text").expect(".text");
    let want = text.data().expect(".text data");
    let len = image.text.end.0 - image.text.start.0;
    assert_eq!(len, want.len() as u64);
    let got = tracee
        .memory()
        .read_vec(image.text.start, len, 1 << 26)
        .expect("read .text");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "code differs at {:#x}: {:#04x} in the process, {:#04x} in the file",
            image.text.start.0 + i as u64,
            got[i],
            want[i]
        );
    }
}
