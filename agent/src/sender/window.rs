//! The send window of one stream session: which events are on the wire without an answer yet,
//! bounded by count AND bytes (the smaller of the agent's own limits and ingest's `Welcome`).
//!
//! A session reads the outbox in seq order from its cursor. An event leaves the window when it
//! is answered (Ack or Reject). After a reconnect a new window starts at cursor 0: whatever is
//! still in the outbox was never acknowledged, and is sent again (ingest ignores duplicates).

use std::collections::BTreeMap;

#[derive(Debug)]
pub struct Window {
    max_events: usize,
    max_bytes: u64,
    /// seq → encoded bytes of every unanswered event.
    unanswered: BTreeMap<u64, u64>,
    bytes: u64,
    /// The highest seq sent in this session: the next read starts after it.
    cursor: u64,
}

impl Window {
    pub fn new(max_events: u32, max_bytes: u64) -> Window {
        Window {
            max_events: max_events.max(1) as usize,
            max_bytes: max_bytes.max(1),
            unanswered: BTreeMap::new(),
            bytes: 0,
            cursor: 0,
        }
    }

    /// How many more events may be sent now (0 when the window is full by count or bytes).
    pub fn room(&self) -> usize {
        if self.bytes >= self.max_bytes {
            return 0;
        }
        self.max_events.saturating_sub(self.unanswered.len())
    }

    /// Whether an event of `bytes` fits. An empty window admits any event, however large, so
    /// one event bigger than the byte window still goes (alone).
    pub fn admits(&self, bytes: u64) -> bool {
        self.room() > 0 && (self.unanswered.is_empty() || self.bytes + bytes <= self.max_bytes)
    }

    /// Records an event as sent.
    pub fn sent(&mut self, seq: u64, bytes: u64) {
        debug_assert!(seq > self.cursor, "events are sent in seq order");
        self.cursor = seq;
        if self.unanswered.insert(seq, bytes).is_none() {
            self.bytes += bytes;
        }
    }

    /// Frees an answered event's place; false when it was not in the window (an answer to an
    /// earlier session's event, or a repeat).
    pub fn answered(&mut self, seq: u64) -> bool {
        match self.unanswered.remove(&seq) {
            Some(bytes) => {
                self.bytes -= bytes;
                true
            }
            None => false,
        }
    }

    /// Where the next read of the outbox starts (exclusive).
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The oldest unanswered event.
    pub fn oldest(&self) -> Option<u64> {
        self.unanswered.keys().next().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_by_count() {
        let mut w = Window::new(2, 1_000);
        assert_eq!(w.room(), 2);
        w.sent(1, 10);
        w.sent(2, 10);
        assert_eq!(w.room(), 0);
        assert!(!w.admits(1));
        assert!(w.answered(1));
        assert_eq!(w.room(), 1);
        assert!(w.admits(10));
    }

    #[test]
    fn bounded_by_bytes_but_one_large_event_goes_alone() {
        let mut w = Window::new(10, 100);
        assert!(w.admits(500), "an empty window takes any event");
        w.sent(1, 500);
        assert_eq!(w.room(), 0, "over the byte window: nothing more");
        assert!(w.answered(1));
        w.sent(2, 60);
        assert!(w.admits(40));
        assert!(!w.admits(41));
        w.sent(3, 40);
        assert_eq!(w.room(), 0);
    }

    #[test]
    fn answers_free_their_place_once_and_unknown_seqs_change_nothing() {
        let mut w = Window::new(4, 100);
        w.sent(5, 30);
        w.sent(7, 30);
        assert!(!w.answered(3), "an answer to another session's event");
        assert!(w.answered(5));
        assert!(!w.answered(5), "a repeated answer");
        assert_eq!(w.oldest(), Some(7));
        assert_eq!(w.room(), 3);
        assert!(w.admits(70));
        assert!(!w.admits(71));
    }

    #[test]
    fn the_cursor_follows_what_was_sent_and_a_new_window_starts_over() {
        let mut w = Window::new(4, 100);
        assert_eq!(w.cursor(), 0);
        w.sent(3, 1);
        w.sent(9, 1);
        w.answered(3);
        assert_eq!(w.cursor(), 9, "answers never move the cursor back");
        // After a reconnect the unanswered seq 9 is read again from the outbox.
        assert_eq!(Window::new(4, 100).cursor(), 0);
    }
}
