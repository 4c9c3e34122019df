//! The rescue handler: what makes breakpoints harmless if the updater dies.
//!
//! While update points are armed with `int3`, a thread that hits one with
//! no tracer to catch it would die of SIGTRAP. Before anything is armed the
//! update maps a small rescue area into the target and makes its code the
//! SIGTRAP handler; the area holds every update point of the running image
//! with its original byte. While the updater lives it never runs (the
//! tracer takes every SIGTRAP first). If the updater is killed (SIGKILL,
//! OOM), the kernel detaches and a thread that traps runs the handler,
//! which:
//! - finds the trap address (rip - 1, or rip when the updater had already
//!   moved the thread back onto the point) in the table, writes every
//!   original byte back through `/proc/self/mem` and resumes the thread at
//!   the point, which now runs its own instruction;
//! - clears the trap flag of a thread left single-stepping;
//! - for a binary with trampolines (`upstare-rewrite --inline-points`) the
//!   data page holds the trampolines' range and the flag byte's address
//!   (one entry whatever the number of points): an `int3` trap
//!   (`SI_KERNEL`) in the trampolines, or at a detoured point the updater
//!   had moved the thread back to (a `jmp rel32` into them), clears the
//!   flag and returns: the thread goes on past the trampoline's `int3`
//!   (running the point's displaced instructions, as the point does with
//!   the flag clear) or at the point;
//! - otherwise (a SIGTRAP that is not ours) puts the program's own SIGTRAP
//!   action back and sends the signal again, so it gets what it would have.
//!
//! The update puts the program's SIGTRAP action back and unmaps the area
//! when it ends ([`Rescue::remove`]).
//!
//! The handler (x86-64, position-independent; the data page follows the
//! code page):
//! ```text
//! handler(sig, info, uc):
//!   r12 = uc; r13 = uc.rip - 1; r14 = data
//!   look r13, then r13 + 1, up in the table -> found, else notours
//! found:   uc.rip = r13; fd = open("/proc/self/mem", O_RDWR)
//!          for each entry: pwrite64(fd, &entry.byte, 1, entry.addr)
//!          close(fd); ret
//! notours: if info.si_code == SI_KERNEL and data.lo != 0 and
//!          (r13 - 1 in [data.lo, data.hi) or r13 is `jmp rel32` into it):
//!              byte [data.flag] = 0; ret
//!          if info.si_code == TRAP_TRACE: uc.eflags &= ~TF; ret
//!          rt_sigaction(SIGTRAP, &data.original, 0, 8)
//!          tgkill(getpid(), gettid(), SIGTRAP); ret
//! restorer: rt_sigreturn
//! ```
//! Data page: `[0]` number of entries, `[8]` the original `sigaction`
//! (32 bytes), `[40]` `"/proc/self/mem"`, `[64]` start and `[72]` end of
//! the trampolines (0: none), `[80]` the flag byte's address, `[96..]`
//! entries of 16 bytes (address, original byte).

use crate::memory::TargetMemory;
use crate::target::remote::{KernelSigaction, RemoteCalls, RemoteError};
use nix::libc;
use upstare_dwarf::RuntimeAddr;

