#[derive(serde::Serialize, serde::Deserialize, steadfast::Message)]
#[message(name = "orders.placed")]
struct OrderPlaced {
    #[message(id)]
    order_id: u64,
}

fn main() {}
