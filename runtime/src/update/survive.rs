//! Keeping the target alive if the updater dies while update points are
//! armed: the rescue SIGTRAP handler ([`crate::target::rescue`]) is
//! installed before the world is stopped and removed right after (the
//! breakpoints only exist while the world is being stopped).

use crate::engine::state::Image;
use crate::load;
use crate::stop::ArmingPlan;
use crate::target::ptrace::Tracee;
use crate::target::remote::RemoteCalls;
use crate::target::rescue::{Rescue, RescueError, Trampolines};
use crate::update::UpdateError;
use nix::unistd::Pid;
use upstare_dwarf::fdt::Arming;
use upstare_dwarf::RuntimeAddr;

/// An installed rescue handler and where its sessions run.
pub struct Installed {
    rescue: Rescue,
    gadget: RuntimeAddr,
}

/// A stopped thread to run the sessions in: the leader if traced.
fn session_thread(tracee: &Tracee) -> Pid {
    let pid = tracee.pid();
    let traced = tracee.traced();
    if traced.contains(&pid) {
        pid
    } else {
        traced.first().copied().unwrap_or(pid)
    }
}

fn rescue_err(e: RescueError) -> UpdateError {
    UpdateError::Rescue(Box::new(e))
}

/// What the rescue handler covers: the update points armed with `int3`
/// (`arming`'s: every one, or for a binary rewritten with `--inline-points`
/// those that kept `int3`) and the trampolines of the detoured ones, if
/// any.
pub fn rescued<'a>(
    old: &Image,
    arming: &'a ArmingPlan,
) -> (&'a [RuntimeAddr], Option<Trampolines>) {
    let trampolines = match &old.tables.arming {
        Arming::Inline(i) if !i.detours.is_empty() => Some(Trampolines {
            start: old.runtime(i.trampolines.0),
            end: old.runtime(i.trampolines.1),
            flag: old.runtime(i.flag),
        }),
        _ => None,
    };
    (&arming.int3, trampolines)
}

/// Installs the rescue handler for every update point of `old` (none: no
/// handler, nothing will be armed), its remote calls borrowing the code at
/// `old`'s entry point, looked up now.
pub fn install(tracee: &mut Tracee, old: &Image) -> Result<Option<Installed>, UpdateError> {
    let gadget = load::running_gadget(tracee.pid(), old)?;
    install_at(tracee, old, gadget, &ArmingPlan::of(old)).map_err(|e| rescue_err(*e))
}

/// [`install`] with the gadget remote calls borrow (`old`'s entry point)
/// and what arming `old` writes worked out before the pause.
pub fn install_at(
    tracee: &mut Tracee,
    old: &Image,
    gadget: RuntimeAddr,
    arming: &ArmingPlan,
) -> Result<Option<Installed>, Box<RescueError>> {
    let (points, trampolines) = rescued(old, arming);
    if points.is_empty() && trampolines.is_none() {
        return Ok(None);
    }
    let tid = session_thread(tracee);
    let mut rc = RemoteCalls::new(tracee, tid, gadget).map_err(|e| Box::new(e.into()))?;
    let installed = Rescue::install(&mut rc, points.len(), trampolines);
    let finished = rc.finish();
    let rescue = installed?;
    if let Err(e) = finished {
        let _ = remove(
            tracee,
            Installed {
                rescue: rescue.clone(),
                gadget,
            },
        );
        return Err(Box::new(e.into()));
    }
    Ok(Some(Installed { rescue, gadget }))
}

impl Installed {
    /// Adds breakpoints about to be armed (address, byte it covers) to the
    /// handler's table; refused when the table is full (arming them would
    /// leave traps the handler cannot undo).
    pub fn add(
        &mut self,
        tracee: &Tracee,
        entries: &[(RuntimeAddr, u8)],
    ) -> Result<(), Box<RescueError>> {
        match self.rescue.add(&mut tracee.memory(), entries) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Box::new(RescueError::Full {
                addr: entries.first().map_or(RuntimeAddr(0), |e| e.0),
            })),
            Err(e) => Err(Box::new(e)),
        }
    }
}

/// Puts the program's SIGTRAP action back and unmaps the rescue area.
pub fn remove(tracee: &mut Tracee, installed: Installed) -> Result<(), UpdateError> {
    let tid = session_thread(tracee);
    let mut rc =
        RemoteCalls::new(tracee, tid, installed.gadget).map_err(|e| rescue_err(e.into()))?;
    let removed = installed.rescue.remove(&mut rc);
    let finished = rc.finish();
    removed.map_err(rescue_err)?;
    finished.map_err(|e| rescue_err(e.into()))
}
