//! The cases of the store conformance suite (see the module's documentation).

use super::{StoreCase, StoreFactory};
use crate::{
    envelope::{Envelope, MessageId},
    idempotency::{Begin, Fingerprint, IdempotencyStore, Key, Lease},
    outbox::{Backlog, Claimed, FailedRow, HeldBatch, OutboxSource, Relay},
    sql::StoreError,
    transport::memory::MemoryTransport,
};
use futures::future::BoxFuture;
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// A case id unique in this process and across runs (for table names).
fn case_id(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() % 1_000_000_000)
        .unwrap_or(0);
    let short: String = name
        .chars()
        .filter(char::is_ascii_alphabetic)
        .take(6)
        .collect();
    format!("{short}_{t}_{n}")
}

async fn open(f: &dyn StoreFactory, name: &str) -> StoreCase {
    f.create(&case_id(name)).await
}

fn key<'a>(group: &'a str, k: &'a str) -> Key<'a> {
    Key::new(group, "conformance.order", k)
}

fn order(n: u64) -> Envelope {
    Envelope::new("conformance.order", format!("{{\"n\":{n}}}").into_bytes())
}

async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < WAIT, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Leases: taken once, held against others, released only by their holder, taken again
/// once expired; keys scoped by group and name.
pub async fn leases_are_held_expire_and_release_only_by_their_holder(f: &dyn StoreFactory) {
    let c = open(f, "leases").await;
    let s = &c.inbox;
    let k = key("g", "1");
    let Begin::Acquired(first) = s.begin(k, Duration::from_secs(30)).await.unwrap() else {
        panic!("a new key is acquired");
    };
    assert_eq!(
        s.begin(k, Duration::from_secs(30)).await.unwrap(),
        Begin::InFlight
    );
    let left = s.lease_remaining(k).await.unwrap();
    assert!(
        left.is_some_and(|d| d > Duration::from_secs(20) && d <= Duration::from_secs(30)),
        "the lease's time left is known: {left:?}"
    );
    // Another group, another name: their own keys.
    assert!(matches!(
        s.begin(key("h", "1"), Duration::from_secs(30))
            .await
            .unwrap(),
        Begin::Acquired(_)
    ));
    let other_name = Key::new("g", "conformance.other", "1");
    assert!(matches!(
        s.begin(other_name, Duration::from_secs(30)).await.unwrap(),
        Begin::Acquired(_)
    ));
    // A stranger's release changes nothing; the holder's frees the key.
    s.release(k, &Lease::new()).await.unwrap();
    assert_eq!(
        s.begin(k, Duration::from_secs(30)).await.unwrap(),
        Begin::InFlight
    );
    s.release(k, &first).await.unwrap();
    assert_eq!(s.lease_remaining(k).await.unwrap(), None);
    // A short lease expires and is taken again; the old holder cannot free the new one.
    let Begin::Acquired(short) = s.begin(k, Duration::from_millis(300)).await.unwrap() else {
        panic!("a released key is acquired again");
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let Begin::Acquired(again) = s.begin(k, Duration::from_secs(30)).await.unwrap() else {
        panic!("an expired lease is taken again");
    };
    assert_ne!(again, short);
    s.release(k, &short).await.unwrap();
    assert_eq!(
        s.begin(k, Duration::from_secs(30)).await.unwrap(),
        Begin::InFlight
    );
    c.db.drop_case().await;
}

/// A completed key is done (for `begin` and for the inbox's look) whoever asks, until
/// cleaned up after its retention.
pub async fn completion_is_kept_for_the_retention(f: &dyn StoreFactory) {
    let c = open(f, "complete").await;
    let s = &c.inbox;
    let k = key("g", "2");
    assert!(!s.is_done(k).await.unwrap());
    let Begin::Acquired(lease) = s.begin(k, Duration::from_secs(30)).await.unwrap() else {
        panic!("a new key is acquired");
    };
    assert!(!s.is_done(k).await.unwrap(), "held is not done");
    s.complete(k, &lease).await.unwrap();
    assert_eq!(
        s.begin(k, Duration::from_secs(30)).await.unwrap(),
        Begin::AlreadyDone
    );
    assert!(s.is_done(k).await.unwrap());
    // Releasing after completion changes nothing; completing twice neither.
    s.release(k, &lease).await.unwrap();
    s.complete(k, &lease).await.unwrap();
    assert_eq!(
        s.begin(k, Duration::from_secs(30)).await.unwrap(),
        Begin::AlreadyDone
    );
    // Completing a key never begun (a lease lost to a database restart) marks it done.
    let lost = key("g", "never-begun");
    s.complete(lost, &Lease::new()).await.unwrap();
    assert!(s.is_done(lost).await.unwrap());
    c.db.drop_case().await;
}

/// The inbox `mark` commits or rolls back with the user's transaction, and a second mark
/// of the same key in a later transaction returns `false`.
pub async fn inbox_mark_commits_or_rolls_back_with_the_transaction(f: &dyn StoreFactory) {
    let c = open(f, "markrb").await;
    let k = key("g", "3");
    let mut tx = c.db.begin().await.unwrap();
    assert!(tx.mark(k).await.unwrap(), "a new key is marked");
    tx.effect("3").await.unwrap();
    tx.rollback().await.unwrap();
    assert!(
        !c.inbox.is_done(k).await.unwrap(),
        "a rolled back mark is gone"
    );
    assert_eq!(c.db.effects("3").await.unwrap(), 0);

    let mut tx = c.db.begin().await.unwrap();
    assert!(tx.mark(k).await.unwrap(), "marked again after the rollback");
    tx.effect("3").await.unwrap();
    tx.commit().await.unwrap();
    assert!(c.inbox.is_done(k).await.unwrap());
    assert_eq!(
        c.inbox.begin(k, Duration::from_secs(30)).await.unwrap(),
        Begin::AlreadyDone
    );

    let mut tx = c.db.begin().await.unwrap();
    assert!(
        !tx.mark(k).await.unwrap(),
        "a committed key is not marked twice"
    );
    tx.commit().await.unwrap();
    assert_eq!(c.db.effects("3").await.unwrap(), 1);
    c.db.drop_case().await;
}

/// Two transactions marking the same key at once: the second waits for the first and
/// loses if it commits, wins if it rolls back. One effect either way.
pub async fn racing_marks_make_one_effect(f: &dyn StoreFactory) {
    let c = Arc::new(open(f, "race").await);
    for first_commits in [true, false] {
        let k_owned = format!("race-{first_commits}");
        let k = key("g", &k_owned);
        let mut a = c.db.begin().await.unwrap();
        assert!(a.mark(k).await.unwrap());
        a.effect(&k_owned).await.unwrap();
        let second = {
            let c = c.clone();
            let k_owned = k_owned.clone();
            tokio::spawn(async move {
                let mut b = c.db.begin().await.unwrap();
                let won = b.mark(key("g", &k_owned)).await.unwrap();
                if won {
                    b.effect(&k_owned).await.unwrap();
                }
                b.commit().await.unwrap();
                won
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !second.is_finished(),
            "the second mark waits for the first transaction"
        );
        if first_commits {
            a.commit().await.unwrap();
        } else {
            a.rollback().await.unwrap();
        }
        let second_won = tokio::time::timeout(WAIT, second).await.unwrap().unwrap();
        assert_eq!(second_won, !first_commits);
        assert_eq!(c.db.effects(&k_owned).await.unwrap(), 1, "one effect");
    }
    c.db.drop_case().await;
}

/// A handler that marks in its transaction while the worker holds the key's lease:
/// the key is done, and the worker's `complete` afterwards changes nothing.
pub async fn inbox_mark_under_a_lease_completes_the_key(f: &dyn StoreFactory) {
    let c = open(f, "marklease").await;
    let k = key("g", "5");
    let Begin::Acquired(lease) = c.inbox.begin(k, Duration::from_secs(30)).await.unwrap() else {
        panic!("a new key is acquired");
    };
    let mut tx = c.db.begin().await.unwrap();
    assert!(
        tx.mark(k).await.unwrap(),
        "the lease's own delivery marks its key"
    );
    tx.commit().await.unwrap();
    c.inbox.complete(k, &lease).await.unwrap();
    c.inbox.release(k, &lease).await.unwrap();
    assert_eq!(
        c.inbox.begin(k, Duration::from_secs(30)).await.unwrap(),
        Begin::AlreadyDone
    );
    c.db.drop_case().await;
}

async fn enqueue_committed(c: &StoreCase, envs: &[Envelope]) {
    let mut tx = c.db.begin().await.unwrap();
    for e in envs {
        tx.enqueue(e.clone()).await.unwrap();
    }
    tx.commit().await.unwrap();
}

fn ids(rows: &[Claimed]) -> Vec<MessageId> {
    rows.iter().map(|c| c.envelope.id).collect()
}

/// Rows are claimed only once committed, in sequence order, with their envelope intact;
/// a claimed row is hidden from other claims until its lease ends; sent rows are done.
pub async fn outbox_rows_publish_after_commit_in_order(f: &dyn StoreFactory) {
    let c = open(f, "outbox").await;
    let o = &c.outbox;
    let mut tx = c.db.begin().await.unwrap();
    tx.enqueue(order(99)).await.unwrap();
    if c.features.concurrent_writers {
        assert!(
            o.claim(10, Duration::from_secs(30))
                .await
                .unwrap()
                .is_empty(),
            "uncommitted rows are not claimed"
        );
    }
    tx.rollback().await.unwrap();
    let envs: Vec<Envelope> = (1..=3)
        .map(|n| {
            order(n).with_header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
        })
        .collect();
    enqueue_committed(&c, &envs).await;
    let claimed = o.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        ids(&claimed),
        envs.iter().map(|e| e.id).collect::<Vec<_>>(),
        "in sequence order"
    );
    for (got, sent) in claimed.iter().zip(&envs) {
        assert_eq!(got.envelope.name, sent.name);
        assert_eq!(got.envelope.payload, sent.payload);
        assert_eq!(
            got.envelope.headers.get("traceparent"),
            sent.headers.get("traceparent")
        );
        assert_eq!(got.attempts, 0);
    }
    assert!(
        o.claim(10, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty(),
        "claimed rows are hidden"
    );
    if let Some(b) = o.backlog().await.unwrap() {
        assert_eq!(b.pending, 3, "claimed rows are still pending");
    }
    o.mark_sent(&ids(&claimed)[..2]).await.unwrap();
    o.delete_sent(&ids(&claimed)[2..]).await.unwrap();
    if let Some(Backlog { pending, .. }) = o.backlog().await.unwrap() {
        assert_eq!(pending, 0, "sent rows are not pending");
    }
    assert_eq!(
        o.purge_sent(Duration::from_secs(3600)).await.unwrap(),
        0,
        "kept for the retention"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(o.purge_sent(Duration::ZERO).await.unwrap() <= 2);
    c.db.drop_case().await;
}

/// A failed row is retried after its delay with its attempt counted; a parked row is
/// never claimed again, and blocks none behind it.
pub async fn failed_rows_retry_and_park(f: &dyn StoreFactory) {
    let c = open(f, "failed").await;
    let o = &c.outbox;
    let envs: Vec<Envelope> = (1..=3).map(order).collect();
    enqueue_committed(&c, &envs).await;
    let claimed = o.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let fail = |i: usize, park: bool| FailedRow {
        id: envs[i].id,
        error: format!("broker said no to {i}"),
        park,
        retry_after: Duration::ZERO,
    };
    o.mark_failed(&[fail(0, false), fail(1, true)])
        .await
        .unwrap();
    o.mark_sent(&[envs[2].id]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = o.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        ids(&again),
        [envs[0].id],
        "the failed row comes back; the parked one does not"
    );
    assert_eq!(again[0].attempts, 1);
    if let Some(b) = o.backlog().await.unwrap() {
        assert_eq!(b.pending, 1, "a parked row is not pending");
        assert_eq!(b.parked, 1, "the parked row is counted");
    }
    c.db.drop_case().await;
}

/// A claim whose relay died comes back when its lease ends.
pub async fn expired_claims_come_back(f: &dyn StoreFactory) {
    let c = open(f, "expired").await;
    let o = &c.outbox;
    enqueue_committed(&c, &[order(1), order(2)]).await;
    let first = o.claim(10, Duration::from_millis(300)).await.unwrap();
    assert_eq!(first.len(), 2);
    assert!(
        o.claim(10, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let again = o.claim(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        ids(&again),
        ids(&first),
        "the dead relay's rows are claimed again"
    );
    c.db.drop_case().await;
}

/// An outbox shared by relays: [`Relay::builder`] takes the source by value.
struct Shared(Arc<dyn OutboxSource>);

impl OutboxSource for Shared {
    fn backend(&self) -> &'static str {
        self.0.backend()
    }
    fn claim(
        &self,
        limit: usize,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Vec<Claimed>, StoreError>> {
        self.0.claim(limit, lease)
    }
    fn mark_sent<'a>(&'a self, ids: &'a [MessageId]) -> BoxFuture<'a, Result<(), StoreError>> {
        self.0.mark_sent(ids)
    }
    fn delete_sent<'a>(&'a self, ids: &'a [MessageId]) -> BoxFuture<'a, Result<(), StoreError>> {
        self.0.delete_sent(ids)
    }
    fn mark_failed<'a>(&'a self, rows: &'a [FailedRow]) -> BoxFuture<'a, Result<(), StoreError>> {
        self.0.mark_failed(rows)
    }
    fn purge_sent(&self, older_than: Duration) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.0.purge_sent(older_than)
    }
    fn backlog(&self) -> BoxFuture<'_, Result<Option<Backlog>, StoreError>> {
        self.0.backlog()
    }
    fn wait(&self, max: Duration) -> BoxFuture<'_, ()> {
        self.0.wait(max)
    }
    fn claim_held(
        &self,
        limit: usize,
        lease: Duration,
        delete: bool,
    ) -> Option<BoxFuture<'_, Result<HeldBatch, StoreError>>> {
        self.0.claim_held(limit, lease, delete)
    }
}

fn spawn_relay(
    c: &StoreCase,
    broker: &MemoryTransport,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    broker.bind("relayed", ["conformance.order"]);
    let relay = Relay::builder(Shared(c.outbox.clone()), Arc::new(broker.clone()))
        .batch_size(20)
        .poll_interval(Duration::from_millis(50))
        .build()
        .expect("a valid relay");
    let stop = CancellationToken::new();
    let s = stop.clone();
    (stop, tokio::spawn(relay.run_until(s.cancelled_owned())))
}

fn published_counts(broker: &MemoryTransport) -> HashMap<MessageId, usize> {
    let mut seen = HashMap::new();
    for e in broker.published() {
        *seen.entry(e.id).or_default() += 1;
    }
    seen
}

/// Three relays over one outbox while four producers commit: every row published once.
pub async fn several_relays_publish_each_row_once(f: &dyn StoreFactory) {
    let c = Arc::new(open(f, "relays").await);
    let broker = MemoryTransport::new();
    let relays: Vec<_> = (0..3).map(|_| spawn_relay(&c, &broker)).collect();
    let mut producers = Vec::new();
    for p in 0..4_u64 {
        let c = c.clone();
        producers.push(tokio::spawn(async move {
            for i in 0..25_u64 {
                enqueue_committed(&c, &[order(p * 1000 + i), order(p * 1000 + 500 + i)]).await;
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    wait_until("all 200 rows published", || async {
        published_counts(&broker).len() == 200
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let counts = published_counts(&broker);
    assert_eq!(counts.len(), 200);
    assert!(counts.values().all(|n| *n == 1), "no row published twice");
    for (stop, task) in relays {
        stop.cancel();
        task.await.unwrap();
    }
    c.db.drop_case().await;
}

/// A transaction that enqueued first and commits last (a lower sequence number than
/// rows already published) is still published: no cursor skips it.
pub async fn rows_committed_out_of_order_are_published(f: &dyn StoreFactory) {
    let c = open(f, "ooo").await;
    if !c.features.concurrent_writers {
        // One writer at a time: a transaction that wrote first also commits first.
        c.db.drop_case().await;
        return;
    }
    let broker = MemoryTransport::new();
    let (stop, task) = spawn_relay(&c, &broker);
    let early = order(1);
    let mut slow = c.db.begin().await.unwrap();
    slow.enqueue(early.clone()).await.unwrap();
    let late: Vec<Envelope> = (2..=5).map(order).collect();
    enqueue_committed(&c, &late).await;
    wait_until("the later rows are published", || async {
        let seen = published_counts(&broker);
        late.iter().all(|e| seen.contains_key(&e.id))
    })
    .await;
    assert!(
        !published_counts(&broker).contains_key(&early.id),
        "not before its commit"
    );
    slow.commit().await.unwrap();
    wait_until(
        "the early row is published after its late commit",
        || async { published_counts(&broker).contains_key(&early.id) },
    )
    .await;
    assert!(published_counts(&broker).values().all(|n| *n == 1));
    stop.cancel();
    task.await.unwrap();
    c.db.drop_case().await;
}

/// The payload's fingerprint is kept with its key, whether taken by `begin` or marked in
/// a transaction, and read back for comparison with a later delivery.
pub async fn payload_fingerprint_is_kept_with_the_key(f: &dyn StoreFactory) {
    let c = open(f, "fingerprint").await;
    let s = &c.inbox;
    let one = Fingerprint::of(b"{\"n\":1,\"cents\":100}");
    let two = Fingerprint::of(b"{\"n\":1,\"cents\":999}");
    assert_ne!(one, two);
    let k = key("g", "fp-lease").with_fingerprint(one);
    let Begin::Acquired(lease) = s.begin(k, Duration::from_secs(30)).await.unwrap() else {
        panic!("a new key is acquired");
    };
    assert_eq!(
        s.fingerprint(k).await.unwrap(),
        Some(one),
        "kept while held"
    );
    s.complete(k, &lease).await.unwrap();
    // The second delivery with another payload asks for it under its own fingerprint.
    let again = key("g", "fp-lease").with_fingerprint(two);
    assert_eq!(
        s.begin(again, Duration::from_secs(30)).await.unwrap(),
        Begin::AlreadyDone
    );
    assert_eq!(
        s.fingerprint(again).await.unwrap(),
        Some(one),
        "the first payload's stays"
    );

    let marked = key("g", "fp-mark").with_fingerprint(two);
    let mut tx = c.db.begin().await.unwrap();
    assert!(tx.mark(marked).await.unwrap());
    tx.commit().await.unwrap();
    assert_eq!(
        s.fingerprint(marked).await.unwrap(),
        Some(two),
        "kept by the inbox mark"
    );
    let bare = key("g", "fp-none");
    let mut tx = c.db.begin().await.unwrap();
    assert!(tx.mark(bare).await.unwrap());
    tx.commit().await.unwrap();
    assert_eq!(
        s.fingerprint(bare).await.unwrap(),
        None,
        "none given, none kept"
    );
    assert_eq!(s.fingerprint(key("g", "unknown")).await.unwrap(), None);
    c.db.drop_case().await;
}

/// An inbox shared with a worker: [`crate::worker::WorkerBuilder::idempotency`] takes
/// the store by value.
struct SharedInbox(Arc<dyn IdempotencyStore>);

impl IdempotencyStore for SharedInbox {
    fn begin<'a>(
        &'a self,
        key: Key<'a>,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Begin, StoreError>> {
        self.0.begin(key, lease)
    }
    fn complete<'a>(
        &'a self,
        key: Key<'a>,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.0.complete(key, lease)
    }
    fn release<'a>(
        &'a self,
        key: Key<'a>,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.0.release(key, lease)
    }
    fn is_done<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.0.is_done(key)
    }
    fn lease_remaining<'a>(
        &'a self,
        key: Key<'a>,
    ) -> BoxFuture<'a, Result<Option<Duration>, StoreError>> {
        self.0.lease_remaining(key)
    }
    fn fingerprint<'a>(
        &'a self,
        key: Key<'a>,
    ) -> BoxFuture<'a, Result<Option<Fingerprint>, StoreError>> {
        self.0.fingerprint(key)
    }
}

/// A charge keyed by its order: the key a producer might wrongly reuse.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Charge {
    order_id: u64,
    cents: u64,
}

