//! `/metrics` of a real run: two workers on RabbitMQ (one with the kill switch), a
//! handler that writes to a PostgreSQL outbox and one that dead-letters, and the outbox's
//! relay. Checks the metrics operators alert on, that every metric family of the run is
//! in the sample `docs/operations.md` shows, and that every metric the Grafana dashboard
//! queries is in the run. `STEADFAST_METRICS_SAMPLE=path` writes the scrape to `path`.

use crate::support::{AMQP_URL, DEADLINE, remove_topology, sample, unique};
use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use steadfast::{
    Context, Envelope, HandlerError, Message, Worker,
    http::Prometheus,
    outbox::{PostgresOutbox, Relay},
    transport::{Transport, amqp::AmqpTransport},
    worker::KillSwitch,
};
use tokio_util::sync::CancellationToken;

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "orders.placed")]
struct OrderPlaced {
    #[message(key)]
    order_id: u64,
}

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "orders.charged")]
struct OrderCharged {
    order_id: u64,
}

/// The metric families of a Prometheus scrape (histograms by their `_bucket`, `_sum` and
/// `_count` series).
fn families(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_run_has_every_documented_and_dashboard_metric() {
    let prometheus = Prometheus::install().expect("the only recorder of this process");
    let exchange = unique("ops-metrics");
    let prefix = format!("{exchange}.");
    let transport: Arc<dyn Transport> = Arc::new(
        AmqpTransport::builder(AMQP_URL)
            .exchange(exchange.as_str())
            .queue_prefix(prefix.as_str())
            .connect()
            .await
            .expect("RabbitMQ must be running on 127.0.0.1:5672"),
    );
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let pool = steadfast::idempotency::postgres::connect(&url)
        .await
        .expect("PostgreSQL must be running on 127.0.0.1:5432");
    let table = format!("sf_ops_metrics_{}", uuid::Uuid::now_v7().simple());
    let outbox = PostgresOutbox::new(pool.clone())
        .with_table(&table)
        .unwrap();
    outbox.migrate().await.unwrap();

    // Billing charges orders through the outbox; order 0 mod 5 is refused for good.
    let (p, o) = (pool.clone(), outbox.clone());
    let billing = Worker::builder_shared(transport.clone(), "billing")
        .handle(move |m: OrderPlaced, cx: Context| {
            let (pool, outbox) = (p.clone(), o.clone());
            async move {
                if m.order_id.is_multiple_of(5) {
                    return Err(HandlerError::msg("card declined").permanent());
                }
                let mut tx = pool.begin().await?;
                outbox
                    .enqueue_from(
                        &mut tx,
                        &OrderCharged {
                            order_id: m.order_id,
                        },
                        &cx,
                    )
                    .await?;
                tx.commit().await?;
                Ok(())
            }
        })
        .kill_switch(KillSwitch::new(0.9, 1_000, Duration::from_secs(60)))
        .build()
        .unwrap();
    let charged = Arc::new(AtomicU64::new(0));
    let c = charged.clone();
    let audit = Worker::builder_shared(transport.clone(), "audit")
        .handle(move |_: OrderCharged, _: Context| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .unwrap();
    billing.declare().await.unwrap();
    audit.declare().await.unwrap();
    let relay = Relay::builder(outbox.clone(), transport.clone())
        .build()
        .unwrap();

    let stop = CancellationToken::new();
    let runs = [
        tokio::spawn(billing.run_until(stop.clone().cancelled_owned())),
        tokio::spawn(audit.run_until(stop.clone().cancelled_owned())),
    ];
    let relaying = tokio::spawn(relay.run_until(stop.clone().cancelled_owned()));
    for order_id in 1..=20 {
        let env = Envelope::encode(&OrderPlaced { order_id }).unwrap();
        transport.publish(&env).await.expect("published");
    }
    let until = tokio::time::Instant::now() + DEADLINE;
    let scrape = loop {
        let scrape = prometheus.render();
        let dead = sample(
            &scrape,
            "steadfast_worker_outcomes_total",
            &["outcome=\"dead_lettered\""],
        );
        if charged.load(Ordering::SeqCst) >= 16 && dead >= 4.0 {
            break scrape;
        }
        assert!(tokio::time::Instant::now() < until, "{scrape}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.cancel();
    for r in runs {
        r.await.unwrap().unwrap();
    }
    relaying.await.unwrap();
    transport.close().await;
    remove_topology(&exchange, &prefix, "billing").await;
    remove_topology(&exchange, &prefix, "audit").await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(&pool)
        .await
        .unwrap();
    if let Ok(path) = std::env::var("STEADFAST_METRICS_SAMPLE") {
        std::fs::write(path, &scrape).unwrap();
    }

    let t = format!("outbox_table=\"{table}\"");
    assert_eq!(
        sample(
            &scrape,
            "steadfast_outbox_relayed_total",
            &[&t, "outcome=\"published\""]
        ),
        16.0,
        "{scrape}"
    );
    assert_eq!(
        sample(
            &scrape,
            "steadfast_worker_outcomes_total",
            &[
                "messaging_consumer_group_name=\"audit\"",
                "outcome=\"acked\""
            ]
        ),
        16.0
    );
    for (name, labels) in [
        ("steadfast_outbox_pending", &t),
        ("steadfast_outbox_parked", &t),
        ("steadfast_outbox_oldest_age_seconds", &t),
    ] {
        assert!(
            scrape
                .lines()
                .any(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels.as_str())),
            "{name} for the table:\n{scrape}"
        );
    }
    assert_eq!(
        sample(
            &scrape,
            "steadfast_worker_kill_switch_open",
            &["messaging_consumer_group_name=\"billing\""]
        ),
        0.0
    );
    assert_eq!(
        sample(
            &scrape,
            "steadfast_worker_ready",
            &["messaging_consumer_group_name=\"billing\""]
        ),
        1.0,
        "{scrape}"
    );

    let run = families(&scrape);
    // Every family of the run is in the documented sample...
    let docs = include_str!("../../docs/operations.md");
    let documented = docs
        .split("<!-- metrics-sample -->\n```text\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .map(families)
        .expect("docs/operations.md has a /metrics sample");
    let missing: Vec<_> = run.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "in the run, not in docs/operations.md's sample: {missing:?}"
    );
    // ...and every metric the dashboard queries is in the run.
    let dashboard: serde_json::Value = serde_json::from_str(include_str!(
        "../../deploy/grafana/steadfast-dashboard.json"
    ))
    .unwrap();
    // (Words of the queries that are label names are not metrics.)
    let labels: BTreeSet<&str> = scrape
        .lines()
        .filter_map(|l| l.split_once('{')?.1.split_once('}'))
        .flat_map(|(inside, _)| inside.split(',').filter_map(|kv| kv.split_once('=')))
        .map(|(k, _)| k)
        .collect();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if (word.starts_with("steadfast_") || word.starts_with("messaging_"))
                    && !labels.contains(word)
                {
                    queried.insert(word.to_owned());
                }
            }
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    let unknown: Vec<_> = queried.difference(&run).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries {unknown:?}, not in the run"
    );
}
