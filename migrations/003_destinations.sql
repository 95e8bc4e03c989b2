-- sqlite-outbox schema, from version 2 to version 3.
--
-- Claims for a list of event types read an index by type, so they stay
-- cheap however many events of other types wait (a destination that is
-- down, a type no dispatcher handles). And dispatchers write down which
-- destinations they hold back, for `outbox stats` and other processes.
--
-- Runs in the write transaction that opens the file; nothing else changes.

-- Claims of given event types: each type's due events in due order (the
-- rowid, `seq`, ends every index entry, so it orders ties without being
-- stored twice).
CREATE INDEX outbox_events_due_by_type
    ON outbox_events (event_type, next_attempt_at) WHERE status = 'pending';

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

UPDATE outbox_meta SET value = 3 WHERE key = 'schema_version';
