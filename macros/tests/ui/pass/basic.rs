use std::borrow::Cow;
use steadfast::Message;

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "orders.placed")]
struct OrderPlaced {
    #[message(key)]
    order_id: String,
    total: f64,
}

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "payments.captured-v2")]
struct PaymentCaptured(#[message(key)] u64, i64);

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "audit.ping")]
struct Ping;

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "users.changed")]
enum UserChanged {
    Renamed { to: String },
    Deleted,
}

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "generic.wrapper")]
#[serde(bound = "T: serde::Serialize + serde::de::DeserializeOwned")]
struct Wrapper<T: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static> {
    #[message(key)]
    id: uuid_like::Id,
    inner: T,
}

mod uuid_like {
    pub type Id = i128;
}

fn main() {
    assert_eq!(OrderPlaced::NAME, "orders.placed");
    let o = OrderPlaced { order_id: "A-1".into(), total: 1.5 };
    assert_eq!(o.idempotency_key(), Some(Cow::Borrowed("A-1")));
    assert_eq!(PaymentCaptured(7, 1).idempotency_key().as_deref(), Some("7"));
    assert_eq!(Ping.idempotency_key(), None);
    assert_eq!(UserChanged::Deleted.idempotency_key(), None);
    let _ = UserChanged::Renamed { to: String::new() };
    assert_eq!(Wrapper { id: -3, inner: 1u8 }.idempotency_key().as_deref(), Some("-3"));
    assert_eq!(<Wrapper<u8> as Message>::NAME, "generic.wrapper");
}
