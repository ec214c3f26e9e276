//! The fault suite's cluster scenarios, short run: a three-node RabbitMQ cluster
//! (`scripts/brokers.sh rabbitmq-cluster`, nodes on 127.0.0.1:5701-5703, started here if
//! it is not running), worker processes given all three nodes, a few thousand messages
//! (`CLUSTER_N`, default 3000) with a poison message every 50, and one node fault while
//! they flow: half the messages are published before the fault, the other half once it
//! is in place, so there is work (and poison to dead-letter) while the node is down. Each test asserts the model's checks — nothing lost, no duplicate effect,
//! every poison message dead-lettered with its reason and no healthy one, nothing left
//! unacked, the system drained by itself — and, on the cluster: consumption resumed on
//! the other nodes while the node was down, and the dead letters read and replayed
//! after the fault moved leaders.
//!
//! The leader restart, the rolling restart and the node kill's second test publish
//! through the outbox relay, which goes through the same fault: every committed row
//! must be published, and the copies beyond one (at-least-once) are counted.
//!
//! The node paused with SIGSTOP for 30 s (`cluster-pause`) takes over 70 s, most of it
//! the pause itself, so it is in the long run only:
//! `FAULT_N=2000 FAULT_ONLY=SIGSTOPped fault-suite` (see `docs/reliability.md`).
//!
//! The tests kill, stop and pause nodes of that cluster only (never the machine's own
//! RabbitMQ); a guard starts every node again whatever happens. `scripts/test.sh` runs
//! this binary alone, one test at a time.

use std::time::Duration;
use steadfast_fault::{
    harness::{self, Env, Publish},
    spec::Broker,
    suite,
};

fn n() -> u64 {
    std::env::var("CLUSTER_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

async fn check(name: &str) {
    let env = Env::from_env(env!("CARGO_BIN_EXE_fault-worker").as_ref());
    let mut s = suite::scenario(name, Broker::Amqp, n()).expect("a cluster scenario");
    assert!(s.fault.is_rabbit_cluster());
    s.deadline = Duration::from_secs(120);
    let row = harness::run(&env, &s, None)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!(
        "{}\n{}",
        harness::table_header(),
        harness::table_line(&row, None)
    );
    assert!(row.passed(), "{}: {}", s.name, row.problems.join("; "));
    assert!(row.messages >= n() / 2, "the ledger has ok publishes");
    assert_eq!(row.lost, 0);
    assert_eq!(row.left_unacked, 0);
    assert!(row.dead_expected > 0 && row.dead_actual == row.dead_expected);
    if s.publish == Publish::Outbox {
        // Every committed row published (none lost, none left in the outbox); copies
        // beyond one are at-least-once, absorbed by the workers' store and counted.
        assert_eq!(row.messages, n(), "every row committed");
        assert_eq!(row.outbox_left, 0);
        eprintln!(
            "{name}: {} rows committed, all published; {} copies recognised as duplicates",
            row.messages, row.duplicates
        );
    }
    let resumed = row.recover.expect("consumption resumed");
    eprintln!("{name}: consumption resumed {resumed:?} after the fault began");
}

macro_rules! scenarios {
    ($($test:ident: $name:literal;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            check($name).await;
        }
    )*};
}

scenarios! {
    workers_node_sigkilled: "cluster-node-kill";
    work_queue_leader_stopped_and_started: "cluster-leader-restart";
    dead_letter_queue_leader_stopped_and_started: "cluster-dlq-leader-restart";
    rolling_restart_of_the_three_nodes: "cluster-rolling";
    outbox_relay_and_workers_node_sigkilled: "cluster-relay-node-kill";
}
