//! When scheduled jobs fire: `every` intervals (drift-free, from the daemon's start) or
//! five-field cron expressions in local time, each delayed by a random jitter so a fleet does
//! not fire in lockstep.

use std::time::Duration;

use chrono::{DateTime, Local};
use tokio::time::Instant;

use crate::config::Schedule;

fn jitter(max: Duration) -> Duration {
    max.mul_f64(fastrand::f64())
}

/// Computes a job's firings one after another.
#[derive(Debug)]
pub struct Firings {
    schedule: Schedule,
    jitter: Duration,
    /// For `every`: the un-jittered instant of the previous firing.
    previous: Instant,
}

impl Firings {
    pub fn new(schedule: Schedule, jitter: Duration) -> Firings {
        Firings {
            schedule,
            jitter,
            previous: Instant::now(),
        }
    }

    /// The instant of the next firing, or `None` when a cron expression never matches again.
    pub fn next_firing(&mut self) -> Option<Instant> {
        match &self.schedule {
            Schedule::Every(every) => {
                self.previous += *every;
                // A firing missed while the machine slept is not replayed.
                let now = Instant::now();
                while self.previous + *every <= now {
                    self.previous += *every;
                }
                Some(self.previous + jitter(self.jitter))
            }
            Schedule::Cron(cron) => {
                let now: DateTime<Local> = Local::now();
                let next = cron.find_next_occurrence(&now, false).ok()?;
                let wait = (next - now).to_std().unwrap_or_default();
                Some(Instant::now() + wait + jitter(self.jitter))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_cron;

    #[test]
    fn every_fires_at_fixed_intervals_within_jitter() {
        let start = Instant::now();
        let mut f = Firings::new(
            Schedule::Every(Duration::from_secs(60)),
            Duration::from_secs(5),
        );
        for n in 1..=5u64 {
            let at = f.next_firing().unwrap() - start;
            assert!(
                at >= Duration::from_secs(60 * n) && at <= Duration::from_secs(60 * n + 5),
                "{at:?}"
            );
        }
    }

    #[test]
    fn cron_fires_at_the_next_matching_minute() {
        let cron = parse_cron("*/5 * * * *").unwrap();
        let mut f = Firings::new(Schedule::Cron(Box::new(cron)), Duration::ZERO);
        let wait = f.next_firing().unwrap() - Instant::now();
        assert!(wait <= Duration::from_secs(5 * 60), "{wait:?}");
    }
}
