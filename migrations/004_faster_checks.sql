-- sqlite-outbox migration 3 -> 4: the same rules, checked faster (frozen
-- history; never edited).
--
-- `status_is_known` said `status IN ('pending', 'processing', 'done',
-- 'failed')`. SQLite evaluates a CHECK's IN list of more than two values by
-- building a temporary b-tree, on every insert and on every update that
-- changes `status`: every claim and every outcome, about half of all the
-- work of dispatching an event. Version 4 spells the same rule as
-- comparisons joined by OR, which accepts exactly the same rows.
--
-- A CHECK constraint can only change by rebuilding the table (the SQLite
-- way to change a table's definition): the view that reads it is dropped
-- first and made again after, the rows are copied as they are (with
-- `PRAGMA ignore_check_constraints = ON`, set by the crate), the sequence is
-- kept, and the indexes are made again.
--
-- The crate runs this script in one write transaction: a crash or a power
-- cut leaves the version-3 file as it was.

DROP VIEW outbox_events_failed;

CREATE TABLE outbox_events_v4 (
    -- Enqueue order. Ordering keys and claims follow it. AUTOINCREMENT: a
    -- number is never given out twice, even after the newest events are
    -- purged, so it can serve as a cursor. Numbers may skip.
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    -- Public identity: a UUID in its hyphenated lowercase text form (the
    -- one canonical spelling). The crate writes time-ordered v7 UUIDs; the
    -- default makes a random v4 one.
    id              TEXT    NOT NULL UNIQUE DEFAULT (
                        lower(hex(randomblob(4))) || '-' ||
                        lower(hex(randomblob(2))) || '-4' ||
                        substr(lower(hex(randomblob(2))), 2) || '-' ||
                        substr('89ab', 1 + (random() & 3), 1) ||
                        substr(lower(hex(randomblob(2))), 2) || '-' ||
                        lower(hex(randomblob(6))))
        CONSTRAINT id_is_a_lowercase_uuid CHECK (typeof(id) = 'text' AND id GLOB
            '[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]'),
    event_type      TEXT    NOT NULL
        CONSTRAINT event_type_is_1_to_200_characters
        CHECK (typeof(event_type) = 'text' AND length(event_type) BETWEEN 1 AND 200),
    -- JSON text of at most 1 MiB (1048576 bytes).
    payload         TEXT    NOT NULL
        CONSTRAINT payload_is_json_of_at_most_1_mib
        CHECK (typeof(payload) = 'text' AND length(CAST(payload AS BLOB)) <= 1048576
               AND json_valid(payload)),
    status          TEXT    NOT NULL DEFAULT 'pending'
        CONSTRAINT status_is_known
        CHECK (status = 'pending' OR status = 'processing' OR status = 'done'
               OR status = 'failed'),
    -- Claims so far: incremented by every claim, so a poison event that kills
    -- its worker each time still ends `failed` after `max_attempts`.
    attempts        INTEGER NOT NULL DEFAULT 0
        CONSTRAINT attempts_is_a_count CHECK (typeof(attempts) = 'integer' AND attempts >= 0),
    max_attempts    INTEGER NOT NULL DEFAULT 10
        CONSTRAINT max_attempts_is_1_to_4294967295
        CHECK (typeof(max_attempts) = 'integer' AND max_attempts BETWEEN 1 AND 4294967295),
    -- When a pending event becomes due. Every time column holds milliseconds
    -- between 1973-03-03 (100000000000) and the end of 9999 (253402300799999):
    -- a time in seconds or in microseconds is refused, not misread.
    next_attempt_at INTEGER NOT NULL
        DEFAULT (CAST(round((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER))
        CONSTRAINT next_attempt_at_is_milliseconds
        CHECK (typeof(next_attempt_at) = 'integer'
               AND next_attempt_at BETWEEN 100000000000 AND 253402300799999),
    -- The current lease of a processing event: when it was taken, until when
    -- it holds, and the token every later write about the event must name.
    locked_at       INTEGER
        CONSTRAINT locked_at_is_milliseconds
        CHECK (locked_at IS NULL OR (typeof(locked_at) = 'integer'
               AND locked_at BETWEEN 100000000000 AND 253402300799999)),
    locked_until    INTEGER
        CONSTRAINT locked_until_is_milliseconds
        CHECK (locked_until IS NULL OR (typeof(locked_until) = 'integer'
               AND locked_until BETWEEN 100000000000 AND 253402300799999)),
    lease_token     INTEGER
        CONSTRAINT lease_token_is_an_integer
        CHECK (lease_token IS NULL OR typeof(lease_token) = 'integer'),
    completed_at    INTEGER
        CONSTRAINT completed_at_is_milliseconds
        CHECK (completed_at IS NULL OR (typeof(completed_at) = 'integer'
               AND completed_at BETWEEN 100000000000 AND 253402300799999)),
    delivered_at    INTEGER
        CONSTRAINT delivered_at_is_milliseconds
        CHECK (delivered_at IS NULL OR (typeof(delivered_at) = 'integer'
               AND delivered_at BETWEEN 100000000000 AND 253402300799999)),
    last_error      TEXT
        CONSTRAINT last_error_is_text CHECK (last_error IS NULL OR typeof(last_error) = 'text'),
    -- Free text of at most 255 bytes, for tracing.
    correlation_id  TEXT
        CONSTRAINT correlation_id_is_at_most_255_bytes
        CHECK (correlation_id IS NULL OR (typeof(correlation_id) = 'text'
               AND length(CAST(correlation_id AS BLOB)) <= 255)),
    -- Lowercase UUIDs, for erasure.
    org_id          TEXT
        CONSTRAINT org_id_is_a_lowercase_uuid CHECK (org_id IS NULL OR (typeof(org_id) = 'text' AND org_id GLOB
            '[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]')),
    user_id         TEXT
        CONSTRAINT user_id_is_a_lowercase_uuid CHECK (user_id IS NULL OR (typeof(user_id) = 'text' AND user_id GLOB
            '[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]')),
    -- Events with the same ordering key are handled one at a time, in seq
    -- order. At most 255 bytes.
    ordering_key    TEXT
        CONSTRAINT ordering_key_is_at_most_255_bytes
        CHECK (ordering_key IS NULL OR (typeof(ordering_key) = 'text'
               AND length(CAST(ordering_key AS BLOB)) <= 255)),
    -- A second enqueue with the same key returns the first event. At most
    -- 255 bytes.
    idempotency_key TEXT
        CONSTRAINT idempotency_key_is_at_most_255_bytes
        CHECK (idempotency_key IS NULL OR (typeof(idempotency_key) = 'text'
               AND length(CAST(idempotency_key AS BLOB)) <= 255)),
    created_at      INTEGER NOT NULL
        DEFAULT (CAST(round((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER))
        CONSTRAINT created_at_is_milliseconds
        CHECK (typeof(created_at) = 'integer'
               AND created_at BETWEEN 100000000000 AND 253402300799999),
    CONSTRAINT processing_has_a_lease
        CHECK (status <> 'processing' OR (locked_at IS NOT NULL AND locked_until IS NOT NULL))
);

INSERT INTO outbox_events_v4 (seq, id, event_type, payload, status, attempts, max_attempts, next_attempt_at, locked_at, locked_until, lease_token, completed_at, delivered_at, last_error, correlation_id, org_id, user_id, ordering_key, idempotency_key, created_at)
SELECT seq, id, event_type, payload, status, attempts, max_attempts, next_attempt_at, locked_at, locked_until, lease_token, completed_at, delivered_at, last_error, correlation_id, org_id, user_id, ordering_key, idempotency_key, created_at
FROM outbox_events ORDER BY seq;

-- Keep the sequence, so numbers are never reused even if the newest events
-- had been purged.
INSERT INTO sqlite_sequence (name, seq)
SELECT 'outbox_events_v4', coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox_events'), 0)
WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'outbox_events_v4');
UPDATE sqlite_sequence
SET seq = max(seq, coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox_events'), 0))
WHERE name = 'outbox_events_v4';

DROP TABLE outbox_events;
ALTER TABLE outbox_events_v4 RENAME TO outbox_events;

-- Claim: due pending events in (due time, enqueue order).
CREATE INDEX outbox_events_due
    ON outbox_events (next_attempt_at, seq) WHERE status = 'pending';

-- Reclaim: processing events by lease expiry.
CREATE INDEX outbox_events_leases
    ON outbox_events (locked_until) WHERE status = 'processing';

-- Retention: finished events by age.
CREATE INDEX outbox_events_finished
    ON outbox_events (created_at) WHERE status IN ('done', 'failed');

-- Per-key order: the unfinished events of a key, in enqueue order.
CREATE INDEX outbox_events_ordering
    ON outbox_events (ordering_key, seq)
    WHERE ordering_key IS NOT NULL AND status IN ('pending', 'processing');

CREATE UNIQUE INDEX outbox_events_idempotency
    ON outbox_events (idempotency_key) WHERE idempotency_key IS NOT NULL;

-- Claims of given event types: each type's due events in due order (the
-- rowid, `seq`, ends every index entry, so it orders ties without being
-- stored twice).
CREATE INDEX outbox_events_due_by_type
    ON outbox_events (event_type, next_attempt_at) WHERE status = 'pending';

-- Erasure of an organisation's or a user's events.
CREATE INDEX outbox_events_org
    ON outbox_events (org_id) WHERE org_id IS NOT NULL;
CREATE INDEX outbox_events_user
    ON outbox_events (user_id) WHERE user_id IS NOT NULL;

-- Operators: failed events by the time they failed.
CREATE INDEX outbox_events_failed_at
    ON outbox_events (completed_at) WHERE status = 'failed';

-- Failed events, newest first, for a look from the sqlite3 shell:
-- `SELECT * FROM outbox_events_failed;`. (Its name also keeps a version-1
-- build from re-creating its own index here and stamping the app's header.)
CREATE VIEW outbox_events_failed AS
    SELECT seq, id, event_type, attempts, max_attempts, completed_at, last_error
    FROM outbox_events WHERE status = 'failed' ORDER BY completed_at DESC;

UPDATE outbox_meta SET value = 4 WHERE key = 'schema_version';
