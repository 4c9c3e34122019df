//! Globals carried from OLD to NEW as the update plan says: the check that
//! the plan maps every global, and the writes that copy them.
//!
//! Pure computation: reads go through [`TargetMemory`], results are a list of
//! writes the commit stage performs after everything has been validated.

use upstare_dwarf::RuntimeAddr;
use upstare_patcher::{GlobalAction, GlobalMapping, UpdatePlan};

use crate::engine::convert::{convert, ConvertError};
use crate::engine::pointers::Remapper;
use crate::engine::state::Image;
use crate::engine::Write;
use crate::memory::{MemError, TargetMemory};

/// Largest single variable copied (a bound on target-controlled sizes).
pub const MAX_VALUE_SIZE: u64 = 64 << 20;

/// Why state cannot be transferred.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{what}: type changed from {old} to {new} and no default rule maps it ({why}); it needs a SPEC line or a transformer")]
    TypeChanged {
        what: String,
        old: String,
        new: String,
        why: String,
    },
    #[error("{what}: cannot convert from {old} to {new}: {source}")]
    Convert {
        what: String,
        old: String,
        new: String,
        #[source]
        source: ConvertError,
    },
    #[error("{what}: the update plan names no such global in one of the versions (the plan was made for other binaries)")]
    PlanMismatch { what: String },
    #[error("{what}: size {size} is not supported")]
    BadSize { what: String, size: u64 },
    #[error("{what}: {source}")]
    Memory {
        what: String,
        #[source]
        source: MemError,
    },
}

/// What happened to the globals.
#[derive(Debug, Default)]
pub struct GlobalsPlan {
    pub writes: Vec<Write>,
    pub copied: usize,
    /// Read-only globals (const objects) left with the new version's value.
    pub kept_const: usize,
    /// Globals whose type changed, converted (counted in `copied` too).
    pub converted: usize,
    /// What was converted, in words (`global acct: struct account →
    /// struct account (member bonus added at offset 8)`).
    pub converted_names: Vec<String>,
    /// Globals the program never changed, left with NEW's initial value.
    pub kept_initial: usize,
}

/// Whether global `m` still holds OLD's initial value in `mem` (the program
/// never changed it): then it follows NEW, which already holds its own
/// initial value. Unreadable memory counts as changed.
fn unchanged_since_start(mem: &impl TargetMemory, m: &GlobalMapping, old: &Image) -> bool {
    let (Some(initial), Some(g)) = (&m.initial, old.tables.globals.get(m.old)) else {
        return false;
    };
    mem.read_vec(old.runtime(g.addr), g.size, MAX_VALUE_SIZE as usize)
        .is_ok_and(|live| initial.matches(&live, old.bias.0))
}

/// The live bytes of every global of OLD that `plan` copies or converts,
/// by index in `plan.globals`, read in one batch (a paused process: one
/// system call for many globals rather than one each). A global that
/// could not be read in the batch is left out (read again alone, which
/// says why it fails).
fn read_copied_globals(
    mem: &impl TargetMemory,
    plan: &UpdatePlan,
    old: &Image,
) -> std::collections::HashMap<usize, Vec<u8>> {
    let wanted: Vec<(usize, RuntimeAddr, usize)> = plan
        .globals
        .iter()
        .enumerate()
        .filter(|(_, m)| matches!(m.action, GlobalAction::Copy | GlobalAction::Convert { .. }))
        .filter_map(|(k, m)| {
            let g = old.tables.globals.get(m.old)?;
            let size = usize::try_from(g.size)
                .ok()
                .filter(|&n| g.size <= MAX_VALUE_SIZE && n > 0)?;
            Some((k, old.runtime(g.addr), size))
        })
        .collect();
    let mut bufs: Vec<Vec<u8>> = wanted.iter().map(|&(_, _, n)| vec![0u8; n]).collect();
    let read = {
        let mut ranges: Vec<(RuntimeAddr, &mut [u8])> = wanted
            .iter()
            .zip(bufs.iter_mut())
            .map(|(&(_, addr, _), b)| (addr, b.as_mut_slice()))
            .collect();
        match mem.read_ranges(&mut ranges) {
            Ok(()) => ranges.len(),
            Err((i, _)) => i,
        }
    };
    wanted
        .iter()
        .zip(bufs)
        .take(read)
        .map(|(&(k, _, _), b)| (k, b))
        .collect()
}

