//! The demo's update (`scripts/demo`, `corpus/demo`) is complete with the
//! demo's SPEC and needs the user without it: the demo cannot silently
//! stop working when the patcher grows more careful.

use std::path::{Path, PathBuf};
use upstare_patcher::patchfile::make_patch_with_spec;
use upstare_testkit::{compile_instrumented, workspace_root, Toolchain};

fn build(name: &str, file: &Path) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("patcher-demo");
    std::fs::create_dir_all(&dir).expect("dir");
    let src = std::fs::read_to_string(file).expect("demo source");
    compile_instrumented(&dir, name, &src, Toolchain::Gcc, &[])
}

#[test]
fn the_demo_update_is_complete_with_its_spec() {
    let demo = workspace_root().join("corpus/demo");
    let v1 = build("demo1", &demo.join("v1.c"));
    let v2 = build("demo2", &demo.join("v2.c"));

    let (patch, review) =
        make_patch_with_spec(&v1, &v2, Some(&demo.join("SPEC.toml"))).expect("patch");
    let needs: Vec<String> = review.needs_user.iter().map(|n| n.what.clone()).collect();
    assert!(patch.is_complete(), "needs the user: {needs:?}");

    // Without the SPEC, main's printf continuations are asked about.
    let (patch, review) = make_patch_with_spec(&v1, &v2, None).expect("patch");
    assert!(!patch.is_complete());
    assert!(
        review
            .needs_user
            .iter()
            .any(|n| n.what.contains("main@call:printf")),
        "{:?}",
        review
            .needs_user
            .iter()
            .map(|n| &n.what)
            .collect::<Vec<_>>()
    );
}
