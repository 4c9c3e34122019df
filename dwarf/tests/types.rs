//! C types read from real binaries, checked against the layout the compiled
//! program itself reports (`offsetof`, `sizeof`, and bitfield positions
//! found by setting the field to all ones in a zeroed object).

mod common;

use common::{build, build_flags, compilers, run, Toolchain};
use std::collections::HashMap;
use upstare_dwarf::model::{ArrayDim, BaseEncoding, Program, Qualifier, Type, TypeId};
use upstare_dwarf::read_program;

const TYPES_C: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <string.h>

struct bits { unsigned a:3; unsigned b:5; int c; unsigned long d:40; char e; signed s:7; };
struct anon { int tag; union { int i; float f; }; struct { short x, y; }; long tail; };
struct flex { int n; char data[]; };
struct node { struct node *next; const char *name; double w[2][3]; };
union u { long l; char c[12]; };
typedef struct bits bits_t;
enum color { RED, GREEN = 5, BLUE = -1 };
enum mixed { MN = -1, MB = 200, MC = 40000, MD = 0x7fffffff } gmixed;
enum big { BU = 0xffffffffu } gbig;
typedef int (*binop)(int, int);

struct bits gb;
struct anon ga;
struct flex gf;
struct node gn;
union u gu;
bits_t gt;
enum color gcol = GREEN;
const volatile int gcv = 1;
binop gop;
int (*gvar)(const char *, ...);
_Atomic int gat;
char *restrict grp;
int gmat[2][3][4];
extern int gext[];
int gext[7];
_Bool gbool;
unsigned char guc;
float gfl;
void *gvp;
char g255[255];
char g256[256];
char g64k[65536];
struct z { int n; char d[0]; } gz;

/* Bit position and width of a bitfield: set it to all ones in a zeroed
   object and scan. */
