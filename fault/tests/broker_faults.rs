//! The fault suite's short run: each scenario of `docs/reliability.md` on a few hundred
//! messages, against the local RabbitMQ, NATS and PostgreSQL, with real worker processes
//! (`fault-worker`) killed for real. Each test asserts the model's checks: nothing lost,
//! no duplicate effect, every poison message dead-lettered with its reason and no
//! healthy one, nothing left unacked, the outbox empty, the system drained by itself.
//!
//! These tests restart RabbitMQ and PostgreSQL (and a private MariaDB on
//! `FAULT_MARIADB_PORT`, 3307): `scripts/test.sh` runs this binary alone, one test at a
//! time. `FAULT_N` sets the messages per scenario.

use std::time::Duration;
use steadfast_fault::{
    harness::{self, Env, Fault},
    spec::{Broker, Mode},
    suite,
};

fn n() -> u64 {
    std::env::var("FAULT_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

async fn check(name: &str, broker: Broker) {
    let env = Env::from_env(env!("CARGO_BIN_EXE_fault-worker").as_ref());
    let mut s = suite::scenario(name, broker, n()).expect("a scenario for this broker");
    s.deadline = Duration::from_secs(90);
    let row = harness::run(&env, &s, None)
        .await
        .unwrap_or_else(|e| panic!("{name} on {}: {e}", broker.as_str()));
    eprintln!(
        "{}\n{}",
        harness::table_header(),
        harness::table_line(&row, None)
    );
    assert!(row.passed(), "{}: {}", s.name, row.problems.join("; "));
    assert!(row.messages > 0, "the ledger has ok publishes");
    // The fault really happened: every armed window and every kill took a process down.
    let deaths = match &s.fault {
        Fault::Window { .. } => 1,
        Fault::Windows(list) => list.len() as u64,
        Fault::RandomKills { count, .. } => u64::from(*count),
        _ if s.special.iter().any(|(_, m)| *m == Mode::Abort) => 1,
        _ => 0,
    };
    assert!(
        row.restarts >= deaths,
        "{}: {} restarts, expected at least {deaths}",
        s.name,
        row.restarts
    );
}

macro_rules! scenarios {
    ($($test:ident: $name:literal on $broker:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            check($name, Broker::$broker).await;
        }
    )*};
}

// One test per fault and broker; the crash windows share one run per broker (each
// replacement worker dies at the next window). `fault-suite` runs every window on its
// own, on both brokers, with more messages.
scenarios! {
    amqp_random_sigkills: "sigkill" on Amqp;
    nats_random_sigkills: "sigkill" on Nats;
    amqp_killed_at_each_crash_window: "windows" on Amqp;
    nats_killed_at_each_crash_window: "windows" on Nats;
    amqp_sigterm_drain: "sigterm" on Amqp;
    amqp_rolling_restart: "rolling" on Amqp;
    nats_rolling_restart: "rolling" on Nats;
    amqp_broker_restart: "broker-restart" on Amqp;
    nats_broker_restart: "broker-restart" on Nats;
    amqp_forced_connection_close: "close-connections" on Amqp;
    amqp_tcp_cut_to_broker: "cut-broker" on Amqp;
    nats_tcp_cut_to_broker: "cut-broker" on Nats;
    amqp_misbehaving_handlers: "misbehaving" on Amqp;
    nats_misbehaving_handlers: "misbehaving" on Nats;
    amqp_crash_loop: "crash-loop" on Amqp;
    nats_crash_loop: "crash-loop" on Nats;
    amqp_raw_bad_input: "bad-input" on Amqp;
    nats_raw_bad_input: "bad-input" on Nats;
    amqp_concurrent_duplicates: "duplicates" on Amqp;
    nats_concurrent_duplicates: "duplicates" on Nats;
    amqp_relay_killed_after_confirm: "relay-window" on Amqp;
    amqp_postgres_restart_under_relay: "relay-pg-restart" on Amqp;
    amqp_tcp_cut_relay_to_database: "relay-cut-db" on Amqp;
    amqp_mariadb_restart_under_relay: "relay-mariadb-restart" on Amqp;
    nats_mariadb_restart_under_relay: "relay-mariadb-restart" on Nats;
    amqp_tcp_cut_relay_to_mariadb: "relay-cut-mariadb" on Amqp;
    nats_tcp_cut_relay_to_mariadb: "relay-cut-mariadb" on Nats;
    amqp_random_sigkills_inbox_mode: "sigkill+inbox" on Amqp;
    nats_concurrent_duplicates_inbox_mode: "duplicates+inbox" on Nats;
}
