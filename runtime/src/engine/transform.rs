//! The calls of the SPEC's C transformers, as data: which function gets
//! which old bytes (copies read now) and which new bytes (read at call time
//! from the computed writes, so that each call sees the results of the
//! calls before it), from the plan's [`TransformerPlan`], the paused
//! threads and where their frames were placed. Running them needs the
//! process (`load::transformer`); this part is pure.
//!
//! [`TransformerPlan`]: upstare_patcher::transformer::TransformerPlan

use upstare_dwarf::model::{type_size, VarLocation};
use upstare_dwarf::RuntimeAddr;
use upstare_patcher::transformer::ValueCall;
use upstare_patcher::UpdatePlan;

use crate::engine::rebuild::ThreadLayout;
use crate::engine::state::{Image, ThreadState};
use crate::engine::transfer::MAX_VALUE_SIZE;
use crate::engine::Write;
use crate::memory::{MemError, TargetMemory};

/// One call of a transformer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// The C function.
    pub function: String,
    /// `global acct`, `thread 12: main: local s`, `thread 12: frame of main`.
    pub what: String,
    /// A frame transformer (arguments are arrays of pointers) or a value
    /// transformer (arguments point to one value each).
    pub frame: bool,
    /// The old values (copies), one per pointer; `None` is passed as NULL.
    pub old: Vec<Option<Vec<u8>>>,
    /// Where each new value is: its bytes are read from the pending writes
    /// (else memory) before the call and written back after it.
    pub new: Vec<Option<(RuntimeAddr, u64)>>,
}

/// Why the calls cannot be prepared.
#[derive(Debug, thiserror::Error)]
pub enum TransformPlanError {
    #[error("{what}: {source}")]
    Memory {
        what: String,
        #[source]
        source: MemError,
    },
    #[error("{what}: the update plan names no such variable or global (the plan was made for other binaries)")]
    PlanMismatch { what: String },
    #[error("{what}: {size} bytes is too large for a transformer")]
    TooLarge { what: String, size: u64 },
}

/// `a + delta` (frame offsets of the tables; a wrapped address fails to
/// read or write later, it is never trusted).
trait Wrapping {
    fn wrapping_offset(self, delta: i64) -> RuntimeAddr;
}

impl Wrapping for RuntimeAddr {
    fn wrapping_offset(self, delta: i64) -> RuntimeAddr {
        RuntimeAddr(self.0.wrapping_add_signed(delta))
    }
}

fn read(
    mem: &impl TargetMemory,
    at: RuntimeAddr,
    len: u64,
    what: &str,
) -> Result<Vec<u8>, TransformPlanError> {
    if len > MAX_VALUE_SIZE {
        return Err(TransformPlanError::TooLarge {
            what: what.to_string(),
            size: len,
        });
    }
    mem.read_vec(at, len, MAX_VALUE_SIZE as usize)
        .map_err(|source| TransformPlanError::Memory {
            what: what.to_string(),
            source,
        })
}

/// Whether some pending write touches `[at, at + len)`.
fn written(writes: &[Write], at: RuntimeAddr, len: u64) -> bool {
    let end = at.0.saturating_add(len);
    writes.iter().any(|w| {
        let wend = w.addr.0.saturating_add(w.bytes.len() as u64);
        w.addr.0 < end && at.0 < wend
    })
}

/// One value call at `old_base` / `new_base` (the start of the whole
/// variable).
fn value_job(
    mem: &impl TargetMemory,
    c: &ValueCall,
    old_base: RuntimeAddr,
    new_base: RuntimeAddr,
    what: String,
) -> Result<Job, TransformPlanError> {
    let at = |b: RuntimeAddr, off: u64| RuntimeAddr(b.0.wrapping_add(off));
    let old = read(mem, at(old_base, c.old_offset), c.old_size, &what)?;
    if c.new_size > MAX_VALUE_SIZE {
        return Err(TransformPlanError::TooLarge {
            what,
            size: c.new_size,
        });
    }
    Ok(Job {
        function: c.function.clone(),
        what,
        frame: false,
        old: vec![Some(old)],
        new: vec![Some((at(new_base, c.new_offset), c.new_size))],
    })
}

