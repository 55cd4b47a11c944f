//! Debouncing file events: when a burst of events is quiet enough to act on, and when a
//! file written in place may be read at all.
//!
//! A rotation touches several files in quick succession; acting on the first event would
//! read a half-rotated set. And a file rewritten in place is half-written until its writer
//! is done: a writer that pauses between two chunks, or that is slow, must not have its
//! first chunk applied. So the rule (ARCHITECTURE.md, "When a file's value is taken"):
//! a burst with in-place writes is due only when no secret file is still open for writing
//! (a modification seen, its close-after-write not yet) and the quiet period has passed
//! since the last event. The maximum wait ends the quiet period of a burst that never
//! stops, but never overrides an open writer. This pure state machine lives apart from the
//! I/O so each rule can be unit-tested with made-up instants: the loop in `mod.rs` feeds it
//! events and clock readings, and prunes writers whose file was replaced.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::watches::FileId;

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
    /// The last in-place modification or close (`None`: no in-place write in this burst):
    /// the quiet period after it is never cut short by the maximum wait.
    pub last_write: Option<Instant>,
}

impl Burst {
    /// Some secret file was modified in place during the burst: its value is only taken
    /// once no writer holds it and it stood still for the quiet period.
    pub fn in_place(&self) -> bool {
        self.last_write.is_some()
    }
}

/// What the pending burst calls for at a given instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// Nothing pending, or its quiet period is not over.
    NotYet,
    /// The burst is due (and has been taken).
    Burst(Burst),
    /// The maximum wait passed, but these secret files are still open for writing: keep
    /// waiting for their writers to close them (reported once per burst).
    HeldOpen(Vec<PathBuf>),
}

/// Collects file events into bursts and says when a burst is due: after `quiet` without a
/// new event, but never later than `max_delay` after its first event (so a directory that
/// never stops changing still gets synced), unless a secret file is still open for writing.
#[derive(Debug, Clone)]
pub struct Debouncer {
    quiet: Duration,
    max_delay: Duration,
    burst: Option<Burst>,
    /// Secret files modified in place whose writer has not closed them yet, with the file
    /// they were when modified (a file replaced since then no longer has that writer).
    writers: HashMap<PathBuf, Option<FileId>>,
    /// The open writers of this burst were already reported at the maximum wait.
    reported: bool,
}

