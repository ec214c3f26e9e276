#[derive(serde::Serialize, serde::Deserialize, steadfast::Message)]
#[message(name = "orders.*")]
struct OrderPlaced {
    order_id: u64,
}

#[derive(serde::Serialize, serde::Deserialize, steadfast::Message)]
#[message(name = "orders..placed")]
struct Other {
    order_id: u64,
}

fn main() {}
