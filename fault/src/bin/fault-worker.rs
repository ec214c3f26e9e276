//! One worker process of the fault suite: a steadfast worker with the model's handler,
//! or an outbox relay, configured by `FW_*` environment variables (see
//! `steadfast_fault::spec`). Prints `ready`, then `stats ...` lines on stdout.

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Err(e) = steadfast_fault::worker::main().await {
        eprintln!("fault-worker: {e}");
        std::process::exit(2);
    }
}
