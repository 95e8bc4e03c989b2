-- sqlite-outbox on PostgreSQL, migration 2 -> 3: the notify trigger's
-- function runs with a fixed search_path (frozen history; never edited).
-- A trigger runs with the inserting session's search_path; pinned, no
-- object of another schema can stand in for pg_notify. Run by the crate
-- with `search_path` set to the outbox's schema, in one transaction,
-- under its advisory lock.

ALTER FUNCTION outbox_notify() SET search_path = pg_catalog, pg_temp;

UPDATE outbox_meta SET value = 3 WHERE key = 'schema_version';
