-- sqlite-outbox schema, version 6: the layout of a fresh outbox.
--
-- A public contract. Programs in other languages insert rows into
-- `outbox_events` with plain SQL, inside their own transactions. An insert
-- needs only `event_type` and `payload`; every other column has a default
-- that makes the row due at once. Times are integer UTC milliseconds since
-- the Unix epoch.
--
-- The outbox is a guest in the app's database: every object here is named
-- `outbox_*`, the schema version lives in `outbox_meta`, and the crate never
-- reads or writes `PRAGMA user_version` or `PRAGMA application_id`: those
-- belong to the app.
--
-- Written for the SQLite that writers really have: this file parses, and its
-- defaults and checks work, on SQLite 3.26.0 and newer (with the JSON
-- functions, built in since 3.38 and enabled by the distributions before).
-- No STRICT table (older SQLite could not even read the file) and no
-- `unixepoch()` (3.42): the checks below test each column's type instead.
--
-- The crate runs this script once, in the write transaction that creates
-- the outbox; `migrations/` holds the steps that bring older files here.

CREATE TABLE outbox_events (
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
    -- The W3C traceparent of the work that enqueued the event
    -- (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`), or NULL. The
    -- delivery span links to it and the relay sends it as a `traceparent`
    -- header. Added by version 5, at the end (as ALTER TABLE adds it).
    traceparent     TEXT
        CONSTRAINT traceparent_is_w3c
        CHECK (traceparent IS NULL OR (typeof(traceparent) = 'text' AND traceparent GLOB
            '[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f]')),
    -- Among due events, higher priority is claimed first (0 to 255; 0, the
    -- default, is the lowest). Equal priorities keep due-time order, and an
    -- ordering key still wins. Added by version 6, at the end.
    priority        INTEGER NOT NULL DEFAULT 0
        CONSTRAINT priority_is_0_to_255
        CHECK (typeof(priority) = 'integer' AND priority BETWEEN 0 AND 255),
    CONSTRAINT processing_has_a_lease
        CHECK (status <> 'processing' OR (locked_at IS NOT NULL AND locked_until IS NOT NULL))
);

-- Claim: due pending events in (due time, enqueue order).
CREATE INDEX outbox_events_due
    ON outbox_events (next_attempt_at, seq) WHERE status = 'pending';

-- Claim, first: the due events of raised priority, in claim order. Only
-- they are in it, so it costs the events of priority 0 nothing, and a claim
-- finds an urgent event here however long the due index is.
CREATE INDEX outbox_events_urgent
    ON outbox_events (priority DESC, next_attempt_at, seq)
    WHERE status = 'pending' AND priority > 0;

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

-- Destinations a dispatcher holds back, as it last said: a row while one
-- is unreachable (probed on a backoff) or paused by the app; no row while
-- it flows. Times are integer UTC milliseconds.
CREATE TABLE outbox_destinations (
    name          TEXT NOT NULL PRIMARY KEY
                  CONSTRAINT outbox_destinations_name_text
                  CHECK (typeof(name) = 'text' AND length(CAST(name AS BLOB)) BETWEEN 1 AND 255),
    hold          TEXT NOT NULL
                  CONSTRAINT outbox_destinations_hold_known
                  CHECK (hold IN ('unreachable', 'paused')),
    since         INTEGER NOT NULL
                  CONSTRAINT outbox_destinations_since_integer
                  CHECK (typeof(since) = 'integer'),
    next_probe_at INTEGER
                  CONSTRAINT outbox_destinations_next_probe_integer
                  CHECK (next_probe_at IS NULL OR typeof(next_probe_at) = 'integer'),
    last_error    TEXT
                  CONSTRAINT outbox_destinations_last_error_text
                  CHECK (last_error IS NULL
                         OR (typeof(last_error) = 'text' AND length(CAST(last_error AS BLOB)) <= 4096)),
    updated_at    INTEGER NOT NULL
                  CONSTRAINT outbox_destinations_updated_integer
                  CHECK (typeof(updated_at) = 'integer')
);

-- The limits dispatchers keep on how hard they push a type or a
-- destination, as they last wrote them down: a concurrency limit (`max`
-- events at once) or a rate limit (`max` deliveries per `per_ms`). A limit
-- kept across every dispatcher on the file also keeps its token bucket
-- here (`tokens` at `refilled_at`), taken from in each claim's transaction.
-- `limited_since` is when events began to wait for the limit (NULL: none
-- waits); `event_types` the JSON array of types it covers (NULL: every type
-- of the destination). Times are integer UTC milliseconds.
CREATE TABLE outbox_limits (
    scope         TEXT NOT NULL
                  CONSTRAINT outbox_limits_scope_known CHECK (scope IN ('type', 'destination')),
    name          TEXT NOT NULL
                  CONSTRAINT outbox_limits_name_text
                  CHECK (typeof(name) = 'text' AND length(CAST(name AS BLOB)) BETWEEN 1 AND 255),
    kind          TEXT NOT NULL
                  CONSTRAINT outbox_limits_kind_known CHECK (kind IN ('concurrency', 'rate')),
    max           INTEGER NOT NULL
                  CONSTRAINT outbox_limits_max_positive
                  CHECK (typeof(max) = 'integer' AND max BETWEEN 1 AND 1000000000),
    per_ms        INTEGER
                  CONSTRAINT outbox_limits_per_positive
                  CHECK (per_ms IS NULL OR (typeof(per_ms) = 'integer' AND per_ms >= 1)),
    shared        INTEGER NOT NULL DEFAULT 0
                  CONSTRAINT outbox_limits_shared_flag CHECK (shared IN (0, 1)),
    event_types   TEXT
                  CONSTRAINT outbox_limits_event_types_json
                  CHECK (event_types IS NULL OR (typeof(event_types) = 'text'
                         AND json_valid(event_types))),
    tokens        REAL,
    refilled_at   INTEGER
                  CONSTRAINT outbox_limits_refilled_integer
                  CHECK (refilled_at IS NULL OR typeof(refilled_at) = 'integer'),
    limited_since INTEGER
                  CONSTRAINT outbox_limits_limited_integer
                  CHECK (limited_since IS NULL OR typeof(limited_since) = 'integer'),
    updated_at    INTEGER NOT NULL
                  CONSTRAINT outbox_limits_updated_integer
                  CHECK (typeof(updated_at) = 'integer'),
    PRIMARY KEY (scope, name, kind)
);

-- The outbox's own bookkeeping; `schema_version` is the layout of the
-- outbox_* objects (this file is version 6).
CREATE TABLE outbox_meta (
    key   TEXT NOT NULL PRIMARY KEY,
    value NOT NULL
);
INSERT INTO outbox_meta (key, value) VALUES ('schema_version', 6);
