//! PostgreSQL outbox and relay.

use crate::common::*;
use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};
use steadfast::{
    Envelope,
    outbox::{HeldBatch, OutboxSource, PostgresOutbox, Relay},
    transport::{Transport, memory::MemoryTransport},
    worker::Outcome,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

fn relay(
    outbox: &PostgresOutbox,
    transport: Arc<dyn Transport>,
) -> steadfast::outbox::RelayBuilder {
    Relay::builder(outbox.clone(), transport)
        .poll_interval(Duration::from_millis(200))
        .batch_size(20)
}

fn spawn(relay: Relay) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let s = stop.clone();
    (stop, tokio::spawn(relay.run_until(s.cancelled_owned())))
}

/// `rows` distinct messages reached `broker`, none of them twice.
fn assert_each_published_once(broker: &MemoryTransport, rows: usize) {
    let mut seen: HashMap<_, usize> = HashMap::new();
    for e in broker.published() {
        *seen.entry(e.id).or_default() += 1;
    }
    assert_eq!(seen.len(), rows, "every row published");
    assert!(seen.values().all(|n| *n == 1), "a row was published twice");
}

async fn enqueue_orders(pg: &Pg, ids: impl IntoIterator<Item = i64>) -> Vec<Envelope> {
    let mut out = Vec::new();
    let mut tx = pg.pool.begin().await.unwrap();
    for id in ids {
        let env = order(id).with_header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        pg.outbox
            .enqueue_envelope(&mut tx, env.clone())
            .await
            .unwrap();
        out.push(env);
    }
    tx.commit().await.unwrap();
    out
}

