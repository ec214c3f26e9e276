//! AsyncAPI 3.0 documents of workers (feature `asyncapi`): what a consumer group
//! receives, the JSON Schema of every message, and the dead letters it sends with their
//! failure headers. See `docs/asyncapi.md`.
//!
//! The document is built from the worker's own handler registry, so it cannot drift from
//! the code: [`Document::from_worker`] takes the [`WorkerBuilder`] you are about to
//! build; add more workers with [`Document::worker`]. A message's schema comes from
//! `schemars`: derive `schemars::JsonSchema` beside `Message` and add `schema` to the
//! `#[message(...)]` attribute.
//!
//! ```
//! use steadfast::{Context, HandlerError, Message, Worker, asyncapi::Document};
//! use steadfast::transport::memory::MemoryTransport;
//!
//! #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, Message)]
//! #[message(name = "orders.placed", schema)]
//! struct OrderPlaced {
//!     /// The order.
//!     order_id: u64,
//! }
//!
//! let builder = Worker::builder(MemoryTransport::new(), "billing")
//!     .handle(|_: OrderPlaced, _cx: Context| async { Ok::<(), HandlerError>(()) });
//! let doc = Document::from_worker("Billing", "1.0.0", &builder).to_json();
//! assert_eq!(doc["asyncapi"], "3.0.0");
//! assert_eq!(
//!     doc["components"]["messages"]["orders.placed"]["payload"]["properties"]["order_id"]["type"],
//!     "integer"
//! );
//! ```

use crate::{envelope::header, worker::WorkerBuilder};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// The JSON Schema of `T` (draft-07 with subschemas inlined, which AsyncAPI's default
/// schema format accepts). Used by `#[message(schema)]`.
pub fn schema_of<T: schemars::JsonSchema>() -> Value {
    let schema = schemars::generate::SchemaSettings::draft07()
        .with(|s| s.inline_subschemas = true)
        .into_generator()
        .into_root_schema_for::<T>();
    let mut v = schema.to_value();
    if let Some(o) = v.as_object_mut() {
        o.remove("$schema");
    }
    v
}

#[derive(Debug, Clone)]
struct Group {
    system: &'static str,
    messages: Vec<&'static str>,
    max_attempts: u32,
}

/// An AsyncAPI 3.0 document under construction.
#[derive(Debug, Clone)]
pub struct Document {
    title: String,
    version: String,
    description: Option<String>,
    schemas: BTreeMap<&'static str, Option<Value>>,
    groups: BTreeMap<String, Group>,
}

