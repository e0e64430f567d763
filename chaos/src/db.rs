//! The sink's SQLite file, read directly (tables `results` and `dead_letters`), and the lock
//! that makes it unwritable for a while: an exclusive transaction held open by the suite.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{Connection, Row, SqliteConnection};

/// A terminal row, as much of it as the checks read.
#[derive(Debug, Clone)]
pub struct ResultRow {
    pub status: String,
    pub completion: String,
    pub stored_unix_ms: i64,
}

/// A dead-letter record.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub id: String,
    pub request_id: String,
    pub stage: String,
    pub stream: String,
    pub reason: String,
}

/// Read access to the sink's database.
pub struct Db {
    pool: SqlitePool,
    path: PathBuf,
}

impl Db {
    /// Opens the file the sink created (it must exist: the sink migrates it at start-up).
    pub async fn open(path: &Path) -> anyhow::Result<Db> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(false)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new().max_connections(2).connect_with(options).await?;
        Ok(Db { pool, path: path.to_owned() })
    }

    /// Every terminal row by request id.
    pub async fn results(&self) -> anyhow::Result<HashMap<String, ResultRow>> {
        let rows = sqlx::query("SELECT request_id, status, completion, stored_unix_ms FROM results")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let row = ResultRow {
                    status: r.get("status"),
                    completion: r.get("completion"),
                    stored_unix_ms: r.get("stored_unix_ms"),
                };
                (r.get("request_id"), row)
            })
            .collect())
    }

    /// Request ids of COMPLETED rows stored at or after `since_ms`, with when.
    pub async fn completed_since(&self, since_ms: i64) -> anyhow::Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT request_id, stored_unix_ms FROM results WHERE status = 'COMPLETED' AND stored_unix_ms >= ?",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.get("request_id"), r.get("stored_unix_ms"))).collect())
    }

    pub async fn dead_letters(&self) -> anyhow::Result<Vec<DeadLetter>> {
        let rows =
            sqlx::query("SELECT id, request_id, stage, stream, reason FROM dead_letters").fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .map(|r| DeadLetter {
                id: r.get("id"),
                request_id: r.get("request_id"),
                stage: r.get("stage"),
                stream: r.get("stream"),
                reason: r.get("reason"),
            })
            .collect())
    }

    /// Takes the database's write lock (`BEGIN EXCLUSIVE` on a connection of its own) and
    /// returns once it is held; dropping or releasing the guard rolls back.
    pub async fn lock(&self) -> anyhow::Result<DbLock> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", self.path.display()))?
            .busy_timeout(Duration::from_secs(30));
        let mut connection = SqliteConnection::connect_with(&options).await?;
        sqlx::query("BEGIN EXCLUSIVE").execute(&mut connection).await?;
        Ok(DbLock { connection })
    }
}

/// The held write lock.
pub struct DbLock {
    connection: SqliteConnection,
}

impl DbLock {
    pub async fn release(mut self) -> anyhow::Result<()> {
        sqlx::query("ROLLBACK").execute(&mut self.connection).await?;
        self.connection.close().await?;
        Ok(())
    }
}
