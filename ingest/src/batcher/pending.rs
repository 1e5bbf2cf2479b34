//! The events waiting for a batch, and the order batches take them in: by the tenth of a second
//! they arrived in ([`ARRIVAL_WINDOW`]), then by run id, then in arrival order.
//!
//! Why by run id: at full load every agent has a backlog, and the agents are never equally far
//! through theirs, so the events that arrive together belong to runs minted over the whole span
//! of the backlog. Written in arrival order, each batch of 1,000 rows lands on ~1,000 different
//! leaf pages in the middle of every index of `execution_results`; taken lowest id first, a
//! batch covers a narrow stretch of each index, which PostgreSQL writes with a fifth less CPU
//! (BENCHMARKS.md).
//!
//! Why by arrival window first: ids are minted by the agents' clocks. An agent whose clock is
//! behind mints ids lower than everyone else's, and ordering by id alone would let its events go
//! first for ever. Events of an earlier window always go before those of a later one, so no
//! event waits behind events that arrived more than a window after it. At full load the events
//! of one window are plenty to sort (a tenth of a second is ~5,000 events); a longer window
//! measured no better and makes the wait it allows longer (BENCHMARKS.md).
//!
//! A run's events keep their arrival order: they share a run id, so they sort by window and then
//! by arrival. A batch leaves out every event of a run that a batch in flight is writing; those
//! stay here, in order, for a later batch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::Submission;

/// Events that arrived within one such window are taken lowest run id first; an earlier
/// window's before a later one's.
pub const ARRIVAL_WINDOW: Duration = Duration::from_millis(100);

/// Where an event stands in the order batches take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Place {
    /// The [`ARRIVAL_WINDOW`] in which ingest read the event, counted from the batcher's start.
    window: u64,
    run: Uuid,
    /// Counts every event taken in: a run's events keep their arrival order.
    arrival: u64,
}

/// The waiting events, by [`Place`]. Submissions are boxed: one is 408 bytes, and the tree
/// would move it each time it reorganises a node.
pub(super) struct Pending {
    order: BTreeMap<Place, Box<Submission>>,
    /// Events waiting per run: how many rows what waits would write.
    runs: HashMap<Uuid, usize>,
    bytes: usize,
    arrivals: u64,
    since: Instant,
}

impl Pending {
    pub fn new() -> Pending {
        Pending {
            order: BTreeMap::new(),
            runs: HashMap::new(),
            bytes: 0,
            arrivals: 0,
            since: Instant::now(),
        }
    }

    pub fn push(&mut self, submission: Box<Submission>) {
        let place = Place {
            window: (submission
                .read_at
                .saturating_duration_since(self.since)
                .as_nanos()
                / ARRIVAL_WINDOW.as_nanos()) as u64,
            run: submission.write.result_id,
            arrival: self.arrivals,
        };
        self.arrivals += 1;
        self.bytes += submission.bytes;
        *self.runs.entry(place.run).or_default() += 1;
        self.order.insert(place, submission);
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Bytes of the events waiting.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether what waits reaches one of the limits [`Pending::take`] stops at: `max_rows` rows
    /// (runs), `max_events` events or `max_bytes` bytes. Runs a batch in flight is writing count
    /// too: they are taken soon after.
    pub fn fills_a_batch(&self, max_rows: usize, max_events: usize, max_bytes: usize) -> bool {
        self.runs.len() >= max_rows || self.order.len() >= max_events || self.bytes >= max_bytes
    }

    /// The next batch: events in order until they write `max_rows` rows (a run's events in one
    /// batch merge into one row) or number `max_events`, or until they reach `max_bytes`,
    /// leaving out every event of a run `busy` says a batch in flight is writing.
    pub fn take(
        &mut self,
        max_rows: usize,
        max_events: usize,
        max_bytes: usize,
        busy: impl Fn(&Uuid) -> bool,
    ) -> Vec<Box<Submission>> {
        let mut chosen = Vec::new();
        let mut runs = HashSet::with_capacity(max_rows.min(self.runs.len()));
        let mut left_out = Vec::new();
        let mut bytes = 0;
        while chosen.len() < max_events && bytes < max_bytes {
            let Some(first) = self.order.first_entry() else {
                break;
            };
            let run = first.key().run;
            if busy(&run) {
                left_out.push(first.remove_entry());
                continue;
            }
            // Past the last row, only events of runs already in the batch could join; they
            // wait with the rest, so that a run's events keep their order.
            if runs.len() >= max_rows && !runs.contains(&run) {
                break;
            }
            runs.insert(run);
            let submission = first.remove();
            bytes += submission.bytes;
            if let Some(left) = self.runs.get_mut(&run) {
                *left -= 1;
                if *left == 0 {
                    self.runs.remove(&run);
                }
            }
            chosen.push(submission);
        }
        self.order.extend(left_out);
        self.bytes -= bytes;
        chosen
    }
}
