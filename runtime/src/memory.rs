//! Access to a target's memory behind one trait, so that the stack engine can
//! be tested on a plain byte buffer and run against a live process unchanged.
//!
//! - [`ByteBuffer`]: a set of `(base, bytes)` regions for unit tests.
//! - [`crate::target::ProcessMemory`]: a live process.

use nix::errno::Errno;
use std::fmt;
use std::io;
use upstare_dwarf::RuntimeAddr;

/// Default cap for [`TargetMemory::read_vec`] callers that have no better bound.
pub const DEFAULT_READ_CAP: usize = 64 << 20;

/// Which direction an access went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemOp {
    Read,
    Write,
}

impl fmt::Display for MemOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemOp::Read => "read",
            MemOp::Write => "write",
        })
    }
}

/// Why a target memory access failed. Every variant names the address; the
/// live-process variants also name the pid.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("{op} of {len} bytes at {addr}: outside every region of the buffer")]
    OutOfRange {
        op: MemOp,
        addr: RuntimeAddr,
        len: usize,
    },
    #[error("{op} of {len} bytes at {addr}: range wraps around the address space")]
    Overflow {
        op: MemOp,
        addr: RuntimeAddr,
        len: usize,
    },
    #[error("read of {len} bytes at {addr} refused: larger than the cap of {cap} bytes")]
    TooLarge {
        addr: RuntimeAddr,
        len: u64,
        cap: usize,
    },
    #[error("region at {addr} ({len} bytes) overlaps an existing region")]
    Overlap { addr: RuntimeAddr, len: usize },
    #[error("pid {pid}: cannot open /proc/{pid}/mem: {source}")]
    Open {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("pid {pid}: {op} of {len} bytes at {addr} via /proc/{pid}/mem failed: {source}")]
    Io {
        pid: i32,
        op: MemOp,
        addr: RuntimeAddr,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error(
        "pid {pid}: {op} of {len} bytes at {addr} stopped after {done} bytes \
         (unmapped memory, or the process is gone)"
    )]
    Short {
        pid: i32,
        op: MemOp,
        addr: RuntimeAddr,
        len: usize,
        done: usize,
    },
    #[error("pid {pid}: ptrace {op} at {addr} failed: {errno}")]
    Ptrace {
        pid: i32,
        op: MemOp,
        addr: RuntimeAddr,
        errno: Errno,
    },
}

/// Byte-addressed access to the memory of a target (a live process or a
/// buffer standing in for one).
pub trait TargetMemory {
    /// Fill `buf` with the bytes at `addr..addr+buf.len()`; all or error.
    fn read(&self, addr: RuntimeAddr, buf: &mut [u8]) -> Result<(), MemError>;
    /// Store `data` at `addr..addr+data.len()`. Implementations check the
    /// whole range first where they can; a live process may still fail
    /// part-way (the error says how far it got).
    fn write(&mut self, addr: RuntimeAddr, data: &[u8]) -> Result<(), MemError>;

