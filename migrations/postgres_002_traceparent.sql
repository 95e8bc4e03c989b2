-- sqlite-outbox on PostgreSQL, migration 1 -> 2: a traceparent column
-- (frozen history; never edited). Run by the crate with `search_path` set
-- to the outbox's schema, in one transaction, under its advisory lock.

ALTER TABLE outbox_events ADD COLUMN traceparent text
    CONSTRAINT traceparent_is_w3c
    CHECK (traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$');

CREATE OR REPLACE VIEW outbox_events_readable AS
    SELECT seq, id, event_type, payload, status, attempts, max_attempts,
           to_timestamp(next_attempt_at / 1000.0) AS next_attempt_at,
           to_timestamp(locked_until / 1000.0) AS locked_until,
           to_timestamp(completed_at / 1000.0) AS completed_at,
           to_timestamp(delivered_at / 1000.0) AS delivered_at,
           last_error, correlation_id, org_id, user_id, ordering_key, idempotency_key,
           to_timestamp(created_at / 1000.0) AS created_at, traceparent
    FROM outbox_events;

UPDATE outbox_meta SET value = 2 WHERE key = 'schema_version';
