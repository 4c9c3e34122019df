//! SPEC files: parsed, checked against two real compiled versions (each bad
//! key a one-line error naming it), and applied to the plan.

use std::path::{Path, PathBuf};
use upstare_dwarf::fdt::{Continuation, FrameTables};
use upstare_patcher::convert::{Conversion, Part};
use upstare_patcher::{plan_with_spec, GlobalAction, SiteKind, Spec, UpdatePlan, VarSource};
use upstare_testkit::{compile_instrumented, Toolchain};

fn tables(name: &str, src: &str) -> FrameTables {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("patcher-spec");
    std::fs::create_dir_all(&dir).expect("dir");
    let up = compile_instrumented(&dir, name, src, Toolchain::Gcc, &[]);
    upstare_dwarf::read_tables(&std::fs::read(up).expect("read")).expect("tables")
}

const V1: &str = r#"
#include <stdio.h>
struct session { int id; long sent; };
long hits = 3;
struct session current = { 1, 10 };
long work(long x) { long n = x + 1; return n * 2; }
int main(void) {
    long total = 0;
    for (int i = 0; i < 3; i++) {
        total += work(i);
        printf("%ld %ld\n", total, hits);
    }
    return (int)(total + current.sent) & 1;
}
"#;

const V2: &str = r#"
#include <stdio.h>
struct session { int id; long bytes_sent; int limit; };
long requests = 3;
int max_clients;
char motd[16];
struct session current = { 1, 10, 5 };
long handle(long x) { long count = x + 1; long bonus; bonus = 7; return count * 2 + bonus; }
int main(void) {
    long total = 0;
    for (int i = 0; i < 3; i++) {
        total += handle(i);
        printf("%ld %ld %d\n", total, requests, max_clients);
    }
    return (int)(total + current.bytes_sent + current.limit + motd[0]) & 1;
}
"#;

fn versions() -> (FrameTables, FrameTables) {
    (tables("spec.v1", V1), tables("spec.v2", V2))
}

fn checked(text: &str, old: &FrameTables, new: &FrameTables) -> Result<Spec, String> {
    let path = Path::new("test.toml");
    let spec = Spec::parse(path, text).map_err(|e| e.to_string())?;
    spec.check(path, old, new).map_err(|e| e.to_string())?;
    Ok(spec)
}

const GOOD: &str = r#"
[rename.globals]
hits = "requests"
[rename.functions]
work = "handle"
[rename.members."struct session"]
sent = "bytes_sent"
[rename.locals.handle]
n = "count"

[values.globals]
max_clients = 64
motd = "hello"
[values.members."struct session"]
limit = 100
[values.locals.handle]
bonus = 9

[continuations]
"main@loop#0" = "main@loop#0"

[safety]
inactive = ["work", "main@call:printf#0"]
"#;

fn plan_good() -> (FrameTables, FrameTables, UpdatePlan) {
    let (old, new) = versions();
    let spec = checked(GOOD, &old, &new).expect("a good SPEC is accepted");
    let plan = plan_with_spec(&old, &new, &spec);
    (old, new, plan)
}