    /// Little-endian u64 at `addr`.
    fn read_u64(&self, addr: RuntimeAddr) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// Little-endian u32 at `addr`.
    fn read_u32(&self, addr: RuntimeAddr) -> Result<u32, MemError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    /// One byte at `addr`.
    fn read_u8(&self, addr: RuntimeAddr) -> Result<u8, MemError> {
        let mut b = [0u8; 1];
        self.read(addr, &mut b)?;
        Ok(b[0])
    }
    /// Store a little-endian u64 at `addr`.
    fn write_u64(&mut self, addr: RuntimeAddr, value: u64) -> Result<(), MemError> {
        self.write(addr, &value.to_le_bytes())
    }
    /// Store a little-endian u32 at `addr`.
    fn write_u32(&mut self, addr: RuntimeAddr, value: u32) -> Result<(), MemError> {
        self.write(addr, &value.to_le_bytes())
    }
    /// `len` bytes at `addr` as a new vector; refuses (before allocating)
    /// when `len` exceeds `cap`, because lengths often come from the target.
    fn read_vec(&self, addr: RuntimeAddr, len: u64, cap: usize) -> Result<Vec<u8>, MemError> {
        let n = usize::try_from(len)
            .ok()
            .filter(|&n| n <= cap)
            .ok_or(MemError::TooLarge { addr, len, cap })?;
        let mut v = vec![0u8; n];
        self.read(addr, &mut v)?;
        Ok(v)
    }
    /// Fill each buffer of `ranges` with the bytes at its address, in
    /// order. A live process does it in as few system calls as it can (the
    /// commit reads what it replaces this way, while the process is
    /// paused). On failure: the index of the first range not read, and why.
    fn read_ranges(
        &self,
        ranges: &mut [(RuntimeAddr, &mut [u8])],
    ) -> Result<(), (usize, MemError)> {
        for (i, (addr, buf)) in ranges.iter_mut().enumerate() {
            self.read(*addr, buf).map_err(|e| (i, e))?;
        }
        Ok(())
    }
    /// Store each range of `ranges`, in order, in as few system calls as
    /// the target allows. On failure: the index of the first range that may
    /// not have been stored completely (earlier ones were), and why.
    fn write_ranges(&mut self, ranges: &[(RuntimeAddr, &[u8])]) -> Result<(), (usize, MemError)> {
        for (i, (addr, data)) in ranges.iter().enumerate() {
            self.write(*addr, data).map_err(|e| (i, e))?;
        }
        Ok(())
    }
}

impl<T: TargetMemory + ?Sized> TargetMemory for &mut T {
    fn read(&self, addr: RuntimeAddr, buf: &mut [u8]) -> Result<(), MemError> {
        (**self).read(addr, buf)
    }
    fn write(&mut self, addr: RuntimeAddr, data: &[u8]) -> Result<(), MemError> {
        (**self).write(addr, data)
    }
    fn read_ranges(
        &self,
        ranges: &mut [(RuntimeAddr, &mut [u8])],
    ) -> Result<(), (usize, MemError)> {
        (**self).read_ranges(ranges)
    }
    fn write_ranges(&mut self, ranges: &[(RuntimeAddr, &[u8])]) -> Result<(), (usize, MemError)> {
        (**self).write_ranges(ranges)
    }
}

/// Size of the pages [`PageCache`] reads whole.
const CACHE_PAGE: u64 = 4096;
/// Most pages a [`PageCache`] keeps (64 MiB); reads beyond go direct.
const CACHE_MAX_PAGES: usize = 16 * 1024;

/// Reads of a paused process one page at a time, each page read once: a
/// walk that reads thousands of small objects (the heap walk of a server:
/// 10,000 objects in redis) makes as many system calls as it touches pages
/// instead of one per object. Only for memory that nothing but this handle
/// changes while it lives (the process is paused and runs no code): writes
/// go through and update the pages kept. A page that cannot be read whole
/// (a guard page, the end of a mapping) is read direct every time, so every
/// error is the one the memory itself gives.
pub struct PageCache<M: TargetMemory> {
    mem: M,
    /// Page start → its bytes, or `None` when it could not be read whole.
    pages: std::cell::RefCell<std::collections::HashMap<u64, Option<Box<[u8]>>>>,
}

impl<M: TargetMemory> PageCache<M> {
    /// An empty cache over `mem`.
    pub fn new(mem: M) -> Self {
        PageCache {
            mem,
            pages: Default::default(),
        }
    }

