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

/// Has `produce` send one message from inside a producer span, runs a worker until the
/// handler saw it, and returns the producer's ids, the `traceparent` the handler saw and
/// every exported span.
async fn round_trip(
    transport: Arc<dyn Transport>,
    group: &str,
    produce: impl AsyncFnOnce(Arc<dyn Transport>, tracing::Span),
) -> ((TraceId, SpanId), Option<String>, Vec<SpanData>) {
    let spans = Collect::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("ops-test")));
    let _guard = tracing::subscriber::set_default(subscriber);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

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
        .find(|s| s.name == "process traced.requested")
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
