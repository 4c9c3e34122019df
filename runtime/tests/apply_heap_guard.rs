//! A heap object whose struct type changed must not be left in its old
//! layout for NEW to misread: it is converted (here in place, the node
//! growing into its block's slack), a dry run computing the same; a heap
//! object whose type cannot be converted (a union whose members changed:
//! which member is live is unknown) is refused, naming the type, and the
//! process goes on unchanged. A refusal that comes after blocks were
//! allocated for moved objects frees them again: the process's heap use is
//! what it was.

use std::path::Path;
use std::time::Duration;
use upstare_runtime::update::{apply, ApplyOptions};
use upstare_testkit::{compile_instrumented, spawn, TempDir, Toolchain};

const WAIT: Duration = Duration::from_secs(20);

fn program(ver: u32) -> String {
    let (node, weights) = if ver == 1 {
        ("struct node { long value; struct node *next; };", "")
    } else {
        (
            "struct node { long value; long weight; struct node *next; };",
            "printf(\" weights=%ld\", weights);",
        )
    };
    let weight = if ver == 1 { "0" } else { "n->weight" };
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
        long sum = 0, weights = 0;
        for (struct node *n = head; n; n = n->next) {{
            sum += n->value;
            weights += {weight};
        }}
        printf("v{ver} tick=%d sum=%ld", t, sum);
        {weights}
        printf("\n");
        fflush(stdout);
        nanosleep(&ts, NULL);
    }}
    return 0;
}}
"#
    )
}

fn union_program(ver: u32) -> String {
    let val = if ver == 1 {
        "union val { long i; double d; };"
    } else {
        "union val { long i; double d; char s[16]; };"
    };
    format!(
        r#"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
{val}
union val *cell;
int main(void) {{
    struct timespec ts = {{0, 10000000}};
    cell = calloc(1, sizeof *cell);
    cell->i = 60;
    for (int t = 0; t < 2000; t++) {{
        printf("v{ver} tick=%d sum=%ld\n", t, cell->i);
        fflush(stdout);
        nanosleep(&ts, NULL);
    }}
    return 0;
}}
"#
    )
}

/// A rec that outgrows its block (it would move) while a global points
/// into a member v2 removes: refused after the new block was allocated.
/// Each tick prints the bytes the allocator has handed out (v2's rec is
/// too big for glibc's per-thread cache, which mallinfo would count as
/// in use even once freed).
fn dangling_program(ver: u32) -> String {
    let rec = if ver == 1 {
        "struct rec { long id; long gone; long keep; };"
    } else {
        "struct rec { long id; long keep; char big[2048]; };"
    };
    let gp = if ver == 1 { "&r->gone" } else { "&r->keep" };
    format!(
        r#"
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
{rec}
struct rec *r;
long *gp;
int main(void) {{
    struct timespec ts = {{0, 10000000}};
    r = calloc(1, sizeof *r);
    r->id = 60;
    gp = {gp};
    for (int t = 0; t < 2000; t++) {{
        struct mallinfo2 mi = mallinfo2();
        printf("v{ver} tick=%d id=%ld inuse=%zu\n", t, r->id, mi.uordblks);
        fflush(stdout);
        nanosleep(&ts, NULL);
    }}
    return 0;
}}
"#
    )
}

fn build(dir: &Path, name: &str, src: &str, tc: Toolchain) -> std::path::PathBuf {
    compile_instrumented(dir, &format!("{name}.{}", tc.name()), src, tc, &[])
}

