//! Signals to the updater, and the test-only fault-injection hook.
//!
//! `upstare-apply` catches SIGINT, SIGTERM, SIGHUP, SIGQUIT and SIGPIPE
//! ([`catch_termination_signals`]): the handler only records the signal.
//! The update looks at it at every [`checkpoint`] before the commit and
//! returns [`crate::update::UpdateError::Interrupted`], so every guard
//! (breakpoints, remote sessions, the loaded image, the seize) undoes what
//! it did on the way out: the process is left exactly as it was. Once the
//! commit has begun ([`begin_commit`]) a recorded signal no longer stops
//! the update: stopping half-way would leave the process broken, so the
//! update is finished and the caller reports the signal afterwards.
//!
//! # Fault injection (debug builds only)
//! `UPSTARE_TEST_SIGNAL_AT=<phase>:<n>:<SIGNAL>` (e.g. `load:3:SIGKILL`)
//! makes the updater send itself SIGNAL at the n-th (1-based) checkpoint of
//! phase `stop`, `load`, `transfer` or `commit`. Tests use it to hit exact
//! moments of an update without sleeping and hoping. With
//! `UPSTARE_TEST_SIGNAL_AT` set (`count` only counts) the updater prints, when it ends, how many
//! checkpoints each phase had (`upstare-test: checkpoints stop=N ...`).
//! `UPSTARE_TEST_TARGET_SIGNALS_AT=<phase>:<n>:<SIG>[+<SIG>...]` (a
//! moment the update does not reach fires when it ends) (e.g.
//! `load:4:SIGSTOP+SIGCONT`) sends the signals, in order, to the *target*
//! at that checkpoint: job control during an update (several moments
//! separated by commas: `stop:2:SIGSTOP,load:9:SIGCONT`; phase `any`
//! counts the checkpoints of all phases in the order they are passed). Neither variable is
//! read in release builds.

use crate::target::ptrace::{self, Sig};
use nix::errno::Errno;
use nix::libc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

/// The signals that end the updater by default and that it turns into a
/// rollback instead.
pub const TERMINATION_SIGNALS: [i32; 5] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGPIPE,
];

/// The last termination signal received (0: none).
static PENDING: AtomicI32 = AtomicI32::new(0);
/// Whether the commit has begun (a signal no longer stops the update).
static COMMITTING: AtomicBool = AtomicBool::new(false);

/// The handler: async-signal-safe, it only stores the number.
extern "C" fn record(sig: libc::c_int) {
    PENDING.store(sig, Ordering::SeqCst);
}

/// Makes the termination signals ([`TERMINATION_SIGNALS`]) set a flag the
/// update checks instead of killing the updater (which would leave the
/// target with breakpoints armed).
pub fn catch_termination_signals() -> Result<(), Errno> {
    for sig in TERMINATION_SIGNALS {
        ptrace::catch_signal(sig, record)?;
    }
    Ok(())
}

/// The termination signal received so far, if any.
pub fn pending() -> Option<Sig> {
    match PENDING.load(Ordering::SeqCst) {
        0 => None,
        n => Some(Sig(n)),
    }
}

/// The termination signal that should stop the update now: one was received
/// and the commit has not begun.
pub fn interruption() -> Option<Sig> {
    if COMMITTING.load(Ordering::SeqCst) {
        None
    } else {
        pending()
    }
}

/// From now on a termination signal no longer stops the update.
pub fn begin_commit() {
    COMMITTING.store(true, Ordering::SeqCst);
}

/// Back to the state before [`begin_commit`] (the update is over).
pub fn end_commit() {
    COMMITTING.store(false, Ordering::SeqCst);
}

/// A moment of the update a fault can be injected at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Stopping the world (breakpoints may be armed).
    Stop,
    /// Loading NEW with remote calls (a thread may sit at the gadget).
    Load,
    /// Between the phases: planning, transfer, rebuild.
    Transfer,
    /// The commit.
    Commit,
}

impl Phase {
    const ALL: [Phase; 4] = [Phase::Stop, Phase::Load, Phase::Transfer, Phase::Commit];

    /// The name used in `UPSTARE_TEST_SIGNAL_AT`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Stop => "stop",
            Phase::Load => "load",
            Phase::Transfer => "transfer",
            Phase::Commit => "commit",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Checkpoints of every phase, in order.
static ANY: AtomicU64 = AtomicU64::new(0);
/// Whether the world is being stopped (remote calls then belong to the
/// stop, not the load).
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Marks the span of stopping the world (its remote calls install and
/// remove the rescue handler).
pub fn set_stopping(on: bool) {
    STOPPING.store(on, Ordering::SeqCst);
}

static COUNTS: [AtomicU64; 4] = [
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
];

/// What `UPSTARE_TEST_SIGNAL_AT` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Injection {
    Count,
    At { phase: Phase, n: u64, sig: Sig },
}

/// Parses `<phase>:<n>:<SIGNAL>` or `count`.
fn parse_injection(text: &str) -> Option<Injection> {
    if text == "count" {
        return Some(Injection::Count);
    }
    let mut parts = text.split(':');
    let (phase, n, sig) = (parts.next()?, parts.next()?, parts.next()?);
    let phase = Phase::ALL.into_iter().find(|p| p.name() == phase)?;
    let n = n.parse().ok()?;
    let sig: nix::sys::signal::Signal = sig.parse().ok()?;
    Some(Injection::At {
        phase,
        n,
        sig: Sig::from(sig),
    })
}

fn injection() -> Option<Injection> {
    if !cfg!(debug_assertions) {
        return None;
    }
    static INJ: std::sync::OnceLock<Option<Injection>> = std::sync::OnceLock::new();
    *INJ.get_or_init(|| {
        std::env::var("UPSTARE_TEST_SIGNAL_AT")
            .ok()
            .and_then(|t| parse_injection(&t))
    })
}

/// The process being updated (for `UPSTARE_TEST_TARGET_SIGNALS_AT`).
static TARGET: AtomicI32 = AtomicI32::new(0);

/// Records the process being updated.
pub fn set_target(pid: i32) {
    TARGET.store(pid, Ordering::SeqCst);
}

/// What `UPSTARE_TEST_TARGET_SIGNALS_AT` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TargetSignals {
    /// `None`: the n-th checkpoint of any phase (`any:N`), in the order the
    /// update passes them.
    phase: Option<Phase>,
    n: u64,
    sigs: Vec<nix::sys::signal::Signal>,
}

