//! The report's latency phases, timed on one clock so that they add up to
//! the total.

use serde::Serialize;
use std::time::{Duration, Instant};

/// Latency of each phase, in microseconds. The phases follow each other on
/// one clock (each ends where the next begins), so `plan_us` + ... +
/// `resume_us` = `total_us` exactly; `pause_us` is the part with the
/// process stopped (`stop_us` through `resume_us`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    /// Before the process is stopped (it runs on): reading NEW, seizing,
    /// finding the running image, making the plan, resolving NEW's
    /// imports. Not part of the pause.
    pub plan_us: u64,
    /// Stopping every thread at an update point or in a safe call.
    pub stop_us: u64,
    /// Checking that the paused globals and frames map onto NEW.
    pub check_us: u64,
    /// Mapping NEW into the process and planning the commit.
    pub load_us: u64,
    /// Heap objects, frame layouts and globals computed.
    pub transfer_us: u64,
    /// The new frames' bytes and registers computed.
    pub rebuild_us: u64,
    /// Loading, running and unloading the C transformers.
    pub transform_us: u64,
    /// The sweep for stale pointers, the retired mappings planned, every
    /// write checked.
    pub sweep_us: u64,
    /// In a process tree: stopped while the other processes were stopped,
    /// computed and committed (all commit or none, so each waits for the
    /// others). Zero for a single process.
    pub tree_wait_us: u64,
    /// Writing the new state and registers, freeing what moved, unmapping
    /// the retired image.
    pub commit_us: u64,
    /// Letting the threads run again (detach).
    pub resume_us: u64,
    /// From `stop_us` through `resume_us`: what the process waited.
    pub pause_us: u64,
    /// From the start of the update to the resume.
    pub total_us: u64,
    /// Where `stop_us` went (summed over the stops a `[safety]` retry
    /// repeats); not phases of their own.
    pub stop_detail: StopDetail,
}

/// The parts of the stop phase, in microseconds. Time between them (the
/// rescue handler's removal, checks of the stopped frames) is in
/// `stop_us` only.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StopDetail {
    /// Classifying the threads as interrupted (unwinding included).
    pub classify_us: u64,
    /// Installing the rescue handler.
    pub rescue_us: u64,
    /// Arming the update points.
    pub arm_us: u64,
    /// Letting the threads that were not ready run to a point.
    pub run_us: u64,
    /// Stopping what still ran, disarming, requeueing held signals.
    pub finish_us: u64,
    /// Removing the rescue handler.
    pub unrescue_us: u64,
    /// Update points armed with `int3` (the last stop's).
    pub points_armed: u64,
}

impl StopDetail {
    /// Adds one stop's timings.
    pub(crate) fn add(&mut self, t: &crate::stop::StopTimings, armed: usize) {
        self.classify_us += us(t.classify);
        self.rescue_us += us(t.rescue);
        self.arm_us += us(t.arm);
        self.run_us += us(t.run);
        self.finish_us += us(t.finish);
        self.points_armed = u64::try_from(armed).unwrap_or(u64::MAX);
    }
}

impl Timings {
    /// The phases in order, named as in the report: they add up to
    /// `total_us`.
    pub fn phases(&self) -> [(&'static str, u64); 11] {
        [
            ("plan", self.plan_us),
            ("stop", self.stop_us),
            ("check", self.check_us),
            ("load", self.load_us),
            ("transfer", self.transfer_us),
            ("rebuild", self.rebuild_us),
            ("transformers", self.transform_us),
            ("sweep", self.sweep_us),
            ("tree-wait", self.tree_wait_us),
            ("commit", self.commit_us),
            ("resume", self.resume_us),
        ]
    }

    /// The last phase timed: closes the total and the pause.
    pub(crate) fn finish(&mut self, clock: &mut PhaseClock) {
        self.finish_at(clock, None);
    }

    /// [`Timings::finish`] at `released` (when the last thread was let
    /// go), or now.
    pub(crate) fn finish_at(&mut self, clock: &mut PhaseClock, released: Option<Instant>) {
        self.resume_us = match released {
            Some(at) => clock.lap_at(at),
            None => clock.lap(),
        };
        self.total_us = clock.elapsed_us();
        self.pause_us = self.total_us.saturating_sub(self.plan_us);
    }
}

/// `d` in whole microseconds (saturating).
pub(crate) fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One clock for every phase: a lap ends where the next begins, measured
/// from one start, so nothing falls between two phases.
pub(crate) struct PhaseClock {
    start: Instant,
    marked_us: u64,
}

impl PhaseClock {
    pub(crate) fn start() -> Self {
        PhaseClock {
            start: Instant::now(),
            marked_us: 0,
        }
    }

    /// Microseconds since the previous lap (or the start).
    pub(crate) fn lap(&mut self) -> u64 {
        self.lap_at(Instant::now())
    }

    /// Microseconds from the previous lap (or the start) to `at` (0 if
    /// `at` is earlier).
    pub(crate) fn lap_at(&mut self, at: Instant) -> u64 {
        let now = us(at.saturating_duration_since(self.start)).max(self.marked_us);
        let d = now - self.marked_us;
        self.marked_us = now;
        d
    }

    /// Microseconds from the start to the last lap.
    pub(crate) fn elapsed_us(&self) -> u64 {
        self.marked_us
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_add_up_to_the_total() {
        let mut clock = PhaseClock::start();
        let mut t = Timings::default();
        let mut work = 0u64;
        t.plan_us = clock.lap();
        for i in 0..20_000u64 {
            work = work.wrapping_add(i * i);
        }
        t.stop_us = clock.lap();
        std::thread::sleep(Duration::from_millis(2));
        t.load_us = clock.lap();
        t.finish(&mut clock);
        assert!(work > 0);
        let sum: u64 = t.phases().iter().map(|(_, v)| v).sum();
        assert_eq!(sum, t.total_us);
        assert_eq!(t.pause_us, t.total_us - t.plan_us);
        assert!(t.load_us >= 2000, "the sleep is inside load: {}", t.load_us);
    }
}
