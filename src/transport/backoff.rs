//! The one backoff between the tries of a retry against a broker: reconnecting,
//! resuming a consumer, an operation tried again while the broker elects a leader.

use std::time::Duration;

/// Pauses that start at `min`, double up to `max`, and are each stretched by a random
/// part of themselves (up to twice as long) so that many workers do not retry in step.
/// Endless: the caller stops at its deadline, after its tries, or when it is closed.
#[derive(Debug)]
pub(crate) struct Backoff {
    pauses: backon::ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        use backon::BackoffBuilder;
        let pauses = backon::ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times()
            .build();
        Self { pauses, max }
    }

    /// The pause before the next try.
    pub(crate) fn pause(&mut self) -> Duration {
        self.pauses.next().unwrap_or(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_cap_and_never_end() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let mut b = Backoff::new(min, max);
        let pauses: Vec<Duration> = (0..20).map(|_| b.pause()).collect();
        assert!(pauses[0] >= min && pauses[0] <= min * 2, "{pauses:?}");
        // Jitter stretches a pause to at most twice its base, the cap included.
        assert!(pauses.iter().all(|p| *p <= max * 2), "{pauses:?}");
        assert!(pauses[19] >= max, "{pauses:?}");
    }
}
