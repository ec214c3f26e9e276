//! Runs the fault suite and prints the table of `docs/reliability.md`.
//!
//! ```text
//! cargo build --profile bench --workspace --all-features --bins
//! FAULT_N=100000 target/release/fault-suite        # the long run; FAULT_N=2000 is quick
//! ```
//!
//! Needs RabbitMQ, NATS and PostgreSQL on 127.0.0.1 (as `scripts/test.sh` starts them),
//! `rabbitmqctl`, `pg_ctlcluster` and `/usr/sbin/nats-server`: it restarts the broker and
//! the database, so run it alone. Exits 1 if any scenario failed a check.

use steadfast_fault::harness::{self, Env};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: u64 = std::env::var("FAULT_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    // Comma-separated substrings of scenario names, and a broker (rabbitmq or nats).
    let only: Option<Vec<String>> = std::env::var("FAULT_ONLY")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    let broker = std::env::var("FAULT_BROKER").ok();
    let exe = std::env::current_exe()
        .expect("own path")
        .with_file_name("fault-worker");
    let env = Env::from_env(&exe);
    println!("{}", harness::versions(&env).await);
    println!("{}", harness::table_header());
    let mut failed = false;
    let mut baseline = std::collections::HashMap::new();
    for s in steadfast_fault::suite::long(n) {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|w| s.name.contains(w.as_str())))
            || broker.as_deref().is_some_and(|b| b != s.broker.as_str())
        {
            continue;
        }
        match harness::run(&env, &s, None).await {
            Ok(row) => {
                if s.name.contains("baseline") {
                    baseline.insert(row.broker, row.throughput);
                }
                failed |= !row.passed();
                println!(
                    "{}",
                    harness::table_line(&row, baseline.get(row.broker).copied())
                );
                if row.duplicates > 0 {
                    // At-least-once copies the workers' store absorbed (in redeliveries).
                    eprintln!("{}: {} duplicate deliveries", row.scenario, row.duplicates);
                }
            }
            Err(e) => {
                failed = true;
                println!("| {} | {} | error: {e} |", s.name, s.broker.as_str());
            }
        }
    }
    std::process::exit(i32::from(failed));
}