#define BITS(S, m) do { S s_; memset(&s_, 0, sizeof s_); s_.m = -1; \
  unsigned char *p_ = (unsigned char *)&s_; int first = -1, n = 0; \
  for (unsigned i = 0; i < sizeof s_ * 8; i++) if (p_[i / 8] >> (i % 8) & 1) { if (first < 0) first = i; n++; } \
  printf("bits %s %s %d %d\n", #S, #m, first, n); } while (0)
#define OFFS(S, m) printf("off %s %s %zu\n", #S, #m, offsetof(S, m))
#define SIZE(S) printf("size %s %zu\n", #S, sizeof(S))

int main(void) {
  BITS(struct bits, a); BITS(struct bits, b); BITS(struct bits, d); BITS(struct bits, s);
  OFFS(struct bits, c); OFFS(struct bits, e); SIZE(struct bits);
  OFFS(struct anon, i); OFFS(struct anon, f); OFFS(struct anon, x); OFFS(struct anon, y);
  OFFS(struct anon, tail); SIZE(struct anon);
  OFFS(struct flex, data); SIZE(struct flex);
  OFFS(struct node, next); OFFS(struct node, name); OFFS(struct node, w); SIZE(struct node);
  SIZE(union u);
  return gcol != GREEN;
}
"#;

fn global_ty(p: &Program, name: &str) -> TypeId {
    p.globals
        .iter()
        .find(|g| g.name == name)
        .unwrap_or_else(|| panic!("no global {name}"))
        .ty
}

/// Follows typedefs and qualifiers.
fn strip(p: &Program, mut id: TypeId) -> TypeId {
    for _ in 0..16 {
        match p.ty(id).unwrap() {
            Type::Typedef {
                target: Some(t), ..
            }
            | Type::Qualified {
                target: Some(t), ..
            } => id = *t,
            _ => break,
        }
    }
    id
}

/// Byte offset, bit offset and bit size of member `path` (a name, found
/// through anonymous members).
fn member(p: &Program, agg: TypeId, name: &str) -> Option<(u64, Option<(u64, u64)>)> {
    let members = match p.ty(strip(p, agg))? {
        Type::Struct { members, .. } | Type::Union { members, .. } => members,
        _ => return None,
    };
    for m in members {
        match &m.name {
            Some(n) if n == name => return Some((m.offset, m.bitfield)),
            None => {
                if let Some((off, bf)) = member(p, m.ty, name) {
                    return Some((m.offset + off, bf));
                }
            }
            _ => {}
        }
    }
    None
}

#[test]
fn layouts_match_the_compiled_program() {
    for cc in compilers() {
        check_layouts(cc, &[]);
    }
}

/// Older DWARF versions describe bitfields with DW_AT_bit_offset (counted
/// from the storage unit's most significant bit) and, in DWARF 2, member
/// offsets as DW_OP_plus_uconst expressions; compressed sections and type
/// units too.
#[test]
fn layouts_in_older_dwarf_and_compressed_sections() {
    for flags in [
        &["-gdwarf-2"][..],
        &["-gdwarf-4"],
        &["-gz=zlib"],
        // Types moved to type units, in .debug_info (5) or .debug_types (4).
        &["-fdebug-types-section"],
        &["-gdwarf-4", "-fdebug-types-section"],
    ] {
        check_layouts(Toolchain::Gcc, flags);
    }
    Toolchain::Clang.require();
    check_layouts(Toolchain::Clang, &["-gdwarf-4"]);
}

fn check_layouts(cc: Toolchain, flags: &[&str]) {
    let b = build_flags(cc, "types", &[("types.c", TYPES_C)], flags);
    let p = read_program(&b.bytes).unwrap_or_else(|e| panic!("{cc:?} {flags:?}: {e}"));
    let out = run(&b.exe);
    let structs: HashMap<&str, &str> = [
        ("struct bits", "gb"),
        ("struct anon", "ga"),
        ("struct flex", "gf"),
        ("struct node", "gn"),
        ("union u", "gu"),
    ]
    .into();
    let mut checked = 0;
    for line in out.lines() {
        let w: Vec<&str> = line.split(' ').collect();
        let (kind, s, rest) = (w[0], format!("{} {}", w[1], w[2]), &w[3..]);
        let ty = global_ty(&p, structs[s.as_str()]);
        match (kind, rest) {
            ("bits", [m, first, n]) => {
                let first: u64 = first.parse().unwrap();
                let n: u64 = n.parse().unwrap();
                let (off, bf) = member(&p, ty, m).unwrap_or_else(|| panic!("{s}.{m}"));
                let (bit, size) =
                    bf.unwrap_or_else(|| panic!("{cc:?} {flags:?}: {s}.{m} not a bitfield"));
                assert_eq!(
                    (off * 8 + bit, size),
                    (first, n),
                    "{cc:?} {flags:?}: {s}.{m}"
                );
            }
            ("off", [m, off]) => {
                let (o, bf) =
                    member(&p, ty, m).unwrap_or_else(|| panic!("{cc:?} {flags:?}: {s}.{m}"));
                assert_eq!(o, off.parse::<u64>().unwrap(), "{cc:?} {flags:?}: {s}.{m}");
                assert_eq!(bf, None);
            }
            ("size", [size]) => {
                assert_eq!(
                    p.type_size(ty),
                    Some(size.parse().unwrap()),
                    "{cc:?} {flags:?}: {s}"
                );
            }
            _ => panic!("bad line {line}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 20, "{cc:?} {flags:?}");
}

#[test]
fn type_shapes() {
    for cc in compilers() {
        let b = build(cc, "shapes", &[("types.c", TYPES_C)]);
        let p = read_program(&b.bytes).unwrap_or_else(|e| panic!("{cc:?}: {e}"));
        let t = |name| p.ty(global_ty(&p, name)).unwrap().clone();

        // Anonymous members keep no name.
        let Type::Struct { name, members, .. } = t("ga") else {
            panic!()
        };
        assert_eq!(name.as_deref(), Some("anon"));
        let anon: Vec<&Type> = members
            .iter()
            .filter(|m| m.name.is_none())
            .map(|m| p.ty(m.ty).unwrap())
            .collect();
        assert!(
            matches!(
                anon[0],
                Type::Union {
                    name: None,
                    size: 4,
                    ..
                }
            ),
            "{cc:?}: {anon:?}"
        );
        assert!(
            matches!(
                anon[1],
                Type::Struct {
                    name: None,
                    size: 4,
                    ..
                }
            ),
            "{cc:?}"
        );

        // Flexible array member.
        let Type::Struct { members, size, .. } = t("gf") else {
            panic!()
        };
        assert_eq!(size, 4);
        let data = members
            .iter()
            .find(|m| m.name.as_deref() == Some("data"))
            .unwrap();
        assert!(
            matches!(p.ty(data.ty).unwrap(), Type::Array { dims, .. } if dims == &[ArrayDim::Flexible]),
            "{cc:?}"
        );

        // Multi-dimensional arrays, outermost first.
        let Type::Array { element, dims } = t("gmat") else {
            panic!()
        };
        assert_eq!(
            dims,
            [ArrayDim::Fixed(2), ArrayDim::Fixed(3), ArrayDim::Fixed(4)]
        );
        assert_eq!(p.type_name(element), "int");
        assert_eq!(p.type_size(global_ty(&p, "gmat")), Some(96));
        let Type::Struct { members, .. } = t("gn") else {
            panic!()
        };
        let w = members
            .iter()
            .find(|m| m.name.as_deref() == Some("w"))
            .unwrap();
        assert_eq!(p.type_size(w.ty), Some(48));
        // Self-referential pointer.
        let next = members
            .iter()
            .find(|m| m.name.as_deref() == Some("next"))
            .unwrap();
        let Type::Pointer { pointee: Some(pt) } = p.ty(next.ty).unwrap() else {
            panic!()
        };
        assert_eq!(*pt, global_ty(&p, "gn"));

        // Bounds written in the smallest data form (0xff is 255, not -1).
        for (name, n) in [("g255", 255), ("g256", 256), ("g64k", 65536)] {
            let Type::Array { dims, .. } = t(name) else {
                panic!()
            };
            assert_eq!(dims, [ArrayDim::Fixed(n)], "{cc:?} {name}");
        }
        // GNU zero-length array: a fixed count of 0.
        let Type::Struct { members, size, .. } = t("gz") else {
            panic!()
        };
        assert_eq!(size, 4);
        let Type::Array { dims, .. } = p.ty(members[1].ty).unwrap() else {
            panic!()
        };
        assert_eq!(dims, &[ArrayDim::Fixed(0)], "{cc:?}");

        // `extern int gext[];` then `int gext[7];`: the definition has 7.
        assert_eq!(p.type_size(global_ty(&p, "gext")), Some(28), "{cc:?}");

        // Enum values, including a negative one.
        let Type::Enum {
            name,
            size,
            enumerators,
            ..
        } = t("gcol")
        else {
            panic!()
        };
        assert_eq!((name.as_deref(), size), (Some("color"), 4));
        assert_eq!(
            enumerators,
            [
                ("RED".to_string(), 0),
                ("GREEN".to_string(), 5),
                ("BLUE".to_string(), -1)
            ]
        );

        let values = |name| match t(name) {
            Type::Enum { enumerators, .. } => {
                enumerators.into_iter().map(|e| e.1).collect::<Vec<i64>>()
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(values("gmixed"), [-1, 200, 40000, 0x7fff_ffff], "{cc:?}");
        assert_eq!(values("gbig"), [0xffff_ffff], "{cc:?}");

        // Typedef of a struct.
        let Type::Typedef { name, target } = t("gt") else {
            panic!()
        };
        assert_eq!(name, "bits_t");
        assert_eq!(target, Some(global_ty(&p, "gb")));

        // const volatile int, in either order.
        let mut quals = Vec::new();
        let mut id = global_ty(&p, "gcv");
        while let Type::Qualified { qualifier, target } = p.ty(id).unwrap() {
            quals.push(*qualifier);
            id = target.unwrap();
        }
        quals.sort_by_key(|q| *q as u8);
        assert_eq!(quals, [Qualifier::Const, Qualifier::Volatile], "{cc:?}");
        assert_eq!(p.type_name(id), "int");
        let q = |name| match t(name) {
            Type::Qualified { qualifier, .. } => qualifier,
            other => panic!("{cc:?}: {name}: {other:?}"),
        };
        assert_eq!(q("gat"), Qualifier::Atomic);
        assert_eq!(q("grp"), Qualifier::Restrict);

        // Function pointers: typedef'd binop and a varargs one.
        let Type::Pointer { pointee: Some(f) } = p.ty(strip(&p, global_ty(&p, "gop"))).unwrap()
        else {
            panic!()
        };
        let Type::Function {
            ret,
            params,
            varargs,
        } = p.ty(*f).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (p.type_name(ret.unwrap()), params.len(), *varargs),
            ("int".into(), 2, false)
        );
        let Type::Pointer { pointee: Some(f) } = t("gvar") else {
            panic!()
        };
        let Type::Function {
            params, varargs, ..
        } = p.ty(f).unwrap()
        else {
            panic!()
        };
        assert_eq!((params.len(), *varargs), (1, true), "{cc:?}");
        assert_eq!(p.type_name(params[0]), "const char *");

        // Base encodings.
        let enc = |name| match p.ty(global_ty(&p, name)).unwrap() {
            Type::Base { encoding, size, .. } => (*encoding, *size),
            other => panic!("{other:?}"),
        };
        assert_eq!(enc("gbool"), (BaseEncoding::Bool, 1));
        assert_eq!(enc("guc"), (BaseEncoding::UnsignedChar, 1));
        assert_eq!(enc("gfl"), (BaseEncoding::Float, 4));

        // A pointer to void has no pointee.
        assert_eq!(t("gvp"), Type::Pointer { pointee: None }, "{cc:?}");
        // Every member/element/target id is in range.
        let n = p.types.len() as u32;
        let ok = |id: &TypeId| id.0 < n;
        for ty in &p.types {
            match ty {
                Type::Struct { members, .. } | Type::Union { members, .. } => {
                    assert!(members.iter().all(|m| ok(&m.ty)))
                }
                Type::Array { element, .. } => assert!(ok(element)),
                Type::Pointer { pointee: t }
                | Type::Typedef { target: t, .. }
                | Type::Qualified { target: t, .. } => assert!(t.iter().all(ok)),
                Type::Function { ret, params, .. } => {
                    assert!(ret.iter().all(ok) && params.iter().all(ok))
                }
                _ => {}
            }
        }
    }
}

/// `main.c` only declares `struct hash`; `hash.c` defines it. The global of
/// `main.c` must lead to the definition (members and layout as `hash.c`
/// says), with every toolchain.
const MAIN_C: &str = r#"
struct hash;
struct hash *hash_new(void);
struct hash *table;
int main(void) { table = hash_new(); return table == 0; }
"#;
const HASH_C: &str = r#"
#include <stdlib.h>
struct hash { long n; long (*fn)(long); struct hash *next; };
static long twice(long x) { return 2 * x; }
struct hash *hash_new(void) { struct hash *h = calloc(1, sizeof *h); if (h) h->fn = twice; return h; }
"#;
/// A third unit with its own, different `struct hash`.
const OTHER_C: &str = r#"
struct hash { int k; };
struct hash other_hash;
"#;

#[test]
fn a_struct_declared_in_one_unit_is_resolved_in_another() {
    for cc in compilers() {
        let b = build(cc, "xunit", &[("main.c", MAIN_C), ("hash.c", HASH_C)]);
        let p = read_program(&b.bytes).unwrap_or_else(|e| panic!("{cc}: {e}"));
        let ptr = strip(&p, global_ty(&p, "table"));
        let Some(Type::Pointer {
            pointee: Some(pointee),
        }) = p.ty(ptr)
        else {
            panic!("{cc}: table is not a pointer: {}", p.type_name(ptr));
        };
        match p.ty(*pointee) {
            Some(Type::Struct {
                size,
                declaration,
                members,
                ..
            }) => {
                assert!(!declaration, "{cc}: still only declared");
                assert_eq!(*size, 24, "{cc}");
                let names: Vec<_> = members.iter().filter_map(|m| m.name.clone()).collect();
                assert_eq!(names, ["n", "fn", "next"], "{cc}");
                assert_eq!(member(&p, *pointee, "fn"), Some((8, None)), "{cc}");
            }
            other => panic!("{cc}: {other:?}"),
        }
    }
}

/// redis links its own `struct dict` and hiredis's: a declaration of such a
/// tag cannot be resolved, and stays opaque (the binary is still read; the
/// plan refuses a change of that type).
#[test]
fn rival_definitions_leave_a_declared_struct_opaque() {
    for cc in compilers() {
        let b = build(
            cc,
            "xunit-rival",
            &[("main.c", MAIN_C), ("hash.c", HASH_C), ("other.c", OTHER_C)],
        );
        let p = read_program(&b.bytes).unwrap_or_else(|e| panic!("{cc}: {e}"));
        let ptr = strip(&p, global_ty(&p, "table"));
        let Some(Type::Pointer {
            pointee: Some(pointee),
        }) = p.ty(ptr)
        else {
            panic!("{cc}: table is not a pointer: {}", p.type_name(ptr));
        };
        match p.ty(*pointee) {
            Some(Type::Struct { declaration, .. }) => {
                assert!(
                    *declaration,
                    "{cc}: resolved to one of two rival definitions"
                )
            }
            other => panic!("{cc}: {other:?}"),
        }
    }
}
