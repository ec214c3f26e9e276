//! Idempotency stores, the transactional inbox and the outbox against a real local
//! PostgreSQL (unique schema per test) and SQLite (temporary file per test). Workers run
//! on the in-memory transport; the failures are injected by transport wrappers (see
//! `common.rs`).
#![cfg(all(feature = "postgres", feature = "sqlite"))]

mod common;
mod conformance;
mod pg_inbox;
mod pg_outbox;
mod pg_tls;
mod sqlite;
