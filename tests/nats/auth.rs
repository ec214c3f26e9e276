//! Authentication against nats-servers that require it (user and password, token, NKey,
//! a `.creds` file in operator mode), started by the tests on 127.0.0.1:4271-4273 and
//! 4280: the worker (configured from the environment, as a container is) and the CLI
//! each connect and work, and nothing either prints at `trace` — async-nats's own lines included — holds the secret.

use crate::{counting_worker, servers::OwnServer, unique};
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    process::Command,
    sync::{Arc, Mutex, Once, atomic::Ordering},
    time::{Duration, Instant},
};
use steadfast::{
    Envelope, Message,
    config::WorkerConfig,
    transport::{Health, Transport, nats::NatsTransport},
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(name = "auth.ping")]
struct Ping {
    n: u64,
}

/// Everything this process logged, at every level and from every crate.
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Sink;

impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut log = LOG.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() < 256 << 20 {
            log.extend_from_slice(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends every event of every crate (async-nats included) at `trace` to [`LOG`].
fn capture_traces() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
            .with_ansi(false)
            .with_writer(|| Sink)
            .try_init();
    });
}

/// Asserts that this process traced async-nats's connection lines and that nothing it
/// logged holds `canary`.
fn assert_log_clean(canary: &str) {
    let log = String::from_utf8_lossy(&LOG.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    assert!(
        log.contains("write operation: CONNECT"),
        "async-nats traced"
    );
    assert_clean("the worker's trace log", &log, canary);
}

/// Connecting with `url` (wrong credentials) fails with an error that does not show
/// `canary`.
async fn refused_quietly(url: &str, canary: &str) {
    let e = NatsTransport::builder(url).connect().await.unwrap_err();
    assert_clean("the error", &format!("{e} {e:?}"), canary);
}

/// Asserts `text` holds no part of the secret that identifies it (raw or URL-encoded).
fn assert_clean(what: &str, text: &str, canary: &str) {
    assert!(
        !text.contains(canary),
        "{what} shows the secret: {}",
        text.lines()
            .filter(|l| l.contains(canary))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Runs a worker configured by `env` (plus a unique prefix and stream) until it handled
/// one message, and returns the prefix and stream it used.
async fn worker_handles_one(env: &[(&str, String)]) -> (String, String) {
    let u = unique("auth");
    let prefix = format!("sft{u}");
    let stream = format!("SFAUTH_{}", u.to_uppercase());
    let mut vars: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    vars.insert("STEADFAST_NATS_SUBJECT_PREFIX".into(), prefix.clone());
    vars.insert("STEADFAST_NATS_STREAM".into(), stream.clone());
    let cfg = WorkerConfig::from_lookup(|n| vars.get(n).cloned()).expect("valid configuration");
    let transport: Arc<dyn Transport> = cfg.connect().await.expect("connects with credentials");
    assert_eq!(transport.health(), Health::Connected);
    let (worker, handled) = counting_worker::<Ping>(transport.clone(), "authgroup");
    worker.declare().await.unwrap();
    transport
        .publish(&Envelope::encode(&Ping { n: 1 }).unwrap())
        .await
        .expect("publish with credentials");
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { worker.run_until(token.cancelled_owned()).await });
    let start = Instant::now();
    while handled.load(Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "message not handled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    transport.close().await;
    (prefix, stream)
}

/// Runs `steadfast dlq list authgroup` with `args` and logs at `trace`; returns what it
/// printed (stdout and stderr).
fn cli_lists(args: &[&str], prefix: &str, stream: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_steadfast"))
        .args(["dlq", "list", "authgroup", "--subject-prefix", prefix])
        .args(["--stream", stream])
        .args(args)
        .env("RUST_LOG", "trace")
        .env_remove("AMQP_URL")
        .env_remove("NATS_URL")
        .output()
        .expect("the steadfast binary runs");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "steadfast dlq list failed: {text}");
    assert!(
        text.contains("write operation: CONNECT"),
        "the CLI's trace output does not show async-nats's lines: {text}"
    );
    text
}

fn secret_file(content: &str) -> (tempfile_path::Path, String) {
    let p = tempfile_path::Path::new();
    std::fs::write(&p.0, format!("{content}\n")).unwrap();
    let s = p.0.to_str().unwrap().to_owned();
    (p, s)
}

/// A file removed on drop.
mod tempfile_path {
    pub(super) struct Path(pub(super) std::path::PathBuf);
    impl Path {
        pub(super) fn new() -> Self {
            Self(std::env::temp_dir().join(format!("steadfast-secret-{}", uuid::Uuid::now_v7())))
        }
    }
    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// User and password: from the URL, and from `STEADFAST_BROKER_PASSWORD_FILE` applied to
/// each URL of a seed list (the first seed answers nobody); a wrong password is refused
/// with an error that does not show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_hidden() {
    const CANARY: &str = "C4NARYuserpw";
    let password = format!("pw/{CANARY}+x y");
    let server = OwnServer::start(
        4271,
        &format!("authorization {{ user: sfuser, password: {password:?} }}"),
    )
    .await;
    capture_traces();
    let (_pw, pw_path) = secret_file(&password);
    let seeds = format!(
        "nats://sfuser@127.0.0.1:4279,nats://sfuser@127.0.0.1:{}",
        server.port
    );
    let (prefix, stream) = worker_handles_one(&[
        ("STEADFAST_BROKER_URL", seeds),
        ("STEADFAST_BROKER_PASSWORD_FILE", pw_path),
    ])
    .await;

    let mut in_url = url::Url::parse(&format!("nats://sfuser@127.0.0.1:{}", server.port)).unwrap();
    in_url.set_password(Some(&password)).unwrap();
    let in_url = in_url.to_string();
    let t = NatsTransport::builder(&in_url)
        .connect()
        .await
        .expect("password in the URL");
    assert_clean("Debug", &format!("{t:?}"), CANARY);
    t.close().await;
    let printed = cli_lists(&["--url", &in_url], &prefix, &stream);
    assert_clean("the CLI", &printed, CANARY);

    refused_quietly(
        &format!("nats://sfuser:W{CANARY}@127.0.0.1:{}", server.port),
        CANARY,
    )
    .await;
    refused_quietly(&format!("nats://sfuser:{CANARY}@127.0.0.1:1"), CANARY).await;

    assert_log_clean(CANARY);
}

/// A token, in the URL (`nats://TOKEN@host`) and in `STEADFAST_NATS_TOKEN_FILE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_authenticates_and_stays_hidden() {
    const CANARY: &str = "C4NARYtoken";
    let token = format!("tok-{CANARY}-7f3a9");
    let server = OwnServer::start(4272, &format!("authorization {{ token: {token:?} }}")).await;
    capture_traces();
    let in_url = format!("nats://{token}@127.0.0.1:{}", server.port);
    let (prefix, stream) = worker_handles_one(&[("STEADFAST_BROKER_URL", in_url.clone())]).await;
    let (_f, token_path) = secret_file(&token);
    worker_handles_one(&[
        (
            "STEADFAST_BROKER_URL",
            format!("nats://127.0.0.1:{}", server.port),
        ),
        ("STEADFAST_NATS_TOKEN_FILE", token_path),
    ])
    .await;
    let printed = cli_lists(&["--url", &in_url], &prefix, &stream);
    assert_clean("the CLI", &printed, CANARY);
    refused_quietly(
        &format!("nats://tok-W{CANARY}@127.0.0.1:{}", server.port),
        CANARY,
    )
    .await;
    assert_log_clean(CANARY);
}

/// An NKey: the server knows the public key, the worker reads the seed from
/// `STEADFAST_NATS_NKEY_FILE`, the CLI from `--nats-nkey-file`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_authenticates_and_stays_hidden() {
    let pair = nkeys::KeyPair::new_user();
    let seed = pair.seed().unwrap();
    // The seed's tail is what must never show.
    let canary = seed[seed.len() - 20..].to_owned();
    let server = OwnServer::start(
        4273,
        &format!(
            "authorization {{ users = [ {{ nkey: {:?} }} ] }}",
            pair.public_key()
        ),
    )
    .await;
    capture_traces();
    let (_f, seed_path) = secret_file(&seed);
    let url = format!("nats://127.0.0.1:{}", server.port);
    let (prefix, stream) = worker_handles_one(&[
        ("STEADFAST_BROKER_URL", url.clone()),
        ("STEADFAST_NATS_NKEY_FILE", seed_path.clone()),
    ])
    .await;
    let printed = cli_lists(
        &["--url", &url, "--nats-nkey-file", &seed_path],
        &prefix,
        &stream,
    );
    assert_clean("the CLI", &printed, &canary);
    // Without the key: refused.
    assert!(NatsTransport::builder(&url).connect().await.is_err());
    assert_log_clean(&canary);
}