impl crate::Message for Charge {
    const NAME: &'static str = "conformance.charge";

    fn idempotency_key(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some(self.order_id.to_string().into())
    }
}

/// A second message with a key already handled and another payload is flagged: acked as
/// the duplicate its key says by default, dead-lettered with a reason naming the key when
/// the worker is told to; the same payload again is a plain duplicate either way.
pub async fn payload_mismatch_is_flagged_by_the_worker(f: &dyn StoreFactory) {
    use crate::{Worker, idempotency::OnMismatch, testing::TestHarness, worker::Outcome};
    let c = open(f, "mismatch").await;
    for on in [OnMismatch::Warn, OnMismatch::DeadLetter] {
        let broker = MemoryTransport::new();
        let handled = Arc::new(AtomicU64::new(0));
        let h = handled.clone();
        let builder = Worker::builder(broker.clone(), format!("mismatch-{on:?}"))
            .handle(move |_: Charge, _cx: crate::Context| {
                h.fetch_add(1, Ordering::Relaxed);
                async { Ok(()) }
            })
            .idempotency(SharedInbox(c.inbox.clone()))
            .on_payload_mismatch(on);
        let harness = TestHarness::start(&broker, builder)
            .await
            .expect("a valid worker");
        let first = harness
            .publish(&Charge {
                order_id: 7,
                cents: 100,
            })
            .await
            .unwrap();
        harness.run_until_idle().await;
        let same = harness
            .publish(&Charge {
                order_id: 7,
                cents: 100,
            })
            .await
            .unwrap();
        harness.run_until_idle().await;
        let other = harness
            .publish(&Charge {
                order_id: 7,
                cents: 999,
            })
            .await
            .unwrap();
        let report = harness.run_until_idle().await;
        assert_eq!(
            handled.load(Ordering::Relaxed),
            1,
            "the handler ran once ({on:?})"
        );
        assert_eq!(report.outcomes(first), [Outcome::Acked]);
        assert_eq!(
            report.outcomes(same),
            [Outcome::Duplicate],
            "the same payload is a duplicate"
        );
        match on {
            OnMismatch::DeadLetter => {
                let dead = report
                    .dead_letter(other)
                    .expect("the reused key is dead-lettered");
                let reason = &dead.reason;
                assert!(
                    reason.contains("idempotency key `7`") && reason.contains("another payload"),
                    "{reason}"
                );
            }
            _ => assert_eq!(
                report.outcomes(other),
                [Outcome::Duplicate],
                "warned, then a duplicate"
            ),
        }
        harness.stop().await.unwrap();
    }
    c.db.drop_case().await;
}
