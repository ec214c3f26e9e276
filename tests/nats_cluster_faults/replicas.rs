//! The replica count on the cluster: a stream with another count than the one asked
//! for fails start-up; an R1 stream without a count asked for is a warning.

use crate::{Heal, Job, cluster, logged, seeds};
use steadfast::{
    Context, Worker,
    transport::{Transport, nats::NatsTransport},
};

/// On the cluster, an R1 stream where the worker asks for 3 replicas fails start-up with
/// an error naming the stream and both counts; without a count asked for, the same
/// stream is used with a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_count_mismatch() {
    let _heal = Heal;
    cluster(&["start"]);
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let prefix = format!("sfcrep{tag}");
    let stream = format!("SFC_REP{}", tag.to_uppercase());
    let admin = async_nats::jetstream::new(
        async_nats::ConnectOptions::new()
            .connect(seeds().split(',').map(str::to_owned).collect::<Vec<_>>())
            .await
            .unwrap(),
    );
    admin
        .create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{prefix}.>")],
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .expect("an R1 stream");
    let worker = |replicas: Option<usize>| {
        let (prefix, stream) = (prefix.clone(), stream.clone());
        async move {
            let mut b = NatsTransport::builder(&seeds())
                .subject_prefix(prefix)
                .stream(stream);
            if let Some(n) = replicas {
                b = b.replicas(n);
            }
            let t = b.connect().await.expect("connects");
            let w = Worker::builder(t.clone(), "replicagroup")
                .handle(|_: Job, _: Context| async { Ok(()) })
                .build()
                .unwrap();
            let started = w.run_until(std::future::ready(())).await;
            t.close().await;
            started
        }
    };
    let before = logged();
    let e = worker(Some(3)).await.expect_err("R1 stream, 3 asked for");
    let text = e.to_string();
    println!("replicas(3) on an R1 stream: {text}");
    assert!(
        text.contains(&format!("stream `{stream}`"))
            && text.contains("1 replica")
            && text.contains("3 were asked for"),
        "the error names the stream and both counts: {text}"
    );
    worker(None)
        .await
        .expect("without a count the R1 stream is used");
    let warned = logged()[before.len()..]
        .lines()
        .find(|l| l.contains("single replica on a NATS cluster") && l.contains(&stream))
        .map(str::to_owned);
    println!("without a count: {warned:?}");
    assert!(warned.is_some(), "a warning names the R1 stream");
    let _ = admin.delete_stream(&stream).await;
    let _ = admin.delete_stream(format!("{stream}_DLQ")).await;
}
