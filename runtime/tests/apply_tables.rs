//! Tables that change between versions: a read-only table and a writable
//! one the program never writes follow the new version (NEW's entries, no
//! user input), and a pointer the program set into either keeps pointing at
//! the same entry even when the entries changed size.

use std::path::Path;
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{compile_instrumented, spawn, TempDir, Toolchain};

const WAIT: Duration = Duration::from_secs(20);

/// `ver` selects the table layout: v1 has 4 entries of { name, code }, v2
/// has 6 entries of { name, code, weight } with different codes.
fn program(ver: u32) -> String {
    let (entry, rows, weight_print) = if ver == 1 {
        (
            "struct cmd { const char *name; int code; };",
            r#"{"get", 1}, {"put", 2}, {"del", 3}, {"stat", 4}"#,
            "0",
        )
    } else {
        (
            "struct cmd { const char *name; int code; long weight; };",
            r#"{"get", 11, 5}, {"put", 12, 6}, {"del", 13, 7}, {"stat", 14, 8}, {"list", 15, 9}, {"quit", 16, 10}"#,
            "cur->weight + mut_cur->weight",
        )
    };
    format!(
        r#"
#include <stdio.h>
#include <time.h>
{entry}
static const struct cmd cmds[] = {{ {rows} }};
static struct cmd mut_cmds[] = {{ {rows} }};
const struct cmd *cur = &cmds[0];
struct cmd *mut_cur = &mut_cmds[0];
long ticks;
int main(void) {{
    struct timespec ts = {{0, 10000000}};
    /* Written, so these pointers are the program's state (not NEW's
       initial values): they must be remapped to the same entries. */
    cur = &cmds[2];
    mut_cur = &mut_cmds[3];
    for (int i = 0; i < 2000; i++) {{
        ticks++;
        printf("v{ver} tick=%ld n=%d cur=%s/%d mut=%s/%d w=%ld\n", ticks,
               (int)(sizeof cmds / sizeof cmds[0]), cur->name, cur->code,
               mut_cur->name, mut_cur->code, (long)({weight_print}));
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
        &format!("tables{ver}.{}", tc.name()),
        &program(ver),
        tc,
        &[],
    )
}

#[test]
fn tables_follow_the_new_version_and_pointers_keep_their_entry() {
    for tc in [Toolchain::Gcc, Toolchain::Clang] {
        let dir = TempDir::new("apply-tables");
        let (v1, v2) = (build(dir.path(), 1, tc), build(dir.path(), 2, tc));
        let child = spawn(&v1, &[] as &[&str]).expect("spawn v1");
        child
            .wait_for_line("ticking", WAIT, |l| l.starts_with("v1 tick=3 "))
            .expect("v1 ticks");
        let report = apply(child.pid() as i32, &v2, &ApplyOptions::default())
            .unwrap_or_else(|e| panic!("[{}] update: {e}", tc.name()));
        let line = child
            .wait_for_line("v2", WAIT, |l| l.starts_with("v2 "))
            .expect("v2 ticks");
        // NEW's tables (6 entries, NEW's codes); `cur` still names "del"
        // (entry 2), `mut_cur` "stat" (entry 3), now 24-byte entries; the
        // tick count carried over.
        let tick: u64 = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("tick="))
            .and_then(|t| t.parse().ok())
            .expect("tick");
        assert!(tick > 3, "[{}] {line}", tc.name());
        let rest = line.split_once(" n=").map(|(_, r)| r).unwrap_or_default();
        assert_eq!(
            rest,
            "6 cur=del/13 mut=stat/14 w=15",
            "[{}] {line}",
            tc.name()
        );
        assert!(
            !report.warnings.iter().any(|w| w.contains("pointer")),
            "[{}] {:?}",
            tc.name(),
            report.warnings
        );
    }
}
