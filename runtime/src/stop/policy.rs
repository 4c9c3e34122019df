//! Which library calls a thread may be caught blocked in, and how the
//! kernel's answers are read: the policy the classifier applies.
//!
//! A new blocking call is one line in [`KNOWN_CALLS`]: the names it is
//! imported under, the system calls glibc makes for it, and whether the
//! call is re-executed or left in place by the update.

use crate::target::ptrace::{Regs, Sig};
use nix::libc;

/// Return values of an interrupted system call that had no effect yet:
/// -EINTR, -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND,
/// -ERESTART_RESTARTBLOCK.
pub(super) const NO_EFFECT: [i64; 5] = [-4, -512, -513, -514, -516];
/// -EINTR.
pub(super) const EINTR: i64 = -4;
/// -ERESTARTNOHAND: what the kernel sets for a signal without handler.
pub(super) use crate::target::ptrace::ERESTARTNOHAND;

/// What the update does with a thread blocked in a known call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OnUpdate {
    /// The thread is abandoned in the call and its statement runs again
    /// in the new version (see `Readiness::Blocked`).
    Reexecute,
    /// The call is left in place and returns into the new version later
    /// (see `Readiness::InLibrary`): not safe to re-execute, but what it
    /// waits for lies outside the image.
    InPlace,
    /// The thread is led out of the wait through the library's own path
    /// (its system call ends with -ETIMEDOUT) and parked at the call's
    /// return (see `Readiness::Returned`): what it waits on lies in the
    /// image (a condition variable), where a thread left sleeping would
    /// never be woken by the new version's code.
    LeaveWait,
}

/// One library call a blocked thread may be caught in.
pub(super) struct KnownCall {
    /// The names the application imports it under.
    pub names: &'static [&'static str],
    /// The system calls it blocks in.
    pub syscalls: &'static [i64],
    pub on_update: OnUpdate,
}

const fn reexecute(names: &'static [&'static str], syscalls: &'static [i64]) -> KnownCall {
    KnownCall {
        names,
        syscalls,
        on_update: OnUpdate::Reexecute,
    }
}

const fn leave_wait(names: &'static [&'static str], syscalls: &'static [i64]) -> KnownCall {
    KnownCall {
        names,
        syscalls,
        on_update: OnUpdate::LeaveWait,
    }
}

const fn in_place(names: &'static [&'static str], syscalls: &'static [i64]) -> KnownCall {
    KnownCall {
        names,
        syscalls,
        on_update: OnUpdate::InPlace,
    }
}

use libc::{
    SYS_accept, SYS_accept4, SYS_clock_nanosleep, SYS_epoll_pwait, SYS_epoll_pwait2,
    SYS_epoll_wait, SYS_futex, SYS_nanosleep, SYS_pause, SYS_poll, SYS_ppoll, SYS_pselect6,
    SYS_read, SYS_readv, SYS_recvfrom, SYS_recvmsg, SYS_rt_sigsuspend, SYS_rt_sigtimedwait,
    SYS_select, SYS_wait4, SYS_waitid,
};

