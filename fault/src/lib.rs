//! steadfast's fault-injection suite (see `docs/reliability.md` in the repository).
//!
//! - [`spec`]: the model's message and how a worker process is configured;
//! - [`worker`]: the `fault-worker` process (a steadfast worker or an outbox relay);
//! - [`harness`]: publish with a ledger, run worker processes, inject a fault, heal ->
//!   drain -> check, and the figures;
//! - [`suite`]: the scenarios;
//! - [`db`]: the run's database, PostgreSQL or MariaDB; [`mariadb`]: a private MariaDB
//!   server for the database faults;
//! - [`proxy`]: a TCP proxy that cuts connections; [`servers`]: the servers around a run;
//!   [`rabbit_cluster`]: the three-node RabbitMQ cluster and its node faults.

pub mod db;
pub mod harness;
pub mod mariadb;
pub mod proxy;
pub mod rabbit_cluster;
pub mod servers;
pub mod spec;
pub mod suite;
pub mod worker;