/// Every transformer call of the update, in order: per global, then per
/// thread and frame (bottom first) the type transformers on its locals and
/// then its frame transformer. `writes` are the computed writes (a global
/// with none follows NEW and is left alone unless its transformer must
/// always run).
pub fn jobs(
    mem: &impl TargetMemory,
    plan: &UpdatePlan,
    old: &Image,
    new: &Image,
    threads: &[ThreadState],
    layouts: &[ThreadLayout],
    writes: &[Write],
) -> Result<Vec<Job>, TransformPlanError> {
    let tp = &plan.transformers;
    let mut out = Vec::new();
    for g in &tp.globals {
        let (Some(og), Some(ng)) = (old.tables.globals.get(g.old), new.tables.globals.get(g.new))
        else {
            return Err(TransformPlanError::PlanMismatch {
                what: g.label.clone(),
            });
        };
        let new_at = new.runtime(ng.addr);
        if !g.always && !written(writes, new_at, ng.size) {
            continue;
        }
        for c in &g.calls {
            out.push(value_job(
                mem,
                c,
                old.runtime(og.addr),
                new_at,
                format!("global {}", c.what),
            )?);
        }
    }
    for (t, layout) in threads.iter().zip(layouts) {
        for p in &layout.frames {
            let Some(f) = t.frames.get(p.old_index) else {
                continue;
            };
            let Some(fm) = plan.function(&f.function) else {
                continue;
            };
            let (Some(of), Some(nf)) = (
                old.tables.functions.get(fm.old),
                fm.new.and_then(|j| new.tables.functions.get(j)),
            ) else {
                continue;
            };
            let mismatch = |what: &str| TransformPlanError::PlanMismatch {
                what: format!("thread {}: {}: {what}", t.tid, f.function),
            };
            for l in tp.locals.iter().filter(|l| l.function == f.function) {
                let (Some(ov), Some(nv)) = (of.vars.get(l.old_var), nf.vars.get(l.new_var)) else {
                    return Err(mismatch("local"));
                };
                let (VarLocation::Cfa(oo), VarLocation::Cfa(no)) = (&ov.location, &nv.location)
                else {
                    continue;
                };
                for c in &l.calls {
                    out.push(value_job(
                        mem,
                        c,
                        f.cfa.wrapping_offset(oo.0),
                        p.new_cfa.wrapping_offset(no.0),
                        format!("thread {}: {}: local {}", t.tid, f.function, c.what),
                    )?);
                }
            }
            for fc in tp.frames.iter().filter(|c| c.function == f.function) {
                let what = format!("thread {}: frame of {}", t.tid, f.function);
                let mut olds = Vec::with_capacity(fc.old_vars.len());
                for &i in &fc.old_vars {
                    let v = of.vars.get(i).ok_or_else(|| mismatch("frame local"))?;
                    olds.push(match v.location {
                        VarLocation::Cfa(o) => {
                            let size = type_size(&old.tables.types, v.ty).unwrap_or(0);
                            Some(read(mem, f.cfa.wrapping_offset(o.0), size, &what)?)
                        }
                        _ => None,
                    });
                }
                let mut news = Vec::with_capacity(fc.new_vars.len());
                for &k in &fc.new_vars {
                    let v = nf.vars.get(k).ok_or_else(|| mismatch("frame local"))?;
                    news.push(match v.location {
                        VarLocation::Cfa(o) => {
                            let size = type_size(&new.tables.types, v.ty).unwrap_or(0);
                            if size > MAX_VALUE_SIZE {
                                return Err(TransformPlanError::TooLarge { what, size });
                            }
                            Some((p.new_cfa.wrapping_offset(o.0), size))
                        }
                        _ => None,
                    });
                }
                out.push(Job {
                    function: fc.transformer.clone(),
                    what,
                    frame: true,
                    old: olds,
                    new: news,
                });
            }
        }
    }
    Ok(out)
}

/// The bytes `[at, at + len)` will hold after the commit: memory now, with
/// every pending write over it in order.
pub fn read_pending(
    mem: &impl TargetMemory,
    writes: &[Write],
    at: RuntimeAddr,
    len: u64,
) -> Result<Vec<u8>, MemError> {
    let mut b = mem.read_vec(at, len, MAX_VALUE_SIZE as usize)?;
    let end = at.0.saturating_add(len);
    for w in writes {
        let wend = w.addr.0.saturating_add(w.bytes.len() as u64);
        let (lo, hi) = (w.addr.0.max(at.0), wend.min(end));
        if lo >= hi {
            continue;
        }
        let (dst, src) = ((lo - at.0) as usize, (lo - w.addr.0) as usize);
        let n = (hi - lo) as usize;
        if let (Some(d), Some(s)) = (b.get_mut(dst..dst + n), w.bytes.get(src..src + n)) {
            d.copy_from_slice(s);
        }
    }
    Ok(b)
}

/// Makes `bytes` what `at` holds after the commit: patched into the last
/// pending write touching it when that one holds the whole range, else a
/// new write after all the others.
pub fn write_pending(writes: &mut Vec<Write>, at: RuntimeAddr, bytes: Vec<u8>, what: &str) {
    let end = at.0.saturating_add(bytes.len() as u64);
    let last = writes.iter_mut().rev().find(|w| {
        let wend = w.addr.0.saturating_add(w.bytes.len() as u64);
        w.addr.0 < end && at.0 < wend
    });
    if let Some(w) = last {
        let wend = w.addr.0.saturating_add(w.bytes.len() as u64);
        if w.addr.0 <= at.0 && end <= wend {
            let off = (at.0 - w.addr.0) as usize;
            if let Some(d) = w.bytes.get_mut(off..off + bytes.len()) {
                d.copy_from_slice(&bytes);
                return;
            }
        }
    }
    writes.push(Write {
        addr: at,
        bytes,
        what: format!("{what} (transformed)"),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ByteBuffer;

    #[test]
    fn pending_bytes_are_memory_overlaid_by_writes_in_order() {
        let mem = ByteBuffer::with_region(RuntimeAddr(0x1000), vec![0u8; 64]).expect("region");
        let mut writes = vec![
            Write {
                addr: RuntimeAddr(0x1004),
                bytes: vec![1; 8],
                what: "a".into(),
            },
            Write {
                addr: RuntimeAddr(0x1008),
                bytes: vec![2; 8],
                what: "b".into(),
            },
        ];
        let got = read_pending(&mem, &writes, RuntimeAddr(0x1002), 16).expect("read");
        assert_eq!(got, [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0]);
        // Inside the last write: patched in place.
        write_pending(&mut writes, RuntimeAddr(0x100a), vec![9, 9], "x");
        assert_eq!(writes.len(), 2);
        assert_eq!(writes[1].bytes, [2, 2, 9, 9, 2, 2, 2, 2]);
        // Across two writes: appended, and it wins.
        write_pending(&mut writes, RuntimeAddr(0x1006), vec![7; 4], "y");
        assert_eq!(writes.len(), 3);
        let got = read_pending(&mem, &writes, RuntimeAddr(0x1004), 8).expect("read");
        assert_eq!(got, [1, 1, 7, 7, 7, 7, 9, 9]);
    }
}
