//! The scenarios: every fault of `docs/reliability.md` on both brokers (the database
//! faults on PostgreSQL and on MariaDB).

use crate::{
    db::Database,
    harness::{Fault, Publish, Scenario},
    spec::{Broker, Mode},
};
use std::time::Duration;

/// Failpoint names (the library's, and the handler's own).
pub mod point {
    /// Inside the handler's transaction, before commit (in the fault-worker's handler).
    pub const BEFORE_COMMIT: &str = "fault::handler::before_commit";
    /// After the outcome is durable, before the broker is told (worker pipeline).
    pub const BEFORE_SETTLE: &str = "steadfast::worker::before_settle";
    /// After the retry copy's confirm, before the ack (RabbitMQ).
    pub const AMQP_RETRY: &str = "steadfast::amqp::retry_confirmed_before_ack";
    /// After the dead letter's confirm, before the ack (RabbitMQ).
    pub const AMQP_DEAD: &str = "steadfast::amqp::dead_letter_confirmed_before_ack";
    /// After the dead letter's PubAck, before the term (NATS).
    pub const NATS_DEAD: &str = "steadfast::nats::dead_letter_confirmed_before_term";
    /// After the broker confirmed a batch, before the rows are marked sent (relay).
    pub const RELAY: &str = "steadfast::relay::confirmed_before_mark_sent";
}

fn sc(name: &str, broker: Broker, n: u64, fault: Fault) -> Scenario {
    Scenario::new(name, broker, n, fault)
}

/// The database scenarios run on the shared PostgreSQL, or (names with `mariadb`) on a
/// private MariaDB server.
fn database_of(name: &str) -> Database {
    if name.contains("mariadb") {
        Database::MariaDb
    } else {
        Database::Postgres
    }
}

