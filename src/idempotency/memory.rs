//! The in-memory idempotency store: for tests and single-process use.

use super::{Begin, Fingerprint, IdempotencyStore, Key, Lease, StoreError};
use futures::future::BoxFuture;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::time::Instant;

#[derive(Debug)]
enum State {
    Held {
        token: uuid::Uuid,
        until: Instant,
        fp: Option<Fingerprint>,
    },
    Done {
        at: Instant,
        fp: Option<Fingerprint>,
    },
}

impl State {
    fn fingerprint(&self) -> Option<Fingerprint> {
        match self {
            State::Held { fp, .. } | State::Done { fp, .. } => *fp,
        }
    }
}

/// Keys kept in a map in this process. Completed keys are kept for `retention`.
///
/// ```
/// # tokio_test_block_on(async {
/// use steadfast::idempotency::{IdempotencyStore, MemoryStore, Begin, Key};
/// use std::time::Duration;
///
/// let store = MemoryStore::new();
/// let key = Key { group: "billing", name: "orders.placed", key: "42", fingerprint: None };
/// let Begin::Acquired(lease) = store.begin(key, Duration::from_secs(30)).await.unwrap() else { panic!() };
/// assert_eq!(store.begin(key, Duration::from_secs(30)).await.unwrap(), Begin::InFlight);
/// store.complete(key, &lease).await.unwrap();
/// assert_eq!(store.begin(key, Duration::from_secs(30)).await.unwrap(), Begin::AlreadyDone);
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct MemoryStore {
    keys: Arc<Mutex<HashMap<String, State>>>,
    retention: Duration,
}