/// The handler's machine code (assembled from the listing in the module
/// doc); the rel32 of `lea r14, [rip + data]` is patched in.
const HANDLER: [u8; 318] = [
    0x49, 0x89, 0xd4, 0x4d, 0x8b, 0xac, 0x24, 0xa8, 0x00, 0x00, 0x00, 0x4c, 0x8d, 0x35, 0x00, 0x00,
    0x00, 0x00, 0x49, 0xff, 0xcd, 0x49, 0x8b, 0x0e, 0x4d, 0x8d, 0x7e, 0x60, 0x48, 0x85, 0xc9, 0x74,
    0x0e, 0x4d, 0x39, 0x2f, 0x74, 0x26, 0x49, 0x83, 0xc7, 0x10, 0x48, 0xff, 0xc9, 0xeb, 0xed, 0x49,
    0xff, 0xc5, 0x49, 0x8b, 0x0e, 0x4d, 0x8d, 0x7e, 0x60, 0x48, 0x85, 0xc9, 0x74, 0x66, 0x4d, 0x39,
    0x2f, 0x74, 0x09, 0x49, 0x83, 0xc7, 0x10, 0x48, 0xff, 0xc9, 0xeb, 0xed, 0x4d, 0x89, 0xac, 0x24,
    0xa8, 0x00, 0x00, 0x00, 0xb8, 0x02, 0x00, 0x00, 0x00, 0x49, 0x8d, 0x7e, 0x28, 0xbe, 0x02, 0x00,
    0x00, 0x00, 0x31, 0xd2, 0x0f, 0x05, 0x48, 0x85, 0xc0, 0x78, 0x38, 0x48, 0x89, 0xc3, 0x4d, 0x8b,
    0x2e, 0x4d, 0x8d, 0x7e, 0x60, 0x4d, 0x85, 0xed, 0x74, 0x1f, 0xb8, 0x12, 0x00, 0x00, 0x00, 0x48,
    0x89, 0xdf, 0x49, 0x8d, 0x77, 0x08, 0xba, 0x01, 0x00, 0x00, 0x00, 0x4d, 0x8b, 0x17, 0x0f, 0x05,
    0x49, 0x83, 0xc7, 0x10, 0x49, 0xff, 0xcd, 0xeb, 0xdc, 0xb8, 0x03, 0x00, 0x00, 0x00, 0x48, 0x89,
    0xdf, 0x0f, 0x05, 0xc3, 0x81, 0x7e, 0x08, 0x80, 0x00, 0x00, 0x00, 0x75, 0x3b, 0x49, 0x8b, 0x46,
    0x40, 0x48, 0x85, 0xc0, 0x74, 0x32, 0x49, 0x8d, 0x55, 0xff, 0x48, 0x39, 0xc2, 0x72, 0x06, 0x49,
    0x3b, 0x56, 0x48, 0x72, 0x1b, 0x41, 0x80, 0x7d, 0x00, 0xe9, 0x75, 0x1c, 0x49, 0x63, 0x55, 0x01,
    0x49, 0x8d, 0x54, 0x15, 0x05, 0x48, 0x39, 0xc2, 0x72, 0x0e, 0x49, 0x3b, 0x56, 0x48, 0x73, 0x08,
    0x49, 0x8b, 0x46, 0x50, 0xc6, 0x00, 0x00, 0xc3, 0x83, 0x7e, 0x08, 0x02, 0x75, 0x0d, 0x49, 0x81,
    0xa4, 0x24, 0xb0, 0x00, 0x00, 0x00, 0xff, 0xfe, 0xff, 0xff, 0xc3, 0xb8, 0x0d, 0x00, 0x00, 0x00,
    0xbf, 0x05, 0x00, 0x00, 0x00, 0x49, 0x8d, 0x76, 0x08, 0x31, 0xd2, 0x41, 0xba, 0x08, 0x00, 0x00,
    0x00, 0x0f, 0x05, 0xb8, 0x27, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x89, 0xc3, 0xb8, 0xba, 0x00,
    0x00, 0x00, 0x0f, 0x05, 0x48, 0x89, 0xc6, 0x48, 0x89, 0xdf, 0xba, 0x05, 0x00, 0x00, 0x00, 0xb8,
    0xea, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xc3, 0xb8, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05,
];
/// Where the rel32 of `lea r14, [rip + data]` sits, and the address it is
/// relative to (the next instruction).
const DATA_REL_AT: usize = 14;
const DATA_REL_NEXT: u64 = 0x12;
/// Offset of the restorer (`mov eax, 15; syscall`).
const RESTORER: u64 = 0x137;
const PAGE: u64 = 4096;
const ENTRIES: u64 = 96;
/// Bound on the table: far above the update points of any program.
pub const MAX_POINTS: usize = 1 << 20;
/// `SA_SIGINFO | SA_RESTORER | SA_RESTART`.
const FLAGS: u64 = 4 | 0x0400_0000 | 0x1000_0000;

