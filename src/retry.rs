//! Retry policy: a pure function from a handler's result and the attempt number to a
//! [`Disposition`]. Deciding is separate from acting: the transport carries the
//! disposition out (broker-held delays, dead-letter queues).

use crate::{
    envelope::{MessageId, header},
    error::{ErrorKind, HandlerError},
};
use std::{fmt, time::Duration};

/// What happens to a delivery after its handler ran.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Done: acknowledge it.
    Ack,
    /// Try again after `delay`, held by the broker; the attempt count goes up by one.
    Retry {
        /// How long the broker holds the message before the next attempt.
        delay: Duration,
    },
    /// Give up: move it to the dead-letter queue with the failure's reason.
    DeadLetter(Failure),
    /// Put it back after `delay` without counting an attempt: nothing failed, the
    /// worker could not take it yet (another worker holds its idempotency key).
    Defer {
        /// How long the broker holds the message.
        delay: Duration,
    },
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The kind of the last error.
    pub kind: ErrorKind,
    /// A human-readable reason.
    pub reason: String,
}

impl Failure {
    /// A failure of `kind` with `reason`.
    pub fn new(kind: ErrorKind, reason: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
        }
    }

    /// The framework's dead-letter headers for this failure after `attempts` attempts:
    /// reason, error kind, attempts and failed-at. Transports add the original
    /// destination and group.
    pub fn headers(&self, attempts: u32) -> [(&'static str, String); 4] {
        [
            (header::DEAD_LETTER_REASON, self.reason.clone()),
            (header::ERROR_KIND, self.kind.as_str().to_owned()),
            (header::ATTEMPTS, attempts.to_string()),
            (
                header::FAILED_AT,
                humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            ),
        ]
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.reason)
    }
}

/// Retries with exponential backoff, a cap and jitter, up to a number of attempts.
///
/// ```
/// use std::time::Duration;
/// use steadfast::{RetryPolicy, Disposition, HandlerError, MessageId};
///
/// let policy = RetryPolicy::exponential(Duration::from_secs(1))
///     .max_attempts(4)
///     .max_delay(Duration::from_secs(3))
///     .jitter(0.0);
/// let id = MessageId::new();
/// let fail: Result<(), HandlerError> = Err(HandlerError::msg("db down"));
/// assert_eq!(policy.decide(&fail, 1, id), Disposition::Retry { delay: Duration::from_secs(1) });
/// assert_eq!(policy.decide(&fail, 2, id), Disposition::Retry { delay: Duration::from_secs(2) });
/// assert_eq!(policy.decide(&fail, 3, id), Disposition::Retry { delay: Duration::from_secs(3) }); // capped
/// assert!(matches!(policy.decide(&fail, 4, id), Disposition::DeadLetter(_)));
/// assert_eq!(policy.decide(&Ok(()), 1, id), Disposition::Ack);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial: Duration,
    factor: f64,
    max_delay: Duration,
    jitter: f64,
}

impl Default for RetryPolicy {
    /// 5 attempts; delays 1 s, 2 s, 4 s, 8 s with 20 % jitter, capped at 5 minutes.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(300),
            jitter: 0.2,
        }
    }
}

/// A retry policy that cannot work (zero attempts, a factor below 1, jitter outside 0..=1).
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid retry policy: {0}")]
pub struct InvalidPolicy(String);

/// The most attempts a policy may allow; also the cap on attempt headers.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1000;

impl RetryPolicy {
    /// Exponential backoff starting at `initial`, doubling, otherwise the defaults.
    pub fn exponential(initial: Duration) -> Self {
        Self {
            initial,
            ..Self::default()
        }
    }

    /// Fixed delays: every retry waits `delay`.
    pub fn fixed(delay: Duration) -> Self {
        Self {
            initial: delay,
            factor: 1.0,
            max_delay: delay,
            ..Self::default()
        }
    }

