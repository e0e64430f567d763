//! SQL storage on SQLite (a file, WAL) or PostgreSQL, chosen by URL, through sqlx's `Any`
//! driver and one portable schema. Inserts are idempotent on the request id: the first
//! terminal row of a request wins and a redelivered message changes nothing.
use std::path::Path;

use millrace_proto::v1::TerminalStatus;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::row::{DeadLetterRow, ResultRow};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrating the schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database url {url:?}: {detail}")]
    Url { url: String, detail: String },
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
}

/// One write the sink commits.
#[derive(Debug, Clone)]
pub enum Write {
    Result(Box<ResultRow>),
    /// A dead letter, and the FAILED row its request gets unless it already has one (none when
    /// the dead message was not one request's, e.g. a batch).
    DeadLetter(Box<DeadLetterRow>, Option<Box<ResultRow>>),
}

/// Filters and cursor of a listing, newest rows last.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub user: Option<String>,
    pub status: Option<TerminalStatus>,
    pub page_size: u32,
    pub after: Option<Cursor>,
}

/// Position after the last row of a page: (stored time, request id).
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    pub stored_unix_ms: i64,
    pub request_id: String,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{}.{}", self.stored_unix_ms, self.request_id)
    }

    pub fn decode(token: &str) -> Option<Self> {
        let (ms, id) = token.split_once('.')?;
        Some(Self { stored_unix_ms: ms.parse().ok()?, request_id: id.to_owned() })
    }
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
}

const RESULT_COLUMNS: &str = "request_id, tenant, user_id, session_id, model, model_version, status, reason, detail, \
     stage, prompt, completion, verdicts, timings, prompt_tokens, completion_tokens, accepted_unix_ms, stored_unix_ms, \
     turns_dropped, prompt_tokens_cached";

impl Store {
    /// Opens (creating a SQLite file and its folder when needed) and migrates.
    /// `url` is `postgres://…`, `sqlite://path` or a plain file path.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let url = normalize_url(url)?;
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new().max_connections(if sqlite { 4 } else { 8 }).connect(&url).await?;
        if sqlite {
            // WAL lets the API read while the writer commits; it is a property of the file.
            sqlx::query("PRAGMA journal_mode=WAL").execute(&pool).await?;
        }
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    /// Commits the writes in one transaction. Returns, per write, whether its result row was
    /// new (false: the request already had a terminal row, or the write had none).
    pub async fn commit(&self, writes: &[Write]) -> Result<Vec<bool>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut inserted = Vec::with_capacity(writes.len());
        for write in writes {
            let row = match write {
                Write::Result(row) => Some(row.as_ref()),
                Write::DeadLetter(dead, row) => {
                    insert_dead_letter(&mut tx, dead).await?;
                    row.as_deref()
                }
            };
            inserted.push(match row {
                Some(row) => insert_result(&mut tx, row).await?,
                None => false,
            });
        }
        tx.commit().await?;
        Ok(inserted)
    }

    pub async fn get(&self, request_id: &str) -> Result<Option<ResultRow>, StoreError> {
        let sql = format!("SELECT {RESULT_COLUMNS} FROM results WHERE request_id = $1");
        let row = sqlx::query(&sql).bind(request_id).fetch_optional(&self.pool).await?;
        row.map(|r| result_from_row(&r)).transpose()
    }

    /// One page of rows in storage order, with the cursor of the next page if there is one.
    pub async fn list(&self, q: &ListQuery) -> Result<(Vec<ResultRow>, Option<Cursor>), StoreError> {
        let after = q.after.clone().unwrap_or(Cursor { stored_unix_ms: i64::MIN, request_id: String::new() });
        // Empty filters match everything, so one statement serves every combination.
        let sql = format!(
            "SELECT {RESULT_COLUMNS} FROM results \
             WHERE ($1 = '' OR user_id = $1) AND ($2 = '' OR status = $2) \
               AND (stored_unix_ms > $3 OR (stored_unix_ms = $3 AND request_id > $4)) \
             ORDER BY stored_unix_ms, request_id LIMIT $5"
        );
        let rows = sqlx::query(&sql)
            .bind(q.user.clone().unwrap_or_default())
            .bind(q.status.map(|s| s.name()).unwrap_or_default())
            .bind(after.stored_unix_ms)
            .bind(after.request_id)
            .bind(i64::from(q.page_size) + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut page = rows.iter().map(result_from_row).collect::<Result<Vec<_>, _>>()?;
        let next = (page.len() > q.page_size as usize).then(|| {
            page.truncate(q.page_size as usize);
            let last = page.last().expect("page_size ≥ 1");
            Cursor { stored_unix_ms: last.stored_unix_ms, request_id: last.request_id.clone() }
        });
        Ok((page, next))
    }
}