/// A `.creds` file (user JWT + seed) against a server in operator mode (operator and
/// account JWTs, memory resolver): the worker reads it from
/// `STEADFAST_NATS_CREDENTIALS_FILE`, the CLI from `--nats-creds-file`; neither the seed
/// nor the JWT shows in anything printed at `trace`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_file_authenticates_and_stays_hidden() {
    let keys = crate::jwt::Decentralised::new();
    let seed_tail = keys.user_seed[keys.user_seed.len() - 20..].to_owned();
    // The JWT's signature: what makes it a credential.
    let jwt_sig = keys.user_jwt.rsplit('.').next().unwrap()[..24].to_owned();
    let (_op, op_path) = secret_file(&keys.operator_jwt);
    let server = OwnServer::start(4280, &keys.server_conf(&op_path)).await;
    capture_traces();
    let (_c, creds_path) = secret_file(&keys.creds());
    let url = format!("nats://127.0.0.1:{}", server.port);
    let (prefix, stream) = worker_handles_one(&[
        ("STEADFAST_BROKER_URL", url.clone()),
        ("STEADFAST_NATS_CREDENTIALS_FILE", creds_path.clone()),
    ])
    .await;
    let printed = cli_lists(
        &["--url", &url, "--nats-creds-file", &creds_path],
        &prefix,
        &stream,
    );
    assert_clean("the CLI", &printed, &seed_tail);
    assert_clean("the CLI", &printed, &jwt_sig);
    // Without the file: refused; with a user of another account: refused too.
    assert!(NatsTransport::builder(&url).connect().await.is_err());
    let (_o, other_path) = secret_file(&crate::jwt::Decentralised::new().creds());
    let e = NatsTransport::builder(&url)
        .credentials_file(&other_path)
        .connect()
        .await
        .unwrap_err();
    assert_clean("the error", &format!("{e} {e:?}"), &seed_tail);
    assert_log_clean(&seed_tail);
    assert_log_clean(&jwt_sig);
}
