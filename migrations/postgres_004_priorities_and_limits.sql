-- sqlite-outbox on PostgreSQL, migration 3 -> 4: a priority per event,
-- and the limits dispatchers keep (frozen history; never edited). Run by the crate with `search_path` set
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

-- The limits dispatchers keep on a type or a destination (see schema.sql):
-- `max` events at once, or `max` deliveries per `per_ms`; a shared limit's
-- token bucket; since when events wait for it. Times are bigint UTC
-- milliseconds.
CREATE TABLE outbox_limits (
    scope         text    NOT NULL
                  CONSTRAINT outbox_limits_scope_known CHECK (scope IN ('type', 'destination')),
    name          text    NOT NULL
                  CONSTRAINT outbox_limits_name_length CHECK (octet_length(name) BETWEEN 1 AND 255),
    kind          text    NOT NULL
                  CONSTRAINT outbox_limits_kind_known CHECK (kind IN ('concurrency', 'rate')),
    max           bigint  NOT NULL
                  CONSTRAINT outbox_limits_max_positive CHECK (max BETWEEN 1 AND 1000000000),
    per_ms        bigint
                  CONSTRAINT outbox_limits_per_positive CHECK (per_ms >= 1),
    shared        boolean NOT NULL DEFAULT false,
    event_types   json,
    tokens        double precision,
    refilled_at   bigint,
    limited_since bigint,
    updated_at    bigint  NOT NULL,
    PRIMARY KEY (scope, name, kind)
);

UPDATE outbox_meta SET value = 4 WHERE key = 'schema_version';