#[tokio::test]
async fn rows_publish_after_commit_only_with_their_ids_and_trace_headers() {
    let pg = Pg::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    // A rolled-back transaction leaves nothing to publish.
    let mut tx = pg.pool.begin().await.unwrap();
    pg.outbox
        .enqueue(
            &mut tx,
            &OrderPlaced {
                order_id: 99,
                cents: 1,
            },
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let sent = enqueue_orders(&pg, 1..=3).await;
    let r = relay(&pg.outbox, Arc::new(broker.clone())).build().unwrap();
    let stats = r.run_once().await.unwrap();
    assert_eq!((stats.claimed, stats.sent), (3, 3));
    let got = broker.published();
    assert_eq!(
        got.iter().map(|e| e.id).collect::<Vec<_>>(),
        sent.iter().map(|e| e.id).collect::<Vec<_>>()
    );
    assert_eq!(
        got[0].headers.get("traceparent"),
        sent[0].headers.get("traceparent")
    );
    assert_eq!(got[0].payload, sent[0].payload);
    assert_eq!(pg.outbox.pending().await.unwrap(), 0);
    assert_eq!(
        r.run_once().await.unwrap().claimed,
        0,
        "sent rows are not claimed again"
    );
    // Sent rows go once their retention passed.
    let purged = steadfast::outbox::OutboxSource::purge_sent(&pg.outbox, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(purged, 3);
    pg.drop_schema().await;
}

#[tokio::test]
async fn listen_notify_wakes_the_relay_before_the_poll_interval() {
    let pg = Pg::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    let r = relay(&pg.outbox, Arc::new(broker.clone()))
        .poll_interval(Duration::from_secs(30))
        .build()
        .unwrap();
    let (stop, task) = spawn(r);
    tokio::time::sleep(Duration::from_millis(500)).await; // relay is listening
    enqueue_orders(&pg, [1]).await;
    // Far below the 30 s poll interval: only the notification can explain it.
    eventually(5, "notified relay published", || async {
        broker.published().len() == 1
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    pg.drop_schema().await;
}

#[tokio::test]
async fn relay_killed_after_confirm_before_mark_publishes_again_and_consumer_applies_once() {
    let pg = Pg::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    enqueue_orders(&pg, 1..=3).await;
    let confirmed = Arc::new(Notify::new());
    let hanging = Arc::new(HangAfterConfirm {
        inner: broker.clone(),
        armed: AtomicBool::new(true),
        confirmed: confirmed.clone(),
    });
    let lease = Duration::from_millis(800);
    let r1 = relay(&pg.outbox, hanging)
        .claim_lease(lease)
        .publish_timeout(Duration::from_millis(700))
        .build()
        .unwrap();
    let (_stop1, task1) = spawn(r1);
    tokio::time::timeout(Duration::from_secs(10), confirmed.notified())
        .await
        .unwrap();
    task1.abort(); // killed between the broker's confirm and marking the rows sent
    let _ = task1.await;
    assert_eq!(broker.published().len(), 3);
    assert_eq!(
        pg.outbox.pending().await.unwrap(),
        3,
        "nothing was marked sent"
    );

    let r2 = relay(&pg.outbox, Arc::new(broker.clone()))
        .claim_lease(lease)
        .publish_timeout(Duration::from_millis(700))
        .build()
        .unwrap();
    let (stop2, task2) = spawn(r2);
    eventually(10, "rows published again after the lease", || async {
        broker.published().len() == 6
    })
    .await;
    eventually(5, "rows marked sent", || async {
        pg.outbox.pending().await.unwrap() == 0
    })
    .await;

    let outcomes = Outcomes::default();
    let w = start_worker(
        Arc::new(broker.clone()),
        pg.billing(),
        pg.inbox.clone(),
        &outcomes,
        4,
    );
    // A copy that finds its twin's key held waits out the rest of the lease (decision
    // 0401), so allow more than one lease.
    eventually(30, "all six deliveries settled", || async {
        outcomes.count(|o| matches!(o, Outcome::Acked | Outcome::Duplicate)) == 6
    })
    .await;
    assert_eq!(outcomes.count(|o| *o == Outcome::Duplicate), 3);
    assert_eq!(pg.effects().await, (3, 3), "one effect per order");
    w.stop().await;
    stop2.cancel();
    task2.await.unwrap();
    pg.drop_schema().await;
}

#[tokio::test]
async fn eight_producers_committing_out_of_order_skip_no_row() {
    let pg = Pg::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    let r = relay(&pg.outbox, Arc::new(broker.clone()))
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let (stop, task) = spawn(r);
    let mut producers = Vec::new();
    for p in 0..8_i64 {
        let pool = pg.pool.clone();
        let outbox = pg.outbox.clone();
        producers.push(tokio::spawn(async move {
            for i in 0..20_i64 {
                let id = p * 1000 + i;
                let mut tx = pool.begin().await.unwrap();
                outbox
                    .enqueue(
                        &mut tx,
                        &OrderPlaced {
                            order_id: id,
                            cents: 1,
                        },
                    )
                    .await
                    .unwrap();
                // Early producers hold their (lower-numbered) rows longest, so rows
                // commit out of sequence order while the relay is sending later ones.
                let hold = ((8 - p) * 7 + (i % 5) * 11) as u64;
                tokio::time::sleep(Duration::from_millis(hold)).await;
                tx.commit().await.unwrap();
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    eventually(20, "all 160 rows published", || async {
        pg.outbox.pending().await.unwrap() == 0
    })
    .await;
    let got = broker.published();
    let names: HashSet<i64> = got
        .iter()
        .map(|e| {
            serde_json::from_slice::<OrderPlaced>(&e.payload)
                .unwrap()
                .order_id
        })
        .collect();
    assert_eq!(names.len(), 160, "every committed row was published");
    assert_eq!(got.len(), 160, "and each once");
    stop.cancel();
    task.await.unwrap();
    pg.drop_schema().await;
}

#[tokio::test]
async fn two_relays_publish_each_row_once() {
    let pg = Pg::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    enqueue_orders(&pg, 1..=400).await;
    let (s1, t1) = spawn(
        relay(&pg.outbox, Arc::new(broker.clone()))
            .batch_size(10)
            .build()
            .unwrap(),
    );
    let (s2, t2) = spawn(
        relay(&pg.outbox, Arc::new(broker.clone()))
            .batch_size(10)
            .build()
            .unwrap(),
    );
    eventually(20, "all rows sent", || async {
        pg.outbox.pending().await.unwrap() == 0
    })
    .await;
    assert_each_published_once(&broker, 400);
    s1.cancel();
    s2.cancel();
    t1.await.unwrap();
    t2.await.unwrap();
    pg.drop_schema().await;
}

#[tokio::test]
async fn batches_await_their_confirms_together_up_to_in_flight() {
    let pg = Pg::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    enqueue_orders(&pg, 1..=300).await;
    for (in_flight, start) in [(4_u32, 0), (1, 300)] {
        if start > 0 {
            enqueue_orders(&pg, start + 1..=start + 300).await;
        }
        let slow = Arc::new(SlowConfirms::new(
            broker.clone(),
            Duration::from_millis(150),
        ));
        let (stop, task) = spawn(
            relay(&pg.outbox, slow.clone())
                .batch_size(20)
                .in_flight(in_flight as usize)
                .build()
                .unwrap(),
        );
        eventually(30, "every row marked sent", || async {
            pg.outbox.pending().await.unwrap() == 0
        })
        .await;
        stop.cancel();
        task.await.unwrap();
        assert_eq!(
            slow.most.load(std::sync::atomic::Ordering::SeqCst),
            in_flight,
            "batches awaiting confirms at once"
        );
    }
    assert_each_published_once(&broker, 600);
    pg.drop_schema().await;
}

#[tokio::test]
async fn poison_rows_are_parked_with_their_reason_and_others_flow() {
    let pg = Pg::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    let mut tx = pg.pool.begin().await.unwrap();
    let unroutable = pg
        .outbox
        .enqueue_envelope(&mut tx, Envelope::new("nobody.listens", &b"{}"[..]))
        .await
        .unwrap();
    let oversize = pg
        .outbox
        .enqueue_envelope(&mut tx, Envelope::new("orders.placed", vec![b' '; 4096]))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    enqueue_orders(&pg, 1..=5).await;
    let r = relay(&pg.outbox, Arc::new(broker.clone()))
        .max_payload_bytes(1024)
        .max_attempts(3)
        .retry_delay(Duration::from_millis(20), Duration::from_millis(50))
        .poll_interval(Duration::from_millis(30))
        .build()
        .unwrap();
    let (stop, task) = spawn(r);
    eventually(10, "good rows published", || async {
        broker.published().len() == 5
    })
    .await;
    eventually(10, "poison rows parked", || async {
        pg.outbox.parked(10).await.unwrap().len() == 2
    })
    .await;
    let parked = pg.outbox.parked(10).await.unwrap();
    let by_id: HashMap<_, _> = parked.iter().map(|p| (p.id, p)).collect();
    assert_eq!(by_id[&unroutable].attempts, 3);
    assert!(
        by_id[&unroutable].error.contains("nobody.listens"),
        "{:?}",
        by_id[&unroutable]
    );
    assert!(
        by_id[&oversize].error.contains("exceeds"),
        "{:?}",
        by_id[&oversize]
    );
    assert_eq!(pg.outbox.pending().await.unwrap(), 0);
    // Once routable, an operator requeues it and it goes out.
    broker.bind("audit", ["nobody.listens"]);
    assert!(pg.outbox.requeue(unroutable).await.unwrap());
    eventually(10, "requeued row published", || async {
        broker.published().len() == 6
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    pg.drop_schema().await;
}

/// The outbox table's rows as (id, state), in sequence order.
async fn outbox_rows(pg: &Pg) -> Vec<(uuid::Uuid, String)> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, state FROM {} ORDER BY seq",
        pg.outbox.table()
    )))
    .fetch_all(&pg.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn zero_retention_deletes_confirmed_rows_and_keeps_failed_ones() {
    let pg = Pg::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    let mut tx = pg.pool.begin().await.unwrap();
    let unroutable = pg
        .outbox
        .enqueue_envelope(&mut tx, Envelope::new("nobody.listens", &b"{}"[..]))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let sent = enqueue_orders(&pg, 1..=5).await;
    let r = relay(&pg.outbox, Arc::new(broker.clone()))
        .retention(Duration::ZERO)
        .max_attempts(1)
        .build()
        .unwrap();
    let stats = r.run_once().await.unwrap();
    assert_eq!((stats.claimed, stats.sent, stats.parked), (6, 5, 1));
    assert_eq!(
        broker.published().iter().map(|e| e.id).collect::<Vec<_>>(),
        sent.iter().map(|e| e.id).collect::<Vec<_>>()
    );
    // The confirmed rows are gone at once; the parked one stays for an operator.
    assert_eq!(
        outbox_rows(&pg).await,
        vec![(*unroutable.as_uuid(), "parked".to_owned())]
    );
    // The default retention keeps sent rows (as `sent`) until they are purged.
    let kept = enqueue_orders(&pg, 6..=7).await;
    let r = relay(&pg.outbox, Arc::new(broker.clone())).build().unwrap();
    assert_eq!(r.run_once().await.unwrap().sent, 2);
    let rows = outbox_rows(&pg).await;
    assert_eq!(
        rows[1..],
        kept.iter()
            .map(|e| (*e.id.as_uuid(), "sent".to_owned()))
            .collect::<Vec<_>>()
    );
    pg.drop_schema().await;
}

/// One batch in flight, whose confirm takes 1.5 s; the next batch is claimed ahead at once
/// and would be published at 1.5 s with at most 1.5 s of its 3 s lease left — less than
/// the 2 s a publish may take — so it is not published on that claim. A leased claim
/// waits for its lease to end; a held one is released and claimed again at once.
async fn claimed_ahead_too_long(held: bool) {
    let pg = Pg::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    enqueue_orders(&pg, 1..=20).await;
    let slow = Arc::new(SlowConfirms::new(
        broker.clone(),
        Duration::from_millis(1500),
    ));
    let start = tokio::time::Instant::now();
    let (stop, task) = spawn(
        relay(&pg.outbox, slow)
            .hold_claims(held)
            .batch_size(10)
            .in_flight(1)
            .claim_lease(Duration::from_secs(3))
            .publish_timeout(Duration::from_secs(2))
            .poll_interval(Duration::from_millis(100))
            .build()
            .unwrap(),
    );
    tokio::time::sleep_until(start + Duration::from_millis(2250)).await;
    if held {
        assert_eq!(
            broker.published().len(),
            20,
            "the held batch claimed ahead was not released and claimed again at once"
        );
    } else {
        assert_eq!(
            broker.published().len(),
            10,
            "the batch claimed ahead went out with less than a publish timeout of lease left"
        );
    }
    eventually(15, "every row published", || async {
        pg.outbox.pending().await.unwrap() == 0
    })
    .await;
    assert_each_published_once(&broker, 20);
    stop.cancel();
    task.await.unwrap();
    pg.drop_schema().await;
}

#[tokio::test]
async fn a_leased_batch_claimed_ahead_waits_for_its_lease_when_too_little_is_left() {
    claimed_ahead_too_long(false).await;
}

#[tokio::test]
async fn a_held_batch_claimed_ahead_is_released_at_once_when_too_little_is_left() {
    claimed_ahead_too_long(true).await;
}

/// A held claim's rows are free again as soon as its batch is dropped, and when its
/// transaction stays idle past the lease (a hung relay): the server ends the session,
/// the next claim takes the rows, and the stale batch can no longer commit.
#[tokio::test]
async fn a_held_claim_frees_its_rows_when_dropped_or_idle_past_its_lease() {
    let pg = Pg::new().await;
    let rows: Vec<_> = enqueue_orders(&pg, 1..=5)
        .await
        .iter()
        .map(|e| e.id)
        .collect();
    let ids = |b: &HeldBatch| b.rows.iter().map(|c| c.envelope.id).collect::<Vec<_>>();
    let claim = |lease| pg.outbox.claim_held(10, lease, false).unwrap();

    let first = claim(Duration::from_secs(30)).await.unwrap();
    assert_eq!(ids(&first), rows);
    assert!(
        claim(Duration::from_secs(30))
            .await
            .unwrap()
            .rows
            .is_empty(),
        "rows held"
    );
    drop(first);
    eventually(5, "the dropped batch's rows claimable again", || async {
        ids(&claim(Duration::from_secs(30)).await.unwrap()) == rows
    })
    .await;

    // The batch that matched above was dropped in its turn: its rollback runs on its own
    // connection a moment later, so the claim may find the rows locked once or twice.
    let mut tries = 0;
    let hung = loop {
        let b = claim(Duration::from_millis(300)).await.unwrap();
        if ids(&b) == rows {
            break b;
        }
        drop(b);
        tries += 1;
        assert!(
            tries < 50,
            "the rows of a dropped batch were not freed in 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let next = claim(Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        ids(&next),
        rows,
        "the hung batch's session was ended, its rows freed"
    );
    assert!(
        hung.finish(&rows, &[]).await.is_err(),
        "a batch whose session ended cannot commit"
    );
    next.finish(&rows, &[]).await.unwrap();
    assert_eq!(pg.outbox.pending().await.unwrap(), 0);
    pg.drop_schema().await;
}

/// The held claim's session ends between the claim and the commit (the server restarted,
/// an operator ended it): the commit fails, and the relay records the confirmed batch by
/// id instead, so its rows are sent, each published once, not published again.
#[tokio::test]
async fn a_held_batch_whose_commit_fails_is_recorded_by_id() {
    let pg = Pg::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    let rows = enqueue_orders(&pg, 1..=5).await;
    let ending = Arc::new(EndsHeldSessions {
        inner: broker.clone(),
        pool: pg.pool.clone(),
        table: pg.outbox.table().to_owned(),
        ended: AtomicU32::new(0),
    });
    let r = relay(&pg.outbox, ending.clone()).build().unwrap();
    let stats = r.run_once().await.unwrap();
    assert_eq!(
        ending.ended.load(Ordering::SeqCst),
        1,
        "the held session was ended"
    );
    assert_eq!((stats.claimed, stats.sent), (5, 5));
    assert_eq!(
        pg.outbox.pending().await.unwrap(),
        0,
        "the rows were recorded by id"
    );
    assert_eq!(
        outbox_rows(&pg).await,
        rows.iter()
            .map(|e| (*e.id.as_uuid(), "sent".to_owned()))
            .collect::<Vec<_>>()
    );
    assert_each_published_once(&broker, 5);
    pg.drop_schema().await;
}

/// The outbox relayed to NATS JetStream: a row is published with `Nats-Msg-Id` = its id,
/// so a row published twice — its first relay killed after the PubAcks, before the
/// commit (here: a held batch published, then dropped) — is stored once in the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_to_jetstream_a_row_published_twice_is_stored_once() {
    use steadfast::transport::{Subscription, nats::NatsTransport};
    let pg = Pg::new().await;
    let u = uuid::Uuid::now_v7().simple().to_string();
    let nats = NatsTransport::builder("nats://127.0.0.1:4222")
        .subject_prefix(format!("sfo{u}"))
        .stream(format!("SFTEST_OUTBOX_{}", u.to_uppercase()))
        .max_age(Duration::from_secs(3600))
        .dead_letter_max_age(Duration::from_secs(3600))
        .connect()
        .await
        .expect("a nats-server with JetStream on 127.0.0.1:4222");
    nats.declare(&Subscription::new("billing", ["orders.placed"]))
        .await
        .unwrap();
    let nats = Arc::new(nats);
    let rows: Vec<_> = enqueue_orders(&pg, 1..=3)
        .await
        .iter()
        .map(|e| e.id)
        .collect();

    let first = pg
        .outbox
        .claim_held(10, Duration::from_secs(30), false)
        .unwrap()
        .await
        .unwrap();
    let envelopes: Vec<Envelope> = first.rows.iter().map(|c| c.envelope.clone()).collect();
    assert!(
        nats.publish_batch(&envelopes)
            .await
            .iter()
            .all(Result::is_ok)
    );
    drop(first); // the relay died before its commit: the rows are pending again

    let r = relay(&pg.outbox, nats.clone()).build().unwrap();
    let mut sent = 0;
    for _ in 0..50 {
        sent += r.run_once().await.unwrap().sent;
        if sent == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sent, 3, "the rows published again and recorded");
    assert_eq!(pg.outbox.pending().await.unwrap(), 0);

    let js =
        async_nats::jetstream::new(async_nats::connect("nats://127.0.0.1:4222").await.unwrap());
    let mut stream = js.get_stream(nats.stream_name()).await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        3,
        "each row stored once in the stream"
    );
    for (seq, id) in (1..=3).zip(&rows) {
        let m = stream.get_raw_message(seq).await.unwrap();
        assert_eq!(
            m.headers.get("Nats-Msg-Id").map(|v| v.as_str()),
            Some(id.to_string().as_str())
        );
    }
    let _ = js.delete_stream(nats.stream_name()).await;
    let _ = js.delete_stream(nats.dead_letter_stream_name()).await;
    nats.close().await;
    pg.drop_schema().await;
}

/// A log sink for one test: what `tracing` wrote while it was the default subscriber.
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The claim's plan needs the table's statistics (never analysed, each claim sorts every
/// pending row): `migrate` names the table in a warning when the server runs without
/// autovacuum, as this project's servers do, and says nothing of it when autovacuum runs.
#[tokio::test]
async fn migrate_warns_that_the_table_needs_analyze_when_autovacuum_is_off() {
    let pg = Pg::new().await;
    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    {
        let _guard = tracing::subscriber::set_default(subscriber);
        pg.outbox.migrate().await.unwrap();
    }
    let setting: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(&pg.pool)
        .await
        .unwrap();
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let warned = text
        .lines()
        .any(|l| l.contains("autovacuum is off") && l.contains(pg.outbox.table()));
    assert_eq!(
        warned,
        setting == "off",
        "autovacuum = {setting}, logs:\n{text}"
    );
    pg.drop_schema().await;
}
