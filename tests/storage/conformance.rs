//! The store conformance suite (`steadfast::testing::stores`) on every database:
//! PostgreSQL and MariaDB on 127.0.0.1 (`DATABASE_URL`, `MYSQL_URL`), SQLite in files.

steadfast::store_conformance_tests!(
    postgres_stores,
    steadfast::testing::stores::PostgresFactory::local()
);
steadfast::store_conformance_tests!(sqlite_stores, steadfast::testing::stores::SqliteFactory);
#[cfg(feature = "mysql")]
steadfast::store_conformance_tests!(
    mysql_stores,
    steadfast::testing::stores::MySqlFactory::local()
);