#[test]
fn a_changed_heap_type_is_converted_not_misread() {
    for tc in [Toolchain::Gcc, Toolchain::Clang] {
        let dir = TempDir::new("apply-heap-guard");
        let v1 = build(dir.path(), "list1", &program(1), tc);
        let v2 = build(dir.path(), "list2", &program(2), tc);
        let child = spawn(&v1, &[] as &[&str]).expect("spawn v1");
        child
            .wait_for_line("ticking", WAIT, |l| l.starts_with("v1 tick=3 "))
            .expect("v1 ticks");
        // A dry run computes everything but the commit.
        let dry = ApplyOptions {
            dry_run: true,
            ..ApplyOptions::default()
        };
        apply(child.pid() as i32, &v2, &dry)
            .unwrap_or_else(|e| panic!("[{}] dry run: {e}", tc.name()));
        let r = apply(child.pid() as i32, &v2, &ApplyOptions::default())
            .unwrap_or_else(|e| panic!("[{}] {e}", tc.name()));
        // calloc(16) leaves a block of 24 usable bytes: each of the three
        // nodes grows to 24 where it is.
        assert_eq!(
            (r.heap_converted_in_place, r.heap_moved),
            (3, 0),
            "[{}]",
            tc.name()
        );
        // v2 reads the converted list: the same values, the new member 0.
        child
            .wait_for_line("v2 reads the list", WAIT, |l| {
                l.starts_with("v2 tick=") && l.ends_with(" sum=60 weights=0")
            })
            .unwrap_or_else(|e| panic!("[{}] {e}", tc.name()));
    }
}

#[test]
fn a_heap_union_of_changed_type_is_refused_by_name() {
    for tc in [Toolchain::Gcc, Toolchain::Clang] {
        let dir = TempDir::new("apply-heap-guard-union");
        let v1 = build(dir.path(), "union1", &union_program(1), tc);
        let v2 = build(dir.path(), "union2", &union_program(2), tc);
        let child = spawn(&v1, &[] as &[&str]).expect("spawn v1");
        child
            .wait_for_line("ticking", WAIT, |l| l.starts_with("v1 tick=3 "))
            .expect("v1 ticks");
        let dry = ApplyOptions {
            dry_run: true,
            ..ApplyOptions::default()
        };
        let err = apply(child.pid() as i32, &v2, &dry)
            .expect_err("a dry run meets the refusal too")
            .to_string();
        assert!(err.contains("union val"), "[{}] dry run: {err}", tc.name());
        let err = apply(child.pid() as i32, &v2, &ApplyOptions::default())
            .expect_err("a heap union of changed type must not be misread")
            .to_string();
        assert!(err.contains("union val"), "[{}] {err}", tc.name());
        assert!(err.contains("heap object"), "[{}] {err}", tc.name());
        // The process goes on as v1 with its value intact.
        let seen = child.stdout_so_far().lines().count();
        let next = format!("v1 tick={} sum=60", seen + 1);
        child
            .wait_for_line("v1 continues", WAIT, |l| l == next)
            .unwrap_or_else(|e| panic!("[{}] {e}", tc.name()));
    }
}

#[test]
fn a_refusal_after_allocating_frees_the_new_blocks() {
    for tc in [Toolchain::Gcc, Toolchain::Clang] {
        let dir = TempDir::new("apply-heap-guard-dangling");
        let v1 = build(dir.path(), "dangling1", &dangling_program(1), tc);
        let v2 = build(dir.path(), "dangling2", &dangling_program(2), tc);
        let child = spawn(&v1, &[] as &[&str]).expect("spawn v1");
        let first = child
            .wait_for_line("ticking", WAIT, |l| l.starts_with("v1 tick=3 "))
            .expect("v1 ticks");
        let inuse = first
            .rsplit_once(" inuse=")
            .map(|(_, n)| n.to_string())
            .expect("inuse");
        for opts in [
            ApplyOptions {
                dry_run: true,
                ..ApplyOptions::default()
            },
            ApplyOptions::default(),
        ] {
            let err = apply(child.pid() as i32, &v2, &opts)
                .expect_err("a pointer into a removed member of a moved object")
                .to_string();
            assert!(err.contains("no longer has"), "[{}] {err}", tc.name());
        }
        // The process goes on as v1, its heap use what it was.
        let seen = child.stdout_so_far().lines().count();
        let next = format!("v1 tick={} id=60 inuse={inuse}", seen + 1);
        child
            .wait_for_line("v1 continues", WAIT, |l| l == next)
            .unwrap_or_else(|e| panic!("[{}] {e}", tc.name()));
    }
}
