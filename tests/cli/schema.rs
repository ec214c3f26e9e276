//! `steadfast schema` as a user runs it: its output piped into the database's own client
//! (`psql`, `mariadb`) creates a table the outbox then uses without `migrate()`.

use super::*;
use std::process::Stdio;
use steadfast::outbox::{MySqlOutbox, PostgresOutbox};

/// `steadfast schema <args>` piped into `client`: both must succeed.
fn pipe(args: &[&str], client: &str, client_args: &[&str]) {
    let out = std::process::Command::new(steadfast_bin())
        .arg("schema")
        .args(args)
        .output()
        .expect("run steadfast schema");
    assert!(
        out.status.success(),
        "steadfast schema {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut c = std::process::Command::new(client)
        .args(client_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{client} (the database's client) must be installed: {e}"));
    use std::io::Write;
    c.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let r = c.wait_with_output().unwrap();
    assert!(
        r.status.success(),
        "{client}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn printed_outbox_schema_applied_by_psql_and_mariadb_serves_the_outbox() {
    // PostgreSQL, in a schema of its own.
    let pg = Pg::new().await;
    let table = format!("{}.orders_outbox", pg.schema);
    pipe(
        &["outbox", "postgres", "--table", &table],
        "psql",
        &[
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "postgres://postgres@127.0.0.1:5432/test",
        ],
    );
    let o = PostgresOutbox::new(pg.pool.clone())
        .with_table(&table)
        .unwrap();
    let mut tx = pg.pool.begin().await.unwrap();
    o.enqueue(&mut tx, &Alpha { n: 1 }).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(o.status().await.unwrap().pending, 1);
    pg.drop_schema().await;

    // MySQL / MariaDB.
    let table = format!("cli_{}_outbox", uuid::Uuid::now_v7().simple());
    pipe(
        &["outbox", "mysql", "--table", &table],
        "mariadb",
        &["-h", "127.0.0.1", "-u", "root", "test"],
    );
    let pool = steadfast::idempotency::mysql::connect("mysql://root@127.0.0.1:3306/test")
        .await
        .expect("MariaDB must run on 127.0.0.1:3306 (database test)");
    let o = MySqlOutbox::new(pool.clone()).with_table(&table).unwrap();
    let mut tx = pool.begin().await.unwrap();
    o.enqueue(&mut tx, &Alpha { n: 1 }).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(o.status().await.unwrap().pending, 1);
    sqlx::query(AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(&pool)
        .await
        .unwrap();
}

#[test]
fn a_table_name_that_is_no_identifier_is_refused_with_one_line() {
    let out = std::process::Command::new(steadfast_bin())
        .args(["schema", "inbox", "sqlite", "--table", "x; DROP TABLE y"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid table name"), "{err}");
}
