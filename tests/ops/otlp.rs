//! OTLP export to a collector: the example worker, with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! pointing at a small OTLP/HTTP receiver in this test, sends the `process` spans of the
//! jobs it handled and its metrics, and its shutdown flushes them (the export delays are
//! set far beyond the test, so only the flush can deliver them).

use crate::{
    process::{done_line, env_for, publish, publisher},
    support::{AMQP_URL, WorkerProcess, remove_topology, unique, wait_status},
};
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse},
        trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    },
    common::v1::{AnyValue, KeyValue, any_value},
    metrics::v1::metric::Data,
    trace::v1::span::SpanKind,
};
use std::sync::{Arc, Mutex};

/// What the receiver was sent, and the `authorization` it requires, if any.
#[derive(Debug, Default)]
struct Received {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
    required: Option<String>,
    refused: usize,
}

type Shared = Arc<Mutex<Received>>;

/// Whether the request carries the authorization the receiver requires (counted if not).
fn admitted(r: &Shared, headers: &HeaderMap) -> bool {
    let mut r = r.lock().unwrap();
    let Some(required) = r.required.clone() else {
        return true;
    };
    let ok = headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&*required);
    if !ok {
        r.refused += 1;
    }
    ok
}

/// One export request: refused without the required authorization, else decoded and kept.
fn export<Req: prost::Message + Default, Resp: prost::Message + Default>(
    r: &Shared,
    headers: &HeaderMap,
    body: Bytes,
    keep: impl FnOnce(&mut Received, Req),
) -> Result<Vec<u8>, StatusCode> {
    if !admitted(r, headers) {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let req = Req::decode(body).expect("an OTLP/protobuf export request");
    keep(&mut r.lock().unwrap(), req);
    Ok(Resp::default().encode_to_vec())
}

async fn traces(
    State(r): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Vec<u8>, StatusCode> {
    export::<ExportTraceServiceRequest, ExportTraceServiceResponse>(&r, &headers, body, |r, q| {
        r.traces.push(q)
    })
}

async fn metrics(
    State(r): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Vec<u8>, StatusCode> {
    export::<ExportMetricsServiceRequest, ExportMetricsServiceResponse>(
        &r,
        &headers,
        body,
        |r, q| r.metrics.push(q),
    )
}

/// An OTLP/HTTP receiver on a free port, requiring `authorization: <required>` when given:
/// its base URL and what it received.
async fn receiver(required: Option<String>) -> (String, Shared) {
    let received = Shared::new(Mutex::new(Received {
        required,
        ..Received::default()
    }));
    let app = Router::new()
        .route("/v1/traces", post(traces))
        .route("/v1/metrics", post(metrics))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

fn string(kvs: &[KeyValue], key: &str) -> Option<String> {
    kvs.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match &kv.value {
            Some(AnyValue {
                value: Some(any_value::Value::StringValue(s)),
            }) => Some(s.clone()),
            _ => None,
        })
}

/// Runs the example worker exporting to `endpoint` (the delays set far beyond the test, so
/// only the shutdown's flush exports), with `extra` variables, through jobs `1..=jobs`;
/// `before_stop` runs before SIGTERM. Returns the worker's output, after checking it
/// exited 0.
async fn run_jobs(
    exchange: &str,
    endpoint: String,
    extra: Vec<(&'static str, String)>,
    jobs: u64,
    before_stop: impl FnOnce(),
) -> String {
    let mut env = env_for(exchange, AMQP_URL);
    env.extend([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_TRACES_SAMPLER", "parentbased_always_on".to_owned()),
        // Ten minutes: within the test only the shutdown's flush exports.
        ("OTEL_BSP_SCHEDULE_DELAY", "600000".to_owned()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "600000".to_owned()),
    ]);
    env.extend(extra);
    let mut worker = WorkerProcess::start(&env);
    let addr = worker.http_addr().await;
    wait_status(&addr, "/readyz", 200).await;
    let t = publisher(exchange).await;
    for id in 1..=jobs {
        publish(&t, id, 0).await;
    }
    for id in 1..=jobs {
        worker.line("job done", done_line(id)).await;
    }
    before_stop();
    worker.sigterm();
    let status = worker.wait().await;
    let output = worker.output();
    assert_eq!(status.code(), Some(0), "{output}");
    t.close().await;
    remove_topology(exchange, &format!("{exchange}."), "jobs").await;
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_reach_an_otlp_collector_and_shutdown_flushes_them() {
    let (endpoint, received) = receiver(None).await;
    let exchange = unique("ops-otlp");
    let extra = vec![
        ("OTEL_SERVICE_NAME", "jobs-worker".to_owned()),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment.name=test".to_owned(),
        ),
    ];
    run_jobs(&exchange, endpoint, extra, 3, || {
        let r = received.lock().unwrap();
        assert!(
            r.traces.is_empty() && r.metrics.is_empty(),
            "nothing is exported before the flush: {r:?}"
        );
    })
    .await;

    let r = received.lock().unwrap();
    // Spans: one `process` span per job, with the conventions' attributes, from the
    // service the variables named.
    let queue = format!("{exchange}.jobs");
    let mut process = Vec::new();
    for req in &r.traces {
        for rs in &req.resource_spans {
            let resource = rs.resource.as_ref().expect("a resource");
            assert_eq!(
                string(&resource.attributes, "service.name").as_deref(),
                Some("jobs-worker")
            );
            assert_eq!(
                string(&resource.attributes, "deployment.environment.name").as_deref(),
                Some("test")
            );
            for ss in &rs.scope_spans {
                process.extend(ss.spans.iter().filter(|s| s.name.starts_with("process ")));
            }
        }
    }
    assert_eq!(process.len(), 3, "three process spans: {:#?}", r.traces);
    for s in &process {
        assert_eq!(s.name, format!("process {queue}"));
        assert_eq!(s.kind, SpanKind::Consumer as i32);
        assert_eq!(s.trace_id.len(), 16);
        let a = &s.attributes;
        assert_eq!(string(a, "messaging.system").as_deref(), Some("rabbitmq"));
        assert_eq!(
            string(a, "messaging.operation.name").as_deref(),
            Some("process")
        );
        assert_eq!(
            string(a, "messaging.destination.name").as_deref(),
            Some(queue.as_str())
        );
        assert_eq!(
            string(a, "messaging.consumer.group.name").as_deref(),
            Some("jobs")
        );
        assert_eq!(
            string(a, "steadfast.message.name").as_deref(),
            Some("jobs.requested")
        );
        assert!(string(a, "messaging.message.id").is_some());
        assert!(string(a, "error.type").is_none(), "no failure: {a:?}");
    }

    // Metrics: the facade's metrics under their OpenTelemetry names and units.
    let all: Vec<_> = r
        .metrics
        .iter()
        .flat_map(|m| &m.resource_metrics)
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
        .collect();
    let find = |name: &str| {
        all.iter().find(|m| m.name == name).unwrap_or_else(|| {
            panic!(
                "{name} among {:?}",
                all.iter().map(|m| &m.name).collect::<Vec<_>>()
            )
        })
    };
    let duration = find("messaging.process.duration");
    assert_eq!(duration.unit, "s");
    match &duration.data {
        Some(Data::Histogram(h)) => {
            let count: u64 = h.data_points.iter().map(|p| p.count).sum();
            assert_eq!(count, 3);
            assert!(
                h.data_points
                    .iter()
                    .all(|p| p.explicit_bounds.first() == Some(&0.005)),
                "the conventions' bucket bounds"
            );
        }
        other => panic!("a histogram: {other:?}"),
    }
    match &find("messaging.client.consumed.messages").data {
        Some(Data::Sum(s)) => {
            let total: i64 = s
                .data_points
                .iter()
                .map(|p| match p.value {
                    Some(
                        opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(v),
                    ) => v,
                    _ => 0,
                })
                .sum();
            assert_eq!(total, 3);
        }
        other => panic!("a sum: {other:?}"),
    }
    find("steadfast.worker.outcomes");
}

/// A collector that requires an API key in `OTEL_EXPORTER_OTLP_HEADERS` (as hosted
/// collectors do): the worker's spans and metrics reach it with the key, and the key
/// appears in none of the worker's output, at `trace` and with every library's lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_headers_authenticate_and_never_reach_the_logs() {
    let canary = format!("otlp-key-{}", uuid::Uuid::new_v4().simple());
    let (endpoint, received) = receiver(Some(format!("Bearer {canary}"))).await;
    let exchange = unique("ops-otlp-key");
    let extra = vec![
        // The specification's form: comma-separated key=value, values percent-encoded.
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            format!("authorization=Bearer%20{canary}"),
        ),
        ("RUST_LOG", "trace".to_owned()),
    ];
    let output = run_jobs(&exchange, endpoint, extra, 1, || {}).await;

    let r = received.lock().unwrap();
    assert_eq!(r.refused, 0, "every export carried the key");
    assert!(!r.traces.is_empty(), "the spans reached the collector");
    assert!(!r.metrics.is_empty(), "the metrics reached the collector");
    assert!(
        output.lines().count() > 50,
        "trace-level output was written: {output}"
    );
    assert!(
        !output.contains(&canary),
        "the OTLP key is in the worker's output"
    );
}
