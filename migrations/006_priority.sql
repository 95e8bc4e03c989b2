-- sqlite-outbox migration 5 -> 6: a priority per event (frozen history;
-- never edited).
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

UPDATE outbox_meta SET value = 6 WHERE key = 'schema_version';
