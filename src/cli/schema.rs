//! `steadfast schema`: the SQL that creates the inbox's or the outbox's table on one
//! database, with the table name you choose, for your own migrations. It is the SQL the
//! stores' `migrate()` runs and their `schema_sql()` returns (files under `sql/`), and
//! needs no database connection.

use super::CliError;
use crate::sql::Table;
use clap::ValueEnum;

/// Which store's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Store {
    /// The inbox / idempotency store (`steadfast_inbox`).
    Inbox,
    /// The transactional outbox (`steadfast_outbox`).
    Outbox,
}

/// Which database's SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Database {
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
    /// MySQL 8.0+ / MariaDB 10.6+.
    Mysql,
}

/// The statements for `store` on `database`, for table `table` (default
/// `steadfast_inbox` / `steadfast_outbox`; `name` or `schema.name`).
pub(super) fn render(
    store: Store,
    database: Database,
    table: Option<&str>,
) -> Result<String, CliError> {
    let template = match (store, database) {
        (Store::Inbox, Database::Postgres) => include_str!("../../sql/postgres/inbox.sql"),
        (Store::Inbox, Database::Sqlite) => include_str!("../../sql/sqlite/inbox.sql"),
        (Store::Inbox, Database::Mysql) => include_str!("../../sql/mysql/inbox.sql"),
        (Store::Outbox, Database::Postgres) => include_str!("../../sql/postgres/outbox.sql"),
        (Store::Outbox, Database::Sqlite) => include_str!("../../sql/sqlite/outbox.sql"),
        (Store::Outbox, Database::Mysql) => include_str!("../../sql/mysql/outbox.sql"),
    };
    let default = match store {
        Store::Inbox => "steadfast_inbox",
        Store::Outbox => "steadfast_outbox",
    };
    let table = Table::parse(table.unwrap_or(default)).map_err(|e| CliError(e.to_string()))?;
    Ok(table.render(template))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_filled_with_the_chosen_name() {
        for store in [Store::Inbox, Store::Outbox] {
            for db in [Database::Postgres, Database::Sqlite, Database::Mysql] {
                let sql = render(store, db, Some("app.orders_box")).unwrap();
                assert!(!sql.contains('{'), "{store:?} {db:?}: {sql}");
                assert!(
                    sql.contains("CREATE TABLE IF NOT EXISTS app.orders_box"),
                    "{store:?} {db:?}: {sql}"
                );
                let default = render(store, db, None).unwrap();
                assert!(default.contains("steadfast_"), "{store:?} {db:?}");
            }
        }
    }

    #[test]
    fn a_name_that_is_not_an_identifier_is_refused() {
        let e = render(Store::Outbox, Database::Postgres, Some("x; DROP TABLE y")).unwrap_err();
        assert!(e.0.contains("invalid table name"), "{}", e.0);
    }
}
