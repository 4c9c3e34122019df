//! A heap object whose struct type changed must not be left in its old
//! layout for NEW to misread. Until heap objects are converted, such an
//! update is refused, naming the type, and the process goes on unchanged.

use std::path::Path;
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{compile_instrumented, spawn, TempDir, Toolchain};

const WAIT: Duration = Duration::from_secs(20);

fn program(ver: u32) -> String {
    let node = if ver == 1 {
        "struct node { long value; struct node *next; };"
    } else {
        "struct node { long value; long weight; struct node *next; };"
    };
    format!(
        r#"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
{node}
struct node *head;
int main(void) {{
    struct timespec ts = {{0, 10000000}};
    for (long i = 1; i <= 3; i++) {{
        struct node *n = calloc(1, sizeof *n);
        n->value = i * 10;
        n->next = head;
        head = n;
    }}
    for (int t = 0; t < 2000; t++) {{
        long sum = 0;
        for (struct node *n = head; n; n = n->next)
            sum += n->value;
        printf("v{ver} tick=%d sum=%ld\n", t, sum);
        fflush(stdout);
        nanosleep(&ts, NULL);
    }}
    return 0;
}}
"#
    )
}

fn build(dir: &Path, ver: u32, tc: Toolchain) -> std::path::PathBuf {
    compile_instrumented(
        dir,
        &format!("list{ver}.{}", tc.name()),
        &program(ver),
        tc,
        &[],
    )
}

#[test]
fn a_changed_heap_type_is_refused_not_misread() {
    for tc in [Toolchain::Gcc, Toolchain::Clang] {
        let dir = TempDir::new("apply-heap-guard");
        let (v1, v2) = (build(dir.path(), 1, tc), build(dir.path(), 2, tc));
        let child = spawn(&v1, &[] as &[&str]).expect("spawn v1");
        child
            .wait_for_line("ticking", WAIT, |l| l.starts_with("v1 tick=3 "))
            .expect("v1 ticks");
        // A dry run computes everything but the commit: it meets the same
        // refusal.
        let dry = ApplyOptions {
            dry_run: true,
            ..ApplyOptions::default()
        };
        let err = apply(child.pid() as i32, &v2, &dry)
            .expect_err("a dry run meets the refusal too")
            .to_string();
        assert!(
            err.contains("struct node"),
            "[{}] dry run: {err}",
            tc.name()
        );
        let err = apply(child.pid() as i32, &v2, &ApplyOptions::default())
            .expect_err("a heap object of changed type must not be misread")
            .to_string();
        assert!(err.contains("struct node"), "[{}] {err}", tc.name());
        assert!(err.contains("heap object"), "[{}] {err}", tc.name());
        // The process goes on as v1 with its list intact.
        let seen = child.stdout_so_far().lines().count();
        let next = format!("v1 tick={} sum=60", seen + 1);
        child
            .wait_for_line("v1 continues", WAIT, |l| l == next)
            .unwrap_or_else(|e| panic!("[{}] {e}", tc.name()));
    }
}
