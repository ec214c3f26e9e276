//! The example worker as a container runs it: configuration in the environment,
//! readiness, metrics, SIGTERM; bad configuration; a canary password.

use crate::support::{
    AMQP_URL, WorkerProcess, get, queue_depth, remove_topology, sample, unique, wait_metric,
    wait_status,
};
use std::{process::Command, sync::Arc};
use steadfast::{
    Envelope, Message,
    transport::{Transport, amqp::AmqpTransport},
};

/// The example's message.
#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "jobs.requested")]
struct JobRequested {
    #[message(key)]
    job_id: u64,
    work_ms: u64,
}

/// A process environment.
pub(crate) type Env = Vec<(&'static str, String)>;

/// The environment of a worker on its own exchange and queue prefix.
pub(crate) fn env_for(exchange: &str, url: &str) -> Env {
    vec![
        ("STEADFAST_BROKER_URL", url.to_owned()),
        ("STEADFAST_GROUP", "jobs".to_owned()),
        ("STEADFAST_AMQP_EXCHANGE", exchange.to_owned()),
        ("STEADFAST_AMQP_QUEUE_PREFIX", format!("{exchange}.")),
        ("STEADFAST_HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ("STEADFAST_DRAIN_TIMEOUT", "20s".to_owned()),
    ]
}

pub(crate) async fn publisher(exchange: &str) -> Arc<dyn Transport> {
    Arc::new(
        AmqpTransport::builder(AMQP_URL)
            .exchange(exchange)
            .connect()
            .await
            .expect("RabbitMQ must be running on 127.0.0.1:5672"),
    )
}

pub(crate) async fn publish(t: &Arc<dyn Transport>, job_id: u64, work_ms: u64) {
    let env = Envelope::encode(&JobRequested { job_id, work_ms }).unwrap();
    t.publish(&env).await.expect("published and confirmed");
}

pub(crate) fn done_line(job_id: u64) -> impl Fn(&str) -> bool {
    move |l| l.contains("job done") && l.contains(&format!("\"job_id\":{job_id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drops_readiness_drains_in_flight_work_and_exits_zero() {
    let exchange = unique("ops-proc");
    let mut worker = WorkerProcess::start(&env_for(&exchange, AMQP_URL));
    let addr = worker.http_addr().await;
    wait_status(&addr, "/readyz", 200).await;
    assert_eq!(get(&addr, "/livez").await.0, 200);

    let t = publisher(&exchange).await;
    for id in 1..=5 {
        publish(&t, id, 0).await;
    }
    let scrape = wait_metric(
        &addr,
        "steadfast_worker_outcomes_total",
        &["outcome=\"acked\""],
        5.0,
    )
    .await;
    assert_eq!(
        sample(
            &scrape,
            "messaging_client_consumed_messages_total",
            &["messaging_system=\"rabbitmq\""]
        ),
        5.0,
        "{scrape}"
    );
    assert_eq!(
        sample(&scrape, "messaging_process_duration_seconds_count", &[]),
        5.0,
        "{scrape}"
    );

    // A slow job in flight, then SIGTERM.
    publish(&t, 99, 5_000).await;
    worker
        .line("job 99 started", |l| {
            l.contains("job started") && l.contains("\"job_id\":99")
        })
        .await;
    wait_metric(&addr, "steadfast_worker_in_flight", &[], 1.0).await;
    worker.sigterm();

    // Readiness drops while the job is still running; liveness stays.
    let body = wait_status(&addr, "/readyz", 503).await;
    assert!(body.contains("draining"), "{body}");
    assert!(
        worker.running(),
        "readiness must drop before the process exits"
    );
    assert!(
        !worker
            .stdout
            .lock()
            .unwrap()
            .iter()
            .any(|l| done_line(99)(l)),
        "readiness must drop while in-flight work still runs"
    );
    assert_eq!(get(&addr, "/livez").await.0, 200);

    // Intake has stopped: a message published now stays in the queue.
    publish(&t, 100, 0).await;

    let status = worker.wait().await;
    assert_eq!(status.code(), Some(0), "{}", worker.output());
    assert!(
        worker
            .stdout
            .lock()
            .unwrap()
            .iter()
            .any(|l| done_line(99)(l)),
        "the in-flight job finished before the exit:\n{}",
        worker.output()
    );
    assert!(
        !worker
            .stdout
            .lock()
            .unwrap()
            .iter()
            .any(|l| done_line(100)(l)),
        "nothing was taken in after SIGTERM"
    );
    // Job 99 was acked (not returned to the queue); job 100 waits for the next worker.
    assert_eq!(queue_depth(&format!("{exchange}.jobs")).await, 1);
    t.close().await;
    remove_topology(&exchange, &format!("{exchange}."), "jobs").await;
}

/// The job ids of the log lines with `message`, once each (a repeat fails the test).
fn job_ids(w: &WorkerProcess, message: &str) -> std::collections::BTreeSet<u64> {
    let mut ids = std::collections::BTreeSet::new();
    for l in w.stdout.lock().unwrap().iter() {
        let v: serde_json::Value = match serde_json::from_str(l) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if v["fields"]["message"] == message {
            let id = v["fields"]["job_id"].as_u64().expect("job_id");
            assert!(ids.insert(id), "job {id}: `{message}` logged twice");
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_everything_started_and_exits_zero() {
    const JOBS: u64 = 400;
    let exchange = unique("ops-load");
    let mut env = env_for(&exchange, AMQP_URL);
    env.push(("STEADFAST_CONCURRENCY", "16".to_owned()));
    let mut worker = WorkerProcess::start(&env);
    let addr = worker.http_addr().await;
    wait_status(&addr, "/readyz", 200).await;
    let t = publisher(&exchange).await;
    for id in 1..=JOBS {
        publish(&t, id, 400).await;
    }
    // SIGTERM with the queue still full and handlers running.
    wait_metric(
        &addr,
        "steadfast_worker_outcomes_total",
        &["outcome=\"acked\""],
        50.0,
    )
    .await;
    worker.sigterm();
    let status = worker.wait().await;
    assert_eq!(status.code(), Some(0), "{}", worker.output());

    let started = job_ids(&worker, "job started");
    let done = job_ids(&worker, "job done");
    assert_eq!(
        started, done,
        "every job started before the SIGTERM finished before the exit"
    );
    assert!(
        (done.len() as u64) < JOBS,
        "the SIGTERM came with work still queued ({} of {JOBS} done)",
        done.len()
    );
    // Nothing lost, nothing done twice: what was not done is back in the queue.
    let left = u64::from(queue_depth(&format!("{exchange}.jobs")).await);
    assert_eq!(
        done.len() as u64 + left,
        JOBS,
        "done {} + queued {left}",
        done.len()
    );
    t.close().await;
    remove_topology(&exchange, &format!("{exchange}."), "jobs").await;
}

fn assert_one_line_error(w: &WorkerProcess, code: Option<i32>, must_name: &[&str]) {
    let err = w.stderr.lock().unwrap().clone();
    let lines: Vec<&String> = err.iter().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line, got {lines:?}");
    for m in must_name {
        assert!(lines[0].contains(m), "`{}` should name {m}", lines[0]);
    }
    assert_eq!(code, Some(2), "exit code for {:?}", lines[0]);
}

#[tokio::test]
async fn bad_configuration_is_one_line_and_a_nonzero_exit() {
    let ok = |extra: &[(&'static str, &str)]| {
        let mut env = vec![
            ("STEADFAST_BROKER_URL", AMQP_URL.to_owned()),
            ("STEADFAST_HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ];
        for (k, v) in extra {
            env.retain(|(e, _)| e != k);
            env.push((k, (*v).to_owned()));
        }
        env
    };
    let cases: Vec<(Env, Vec<&str>)> = vec![
        (
            vec![("STEADFAST_HTTP_ADDR", "127.0.0.1:0".to_owned())],
            vec!["STEADFAST_BROKER_URL", "missing"],
        ),
        (
            ok(&[("STEADFAST_HANDLER_TIMEOUT", "30 parsecs")]),
            vec!["STEADFAST_HANDLER_TIMEOUT", "30 parsecs", "not a duration"],
        ),
        (
            ok(&[("STEADFAST_BROKER_URL", "kafka://kafka:9092")]),
            vec!["STEADFAST_BROKER_URL", "unknown scheme `kafka`"],
        ),
        (
            ok(&[(
                "STEADFAST_BROKER_PASSWORD_FILE",
                "/nonexistent/steadfast/password",
            )]),
            vec!["STEADFAST_BROKER_PASSWORD_FILE", "cannot read"],
        ),
    ];
    for (env, must_name) in cases {
        let mut w = WorkerProcess::start(&env);
        let status = w.wait().await;
        assert_one_line_error(&w, status.code(), &must_name);
        assert!(
            w.stdout.lock().unwrap().is_empty(),
            "nothing starts: {:?}",
            w.stdout.lock().unwrap()
        );
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl must be installed beside the local RabbitMQ");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_password_appears_in_no_output() {
    // A user of our own whose password is the canary, given as a mounted secret file.
    let user = unique("ops-canary-user");
    let canary = format!("canary-{}", uuid::Uuid::now_v7().simple());
    rabbitmqctl(&["add_user", &user, &canary]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let dir = std::env::temp_dir().join(unique("ops-secret"));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("broker-password");
    std::fs::write(&secret, format!("{canary}\n")).unwrap();

    let exchange = unique("ops-canary");
    let url = format!("amqp://{user}@127.0.0.1:5672/%2f");
    let mut env = env_for(&exchange, &url);
    env.push((
        "STEADFAST_BROKER_PASSWORD_FILE",
        secret.to_string_lossy().into_owned(),
    ));
    let mut worker = WorkerProcess::start(&env);
    let addr = worker.http_addr().await;
    wait_status(&addr, "/readyz", 200).await;
    let t = publisher(&exchange).await;
    publish(&t, 1, 0).await;
    let metrics = wait_metric(
        &addr,
        "steadfast_worker_outcomes_total",
        &["outcome=\"acked\""],
        1.0,
    )
    .await;
    let probes = format!(
        "{}\n{}",
        get(&addr, "/readyz").await.1,
        get(&addr, "/livez").await.1
    );
    worker.sigterm();
    assert_eq!(worker.wait().await.code(), Some(0), "{}", worker.output());
    let logs = worker.output();
    assert!(
        logs.contains("starting") && logs.contains("***"),
        "the configuration is logged, redacted:\n{logs}"
    );

    // The same secret with a broker that refuses the connection: the error text, too.
    let mut env = env_for(&exchange, &format!("amqp://{user}@127.0.0.1:1/%2f"));
    env.push((
        "STEADFAST_BROKER_PASSWORD_FILE",
        secret.to_string_lossy().into_owned(),
    ));
    env.push(("STEADFAST_CONNECT_TIMEOUT", "5s".to_owned()));
    let mut refused = WorkerProcess::start(&env);
    let status = refused.wait().await;
    assert_eq!(status.code(), Some(1), "{}", refused.output());
    let error_text = refused.output();
    assert!(error_text.contains("error"), "{error_text}");

    // And next to a bad value.
    env.push(("STEADFAST_CONCURRENCY", "lots".to_owned()));
    let mut bad = WorkerProcess::start(&env);
    let status = bad.wait().await;
    assert_one_line_error(&bad, status.code(), &["STEADFAST_CONCURRENCY"]);

    for (what, text) in [
        ("logs", logs),
        ("/metrics", metrics),
        ("probes", probes),
        ("connection error", error_text),
        ("configuration error", bad.output()),
    ] {
        assert!(
            !text.contains(&canary),
            "the canary leaked into {what}:\n{text}"
        );
    }
    t.close().await;
    remove_topology(&exchange, &format!("{exchange}."), "jobs").await;
    rabbitmqctl(&["delete_user", &user]);
    std::fs::remove_dir_all(dir).unwrap();
}