/// Why the rescue handler could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum RescueError {
    #[error("rescue handler: {0}")]
    Remote(#[from] RemoteError),
    #[error("rescue handler: {0}")]
    Mem(#[from] crate::memory::MemError),
    #[error("rescue handler: {count} update points, more than the limit of {limit}")]
    TooMany { count: usize, limit: usize },
    #[error("rescue handler: no room left in its table for the breakpoint at {addr}")]
    Full { addr: RuntimeAddr },
}

/// The installed rescue area (see the module doc).
#[derive(Clone, Debug)]
pub struct Rescue {
    base: RuntimeAddr,
    len: u64,
    original: KernelSigaction,
    /// Entries in the table, and room for them.
    count: usize,
    capacity: usize,
}

/// Entries the table has room for beyond the update points: the other
/// breakpoints a stop arms (a condition wait's return, a callback's return
/// into a library), added as they are armed.
const SPARE_ENTRIES: usize = 256;

/// The trampolines of a binary rewritten with `--inline-points`, as the
/// rescue handler needs them: a trap there is cleared by clearing `flag`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trampolines {
    pub start: RuntimeAddr,
    pub end: RuntimeAddr,
    pub flag: RuntimeAddr,
}

/// The data page's contents.
fn data_bytes(
    points: &[(RuntimeAddr, u8)],
    original: &KernelSigaction,
    trampolines: Option<Trampolines>,
) -> Vec<u8> {
    let mut d = vec![0u8; (ENTRIES as usize) + 16 * points.len()];
    d[0..8].copy_from_slice(&(points.len() as u64).to_le_bytes());
    d[8..40].copy_from_slice(&original.to_bytes());
    d[40..54].copy_from_slice(b"/proc/self/mem");
    if let Some(t) = trampolines {
        d[64..72].copy_from_slice(&t.start.0.to_le_bytes());
        d[72..80].copy_from_slice(&t.end.0.to_le_bytes());
        d[80..88].copy_from_slice(&t.flag.0.to_le_bytes());
    }
    for (i, (addr, byte)) in points.iter().enumerate() {
        let at = ENTRIES as usize + 16 * i;
        d[at..at + 8].copy_from_slice(&addr.0.to_le_bytes());
        d[at + 8] = *byte;
    }
    d
}

impl Rescue {
    /// Maps the rescue area, its table empty with room for `points`
    /// breakpoints (the update points armed with `int3`) and the other
    /// breakpoints a stop arms, with the `trampolines` of detoured points,
    /// if any, and makes it the SIGTRAP handler, through the remote session
    /// `rc`. Each breakpoint is added ([`Rescue::add`]) before it is armed.
    pub fn install(
        rc: &mut RemoteCalls<'_>,
        points: usize,
        trampolines: Option<Trampolines>,
    ) -> Result<Rescue, RescueError> {
        if points > MAX_POINTS {
            return Err(RescueError::TooMany {
                count: points,
                limit: MAX_POINTS,
            });
        }
        let capacity = points + SPARE_ENTRIES;
        let len = PAGE + (ENTRIES + 16 * capacity as u64).next_multiple_of(PAGE);
        let base = rc.mmap(
            RuntimeAddr(0),
            len,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )?;
        let r = (|| -> Result<KernelSigaction, RescueError> {
            // The original action first (so the table can carry it), then
            // ours in its place.
            let original = rc.rt_sigaction(libc::SIGTRAP, None)?;
            let mut code = HANDLER;
            let rel = (PAGE - DATA_REL_NEXT) as u32;
            code[DATA_REL_AT..DATA_REL_AT + 4].copy_from_slice(&rel.to_le_bytes());
            rc.memory().write(base, &code)?;
            rc.memory().write(
                RuntimeAddr(base.0 + PAGE),
                &data_bytes(&[], &original, trampolines),
            )?;
            rc.rt_sigaction(
                libc::SIGTRAP,
                Some(&KernelSigaction {
                    handler: base.0,
                    flags: FLAGS,
                    restorer: base.0 + RESTORER,
                    mask: u64::MAX,
                }),
            )?;
            Ok(original)
        })();
        match r {
            Ok(original) => Ok(Rescue {
                base,
                len,
                original,
                count: 0,
                capacity,
            }),
            Err(e) => {
                let _ = rc.munmap(base, len);
                Err(e)
            }
        }
    }

