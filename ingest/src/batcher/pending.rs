//! The events waiting for a batch, and the order batches take them in: by the second they
//! arrived in, then by run id, then in arrival order.
//!
//! Why by run id: at full load every agent has a backlog, and the agents are never equally far
//! through theirs, so the events that arrive together belong to runs minted over the whole span
//! of the backlog. Written in arrival order, each batch of 1,000 rows lands on ~1,000 different
//! leaf pages in the middle of every index of `execution_results`; taken lowest id first from
//! everything waiting, a batch is one stretch of each index, which PostgreSQL writes with a
//! quarter less CPU (BENCHMARKS.md).
//!
//! Why by second first: ids are minted by the agents' clocks. An agent whose clock is behind
//! mints ids lower than everyone else's, and ordering by id alone would let its events go first
//! for ever. Events of an earlier second always go before those of a later one, so no event
//! waits behind events that arrived more than a second after it.
//!
//! A run's events keep their arrival order: they share a run id, so they sort by second and then
//! by arrival. A batch leaves out every event of a run that a batch in flight is writing; those
//! stay here, in order, for a later batch.

use std::collections::BTreeMap;
use std::time::Instant;

use slab::Slab;
use uuid::Uuid;

use super::Submission;

/// Where an event stands in the order batches take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Place {
    /// Whole seconds from the batcher's start to when ingest read the event.
    second: u64,
    run: Uuid,
    /// Counts every event taken in: a run's events keep their arrival order.
    arrival: u64,
}

/// The waiting events, by [`Place`]. The order holds keys into `events`: a submission is 408
/// bytes, and the tree would move it each time it reorganises a node.
pub(super) struct Pending {
    order: BTreeMap<Place, usize>,
    events: Slab<Submission>,
    bytes: usize,
    arrivals: u64,
    since: Instant,
}

impl Pending {
    pub fn new() -> Pending {
        Pending {
            order: BTreeMap::new(),
            events: Slab::new(),
            bytes: 0,
            arrivals: 0,
            since: Instant::now(),
        }
    }

    pub fn push(&mut self, submission: Submission) {
        let place = Place {
            second: submission
                .read_at
                .saturating_duration_since(self.since)
                .as_secs(),
            run: submission.write.result_id,
            arrival: self.arrivals,
        };
        self.arrivals += 1;
        self.bytes += submission.bytes;
        self.order.insert(place, self.events.insert(submission));
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Bytes of the events waiting.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The next batch: events in order until `max_rows` of them, or until they reach
    /// `max_bytes`, leaving out every event of a run `busy` says a batch in flight is writing.
    pub fn take(
        &mut self,
        max_rows: usize,
        max_bytes: usize,
        busy: impl Fn(&Uuid) -> bool,
    ) -> Vec<Submission> {
        let mut chosen = Vec::new();
        let mut bytes = 0;
        for (place, &key) in &self.order {
            if chosen.len() >= max_rows || bytes >= max_bytes {
                break;
            }
            if busy(&place.run) {
                continue;
            }
            bytes += self.events[key].bytes;
            chosen.push(*place);
        }
        self.bytes -= bytes;
        chosen
            .iter()
            .map(|place| {
                let key = self.order.remove(place).expect("chosen from the order");
                self.events.remove(key)
            })
            .collect()
    }
}
