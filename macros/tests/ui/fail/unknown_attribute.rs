#[derive(serde::Serialize, serde::Deserialize, steadfast::Message)]
#[message(name = "orders.placed", queue = "orders")]
struct OrderPlaced {
    order_id: u64,
}

fn main() {}
