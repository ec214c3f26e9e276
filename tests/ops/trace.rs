//! A producer's trace context becomes the parent of the worker's `process` span, through
//! RabbitMQ and through NATS: spans are collected by an in-memory exporter.

use crate::support::{AMQP_URL, remove_topology, unique};
use futures::future::BoxFuture;
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{SdkTracerProvider, SpanData, SpanExporter},
};
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use steadfast::{
    Context, Envelope, HandlerError, Message, Worker,
    outbox::{OutboxSource, Relay, SqliteOutbox},
    transport::{Transport, amqp::AmqpTransport, memory::MemoryTransport, nats::NatsTransport},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "traced.requested")]
struct Traced {
    n: u64,
}

/// Keeps every finished span.
#[derive(Debug, Clone, Default)]
struct Collect(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collect {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

/// An in-memory exporter behind the `tracing` subscriber of this thread, with the W3C
/// propagator.
fn collecting() -> (
    Collect,
    SdkTracerProvider,
    tracing::subscriber::DefaultGuard,
) {
    let spans = Collect::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("ops-test")));
    let guard = tracing::subscriber::set_default(subscriber);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    (spans, provider, guard)
}

/// Has `produce` send one message from inside a producer span, runs a worker until the
/// handler saw it, and returns the producer's ids, the `traceparent` the handler saw and
/// every exported span.
async fn round_trip(
    transport: Arc<dyn Transport>,
    group: &str,
    produce: impl AsyncFnOnce(Arc<dyn Transport>, tracing::Span),
) -> ((TraceId, SpanId), Option<String>, Vec<SpanData>) {
    let (spans, provider, _guard) = collecting();

    let (tx, mut rx) = mpsc::unbounded_channel::<Option<String>>();
    let worker = Worker::builder_shared(transport.clone(), group)
        .handle(move |_: Traced, cx: Context| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(cx.headers().get("traceparent").map(str::to_owned));
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .unwrap();
    worker.declare().await.expect("topology declared");

    let producer = tracing::info_span!("checkout");
    let ids = {
        let cx = producer.context();
        let sc = cx.span().span_context().clone();
        (sc.trace_id(), sc.span_id())
    };
    produce(transport.clone(), producer).await;

    let stop = CancellationToken::new();
    let run = worker.run_until(stop.clone().cancelled_owned());
    let seen = async {
        let seen = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("the handler ran in time")
            .expect("a message");
        stop.cancel();
        seen
    };
    let (result, seen) = tokio::join!(run, seen);
    result.expect("worker ran");
    transport.close().await;
    provider.force_flush().expect("flush");
    let spans = spans.0.lock().unwrap().clone();
    (ids, seen, spans)
}

fn assert_parented(
    (trace_id, span_id): (TraceId, SpanId),
    traceparent: Option<String>,
    spans: &[SpanData],
) {
    assert_ne!(trace_id, TraceId::INVALID, "the producer span is recorded");
    let tp = traceparent.expect("the message carried a traceparent");
    assert_eq!(tp, format!("00-{trace_id}-{span_id}-01"));
    let process = spans
        .iter()
        .find(|s| s.name.starts_with("process "))
        .unwrap_or_else(|| {
            panic!(
                "a process span among {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
    assert_eq!(process.span_context.trace_id(), trace_id, "one trace");
    assert_eq!(
        process.parent_span_id, span_id,
        "the producer is the parent"
    );
    assert!(process.parent_span_is_remote);
}

#[tokio::test]
async fn producer_context_parents_the_consumer_span_through_rabbitmq() {
    let exchange = unique("ops-trace");
    let prefix = format!("{exchange}.");
    let transport = AmqpTransport::builder(AMQP_URL)
        .exchange(exchange.as_str())
        .queue_prefix(prefix.as_str())
        .connect()
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672");
    let (ids, tp, spans) = round_trip(Arc::new(transport), "traced", publish_in).await;
    remove_topology(&exchange, &prefix, "traced").await;
    assert_parented(ids, tp, &spans);
}

#[tokio::test]
async fn producer_context_parents_the_consumer_span_through_nats() {
    let token = uuid::Uuid::now_v7().simple().to_string();
    let prefix = format!("sfops{token}");
    let stream = format!("SFOPS_{token}");
    let transport = NatsTransport::builder("nats://127.0.0.1:4222")
        .subject_prefix(prefix.as_str())
        .stream(stream.as_str())
        .max_age(Duration::from_secs(600))
        .dead_letter_max_age(Duration::from_secs(600))
        .connect()
        .await
        .expect("NATS JetStream must be running on 127.0.0.1:4222");
    let (ids, tp, spans) = round_trip(Arc::new(transport), "traced", publish_in).await;
    remove_streams(&[stream.clone(), format!("{stream}_DLQ")]).await;
    assert_parented(ids, tp, &spans);
}

/// Publishes one message from inside `span`.
async fn publish_in(t: Arc<dyn Transport>, span: tracing::Span) {
    async {
        let env = Envelope::encode(&Traced { n: 1 }).unwrap();
        t.publish(&env).await.expect("published");
    }
    .instrument(span)
    .await;
}

#[tokio::test]
async fn an_outbox_row_carries_the_context_of_the_code_that_enqueued_it() {
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await
        .unwrap();
    let outbox = SqliteOutbox::new(pool.clone());
    outbox.migrate().await.unwrap();
    let broker: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let (ids, tp, spans) = round_trip(broker, "traced", async |t, span| {
        // Enqueued inside the producer's span, in its transaction...
        async {
            let mut tx = pool.begin().await.unwrap();
            outbox.enqueue(&mut tx, &Traced { n: 1 }).await.unwrap();
            tx.commit().await.unwrap();
        }
        .instrument(span)
        .await;
        let backlog = outbox.backlog().await.unwrap().expect("SQLite measures it");
        assert_eq!(backlog.pending, 1);
        // ...published later by the relay, outside it.
        let relay = Relay::builder(outbox.clone(), t).build().unwrap();
        assert_eq!(relay.run_once().await.unwrap().sent, 1);
        assert_eq!(outbox.backlog().await.unwrap().unwrap().pending, 0);
    })
    .await;
    assert_parented(ids, tp, &spans);
}

fn remove_streams(names: &[String]) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let client = async_nats::connect("nats://127.0.0.1:4222")
            .await
            .expect("NATS");
        let js = async_nats::jetstream::new(client);
        for n in names {
            let _ = js.delete_stream(n).await;
        }
    })
}

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "tree.started")]
struct TreeStarted {
    n: u64,
}

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "tree.continued")]
struct TreeContinued {
    n: u64,
}

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "tree.refused")]
struct TreeRefused {
    n: u64,
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

fn one<'a>(spans: &'a [SpanData], what: &str, f: impl Fn(&SpanData) -> bool) -> &'a SpanData {
    let found: Vec<&SpanData> = spans.iter().filter(|s| f(s)).collect();
    assert_eq!(
        found.len(),
        1,
        "one {what} span among {:?}",
        spans
            .iter()
            .map(|s| (&s.name, &s.attributes))
            .collect::<Vec<_>>()
    );
    found[0]
}

