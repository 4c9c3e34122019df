//! `upstare-patch` on real compiled and instrumented pairs (gcc and clang):
//! the review names each change the C source makes, `--json` parses, the
//! PATCH round-trips and hostile PATCH bytes are errors, what needs the user
//! is listed with its SPEC line (exit 2), and the `--header` output compiles.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use upstare_patcher::patchfile::{self, decode, encode, read_patch, ImageIdentity};
use upstare_patcher::GlobalAction;
use upstare_testkit::{
    compile_c, compile_instrumented, run_command, CSource, Output, TempDir, Toolchain,
};

const TOOLCHAINS: [Toolchain; 2] = [Toolchain::Gcc, Toolchain::Clang];

/// v1 → v2: `struct session` gains `flags` and loses `legacy`, `hits` widens
/// from int to long, `history` grows from 4 to 6 elements, `dropped` is
/// removed and `added` is new; `step` gains a local and its types widen.
const V1: &str = r#"
#include <stdio.h>
struct session { int id; long bytes; int legacy; };
struct session sess = { 7, 100, 3 };
int hits = 41;
int history[4] = {1, 2, 3, 4};
long dropped = 5;
long wild = 3;
static int step(int x) { int twice = x * 2; return twice + 1; }
int main(void) {
    for (int i = 0; i < 3; i++) {
        hits += 1; sess.bytes += step(i) + history[i] + dropped + wild;
        printf("%d %ld\n", hits, sess.bytes);
    }
    return 0;
}
"#;

const V2: &str = r#"
#include <stdio.h>
struct session { int id; long bytes; long flags; };
struct session sess = { 7, 100, 99 };
long hits = 41;
int history[6] = {1, 2, 3, 4, 5, 6};
long added = 11;
long wild = 3;
static long step(long x) { long bonus = 1; long twice = x * 2; return twice + bonus; }
int main(void) {
    for (int i = 0; i < 3; i++) {
        hits += 1; sess.bytes += step(i) + history[i] + added + wild;
        printf("%ld %ld %ld\n", hits, sess.bytes, sess.flags);
    }
    return 0;
}
"#;

fn build(dir: &TempDir, name: &str, src: &str, tc: Toolchain) -> PathBuf {
    compile_instrumented(dir.path(), &format!("{name}.{}", tc.name()), src, tc, &[])
}

fn patch_cmd(args: &[&std::ffi::OsStr]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_upstare-patch"));
    cmd.args(args);
    run_command(cmd, Duration::from_secs(60)).expect("run upstare-patch")
}

fn make_patch(old: &Path, new: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        old.as_os_str(),
        new.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    patch_cmd(&args)
}

#[test]
fn the_review_names_each_change_of_the_source() {
    let dir = TempDir::new("patch-review");
    for tc in TOOLCHAINS {
        let (v1, v2) = (build(&dir, "v1", V1, tc), build(&dir, "v2", V2, tc));
        let out_path = dir.join(format!("p.{}.patch", tc.name()));
        let out = make_patch(&v1, &v2, &out_path, &[]);
        assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
        let text = &out.stdout;
        let has = |needle: &str| assert!(text.contains(needle), "[{tc}] no {needle:?} in:\n{text}");
        // struct session: members added and removed.
        has("struct session");
        has("member flags added at offset 16");
        has("member legacy removed");
        // int → long (spelled "long int" by both compilers).
        has("global hits [changed] (int → long");
        // Array length.
        has("global history [changed] (int[4] → int[6]): converted: length 4 → 6");
        // Removed and new globals.
        has("global dropped [removed]");
        has("global added [new]");
        // The frame of step: a new local, widened ones.
        has("step [frame changed]");
        has("local bonus added: starts at zero");
        has("parameter x: int → long");
        // The new member of a global takes NEW's initializer; nothing needs
        // the user.
        has("Needs the user (0)");
        has("complete");
        // An unchanged global is not listed.
        assert!(!text.contains("global wild"), "{text}");
    }
}

