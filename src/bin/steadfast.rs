//! The `steadfast` command-line tool: inspect, replay and purge dead letters on RabbitMQ
//! and NATS JetStream, and look after PostgreSQL and SQLite outboxes.
//!
//! Install with `cargo install steadfast --features cli`; run `steadfast --help`. The
//! logic lives in the library module `steadfast::cli`.

fn main() -> std::process::ExitCode {
    steadfast::cli::main()
}