#[test]
fn renames_map_globals_members_functions_and_locals() {
    let (old, new, p) = plan_good();
    let hits = old
        .globals
        .iter()
        .position(|g| g.name == "hits")
        .expect("hits");
    let m = p.global(hits).expect("mapping");
    assert_eq!(
        new.globals[m.new.expect("renamed global found")].name,
        "requests"
    );
    assert_eq!(m.action, GlobalAction::Copy);
    // The struct member renamed: its value moves with the rename, and the
    // new member takes the SPEC's value (100), not zero.
    let cur = old
        .globals
        .iter()
        .position(|g| g.name == "current")
        .expect("current");
    let GlobalAction::Convert { change } = &p.global(cur).expect("mapping").action else {
        panic!("current is converted");
    };
    let Conversion::Struct { parts } = &change.conversion else {
        panic!("{:?}", change.conversion)
    };
    assert!(parts.iter().any(|part| matches!(part, Part::Member { name, old_offset: 8, new_offset: 8, .. } if name == "bytes_sent")), "{parts:?}");
    assert!(parts.iter().any(|part| matches!(part, Part::Value { name, bytes, .. } if name == "limit" && bytes[..] == 100i32.to_le_bytes())), "{parts:?}");
    assert!(
        change.new_members.is_empty(),
        "limit has a value: {:?}",
        change.new_members
    );
    // The function renamed: its frames map to handle; n becomes count;
    // bonus takes the SPEC's 9.
    let work = p.function("work").expect("work");
    let nf = &new.functions[work.new.expect("work maps to handle")];
    assert_eq!(nf.name, "handle");
    for (k, v) in nf.vars.iter().enumerate() {
        match (v.name.as_str(), &work.vars[k]) {
            ("count", VarSource::Old(i)) => assert_eq!(old.functions[work.old].vars[*i].name, "n"),
            ("x", VarSource::Old(_)) => {}
            ("bonus", VarSource::Value(b)) => assert_eq!(b[..], 9i64.to_le_bytes()),
            (name, s) => panic!("handle.{name}: {s:?}"),
        }
    }
    // main's call to work is its call to handle now.
    let main = p.function("main").expect("main");
    let call = main
        .continuation(
            &Continuation::Call {
                callee: "work".into(),
                ordinal: 0,
            },
            SiteKind::Call,
        )
        .expect("call:work#0");
    assert!(call.new_site.is_some(), "the call follows the rename");
}

#[test]
fn values_of_new_globals_and_safety_rules_reach_the_plan() {
    let (_, new, p) = plan_good();
    let value = |name: &str| {
        let j = new
            .globals
            .iter()
            .position(|g| g.name == name)
            .expect("global");
        p.new_global_values
            .iter()
            .find(|(i, _)| *i == j)
            .map(|(_, b)| b.clone())
    };
    assert_eq!(value("max_clients").expect("value"), 64i32.to_le_bytes());
    let motd = value("motd").expect("value");
    assert_eq!(&motd[..6], b"hello\0");
    assert_eq!(motd.len(), 16);
    assert!(
        p.warnings
            .iter()
            .any(|w| w.contains("max_clients is new; it starts with the SPEC's value")),
        "{:?}",
        p.warnings
    );
    let rules: Vec<String> = p.inactive.iter().map(|r| r.to_string()).collect();
    assert_eq!(rules, ["work", "main@call:printf#0"]);
    assert!(p.inactive[0].forbids("work", &Continuation::Entry));
    assert!(!p.inactive[1].forbids("main", &Continuation::Loop(0)));
}

#[test]
fn every_bad_key_is_one_line_naming_it() {
    let (old, new) = versions();
    let cases: &[(&str, &[&str])] = &[
        (
            "[rename.globals]\nhitz = \"requests\"\n",
            &["rename.globals", "hitz", "OLD has no global hitz"],
        ),
        (
            "[rename.globals]\nhits = \"reqs\"\n",
            &["rename.globals", "hits", "NEW has no global reqs"],
        ),
        (
            "[rename.functions]\nwork = \"handel\"\n",
            &["rename.functions", "NEW has no function handel"],
        ),
        (
            "[rename.members.\"struct sessoin\"]\nsent = \"bytes_sent\"\n",
            &["struct sessoin", "not a struct"],
        ),
        (
            "[rename.members.\"struct session\"]\nsnt = \"bytes_sent\"\n",
            &["snt", "OLD's struct session has no member snt"],
        ),
        (
            "[values.globals]\nmax_clients = 3000000000\n",
            &["values.globals", "max_clients", "does not fit int"],
        ),
        (
            "[values.globals]\nmotd = \"a string far too long for sixteen\"\n",
            &["motd", "do not fit"],
        ),
        (
            "[values.locals.handle]\nbonsu = 1\n",
            &["values.locals.handle", "bonsu", "has no local bonsu"],
        ),
        (
            "[values.locals.handle]\nbonus = { copy = \"nope\" }\n",
            &["bonus", "no local nope to copy"],
        ),
        (
            "[continuations]\n\"main@loop#7\" = \"main@loop#0\"\n",
            &["continuations", "main@loop#7", "no continuation loop#7"],
        ),
        (
            "[continuations]\n\"main@loop\" = \"main@loop#0\"\n",
            &["continuations", "function@continuation"],
        ),
        (
            "[safety]\ninactive = [\"nothere\"]\n",
            &["safety", "OLD has no function nothere"],
        ),
        ("[renames]\n", &["not a valid SPEC file", "unknown field"]),
        ("[rename.globals\n", &["not a valid SPEC file"]),
    ];
    for (text, needles) in cases {
        let e = checked(text, &old, &new).expect_err(text);
        assert!(!e.contains('\n'), "one line: {e}");
        assert!(e.starts_with("test.toml: "), "names the file: {e}");
        for n in *needles {
            assert!(e.contains(n), "{text:?}: {e:?} lacks {n:?}");
        }
    }
}

