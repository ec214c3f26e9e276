//! Suspects (see [`crate::transport::crash`]): a delivery the server hands out again more
//! often than this process explains (its own retry and deferral `Nak`s, deliveries it
//! dropped, acks it could not send) is held back from the worker's stream and run alone
//! when the worker takes it.
//!
//! The crash count lives in a key-value bucket, `steadfast-crashes` (the ledger): before
//! a suspect runs alone its entry is raised by one, and once the run ends in this
//! process — whatever the outcome — it is put back. An entry that stayed raised is a run
//! that took its process down. Deliveries held while another suspect ran are returned
//! by the same crash and gain a delivery count, but no ledger entry: only a run alone
//! counts.

use super::{
    Inner,
    settle::{AckTarget, NatsAcker},
};
use crate::{
    envelope::Envelope,
    transport::{Delivery, TransportError, TransportErrorKind, backoff::Backoff, crash::Explained},
};
use async_nats::jetstream::kv;
use bytes::Bytes;
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

/// The ledger bucket.
pub(super) const BUCKET: &str = "steadfast-crashes";

/// How long a ledger entry outlives its message's last run alone.
const ENTRY_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How many suspects a process holds per group; beyond that they go back (`-NAK`) and
/// are held when the server delivers them again.
const MAX_HELD: usize = 10_000;

type SeqKey = (Arc<str>, u64);

/// A suspect held back from the stream, not yet a delivery (made one when taken).
pub(super) struct Held {
    pub(super) envelope: Envelope,
    pub(super) defect: Option<String>,
    pub(super) target: AckTarget,
}

/// The suspects state of one transport.
#[derive(Default)]
pub(super) struct Suspects {
    held: Mutex<HashMap<Arc<str>, VecDeque<Held>>>,
    explained: Explained<SeqKey>,
    ledger: tokio::sync::OnceCell<kv::Store>,
}

/// A suspect's ledger entry while it runs alone: restored to `before` when the run ends
/// in this process.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) key: String,
    pub(super) before: u32,
}

impl Suspects {
    fn lock_held(&self) -> MutexGuard<'_, HashMap<Arc<str>, VecDeque<Held>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that this delivery went back to the server for a reason that is not a
    /// crash.
    pub(super) fn explain(&self, consumer: &Arc<str>, seq: u64) {
        self.explained.explain((consumer.clone(), seq));
    }

    /// Returns of this delivery this process explains.
    pub(super) fn explained(&self, consumer: &Arc<str>, seq: u64) -> u32 {
        self.explained.explained(&(consumer.clone(), seq))
    }

    /// Forgets a settled delivery.
    pub(super) fn forget(&self, consumer: &Arc<str>, seq: u64) {
        self.explained.forget(&(consumer.clone(), seq));
    }

    /// Holds a suspect of `group` until the worker takes it; `Err` gives it back when
    /// too many are held.
    pub(super) fn hold(&self, group: &Arc<str>, d: Held) -> Result<(), Box<Held>> {
        let mut held = self.lock_held();
        let q = held.entry(group.clone()).or_default();
        if q.len() >= MAX_HELD {
            return Err(Box::new(d));
        }
        q.push_back(d);
        Ok(())
    }

    pub(super) fn waiting(&self, group: &str) -> bool {
        self.lock_held().get(group).is_some_and(|q| !q.is_empty())
    }

    fn pop(&self, group: &str) -> Option<Held> {
        self.lock_held()
            .get_mut(group)
            .and_then(VecDeque::pop_front)
    }

    fn unpop(&self, group: &str, d: Held) {
        let mut held = self.lock_held();
        if let Some(q) = held.get_mut(group) {
            q.push_front(d);
        }
    }
}

/// The ledger key of a delivery: bucket keys allow `[-/_=.a-zA-Z0-9]`.
pub(super) fn key(stream: &str, consumer: &str, seq: u64) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '=') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("{}.{}.{seq}", clean(stream), clean(consumer))
}

