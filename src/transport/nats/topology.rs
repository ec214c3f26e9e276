//! Streams and durable consumers, declared idempotently.
//!
//! A group's consumers carry the description `steadfast group {group}`. The first
//! declaration creates one consumer named after the group with every name's subject
//! (one `filter_subject`, or `filter_subjects` on 2.10+). Names added later get their
//! own consumer, `{group}--{name}`, so an existing consumer's filter is never changed.
//! On 2.9, which allows one filter per consumer, a group with several names has one
//! consumer per name from the start.

use super::{Inner, err};
use crate::transport::{Subscription, TransportError, TransportErrorKind};
use async_nats::jetstream::{
    consumer::{self, AckPolicy, DeliverPolicy, pull},
    stream,
};
use futures::TryStreamExt;
use std::{collections::BTreeSet, time::Duration};

/// One durable consumer of a group and what it filters.
#[derive(Debug, Clone)]
pub(super) struct GroupConsumer {
    pub(super) name: String,
}

/// The description that marks a consumer as one of `group`'s.
fn description(group: &str) -> String {
    format!("steadfast group {group}")
}

/// A consumer name from a group or message name: `.` and anything else a consumer name
/// cannot hold become `_`.
pub(super) fn consumer_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Creates the work and dead-letter streams if they are missing; checks existing ones
/// capture our subjects.
pub(super) async fn ensure_streams(inner: &Inner) -> Result<(), TransportError> {
    let s = &inner.settings;
    ensure_stream(
        inner,
        &s.stream,
        &format!("{}.>", s.prefix),
        s.max_age,
        "steadfast work stream",
    )
    .await?;
    ensure_stream(
        inner,
        &s.dlq_stream,
        &format!("{}-dlq.>", s.prefix),
        s.dlq_max_age,
        "steadfast dead letters",
    )
    .await
}

async fn ensure_stream(
    inner: &Inner,
    name: &str,
    subject: &str,
    max_age: Duration,
    desc: &str,
) -> Result<(), TransportError> {
    let existing = inner
        .bounded("stream info", async {
            match inner.js.get_stream(name).await {
                Ok(mut st) => match st.info().await {
                    Ok(info) => Ok(Some(info.config.clone())),
                    Err(e) => Err(err(
                        TransportErrorKind::Protocol,
                        format!("reading stream `{name}`"),
                        e,
                    )),
                },
                Err(e) if is_not_found(&e) => Ok(None),
                Err(e) => Err(err(
                    TransportErrorKind::Connection,
                    format!("looking up stream `{name}`"),
                    e,
                )),
            }
        })
        .await?;
    if let Some(cfg) = existing {
        return check_stream(inner, &cfg, name, subject);
    }
    let cfg = stream::Config {
        name: name.to_owned(),
        description: Some(desc.to_owned()),
        subjects: vec![subject.to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age,
        duplicate_window: Duration::from_secs(120),
        allow_direct: true,
        num_replicas: inner.settings.replicas.unwrap_or(1),
        ..Default::default()
    };
    let created = inner
        .bounded("create stream", async {
            inner
                .js
                .create_stream(cfg)
                .await
                .map(|_| ())
                .map_err(|e| TransportError::new(TransportErrorKind::Config, e.to_string()))
        })
        .await;
    if let Err(e) = created {
        // Another process may have created it at the same moment: look again.
        let mut st = inner.js.get_stream(name).await.map_err(|_| {
            TransportError::new(
                TransportErrorKind::Config,
                format!("cannot create stream `{name}`: {e}"),
            )
        })?;
        let info = st
            .info()
            .await
            .map_err(|e2| err(TransportErrorKind::Protocol, format!("stream `{name}`"), e2))?;
        return check_stream(inner, &info.config, name, subject);
    }
    tracing::info!(
        stream = name,
        subject,
        replicas = inner.settings.replicas.unwrap_or(1),
        "created stream"
    );
    warn_single_replica(inner, name, inner.settings.replicas.unwrap_or(1));
    Ok(())
}

/// On a cluster, a single-replica stream the user did not ask for is a warning: it is
/// lost with its node's disk and unavailable while that node is down.
fn warn_single_replica(inner: &Inner, name: &str, replicas: usize) {
    if replicas <= 1 && inner.settings.replicas.is_none() {
        let info = inner.client.server_info();
        if info.cluster.is_some() || !info.connect_urls.is_empty() {
            tracing::warn!(
                stream = name,
                cluster = info.cluster.as_deref().unwrap_or(""),
                "stream has a single replica on a NATS cluster: its messages are unavailable while its node is down and lost with its disk; ask for 3 (NatsBuilder::replicas, STEADFAST_NATS_REPLICAS)"
            );
        }
    }
}

fn check_stream(
    inner: &Inner,
    cfg: &stream::Config,
    name: &str,
    subject: &str,
) -> Result<(), TransportError> {
    if let Some(want) = inner.settings.replicas
        && cfg.num_replicas.max(1) != want
    {
        return Err(TransportError::new(
            TransportErrorKind::Config,
            format!(
                "stream `{name}` exists with {} replica(s) but {want} were asked for; steadfast does not change an existing stream: change its replicas (`nats stream edit {name} --replicas {want}`) or the setting",
                cfg.num_replicas.max(1)
            ),
        ));
    }
    warn_single_replica(inner, name, cfg.num_replicas);
    if !cfg.subjects.iter().any(|s| s == subject || s == ">") {
        return Err(TransportError::new(
            TransportErrorKind::Config,
            format!(
                "stream `{name}` exists but its `subjects` ({:?}) do not include `{subject}`",
                cfg.subjects
            ),
        ));
    }
    if cfg.storage == stream::StorageType::Memory {
        tracing::warn!(
            stream = name,
            "stream uses memory storage: messages are lost when the server restarts; use file storage"
        );
    }
    Ok(())
}

fn is_not_found(e: &async_nats::jetstream::context::GetStreamError) -> bool {
    use async_nats::jetstream::context::GetStreamErrorKind;
    matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.code() == 404)
}