#[test]
fn an_empty_spec_is_the_default_plan() {
    let (old, new) = versions();
    let spec = checked("", &old, &new).expect("empty");
    assert!(spec.is_empty());
    assert_eq!(
        plan_with_spec(&old, &new, &spec),
        upstare_patcher::default_plan(&old, &new)
    );
}

#[test]
fn bad_transformer_keys_are_one_line_naming_them() {
    let (old, new) = versions();
    let cases = [
        (
            "[transformers]\n\"struct nope\" = \"xf\"\nsource = \"t.c\"\n",
            "\"struct nope\": NEW has no struct nope",
        ),
        (
            "[transformers]\n\"global nothing\" = \"xf\"\nsource = \"t.c\"\n",
            "\"nothing\": NEW has no global nothing",
        ),
        (
            "[transformers]\n\"global max_clients\" = \"xf\"\nsource = \"t.c\"\n",
            "OLD has no global max_clients",
        ),
        (
            "[transformers]\nnowhere = \"xf\"\nsource = \"t.c\"\n",
            "\"nowhere\": NEW has no function nowhere",
        ),
        (
            "[transformers]\nmain = \"not a name\"\nsource = \"t.c\"\n",
            "is not a C function name",
        ),
        (
            "[transformers]\nmain = \"xf_main\"\n",
            "\"source\": missing",
        ),
    ];
    for (text, want) in cases {
        let err = checked(text, &old, &new).expect_err(text);
        assert!(err.contains(want), "{text}: {err}");
        assert!(err.contains("[transformers]"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}

#[test]
fn a_transformer_settles_a_change_no_default_maps_and_a_compile_error_is_one_line() {
    let v1 = "#include <stdio.h>\nlong slot = 5;\nint main(void) { slot++; printf(\"%ld\\n\", slot); return 0; }\n";
    let v2 = "#include <stdio.h>\nlong *slot;\nint main(void) { printf(\"%p\\n\", (void *)slot); return 0; }\n";
    let (old, new) = (tables("xf.v1", v1), tables("xf.v2", v2));
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("patcher-xform");
    std::fs::create_dir_all(&dir).expect("dir");
    let spec_path = dir.join("S.toml");
    let text = "[transformers]\nsource = \"t.c\"\n\"global slot\" = \"xf_slot\"\n";
    std::fs::write(&spec_path, text).expect("write");
    let spec = checked(text, &old, &new).expect("valid");
    // Without the transformer: a change of meaning, refused.
    let plain = upstare_patcher::default_plan(&old, &new);
    assert!(plain.type_changed_globals().count() == 1);
    let plan = plan_with_spec(&old, &new, &spec);
    assert_eq!(plan.type_changed_globals().count(), 0);
    assert!(plan
        .globals
        .iter()
        .any(|g| matches!(g.action, GlobalAction::Transformed { .. })));
    assert_eq!(plan.transformers.globals.len(), 1);
    assert!(plan.transformers.globals[0].always);
    // It compiles against the header; a missing function and a compile
    // error are one line naming them.
    std::fs::write(
        dir.join("t.c"),
        "#include \"upstare_transformers.h\"\nint xf_slot(const long *o, long **n) { *n = 0; return *o < 0; }\n",
    )
    .expect("write");
    let obj = upstare_patcher::transformer::build(&spec_path, &spec, &old, &new)
        .expect("builds")
        .expect("named");
    assert!(obj.intact() && !obj.bytes.is_empty());
    std::fs::write(dir.join("t.c"), "int other(void) { return 0; }\n").expect("write");
    let e = upstare_patcher::transformer::build(&spec_path, &spec, &old, &new)
        .expect_err("no xf_slot")
        .to_string();
    assert!(e.contains("defines no function xf_slot"), "{e}");
    std::fs::write(
        dir.join("t.c"),
        "int xf_slot(void) { return undeclared; }\n",
    )
    .expect("write");
    let e = upstare_patcher::transformer::build(&spec_path, &spec, &old, &new)
        .expect_err("does not compile")
        .to_string();
    assert!(
        e.contains("does not compile") && e.contains("undeclared"),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");
}

/// Two versions with heap arrays: a global `struct item *items` counted by
/// `n_items`, a member `struct pool.slots` counted by `pool.n`, and the
/// locals `fill.list` and `fill.len` (with a parameter `k`, a double, two
/// locals named `dup` in two blocks, and `other.len` in another function).
fn heap_versions() -> (FrameTables, FrameTables) {
    let src = |extra: &str| {
        format!(
            r#"
#include <stdlib.h>
struct item {{ long id; {extra} }};
struct pool {{ long n; struct item *slots; double ratio; }};
struct item *items;
long n_items;
double weight;
struct pool *pools;
long fill(long k) {{
    struct item *list = calloc((size_t)k, sizeof *list);
    size_t len = (size_t)k;
    double scale = 1.5;
    long sum = 0;
    for (size_t i = 0; i < len; i++) sum += list[i].id;
    {{ long dup = 1; sum += dup; }}
    {{ long dup = 2; sum += dup; }}
    free(list);
    return sum + (long)scale;
}}
long other(long m) {{ size_t len = (size_t)m; return (long)len; }}
int main(void) {{
    items = calloc(3, sizeof *items);
    n_items = 3;
    pools = calloc(1, sizeof *pools);
    return (int)(items[0].id + pools->n + weight + fill(2) + other(1));
}}
"#
        )
    };
    (
        tables("heap_spec.v1", &src("")),
        tables("heap_spec.v2", &src("long qty;")),
    )
}

#[test]
fn heap_array_counts_reach_the_plan_and_bad_keys_are_one_line() {
    use upstare_patcher::heap_arrays::HeapSlot;
    let (old, new) = heap_versions();
    let spec = checked(
        "[heap]\n\"global.items\" = { count = \"global.n_items\" }\n\"struct pool.slots\" = { count = \"struct pool.n\" }\n",
        &old,
        &new,
    )
    .expect("a good [heap]");
    let plan = plan_with_spec(&old, &new, &spec);
    assert_eq!(plan.heap_arrays.len(), 2, "{:?}", plan.heap_arrays);
    let items = plan
        .heap_arrays
        .iter()
        .find(|a| a.key == "global.items")
        .expect("items");
    let n_items = old.globals.iter().position(|g| g.name == "n_items");
    assert_eq!(
        items.count,
        HeapSlot::Global {
            index: n_items.expect("n_items")
        }
    );
    assert_eq!((items.count_size, items.count_signed), (8, true));
    let slots = plan
        .heap_arrays
        .iter()
        .find(|a| a.key == "struct pool.slots")
        .expect("slots");
    assert_eq!(
        (&slots.pointer, &slots.count),
        (
            &HeapSlot::Member {
                ty: "struct pool".into(),
                offset: 8
            },
            &HeapSlot::Member {
                ty: "struct pool".into(),
                offset: 0
            }
        )
    );
    for (text, key, why) in [
        (
            "\"global.nope\" = { count = \"global.n_items\" }",
            "global.nope",
            "OLD has no global nope",
        ),
        (
            "\"global.n_items\" = { count = \"global.n_items\" }",
            "global.n_items",
            "is not a pointer",
        ),
        (
            "\"global.items\" = { count = \"global.weight\" }",
            "global.items",
            "is not an integer",
        ),
        (
            "\"global.items\" = { count = \"global.gone\" }",
            "global.items",
            "has no global gone",
        ),
        (
            "\"struct pool.slots\" = { count = \"struct pool.ratio\" }",
            "struct pool.slots",
            "is not an integer",
        ),
        (
            "\"struct pool.nope\" = { count = \"struct pool.n\" }",
            "struct pool.nope",
            "struct pool has no member nope",
        ),
        (
            "\"struct nope.slots\" = { count = \"struct pool.n\" }",
            "struct nope.slots",
            "has no struct nope",
        ),
        (
            "\"items\" = { count = \"global.n_items\" }",
            "items",
            "neither global.NAME, struct TAG.MEMBER nor FUNCTION.LOCAL",
        ),
        (
            "\"global.items\" = { count = \"struct pool.n\" }",
            "global.items",
            "of a global must be a global",
        ),
        (
            "\"global.items\" = { size = \"global.n_items\" }",
            "",
            "unknown field",
        ),
    ] {
        assert_heap_refused(&old, &new, text, key, why);
    }
}

/// The `[heap]` entry `text` is refused in one line of the SPEC file naming
/// `key` (when not empty) and saying `why`.
fn assert_heap_refused(old: &FrameTables, new: &FrameTables, text: &str, key: &str, why: &str) {
    let err = checked(&format!("[heap]\n{text}\n"), old, new).expect_err(text);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("test.toml"), "{err}");
    if !key.is_empty() {
        assert!(err.contains(&format!("[heap] \"{key}\"")), "{err}");
    }
    assert!(err.contains(why), "{text}: {err}");
}

/// `[heap]` keys naming locals and parameters (`FUNCTION.LOCAL`, OLD's
/// names): the count a local of the same frame or a global; every bad key
/// is one line naming it.
#[test]
fn heap_array_counts_of_locals_reach_the_plan_and_bad_keys_are_one_line() {
    use upstare_patcher::heap_arrays::HeapSlot;
    let (old, new) = heap_versions();
    let fill = old.function("fill").expect("fill");
    let var = |name: &str| {
        fill.vars
            .iter()
            .position(|v| v.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let local = |name: &str| HeapSlot::Local {
        function: "fill".into(),
        var: var(name),
    };
    for (count, slot, size, signed) in [
        ("fill.len", local("len"), 8, false),
        ("fill.k", local("k"), 8, true),
        (
            "global.n_items",
            HeapSlot::Global {
                index: old
                    .globals
                    .iter()
                    .position(|g| g.name == "n_items")
                    .expect("n_items"),
            },
            8,
            true,
        ),
    ] {
        let text = format!("[heap]\n\"fill.list\" = {{ count = \"{count}\" }}\n");
        let spec = checked(&text, &old, &new).unwrap_or_else(|e| panic!("{count}: {e}"));
        let plan = plan_with_spec(&old, &new, &spec);
        let [a] = plan.heap_arrays.as_slice() else {
            panic!("{count}: {:?}", plan.heap_arrays);
        };
        assert_eq!(a.key, "fill.list");
        assert_eq!(a.pointer, local("list"), "{count}");
        assert_eq!(a.count, slot, "{count}");
        assert_eq!((a.count_size, a.count_signed), (size, signed), "{count}");
    }
    for (text, key, why) in [
        (
            "\"fill.nope\" = { count = \"fill.len\" }",
            "fill.nope",
            "OLD has no local or parameter nope in fill",
        ),
        (
            "\"nofunc.list\" = { count = \"fill.len\" }",
            "nofunc.list",
            "OLD has no function nofunc",
        ),
        (
            "\"fill.list\" = { count = \"fill.gone\" }",
            "fill.list",
            "OLD has no local or parameter gone in fill",
        ),
        (
            "\"fill.list\" = { count = \"fill.scale\" }",
            "fill.list",
            "OLD's count fill.scale is not an integer (it is double)",
        ),
        (
            "\"fill.len\" = { count = \"fill.len\" }",
            "fill.len",
            "OLD's fill.len is not a pointer to a sized type",
        ),
        (
            "\"fill.list\" = { count = \"other.len\" }",
            "fill.list",
            "the count other.len must be a local or parameter of fill (the same frame) or a global",
        ),
        (
            "\"fill.list\" = { count = \"struct pool.n\" }",
            "fill.list",
            "the count struct pool.n must be a local or parameter of fill",
        ),
        (
            "\"global.items\" = { count = \"fill.len\" }",
            "global.items",
            "the count fill.len of a global must be a global",
        ),
        (
            "\"struct pool.slots\" = { count = \"fill.len\" }",
            "struct pool.slots",
            "the count fill.len must be a member of struct pool (the same object) or a global",
        ),
        (
            "\"fill.list\" = { count = \"fill.dup\" }",
            "fill.list",
            "several locals named dup in fill",
        ),
    ] {
        assert_heap_refused(&old, &new, text, key, why);
    }
}

/// The review's SPEC line for a heap array's count: valid TOML that, once
/// its placeholder count is corrected, is the `[heap]` entry.
#[test]
fn heap_count_spec_line_is_the_heap_entry() {
    use upstare_patcher::review::{spec_line, SpecKey};
    for (pointer, count) in [
        ("level.items", "level.COUNT"),
        ("global.items", "global.COUNT"),
        ("global.f::cache", "global.COUNT"),
        ("struct pool.slots", "struct pool.COUNT"),
    ] {
        let line = spec_line(SpecKey::HeapCount { pointer });
        let spec = Spec::parse(Path::new("line.toml"), &line).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            spec.heap.get(pointer).map(|c| c.count.as_str()),
            Some(count),
            "{line}"
        );
    }
}

/// A `[heap]` key names OLD's function and local; NEW is checked under the
/// SPEC's renames of both (and refused without them, naming what NEW lacks).
#[test]
fn heap_array_keys_of_locals_follow_the_renames_into_new() {
    let src = |func: &str, ptr: &str| {
        format!(
            r#"
#include <stdlib.h>
struct item {{ long id; }};
long {func}(long k) {{
    struct item *{ptr} = calloc((size_t)k, sizeof *{ptr});
    size_t len = (size_t)k;
    long sum = 0;
    for (size_t i = 0; i < len; i++) sum += {ptr}[i].id;
    free({ptr});
    return sum;
}}
int main(void) {{ return (int){func}(2); }}
"#
        )
    };
    let old = tables("heap_rename.v1", &src("fill", "list"));
    let new = tables("heap_rename.v2", &src("fill_items", "items"));
    let heap = "[heap]\n\"fill.list\" = { count = \"fill.len\" }\n";
    let renames =
        "[rename.functions]\nfill = \"fill_items\"\n[rename.locals.fill_items]\nlist = \"items\"\n";
    let spec =
        checked(&format!("{renames}{heap}"), &old, &new).unwrap_or_else(|e| panic!("renamed: {e}"));
    let plan = plan_with_spec(&old, &new, &spec);
    assert_eq!(plan.heap_arrays.len(), 1, "{:?}", plan.heap_arrays);
    let err = checked(heap, &old, &new).expect_err("no renames");
    assert!(
        err.contains("[heap] \"fill.list\"") && err.contains("NEW has no function fill"),
        "{err}"
    );
    let only_function = "[rename.functions]\nfill = \"fill_items\"\n";
    let err = checked(&format!("{only_function}{heap}"), &old, &new).expect_err("no local rename");
    assert!(
        err.contains("NEW has no local or parameter list in fill_items"),
        "{err}"
    );
}
