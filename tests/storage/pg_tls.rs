//! TLS to PostgreSQL (sqlx with rustls on ring): a private server with `ssl=on` on its
//! own port (`STEADFAST_TEST_PG_TLS_PORT`, 5433), made with `initdb` in a temporary
//! directory, whose certificate comes from a CA this test makes with the `openssl`
//! command. `sslmode=verify-full` with that CA connects over TLS; with another CA the
//! connection fails with a certificate error that does not show the password. The server
//! is stopped when the test ends, whether it passes or not.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

const PASSWORD: &str = "tls-test-pw-6f1c0e";

fn port() -> u16 {
    std::env::var("STEADFAST_TEST_PG_TLS_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5433)
}

/// The newest installed PostgreSQL's `bin` directory.
fn pg_bin(tool: &str) -> PathBuf {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .max()
        })
        .expect("PostgreSQL's server binaries under /usr/lib/postgresql/<version>/bin");
    PathBuf::from(format!("/usr/lib/postgresql/{newest}/bin/{tool}"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Runs `cmd` (as `postgres` when the test runs as root: the server refuses root);
/// panics with its output on failure.
fn run(cmd: &Path, args: &[&str], as_postgres: bool) {
    let mut c = if as_postgres && is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(cmd);
        c
    } else {
        Command::new(cmd)
    };
    let out = c
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cmd.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}{}",
        cmd.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn openssl(args: &[&str]) {
    run(Path::new("openssl"), args, false);
}

/// A CA (`NAME.crt`, `NAME.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let (key, crt) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.crt")),
    );
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN=steadfast test {name}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        crt.to_str().unwrap(),
    ]);
    crt
}

/// A private PostgreSQL with TLS; stopped and its directory removed on drop.
struct TlsPostgres {
    dir: PathBuf,
    port: u16,
}

impl TlsPostgres {
    /// The CA it trusts is `dir/ca.crt`; `dir/other.crt` is a CA it does not use.
    fn start() -> Self {
        let port = port();
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} is taken: the private PostgreSQL needs it (STEADFAST_TEST_PG_TLS_PORT)"
        );
        let dir =
            std::env::temp_dir().join(format!("steadfast-pg-tls-{port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // From here on, drop stops whatever was started and removes the directory.
        let server = Self { dir, port };
        let d = &server.dir;
        let ca = make_ca(d, "ca");
        make_ca(d, "other");
        let (key, csr, crt, ext) = (
            d.join("server.key"),
            d.join("server.csr"),
            d.join("server.crt"),
            d.join("server.ext"),
        );
        std::fs::write(
            &ext,
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            csr.to_str().unwrap(),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            csr.to_str().unwrap(),
            "-CA",
            ca.to_str().unwrap(),
            "-CAkey",
            d.join("ca.key").to_str().unwrap(),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            crt.to_str().unwrap(),
        ]);
        std::fs::write(d.join("pw"), PASSWORD).unwrap();
        if is_root() {
            run(
                Path::new("chown"),
                &["-R", "postgres", d.to_str().unwrap()],
                false,
            );
        }
        run(Path::new("chmod"), &["600", key.to_str().unwrap()], false);
        let data = d.join("data");
        run(
            &pg_bin("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--pwfile",
                d.join("pw").to_str().unwrap(),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ],
            true,
        );
        let opts = format!(
            "-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c ssl=on \
             -c ssl_cert_file={crt} -c ssl_key_file={key} -c fsync=off",
            sock = d.display(),
            crt = crt.display(),
            key = key.display(),
        );
        run(
            &pg_bin("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                d.join("server.log").to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
            true,
        );
        server
    }

    fn url(&self, ca: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
            self.port,
            self.dir.join(ca).display()
        )
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        if data.join("postmaster.pid").exists() {
            let mut c = if is_root() {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(pg_bin("pg_ctl"));
                c
            } else {
                Command::new(pg_bin("pg_ctl"))
            };
            let _ = c
                .arg("-D")
                .arg(&data)
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn verify_full_connects_with_the_servers_ca_and_refuses_another() {
    let server = TlsPostgres::start();

    // The CA that signed the server's certificate: TLS, and the host name checked.
    let pool = steadfast::idempotency::postgres::connect(&server.url("ca.crt"))
        .await
        .expect("verify-full with the server's CA connects");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl, "the connection is encrypted");
    // The stores work over it.
    let store = steadfast::idempotency::PostgresStore::new(pool.clone());
    store.migrate().await.unwrap();
    pool.close().await;

    // Another CA: the server's certificate is not trusted, and the error says so
    // without the password.
    let err = steadfast::idempotency::postgres::connect(&server.url("other.crt"))
        .await
        .expect_err("a certificate from another CA is refused");
    let text = format!("{err} {err:?}");
    eprintln!("with another CA: {err}");
    assert!(
        text.contains("certificate") || text.contains("TLS"),
        "the error names the certificate: {text}"
    );
    assert!(!text.contains(PASSWORD), "the password leaked: {text}");
}
