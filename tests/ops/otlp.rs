//! OTLP export to a collector: the example worker, with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! pointing at a small OTLP/HTTP receiver in this test, sends the `process` spans of the
//! jobs it handled and its metrics, and its shutdown flushes them (the export delays are
//! set far beyond the test, so only the flush can deliver them).

use crate::{
    process::{done_line, env_for, publish, publisher},
    support::{AMQP_URL, WorkerProcess, remove_topology, unique, wait_status},
};
use axum::{Router, body::Bytes, extract::State, routing::post};
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse},
        trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    },
    common::v1::{AnyValue, KeyValue, any_value},
    metrics::v1::metric::Data,
    trace::v1::span::SpanKind,
};
use prost::Message as _;
use std::sync::{Arc, Mutex};

/// What the receiver was sent.
#[derive(Debug, Default)]
struct Received {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
}

type Shared = Arc<Mutex<Received>>;

async fn traces(State(r): State<Shared>, body: Bytes) -> Vec<u8> {
    let req = ExportTraceServiceRequest::decode(body).expect("an OTLP/protobuf trace request");
    r.lock().unwrap().traces.push(req);
    ExportTraceServiceResponse::default().encode_to_vec()
}

async fn metrics(State(r): State<Shared>, body: Bytes) -> Vec<u8> {
    let req = ExportMetricsServiceRequest::decode(body).expect("an OTLP/protobuf metric request");
    r.lock().unwrap().metrics.push(req);
    ExportMetricsServiceResponse::default().encode_to_vec()
}

/// An OTLP/HTTP receiver on a free port: its base URL and what it received.
async fn receiver() -> (String, Shared) {
    let received = Shared::default();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_reach_an_otlp_collector_and_shutdown_flushes_them() {
    let (endpoint, received) = receiver().await;
    let exchange = unique("ops-otlp");
    let mut env = env_for(&exchange, AMQP_URL);
    env.extend([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_SERVICE_NAME", "jobs-worker".to_owned()),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment.name=test".to_owned(),
        ),
        ("OTEL_TRACES_SAMPLER", "parentbased_always_on".to_owned()),
        // Ten minutes: within the test only the shutdown's flush exports.
        ("OTEL_BSP_SCHEDULE_DELAY", "600000".to_owned()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "600000".to_owned()),
    ]);
    let mut worker = WorkerProcess::start(&env);
    let addr = worker.http_addr().await;
    wait_status(&addr, "/readyz", 200).await;
    let t = publisher(&exchange).await;
    for id in 1..=3 {
        publish(&t, id, 0).await;
    }
    for id in 1..=3 {
        worker.line("job done", done_line(id)).await;
    }
    {
        let r = received.lock().unwrap();
        assert!(
            r.traces.is_empty() && r.metrics.is_empty(),
            "nothing is exported before the flush: {r:?}"
        );
    }
    worker.sigterm();
    let status = worker.wait().await;
    assert_eq!(status.code(), Some(0), "{}", worker.output());
    t.close().await;
    remove_topology(&exchange, &format!("{exchange}."), "jobs").await;

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