    /// No retries: the first failure dead-letters.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Total attempts including the first (at least 1).
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// The growth factor between delays (at least 1.0).
    #[must_use]
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// The cap on any delay, including an upstream's `retry_after` hint.
    #[must_use]
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }

    /// Jitter as a fraction: each delay is shortened by up to this share (0.0 = exact).
    #[must_use]
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// The configured number of attempts.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Checks the policy (the worker's `build()` calls this).
    pub fn validate(&self) -> Result<(), InvalidPolicy> {
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS_LIMIT {
            return Err(InvalidPolicy(format!(
                "max_attempts must be 1..={MAX_ATTEMPTS_LIMIT}, got {}",
                self.max_attempts
            )));
        }
        if !(self.factor >= 1.0 && self.factor.is_finite()) {
            return Err(InvalidPolicy(format!(
                "factor must be a finite number >= 1, got {}",
                self.factor
            )));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(InvalidPolicy(format!(
                "jitter must be within 0..=1, got {}",
                self.jitter
            )));
        }
        if self.initial.is_zero() || self.max_delay < self.initial {
            return Err(InvalidPolicy(
                "initial delay must be > 0 and <= max_delay".into(),
            ));
        }
        Ok(())
    }

    /// The delay before attempt `attempt + 1` without jitter: `initial * factor^(attempt-1)`,
    /// capped.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let secs = self.initial.as_secs_f64() * self.factor.powi(exp);
        if !secs.is_finite() || secs >= self.max_delay.as_secs_f64() {
            self.max_delay
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// Every distinct un-jittered delay this policy can ask for, ascending. Transports
    /// that hold delays in fixed tiers (RabbitMQ) declare one tier per value.
    pub fn delay_tiers(&self) -> Vec<Duration> {
        let mut tiers: Vec<Duration> = (1..self.max_attempts).map(|a| self.base_delay(a)).collect();
        tiers.push(self.max_delay);
        tiers.sort();
        tiers.dedup();
        tiers
    }

    /// Decides what to do with a delivery after attempt `attempt` (1-based) ended with
    /// `result`. Pure: the jitter is derived from the message id and the attempt, so the
    /// same inputs always give the same answer while different messages spread out.
    pub fn decide(
        &self,
        result: &Result<(), HandlerError>,
        attempt: u32,
        id: MessageId,
    ) -> Disposition {
        let err = match result {
            Ok(()) => return Disposition::Ack,
            Err(e) => e,
        };
        match err.kind() {
            ErrorKind::Transient => {}
            ErrorKind::Permanent => {
                return Disposition::DeadLetter(Failure::new(
                    ErrorKind::Permanent,
                    err.chain_text(),
                ));
            }
            ErrorKind::Decode => {
                return Disposition::DeadLetter(Failure::new(ErrorKind::Decode, err.chain_text()));
            }
        }
        if attempt >= self.max_attempts {
            return Disposition::DeadLetter(Failure::new(
                ErrorKind::Transient,
                format!("gave up after {attempt} attempts: {}", err.chain_text()),
            ));
        }
        let base = self.base_delay(attempt);
        let jittered = if self.jitter > 0.0 {
            base.mul_f64(1.0 - self.jitter * unit_hash(id, attempt))
        } else {
            base
        };
        let delay = match err.retry_after_hint() {
            Some(hint) => jittered.max(hint).min(self.max_delay),
            None => jittered,
        };
        Disposition::Retry { delay }
    }
}