/// Every library call a blocked thread may be caught in, with the system
/// calls glibc makes for it (checked on x86-64 glibc 2.36: `nanosleep`,
/// `sleep` and `usleep` use clock_nanosleep, `recv` recvfrom, `select`
/// pselect6, `waitpid` wait4, `pthread_mutex_lock` futex).
/// `pthread_join` waits on the joined thread's descriptor; re-executing it
/// would find the join already claimed by this thread, so it stays.
pub(super) const KNOWN_CALLS: &[KnownCall] = &[
    reexecute(&["read"], &[SYS_read]),
    reexecute(&["readv"], &[SYS_readv]),
    reexecute(&["recv", "recvfrom"], &[SYS_recvfrom]),
    reexecute(&["recvmsg"], &[SYS_recvmsg]),
    reexecute(&["accept", "accept4"], &[SYS_accept, SYS_accept4]),
    reexecute(&["poll"], &[SYS_poll, SYS_ppoll]),
    reexecute(&["ppoll"], &[SYS_ppoll]),
    reexecute(&["select"], &[SYS_select, SYS_pselect6]),
    reexecute(&["pselect"], &[SYS_pselect6]),
    reexecute(&["epoll_wait"], &[SYS_epoll_wait, SYS_epoll_pwait]),
    reexecute(&["epoll_pwait"], &[SYS_epoll_pwait, SYS_epoll_pwait2]),
    reexecute(
        &["nanosleep", "clock_nanosleep", "usleep", "sleep"],
        &[SYS_nanosleep, SYS_clock_nanosleep],
    ),
    reexecute(&["pthread_mutex_lock"], &[SYS_futex]),
    reexecute(&["waitpid", "wait"], &[SYS_wait4, SYS_waitid]),
    reexecute(&["pause"], &[SYS_pause, SYS_rt_sigsuspend]),
    reexecute(&["sigsuspend"], &[SYS_rt_sigsuspend]),
    // The count is taken only after the wake-up: abandoned before, nothing
    // happened.
    reexecute(&["sem_wait"], &[SYS_futex]),
    reexecute(
        &["sigwaitinfo", "sigtimedwait", "sigwait"],
        &[SYS_rt_sigtimedwait],
    ),
    in_place(&["pthread_join"], &[SYS_futex]),
    // libevent's loop waiting for events: left in place (its frames and
    // state are the library's); the callbacks it holds are function
    // entries of the old image, which the sweep points at NEW's.
    in_place(
        &["event_base_loop", "event_base_dispatch"],
        &[
            SYS_epoll_wait,
            SYS_epoll_pwait,
            SYS_poll,
            SYS_ppoll,
            SYS_select,
            SYS_pselect6,
        ],
    ),
    // glibc 2.36 (nptl/pthread_cond_wait.c): a futex wait on the group's
    // signal word that ends with ETIMEDOUT cancels the waiting (the group
    // counts are given back, a signal it may have consumed is passed on),
    // re-acquires the mutex and returns; its other futex waits (the
    // condvar's internal lock, the mutex) ignore the result and wait again.
    leave_wait(
        &[
            "pthread_cond_wait",
            "pthread_cond_timedwait",
            "pthread_cond_clockwait",
        ],
        &[SYS_futex],
    ),
];

/// Whether a thread stopped in a futex system call under
/// `pthread_cond_wait` waits on the condition itself: glibc 2.36 waits
/// there with FUTEX_WAIT_BITSET for the value 0 (the group's signal word),
/// and only that wait may end with ETIMEDOUT (the mutex and the internal
/// lock use FUTEX_WAIT, and glibc aborts on an ETIMEDOUT there). The
/// system call's arguments stay in their registers while it is stopped.
pub(super) fn is_condvar_wait(regs: &Regs) -> bool {
    const FUTEX_WAIT_BITSET: u64 = 9;
    const FUTEX_CMD_MASK: u64 = !(128 | 256); // PRIVATE, CLOCK_REALTIME
    regs.0.rsi & FUTEX_CMD_MASK == FUTEX_WAIT_BITSET && regs.0.rdx as u32 == 0
}

/// The futex a thread under `pthread_cond_wait` waits on when it waits to
/// re-acquire its mutex (glibc 2.36 `__lll_lock_wait`: FUTEX_WAIT for the
/// value 2 on the mutex's lock word, its first member), if that is the
/// wait: the caller still checks that a mutex lies there (the condition
/// variable's internal lock is waited on the same way).
pub(super) fn relock_futex(regs: &Regs) -> Option<u64> {
    const FUTEX_WAIT: u64 = 0;
    const FUTEX_CMD_MASK: u64 = !(128 | 256);
    (regs.0.rsi & FUTEX_CMD_MASK == FUTEX_WAIT && regs.0.rdx as u32 == 2).then_some(regs.0.rdi)
}

/// Offsets in glibc's x86-64 `pthread_mutex_t`.
pub(super) const MUTEX_OWNER: i64 = 8;
pub(super) const MUTEX_NUSERS: i64 = 12;
pub(super) const MUTEX_KIND: i64 = 16;
/// Kind bits of robust, priority-inheriting and priority-protected
/// mutexes, whose locking involves more than the lock word.
pub(super) const MUTEX_SPECIAL_KINDS: u32 = 16 | 32 | 64;

/// -ETIMEDOUT: what a led-out wait's system call returns.
pub(super) const ETIMEDOUT: i64 = -110;

/// The entry of [`KNOWN_CALLS`] for library function `callee`, if any.
pub(super) fn known_call(callee: &str) -> Option<&'static KnownCall> {
    KNOWN_CALLS.iter().find(|c| c.names.contains(&callee))
}