/// One message's trace: `process` in worker A, whose handler writes a row to
/// the outbox -> the relay's `send` span (linked to A's `process`) -> `process` in worker
/// B, a child of A's `process` through the row's trace context. And a handler that fails
/// permanently: its `process` span has error status and `error.type`, and the dead
/// letter is a `send` span under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_tree_of_a_message_through_handler_outbox_relay_and_second_handler() {
    use opentelemetry::trace::{SpanKind, Status};
    let (spans, provider, _guard) = collecting();

    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await
        .unwrap();
    let outbox = SqliteOutbox::new(pool.clone());
    outbox.migrate().await.unwrap();
    let broker: Arc<dyn Transport> = Arc::new(MemoryTransport::new());

    let (tx, mut rx) = mpsc::unbounded_channel::<&'static str>();
    let (pool_a, outbox_a, tx_a) = (pool.clone(), outbox.clone(), tx.clone());
    let a = Worker::builder_shared(broker.clone(), "tree-a")
        .handle(move |m: TreeStarted, _cx: Context| {
            let (pool, outbox, tx) = (pool_a.clone(), outbox_a.clone(), tx_a.clone());
            async move {
                let mut t = pool.begin().await?;
                outbox.enqueue(&mut t, &TreeContinued { n: m.n }).await?;
                t.commit().await?;
                let _ = tx.send("a");
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .unwrap();
    let (tx_b, tx_r) = (tx.clone(), tx.clone());
    let b = Worker::builder_shared(broker.clone(), "tree-b")
        .handle(move |_: TreeContinued, _cx: Context| {
            let tx = tx_b.clone();
            async move {
                let _ = tx.send("b");
                Ok::<(), HandlerError>(())
            }
        })
        .handle(move |_: TreeRefused, _cx: Context| {
            let tx = tx_r.clone();
            async move {
                let _ = tx.send("refused");
                Err::<(), HandlerError>(HandlerError::msg("no such account").permanent())
            }
        })
        .build()
        .unwrap();
    a.declare().await.unwrap();
    b.declare().await.unwrap();

    let producer = tracing::info_span!("checkout");
    async {
        let env = Envelope::encode(&TreeStarted { n: 7 }).unwrap();
        broker.publish(&env).await.expect("published");
    }
    .instrument(producer.clone())
    .await;
    drop(producer);

    let stop = CancellationToken::new();
    let run_a = a.run_until(stop.clone().cancelled_owned());
    let run_b = b.run_until(stop.clone().cancelled_owned());
    let drive = async {
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("a handler ran in time")
                .expect("a message")
        };
        assert_eq!(next().await, "a");
        let relay = Relay::builder(outbox.clone(), broker.clone())
            .build()
            .unwrap();
        assert_eq!(relay.run_once().await.unwrap().sent, 1);
        assert_eq!(next().await, "b");
        broker
            .publish(&Envelope::encode(&TreeRefused { n: 8 }).unwrap())
            .await
            .unwrap();
        assert_eq!(next().await, "refused");
        // Let the failed delivery settle (its dead letter sent) before stopping.
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
    };
    let (ra, rb, ()) = tokio::join!(run_a, run_b, drive);
    ra.unwrap();
    rb.unwrap();
    provider.force_flush().expect("flush");
    let spans = spans.0.lock().unwrap().clone();

    let process_a = one(&spans, "process tree-a", |s| s.name == "process tree-a");
    assert_eq!(process_a.span_kind, SpanKind::Consumer);
    assert_eq!(
        attr(process_a, "messaging.operation.name").as_deref(),
        Some("process")
    );
    assert_eq!(
        attr(process_a, "messaging.destination.name").as_deref(),
        Some("tree-a")
    );
    assert_eq!(process_a.status, Status::Unset);
    let trace = process_a.span_context.trace_id();

    let relay = one(&spans, "relay send", |s| {
        attr(s, "steadfast.send.kind").as_deref() == Some("relay")
    });
    assert_eq!(relay.span_kind, SpanKind::Producer);
    assert_eq!(
        attr(relay, "messaging.operation.name").as_deref(),
        Some("send")
    );
    assert!(
        relay
            .links
            .iter()
            .any(|l| l.span_context.span_id() == process_a.span_context.span_id()),
        "the relay's send span links to the handler that wrote the row: {:?}",
        relay.links
    );

    let process_b = one(&spans, "process tree-b (continued)", |s| {
        s.name == "process tree-b"
            && attr(s, "steadfast.message.name").as_deref() == Some("tree.continued")
    });
    assert_eq!(process_b.span_context.trace_id(), trace, "one trace");
    assert_eq!(
        process_b.parent_span_id,
        process_a.span_context.span_id(),
        "B's process is a child of A's, across the outbox"
    );
    assert_eq!(process_b.status, Status::Unset);

    let refused = one(&spans, "process tree-b (refused)", |s| {
        attr(s, "steadfast.message.name").as_deref() == Some("tree.refused")
    });
    assert!(
        matches!(refused.status, Status::Error { .. }),
        "a failed handler's span has error status: {:?}",
        refused.status
    );
    assert_eq!(attr(refused, "error.type").as_deref(), Some("permanent"));
    let dead_letter = one(&spans, "dead letter send", |s| {
        attr(s, "steadfast.send.kind").as_deref() == Some("dead_letter")
    });
    assert_eq!(dead_letter.span_kind, SpanKind::Producer);
    assert_eq!(
        dead_letter.parent_span_id,
        refused.span_context.span_id(),
        "the dead letter is sent under the failed process span"
    );
    broker.close().await;
}
