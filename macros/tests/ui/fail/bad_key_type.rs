#[derive(serde::Serialize, serde::Deserialize, steadfast::Message)]
#[message(name = "orders.placed")]
struct OrderPlaced {
    #[message(key)]
    amount: f64,
}

fn main() {}
