//! Raising a consumer's `ack_wait`, `max_deliver` and `max_ack_pending` keeps every other
//! field as the server has it: user `metadata` (2.10+), priority groups and pause (2.11+),
//! and the older fields, on whichever server version the tests run against.

use crate::{cleanup, transport, url};
use serde_json::{Value, json};
use std::time::Duration;
use steadfast::transport::{Subscription, Transport};

async fn consumer_info(js: &async_nats::jetstream::Context, stream: &str, name: &str) -> Value {
    let v: Value = js
        .request(format!("CONSUMER.INFO.{stream}.{name}"), &json!({}))
        .await
        .unwrap();
    assert!(v.get("error").is_none(), "{v}");
    v["config"].clone()
}

fn version(v: &str) -> (u32, u32) {
    let mut it = v.split(['.', '-']).map(|p| p.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_updates_keep_every_other_field() {
    let nt = transport("upd").await;
    let sub = Subscription::new("updgroup", ["upd.job"]);
    // Streams first, with no consumer.
    let client = async_nats::connect(url()).await.unwrap();
    let server = version(&client.server_info().version);
    let js = async_nats::jetstream::new(client);
    let other = Subscription::new("updother", ["upd.other"]);
    nt.declare(&other).await.unwrap();
    let stream = nt.stream_name().to_owned();

    // The group's consumer as an operator made it, with small limits and extra fields.
    let mut config = json!({
        "durable_name": "updgroup",
        "description": "steadfast group updgroup",
        "deliver_policy": "all",
        "ack_policy": "explicit",
        "ack_wait": 1_000_000_000u64,
        "max_deliver": 2,
        "max_ack_pending": 5,
        "filter_subject": nt.subject_for("upd.job"),
        "replay_policy": "instant",
        "sample_freq": "40%",
        "max_waiting": 77,
        "max_expires": 45_000_000_000u64,
        "inactive_threshold": 0,
    });
    let mut kept = vec![
        "description",
        "sample_freq",
        "max_waiting",
        "max_expires",
        "filter_subject",
    ];
    if server >= (2, 10) {
        config["metadata"] = json!({ "owner": "team-payments", "ticket": "OPS-42" });
        kept.push("metadata");
    }
    if server >= (2, 11) {
        config["priority_policy"] = json!("overflow");
        config["priority_groups"] = json!(["jobs"]);
        config["pause_until"] = json!("2099-01-01T00:00:00Z");
        kept.extend(["priority_policy", "priority_groups", "pause_until"]);
    }
    let subject = if server >= (2, 10) {
        format!("CONSUMER.CREATE.{stream}.updgroup")
    } else {
        format!("CONSUMER.DURABLE.CREATE.{stream}.updgroup")
    };
    let created: Value = js
        .request(subject, &json!({ "stream_name": stream, "config": config }))
        .await
        .unwrap();
    assert!(created.get("error").is_none(), "{created}");
    let before = consumer_info(&js, &stream, "updgroup").await;

    // The worker needs more: its declaration raises the three limits.
    let mut sub = sub;
    sub.handler_timeout = Duration::from_secs(20);
    sub.max_attempts = 4;
    nt.declare(&sub).await.unwrap();
    let after = consumer_info(&js, &stream, "updgroup").await;

    assert_eq!(
        after["ack_wait"],
        json!(25_000_000_000u64),
        "ack_wait raised"
    );
    assert_eq!(after["max_deliver"], json!(9), "max_deliver raised");
    assert_eq!(
        after["max_ack_pending"],
        json!(1000),
        "max_ack_pending raised"
    );
    for field in &kept {
        assert_ne!(before[field], Value::Null, "{field} was set");
        assert_eq!(
            after[field], before[field],
            "{field} kept (server {server:?})"
        );
    }
    if server >= (2, 10) {
        assert_eq!(after["metadata"]["owner"], json!("team-payments"));
    }
    eprintln!("server {server:?}: kept {kept:?}");
    cleanup(&nt).await;
}