/// One scenario by name for `broker` with `n` messages; `None` for a name that does not
/// apply to the broker (RabbitMQ-only faults on NATS).
pub fn scenario(name: &str, broker: Broker, n: u64) -> Option<Scenario> {
    // `NAME+inbox`: the scenario with workers built with `.inbox(store)`.
    if let Some(base) = name.strip_suffix("+inbox") {
        let mut s = scenario(base, broker, n)?;
        s.name.push_str(" (.inbox)");
        s.inbox_mode = true;
        return Some(s);
    }
    let hit = (n / 10).max(3);
    let window = |p: &'static str| Fault::Window { point: p, hit };
    let s = match name {
        "baseline" => sc("no fault (baseline)", broker, n, Fault::None),
        "sigkill" => {
            let mut s = sc(
                "random SIGKILLs",
                broker,
                n,
                Fault::RandomKills {
                    count: 5,
                    every: Duration::from_millis(700),
                },
            );
            s.workers = 3;
            s
        }
        "before-commit" => sc(
            "killed inside the transaction before commit",
            broker,
            n,
            window(point::BEFORE_COMMIT),
        ),
        "before-settle" => sc(
            "killed after commit before ack",
            broker,
            n,
            window(point::BEFORE_SETTLE),
        ),
        "retry-window" => {
            if broker != Broker::Amqp {
                return None; // NATS retries are a Nak: no copy, no window
            }
            let mut s = sc(
                "killed after the retry copy's confirm before ack",
                broker,
                n,
                window(point::AMQP_RETRY),
            );
            s.special = vec![(5, Mode::Transient(1))];
            if let Fault::Window { hit, .. } = &mut s.fault {
                *hit = (n / 50).max(2);
            }
            s
        }
        "dead-window" => {
            let p = match broker {
                Broker::Amqp => point::AMQP_DEAD,
                Broker::Nats => point::NATS_DEAD,
            };
            let mut s = sc(
                "killed after the dead letter's confirm before ack",
                broker,
                n,
                window(p),
            );
            s.special = vec![(20, Mode::Permanent)];
            if let Fault::Window { hit, .. } = &mut s.fault {
                *hit = (n / 200).max(2);
            }
            s
        }
        "windows" => {
            // Every crash window in one run: each replacement worker dies at the next, at
            // its first pass. The windows only some messages reach come first, while
            // there are plenty of them; every message reaches the last two.
            let mut points = match broker {
                Broker::Amqp => vec![point::AMQP_RETRY, point::AMQP_DEAD],
                Broker::Nats => vec![point::NATS_DEAD],
            };
            points.extend([point::BEFORE_SETTLE, point::BEFORE_COMMIT]);
            let mut s = sc(
                "killed at each crash window in turn",
                broker,
                n,
                Fault::Windows(points.into_iter().map(|p| (p, 1)).collect()),
            );
            s.special = vec![(20, Mode::Permanent), (5, Mode::Transient(1))];
            s
        }
        "sigterm" => sc("SIGTERM drain under load", broker, n, Fault::SigtermDrain),
        "rolling" => {
            let mut s = sc(
                "rolling restart of 3 workers",
                broker,
                n,
                Fault::RollingRestart,
            );
            s.workers = 3;
            s
        }
        "broker-restart" => sc(
            match broker {
                Broker::Amqp => "broker restart (stop_app/start_app)",
                Broker::Nats => "broker restart (nats-server)",
            },
            broker,
            n,
            Fault::BrokerRestart,
        ),
        "close-connections" => {
            if broker != Broker::Amqp {
                return None;
            }
            sc("forced connection close", broker, n, Fault::ConnectionClose)
        }
        "cut-broker" => sc("TCP cut worker <-> broker", broker, n, Fault::CutBroker),
        "misbehaving" => {
            let mut s = sc(
                "handlers panic, hang, fail k times; poison",
                broker,
                n,
                Fault::None,
            );
            s.special = vec![
                (50, Mode::Permanent),
                (7, Mode::Panic(1)),
                (11, Mode::Hang(1)),
                (5, Mode::Transient(3)),
            ];
            s
        }
        "crash-loop" => {
            // Several messages that abort the process, among healthy ones at full
            // concurrency with a deep prefetch: each crash returns everything in flight.
            let mut s = sc(
                "crash-loop messages at concurrency 32",
                broker,
                n,
                Fault::None,
            );
            s.special = vec![((n / 4).max(2), Mode::Abort)];
            s.prefetch = 100;
            s.delivery_limit = 12;
            s
        }
        "crash-loop-one" => {
            // One message that aborts the process among n - 1 healthy ones.
            let mut s = sc(
                "one crash-loop message at concurrency 32",
                broker,
                n,
                Fault::None,
            );
            s.special = vec![(n, Mode::Abort)];
            s.prefetch = 100;
            s.delivery_limit = 12;
            s
        }
        "flapping" => {
            let s = sc(
                "flapping connection (cut after 6 KB, 15 s)",
                broker,
                n,
                Fault::Flapping {
                    after_bytes: 6 * 1024,
                    for_: Duration::from_secs(15),
                },
            );
            // The default prefetch (the concurrency, 32). A connection cut every 6 KB
            // delivers a dozen messages before it dies: with a prefetch of 100 the rest
            // of each batch dies in the socket, unseen, and RabbitMQ counts every such
            // return against the work queue's delivery limit (see docs/rabbitmq.md).
            s
        }
        "bad-input" => sc("raw bad input", broker, n, Fault::BadInput),
        "duplicates" => {
            let mut s = sc("every message twice, concurrently", broker, n, Fault::None);
            s.publish = Publish::Twice;
            s.workers = 3;
            s
        }
        "relay-window" => {
            let mut s = sc(
                "relay killed after confirm before marking sent",
                broker,
                n,
                window(point::RELAY),
            );
            s.publish = Publish::Outbox;
            if let Fault::Window { hit, .. } = &mut s.fault {
                *hit = 1; // the first confirmed batch
            }
            s
        }
        "relay-pg-restart" | "relay-mariadb-restart" => {
            let db = database_of(name);
            let mut s = sc(
                &format!("{} restart under relay and workers", db.as_str()),
                broker,
                n,
                Fault::DatabaseRestart,
            );
            s.publish = Publish::Outbox;
            s.database = db;
            s
        }
        "relay-cut-db" | "relay-cut-mariadb" => {
            let db = database_of(name);
            let mut s = sc(
                &format!("TCP cut relay <-> {}", db.as_str()),
                broker,
                n,
                Fault::CutRelayDatabase,
            );
            s.publish = Publish::Outbox;
            s.database = db;
            s
        }
        name if name.starts_with("cluster-") => {
            if broker != Broker::Amqp {
                return None; // the NATS cluster has scenarios of its own
            }
            let (title, fault) = match &name["cluster-".len()..] {
                "node-kill" | "relay-node-kill" => (
                    "cluster: the workers' node SIGKILLed",
                    Fault::ClusterNodeKill,
                ),
                "leader-restart" => (
                    "cluster: work queue leader stop_app/start_app (outbox)",
                    Fault::ClusterLeaderRestart,
                ),
                "dlq-leader-restart" => (
                    "cluster: dead-letter queue leader stop_app/start_app",
                    Fault::ClusterDeadLetterLeaderRestart,
                ),
                "rolling" => (
                    "cluster: rolling restart of the 3 nodes (outbox)",
                    Fault::ClusterRollingRestart,
                ),
                "pause" => (
                    "cluster: the workers' and relay's node, leading the work queue, SIGSTOPped 30 s (outbox)",
                    Fault::ClusterNodePause(Duration::from_secs(30)),
                ),
                _ => return None,
            };
            let mut s = sc(title, broker, n, fault);
            // Poison among the healthy: dead letters to read and replay after the fault.
            s.special = vec![(50, Mode::Permanent)];
            if name == "cluster-relay-node-kill" {
                s.name = "cluster: the relay's and workers' node SIGKILLed (outbox)".to_owned();
            }
            // The outbox relay goes through the same fault as the workers (every
            // committed row published); the node kill and the dead-letter queue's leader
            // keep a publisher of their own.
            if matches!(
                name,
                "cluster-relay-node-kill"
                    | "cluster-leader-restart"
                    | "cluster-rolling"
                    | "cluster-pause"
            ) {
                s.publish = Publish::Outbox;
            }
            s
        }
        _ => return None,
    };
    Some(s)
}

