-- sqlite-outbox migration 5 -> 6: a priority per event, and the limits
-- dispatchers keep (frozen history; never edited).
--
-- Among due events, those of higher priority are claimed first. The column
-- has a default, so writers that do not know it (plain SQL, older builds)
-- keep inserting events of priority 0, the lowest. ALTER TABLE adds it
-- after the last column, where schema.sql has it, and every existing row
-- reads 0; the check holds for them.
--
-- The urgent events (priority above 0) have an index of their own, in
-- claim order: a claim finds them there however many events of priority 0
-- wait in the due index, and the index costs nothing on inserts of the
-- events that keep the default.

ALTER TABLE outbox_events ADD COLUMN priority INTEGER NOT NULL DEFAULT 0
        CONSTRAINT priority_is_0_to_255
        CHECK (typeof(priority) = 'integer' AND priority BETWEEN 0 AND 255);

CREATE INDEX outbox_events_urgent
    ON outbox_events (priority DESC, next_attempt_at, seq)
    WHERE status = 'pending' AND priority > 0;

-- The limits dispatchers keep on a type or a destination (see schema.sql).
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

UPDATE outbox_meta SET value = 6 WHERE key = 'schema_version';