/// Expired entries are swept once the map has grown by this many since the last sweep.
const SWEEP_EVERY: usize = 4096;

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store keeping completed keys for 7 days.
    pub fn new() -> Self {
        Self::with_retention(Duration::from_secs(7 * 24 * 3600))
    }

    /// A store keeping completed keys for `retention`.
    pub fn with_retention(retention: Duration) -> Self {
        Self {
            keys: Arc::default(),
            retention,
        }
    }

    /// Drops completed keys older than the retention and leases that ended.
    pub fn purge_expired(&self) {
        sweep(&mut self.lock(), Instant::now(), self.retention);
    }

    /// How many keys are completed (for tests).
    pub fn completed(&self) -> usize {
        self.lock()
            .values()
            .filter(|s| matches!(s, State::Done { .. }))
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, State>> {
        // A panic while holding this lock cannot leave the map half-updated: every
        // critical section is a single insert or remove.
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn compose(key: Key<'_>) -> String {
        let mut s = String::with_capacity(key.group.len() + key.name.len() + key.key.len() + 2);
        s.push_str(key.group);
        s.push('\0');
        s.push_str(key.name);
        s.push('\0');
        s.push_str(key.key);
        s
    }
}

fn sweep(map: &mut HashMap<String, State>, now: Instant, retention: Duration) {
    map.retain(|_, s| match s {
        State::Done { at, .. } => now.duration_since(*at) < retention,
        State::Held { until, .. } => *until > now,
    });
}

impl IdempotencyStore for MemoryStore {
    fn is_done<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, Result<bool, StoreError>> {
        let done = matches!(
            self.lock().get(&Self::compose(key)),
            Some(State::Done { at, .. }) if at.elapsed() < self.retention
        );
        Box::pin(async move { Ok(done) })
    }

    fn lease_remaining<'a>(
        &'a self,
        key: Key<'a>,
    ) -> BoxFuture<'a, Result<Option<Duration>, StoreError>> {
        let now = Instant::now();
        let left = match self.lock().get(&Self::compose(key)) {
            Some(State::Held { until, .. }) if *until > now => Some(*until - now),
            _ => None,
        };
        Box::pin(async move { Ok(left) })
    }

    fn begin<'a>(
        &'a self,
        key: Key<'a>,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Begin, StoreError>> {
        let now = Instant::now();
        let k = Self::compose(key);
        let mut map = self.lock();
        // Amortised: sweep each time the map reaches a power of two past SWEEP_EVERY.
        if map.len() >= SWEEP_EVERY && map.len().is_power_of_two() {
            sweep(&mut map, now, self.retention);
        }
        let out = match map.get(&k) {
            Some(State::Done { at, .. }) if now.duration_since(*at) < self.retention => {
                Begin::AlreadyDone
            }
            Some(State::Held { until, .. }) if *until > now => Begin::InFlight,
            _ => {
                let l = Lease::new();
                map.insert(
                    k,
                    State::Held {
                        token: l.token,
                        until: now + lease,
                        fp: key.fingerprint,
                    },
                );
                Begin::Acquired(l)
            }
        };
        Box::pin(async move { Ok(out) })
    }

    fn complete<'a>(
        &'a self,
        key: Key<'a>,
        _lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        // Completing is correct even if the lease lapsed: the handler did succeed.
        let k = Self::compose(key);
        let mut map = self.lock();
        let fp = key
            .fingerprint
            .or_else(|| map.get(&k).and_then(State::fingerprint));
        map.insert(
            k,
            State::Done {
                at: Instant::now(),
                fp,
            },
        );
        Box::pin(async { Ok(()) })
    }

    fn fingerprint<'a>(
        &'a self,
        key: Key<'a>,
    ) -> BoxFuture<'a, Result<Option<Fingerprint>, StoreError>> {
        let fp = self
            .lock()
            .get(&Self::compose(key))
            .and_then(State::fingerprint);
        Box::pin(async move { Ok(fp) })
    }

    fn release<'a>(
        &'a self,
        key: Key<'a>,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let k = Self::compose(key);
        let mut map = self.lock();
        if matches!(map.get(&k), Some(State::Held { token, .. }) if *token == lease.token) {
            map.remove(&k);
        }
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: Key<'static> = Key {
        group: "g",
        name: "n",
        key: "k",
        fingerprint: None,
    };

    #[tokio::test(start_paused = true)]
    async fn lease_expiry_frees_a_crashed_holder() {
        let s = MemoryStore::new();
        let Begin::Acquired(_) = s.begin(K, Duration::from_secs(10)).await.unwrap() else {
            panic!()
        };
        assert_eq!(
            s.begin(K, Duration::from_secs(10)).await.unwrap(),
            Begin::InFlight
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(matches!(
            s.begin(K, Duration::from_secs(10)).await.unwrap(),
            Begin::Acquired(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn release_only_by_holder_and_scoping() {
        let s = MemoryStore::new();
        let Begin::Acquired(l1) = s.begin(K, Duration::from_secs(1)).await.unwrap() else {
            panic!()
        };
        tokio::time::advance(Duration::from_secs(2)).await;
        let Begin::Acquired(l2) = s.begin(K, Duration::from_secs(10)).await.unwrap() else {
            panic!()
        };
        s.release(K, &l1).await.unwrap(); // stale holder: no effect
        assert_eq!(
            s.begin(K, Duration::from_secs(10)).await.unwrap(),
            Begin::InFlight
        );
        s.release(K, &l2).await.unwrap();
        assert!(matches!(
            s.begin(K, Duration::from_secs(10)).await.unwrap(),
            Begin::Acquired(_)
        ));
        let other = Key { name: "m", ..K };
        assert!(matches!(
            s.begin(other, Duration::from_secs(10)).await.unwrap(),
            Begin::Acquired(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn expired_keys_are_swept() {
        let s = MemoryStore::with_retention(Duration::from_secs(60));
        for i in 0..10 {
            let key = Key {
                key: &i.to_string(),
                ..K
            };
            let Begin::Acquired(l) = s.begin(key, Duration::from_secs(1)).await.unwrap() else {
                panic!()
            };
            s.complete(key, &l).await.unwrap();
        }
        assert_eq!(s.completed(), 10);
        tokio::time::advance(Duration::from_secs(61)).await;
        s.purge_expired();
        assert_eq!(s.completed(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn retention_expires_done_keys() {
        let s = MemoryStore::with_retention(Duration::from_secs(60));
        let Begin::Acquired(l) = s.begin(K, Duration::from_secs(1)).await.unwrap() else {
            panic!()
        };
        s.complete(K, &l).await.unwrap();
        assert_eq!(
            s.begin(K, Duration::from_secs(1)).await.unwrap(),
            Begin::AlreadyDone
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(matches!(
            s.begin(K, Duration::from_secs(1)).await.unwrap(),
            Begin::Acquired(_)
        ));
    }
}