/// The group consumer's `max_ack_pending` unless the builder sets one (nats-server's own
/// default too).
const DEFAULT_MAX_ACK_PENDING: i64 = 1000;

/// The settings a group's consumers need, derived from the subscription.
#[derive(Debug, Clone)]
pub(super) struct Wanted {
    ack_wait: Duration,
    max_deliver: i64,
    max_ack_pending: i64,
}

pub(super) fn wanted(inner: &Inner, sub: &Subscription) -> Wanted {
    let ack_wait = inner
        .settings
        .ack_wait
        .unwrap_or(sub.handler_timeout + Duration::from_secs(5));
    Wanted {
        ack_wait,
        max_deliver: i64::from(sub.max_attempts.max(1))
            + i64::from(inner.settings.delivery_margin.max(1)),
        // Group-wide, and counting messages in a retry delay: capping it at one worker's
        // concurrency kept a second replica idle and, under retries, starved the group
        // (fault suite, 100,000 messages with misbehaving handlers).
        max_ack_pending: inner
            .settings
            .max_ack_pending
            .unwrap_or_else(|| DEFAULT_MAX_ACK_PENDING.max(sub.prefetch.max(1) as i64)),
    }
}

/// The ack deadline the group's consumers use (for `progress_interval`).
pub(super) fn ack_wait(inner: &Inner, sub: &Subscription) -> Duration {
    wanted(inner, sub).ack_wait
}

