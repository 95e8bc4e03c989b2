-- sqlite-outbox on PostgreSQL, migration 3 -> 4: a priority per event
-- (frozen history; never edited). Run by the crate with `search_path` set
-- to the outbox's schema, in one transaction, under its advisory lock.
--
-- A column with a constant default is added without rewriting the table;
-- every existing row reads 0, the lowest priority, which writers that do
-- not know the column keep writing. The urgent events have an index of
-- their own (see schema.postgres.sql).

ALTER TABLE outbox_events ADD COLUMN priority smallint NOT NULL DEFAULT 0
    CONSTRAINT priority_is_0_to_255 CHECK (priority BETWEEN 0 AND 255);

CREATE INDEX outbox_events_urgent
    ON outbox_events (priority DESC, next_attempt_at, seq)
    WHERE status = 'pending' AND priority > 0;

CREATE OR REPLACE VIEW outbox_events_readable AS
    SELECT seq, id, event_type, payload, status, attempts, max_attempts,
           to_timestamp(next_attempt_at / 1000.0) AS next_attempt_at,
           to_timestamp(locked_until / 1000.0) AS locked_until,
           to_timestamp(completed_at / 1000.0) AS completed_at,
           to_timestamp(delivered_at / 1000.0) AS delivered_at,
           last_error, correlation_id, org_id, user_id, ordering_key, idempotency_key,
           to_timestamp(created_at / 1000.0) AS created_at, traceparent, priority
    FROM outbox_events;

UPDATE outbox_meta SET value = 4 WHERE key = 'schema_version';
