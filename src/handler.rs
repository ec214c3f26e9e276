//! Handlers: `async fn(M, Context) -> Result<(), HandlerError>`.

use crate::{context::Context, error::HandlerError, message::Message};
use std::future::Future;

/// Handles messages of type `M`.
///
/// Any `async fn(M, Context) -> Result<(), HandlerError>` or closure of that shape is a
/// handler. A struct with state implements it directly:
///
/// ```
/// use std::sync::{Arc, atomic::{AtomicU64, Ordering}};
/// use steadfast::{Context, Handler, HandlerError, Message};
///
/// #[derive(serde::Serialize, serde::Deserialize, Message)]
/// #[message(name = "payments.captured")]
/// struct PaymentCaptured { cents: u64 }
///
/// struct Ledger { total: Arc<AtomicU64> }
///
/// impl Handler<PaymentCaptured> for Ledger {
///     async fn handle(&self, msg: PaymentCaptured, _cx: Context) -> Result<(), HandlerError> {
///         self.total.fetch_add(msg.cents, Ordering::Relaxed);
///         Ok(())
///     }
/// }
/// ```
pub trait Handler<M: Message>: Send + Sync + 'static {
    /// Handles one message. `Err` is classified by its [`ErrorKind`](crate::ErrorKind).
    fn handle(&self, msg: M, cx: Context) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

impl<M, F, Fut> Handler<M> for F
where
    M: Message,
    F: Fn(M, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    fn handle(&self, msg: M, cx: Context) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self(msg, cx)
    }
}
