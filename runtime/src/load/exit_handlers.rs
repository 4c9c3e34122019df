//! Code pointers the program handed the C library, pointed at NEW: exit
//! handlers (`atexit`, `on_exit`, `__cxa_atexit`) and fork handlers
//! (`pthread_atfork`) in the old image's code would run stale (retired,
//! non-executable) code at exit or at the next fork.
//!
//! glibc 2.36 keeps them in its own writable data, where nothing exports
//! them: the first 32 exit handlers in `initial` (entries of four words
//! `{flavor, fn, arg, dso_handle}`, `fn` mangled with the thread's pointer
//! guard: xor with the word at `fs:0x30`, rotate left by 17; flavors
//! `ef_on` 2, `ef_at` 3, `ef_cxa` 4), the first fork handlers in a
//! dynarray's inline storage (`{prepare, parent, child, dso_handle}`, not
//! mangled). The library's writable mappings are scanned for words that
//! are exactly the entry of an old-image function (fork handlers), or that
//! demangle to one after an exit-handler flavor (exit handlers); each is
//! rewritten to the same function of NEW. Handlers beyond those kept in
//! the library's own data (more than 32 exit handlers, a grown fork-handler
//! array) live on the heap and are not moved.

use super::commit::DynamicWrite;
use crate::engine::sweep::{demangle, mangle, POINTER_GUARD_OFFSET};
use crate::memory::{MemError, TargetMemory};
use crate::target::procfs::{MapPath, MemoryMap};
use upstare_dwarf::RuntimeAddr;

/// Exit-handler flavors whose second word is a mangled function pointer.
const MANGLED_FLAVORS: [u64; 3] = [2, 3, 4];
/// Bound on the bytes of library data scanned.
const MAX_SCAN: u64 = 8 << 20;

/// The C library's writable data: its file's writable mappings and the
/// anonymous mapping right after them (the rest of its `.bss`).
fn libc_data(maps: &[MemoryMap]) -> Vec<&MemoryMap> {
    let is_libc = |m: &MemoryMap| {
        m.file()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("libc.so") || n.starts_with("libc-"))
    };
    let mut out = Vec::new();
    for (i, m) in maps.iter().enumerate() {
        if !is_libc(m) || !m.perms.write {
            continue;
        }
        out.push(m);
        if let Some(next) = maps.get(i + 1) {
            if next.start == m.end && next.perms.write && next.path == MapPath::Anonymous {
                out.push(next);
            }
        }
    }
    out
}

/// The words to rewrite so that the exit and fork handlers in the old
/// image's code become NEW's same functions (`map`: old function entry to
/// NEW's). `fs_base` is any thread's (the guard is the process's).
pub(super) fn plan_exit_handlers(
    mem: &impl TargetMemory,
    maps: &[MemoryMap],
    fs_base: u64,
    map: &dyn Fn(RuntimeAddr) -> Option<RuntimeAddr>,
) -> Result<Vec<DynamicWrite>, MemError> {
    let guard = mem.read_u64(RuntimeAddr(fs_base.wrapping_add(POINTER_GUARD_OFFSET)))?;
    let mut writes = Vec::new();
    let mut budget = MAX_SCAN;
    for m in libc_data(maps) {
        let len = m.end.0.saturating_sub(m.start.0).min(budget);
        budget -= len;
        let Ok(bytes) = mem.read_vec(m.start, len, MAX_SCAN as usize) else {
            continue;
        };
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        for (i, &w) in words.iter().enumerate() {
            let addr = RuntimeAddr(m.start.0 + 8 * i as u64);
            if let Some(new) = map(RuntimeAddr(w)) {
                writes.push(DynamicWrite {
                    addr,
                    tag: "function pointer held by the C library",
                    old: w,
                    new: new.0,
                });
                continue;
            }
            let flavor = i.checked_sub(1).and_then(|j| words.get(j));
            if flavor.is_some_and(|f| MANGLED_FLAVORS.contains(f)) {
                if let Some(new) = map(RuntimeAddr(demangle(w, guard))) {
                    writes.push(DynamicWrite {
                        addr,
                        tag: "exit handler",
                        old: w,
                        new: mangle(new.0, guard),
                    });
                }
            }
        }
    }
    Ok(writes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mangling_round_trips() {
        let guard = 0x1234_5678_9abc_def0;
        let p = 0x5555_5555_1149;
        assert_eq!(demangle(mangle(p, guard), guard), p);
        assert_ne!(mangle(p, guard), p);
    }
}
