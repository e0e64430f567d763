-- One terminal row per request (the request id is the key: inserts are idempotent), plus the
-- dead-letter records. Portable SQL: the same file migrates SQLite and PostgreSQL.
CREATE TABLE IF NOT EXISTS results (
    request_id        TEXT PRIMARY KEY,
    tenant            TEXT NOT NULL,
    user_id           TEXT NOT NULL,
    session_id        TEXT NOT NULL,
    model             TEXT NOT NULL,
    model_version     TEXT NOT NULL,
    status            TEXT NOT NULL,
    reason            TEXT NOT NULL,
    detail            TEXT NOT NULL,
    stage             TEXT NOT NULL,
    prompt            TEXT NOT NULL,
    completion        TEXT NOT NULL,
    -- JSON arrays: moderation verdicts and the per-stage timing record.
    verdicts          TEXT NOT NULL,
    timings           TEXT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    accepted_unix_ms  BIGINT NOT NULL,
    stored_unix_ms    BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS results_by_user ON results (user_id, stored_unix_ms, request_id);
CREATE INDEX IF NOT EXISTS results_by_status ON results (status, stored_unix_ms, request_id);
CREATE INDEX IF NOT EXISTS results_by_time ON results (stored_unix_ms, request_id);

CREATE TABLE IF NOT EXISTS dead_letters (
    -- "<stream>/<sequence>" of the dead message: one record per message, however often retried.
    id              TEXT PRIMARY KEY,
    request_id      TEXT NOT NULL,
    stage           TEXT NOT NULL,
    stream          TEXT NOT NULL,
    subject         TEXT NOT NULL,
    stream_sequence BIGINT NOT NULL,
    deliveries      BIGINT NOT NULL,
    reason          TEXT NOT NULL,
    detail          TEXT NOT NULL,
    -- The undecodable bytes, hex-encoded (portable across both databases).
    payload_hex     TEXT NOT NULL,
    failed_unix_ms  BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS dead_letters_by_request ON dead_letters (request_id);