    /// Copies `buf.len()` bytes at `addr` from kept pages, reading the
    /// pages missing; `false` when one cannot be read whole or the cache
    /// is full.
    fn read_cached(&self, addr: u64, buf: &mut [u8]) -> bool {
        let mut pages = self.pages.borrow_mut();
        let mut done = 0usize;
        while done < buf.len() {
            let at = addr + done as u64;
            let page = at - at % CACHE_PAGE;
            if !pages.contains_key(&page) {
                if pages.len() >= CACHE_MAX_PAGES {
                    return false;
                }
                let mut bytes = vec![0u8; CACHE_PAGE as usize].into_boxed_slice();
                let got = self.mem.read(RuntimeAddr(page), &mut bytes).is_ok();
                pages.insert(page, got.then_some(bytes));
            }
            let Some(Some(bytes)) = pages.get(&page) else {
                return false;
            };
            let off = (at - page) as usize;
            let n = (bytes.len() - off).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&bytes[off..off + n]);
            done += n;
        }
        true
    }
}

impl<M: TargetMemory> TargetMemory for PageCache<M> {
    fn read(&self, addr: RuntimeAddr, buf: &mut [u8]) -> Result<(), MemError> {
        range_end(MemOp::Read, addr, buf.len())?;
        if self.read_cached(addr.0, buf) {
            return Ok(());
        }
        self.mem.read(addr, buf)
    }

    fn write(&mut self, addr: RuntimeAddr, data: &[u8]) -> Result<(), MemError> {
        let end = range_end(MemOp::Write, addr, data.len())?;
        let result = self.mem.write(addr, data);
        // Kept pages take what was written; after a failure, how much
        // landed is unknown: forget them.
        let pages = self.pages.get_mut();
        let mut page = addr.0 - addr.0 % CACHE_PAGE;
        while page < end {
            if result.is_err() {
                pages.remove(&page);
            } else if let Some(Some(bytes)) = pages.get_mut(&page) {
                let from = addr.0.max(page);
                let to = end.min(page + CACHE_PAGE);
                bytes[(from - page) as usize..(to - page) as usize]
                    .copy_from_slice(&data[(from - addr.0) as usize..(to - addr.0) as usize]);
            }
            let Some(next) = page.checked_add(CACHE_PAGE) else {
                break;
            };
            page = next;
        }
        result
    }
}

/// End address (exclusive) of `addr..addr+len`, or an overflow error.
pub(crate) fn range_end(op: MemOp, addr: RuntimeAddr, len: usize) -> Result<u64, MemError> {
    u64::try_from(len)
        .ok()
        .and_then(|l| addr.0.checked_add(l))
        .ok_or(MemError::Overflow { op, addr, len })
}

/// A sparse address space made of non-overlapping byte regions, for tests of
/// code that reads and writes a target. An access may span adjacent regions;
/// any byte outside every region makes the whole access fail (a failed write
/// changes nothing).
#[derive(Clone, Debug, Default)]
pub struct ByteBuffer {
    /// Sorted by base address, non-overlapping, none empty.
    regions: Vec<(RuntimeAddr, Vec<u8>)>,
}

impl ByteBuffer {
    /// An empty address space (every access fails).
    pub fn new() -> Self {
        Self::default()
    }

    /// A buffer with one region.
    pub fn with_region(base: RuntimeAddr, bytes: Vec<u8>) -> Result<Self, MemError> {
        let mut b = Self::new();
        b.add_region(base, bytes)?;
        Ok(b)
    }

    /// Map `bytes` at `base`. Empty regions are ignored; a region overlapping
    /// an existing one or wrapping the address space is refused.
    pub fn add_region(&mut self, base: RuntimeAddr, bytes: Vec<u8>) -> Result<(), MemError> {
        let len = bytes.len();
        if len == 0 {
            return Ok(());
        }
        let end = range_end(MemOp::Write, base, len)?;
        let overlaps = self.regions.iter().any(|(b, v)| {
            let e = b.0 + v.len() as u64;
            base.0 < e && b.0 < end
        });
        if overlaps {
            return Err(MemError::Overlap { addr: base, len });
        }
        let pos = self.regions.partition_point(|(b, _)| b.0 < base.0);
        self.regions.insert(pos, (base, bytes));
        Ok(())
    }

