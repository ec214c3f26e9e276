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

/// The dead letters of group `g`, once there are at least `n` (fails after `limit`).
async fn dead_letters_at_least(
    t: &steadfast::transport::amqp::AmqpTransport,
    n: usize,
    limit: Duration,
) -> Vec<steadfast::transport::DeadLetter> {
    let start = std::time::Instant::now();
    loop {
        let dls = t.dead_letters("g", 100).await.expect("dead letters");
        if dls.len() >= n {
            return dls;
        }
        assert!(start.elapsed() < limit, "only {} dead letters", dls.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `d`, the dead letter of `case`, was dead-lettered at once as undecodable, with a
/// reason that says `needle` and its original `body`.
fn assert_dead_at_once(
    d: Option<&steadfast::transport::DeadLetter>,
    case: &str,
    needle: &str,
    body: &[u8],
) {
    let d = d.unwrap_or_else(|| panic!("{case}: not dead-lettered"));
    assert!(
        d.reason.contains(needle),
        "{case}: reason `{}` lacks `{needle}`",
        d.reason
    );
    assert_eq!(d.kind, Some(ErrorKind::Decode), "{case}");
    assert_eq!(d.attempts, 1, "{case}: dead-lettered at once");
    assert_eq!(&d.envelope.payload[..], body, "{case}: original bytes kept");
}

/// A worker of group `g` whose handler records each message's mode and succeeds.
async fn recording_worker(
    t: &steadfast::transport::amqp::AmqpTransport,
) -> (Running, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = calls.clone();
    let w = Running::start(
        Worker::builder(t.clone(), "g").handle(move |j: Job, _cx: Context| {
            seen.lock().unwrap().push(j.mode.clone());
            async { Ok::<(), HandlerError>(()) }
        }),
    )
    .await;
    (w, calls)
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

    let dls = dead_letters_at_least(&t, cases.len() + 1, Duration::from_secs(30)).await;
    let by_case: HashMap<String, _> = dls
        .iter()
        .map(|d| (d.envelope.headers.get("case").unwrap_or("?").to_owned(), d))
        .collect();
    for (case, _, body, _, needle) in &cases {
        assert_dead_at_once(by_case.get(*case).copied(), case, needle, body);
    }
    // Dead letters of messages without a usable id get one of their own.
    for case in ["missing-id", "invalid-id", "int-id"] {
        assert_ne!(by_case[case].id(), MessageId::nil(), "{case}");
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

/// A copy of a suspect (retried or deferred) carries the crashes it caused while running
/// alone in `steadfast-crashes` (`x-delivery-count` starts again on every copy). At the
/// crash limit it is dead-lettered with the crash-loop reason and never reaches the
/// handler — so a message that crashes the worker, and is deferred between crashes while
/// its dead holder's idempotency lease runs out, still ends in the dead-letter queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_carried_past_the_crash_limit_are_dead_lettered() {
    let name = support::unique("returns");
    let t = support::transport_named(&name, 5).await;
    let (w, calls) = recording_worker(&t).await;
    let (_conn, ch) = support::raw_channel().await;
    let body = br#"{"mode":"crashy"}"#;
    // As a deferred copy of a suspect that crashed its worker 6 times alone (limit 3).
    let over = props(
        "over",
        new_id(),
        "bad.job",
        &[("steadfast-crashes", text("6"))],
    );
    support::raw_publish(&ch, &name, "bad.job", body, over).await;
    // Below the limit it is handled (alone).
    let at = props(
        "at",
        new_id(),
        "bad.job",
        &[("steadfast-crashes", text("2"))],
    );
    support::raw_publish(&ch, &name, "bad.job", br#"{"mode":"at"}"#, at).await;
    support::wait_for(
        "the message at the limit handled",
        Duration::from_secs(10),
        || calls.lock().unwrap().iter().any(|m| m == "at"),
    )
    .await;
    let dls = dead_letters_at_least(&t, 1, Duration::from_secs(20)).await;
    assert_eq!(dls.len(), 1);
    assert_eq!(dls[0].envelope.headers.get("case"), Some("over"));
    assert!(
        dls[0]
            .reason
            .starts_with("crash loop: the worker stopped (crashed, aborted or was killed) 6 times"),
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

/// Hostile header tables any publisher can send, built frame by frame: tables and arrays
/// nested 200 and 10,000 deep, a 10,000-entry table and a 100 KiB value. Each lands in
/// the dead-letter queue at once with a reason naming the problem and its original body,
/// the worker (this process) stays up, and the healthy message sent after them is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_header_tables_are_dead_lettered_and_the_worker_lives() {
    use crate::raw_frames::{self, RawMessage, Value};
    let name = support::unique("hostile");
    let t = support::transport_named(&name, 20).await;
    let (w, handled) = recording_worker(&t).await;
    let leaf = || Value::text("leaf");
    let wide: Vec<(String, Value)> = (0..10_000)
        .map(|i| (format!("h{i:05}"), Value::text("v")))
        .collect();
    // (case, extra headers, what the reason must say)
    type Case<'a> = (&'a str, Vec<(String, Value)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "table-200",
            vec![("deep".into(), Value::nested(200, false, leaf()))],
            "header nesting deeper than 64",
        ),
        (
            "table-10000",
            vec![("deep".into(), Value::nested(10_000, false, leaf()))],
            "header nesting deeper than 64",
        ),
        (
            "array-200",
            vec![("deep".into(), Value::nested(200, true, leaf()))],
            "header nesting deeper than 64",
        ),
        (
            "array-10000",
            vec![("deep".into(), Value::nested(10_000, true, leaf()))],
            "header nesting deeper than 64",
        ),
        ("wide", wide, "10004 header entries (limit 1000)"),
        (
            "huge-value",
            vec![("big".into(), Value::text(&"x".repeat(100 * 1024)))],
            "header bytes (limit 65536)",
        ),
    ];
    for (case, headers, _) in &cases {
        let mut h = vec![
            ("cloudEvents:specversion".to_owned(), Value::text("1.0")),
            (
                "cloudEvents:id".to_owned(),
                Value::text(&MessageId::new().to_string()),
            ),
            ("cloudEvents:type".to_owned(), Value::text("bad.job")),
            ("case".to_owned(), Value::text(case)),
        ];
        h.extend(headers.iter().cloned());
        let msg = RawMessage {
            headers: h,
            body: format!(r#"{{"mode":"{case}"}}"#).into_bytes(),
            ..RawMessage::default()
        };
        raw_frames::publish(&support::url(), &name, "bad.job", &msg).await;
    }
    // At the depth limit a header is read as usual (and lapin's parser copes with it).
    let at_limit = RawMessage {
        headers: vec![
            (
                "cloudEvents:id".to_owned(),
                Value::text(&MessageId::new().to_string()),
            ),
            ("cloudEvents:type".to_owned(), Value::text("bad.job")),
            ("deep".to_owned(), Value::nested(64, false, leaf())),
        ],
        body: br#"{"mode":"depth-64"}"#.to_vec(),
        ..RawMessage::default()
    };
    raw_frames::publish(&support::url(), &name, "bad.job", &at_limit).await;
    // A healthy message after them: handled by the same worker.
    let (_conn, ch) = support::raw_channel().await;
    support::raw_publish(
        &ch,
        &name,
        "bad.job",
        br#"{"mode":"healthy"}"#,
        props("healthy", new_id(), "bad.job", &[]),
    )
    .await;
    support::wait_for(
        "the healthy message handled",
        Duration::from_secs(30),
        || handled.lock().unwrap().iter().any(|m| m == "healthy"),
    )
    .await;
    let dls = dead_letters_at_least(&t, cases.len(), Duration::from_secs(30)).await;
    assert_eq!(dls.len(), cases.len(), "nothing else was dead-lettered");
    for (case, _, needle) in &cases {
        let d = dls
            .iter()
            .find(|d| d.envelope.headers.get("case") == Some(*case));
        assert_dead_at_once(
            d,
            case,
            needle,
            format!(r#"{{"mode":"{case}"}}"#).as_bytes(),
        );
    }
    assert_eq!(
        *handled.lock().unwrap(),
        ["depth-64", "healthy"],
        "no hostile message reached the handler"
    );
    w.stop().await;
    t.close().await;
}
