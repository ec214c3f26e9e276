//! Crash loops: the one decision every transport takes about a message that keeps
//! taking its worker down (`docs/decisions/0009-crash-attribution.md`).
//!
//! A crash (an abort, a SIGKILL, an out-of-memory kill) leaves every delivery the process
//! held unsettled, and the broker hands each of them out again with a higher delivery
//! count. The count alone cannot say which of them caused the crash, so it is never what
//! dead-letters a message:
//!
//! - A delivery that comes back unsettled more often than steadfast can explain (retries
//!   and deferrals it made itself, connections it saw die) is a **suspect**.
//! - A suspect is run **alone**: the worker stops starting other messages and waits until
//!   nothing else runs. If the process dies now, the suspect was the one at fault.
//! - Only those crashes count. A message that crashed its worker
//!   [`crash_limit`](super::Subscription::crash_limit) times while running alone is dead-lettered with [`crash_loop`]'s reason; the
//!   messages that merely shared a crash are handled normally.
//! - The broker's own limit (quorum `x-delivery-limit`, JetStream `max_deliver`) stays as
//!   a backstop, set well above, and its dead letters carry [`delivery_limit_reached`]'s
//!   reason.
//!
//! ```
//! use steadfast::{error::ErrorKind, transport::crash};
//! assert!(crash::crash_loop(2, 3).is_none());
//! let f = crash::crash_loop(3, 3).unwrap();
//! assert_eq!(f.kind, ErrorKind::Permanent);
//! assert!(f.reason.starts_with("crash loop"));
//! ```

use crate::{error::ErrorKind, retry::Failure};

/// How many crashes while running alone dead-letter a message, unless the worker sets
/// another limit (`WorkerBuilder::crash_limit`).
pub const DEFAULT_CRASH_LIMIT: u32 = 3;

/// The error kind of every crash-loop dead letter, whichever transport or limit stopped
/// it: the message will not succeed by being tried again.
pub const KIND: ErrorKind = ErrorKind::Permanent;

/// Whether a delivery is a suspect: the broker returned it unsettled (`returned` times,
/// its delivery count) more often than steadfast can explain (`explained`: retries and
/// deferrals it made itself, connections it saw die, crashes it already attributed).
pub fn is_suspect(returned: u64, explained: u64) -> bool {
    returned > explained
}

/// What the transports remember of the returns they explain.
#[cfg(any(feature = "amqp", feature = "nats"))]
mod explained {
    use std::{
        borrow::Borrow,
        collections::HashMap,
        hash::Hash,
        sync::{Mutex, MutexGuard},
    };

    /// How many explained returns a process remembers before it starts over (forgetting
    /// only makes a delivery a suspect, run alone once).
    const MAX_EXPLAINED: usize = 100_000;

    /// The returns of deliveries (keyed by `K`) that one process explains — retries and
    /// deferrals it made itself, deliveries it dropped, connections it saw die — to be
    /// subtracted from the broker's count in [`is_suspect`](super::is_suspect). Bounded: past
    /// [`MAX_EXPLAINED`] entries it starts over.
    pub(crate) struct Explained<K> {
        map: Mutex<HashMap<K, u32>>,
    }

    impl<K> Default for Explained<K> {
        fn default() -> Self {
            Self {
                map: Mutex::new(HashMap::new()),
            }
        }
    }

    impl<K: Eq + Hash> Explained<K> {
        fn lock(&self) -> MutexGuard<'_, HashMap<K, u32>> {
            self.map.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// Remembers one more return of `key` that is not a crash.
        pub(crate) fn explain(&self, key: K) {
            let mut map = self.lock();
            if map.len() >= MAX_EXPLAINED {
                map.clear();
            }
            *map.entry(key).or_insert(0) += 1;
        }

        /// The returns of `key` explained so far.
        pub(crate) fn explained<Q: Eq + Hash + ?Sized>(&self, key: &Q) -> u32
        where
            K: Borrow<Q>,
        {
            self.lock().get(key).copied().unwrap_or(0)
        }

        /// Forgets `key` (settled, or moved where the broker's count starts again).
        pub(crate) fn forget<Q: Eq + Hash + ?Sized>(&self, key: &Q)
        where
            K: Borrow<Q>,
        {
            let mut map = self.lock();
            if !map.is_empty() {
                map.remove(key);
            }
        }
    }
}
#[cfg(any(feature = "amqp", feature = "nats"))]
pub(crate) use explained::Explained;

/// The [`Transport`](super::Transport) methods that hand out suspects, for a broker
/// transport whose `self.inner.suspects` knows which groups have suspects waiting and whose
/// `suspects::take(&inner, group)` takes the next one to run alone.
#[cfg(any(feature = "amqp", feature = "nats"))]
macro_rules! suspect_methods {
    () => {
        fn suspects_waiting(&self, group: &str) -> bool {
            self.inner.suspects.waiting(group)
        }

        fn take_suspect<'a>(
            &'a self,
            sub: &'a $crate::transport::Subscription,
        ) -> futures::future::BoxFuture<
            'a,
            Result<Option<$crate::transport::Delivery>, $crate::transport::TransportError>,
        > {
            Box::pin(suspects::take(&self.inner, &sub.group))
        }
    };
}
#[cfg(any(feature = "amqp", feature = "nats"))]
pub(crate) use suspect_methods;

/// The dead letter of a message that crashed its worker `crashes` times while it ran
/// alone, once that reaches `limit`; `None` while it may be tried again.
pub fn crash_loop(crashes: u32, limit: u32) -> Option<Failure> {
    (crashes >= limit.max(1)).then(|| {
        Failure::new(
            KIND,
            format!(
                "crash loop: the worker stopped (crashed, aborted or was killed) {crashes} times while handling this message alone (limit {limit})"
            ),
        )
    })
}

/// The dead letter of a message the broker's own delivery limit stopped, the backstop
/// behind [`crash_loop`]; `detail` says which limit and how often.
pub fn delivery_limit_reached(detail: impl std::fmt::Display) -> Failure {
    Failure::new(
        KIND,
        format!(
            "crash loop: delivery limit reached: {detail}; the handler may be crashing the worker"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unexplained_returns_make_a_suspect() {
        assert!(!is_suspect(0, 0));
        assert!(!is_suspect(2, 2));
        assert!(!is_suspect(1, 3));
        assert!(is_suspect(3, 2));
    }

    #[cfg(any(feature = "amqp", feature = "nats"))]
    #[test]
    fn explained_returns_count_up_and_are_forgotten() {
        let e = Explained::<String>::default();
        assert_eq!(e.explained("a"), 0);
        e.explain("a".to_owned());
        e.explain("a".to_owned());
        assert_eq!(e.explained("a"), 2);
        e.forget("a");
        assert_eq!(e.explained("a"), 0);
    }

    #[test]
    fn the_limit_is_reached_and_never_zero() {
        assert!(crash_loop(0, 3).is_none());
        assert!(crash_loop(2, 3).is_none());
        assert!(crash_loop(3, 3).is_some());
        assert!(crash_loop(9, 3).is_some());
        assert!(crash_loop(0, 0).is_none(), "a zero limit counts as one");
        assert!(crash_loop(1, 0).is_some());
        let f = delivery_limit_reached("x-delivery-limit 20");
        assert_eq!(f.kind, KIND);
        assert!(
            f.reason
                .starts_with("crash loop: delivery limit reached: x-delivery-limit 20")
        );
    }
}
