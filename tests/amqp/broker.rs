//! What only a real broker shows: delays held in the delay-tier queues, a worker
//! process killed while its message waits there, a crash loop stopped by the delivery
//! limit, the dead-letter headers, unroutable publishes, reading dead letters without
//! changing the queue, and secrets kept out of errors.

use crate::support::{self, Running};
use lapin::{options::BasicGetOptions, types::AMQPValue};
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};
use steadfast::{
    Context, Envelope, HandlerError, Message, RetryPolicy, Worker,
    envelope::header,
    transport::{DeadLetterFilter, Health, Transport, TransportErrorKind, amqp::AmqpTransport},
    worker::Outcome,
};

#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "broker.task")]
pub(crate) struct Task {
    pub(crate) n: u64,
}

const CHILD_ENV: &str = "STEADFAST_AMQP_CHILD";

fn retry_policy() -> RetryPolicy {
    RetryPolicy::fixed(Duration::from_secs(2))
        .max_attempts(5)
        .jitter(0.0)
}

/// Not a test of its own: the entry point of the worker *process* the tests below
/// start and kill (`STEADFAST_AMQP_CHILD=fail|crash`). Without the variable it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_worker_process() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let name = std::env::var("SF_NAME").expect("SF_NAME");
    let limit: u32 = std::env::var("SF_LIMIT")
        .expect("SF_LIMIT")
        .parse()
        .unwrap();
    let t = support::transport_named(&name, limit).await;
    let crash = mode == "crash";
    let w = Running::start(
        Worker::builder(t, "g")
            .handle(move |_: Task, cx: Context| {
                println!("ATTEMPT {}", cx.attempt());
                async move {
                    if crash {
                        // Dies mid-handler, every time, like a segfault would.
                        std::process::abort();
                    }
                    Err::<(), _>(HandlerError::msg("always failing"))
                }
            })
            .retry(retry_policy()),
    )
    .await;
    loop {
        if let Some(p) = w.outcomes.lock().unwrap().last() {
            println!("OUTCOME {:?}", p.outcome);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A worker process, killed when dropped (a failing test leaves no orphan behind).
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(mode: &str, name: &str, limit: u32) -> ChildGuard {
    let child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "broker::child_worker_process", "--nocapture"])
        .env(CHILD_ENV, mode)
        .env("SF_NAME", name)
        .env("SF_LIMIT", limit.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the worker process");
    ChildGuard(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_loses_nothing_and_the_next_continues_the_count() {
    let name = support::unique("killed");
    let t = support::transport_named(&name, 20).await;
    // Declare with the child's policy, so the message waits in the 2 s tier.
    Worker::builder(t.clone(), "g")
        .handle(|_: Task, _cx: Context| async { Ok(()) })
        .retry(retry_policy())
        .build()
        .unwrap()
        .declare()
        .await
        .unwrap();
    let env = Envelope::encode(&Task { n: 1 }).unwrap();
    t.publish(&env).await.unwrap();

    let mut child = spawn_child("fail", &name, 20);
    let out = child.0.stdout.take().unwrap();
    let retried = tokio::task::spawn_blocking(move || {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.starts_with("OUTCOME Retried"))
    });
    let retried = tokio::time::timeout(Duration::from_secs(30), retried)
        .await
        .expect("the child retried in time")
        .unwrap();
    assert!(retried, "the child reported its retry");
    child.0.kill().expect("SIGKILL the worker");
    let _ = child.0.wait();

    // The copy waits in the broker's delay tier, not in the dead process.
    let (_conn, ch) = support::raw_channel().await;
    let tier = format!("{}.delay.2000ms", t.queue_name("g"));
    assert_eq!(
        support::ready(&ch, &tier).await,
        1,
        "held by the delay queue"
    );
    assert_eq!(support::ready(&ch, &t.queue_name("g")).await, 0);

    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = attempts.clone();
    let w = Running::start(
        Worker::builder(t.clone(), "g")
            .handle(move |_: Task, cx: Context| {
                seen.lock().unwrap().push(cx.attempt());
                async { Ok(()) }
            })
            .retry(retry_policy()),
    )
    .await;
    let a = attempts.clone();
    support::wait_for(
        "the next worker handled it",
        Duration::from_secs(15),
        || !a.lock().unwrap().is_empty(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        *attempts.lock().unwrap(),
        [2],
        "attempt count continued, once"
    );
    assert!(t.dead_letters("g", 10).await.unwrap().is_empty());
    w.stop().await;
    t.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_is_stopped_by_the_delivery_limit() {
    let name = support::unique("crash");
    let t = support::transport_named(&name, 2).await;
    Worker::builder(t.clone(), "g")
        .handle(|_: Task, _cx: Context| async { Ok(()) })
        .retry(retry_policy())
        .build()
        .unwrap()
        .declare()
        .await
        .unwrap();
    let env = Envelope::encode(&Task { n: 7 }).unwrap();
    t.publish(&env).await.unwrap();
    let mut runs = 0;
    let dl = loop {
        let list = t.dead_letters("g", 10).await.unwrap();
        if let Some(d) = list.into_iter().next() {
            break d;
        }
        assert!(runs < 8, "still not dead-lettered after {runs} crashes");
        runs += 1;
        let mut child = spawn_child("crash", &name, 2);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        // The worker that finds the crash limit reached dead-letters it and lives.
        let status = loop {
            if let Some(s) = child.0.try_wait().expect("child status") {
                break Some(s);
            }
            if !t.dead_letters("g", 10).await.unwrap().is_empty() {
                break None;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the worker process neither crashed on the message nor dead-lettered it"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            status.is_none_or(|s| !s.success()),
            "the worker process crashed"
        );
    };
    eprintln!(
        "dead-lettered after {runs} crashed worker processes: {}",
        dl.reason
    );
    assert!(runs >= 2, "the limit of 2 allowed at least two deliveries");
    assert_eq!(dl.id(), env.id);
    assert!(dl.reason.starts_with("crash loop"), "reason: {}", dl.reason);
    assert_eq!(&dl.envelope.payload[..], &env.payload[..]);
    assert!(
        dl.original_destination.starts_with(&name),
        "{}",
        dl.original_destination
    );
    assert!(!dl.failed_at.is_empty());
    t.close().await;
}

/// A work queue declared by a version before crash attribution has `x-delivery-limit`
/// 20, which RabbitMQ will not change on redeclaration: the worker keeps it (no
/// `PRECONDITION_FAILED`), consumes from it, and declares the suspects queue beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_queue_with_an_earlier_delivery_limit_is_kept() {
    use lapin::{
        options::QueueDeclareOptions,
        types::{FieldTable, LongString, ShortString},
    };
    let name = support::unique("oldlimit");
    let (_conn, ch) = support::raw_channel().await;
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    let args = |limit: i64| {
        let mut args = FieldTable::default();
        for (k, v) in [
            ("x-queue-type", text("quorum")),
            ("x-dead-letter-strategy", text("at-least-once")),
            ("x-overflow", text("reject-publish")),
            ("x-queue-leader-locator", text("balanced")),
            ("x-delivery-limit", AMQPValue::LongLongInt(limit)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(&format!("{name}.g.dlq"))),
            ("x-expires", AMQPValue::LongLongInt(300_000)),
        ] {
            args.insert(ShortString::from(k), v);
        }
        args
    };
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let queue = format!("{name}.g");
    ch.queue_declare(queue.as_str().into(), durable, args(20))
        .await
        .expect("the queue as an earlier version declared it");
    {
        // The broker refuses another limit (3.10 and 4.0.5 alike): what the worker meets.
        let (_c, other) = support::raw_channel().await;
        let refused = other
            .queue_declare(queue.as_str().into(), durable, args(1_000))
            .await
            .expect_err("RabbitMQ does not change a queue's x-delivery-limit");
        assert!(
            refused.to_string().contains("'x-delivery-limit'"),
            "{refused}"
        );
    }
    let t = support::transport_named(&name, 20).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let w = Running::start(
        Worker::builder(t.clone(), "g").handle(move |m: Task, _cx: Context| {
            s.lock().unwrap().push(m.n);
            async { Ok(()) }
        }),
    )
    .await;
    t.publish(&Envelope::encode(&Task { n: 3 }).unwrap())
        .await
        .unwrap();
    let s = seen.clone();
    support::wait_for("handled", Duration::from_secs(15), || {
        !s.lock().unwrap().is_empty()
    })
    .await;
    ch.queue_declare(
        format!("{name}.g.suspects").as_str().into(),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("the suspects queue was declared");
    w.stop().await;
    t.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_wait_in_the_delay_tier_queue() {
    let t = support::transport("delay").await;
    let w = Running::start(
        Worker::builder(t.clone(), "g")
            .handle(|_: Task, cx: Context| async move {
                if cx.attempt() == 1 {
                    Err(HandlerError::msg("not yet"))
                } else {
                    Ok(())
                }
            })
            .retry(RetryPolicy::fixed(Duration::from_millis(1500)).jitter(0.0)),
    )
    .await;
    t.publish(&Envelope::encode(&Task { n: 1 }).unwrap())
        .await
        .unwrap();
    let outcomes = w.outcomes.clone();
    support::wait_for("the first attempt retried", Duration::from_secs(10), || {
        !outcomes.lock().unwrap().is_empty()
    })
    .await;
    let (_conn, ch) = support::raw_channel().await;
    let tier = format!("{}.delay.1500ms", t.queue_name("g"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        support::ready(&ch, &tier).await,
        1,
        "the broker holds the delay"
    );
    support::wait_for("the second attempt acked", Duration::from_secs(10), || {
        w.count() == 2
    })
    .await;
    assert_eq!(w.outcomes.lock().unwrap()[1].outcome, Outcome::Acked);
    assert_eq!(support::ready(&ch, &tier).await, 0);
    w.stop().await;
    t.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_carry_every_header_and_reading_them_changes_nothing() {
    let t = support::transport("dlq").await;
    let w = Running::start(
        Worker::builder(t.clone(), "g").handle(|_: Task, _cx: Context| async {
            Err::<(), _>(HandlerError::msg("bad task").permanent())
        }),
    )
    .await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let env = Envelope::encode(&Task { n })
            .unwrap()
            .with_header("traceparent", format!("00-{n:032x}-{n:016x}-01"));
        t.publish(&env).await.unwrap();
        ids.push(env.id);
    }
    let outcomes = w.outcomes.clone();
    support::wait_for("five dead letters", Duration::from_secs(10), || {
        outcomes.lock().unwrap().len() == 5
    })
    .await;
    w.stop().await;
    // Read twice: same entries, same order, none removed.
    let first = t.dead_letters("g", 100).await.unwrap();
    let second = t.dead_letters("g", 3).await.unwrap();
    let order: Vec<_> = first.iter().map(|d| d.id()).collect();
    let mut sorted = order.clone();
    sorted.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(sorted, want, "every dead letter read");
    assert_eq!(
        second.iter().map(|d| d.id()).collect::<Vec<_>>(),
        order[..3],
        "a second read sees the same order"
    );
    let third = t.dead_letters("g", 100).await.unwrap();
    assert_eq!(third.iter().map(|d| d.id()).collect::<Vec<_>>(), order);
    let (_conn, ch) = support::raw_channel().await;
    let dlq = t.dead_letter_queue_name("g");
    assert_eq!(
        support::ready(&ch, &dlq).await,
        5,
        "reading removed nothing"
    );
    let d = &first[0];
    assert_eq!(d.reason, "bad task");
    assert_eq!(d.attempts, 1);
    assert_eq!(
        d.original_destination,
        format!("{}/broker.task", t.exchange())
    );
    assert!(
        d.envelope.headers.get("traceparent").is_some(),
        "original headers kept"
    );
    // The raw message carries all the framework's headers. (A quorum dead-letter queue
    // puts what a read returned at its back, so its head is any of the five.)
    let m = ch
        .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("a dead letter");
    let h = m.delivery.properties.headers().clone().unwrap();
    for k in [
        header::DEAD_LETTER_REASON,
        header::ERROR_KIND,
        header::ATTEMPTS,
        header::FAILED_AT,
        header::ORIGINAL_DESTINATION,
        header::ORIGINAL_GROUP,
        header::ATTEMPT,
        "cloudEvents:id",
        "cloudEvents:type",
        "traceparent",
    ] {
        assert!(h.inner().contains_key(k), "dead letter lacks `{k}`");
    }
    assert_eq!(
        h.inner().get(header::ORIGINAL_GROUP),
        Some(&AMQPValue::LongString("g".into()))
    );
    assert_eq!(m.delivery.properties.delivery_mode(), &Some(2));
    let raw_id = m
        .delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string());
    assert!(
        order.iter().any(|id| Some(id.to_string()) == raw_id),
        "{raw_id:?} is one of the dead letters"
    );
    t.close().await;
}

/// A read takes the dead letters with consumers whose windows grow (256, 512, 1,024, …):
/// 1,500 span several. Nothing is acked by a read, a read that stops early or finds
/// fewer ready than it counted ends, and a purge across the windows removes exactly its
/// selection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_reads_span_windows_ack_nothing_and_purge_only_the_selection() {
    const N: u64 = 1500;
    let t = support::transport("dlqwin").await;
    let w = Running::start(
        Worker::builder(t.clone(), "g")
            .handle(|_: Task, _cx: Context| async {
                Err::<(), _>(HandlerError::msg("bad task").permanent())
            })
            .concurrency(64),
    )
    .await;
    let batch: Vec<Envelope> = (0..N)
        .map(|n| Envelope::encode(&Task { n }).unwrap())
        .collect();
    for r in t.publish_batch(&batch).await {
        r.unwrap();
    }
    let outcomes = w.outcomes.clone();
    support::wait_for(
        "every message dead-lettered",
        Duration::from_secs(60),
        || outcomes.lock().unwrap().len() == N as usize,
    )
    .await;
    w.stop().await;
    let (_conn, ch) = support::raw_channel().await;
    let dlq = t.dead_letter_queue_name("g");
    assert_eq!(support::ready(&ch, &dlq).await, N as u32);
    // Stopped early by the visitor.
    let mut seen = 0;
    let mut visit = |_| {
        seen += 1;
        seen < 300
    };
    t.scan_dead_letters("g", &mut visit).await.unwrap();
    assert_eq!(seen, 300);
    support::wait_for_async("the early stop's messages back", || {
        let ch = ch.clone();
        let dlq = dlq.clone();
        async move { support::ready(&ch, &dlq).await == N as u32 }
    })
    .await;
    // A full read: every dead letter once, none removed.
    let all = t.dead_letters("g", usize::MAX).await.unwrap();
    let ids: std::collections::HashSet<_> = all.iter().map(|d| d.id()).collect();
    let want: std::collections::HashSet<_> = batch.iter().map(|e| e.id).collect();
    assert_eq!(all.len(), N as usize);
    assert_eq!(ids, want, "every dead letter read once");
    support::wait_for_async("the read's messages back", || {
        let ch = ch.clone();
        let dlq = dlq.clone();
        async move { support::ready(&ch, &dlq).await == N as u32 }
    })
    .await;
    // Another channel takes 100 while a read runs: the read finds 1,400 and ends.
    let (_other, holder) = support::raw_channel().await;
    let (go, started) = tokio::sync::oneshot::channel::<()>();
    let (took, taken) = std::sync::mpsc::channel::<()>();
    let take = {
        let (holder, dlq) = (holder.clone(), dlq.clone());
        tokio::spawn(async move {
            started.await.unwrap();
            for _ in 0..100 {
                holder
                    .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
                    .await
                    .unwrap()
                    .expect("a dead letter");
            }
            took.send(()).unwrap();
        })
    };
    let mut go = Some(go);
    let mut read = 0u64;
    let count = &mut read;
    let mut visit = move |_| {
        if let Some(go) = go.take() {
            go.send(()).unwrap();
            taken.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        *count += 1;
        true
    };
    let at = std::time::Instant::now();
    t.scan_dead_letters("g", &mut visit).await.unwrap();
    assert_eq!(read, N - 100);
    assert!(at.elapsed() < Duration::from_secs(15), "{:?}", at.elapsed());
    take.await.unwrap();
    holder.close(200, "OK".into()).await.unwrap();
    support::wait_for_async("the held messages back", || {
        let ch = ch.clone();
        let dlq = dlq.clone();
        async move { support::ready(&ch, &dlq).await == N as u32 }
    })
    .await;
    // A purge of every third one, spread over every window.
    let mut f = DeadLetterFilter::default();
    for e in batch.iter().step_by(3) {
        f = f.id(e.id);
    }
    let report = t.purge_dead_letters("g", &f, &|_| {}).await.unwrap();
    assert_eq!((report.selected, report.done), (500, 500), "{report:?}");
    let left: std::collections::HashSet<_> = t
        .dead_letters("g", usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|d| d.id())
        .collect();
    let kept: std::collections::HashSet<_> = batch
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(_, e)| e.id)
        .collect();
    assert_eq!(left, kept, "exactly the selection purged");
    t.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_publish_is_an_error() {
    let t = support::transport("unroutable").await;
    let e = t
        .publish(&Envelope::new("nobody.listens", &b"{}"[..]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), TransportErrorKind::Unroutable, "{e}");
    // The channel survives: a routable publish still works.
    Worker::builder(t.clone(), "g")
        .handle(|_: Task, _cx: Context| async { Ok(()) })
        .build()
        .unwrap()
        .declare()
        .await
        .unwrap();
    t.publish(&Envelope::encode(&Task { n: 1 }).unwrap())
        .await
        .unwrap();
    let batch = [
        Envelope::encode(&Task { n: 2 }).unwrap(),
        Envelope::new("nobody.listens", &b"{}"[..]),
        Envelope::encode(&Task { n: 3 }).unwrap(),
    ];
    let r = t.publish_batch(&batch).await;
    assert!(r[0].is_ok() && r[2].is_ok());
    assert_eq!(
        r[1].as_ref().unwrap_err().kind(),
        TransportErrorKind::Unroutable
    );
    assert!(t.is_connected());
    assert_eq!(t.health(), Health::Connected);
    t.close().await;
    assert_eq!(t.health(), Health::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_appear_in_errors_or_debug() {
    let canary = "canary-Pa55word-0xDEADBEEF";
    let mut broker = url::Url::parse(&support::url()).expect("AMQP_URL");
    broker.set_password(Some(canary)).expect("a password");
    let bad = broker.to_string();
    let e = AmqpTransport::connect(&bad).await.unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(!text.contains(canary), "{text}");
    // Several nodes, none taking the password: the error names each, without it.
    let nodes = format!("{bad},amqp://guest:{canary}@127.0.0.1:1/%2f");
    let e = AmqpTransport::builder(nodes.as_str())
        .operation_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(!text.contains(canary), "{text}");
    assert!(text.contains("127.0.0.1:1"), "each node is named: {text}");
    let refused = format!("amqp://guest:{canary}@127.0.0.1:1/%2f");
    let e = AmqpTransport::builder(refused.as_str())
        .operation_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(!text.contains(canary), "{text}");
    assert_eq!(e.kind(), TransportErrorKind::Connection);
    let builder = AmqpTransport::builder(bad.as_str());
    assert!(!format!("{builder:?}").contains(canary));
    let t = support::transport("debug").await;
    let shown = format!("{t:?}");
    assert!(
        shown.contains("***") && !shown.contains("guest:guest"),
        "{shown}"
    );
    t.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_after_the_stream_is_dropped_still_acks() {
    use futures::StreamExt;
    use steadfast::{Disposition, transport::Subscription};
    let t = support::transport("graceful");
    let t = t.await;
    let mut sub = Subscription::new("g", [Task::NAME]);
    sub.prefetch = 10;
    let mut stream = t.subscribe(&sub).await.unwrap();
    let (_conn, ch) = support::raw_channel().await;
    let q = t.queue_name("g");
    for n in 0..3 {
        t.publish(&Envelope::encode(&Task { n }).unwrap())
            .await
            .unwrap();
    }
    let first = stream.next().await.unwrap().unwrap();
    let second = stream.next().await.unwrap().unwrap();
    // Stop intake with two deliveries in hand and the third waiting in the stream. Its
    // requeue must wait for the consumer's cancel: requeued before, RabbitMQ may hand it
    // back to the consumer being cancelled, after `cancel-ok`, where the client drops it
    // and it comes back only with the channel, as an unexplained return (a suspect, which
    // this stream would never see).
    support::wait_for_async("the third delivery in the stream", || async {
        support::ready(&ch, &q).await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(stream);
    tokio::time::sleep(Duration::from_millis(200)).await;
    first
        .settle(Disposition::Ack)
        .await
        .expect("acked on the kept channel");
    drop(second); // dropped unsettled: back to the queue
    support::wait_for_async("two messages back in the queue", || async {
        support::ready(&ch, &q).await == 2
    })
    .await;
    // A new subscription gets exactly those two.
    let mut stream = t.subscribe(&sub).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("redelivered to this stream, not moved to the suspects queue")
            .unwrap()
            .unwrap();
        got.push(
            serde_json::from_slice::<Task>(&d.envelope.payload)
                .unwrap()
                .n,
        );
        d.settle(Disposition::Ack).await.unwrap();
    }
    got.sort_unstable();
    assert_eq!(got, [1, 2]);
    drop(stream);
    t.close().await;
}

/// A subscription set to two consumer channels consumes on both, its prefetch split
/// between them; every ack goes out for bursts of 1 to 120 messages and for settles
/// trickling in 2 ms apart (nothing comes back to the next consumer); a subscription
/// with a prefetch of 1 keeps one channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumer_channels_ack_every_burst_and_a_prefetch_of_one_keeps_one() {
    use futures::{StreamExt, stream::FuturesUnordered};
    use steadfast::{Disposition, transport::Subscription};
    let name = support::unique("channels");
    let t = AmqpTransport::builder(support::url())
        .exchange(name.as_str())
        .queue_prefix(format!("{name}."))
        .queue_expiry(Duration::from_secs(300))
        .consumer_channels(2)
        .connect()
        .await
        .expect("RabbitMQ on AMQP_URL");
    let mut sub = Subscription::new("g", [Task::NAME]);
    sub.prefetch = 100;
    let mut stream = t.subscribe(&sub).await.unwrap();
    let (_conn, ch) = support::raw_channel().await;
    let q = t.queue_name("g");
    assert_eq!(support::consumers(&ch, &q).await, 2);
    let mut next = 0u64;
    let mut seen = Vec::new();
    for burst in [1usize, 7, 24, 25, 26, 49, 120] {
        let batch: Vec<_> = (next..next + burst as u64)
            .map(|n| Envelope::encode(&Task { n }).unwrap())
            .collect();
        next += burst as u64;
        for r in t.publish_batch(&batch).await {
            r.unwrap();
        }
        // Settled concurrently, as a worker does.
        let mut settles = FuturesUnordered::new();
        let mut got = 0;
        let taken = tokio::time::timeout(Duration::from_secs(10), async {
            while got < burst {
                tokio::select! {
                    d = stream.next() => {
                        let d = d.expect("stream open").expect("delivery");
                        seen.push(serde_json::from_slice::<Task>(&d.envelope.payload).unwrap().n);
                        got += 1;
                        settles.push(d.settle(Disposition::Ack));
                    }
                    Some(r) = settles.next() => r.expect("acked"),
                }
            }
            while let Some(r) = settles.next().await {
                r.expect("acked");
            }
        })
        .await;
        assert!(
            taken.is_ok(),
            "a burst of {burst} was not all settled in 10 s"
        );
    }
    // A trickle: settles one at a time, 2 ms apart, so that acks arrive while the
    // flusher is sending the one before (timer-driven, below a batch). Each must still
    // go out without waiting for a batch that never completes.
    let trickle = 150u64;
    let batch: Vec<_> = (next..next + trickle)
        .map(|n| Envelope::encode(&Task { n }).unwrap())
        .collect();
    next += trickle;
    for r in t.publish_batch(&batch).await {
        r.unwrap();
    }
    let mut settles = FuturesUnordered::new();
    for _ in 0..trickle {
        let d = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("trickle delivered")
            .unwrap()
            .unwrap();
        seen.push(
            serde_json::from_slice::<Task>(&d.envelope.payload)
                .unwrap()
                .n,
        );
        settles.push(tokio::spawn(d.settle(Disposition::Ack)));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let done = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(r) = settles.next().await {
            r.unwrap().expect("acked");
        }
    })
    .await;
    assert!(done.is_ok(), "trickled acks were left unsent");
    drop(stream);
    seen.sort_unstable();
    assert_eq!(seen, (0..next).collect::<Vec<_>>(), "each message once");
    // Every ack reached the broker: nothing comes back to a new consumer.
    assert_eq!(support::ready(&ch, &q).await, 0);
    let mut again = t.subscribe(&sub).await.unwrap();
    let redelivered = tokio::time::timeout(Duration::from_secs(2), again.next()).await;
    assert!(
        redelivered.is_err(),
        "a message came back: its ack was never sent"
    );
    drop(again);

    let mut one = Subscription::new("h", [Task::NAME]);
    one.prefetch = 1;
    let stream = t.subscribe(&one).await.unwrap();
    assert_eq!(support::consumers(&ch, &t.queue_name("h")).await, 1);
    drop(stream);
    t.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_work_queues_retry_through_quorum_delay_queues() {
    let name = support::unique("classic");
    let t = AmqpTransport::builder(support::url())
        .exchange(name.clone())
        .queue_prefix(format!("{name}."))
        .queue_type(steadfast::transport::amqp::QueueType::Classic)
        .queue_expiry(Duration::from_secs(300))
        .connect()
        .await
        .unwrap();
    let w = Running::start(
        Worker::builder(t.clone(), "g")
            .handle(|_: Task, cx: Context| async move {
                if cx.attempt() < 2 {
                    Err(HandlerError::msg("once more"))
                } else {
                    Ok(())
                }
            })
            .retry(RetryPolicy::fixed(Duration::from_millis(200)).jitter(0.0)),
    )
    .await;
    t.publish(&Envelope::encode(&Task { n: 1 }).unwrap())
        .await
        .unwrap();
    let o = w.outcomes.clone();
    support::wait_for("acked on attempt 2", Duration::from_secs(10), || {
        o.lock()
            .unwrap()
            .iter()
            .any(|p| p.outcome == Outcome::Acked && p.attempt == 2)
    })
    .await;
    w.stop().await;
    t.close().await;
}

/// With `queue_expiry`, a group's queues stay while its worker runs, with their
/// messages. RabbitMQ counts consumers and `basic.get` as use, not publishing, and a
/// declaration does not renew a quorum queue's lease: the dead-letter and delay queues,
/// which a worker only publishes to, expired under it with their dead letters (retries
/// and dead letters unroutable, the messages redelivered for ever). A dead letter made
/// before three expiries is still in its queue after them, and a retry and a dead letter
/// after them go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_queues_stay_while_their_worker_runs() {
    let name = support::unique("expiry");
    let t = AmqpTransport::builder(support::url())
        .exchange(&name)
        .queue_prefix(format!("{name}."))
        .queue_expiry(Duration::from_secs(2))
        .connect()
        .await
        .expect("RabbitMQ must be running on AMQP_URL");
    let w = Running::start(
        Worker::builder(t.clone(), "g")
            .handle(|m: Task, cx: Context| async move {
                match m.n % 10 {
                    1 if cx.attempt() == 1 => Err(HandlerError::msg("not yet")),
                    2 => Err(HandlerError::msg("never").permanent()),
                    _ => Ok(()),
                }
            })
            .retry(RetryPolicy::fixed(Duration::from_millis(500)).jitter(0.0)),
    )
    .await;
    let (_conn, ch) = support::raw_channel().await;
    let dlq = format!("{}.dlq", t.queue_name("g"));
    let outcomes = w.outcomes.clone();
    for (round, wait) in [(0u64, 0u64), (10, 7)] {
        tokio::time::sleep(Duration::from_secs(wait)).await;
        for n in [round + 1, round + 2] {
            t.publish(&Envelope::encode(&Task { n }).unwrap())
                .await
                .expect("the work queue is still there");
        }
        let want = 3 * (round as usize / 10 + 1);
        support::wait_for("a retry and a dead letter", Duration::from_secs(20), || {
            outcomes.lock().unwrap().len() >= want
        })
        .await;
    }
    let seen: Vec<_> = outcomes
        .lock()
        .unwrap()
        .iter()
        .map(|p| (p.attempt, p.outcome.clone()))
        .collect();
    let count = |f: &dyn Fn(&(u32, Outcome)) -> bool| seen.iter().filter(|s| f(s)).count();
    assert_eq!(
        (
            count(&|(a, o)| *a == 1 && matches!(o, Outcome::Retried { .. })),
            count(&|(a, o)| *a == 2 && *o == Outcome::Acked),
            count(&|(_, o)| matches!(o, Outcome::DeadLettered(_))),
            seen.len(),
        ),
        (2, 2, 2, 6),
        "each round: retried then acked, and dead-lettered, nothing unsettled: {seen:?}"
    );
    // A message the worker has just taken and requeued to keep the queue in use is
    // counted again a moment later.
    support::wait_for_async(
        "the dead letter from before the expiries still there, beside the new one",
        || {
            let (ch, dlq) = (&ch, &dlq);
            async move { support::ready(ch, dlq).await == 2 }
        },
    )
    .await;
    w.stop().await;
    t.close().await;
}