/// Every scenario name, in the order the long run takes them.
pub const ALL: &[&str] = &[
    "baseline",
    "sigkill",
    "before-commit",
    "before-settle",
    "retry-window",
    "dead-window",
    "sigterm",
    "rolling",
    "broker-restart",
    "close-connections",
    "cut-broker",
    "misbehaving",
    "crash-loop",
    "crash-loop-one",
    "flapping",
    "bad-input",
    "duplicates",
    "relay-window",
    "relay-pg-restart",
    "relay-cut-db",
    // The same two on MySQL / MariaDB (a private server on FAULT_MARIADB_PORT, 3307).
    "relay-mariadb-restart",
    "relay-cut-mariadb",
    // The same model with workers that use their store as an inbox (a look, no lease).
    "sigkill+inbox",
    "before-settle+inbox",
    "duplicates+inbox",
    "crash-loop+inbox",
    "flapping+inbox",
    // The three-node RabbitMQ cluster (scripts/brokers.sh rabbitmq-cluster).
    "cluster-node-kill",
    "cluster-leader-restart",
    "cluster-dlq-leader-restart",
    "cluster-rolling",
    "cluster-pause",
    "cluster-relay-node-kill",
];

/// The long run: every scenario on both brokers with `n` messages each.
pub fn long(n: u64) -> Vec<Scenario> {
    let mut out = Vec::new();
    for broker in [Broker::Amqp, Broker::Nats] {
        for name in ALL {
            if let Some(mut s) = scenario(name, broker, n) {
                s.deadline = Duration::from_secs(120 + n / 200);
                out.push(s);
            }
        }
    }
    out
}
