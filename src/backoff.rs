//! Retry delays: exponential backoff with full jitter, capped.
//!
//! Full jitter (a uniformly random delay between zero and the exponential ceiling) spreads a
//! fleet of agents reconnecting to a restarted ingest over the whole window instead of in waves.

use std::time::Duration;

/// Exponential backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first retry's delay.
    pub base: Duration,
    /// No delay is ever longer than this.
    pub cap: Duration,
}

impl Backoff {
    /// The ceiling for retry number `attempt` (0 for the first retry): `base · 2^attempt`,
    /// never more than `cap`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before retry number `attempt`: uniform in `[0, ceiling(attempt)]`.
    pub fn next_delay(&self, attempt: u32) -> Duration {
        self.ceiling(attempt).mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKOFF: Backoff = Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(30),
    };

    #[test]
    fn ceiling_doubles_then_stops_at_the_cap() {
        assert_eq!(BACKOFF.ceiling(0), Duration::from_millis(100));
        assert_eq!(BACKOFF.ceiling(1), Duration::from_millis(200));
        assert_eq!(BACKOFF.ceiling(8), Duration::from_millis(25_600));
        assert_eq!(BACKOFF.ceiling(9), Duration::from_secs(30));
        assert_eq!(BACKOFF.ceiling(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn delays_never_exceed_the_cap_and_are_spread() {
        let delays: Vec<Duration> = (0..2000).map(|i| BACKOFF.next_delay(20 + i % 50)).collect();
        assert!(delays.iter().all(|d| *d <= BACKOFF.cap));
        let below_half = delays.iter().filter(|d| **d < BACKOFF.cap / 2).count();
        assert!(
            (600..1400).contains(&below_half),
            "full jitter should put about half the delays below cap/2, got {below_half}/2000"
        );
    }
}