    /// The regions, sorted by base address.
    pub fn regions(&self) -> impl Iterator<Item = (RuntimeAddr, &[u8])> {
        self.regions.iter().map(|(b, v)| (*b, v.as_slice()))
    }

    /// Region index and offset holding byte `addr`.
    fn locate(&self, addr: u64) -> Option<(usize, usize)> {
        let idx = self.regions.partition_point(|(b, _)| b.0 <= addr);
        let i = idx.checked_sub(1)?;
        let (b, v) = &self.regions[i];
        let off = usize::try_from(addr - b.0).ok()?;
        (off < v.len()).then_some((i, off))
    }

    /// Walk `addr..addr+len` region by region, calling `f(region, offset,
    /// offset_in_access, chunk_len)`; fails on the first unmapped byte.
    fn for_each_chunk(
        &self,
        op: MemOp,
        addr: RuntimeAddr,
        len: usize,
        mut f: impl FnMut(usize, usize, usize, usize),
    ) -> Result<(), MemError> {
        range_end(op, addr, len)?;
        let mut done = 0usize;
        while done < len {
            let cur = addr.0 + done as u64;
            let (i, off) = self
                .locate(cur)
                .ok_or(MemError::OutOfRange { op, addr, len })?;
            let n = (self.regions[i].1.len() - off).min(len - done);
            f(i, off, done, n);
            done += n;
        }
        Ok(())
    }
}

impl TargetMemory for ByteBuffer {
    fn read(&self, addr: RuntimeAddr, buf: &mut [u8]) -> Result<(), MemError> {
        let len = buf.len();
        let regions = &self.regions;
        self.for_each_chunk(MemOp::Read, addr, len, |i, off, at, n| {
            buf[at..at + n].copy_from_slice(&regions[i].1[off..off + n]);
        })
    }

