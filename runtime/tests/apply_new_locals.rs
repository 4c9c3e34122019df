//! A local NEW adds to an active frame, whose declaration the paused code
//! has already passed in NEW's terms: a constant initializer is taken from
//! NEW's code; a computed one needs a SPEC value and the update is refused
//! without it, naming the local and the SPEC line (never a silent zero).

use std::path::{Path, PathBuf};
use std::time::Duration;
use upstare_patcher::Spec;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{compile_instrumented, spawn, TempDir, Toolchain};

const WAIT: Duration = Duration::from_secs(20);

const V1: &str = r#"
#include <stdio.h>
#include <time.h>
int main(void) {
    struct timespec ts = {0, 10000000};
    for (long i = 0; i < 3000; i++) {
        printf("v1 i=%ld\n", i);
        fflush(stdout);
        nanosleep(&ts, NULL);
    }
    return 0;
}
"#;

/// `seen` has a constant initializer, `start` a computed one; both are
/// declared before the loop the frame is paused in.
const V2: &str = r#"
#include <stdio.h>
#include <time.h>
static long now(void) { return 1000 + (long)time(NULL) % 7; }
int main(void) {
    struct timespec ts = {0, 10000000};
    long seen = 5;
    long start = now();
    for (long i = 0; i < 3000; i++) {
        printf("v2 i=%ld seen=%ld start=%ld\n", i, seen, start);
        fflush(stdout);
        nanosleep(&ts, NULL);
    }
    return 0;
}
"#;

fn build(dir: &Path, name: &str, src: &str, tc: Toolchain) -> PathBuf {
    compile_instrumented(dir, &format!("{name}.{}", tc.name()), src, tc, &[])
}

fn field(line: &str, name: &str) -> i64 {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

#[test]
fn constant_initializers_are_taken_computed_ones_need_the_spec() {
    for tc in [Toolchain::Gcc, Toolchain::Clang] {
        let dir = TempDir::new("apply-new-locals");
        let (v1, v2) = (
            build(dir.path(), "v1", V1, tc),
            build(dir.path(), "v2", V2, tc),
        );
        let child = spawn(&v1, &[] as &[&str]).expect("spawn v1");
        child
            .wait_for_line("v1", WAIT, |l| l.starts_with("v1 i=3"))
            .expect("v1 ticks");
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", child.pid())).expect("maps");
        // Without a SPEC: refused, naming `start` and the line that settles it.
        let err = apply(child.pid() as i32, &v2, &ApplyOptions::default())
            .expect_err("start's computed initializer has no value")
            .to_string();
        assert!(err.contains("new local start"), "[{}] {err}", tc.name());
        assert!(
            err.contains("values.locals.\"main\".\"start\""),
            "[{}] {err}",
            tc.name()
        );
        let after = std::fs::read_to_string(format!("/proc/{}/maps", child.pid())).expect("maps");
        assert_eq!(
            maps,
            after,
            "[{}] a refusal changed the mappings",
            tc.name()
        );
        // With the SPEC's value: `start` takes it, `seen` its constant 5.
        let spec_path = PathBuf::from("locals.toml");
        let spec = Spec::parse(&spec_path, "[values.locals.main]\nstart = 42\n").expect("SPEC");
        let opts = ApplyOptions {
            spec: Some((spec_path, spec)),
            ..ApplyOptions::default()
        };
        let report = apply(child.pid() as i32, &v2, &opts)
            .unwrap_or_else(|e| panic!("[{}] update with the SPEC: {e}", tc.name()));
        assert!(
            !report
                .warnings
                .iter()
                .any(|w| w.contains("seen starts as zero")),
            "[{}] {:?}",
            tc.name(),
            report.warnings
        );
        let line = child
            .wait_for_line("v2", WAIT, |l| l.starts_with("v2 i="))
            .expect("v2 ticks");
        assert_eq!(field(&line, "seen"), 5, "[{}] {line}", tc.name());
        assert_eq!(field(&line, "start"), 42, "[{}] {line}", tc.name());
        assert!(field(&line, "i") > 3, "[{}] {line}", tc.name());
    }
}
