//! Bad input straight from a raw AMQP client: each lands in the dead-letter queue at
//! once with its reason and original bytes, the handler never sees it, and the worker
//! keeps going. A forged attempt header is not trusted: the message is retried normally.

use crate::support::{self, Running};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};
use std::{collections::HashMap, time::Duration};
use steadfast::{
    Context, ErrorKind, HandlerError, Message, MessageId, RetryPolicy, Worker, transport::Transport,
};

#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "bad.job")]
pub(crate) struct Job {
    pub(crate) mode: String,
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Properties as steadfast writes them, with a `case` header to find the dead letter.
fn props(
    case: &str,
    id: Option<AMQPValue>,
    name: &str,
    extra: &[(&str, AMQPValue)],
) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert("cloudEvents:specversion".into(), text("1.0"));
    if let Some(id) = id {
        h.insert("cloudEvents:id".into(), id);
    }
    h.insert("cloudEvents:type".into(), text(name));
    h.insert("case".into(), text(case));
    for (k, v) in extra {
        h.insert((*k).into(), v.clone());
    }
    BasicProperties::default()
        .with_headers(h)
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

fn new_id() -> Option<AMQPValue> {
    Some(text(&MessageId::new().to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_bad_input_is_dead_lettered_with_its_reason() {
    let name = support::unique("bad");
    let t = support::transport_named(&name, 20).await;
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, u32)>::new()));
    let seen = calls.clone();
    let w = Running::start(
        Worker::builder(t.clone(), "g")
            .handle(move |j: Job, cx: Context| {
                seen.lock().unwrap().push((j.mode.clone(), cx.attempt()));
                async move {
                    match j.mode.as_str() {
                        "fail" => Err(HandlerError::msg("dependency down")),
                        _ => Ok(()),
                    }
                }
            })
            .retry(
                RetryPolicy::fixed(Duration::from_millis(200))
                    .max_attempts(3)
                    .jitter(0.0),
            )
            .max_payload_bytes(1024),
    )
    .await;
    let (_conn, ch) = support::raw_channel().await;
    let work_queue = t.queue_name("g");
    let ok = br#"{"mode":"ok"}"#;
    let cases: Vec<(&str, BasicProperties, Vec<u8>, &str, &str)> = vec![
        (
            "invalid-json",
            props("invalid-json", new_id(), "bad.job", &[]),
            b"{\"mode\": ".to_vec(),
            &name,
            "cannot decode `bad.job` as JSON",
        ),
        (
            "wrong-schema",
            props("wrong-schema", new_id(), "bad.job", &[]),
            br#"{"mode": 7}"#.to_vec(),
            &name,
            "cannot decode",
        ),
        (
            "oversize",
            props("oversize", new_id(), "bad.job", &[]),
            [b' '; 5000].to_vec(),
            &name,
            "exceeds the limit of 1024 bytes",
        ),
        (
            "unknown-name",
            props("unknown-name", new_id(), "nobody.handles", &[]),
            ok.to_vec(),
            "",
            "no handler for message name `nobody.handles`",
        ),
        (
            "missing-id",
            props("missing-id", None, "bad.job", &[]),
            ok.to_vec(),
            &name,
            "missing message id header",
        ),
        (
            "invalid-id",
            props("invalid-id", Some(text("order-17")), "bad.job", &[]),
            ok.to_vec(),
            &name,
            "is not a UUID",
        ),
        (
            "int-id",
            props(
                "int-id",
                Some(AMQPValue::LongLongInt(12345)),
                "bad.job",
                &[],
            ),
            ok.to_vec(),
            &name,
            "`12345` is not a UUID",
        ),
        (
            "non-utf8-body",
            props("non-utf8-body", new_id(), "bad.job", &[]),
            vec![0xff, 0xfe, 0x00],
            &name,
            "cannot decode",
        ),
    ];
    for (_, p, body, exchange, _) in &cases {
        // Unknown names are bound to no queue: put them straight into the work queue.
        let rk = if exchange.is_empty() {
            work_queue.as_str()
        } else {
            "bad.job"
        };
        support::raw_publish(&ch, exchange, rk, body, p.clone()).await;
    }
    // Non-string header types on an otherwise good message: read as text, handled.
    let odd = props(
        "odd-headers",
        new_id(),
        "bad.job",
        &[
            ("n", AMQPValue::LongInt(-7)),
            ("flag", AMQPValue::Boolean(true)),
            ("when", AMQPValue::Timestamp(1_700_000_000)),
        ],
    );
    support::raw_publish(&ch, &name, "bad.job", ok, odd).await;
    // A forged attempt header (as an integer, even): retried normally from attempt 1.
    let forged = props(
        "forged",
        new_id(),
        "bad.job",
        &[("steadfast-attempt", AMQPValue::LongLongInt(999))],
    );
    support::raw_publish(&ch, &name, "bad.job", br#"{"mode":"fail"}"#, forged).await;

    let mut dls = Vec::new();
    let start = std::time::Instant::now();
    while dls.len() < cases.len() + 1 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "only {} dead letters",
            dls.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        dls = t.dead_letters("g", 100).await.expect("dead letters");
    }
    let by_case: HashMap<String, _> = dls
        .iter()
        .map(|d| (d.envelope.headers.get("case").unwrap_or("?").to_owned(), d))
        .collect();
    for (case, _, body, _, needle) in &cases {
        let d = by_case
            .get(*case)
            .unwrap_or_else(|| panic!("{case}: not dead-lettered"));
        assert!(
            d.reason.contains(needle),
            "{case}: reason `{}` lacks `{needle}`",
            d.reason
        );
        assert_eq!(d.kind, Some(ErrorKind::Decode), "{case}");
        assert_eq!(d.attempts, 1, "{case}: dead-lettered at once");
        assert_eq!(
            &d.envelope.payload[..],
            &body[..],
            "{case}: original bytes kept"
        );
    }
    let forged = by_case
        .get("forged")
        .expect("forged message dead-lettered after its retries");
    assert_eq!(forged.attempts, 3);
    assert_eq!(forged.reason, "gave up after 3 attempts: dependency down");
    let snapshot = calls.lock().unwrap().clone();
    assert_eq!(
        snapshot
            .iter()
            .filter(|c| c.0 == "fail")
            .map(|c| c.1)
            .collect::<Vec<_>>(),
        [1, 2, 3],
        "the forged attempt was not trusted"
    );
    assert_eq!(
        snapshot.iter().filter(|c| c.0 == "ok").count(),
        1,
        "only the good message reached the handler"
    );
    // The worker is still up: a good message sent now is handled.
    support::raw_publish(
        &ch,
        &name,
        "bad.job",
        ok,
        props("late", new_id(), "bad.job", &[]),
    )
    .await;
    support::wait_for("the late message handled", Duration::from_secs(10), || {
        calls.lock().unwrap().iter().filter(|c| c.0 == "ok").count() == 2
    })
    .await;
    assert_eq!(dls.len(), cases.len() + 1, "nothing else was dead-lettered");
    w.stop().await;
    t.close().await;
}

/// A deferred copy carries how often the message was returned unsettled (`x-delivery-count`
/// starts again on every copy). Past the delivery limit it is dead-lettered with that
/// reason and never reaches the handler — so a message that crashes the worker, and is
/// deferred between crashes while its dead holder's idempotency lease runs out, still
/// ends in the dead-letter queue (found by the fault suite's crash-loop scenario).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_carried_past_the_delivery_limit_are_dead_lettered() {
    let name = support::unique("returns");
    let t = support::transport_named(&name, 5).await;
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = calls.clone();
    let w = Running::start(
        Worker::builder(t.clone(), "g").handle(move |j: Job, _cx: Context| {
            seen.lock().unwrap().push(j.mode.clone());
            async { Ok::<(), HandlerError>(()) }
        }),
    )
    .await;
    let (_conn, ch) = support::raw_channel().await;
    let body = br#"{"mode":"crashy"}"#;
    // As a deferred copy of a message returned 6 times (limit 5) would arrive.
    let over = props(
        "over",
        new_id(),
        "bad.job",
        &[("steadfast-returns", text("6"))],
    );
    support::raw_publish(&ch, &name, "bad.job", body, over).await;
    // At the limit it is still handled.
    let at = props(
        "at",
        new_id(),
        "bad.job",
        &[("steadfast-returns", text("5"))],
    );
    support::raw_publish(&ch, &name, "bad.job", br#"{"mode":"at"}"#, at).await;
    support::wait_for(
        "the message at the limit handled",
        Duration::from_secs(10),
        || calls.lock().unwrap().iter().any(|m| m == "at"),
    )
    .await;
    let mut dls = Vec::new();
    let start = std::time::Instant::now();
    while dls.is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        dls = t.dead_letters("g", 10).await.expect("dead letters");
    }
    assert_eq!(dls.len(), 1);
    assert_eq!(dls[0].envelope.headers.get("case"), Some("over"));
    assert!(
        dls[0]
            .reason
            .contains("delivery limit reached: returned unsettled 6 times (limit 5)"),
        "{}",
        dls[0].reason
    );
    assert_eq!(&dls[0].envelope.payload[..], &body[..]);
    assert!(
        !calls.lock().unwrap().iter().any(|m| m == "crashy"),
        "the handler never saw it"
    );
    w.stop().await;
    t.close().await;
}
