#[derive(serde::Serialize, serde::Deserialize, steadfast::Message)]
#[message(name = "orders.placed")]
struct OrderPlaced {
    #[message(key)]
    order_id: u64,
    #[message(key)]
    customer_id: u64,
}

fn main() {}