fn parse_target_signals(text: &str) -> Option<TargetSignals> {
    let mut parts = text.split(':');
    let (phase, n, sigs) = (parts.next()?, parts.next()?, parts.next()?);
    let phase = match phase {
        "any" => None,
        p => Some(Phase::ALL.into_iter().find(|q| q.name() == p)?),
    };
    let sigs: Option<Vec<_>> = sigs.split('+').map(|s| s.parse().ok()).collect();
    Some(TargetSignals {
        phase,
        n: n.parse().ok()?,
        sigs: sigs?,
    })
}

/// The moments of `UPSTARE_TEST_TARGET_SIGNALS_AT` (comma-separated).
fn target_signals() -> &'static [TargetSignals] {
    if !cfg!(debug_assertions) {
        return &[];
    }
    static TS: std::sync::OnceLock<Vec<TargetSignals>> = std::sync::OnceLock::new();
    TS.get_or_init(|| {
        std::env::var("UPSTARE_TEST_TARGET_SIGNALS_AT")
            .map(|t| t.split(',').filter_map(parse_target_signals).collect())
            .unwrap_or_default()
    })
}

/// Marks a moment of `phase`. In debug builds, sends the signals the test
/// variables name when this is their moment.
pub fn checkpoint(phase: Phase) {
    let n = COUNTS[phase.index()].fetch_add(1, Ordering::SeqCst) + 1;
    let any = ANY.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(Injection::At {
        phase: p,
        n: at,
        sig,
    }) = injection()
    {
        if p == phase && n == at {
            if let Some(s) = sig.to_nix() {
                let _ = nix::sys::signal::raise(s);
            }
        }
    }
    let target = TARGET.load(Ordering::SeqCst);
    for t in target_signals() {
        let here = match t.phase {
            Some(p) => p == phase && t.n == n,
            None => t.n == any,
        };
        if here && target > 0 {
            for &s in &t.sigs {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(target), s);
            }
        }
    }
}

/// Sends the `UPSTARE_TEST_TARGET_SIGNALS_AT` signals whose moment the
/// update never reached (the number of moments varies from run to run with
/// how long the threads take to stop): a moment past the last one fires
/// when the update ends, so a test's stop-then-continue always continues.
pub fn flush_target_signals() {
    let target = TARGET.load(Ordering::SeqCst);
    let any = ANY.load(Ordering::SeqCst);
    if target <= 0 {
        return;
    }
    for t in target_signals() {
        let missed = match t.phase {
            Some(p) => t.n > COUNTS[p.index()].load(Ordering::SeqCst),
            None => t.n > any,
        };
        if missed {
            for &s in &t.sigs {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(target), s);
            }
        }
    }
}

/// Marks a moment where a thread is about to run remote code (a system call
/// or function call through the gadget): part of the load, or of the commit
/// once it has begun.
pub fn checkpoint_remote() {
    checkpoint(if COMMITTING.load(Ordering::SeqCst) {
        Phase::Commit
    } else if STOPPING.load(Ordering::SeqCst) {
        Phase::Stop
    } else {
        Phase::Load
    });
}

/// In debug builds with `UPSTARE_TEST_SIGNAL_AT` set: the line
/// `upstare-test: checkpoints stop=N load=N transfer=N commit=N`.
pub fn checkpoint_counts() -> Option<String> {
    injection().map(|_| {
        let parts: Vec<String> = Phase::ALL
            .iter()
            .map(|p| format!("{}={}", p.name(), COUNTS[p.index()].load(Ordering::SeqCst)))
            .collect();
        format!(
            "upstare-test: checkpoints {} any={}",
            parts.join(" "),
            ANY.load(Ordering::SeqCst)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injection_syntax() {
        assert_eq!(parse_injection("count"), Some(Injection::Count));
        assert_eq!(
            parse_injection("load:3:SIGKILL"),
            Some(Injection::At {
                phase: Phase::Load,
                n: 3,
                sig: Sig(libc::SIGKILL)
            })
        );
        assert_eq!(parse_injection("load:x:SIGKILL"), None);
        assert_eq!(parse_injection("nowhere:1:SIGINT"), None);
        assert_eq!(parse_injection("stop:1:NOTASIG"), None);
        assert_eq!(
            parse_target_signals("load:4:SIGSTOP+SIGCONT"),
            Some(TargetSignals {
                phase: Some(Phase::Load),
                n: 4,
                sigs: vec![
                    nix::sys::signal::Signal::SIGSTOP,
                    nix::sys::signal::Signal::SIGCONT
                ]
            })
        );
        assert_eq!(parse_target_signals("load:4:SIGSTOP+"), None);
    }
}