/// System calls that the kernel ends with -EINTR (not a restart code) when
/// the thread is merely stopped by ptrace: resuming as is would show the
/// program an EINTR it never had.
pub(super) fn eintr_on_stop(nr: i64) -> bool {
    crate::target::ptrace::EINTR_ON_INTERRUPT.contains(&nr)
}

/// For system calls [`eintr_on_stop`] that take a relative timeout in
/// milliseconds in a register (epoll_wait, epoll_pwait: r10), that
/// timeout; `None` for other calls and for an infinite wait (negative).
pub(super) fn timeout_ms(nr: i64, regs: &Regs) -> Option<i32> {
    let ms = regs.0.r10 as i32;
    ([SYS_epoll_wait, SYS_epoll_pwait].contains(&nr) && ms > 0).then_some(ms)
}

/// For system calls [`eintr_on_stop`] that take a relative timeout as a
/// `struct timespec *` they read at every start (rt_sigtimedwait: rdx,
/// epoll_pwait2: r10), the register holding it.
pub(super) fn timespec_arg(nr: i64) -> Option<upstare_dwarf::Reg> {
    match nr {
        libc::SYS_rt_sigtimedwait => Some(upstare_dwarf::Reg::Rdx),
        libc::SYS_epoll_pwait2 => Some(upstare_dwarf::Reg::R10),
        _ => None,
    }
}

/// Names of the x86-64 system calls messages mention.
const SYSCALL_NAMES: &[(i64, &str)] = &[
    (SYS_read, "read"),
    (libc::SYS_write, "write"),
    (SYS_readv, "readv"),
    (libc::SYS_writev, "writev"),
    (SYS_poll, "poll"),
    (SYS_ppoll, "ppoll"),
    (SYS_select, "select"),
    (SYS_pselect6, "pselect6"),
    (SYS_nanosleep, "nanosleep"),
    (SYS_clock_nanosleep, "clock_nanosleep"),
    (SYS_futex, "futex"),
    (SYS_accept, "accept"),
    (SYS_accept4, "accept4"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_sendto, "sendto"),
    (SYS_recvfrom, "recvfrom"),
    (libc::SYS_sendmsg, "sendmsg"),
    (SYS_recvmsg, "recvmsg"),
    (SYS_wait4, "wait4"),
    (SYS_waitid, "waitid"),
    (SYS_pause, "pause"),
    (SYS_rt_sigsuspend, "rt_sigsuspend"),
    (libc::SYS_rt_sigtimedwait, "rt_sigtimedwait"),
    (SYS_epoll_wait, "epoll_wait"),
    (SYS_epoll_pwait, "epoll_pwait"),
    (SYS_epoll_pwait2, "epoll_pwait2"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_flock, "flock"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_semop, "semop"),
    (libc::SYS_msgrcv, "msgrcv"),
    (libc::SYS_restart_syscall, "restart_syscall"),
];

/// Name of an x86-64 system call, for messages (`#NR` when unknown).
pub fn syscall_name(nr: i64) -> String {
    SYSCALL_NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, s)| s.to_string())
        .unwrap_or_else(|| format!("#{nr}"))
}

/// Whether a signal stop is the thread's own fault (re-executing the
/// instruction would raise it again), to be delivered rather than held.
pub(super) fn is_fault(sig: Sig, code: i32) -> bool {
    [
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
        libc::SIGTRAP,
    ]
    .contains(&sig.0)
        && code > 0
}

/// Signals whose default action stops the process.
pub(super) fn is_job_control(sig: Sig) -> bool {
    [libc::SIGSTOP, libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU].contains(&sig.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_is_listed_once_with_its_system_calls() {
        let mut seen = std::collections::BTreeSet::new();
        for call in KNOWN_CALLS {
            assert!(!call.syscalls.is_empty());
            for name in call.names {
                assert!(seen.insert(*name), "{name} listed twice");
            }
        }
        let join = known_call("pthread_join").map(|c| c.on_update);
        assert_eq!(join, Some(OnUpdate::InPlace));
        let read = known_call("read").map(|c| c.on_update);
        assert_eq!(read, Some(OnUpdate::Reexecute));
        assert!(known_call("write").is_none());
        let cond = known_call("pthread_cond_wait").map(|c| c.on_update);
        assert_eq!(cond, Some(OnUpdate::LeaveWait));
        assert_eq!(syscall_name(SYS_futex), "futex");
        assert_eq!(syscall_name(-7), "#-7");
    }
}