impl Document {
    /// An empty document for the application `title` at `version`.
    pub fn new(title: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            version: version.into(),
            description: None,
            schemas: BTreeMap::new(),
            groups: BTreeMap::new(),
        }
    }

    /// A document describing the worker `builder` would build.
    pub fn from_worker(
        title: impl Into<String>,
        version: impl Into<String>,
        builder: &WorkerBuilder,
    ) -> Self {
        Self::new(title, version).worker(builder)
    }

    /// Adds the consumer group of `builder`: an operation per message it handles and its
    /// dead letters.
    #[must_use]
    pub fn worker(mut self, builder: &WorkerBuilder) -> Self {
        let (group, system, messages, max_attempts) = builder.described();
        let mut names = Vec::new();
        for (name, schema) in messages {
            let slot = self.schemas.entry(name).or_insert(None);
            if slot.is_none() {
                *slot = schema;
            }
            names.push(name);
        }
        self.groups.insert(
            group.to_owned(),
            Group {
                system,
                messages: names,
                max_attempts,
            },
        );
        self
    }

    /// The document's description (Markdown).
    #[must_use]
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }

    /// The document as JSON.
    pub fn to_json(&self) -> Value {
        let mut channels = Map::new();
        let mut operations = Map::new();
        let mut messages = Map::new();
        for (name, schema) in &self.schemas {
            messages.insert(
                (*name).to_owned(),
                json!({
                    "name": name,
                    "title": name,
                    "contentType": header::CONTENT_TYPE_JSON,
                    "headers": delivery_headers(),
                    "payload": schema.clone().unwrap_or_else(|| json!({})),
                }),
            );
            messages.insert(
                format!("{name}.dead-letter"),
                json!({
                    "name": format!("{name}.dead-letter"),
                    "title": format!("{name} (dead letter)"),
                    "summary": "The original message, bytes unchanged, with steadfast's failure headers.",
                    "contentType": header::CONTENT_TYPE_JSON,
                    "headers": failure_headers(),
                    "payload": schema.clone().unwrap_or_else(|| json!({})),
                }),
            );
            channels.insert(
                (*name).to_owned(),
                json!({
                    "address": name,
                    "title": name,
                    "description": format!(
                        "Messages named `{name}`: the routing key on the topic exchange (RabbitMQ) or `{{prefix}}.{name}` in the work stream (NATS)."
                    ),
                    "messages": { *name: { "$ref": format!("#/components/messages/{name}") } },
                }),
            );
        }
        for (group, g) in &self.groups {
            let dlq = format!("{group}.dlq");
            let mut dl_messages = Map::new();
            for name in &g.messages {
                dl_messages.insert(
                    format!("{name}.dead-letter"),
                    json!({ "$ref": format!("#/components/messages/{name}.dead-letter") }),
                );
                operations.insert(
                    format!("{group}.receive.{name}"),
                    json!({
                        "action": "receive",
                        "title": format!("{group} handles {name}"),
                        "summary": format!(
                            "Consumer group `{group}` ({}) handles `{name}`: up to {} attempt(s) with broker-held backoff, then a dead letter.",
                            g.system, g.max_attempts
                        ),
                        "channel": { "$ref": format!("#/channels/{name}") },
                        "messages": [ { "$ref": format!("#/channels/{name}/messages/{name}") } ],
                    }),
                );
            }
            let refs: Vec<Value> = g
                .messages
                .iter()
                .map(|n| json!({ "$ref": format!("#/channels/{dlq}/messages/{n}.dead-letter") }))
                .collect();
            channels.insert(
                dlq.clone(),
                json!({
                    "address": dlq,
                    "title": format!("dead letters of {group}"),
                    "description": format!(
                        "Messages `{group}` gave up on: the queue `{group}.dlq` (RabbitMQ) or `{{prefix}}-dlq.{group}` in the stream `{{STREAM}}_DLQ` (NATS). Read and replay them with `steadfast dlq`."
                    ),
                    "messages": dl_messages,
                }),
            );
            operations.insert(
                format!("{group}.dead-letter"),
                json!({
                    "action": "send",
                    "title": format!("{group} dead-letters what it cannot handle"),
                    "channel": { "$ref": format!("#/channels/{dlq}") },
                    "messages": refs,
                }),
            );
        }
        let mut info = json!({ "title": self.title, "version": self.version });
        if let Some(d) = &self.description {
            info["description"] = json!(d);
        }
        json!({
            "asyncapi": "3.0.0",
            "info": info,
            "defaultContentType": header::CONTENT_TYPE_JSON,
            "channels": channels,
            "operations": operations,
            "components": { "messages": messages },
        })
    }

    /// The document as pretty-printed JSON text.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(&self.to_json()).unwrap_or_default()
    }
}

fn text(description: &str) -> Value {
    json!({ "type": "string", "description": description })
}

/// The headers of every delivery (besides the CloudEvents attributes, which each
/// transport's binding carries: `cloudEvents:*` on AMQP, `ce-*` on NATS).
fn delivery_properties() -> Map<String, Value> {
    let mut p = Map::new();
    p.insert(
        header::ATTEMPT.into(),
        text("Which attempt this delivery is, 1 on the first (decimal)."),
    );
    p.insert(header::TRACEPARENT.into(), text("W3C trace context."));
    p.insert(header::TRACESTATE.into(), text("W3C trace state."));
    p.insert(
        header::REPLAYED_AT.into(),
        text("Set when an operator replayed the message from the dead letters (RFC 3339)."),
    );
    p.insert(
        header::REPLAY_COUNT.into(),
        text("How many times the message was replayed from the dead letters (decimal)."),
    );
    p
}

fn delivery_headers() -> Value {
    json!({ "type": "object", "properties": delivery_properties() })
}

fn failure_headers() -> Value {
    let mut p = delivery_properties();
    p.insert(
        header::DEAD_LETTER_REASON.into(),
        text("Why it was dead-lettered."),
    );
    p.insert(
        header::ERROR_KIND.into(),
        json!({ "type": "string", "enum": ["transient", "permanent", "decode"], "description": "The kind of the last error." }),
    );
    p.insert(
        header::ATTEMPTS.into(),
        text("How many attempts were made (decimal)."),
    );
    p.insert(
        header::FAILED_AT.into(),
        text("When it was dead-lettered (RFC 3339, UTC)."),
    );
    p.insert(
        header::ORIGINAL_DESTINATION.into(),
        text("Where it was consumed from: exchange/routing key (RabbitMQ) or subject (NATS)."),
    );
    p.insert(
        header::ORIGINAL_GROUP.into(),
        text("The consumer group that gave up on it."),
    );
    json!({
        "type": "object",
        "properties": p,
        "required": [header::DEAD_LETTER_REASON, header::FAILED_AT],
    })
}
