//! nats-servers a test starts for itself (with authentication, on the ports reserved for
//! them, 4271-4280), stopped when the test ends, passed or failed.

use std::{
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The nats-server binary: `STEADFAST_TEST_NATS_SERVER`, else `/usr/sbin/nats-server`
/// if it exists, else `nats-server` from `PATH`.
pub(crate) fn nats_server_bin() -> String {
    std::env::var("STEADFAST_TEST_NATS_SERVER")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            if std::path::Path::new("/usr/sbin/nats-server").exists() {
                "/usr/sbin/nats-server".to_owned()
            } else {
                "nats-server".to_owned()
            }
        })
}

/// A nats-server with JetStream on `127.0.0.1:port`, killed and its store removed on
/// drop.
pub(crate) struct OwnServer {
    child: Child,
    dir: PathBuf,
    /// Its client port.
    pub(crate) port: u16,
}

impl OwnServer {
    /// Starts a server with `conf` (nats-server configuration lines, e.g. an
    /// `authorization` block) and waits until it accepts connections.
    pub(crate) async fn start(port: u16, conf: &str) -> Self {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} is taken: a nats-server left by an earlier run? (`fuser -k {port}/tcp`)"
        );
        let dir = std::env::temp_dir().join(format!(
            "steadfast-nats-{port}-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("server.conf");
        let text = format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {:?} }}\n{conf}\n",
            dir.join("js")
        );
        std::fs::write(&file, text).unwrap();
        let bin = nats_server_bin();
        let log = dir.join("server.log");
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} (STEADFAST_TEST_NATS_SERVER): {e}"));
        let mut server = Self { child, dir, port };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "{bin} on port {port} exited at start: {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "{bin} does not listen on {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
