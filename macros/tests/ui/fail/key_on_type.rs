#[derive(serde::Serialize, serde::Deserialize, steadfast::Message)]
#[message(name = "orders.placed", key)]
struct OrderPlaced {
    order_id: u64,
}

fn main() {}
