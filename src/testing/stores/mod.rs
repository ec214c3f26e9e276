//! The store conformance suite: the inbox's and the outbox's promises, checked against
//! any database, beside the transports' [`conformance`](super::conformance) suite.
//!
//! Every SQL backend of steadfast (PostgreSQL, SQLite, MySQL/MariaDB) runs these same
//! cases, and so can yours: implement [`StoreFactory`] (a fresh inbox, outbox and
//! effects table per case, and a transaction to mark, write and enqueue in) and expand
//! [`store_conformance_tests!`](crate::store_conformance_tests) in a test file. The
//! factories of steadfast's own backends are in this module (behind their features).
//!
//! ```text
//! steadfast::store_conformance_tests!(mysql_stores, steadfast::testing::stores::MySqlFactory::local());
//! ```
//!
//! The cases: leases (taken, held, expired, released only by their holder), completion
//! and retention, the inbox `mark` in a transaction that commits or rolls back, two marks
//! racing, the outbox's enqueue / claim / publish / park, expired claims, several relays
//! at once, rows committed out of sequence order, and the payload fingerprint kept with
//! a key. Cases run in real time with short leases.

mod cases;
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
mod sql;

pub use cases::*;
#[cfg(feature = "mysql")]
pub use sql::MySqlFactory;
#[cfg(feature = "postgres")]
pub use sql::PostgresFactory;
#[cfg(feature = "sqlite")]
pub use sql::SqliteFactory;

use crate::{
    envelope::Envelope,
    idempotency::{IdempotencyStore, Key},
    outbox::OutboxSource,
    sql::StoreError,
};
use futures::future::BoxFuture;
use std::sync::Arc;

/// Makes an isolated inbox, outbox and effects table for one case.
pub trait StoreFactory: Send + Sync + 'static {
    /// Stores whose tables cannot collide with any other case's. `case` is unique per
    /// call (lowercase letters, digits and `_`, at most 24 characters).
    fn create<'a>(&'a self, case: &'a str) -> BoxFuture<'a, StoreCase>;
}

/// One case's stores.
pub struct StoreCase {
    /// The inbox / idempotency store.
    pub inbox: Arc<dyn IdempotencyStore>,
    /// The outbox, as relays see it.
    pub outbox: Arc<dyn OutboxSource>,
    /// The database the handler writes to.
    pub db: Box<dyn CaseDb>,
    /// What the database can do; cases check only what it claims.
    pub features: Features,
}

/// What a database can do, for the cases that depend on it (Watermill's `Features`).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Features {
    /// Several transactions write at once (PostgreSQL, MySQL): rows can commit out of
    /// sequence order, and a claim runs while another transaction holds uncommitted rows.
    /// SQLite has one writer at a time.
    pub concurrent_writers: bool,
}

impl Features {
    /// A database with several writers at once.
    pub fn concurrent() -> Self {
        Self {
            concurrent_writers: true,
        }
    }

    /// A database with one writer at a time.
    pub fn single_writer() -> Self {
        Self {
            concurrent_writers: false,
        }
    }
}

impl std::fmt::Debug for StoreCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCase")
            .field("outbox", &self.outbox.backend())
            .finish_non_exhaustive()
    }
}

/// A case's database: transactions, the effects written, and the clean-up.
pub trait CaseDb: Send + Sync {
    /// Begins a transaction.
    fn begin(&self) -> BoxFuture<'_, Result<Box<dyn CaseTx>, StoreError>>;
    /// How many effects were written (and committed) for `key`.
    fn effects<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64, StoreError>>;
    /// Drops the case's tables (or file).
    fn drop_case(&self) -> BoxFuture<'_, ()>;
}

/// A transaction of the user's, as a handler writes in it.
pub trait CaseTx: Send {
    /// The inbox `mark` of `key` in this transaction.
    fn mark<'a>(&'a mut self, key: Key<'a>) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// A business write for `key`.
    fn effect<'a>(&'a mut self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
    /// The outbox `enqueue` of `envelope` in this transaction.
    fn enqueue(&mut self, envelope: Envelope) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Commits.
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), StoreError>>;
    /// Rolls back.
    fn rollback(self: Box<Self>) -> BoxFuture<'static, Result<(), StoreError>>;
}

/// Expands to one `#[tokio::test]` per store conformance case, inside a module
/// `$module`, for the factory `$factory`.
#[macro_export]
macro_rules! store_conformance_tests {
    ($module:ident, $factory:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $crate::store_conformance_tests!(@case $factory;
                leases_are_held_expire_and_release_only_by_their_holder,
                completion_is_kept_for_the_retention,
                inbox_mark_commits_or_rolls_back_with_the_transaction,
                racing_marks_make_one_effect,
                inbox_mark_under_a_lease_completes_the_key,
                outbox_rows_publish_after_commit_in_order,
                failed_rows_retry_and_park,
                expired_claims_come_back,
                several_relays_publish_each_row_once,
                rows_committed_out_of_order_are_published,
                payload_fingerprint_is_kept_with_the_key,
                payload_mismatch_is_flagged_by_the_worker);
        }
    };
    (@case $factory:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let factory = $factory;
                $crate::testing::stores::$case(&factory).await;
            }
        )*
    };
}