    /// Adds breakpoints about to be armed (address, byte it covers) to the
    /// table, in one write, then the count the handler reads, so that the
    /// handler restores them too if the updater dies. `Ok(false)`, with
    /// nothing written, when the table has no room for them all (they must
    /// not be armed then).
    pub fn add(
        &mut self,
        mem: &mut impl TargetMemory,
        entries: &[(RuntimeAddr, u8)],
    ) -> Result<bool, RescueError> {
        let Some(count) = self
            .count
            .checked_add(entries.len())
            .filter(|&c| c <= self.capacity)
        else {
            return Ok(false);
        };
        if entries.is_empty() {
            return Ok(true);
        }
        let data = self.base.0 + PAGE;
        let mut bytes = vec![0u8; 16 * entries.len()];
        for (chunk, (addr, byte)) in bytes.chunks_exact_mut(16).zip(entries) {
            chunk[..8].copy_from_slice(&addr.0.to_le_bytes());
            chunk[8] = *byte;
        }
        mem.write(RuntimeAddr(data + ENTRIES + 16 * self.count as u64), &bytes)?;
        mem.write(RuntimeAddr(data), &(count as u64).to_le_bytes())?;
        self.count = count;
        Ok(true)
    }

    /// Puts the program's SIGTRAP action back and unmaps the area.
    pub fn remove(&self, rc: &mut RemoteCalls<'_>) -> Result<(), RescueError> {
        rc.rt_sigaction(libc::SIGTRAP, Some(&self.original))?;
        rc.munmap(self.base, self.len)?;
        Ok(())
    }

    /// The area's address (for tests).
    pub fn base(&self) -> RuntimeAddr {
        self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_page_layout() {
        let act = KernelSigaction {
            handler: 7,
            ..KernelSigaction::default()
        };
        let d = data_bytes(&[(RuntimeAddr(0x1234), 0x55)], &act, None);
        assert_eq!(&d[0..8], &1u64.to_le_bytes());
        assert_eq!(&d[8..16], &7u64.to_le_bytes());
        assert_eq!(&d[40..55], b"/proc/self/mem\0");
        assert_eq!(&d[64..88], &[0; 24]);
        assert_eq!(&d[96..104], &0x1234u64.to_le_bytes());
        assert_eq!(d[104], 0x55);
        let t = Trampolines {
            start: RuntimeAddr(0x5000),
            end: RuntimeAddr(0x6000),
            flag: RuntimeAddr(0x7000),
        };
        let d = data_bytes(&[], &act, Some(t));
        assert_eq!(&d[64..72], &0x5000u64.to_le_bytes());
        assert_eq!(&d[72..80], &0x6000u64.to_le_bytes());
        assert_eq!(&d[80..88], &0x7000u64.to_le_bytes());
        // The entries' base in the handler follows ENTRIES.
        for at in [0x18, 0x35, 0x71] {
            assert_eq!(&HANDLER[at..at + 4], &[0x4d, 0x8d, 0x7e, ENTRIES as u8]);
        }
        // The restorer is `mov eax, 15; syscall`.
        assert_eq!(
            &HANDLER[RESTORER as usize..],
            &[0xb8, 0x0f, 0, 0, 0, 0x0f, 0x05]
        );
        // The data rel32 is a placeholder the installer fills.
        assert_eq!(&HANDLER[DATA_REL_AT - 3..DATA_REL_AT], &[0x4c, 0x8d, 0x35]);
    }
}