#[test]
fn json_parses_and_the_patch_round_trips() {
    let dir = TempDir::new("patch-json");
    for tc in TOOLCHAINS {
        let (v1, v2) = (build(&dir, "v1", V1, tc), build(&dir, "v2", V2, tc));
        let out_path = dir.join(format!("p.{}.patch", tc.name()));
        let out = make_patch(&v1, &v2, &out_path, &["--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
        assert_eq!(v["complete"], true);
        let types: Vec<&str> = v["review"]["types"]
            .as_array()
            .expect("types")
            .iter()
            .filter_map(|t| t["name"].as_str())
            .collect();
        assert_eq!(types, ["struct session"]);
        let v1_bytes = std::fs::read(&v1).expect("v1");
        let v2_bytes = std::fs::read(&v2).expect("v2");
        let old = upstare_dwarf::read_tables(&v1_bytes).expect("tables");
        let new = upstare_dwarf::read_tables(&v2_bytes).expect("tables");
        assert_eq!(
            v["plan"]["globals"].as_array().map(Vec::len),
            Some(old.globals.len())
        );

        // The file holds the default plan (with OLD's initial values) and
        // both identities.
        let p = read_patch(&out_path).expect("read PATCH");
        assert_eq!(
            p.plan,
            upstare_patcher::plan_for_binaries(&v1, &v1_bytes, &v2, &v2_bytes).expect("plan")
        );
        assert_eq!(p.old, ImageIdentity::of_bytes(&v1_bytes, &old));
        assert_eq!(p.new, ImageIdentity::of_bytes(&v2_bytes, &new));
        assert_eq!(
            p.old.sha256_hex(),
            v["old"]["sha256"].as_str().expect("sha")
        );
        assert_eq!(p.new_path, std::fs::canonicalize(&v2).expect("canonical"));
        assert!(p.is_complete());
        assert_eq!(decode(&encode(&p).expect("encode")).expect("decode"), p);
    }
}

/// A small deterministic generator (no dependency needed for test noise).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn hostile_patch_bytes_are_errors_never_panics() {
    let dir = TempDir::new("patch-hostile");
    let tc = Toolchain::Gcc;
    let (v1, v2) = (build(&dir, "v1", V1, tc), build(&dir, "v2", V2, tc));
    let out_path = dir.join("p.patch");
    let out = make_patch(&v1, &v2, &out_path, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    let good = std::fs::read(&out_path).expect("PATCH");
    assert!(decode(&good).is_ok());
    // Every truncation.
    for n in 0..good.len() {
        assert!(decode(&good[..n]).is_err(), "truncated to {n} bytes");
    }
    let mut rng = Lcg(0x5eed);
    // Random mutations: the checksum catches each one.
    for _ in 0..2000 {
        let mut b = good.clone();
        for _ in 0..=(rng.next() % 4) {
            let i = (rng.next() as usize) % b.len();
            b[i] ^= (rng.next() % 255 + 1) as u8;
        }
        assert!(decode(&b).is_err(), "a mutated PATCH decoded");
    }
    // Mutated payloads with a recomputed checksum reach the payload
    // decoder itself: it may accept or refuse, never panic.
    for _ in 0..2000 {
        let mut b = good.clone();
        let i = 48 + (rng.next() as usize) % (b.len() - 48);
        b[i] = rng.next() as u8;
        let sum = {
            use sha2::Digest;
            sha2::Sha256::digest(&b[48..])
        };
        b[16..48].copy_from_slice(&sum);
        let _ = decode(&b);
    }
    // Random bytes, and a header that claims more than there is.
    for len in [0usize, 7, 48, 49, 1000] {
        let b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        assert!(decode(&b).is_err());
    }
    let mut b = good.clone();
    b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(decode(&b).is_err());
    // A corrupt file is named in the error.
    let bad = dir.join("bad.patch");
    std::fs::write(&bad, &good[..good.len() / 2]).expect("write");
    let e = read_patch(&bad).expect_err("corrupt");
    assert!(e.to_string().starts_with(&bad.display().to_string()), "{e}");
}

const V2_MEANING: &str = r#"
#include <stdio.h>
struct session { int id; long bytes; long flags; };
struct session sess = { 7, 100, 99 };
long hits = 41;
int history[6] = {1, 2, 3, 4, 5, 6};
long added = 11;
long *wild;
static long step(long x) { double twice = x * 2; long bonus = 1; return (long)twice + bonus; }
int main(void) {
    for (int i = 0; i < 3; i++) {
        hits += 1; sess.bytes += step(i) + history[i] + added + (wild ? *wild : 0);
        printf("%ld %ld %ld\n", hits, sess.bytes, sess.flags);
    }
    return 0;
}
"#;

#[test]
fn a_change_of_meaning_needs_the_user_with_its_spec_line() {
    let dir = TempDir::new("patch-user");
    for tc in TOOLCHAINS {
        let (v1, v2) = (
            build(&dir, "v1", V1, tc),
            build(&dir, "v2m", V2_MEANING, tc),
        );
        let out_path = dir.join(format!("p.{}.patch", tc.name()));
        let out = make_patch(&v1, &v2, &out_path, &[]);
        assert_eq!(out.status.code(), Some(2), "{}{}", out.stdout, out.stderr);
        let text = &out.stdout;
        // long → long *: a global, always needed.
        assert!(text.contains("Needs the user (2)"), "{text}");
        assert!(text.contains("values.globals.\"wild\" = 0"), "{text}");
        // int → double: a local of step, needed when step is active.
        assert!(text.contains("step: local twice"), "{text}");
        assert!(text.contains("when a frame of step is active"), "{text}");
        assert!(
            text.contains("values.locals.\"step\".\"twice\" = 0"),
            "{text}"
        );
        assert!(text.contains("INCOMPLETE"), "{text}");
        // The PATCH is written, marked incomplete, with the same items.
        let p = read_patch(&out_path).expect("PATCH written");
        assert!(!p.is_complete());
        let what: Vec<&str> = p.needs_user.iter().map(|n| n.what.as_str()).collect();
        assert_eq!(what, ["global wild", "step: local twice"]);
        assert!(p
            .plan
            .globals
            .iter()
            .any(|g| g.label == "global wild"
                && matches!(g.action, GlobalAction::TypeChanged { .. })));
    }
}

#[test]
fn bad_input_is_one_line_and_writes_nothing() {
    let dir = TempDir::new("patch-bad");
    let tc = Toolchain::Gcc;
    let v1 = build(&dir, "v1", V1, tc);
    let out_path = dir.join("p.patch");
    let missing = dir.join("missing.up");
    let out = make_patch(&v1, &missing, &out_path, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(&missing.display().to_string()),
        "{}",
        out.stderr
    );
    // A binary that was never instrumented.
    let plain = dir.join("plain");
    compile_c(CSource::Text(V1), tc, &[], &plain).expect("compile");
    let out = make_patch(&v1, &plain, &out_path, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(&plain.display().to_string()),
        "{}",
        out.stderr
    );
    assert!(!out_path.exists(), "no PATCH written on error");
    assert!(std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .all(|e| !e.file_name().to_string_lossy().contains(".tmp.")));
    // --help teaches with examples.
    let help = patch_cmd(&["--help".as_ref()]);
    assert!(help.stdout.contains("Examples:") && help.stdout.contains("--header"));
}

/// A pair for the header: a struct gains members (one nested by value, one
/// a pointer to a changed type), a packed wire struct changes, an enum is
/// renumbered, a typedef'd struct changes, and `handle` gains a local.
const H1: &str = r#"
#include <stdio.h>
enum state { IDLE, BUSY };
struct limits { int max; };
struct wire { char tag; int len; } __attribute__((packed));
typedef struct session { int id; long bytes; struct limits lim; enum state st; } session_t;
session_t sess;
struct wire w;
int handle(session_t *s, int n) { int seen = n; s->bytes += seen; return seen; }
int main(void) { printf("%d\n", handle(&sess, 1) + w.len); return 0; }
"#;

const H2: &str = r#"
#include <stdio.h>
enum state { STARTING, IDLE, BUSY };
struct limits { int max; };
struct counters { long in, out; unsigned short bits[3]; };
struct wire { char tag; long len; char pad; } __attribute__((packed));
typedef struct session { int id; long bytes; struct counters c; struct limits lim; enum state st; struct session *next; char name[16]; } session_t;
session_t sess;
struct wire w;
int handle(session_t *s, int n) { long seen = n; int extra = 2; s->bytes += seen + extra; return (int)seen; }
int main(void) { printf("%d\n", handle(&sess, 1) + (int)w.len); return 0; }
"#;

const TRANSFORMER: &str = r#"
#include <stdio.h>
#include "transformers.h"
/* A transformer written against the header: OLD's types with __old, NEW's
   under their own names, frames as structs of pointers. */
int session_transform(const struct session__old *o, struct session *n) {
    n->c.in = o->bytes;
    n->c.bits[2] = 1;
    n->lim.max = o->lim.max;
    n->st = o->st == BUSY__old ? BUSY : IDLE;
    n->next = 0;
    n->name[0] = 'x';
    return 0;
}
int wire_transform(const struct wire__old *o, struct wire *n) {
    n->len = o->len;
    n->tag = o->tag;
    return 0;
}
int handle_frame(struct handle__frame__old *o, struct handle__frame__new *n) {
    *n->seen = *o->seen;
    *n->extra = 0;
    (*n->s)->id = (*o->s)->id;
    return 0;
}
_Static_assert(sizeof(session_t__old) == sizeof(struct session__old), "typedef of the old struct");
_Static_assert(sizeof(struct wire__old) == 5, "packed layout of the old wire struct");
_Static_assert(sizeof(struct wire) == 10, "packed layout of the new wire struct");
"#;

#[test]
fn the_header_compiles_with_gcc_and_clang() {
    let dir = TempDir::new("patch-header");
    for tc in TOOLCHAINS {
        let (h1, h2) = (build(&dir, "h1", H1, tc), build(&dir, "h2", H2, tc));
        let header = dir.join("transformers.h");
        let out = make_patch(&h1, &h2, &header, &["--header"]);
        assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
        let text = std::fs::read_to_string(&header).expect("header");
        for needle in [
            "struct session__old {",
            "struct session {",
            "struct wire__old {",
            "enum state__old { IDLE__old = 0, BUSY__old = 1 }",
            "struct handle__frame__old {",
            "struct handle__frame__new {",
        ] {
            assert!(text.contains(needle), "[{tc}] no {needle:?} in:\n{text}");
        }
        let src = dir.join("transform.c");
        std::fs::write(&src, TRANSFORMER).expect("write");
        for cc in ["gcc", "clang"] {
            let mut cmd = Command::new(cc);
            cmd.args(["-fsyntax-only", "-Wall", "-Werror", "-std=gnu11", "-I"])
                .arg(dir.path())
                .arg(&src);
            let r = run_command(cmd, Duration::from_secs(60)).expect(cc);
            assert_eq!(
                r.status.code(),
                Some(0),
                "[{tc} header, {cc}] {}\n{text}",
                r.stderr
            );
        }
    }
}

#[test]
fn patch_file_writes_are_atomic() {
    let dir = TempDir::new("patch-atomic");
    let target = dir.join("out.bin");
    std::fs::write(&target, b"old").expect("write");
    // A directory in the way of the rename: the write fails, the old file
    // (here: none at that name) is untouched and no temporary file stays.
    let blocked = dir.join("blocked");
    std::fs::create_dir(&blocked).expect("dir");
    std::fs::write(blocked.join("x"), b"x").expect("write");
    assert!(patchfile::write_atomic(&blocked, b"new").is_err());
    assert!(blocked.is_dir());
    patchfile::write_atomic(&target, b"new").expect("write");
    assert_eq!(std::fs::read(&target).expect("read"), b"new");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp.")), "{names:?}");
}