fn normalize_url(url: &str) -> Result<String, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(url.to_owned());
    }
    let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() {
        return Err(StoreError::Url { url: url.to_owned(), detail: "no database file".into() });
    }
    if let Some(dir) = Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Url { url: url.to_owned(), detail: format!("creating {}: {e}", dir.display()) })?;
    }
    Ok(format!("sqlite://{path}?mode=rwc"))
}

async fn insert_result(tx: &mut sqlx::Transaction<'_, sqlx::Any>, row: &ResultRow) -> Result<bool, StoreError> {
    let sql = format!(
        "INSERT INTO results ({RESULT_COLUMNS}) VALUES \
         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20) \
         ON CONFLICT (request_id) DO NOTHING"
    );
    let done = sqlx::query(&sql)
        .bind(&row.request_id)
        .bind(&row.tenant)
        .bind(&row.user)
        .bind(&row.session)
        .bind(&row.model)
        .bind(&row.model_version)
        .bind(row.status.name())
        .bind(&row.reason)
        .bind(&row.detail)
        .bind(&row.stage)
        .bind(&row.prompt)
        .bind(&row.completion)
        .bind(serde_json::to_string(&row.verdicts).expect("verdicts serialize"))
        .bind(serde_json::to_string(&row.timings).expect("timings serialize"))
        .bind(i64::from(row.prompt_tokens))
        .bind(i64::from(row.completion_tokens))
        .bind(row.accepted_unix_ms)
        .bind(row.stored_unix_ms)
        .bind(i64::from(row.turns_dropped))
        .bind(i64::from(row.prompt_tokens_cached))
        .execute(&mut **tx)
        .await?;
    Ok(done.rows_affected() == 1)
}

async fn insert_dead_letter(tx: &mut sqlx::Transaction<'_, sqlx::Any>, d: &DeadLetterRow) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO dead_letters (id, request_id, stage, stream, subject, stream_sequence, deliveries, reason, \
         detail, payload_hex, failed_unix_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&d.id)
    .bind(&d.request_id)
    .bind(&d.stage)
    .bind(&d.stream)
    .bind(&d.subject)
    .bind(d.stream_sequence as i64)
    .bind(d.deliveries as i64)
    .bind(&d.reason)
    .bind(&d.detail)
    .bind(&d.payload_hex)
    .bind(d.failed_unix_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn result_from_row(r: &AnyRow) -> Result<ResultRow, StoreError> {
    let json = |col: &str| -> Result<String, StoreError> { Ok(r.try_get::<String, _>(col)?) };
    let corrupt = |e: serde_json::Error| StoreError::Corrupt(e.to_string());
    Ok(ResultRow {
        request_id: r.try_get("request_id")?,
        tenant: r.try_get("tenant")?,
        user: r.try_get("user_id")?,
        session: r.try_get("session_id")?,
        model: r.try_get("model")?,
        model_version: r.try_get("model_version")?,
        status: {
            let name: String = r.try_get("status")?;
            TerminalStatus::parse(&name).ok_or_else(|| StoreError::Corrupt(format!("unknown status {name:?}")))?
        },
        reason: r.try_get("reason")?,
        detail: r.try_get("detail")?,
        stage: r.try_get("stage")?,
        prompt: r.try_get("prompt")?,
        completion: r.try_get("completion")?,
        verdicts: serde_json::from_str(&json("verdicts")?).map_err(corrupt)?,
        timings: serde_json::from_str(&json("timings")?).map_err(corrupt)?,
        prompt_tokens: r.try_get::<i64, _>("prompt_tokens")? as u32,
        completion_tokens: r.try_get::<i64, _>("completion_tokens")? as u32,
        turns_dropped: r.try_get::<i64, _>("turns_dropped")? as u32,
        prompt_tokens_cached: r.try_get::<i64, _>("prompt_tokens_cached")? as u32,
        // Answered live to the client that asked; not kept.
        logprobs: Vec::new(),
        accepted_unix_ms: r.try_get("accepted_unix_ms")?,
        stored_unix_ms: r.try_get("stored_unix_ms")?,
    })
}