/// Declares the streams and `sub.group`'s consumers so that every name of `sub` is
/// covered; returns every consumer of the group (including ones for names declared
/// earlier, which the group keeps consuming).
pub(super) async fn ensure_group(
    inner: &Inner,
    sub: &Subscription,
) -> Result<Vec<GroupConsumer>, TransportError> {
    super::builder::validate_token("consumer group", &sub.group)?;
    for n in &sub.names {
        super::builder::validate_token("message name", n)?;
    }
    ensure_streams(inner).await?;
    let s = &inner.settings;
    let desc = description(&sub.group);
    let main = consumer_name(&sub.group);
    let want = wanted(inner, sub);
    let st = inner
        .bounded("get stream", async {
            inner
                .js
                .get_stream_no_info(&s.stream)
                .await
                .map_err(|e| err(TransportErrorKind::Connection, "work stream", e))
        })
        .await?;

    // The group's consumers as they are.
    let existing: Vec<consumer::Info> = inner
        .bounded("list consumers", async {
            st.consumers()
                .try_collect::<Vec<_>>()
                .await
                .map_err(|e| err(TransportErrorKind::Protocol, "listing consumers", e))
        })
        .await?
        .into_iter()
        .filter(|c| c.config.description.as_deref() == Some(desc.as_str()) || c.name == main)
        .collect();

    let mut covered = BTreeSet::new();
    for c in &existing {
        check_consumer(c, &sub.group)?;
        covered.extend(filters(&c.config));
    }
    let missing: Vec<String> = sub
        .names
        .iter()
        .map(|n| s.subject(n))
        .filter(|subj| !covered.contains(subj))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();

    let mut out: Vec<GroupConsumer> = Vec::new();
    // Raise what must be raised on existing consumers (safe for the server to apply).
    for c in &existing {
        let cfg = &c.config;
        let needs = cfg.ack_wait < want.ack_wait
            || (cfg.max_deliver > 0 && cfg.max_deliver < want.max_deliver)
            || (cfg.max_ack_pending > 0 && cfg.max_ack_pending < want.max_ack_pending);
        if needs {
            raise_limits(inner, &c.name, &want).await?;
            tracing::info!(consumer = %c.name, "raised ack_wait / max_deliver / max_ack_pending to the worker's needs");
        }
        out.push(GroupConsumer {
            name: c.name.clone(),
        });
    }

    // Create consumers for the names not covered yet.
    if !missing.is_empty() {
        let base = pull::Config {
            description: Some(desc.clone()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: want.ack_wait,
            max_deliver: want.max_deliver,
            max_ack_pending: want.max_ack_pending,
            ..Default::default()
        };
        let mut plan: Vec<(String, Vec<String>)> = Vec::new();
        let main_free = !existing.iter().any(|c| c.name == main);
        if main_free && (missing.len() == 1 || inner.server.multi_filter()) {
            plan.push((main.clone(), missing.clone()));
        } else {
            for subj in &missing {
                let name_part = subj.strip_prefix(&format!("{}.", s.prefix)).unwrap_or(subj);
                let name = if main_free && plan.is_empty() {
                    main.clone()
                } else {
                    format!("{main}--{}", consumer_name(name_part))
                };
                plan.push((name, vec![subj.clone()]));
            }
        }
        for (name, subjects) in plan {
            let mut cfg = base.clone();
            cfg.durable_name = Some(name.clone());
            if subjects.len() == 1 {
                cfg.filter_subject = subjects[0].clone();
            } else {
                cfg.filter_subjects = subjects.clone();
            }
            // If another process created it meanwhile with another filter, refuse.
            if let Ok(info) = inner
                .bounded("consumer info", async {
                    st.consumer_info(&name)
                        .await
                        .map_err(|e| err(TransportErrorKind::Protocol, "consumer info", e))
                })
                .await
            {
                check_consumer(&info, &sub.group)?;
                let have: BTreeSet<String> = filters(&info.config).into_iter().collect();
                let want_f: BTreeSet<String> = subjects.iter().cloned().collect();
                if have != want_f {
                    return Err(TransportError::new(
                        TransportErrorKind::Config,
                        format!(
                            "consumer `{name}` exists with filter_subject {have:?}, but group `{}` needs {want_f:?}; steadfast does not change a durable consumer's filter (the server could skip its backlog): delete or rename it",
                            sub.group
                        ),
                    ));
                }
            } else {
                let info = create(inner, &st, cfg).await?;
                let have: BTreeSet<String> = filters(&info.config).into_iter().collect();
                if have != subjects.iter().cloned().collect::<BTreeSet<_>>() {
                    return Err(TransportError::new(
                        TransportErrorKind::Config,
                        format!(
                            "the server created consumer `{name}` with filter {have:?} instead of {subjects:?} (server {})",
                            inner.client.server_info().version
                        ),
                    ));
                }
                tracing::info!(consumer = %name, filters = ?subjects, "created durable consumer");
            }
            out.push(GroupConsumer { name });
        }
    }
    Ok(out)
}

fn filters(cfg: &consumer::Config) -> Vec<String> {
    let mut f = cfg.filter_subjects.clone();
    if !cfg.filter_subject.is_empty() {
        f.push(cfg.filter_subject.clone());
    }
    f
}

/// A consumer we bind to must be a pull consumer with explicit acks that starts from
/// the beginning: anything else is a start-up error naming the field.
fn check_consumer(c: &consumer::Info, group: &str) -> Result<(), TransportError> {
    let cfg = &c.config;
    let bad = |field: &str, have: String, want: &str| {
        Err(TransportError::new(
            TransportErrorKind::Config,
            format!(
                "durable consumer `{}` of group `{group}` has {field} = {have}, steadfast needs {want}; steadfast does not change it behind your back: fix or delete the consumer",
                c.name
            ),
        ))
    };
    if cfg.deliver_subject.is_some() {
        return bad(
            "deliver_subject",
            format!("{:?}", cfg.deliver_subject),
            "a pull consumer (no deliver_subject)",
        );
    }
    if cfg.ack_policy != AckPolicy::Explicit {
        return bad("ack_policy", format!("{:?}", cfg.ack_policy), "Explicit");
    }
    if cfg.deliver_policy != DeliverPolicy::All {
        return bad("deliver_policy", format!("{:?}", cfg.deliver_policy), "All");
    }
    if filters(cfg).is_empty() {
        return bad(
            "filter_subject",
            "none (every subject)".into(),
            "the group's subjects",
        );
    }
    Ok(())
}

/// Raises `ack_wait`, `max_deliver` and `max_ack_pending` of an existing consumer to
/// what the worker needs, and changes nothing else.
///
/// The update is made of the configuration the server returns, as JSON, with those
/// three fields changed: every other field the server has (user `metadata` on 2.10+,
/// priority groups and pause on 2.11+, fields newer than this client) is sent back as
/// it was. Rebuilding it from the client's typed configuration would drop what the
/// client does not know.
async fn raise_limits(inner: &Inner, name: &str, want: &Wanted) -> Result<(), TransportError> {
    use serde_json::{Value, json};
    let stream = &inner.settings.stream;
    let request = |subject: String, body: Value| async move {
        let reply: Value = inner
            .bounded("consumer request", async {
                inner
                    .js
                    .request(subject, &body)
                    .await
                    .map_err(|e| err(TransportErrorKind::Connection, "consumer request", e))
            })
            .await?;
        if let Some(e) = reply.get("error") {
            return Err(TransportError::new(
                TransportErrorKind::Config,
                format!("updating consumer `{name}`: the server answered {e}"),
            ));
        }
        Ok(reply)
    };
    let info = request(format!("CONSUMER.INFO.{stream}.{name}"), json!({})).await?;
    let Some(mut config) = info.get("config").cloned().filter(Value::is_object) else {
        return Err(TransportError::new(
            TransportErrorKind::Protocol,
            format!("consumer `{name}`: the server's answer has no configuration"),
        ));
    };
    let int = |v: &Value, key: &str| v.get(key).and_then(Value::as_i64).unwrap_or(0);
    let ack_wait = i64::try_from(want.ack_wait.as_nanos()).unwrap_or(i64::MAX);
    let raised_ack_wait = int(&config, "ack_wait").max(ack_wait);
    config["ack_wait"] = json!(raised_ack_wait);
    for (key, wanted) in [
        ("max_deliver", want.max_deliver),
        ("max_ack_pending", want.max_ack_pending),
    ] {
        let have = int(&config, key);
        if have > 0 && have < wanted {
            config[key] = json!(wanted);
        }
    }
    let (subject, body) = if inner.server.multi_filter() {
        (
            format!("CONSUMER.CREATE.{stream}.{name}"),
            json!({ "stream_name": stream, "config": config, "action": "update" }),
        )
    } else {
        (
            format!("CONSUMER.DURABLE.CREATE.{stream}.{name}"),
            json!({ "stream_name": stream, "config": config }),
        )
    };
    request(subject, body).await.map(|_| ())
}

async fn create(
    inner: &Inner,
    st: &async_nats::jetstream::stream::Stream<()>,
    cfg: pull::Config,
) -> Result<consumer::Info, TransportError> {
    let name = cfg.durable_name.clone().unwrap_or_default();
    inner
        .bounded("create consumer", async {
            st.create_consumer(cfg)
                .await
                .map(|c| c.cached_info().clone())
                .map_err(|e| {
                    err(
                        TransportErrorKind::Config,
                        format!("creating consumer `{name}`"),
                        e,
                    )
                })
        })
        .await
}
