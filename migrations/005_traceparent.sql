-- sqlite-outbox migration 4 -> 5: a traceparent column (frozen history;
-- never edited).
--
-- Events can carry the W3C traceparent of the work that enqueued them, so
-- that the span that delivers an event links to the one that wrote it.
-- A new nullable column needs no rebuild: ALTER TABLE adds it after the
-- last column, where schema.sql has it, and every existing row reads NULL.
-- Writers that do not know the column are not affected.

ALTER TABLE outbox_events ADD COLUMN traceparent TEXT
        CONSTRAINT traceparent_is_w3c
        CHECK (traceparent IS NULL OR (typeof(traceparent) = 'text' AND traceparent GLOB
            '[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f]'));

UPDATE outbox_meta SET value = 5 WHERE key = 'schema_version';