/// Refuses the update when the plan leaves a global unmapped (a change of
/// type no rule maps) and the program changed its value; one it never
/// changed follows NEW. Runs before anything is loaded.
pub fn check_globals(
    plan: &UpdatePlan,
    mem: &impl TargetMemory,
    old: &Image,
) -> Result<(), TransferError> {
    for m in plan.type_changed_globals() {
        if let GlobalAction::TypeChanged {
            old_type,
            new_type,
            why,
        } = &m.action
        {
            if !unchanged_since_start(mem, m, old) {
                return Err(TransferError::TypeChanged {
                    what: m.label.clone(),
                    old: old_type.clone(),
                    new: new_type.clone(),
                    why: why.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Executes the plan's global mappings: reads every global the plan copies
/// and prepares its write into the new image, pointers remapped.
pub fn transfer_globals(
    mem: &impl TargetMemory,
    plan: &UpdatePlan,
    old: &Image,
    new: &Image,
    remap: &mut Remapper<'_>,
) -> Result<GlobalsPlan, TransferError> {
    check_globals(plan, mem, old)?;
    let mut out = GlobalsPlan::default();
    let mut live = read_copied_globals(mem, plan, old);
    for (k, m) in plan.globals.iter().enumerate() {
        let change = match &m.action {
            GlobalAction::Copy => None,
            GlobalAction::Convert { change } => Some(change),
            GlobalAction::KeepNew => {
                out.kept_const += 1;
                continue;
            }
            GlobalAction::TypeChanged { .. } => {
                // check_globals let it through: never changed.
                out.kept_initial += 1;
                continue;
            }
            _ => continue,
        };
        let read_before = live.remove(&k);
        let unchanged = match (&read_before, &m.initial) {
            (Some(bytes), Some(initial)) => initial.matches(bytes, old.bias.0),
            (Some(_), None) => false,
            (None, _) => unchanged_since_start(mem, m, old),
        };
        if unchanged {
            out.kept_initial += 1;
            continue;
        }
        let what = m.label.clone();
        let (Some(g), Some(n)) = (
            old.tables.globals.get(m.old),
            m.new.and_then(|j| new.tables.globals.get(j)),
        ) else {
            return Err(TransferError::PlanMismatch { what });
        };
        if g.size > MAX_VALUE_SIZE {
            return Err(TransferError::BadSize { what, size: g.size });
        }
        let mut bytes = match read_before {
            Some(b) => b,
            None => mem
                .read_vec(old.runtime(g.addr), g.size, MAX_VALUE_SIZE as usize)
                .map_err(|source| TransferError::Memory {
                    what: what.clone(),
                    source,
                })?,
        };
        remap.remap_value_at(&old.tables.types, g.ty, &mut bytes, &|| what.clone());
        if let Some(change) = change {
            // The base is NEW's initializer (already in NEW's mapping): new
            // members keep it.
            let mut base = mem
                .read_vec(new.runtime(n.addr), n.size, MAX_VALUE_SIZE as usize)
                .map_err(|source| TransferError::Memory {
                    what: what.clone(),
                    source,
                })?;
            convert(&change.conversion, &bytes, &mut base).map_err(|source| {
                TransferError::Convert {
                    what: what.clone(),
                    old: change.old_type.clone(),
                    new: change.new_type.clone(),
                    source,
                }
            })?;
            bytes = base;
            out.converted += 1;
            out.converted_names.push(format!(
                "{what}: {} → {} ({})",
                change.old_type,
                change.new_type,
                change.changes.join("; ")
            ));
        }
        out.writes.push(Write {
            addr: new.runtime(n.addr),
            bytes,
            what,
        });
        out.copied += 1;
    }
    for (j, bytes) in &plan.new_global_values {
        let Some(n) = new.tables.globals.get(*j) else {
            return Err(TransferError::PlanMismatch {
                what: format!("new global #{j}"),
            });
        };
        if bytes.len() as u64 != n.size {
            return Err(TransferError::BadSize {
                what: format!("value of new global {}", n.name),
                size: bytes.len() as u64,
            });
        }
        out.writes.push(Write {
            addr: new.runtime(n.addr),
            bytes: bytes.clone(),
            what: format!("new global {}", n.name),
        });
    }
    Ok(out)
}
