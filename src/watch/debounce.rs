//! Debouncing file events: when a burst of events is quiet enough to act on.
//!
//! A rotation touches several files in quick succession; acting on the first event would
//! read a half-rotated set. This pure state machine lives apart from the I/O so each rule
//! can be unit-tested with made-up instants: the loop in `mod.rs` only feeds it events and
//! clock readings.

use std::time::{Duration, Instant};

/// A burst of file events that has not been acted on yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Burst {
    /// The first event of the burst (the start of the rotation latency we report).
    pub first: Instant,
    /// The latest event; the quiet period counts from here.
    pub last: Instant,
    /// Some event was a watcher overflow or error: events may have been lost, so the burst
    /// calls for checking every role even when the content looks unchanged.
    pub overflowed: bool,
}

/// Collects file events into bursts and says when a burst is due: after `quiet` without a new
/// event, but never later than `max_delay` after its first event, so a directory that never
/// stops changing still gets synced.
#[derive(Debug, Clone)]
pub struct Debouncer {
    quiet: Duration,
    max_delay: Duration,
    burst: Option<Burst>,
}

impl Debouncer {
    /// `max_delay` is ten quiet periods (at least one second): long enough that a normal
    /// rotation (a Kubernetes swap, a generator renaming eleven files) ends inside it.
    pub fn new(quiet: Duration) -> Debouncer {
        Debouncer {
            quiet,
            max_delay: (quiet * 10).max(Duration::from_secs(1)),
            burst: None,
        }
    }

    /// Records one event seen at `now`.
    pub fn event(&mut self, now: Instant, overflowed: bool) {
        match &mut self.burst {
            Some(burst) => {
                burst.last = burst.last.max(now);
                burst.overflowed |= overflowed;
            }
            None => {
                self.burst = Some(Burst {
                    first: now,
                    last: now,
                    overflowed,
                });
            }
        }
    }

    /// When the pending burst becomes due (`None`: nothing pending).
    pub fn deadline(&self) -> Option<Instant> {
        self.burst
            .map(|b| (b.last + self.quiet).min(b.first + self.max_delay))
    }

    /// Takes the pending burst if it is due at `now`.
    pub fn take_due(&mut self, now: Instant) -> Option<Burst> {
        match self.deadline() {
            Some(deadline) if deadline <= now => self.burst.take(),
            _ => None,
        }
    }

    /// Takes the pending burst now, due or not (a resync is about to read everything
    /// anyway, so the burst is covered by it).
    pub fn take(&mut self) -> Option<Burst> {
        self.burst.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_is_due_after_the_quiet_period_of_its_last_event() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(ms(250));
        assert_eq!(d.deadline(), None);
        d.event(t0, false);
        d.event(t0 + ms(100), false);
        assert_eq!(d.deadline(), Some(t0 + ms(350)));
        assert_eq!(d.take_due(t0 + ms(349)), None);
        let burst = d.take_due(t0 + ms(350)).unwrap();
        assert_eq!(burst.first, t0);
        assert_eq!(burst.last, t0 + ms(100));
        assert!(!burst.overflowed);
        assert_eq!(d.deadline(), None, "taken bursts are gone");
    }

    #[test]
    fn a_never_ending_burst_is_still_due_after_the_max_delay() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(ms(250));
        for i in 0..100 {
            d.event(t0 + ms(i * 50), false);
        }
        // Ten quiet periods after the first event, although events keep coming.
        assert_eq!(d.deadline(), Some(t0 + ms(2_500)));
        assert!(d.take_due(t0 + ms(2_500)).is_some());
    }

    #[test]
    fn zero_debounce_acts_immediately_and_overflow_is_sticky() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(Duration::ZERO);
        d.event(t0, true);
        d.event(t0, false);
        let burst = d.take_due(t0).unwrap();
        assert!(burst.overflowed, "one overflow marks the whole burst");
        d.event(t0, false);
        assert!(d.take().is_some());
        assert!(d.take().is_none());
    }
}