fn kv_err(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> TransportError {
    super::err(
        TransportErrorKind::Connection,
        format!("crash ledger: {what}"),
        e,
    )
}

async fn ledger(inner: &Inner) -> Result<&kv::Store, TransportError> {
    inner
        .suspects
        .ledger
        .get_or_try_init(|| async {
            inner
                .bounded("crash ledger", async {
                    if let Ok(s) = inner.js.get_key_value(BUCKET).await {
                        return Ok(s);
                    }
                    let replicas = match inner.js.get_stream(&inner.settings.stream).await {
                        Ok(st) => st.cached_info().config.num_replicas.max(1),
                        Err(_) => 1,
                    };
                    // The bucket's stream, made as the client's `create_key_value` would
                    // make it, without the account query that call starts with (its answer
                    // does not parse from nats-server 2.9).
                    let created = inner
                        .js
                        .create_stream(async_nats::jetstream::stream::Config {
                            name: format!("KV_{BUCKET}"),
                            description: Some(
                                "steadfast: crashes of messages that ran alone".to_owned(),
                            ),
                            subjects: vec![format!("$KV.{BUCKET}.>")],
                            max_messages_per_subject: 1,
                            max_age: ENTRY_AGE,
                            storage: async_nats::jetstream::stream::StorageType::File,
                            allow_rollup: true,
                            deny_delete: true,
                            allow_direct: true,
                            num_replicas: replicas,
                            discard: async_nats::jetstream::stream::DiscardPolicy::New,
                            ..Default::default()
                        })
                        .await;
                    // Another process may have made it meanwhile.
                    match (created, inner.js.get_key_value(BUCKET).await) {
                        (_, Ok(s)) => Ok(s),
                        (Err(e), Err(_)) => Err(kv_err("creating the bucket", e)),
                        (Ok(_), Err(e)) => Err(kv_err("opening the bucket", e)),
                    }
                })
                .await
        })
        .await
}

async fn read(inner: &Inner, key: &str) -> Result<u32, TransportError> {
    let store = ledger(inner).await?;
    let v = inner
        .bounded("crash ledger get", async {
            store.get(key).await.map_err(|e| kv_err("get", e))
        })
        .await?;
    Ok(
        v.and_then(|b| std::str::from_utf8(&b).ok()?.trim().parse().ok())
            .unwrap_or(0),
    )
}

async fn write(inner: &Inner, key: &str, n: u32) -> Result<(), TransportError> {
    let store = ledger(inner).await?;
    inner
        .bounded("crash ledger put", async {
            if n == 0 {
                store.purge(key).await.map_err(|e| kv_err("purge", e))
            } else {
                store
                    .put(key, Bytes::from(n.to_string()))
                    .await
                    .map(|_| ())
                    .map_err(|e| kv_err("put", e))
            }
        })
        .await
}

/// Takes the next held suspect of `group`: reads its crashes from the ledger and raises
/// the entry for this run. Without a ledger (the bucket cannot be reached) the suspect
/// still runs alone, uncounted; the server's `max_deliver` stays the backstop.
pub(super) async fn take(
    inner: &Arc<Inner>,
    group: &str,
) -> Result<Option<Delivery>, TransportError> {
    let Some(mut h) = inner.suspects.pop(group) else {
        return Ok(None);
    };
    let k = key(&inner.settings.stream, &h.target.consumer, h.target.seq);
    let counted = async {
        let before = read(inner, &k).await?;
        write(inner, &k, before.saturating_add(1)).await?;
        Ok::<u32, TransportError>(before)
    }
    .await;
    let crashes = match counted {
        Ok(before) => {
            h.target.ledger = Some(Entry { key: k, before });
            before
        }
        Err(e) if inner.suspects.ledger.get().is_none() => {
            tracing::warn!(error = %e, "no crash ledger: the suspect runs alone, uncounted (max_deliver stays the backstop)");
            0
        }
        Err(e) => {
            inner.suspects.unpop(group, h);
            return Err(e);
        }
    };
    Ok(Some(
        Delivery::new(h.envelope, NatsAcker::new(h.target))
            .with_defect(h.defect)
            .alone(crashes),
    ))
}

/// Puts a ledger entry back after a run alone that did not take the process down,
/// retrying in the background for a while (the connection may be down).
pub(super) fn restore(inner: Arc<Inner>, entry: Entry, finished: bool) {
    let n = if finished { 0 } else { entry.before };
    tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        for _ in 0..12 {
            match write(&inner, &entry.key, n).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::debug!(key = %entry.key, error = %e, "crash ledger not restored yet; retrying");
                    tokio::time::sleep(backoff.pause()).await;
                }
            }
        }
        tracing::warn!(key = %entry.key, "crash ledger entry not restored: a later run alone may count one crash too many");
    });
}
