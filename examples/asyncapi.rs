//! Writes the AsyncAPI 3.0 document of a worker: the billing group handles
//! `orders.placed` and `orders.cancelled`; each message's JSON Schema is derived with
//! schemars beside `Message`; the document lists a channel per message name, an
//! operation per handled message and the group's dead letters with their failure headers.
//! Your program does the same with its own worker builder (the CLI cannot see your
//! handlers); `docs/asyncapi.md` shows this example's output.
//!
//! Run it with:
//!
//! ```text
//! cargo run --features asyncapi --example asyncapi > asyncapi.json
//! ```

use steadfast::{
    Context, HandlerError, Message, Worker, asyncapi::Document, transport::memory::MemoryTransport,
};

/// An order was placed.
#[derive(Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema, Message)]
#[message(name = "orders.placed", schema)]
struct OrderPlaced {
    /// The order; the idempotency key.
    #[message(key)]
    order_id: u64,
    /// The total in cents, above zero.
    total_cents: i64,
    /// ISO 4217 currency code.
    currency: String,
}

/// An order was cancelled before it shipped.
#[derive(Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema, Message)]
#[message(name = "orders.cancelled", schema)]
struct OrderCancelled {
    /// The order.
    order_id: u64,
    /// Why, if the customer said.
    reason: Option<String>,
}

fn main() {
    let builder = Worker::builder(MemoryTransport::new(), "billing")
        .handle(|_: OrderPlaced, _cx: Context| async { Ok::<(), HandlerError>(()) })
        .handle(|_: OrderCancelled, _cx: Context| async { Ok::<(), HandlerError>(()) });
    let doc = Document::from_worker("Billing", env!("CARGO_PKG_VERSION"), &builder)
        .description("Charges placed orders and refunds cancelled ones.");
    println!("{}", doc.to_json_pretty());
}