impl Debouncer {
    /// `max_delay` is ten quiet periods (at least one second): long enough that a normal
    /// rotation (a Kubernetes swap, a generator renaming eleven files) ends inside it.
    pub fn new(quiet: Duration) -> Debouncer {
        Debouncer {
            quiet,
            max_delay: (quiet * 10).max(Duration::from_secs(1)),
            burst: None,
            writers: HashMap::new(),
            reported: false,
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
                    last_write: None,
                });
                self.reported = false;
            }
        }
    }

    /// A secret file was modified in place (`IN_MODIFY`): its writer holds it open until
    /// the matching close-after-write. `id` is the file it was at that moment.
    pub fn modified(&mut self, now: Instant, path: PathBuf, id: Option<FileId>) {
        self.in_place_event(now);
        self.writers.insert(path, id);
    }

    /// A writer closed a secret file (`IN_CLOSE_WRITE`); the quiet period starts again.
    pub fn closed(&mut self, now: Instant, path: &Path) {
        self.in_place_event(now);
        self.writers.remove(path);
    }

    /// A secret file changed in place without a modification event we saw (the loop's
    /// stability check): its quiet period starts again.
    pub fn written(&mut self, now: Instant) {
        self.in_place_event(now);
    }

    fn in_place_event(&mut self, now: Instant) {
        self.event(now, false);
        if let Some(burst) = &mut self.burst {
            burst.last_write = Some(burst.last_write.map_or(now, |t| t.max(now)));
        }
    }

    /// Keeps only the writers for which `still_open` holds (the loop drops those whose
    /// file was replaced by a rename or deleted: that writer no longer writes the secret).
    pub fn retain_writers(&mut self, mut still_open: impl FnMut(&Path, Option<FileId>) -> bool) {
        self.writers.retain(|path, id| still_open(path, *id));
    }

    /// The secret files still open for writing, sorted (for messages).
    pub fn open_writers(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = self.writers.keys().cloned().collect();
        paths.sort();
        paths
    }

    /// Whether events are pending: the files may be mid-change, so a resync must not read
    /// them now.
    pub fn pending(&self) -> bool {
        self.burst.is_some() || !self.writers.is_empty()
    }

    /// Whether the pending burst holds in-place writes (not taken on arrival of a rename).
    pub fn in_place(&self) -> bool {
        self.burst.is_some_and(|b| b.in_place()) || !self.writers.is_empty()
    }

    /// When the loop must look at the pending burst again (`None`: nothing to do until the
    /// next event).
    pub fn deadline(&self) -> Option<Instant> {
        let burst = self.burst?;
        let quiet_end = burst.last + self.quiet;
        let max_end = burst.first + self.max_delay;
        if self.writers.is_empty() {
            // Other events cannot postpone the burst past the maximum wait, but a file
            // written in place always gets its quiet period after the last write.
            let earliest = burst
                .last_write
                .map_or(max_end, |w| max_end.max(w + self.quiet));
            Some(quiet_end.min(earliest))
        } else if !self.reported {
            // Only to report the open writer once; the burst waits for its close.
            Some(max_end)
        } else {
            None
        }
    }

    /// Takes the pending burst if it is due at `now`.
    pub fn take_due(&mut self, now: Instant) -> Due {
        match self.deadline() {
            Some(deadline) if deadline <= now => {
                if self.writers.is_empty() {
                    self.burst.take().map_or(Due::NotYet, Due::Burst)
                } else {
                    self.reported = true;
                    Due::HeldOpen(self.open_writers())
                }
            }
            _ => Due::NotYet,
        }
    }

    /// Takes the pending burst now, due or not, when nothing is open for writing (a read of
    /// every file is about to happen anyway, so the burst is covered by it).
    pub fn take_settled(&mut self) -> Option<Burst> {
        if self.writers.is_empty() {
            self.burst.take()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn burst(due: Due) -> Burst {
        match due {
            Due::Burst(b) => b,
            other => panic!("not due: {other:?}"),
        }
    }

    #[test]
    fn a_burst_is_due_after_the_quiet_period_of_its_last_event() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(ms(250));
        assert_eq!(d.deadline(), None);
        d.event(t0, false);
        d.event(t0 + ms(100), false);
        assert_eq!(d.deadline(), Some(t0 + ms(350)));
        assert_eq!(d.take_due(t0 + ms(349)), Due::NotYet);
        let b = burst(d.take_due(t0 + ms(350)));
        assert_eq!(b.first, t0);
        assert_eq!(b.last, t0 + ms(100));
        assert!(!b.overflowed && !b.in_place());
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
        assert!(matches!(d.take_due(t0 + ms(2_500)), Due::Burst(_)));
    }

    #[test]
    fn zero_debounce_acts_immediately_and_overflow_is_sticky() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(Duration::ZERO);
        d.event(t0, true);
        d.event(t0, false);
        assert!(
            burst(d.take_due(t0)).overflowed,
            "one overflow marks the whole burst"
        );
        d.event(t0, false);
        assert!(d.take_settled().is_some());
        assert!(d.take_settled().is_none());
    }

    #[test]
    fn an_open_writer_holds_the_burst_past_the_max_delay_until_it_closes() {
        let t0 = Instant::now();
        let path = PathBuf::from("/k/pw.txt");
        let mut d = Debouncer::new(ms(250));
        d.modified(t0, path.clone(), None);
        assert!(d.pending() && d.in_place());
        // One chunk, then a long pause: the quiet period passes, the writer is still open.
        assert_eq!(d.take_due(t0 + ms(1_000)), Due::NotYet);
        assert!(
            d.take_settled().is_none(),
            "a resync must not take it either"
        );
        // At the maximum wait it is reported once, not taken.
        assert_eq!(
            d.take_due(t0 + ms(2_500)),
            Due::HeldOpen(vec![path.clone()])
        );
        assert_eq!(d.deadline(), None, "nothing to do until the next event");
        d.modified(t0 + ms(4_000), path.clone(), None);
        assert_eq!(d.take_due(t0 + ms(5_000)), Due::NotYet);
        // Closed: due after a quiet period from the close, not at once.
        d.closed(t0 + ms(6_000), &path);
        assert_eq!(d.deadline(), Some(t0 + ms(6_250)));
        assert_eq!(d.take_due(t0 + ms(6_249)), Due::NotYet);
        let b = burst(d.take_due(t0 + ms(6_250)));
        assert!(b.in_place());
        assert!(!d.pending());
    }

    #[test]
    fn renames_cannot_postpone_past_the_max_delay_but_a_write_keeps_its_quiet_period() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(ms(250));
        d.event(t0, false);
        d.closed(t0 + ms(2_400), Path::new("/k/pw"));
        for i in 0..10 {
            d.event(t0 + ms(2_400 + i * 100), false);
        }
        assert_eq!(d.deadline(), Some(t0 + ms(2_650)));
    }

    #[test]
    fn a_writer_whose_file_was_replaced_no_longer_holds_the_burst() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(ms(50));
        d.modified(t0, PathBuf::from("/k/a"), None);
        d.modified(t0, PathBuf::from("/k/b"), None);
        assert_eq!(
            d.open_writers(),
            [PathBuf::from("/k/a"), PathBuf::from("/k/b")]
        );
        d.retain_writers(|p, _| p != Path::new("/k/a"));
        assert_eq!(d.open_writers(), [PathBuf::from("/k/b")]);
        d.closed(t0 + ms(10), Path::new("/k/b"));
        assert!(matches!(d.take_due(t0 + ms(60)), Due::Burst(_)));
    }
}