    fn write(&mut self, addr: RuntimeAddr, data: &[u8]) -> Result<(), MemError> {
        // Validate the whole range before touching anything.
        let mut chunks = Vec::new();
        self.for_each_chunk(MemOp::Write, addr, data.len(), |i, off, at, n| {
            chunks.push((i, off, at, n))
        })?;
        for (i, off, at, n) in chunks {
            self.regions[i].1[off..off + n].copy_from_slice(&data[at..at + n]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf() -> ByteBuffer {
        let mut b = ByteBuffer::with_region(RuntimeAddr(0x1000), (0..16).collect()).unwrap();
        b.add_region(RuntimeAddr(0x1010), (16..32).collect())
            .unwrap();
        b.add_region(RuntimeAddr(0x2000), vec![0xaa; 8]).unwrap();
        b
    }

    #[test]
    fn page_cache_reads_and_writes_as_the_memory_does() {
        // Three whole pages, a partial one (unreadable whole: read direct)
        // and holes; reads and writes of every size at many places give
        // the same bytes and the same errors as the memory itself.
        let mut plain = ByteBuffer::new();
        plain
            .add_region(
                RuntimeAddr(0x10000),
                (0..0x3000u32).map(|i| i as u8).collect(),
            )
            .unwrap();
        plain
            .add_region(RuntimeAddr(0x20100), vec![0x5a; 0x80])
            .unwrap();
        let mut cached = PageCache::new(plain.clone());
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        for step in 0..4000 {
            let base = [0x10000u64, 0x20100, 0xff00, 0x12f00][next(4) as usize];
            let addr = RuntimeAddr(base + next(0x1200));
            let len = next(0x1100) as usize;
            if next(4) == 0 {
                let data: Vec<u8> = (0..len).map(|_| next(256) as u8).collect();
                let a = plain.write(addr, &data).is_ok();
                let b = cached.write(addr, &data).is_ok();
                assert_eq!(a, b, "step {step}: write of {len} at {addr}");
            } else {
                let mut a = vec![0u8; len];
                let mut b = vec![0u8; len];
                let ra = plain.read(addr, &mut a).map_err(|e| e.to_string());
                let rb = cached.read(addr, &mut b).map_err(|e| e.to_string());
                assert_eq!(ra, rb, "step {step}: read of {len} at {addr}");
                if ra.is_ok() {
                    assert_eq!(a, b, "step {step}: bytes of {len} at {addr}");
                }
            }
        }
        assert!(!cached.pages.borrow().is_empty());
    }

    #[test]
    fn reads_inside_and_across_adjacent_regions() {
        let b = buf();
        assert_eq!(b.read_u8(RuntimeAddr(0x1000)).unwrap(), 0);
        assert_eq!(
            b.read_u64(RuntimeAddr(0x100c)).unwrap(),
            u64::from_le_bytes([12, 13, 14, 15, 16, 17, 18, 19])
        );
        assert_eq!(
            b.read_vec(RuntimeAddr(0x101e), 2, 16).unwrap(),
            vec![30, 31]
        );
        let mut empty = [];
        b.read(RuntimeAddr(0x5000), &mut empty).unwrap();
    }

    #[test]
    fn out_of_range_is_an_error() {
        let b = buf();
        // One byte past the end of the second region.
        let e = b.read_u64(RuntimeAddr(0x101c)).unwrap_err();
        assert!(
            matches!(e, MemError::OutOfRange { op: MemOp::Read, addr, len: 8 } if addr == RuntimeAddr(0x101c)),
            "{e}"
        );
        // Entirely before, in a gap, and after.
        assert!(b.read_u8(RuntimeAddr(0xfff)).is_err());
        assert!(b.read_u8(RuntimeAddr(0x1020)).is_err());
        assert!(b.read_u8(RuntimeAddr(0x2008)).is_err());
        // Wrapping the address space.
        assert!(matches!(
            b.read_u64(RuntimeAddr(u64::MAX - 3)),
            Err(MemError::Overflow { .. })
        ));
    }

    #[test]
    fn failed_write_changes_nothing() {
        let mut b = buf();
        let e = b.write(RuntimeAddr(0x101e), &[1, 2, 3, 4]).unwrap_err();
        assert!(matches!(
            e,
            MemError::OutOfRange {
                op: MemOp::Write,
                ..
            }
        ));
        assert_eq!(b.read_vec(RuntimeAddr(0x101e), 2, 2).unwrap(), vec![30, 31]);
        b.write_u64(RuntimeAddr(0x100c), u64::MAX).unwrap();
        assert_eq!(b.read_u64(RuntimeAddr(0x100c)).unwrap(), u64::MAX);
        assert_eq!(b.read_u8(RuntimeAddr(0x100b)).unwrap(), 11);
        assert_eq!(b.read_u8(RuntimeAddr(0x1014)).unwrap(), 20);
    }

    #[test]
    fn read_vec_cap_is_checked_before_allocating() {
        let b = buf();
        let e = b.read_vec(RuntimeAddr(0x1000), u64::MAX, 1024).unwrap_err();
        assert!(matches!(e, MemError::TooLarge { cap: 1024, .. }), "{e}");
        assert!(b.read_vec(RuntimeAddr(0x1000), 17, 16).is_err());
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let mut b = buf();
        assert!(matches!(
            b.add_region(RuntimeAddr(0x100f), vec![0; 1]),
            Err(MemError::Overlap { .. })
        ));
        assert!(b.add_region(RuntimeAddr(0x0ff8), vec![0; 9]).is_err());
        assert!(b.add_region(RuntimeAddr(0x0ff8), vec![0; 8]).is_ok());
        assert!(b.add_region(RuntimeAddr(u64::MAX), vec![0; 2]).is_err());
        assert_eq!(b.regions().count(), 4);
    }

    #[test]
    fn mut_ref_is_target_memory() {
        let mut b = buf();
        fn poke(mut m: impl TargetMemory) {
            m.write_u32(RuntimeAddr(0x2000), 7).unwrap();
        }
        poke(&mut b);
        assert_eq!(b.read_u32(RuntimeAddr(0x2000)).unwrap(), 7);
    }
}