/// A number in [0, 1) from the id and attempt (SplitMix64 finaliser over the UUID bits).
fn unit_hash(id: MessageId, attempt: u32) -> f64 {
    let v = id.as_uuid().as_u128();
    let mut x =
        (v as u64) ^ ((v >> 64) as u64) ^ u64::from(attempt).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn transient() -> Result<(), HandlerError> {
        Err(HandlerError::msg("boom"))
    }

    #[test]
    fn decision_table() {
        let p = RetryPolicy::exponential(Duration::from_millis(100))
            .max_attempts(3)
            .jitter(0.0);
        let id = MessageId::new();
        assert_eq!(p.decide(&Ok(()), 3, id), Disposition::Ack);
        assert_eq!(
            p.decide(&transient(), 1, id),
            Disposition::Retry {
                delay: Duration::from_millis(100)
            }
        );
        assert_eq!(
            p.decide(&transient(), 2, id),
            Disposition::Retry {
                delay: Duration::from_millis(200)
            }
        );
        let Disposition::DeadLetter(f) = p.decide(&transient(), 3, id) else {
            panic!()
        };
        assert_eq!(f.kind, ErrorKind::Transient);
        assert_eq!(f.reason, "gave up after 3 attempts: boom");
        let perm = Err(HandlerError::msg("bad order").permanent());
        assert_eq!(
            p.decide(&perm, 1, id),
            Disposition::DeadLetter(Failure::new(ErrorKind::Permanent, "bad order"))
        );
        let dec = Err(HandlerError::decode(
            HandlerError::msg("x").source().to_string(),
        ));
        assert!(matches!(
            p.decide(&dec, 1, id),
            Disposition::DeadLetter(Failure {
                kind: ErrorKind::Decode,
                ..
            })
        ));
        let hinted = Err(HandlerError::msg("429").retry_after(Duration::from_secs(7)));
        assert_eq!(
            p.decide(&hinted, 1, id),
            Disposition::Retry {
                delay: Duration::from_secs(7).min(p.max_delay)
            }
        );
    }

    #[test]
    fn tiers_cover_every_delay() {
        let p = RetryPolicy::exponential(Duration::from_secs(1))
            .max_attempts(6)
            .max_delay(Duration::from_secs(10));
        assert_eq!(
            p.delay_tiers(),
            [1, 2, 4, 8, 10].map(Duration::from_secs).to_vec()
        );
    }

    #[test]
    fn invalid_policies_are_refused() {
        assert!(RetryPolicy::default().validate().is_ok());
        assert!(RetryPolicy::default().max_attempts(0).validate().is_err());
        assert!(RetryPolicy::default().factor(0.5).validate().is_err());
        assert!(RetryPolicy::default().jitter(1.5).validate().is_err());
        assert!(RetryPolicy::fixed(Duration::ZERO).validate().is_err());
    }

    proptest! {
        #[test]
        fn delays_stay_within_bounds(
            initial_ms in 1u64..10_000, factor in 1.0f64..5.0, cap_ms in 10_000u64..1_000_000,
            jitter in 0.0f64..=1.0, attempts in 1u32..50, attempt in 1u32..60, id in any::<u128>(),
            hint_ms in proptest::option::of(0u64..2_000_000),
        ) {
            let p = RetryPolicy::exponential(Duration::from_millis(initial_ms))
                .factor(factor).max_delay(Duration::from_millis(cap_ms)).jitter(jitter).max_attempts(attempts);
            prop_assert!(p.validate().is_ok());
            let mut err = HandlerError::msg("x");
            if let Some(h) = hint_ms { err = err.retry_after(Duration::from_millis(h)); }
            let id = MessageId::from(uuid::Uuid::from_u128(id));
            match p.decide(&Err(err), attempt, id) {
                Disposition::Retry { delay } => {
                    prop_assert!(attempt < attempts);
                    prop_assert!(delay <= p.max_delay);
                    let base = p.base_delay(attempt);
                    let floor = base.mul_f64(1.0 - jitter).saturating_sub(Duration::from_micros(1));
                    prop_assert!(delay >= floor, "delay {delay:?} below {floor:?}");
                    if let Some(h) = hint_ms { prop_assert!(delay >= Duration::from_millis(h).min(p.max_delay)); }
                }
                Disposition::DeadLetter(f) => {
                    prop_assert!(attempt >= attempts);
                    prop_assert_eq!(f.kind, ErrorKind::Transient);
                }
                Disposition::Ack | Disposition::Defer { .. } => prop_assert!(false, "a failure is never acked or deferred"),
            }
            // Same inputs, same answer: the decision is pure.
            prop_assert_eq!(p.decide(&Err(HandlerError::msg("x")), attempt, id), p.decide(&Err(HandlerError::msg("x")), attempt, id));
        }

        #[test]
        fn delays_never_shrink_without_jitter(initial_ms in 1u64..5_000, factor in 1.0f64..4.0, a in 1u32..40) {
            let p = RetryPolicy::exponential(Duration::from_millis(initial_ms)).factor(factor).jitter(0.0).max_delay(Duration::from_secs(3600));
            prop_assert!(p.base_delay(a) <= p.base_delay(a + 1));
        }
    }
}
