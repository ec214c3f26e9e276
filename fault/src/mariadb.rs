//! A private MariaDB server for the tests that restart or cut their database, so they
//! never touch the shared server on :3306: its own data directory (made by
//! `mariadb-install-db`), port, socket and pid file under a temporary directory, started
//! with `--no-defaults` (no `/etc/mysql` settings) and `--user=root`, loopback only.
//! Killed and its directory removed when dropped, whatever happened.
//!
//! Self-contained (std and tokio only): `tests/storage_faults` includes this file too.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};
use tokio::process::{Child, Command};

/// The port of private MariaDB servers: `FAULT_MARIADB_PORT`, else 3307.
pub fn private_port() -> u16 {
    std::env::var("FAULT_MARIADB_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3307)
}

/// One private `mariadbd`; see the module.
#[derive(Debug)]
pub struct MariaDb {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl MariaDb {
    /// Creates a data directory with a database `test` and starts the server on `port`
    /// (127.0.0.1); fails if something already listens there.
    pub async fn start(port: u16) -> Result<Self, String> {
        // The previous run's server may still be going away (killed on drop).
        let free_by = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            if Instant::now() > free_by {
                return Err(format!(
                    "port {port} is taken: the private MariaDB needs it free (FAULT_MARIADB_PORT)"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let dir =
            std::env::temp_dir().join(format!("steadfast-mariadb-{port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut s = Self {
            port,
            dir,
            child: None,
        };
        let out = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", s.data().display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--user=root",
                "--skip-test-db",
            ])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("cannot run mariadb-install-db: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mariadb-install-db failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        s.start_again().await?;
        let out = Command::new("mariadb")
            .args(["--no-defaults", "-uroot", "-S"])
            .arg(s.dir.join("sock"))
            .args(["-e", "CREATE DATABASE test"])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("cannot run mariadb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "creating the database: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(s)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `mysql://root@127.0.0.1:PORT/test`.
    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/test", self.port)
    }

    /// Starts the server (again, on the same data directory) and waits until it listens.
    pub async fn start_again(&mut self) -> Result<(), String> {
        let d = &self.dir;
        let mut child = Command::new("/usr/sbin/mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.data().display()))
            .arg(format!("--socket={}", d.join("sock").display()))
            .arg(format!("--pid-file={}", d.join("pid").display()))
            .arg(format!("--log-error={}", d.join("error.log").display()))
            .arg(format!("--port={}", self.port))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=128M",
                "--max-connections=300",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start /usr/sbin/mariadbd: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(d.join("error.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                return Err(format!(
                    "the private mariadbd exited ({status}): {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                ));
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                return Err("the private mariadbd did not listen within 60 s".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.child = Some(child);
        Ok(())
    }

    /// Stops it with SIGTERM (a clean shutdown, as a service restart does) and waits up
    /// to 60 s before killing it.
    pub async fn stop(&mut self) {
        terminate(self.child.take(), Duration::from_secs(60)).await;
    }

    /// [`stop`](Self::stop), then [`start_again`](Self::start_again).
    pub async fn restart(&mut self) -> Result<(), String> {
        self.stop().await;
        self.start_again().await
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `child` SIGTERM and waits up to `within` for it to exit, then kills it.
pub async fn terminate(child: Option<Child>, within: Duration) {
    if let Some(mut c) = child {
        if let Some(pid) = c.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(within, c.wait()).await.is_err() {
            let _ = c.kill().await;
        }
    }
}
