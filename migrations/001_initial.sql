-- sqlite-outbox schema version 1 (frozen history; never edited).
--
-- Version 1 kept its version in the file header: it set
-- `PRAGMA application_id = 0x4F555442` ("OUTB") and `PRAGMA user_version = 1`
-- in the same transaction as this script. Version 2 gives both back to the
-- app (see 002_guest.sql). The crate no longer runs this file; its tests use
-- it to build version-1 files.


CREATE TABLE IF NOT EXISTS outbox_events (
    -- Enqueue order. Ordering keys and claims follow it. AUTOINCREMENT: a
    -- number is never given out twice, even after the newest events are
    -- purged, so it can serve as a cursor. Numbers may skip.
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    -- Public identity: a UUID in its hyphenated lowercase text form. The
    -- crate writes time-ordered v7 UUIDs; the default makes a random v4 one.
    id              TEXT    NOT NULL UNIQUE DEFAULT (
                        lower(hex(randomblob(4))) || '-' ||
                        lower(hex(randomblob(2))) || '-4' ||
                        substr(lower(hex(randomblob(2))), 2) || '-' ||
                        substr('89ab', 1 + (abs(random()) % 4), 1) ||
                        substr(lower(hex(randomblob(2))), 2) || '-' ||
                        lower(hex(randomblob(6)))),
    event_type      TEXT    NOT NULL CHECK (length(event_type) BETWEEN 1 AND 200),
    payload         TEXT    NOT NULL CHECK (json_valid(payload)),
    status          TEXT    NOT NULL DEFAULT 'pending'
                            CHECK (status IN ('pending', 'processing', 'done', 'failed')),
    -- Claims so far: incremented by every claim, so a poison event that kills
    -- its worker each time still ends `failed` after `max_attempts`.
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts    INTEGER NOT NULL DEFAULT 10 CHECK (max_attempts >= 1),
    -- When a pending event becomes due.
    next_attempt_at INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000 AS INTEGER)),
    -- The current lease of a processing event: when it was taken, until when
    -- it holds, and the token every later write about the event must name.
    locked_at       INTEGER,
    locked_until    INTEGER,
    lease_token     INTEGER,
    completed_at    INTEGER,
    delivered_at    INTEGER,
    last_error      TEXT,
    correlation_id  TEXT,
    org_id          TEXT,
    user_id         TEXT,
    -- Events with the same ordering key are handled one at a time, in seq order.
    ordering_key    TEXT,
    -- A second enqueue with the same key returns the first event.
    idempotency_key TEXT,
    created_at      INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000 AS INTEGER)),
    CHECK (status <> 'processing' OR (locked_at IS NOT NULL AND locked_until IS NOT NULL)),
    CHECK (id GLOB '[0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F]-[0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F]-[0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F]-[0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F]-[0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F]')
) STRICT;

-- Claim: due pending events in (due time, enqueue order).
CREATE INDEX IF NOT EXISTS outbox_events_due
    ON outbox_events (next_attempt_at, seq) WHERE status = 'pending';

-- Reclaim: processing events by lease expiry.
CREATE INDEX IF NOT EXISTS outbox_events_leases
    ON outbox_events (locked_until) WHERE status = 'processing';

-- Retention: finished events by age.
CREATE INDEX IF NOT EXISTS outbox_events_finished
    ON outbox_events (created_at) WHERE status IN ('done', 'failed');

-- Per-key order: the unfinished events of a key, in enqueue order.
CREATE INDEX IF NOT EXISTS outbox_events_ordering
    ON outbox_events (ordering_key, seq)
    WHERE ordering_key IS NOT NULL AND status IN ('pending', 'processing');

CREATE UNIQUE INDEX IF NOT EXISTS outbox_events_idempotency
    ON outbox_events (idempotency_key) WHERE idempotency_key IS NOT NULL;

-- Erasure of an organisation's or a user's events.
CREATE INDEX IF NOT EXISTS outbox_events_org
    ON outbox_events (org_id) WHERE org_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_events_user
    ON outbox_events (user_id) WHERE user_id IS NOT NULL;

-- Operators: failed events, newest first.
CREATE INDEX IF NOT EXISTS outbox_events_failed
    ON outbox_events (completed_at) WHERE status = 'failed';
