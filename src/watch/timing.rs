//! The watch loop's small pure decisions: when a burst of file events is quiet enough to act
//! on, how long to wait before retrying a failed apply, and whether a freshly read secret set
//! differs from the one last applied.
//!
//! They live apart from the I/O so each rule can be unit-tested with made-up instants: the
//! loop in `mod.rs` only feeds them events and clock readings.

use std::time::{Duration, Instant};

use crate::config::RoleSpec;
use crate::secret::Secret;
use crate::sync::changed_since;

/// A burst of file events that has not been acted on yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Burst {
    /// The first event of the burst (the start of the rotation latency we report).
    pub first: Instant,
    /// The latest event; the quiet period counts from here.
    pub last: Instant,
    /// Some event asked for a full resync (watcher overflow or error): apply even when the
    /// content looks unchanged, because events may have been lost.
    pub full: bool,
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
    pub fn event(&mut self, now: Instant, full: bool) {
        match &mut self.burst {
            Some(burst) => {
                burst.last = burst.last.max(now);
                burst.full |= full;
            }
            None => {
                self.burst = Some(Burst {
                    first: now,
                    last: now,
                    full,
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

    /// Takes the pending burst now, due or not (a full resync is about to read everything
    /// anyway, so the burst is covered by it).
    pub fn take(&mut self) -> Option<Burst> {
        self.burst.take()
    }
}

/// Exponential backoff for retrying a failed apply (server down, authentication refused).
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt; each call doubles the following one, up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// After a success the next failure starts again from the minimum.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// The names of the roles whose secret differs between the last applied set and a new one
/// (`sync::changed_since`, the same comparison `Syncer::apply_changed` applies by). Used
/// both to decide whether to apply and to say in the debug log what moved.
pub fn changed_roles<'a>(
    last: Option<&[(RoleSpec, Secret)]>,
    new: &'a [(RoleSpec, Secret)],
) -> Vec<&'a str> {
    changed_since(last, new)
        .map(|(spec, _)| spec.name.as_str())
        .collect()
}

/// Whether a new set must be applied: it differs from the last applied one (in a value, in
/// a role, or in the set of roles).
pub fn set_changed(last: Option<&[(RoleSpec, Secret)]>, new: &[(RoleSpec, Secret)]) -> bool {
    match last {
        None => true,
        Some(last) => last.len() != new.len() || !changed_roles(Some(last), new).is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretRef;

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
        assert!(!burst.full);
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
    fn zero_debounce_acts_immediately_and_full_is_sticky() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(Duration::ZERO);
        d.event(t0, true);
        d.event(t0, false);
        let burst = d.take_due(t0).unwrap();
        assert!(burst.full, "one overflow in a burst makes it a full resync");
        d.event(t0, false);
        assert!(d.take().is_some());
        assert!(d.take().is_none());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(ms(100), ms(500));
        let delays: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(delays, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        b.reset();
        assert_eq!(b.next_delay(), ms(100));
    }

    fn set(values: &[(&str, &str)]) -> Vec<(RoleSpec, Secret)> {
        values
            .iter()
            .map(|(role, value)| {
                (
                    RoleSpec {
                        name: (*role).to_owned(),
                        secret: SecretRef::Name(format!("{role}_pw")),
                    },
                    Secret::new((*value).to_owned()),
                )
            })
            .collect()
    }

    #[test]
    fn set_changes_are_detected_per_role() {
        let old = set(&[("postgres", "a"), ("appuser", "b")]);
        assert!(set_changed(None, &old), "nothing applied yet");
        assert!(!set_changed(
            Some(&old),
            &set(&[("postgres", "a"), ("appuser", "b")])
        ));
        let new = set(&[("postgres", "a"), ("appuser", "c")]);
        assert!(set_changed(Some(&old), &new));
        assert_eq!(changed_roles(Some(&old), &new), ["appuser"]);
        // A role dropped from the set is a change too (nothing else differs).
        assert!(set_changed(Some(&old), &set(&[("postgres", "a")])));
        // So is a role whose secret moved to another file with the same value.
        let mut moved = old.clone();
        moved[1].0.secret = SecretRef::Path("/elsewhere".into());
        assert_eq!(changed_roles(Some(&old), &moved), ["appuser"]);
        assert_eq!(changed_roles(None, &old), ["postgres", "appuser"]);
    }
}
