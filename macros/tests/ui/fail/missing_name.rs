#[derive(serde::Serialize, serde::Deserialize, steadfast::Message)]
struct OrderPlaced {
    order_id: u64,
}

fn main() {}
