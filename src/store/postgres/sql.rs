//! The SQL texts of the PostgreSQL store, each written once, with the
//! outbox's schema named in them (a caller's connection may have any
//! `search_path`). Each state change of an event is one statement, as on
//! SQLite (`store/sqlite/sql.rs`), with the same rules.

/// Every column of an event, in the order `decode` reads them, from the
/// table as `t`.
const COLUMNS: &str = "t.seq, t.id, t.event_type, t.payload::text, t.status, t.attempts, \
    t.max_attempts, t.next_attempt_at, t.locked_at, t.locked_until, t.lease_token, \
    t.completed_at, t.delivered_at, t.last_error, t.correlation_id, t.org_id, t.user_id, \
    t.ordering_key, t.idempotency_key, t.created_at, t.traceparent, t.priority";

/// A fresh lease token: 64 random bits (near enough: `random()` has 52).
pub(super) const NEW_TOKEN: &str =
    "floor((random() - 0.5) * 18446744073709551616.0 * 0.999)::bigint";

/// The statements, for one schema.
#[derive(Debug)]
pub(super) struct Sql {
    /// The events table, schema-qualified.
    pub(super) events: String,
    /// The destinations table, schema-qualified.
    pub(super) destinations: String,
    /// Every column, from the events table as `t`.
    pub(super) columns: &'static str,
    pub(super) insert: String,
    /// Many events in one statement, in the order given: `$1`…`$10`,
    /// `$12` and `$13` arrays, one element per event, and `$11` the time
    /// of enqueue.
    pub(super) insert_all: String,
    pub(super) select_by_id: String,
    pub(super) select_by_key: String,
    pub(super) claim: String,
    pub(super) claim_due: String,
    pub(super) set_aside: String,
    pub(super) ack_done: String,
    /// Many completions: `$1` seqs and `$2` tokens, pairwise.
    pub(super) ack_done_all: String,
    pub(super) ack_retry: String,
    pub(super) ack_fail: String,
    pub(super) ack_extend: String,
    pub(super) ack_release: String,
    pub(super) ack_defer: String,
    /// $1 now: due events whose key's head must finish first.
    pub(super) behind_key: String,
    pub(super) backlog: String,
    pub(super) next_wakeup: String,
    pub(super) skip_backoff: String,
    pub(super) upsert_destination: String,
    pub(super) delete_destination: String,
}

/// The event types asked for (all when `$only` is NULL), minus those in
/// `$skip` (none when NULL).
fn type_ok(only: usize, skip: usize) -> String {
    format!(
        "(${only}::text[] IS NULL OR e.event_type = ANY(${only}::text[]))
         AND (${skip}::text[] IS NULL OR e.event_type <> ALL(${skip}::text[]))"
    )
}

/// An ordering-key event `e` is held back by another event `b` of its key
/// that is earlier and unfinished, or that holds a live lease (`$now`).
/// Only claims test it with a lease run out on its last attempt in mind
/// (which the claim itself fails); elsewhere such an event still waits for
/// the next claim to fail it, and holds its key until then.
fn key_free(events: &str, now: usize) -> String {
    format!(
        "(e.ordering_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM {events} AS b
            WHERE b.ordering_key = e.ordering_key
              AND b.status IN ('pending', 'processing')
              AND b.seq <> e.seq
              AND (b.seq < e.seq OR (b.status = 'processing' AND b.locked_until > ${now}::bigint))
              -- A lease that ran out on its last attempt fails in this
              -- same statement: it holds nothing back.
              AND NOT (b.status = 'processing' AND b.locked_until <= ${now}::bigint
                       AND b.attempts >= b.max_attempts)))"
    )
}

impl Sql {
    pub(super) fn new(schema: &str) -> Sql {
        let e = format!("{schema}.outbox_events");
        let fenced =
            "WHERE seq = $1::bigint AND lease_token = $2::bigint AND status = 'processing'";
        let unlease = "locked_at = NULL, locked_until = NULL, lease_token = NULL";
        // Claims: $1 now, $2 lease end, $3 limit, $4 only, $5 skip.
        let claimable = format!("{} AND {}", type_ok(4, 5), key_free(&e, 1));
        let due = format!(
            "SELECT e.seq, e.priority, e.next_attempt_at FROM {e} AS e
             WHERE e.status = 'pending' AND e.next_attempt_at <= $1::bigint AND {claimable}
             ORDER BY e.next_attempt_at, e.seq LIMIT $3::bigint
             FOR UPDATE OF e SKIP LOCKED"
        );
        // The due events of raised priority, from their own index: an
        // urgent event is found however long the due index is. Rows both
        // read are the same row (UNION keeps one).
        let urgent = format!(
            "SELECT e.seq, e.priority, e.next_attempt_at FROM {e} AS e
             WHERE e.status = 'pending' AND e.priority > 0 AND e.next_attempt_at <= $1::bigint
               AND {claimable}
             ORDER BY e.priority DESC, e.next_attempt_at, e.seq LIMIT $3::bigint
             FOR UPDATE OF e SKIP LOCKED"
        );
        let order = "ORDER BY priority DESC, next_attempt_at, seq LIMIT $3::bigint";
        let lapsed = format!(
            "SELECT e.seq, e.priority, e.next_attempt_at FROM {e} AS e
             WHERE e.status = 'processing' AND e.locked_until <= $1::bigint
               AND e.attempts < e.max_attempts AND {claimable}
             ORDER BY e.priority DESC, e.next_attempt_at, e.seq LIMIT $3::bigint
             FOR UPDATE OF e SKIP LOCKED"
        );
        let lease = |chosen: &str| {
            format!(
                "{chosen}
                 UPDATE {e} AS t
                 SET status = 'processing', attempts = t.attempts + 1, locked_at = $1::bigint,
                     locked_until = $2::bigint, lease_token = {NEW_TOKEN}
                 FROM chosen WHERE t.seq = chosen.seq
                 RETURNING {COLUMNS}"
            )
        };
        Sql {
            insert: format!(
                "INSERT INTO {e} (id, event_type, payload, status, attempts, max_attempts,
                   next_attempt_at, correlation_id, org_id, user_id, ordering_key,
                   idempotency_key, created_at, traceparent, priority)
                 VALUES ($1, $2, CAST($3::text AS json), 'pending', 0, $4, $5, $6, $7, $8, $9,
                   $10, $11, $12, $13)
                 ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                 RETURNING seq"
            ),
            insert_all: format!(
                "INSERT INTO {e} (id, event_type, payload, status, attempts, max_attempts,
                   next_attempt_at, correlation_id, org_id, user_id, ordering_key,
                   idempotency_key, created_at, traceparent, priority)
                 SELECT v.id, v.event_type, CAST(v.payload AS json), 'pending', 0, v.max_attempts,
                   v.next_attempt_at, v.correlation_id, v.org_id, v.user_id, v.ordering_key,
                   v.idempotency_key, $11::bigint, v.traceparent, v.priority
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                             $6::text[], $7::uuid[], $8::uuid[], $9::text[], $10::text[],
                             $12::text[], $13::smallint[])
                      WITH ORDINALITY AS v(id, event_type, payload, max_attempts, next_attempt_at,
                        correlation_id, org_id, user_id, ordering_key, idempotency_key,
                        traceparent, priority, n)
                 ORDER BY v.n
                 ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                 RETURNING id, seq"
            ),
            select_by_id: format!("SELECT {COLUMNS} FROM {e} AS t WHERE t.id = $1"),
            select_by_key: format!("SELECT {COLUMNS} FROM {e} AS t WHERE t.idempotency_key = $1"),
            claim: lease(&format!(
                "WITH spent AS (
                   UPDATE {e} SET status = 'failed', completed_at = $1::bigint, last_error = $6,
                     {unlease}
                   WHERE status = 'processing' AND locked_until <= $1::bigint
                     AND attempts >= max_attempts),
                 urgent AS ({urgent}), due AS ({due}), lapsed AS ({lapsed}),
                 chosen AS (SELECT seq FROM (SELECT * FROM urgent UNION SELECT * FROM due
                                             UNION SELECT * FROM lapsed) AS x {order})"
            )),
            claim_due: lease(&format!(
                "WITH urgent AS ({urgent}), due AS ({due}),
                 chosen AS (SELECT seq FROM (SELECT * FROM urgent UNION SELECT * FROM due) AS x
                            {order})"
            )),
            set_aside: format!(
                "UPDATE {e} SET status = 'failed', completed_at = $2::bigint, last_error = $3,
                   {unlease}
                 WHERE seq = $1::bigint"
            ),
            ack_done: format!(
                "UPDATE {e} SET status = 'done', completed_at = $3::bigint, {unlease} {fenced}"
            ),
            ack_done_all: format!(
                "UPDATE {e} AS t SET status = 'done', completed_at = $3::bigint,
                   locked_at = NULL, locked_until = NULL, lease_token = NULL
                 FROM unnest($1::bigint[], $2::bigint[]) AS a(seq, token)
                 WHERE t.seq = a.seq AND t.lease_token = a.token AND t.status = 'processing'
                 RETURNING t.seq"
            ),
            ack_retry: format!(
                "UPDATE {e} SET last_error = $4,
                   status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'pending' END,
                   completed_at = CASE WHEN attempts >= max_attempts THEN $3::bigint END,
                   next_attempt_at = CASE WHEN attempts >= max_attempts THEN next_attempt_at
                                     ELSE $5::bigint END,
                   {unlease} {fenced}"
            ),
            ack_fail: format!(
                "UPDATE {e} SET status = 'failed', completed_at = $3::bigint, last_error = $4,
                   {unlease} {fenced}"
            ),
            ack_extend: format!("UPDATE {e} SET locked_until = $3::bigint {fenced}"),
            ack_release: format!(
                "UPDATE {e} SET status = 'pending', attempts = greatest(attempts - 1, 0),
                   {unlease} {fenced}"
            ),
            // The rule of `key_free` without its exception for a head
            // whose lease ran out on its last attempt: until a claim fails
            // that head, it is in front (as the other stores count it).
            behind_key: format!(
                "SELECT count(*) FROM {e} AS e
                 WHERE e.status = 'pending' AND e.next_attempt_at <= $1::bigint
                   AND e.ordering_key IS NOT NULL AND EXISTS (
                     SELECT 1 FROM {e} AS b
                     WHERE b.ordering_key = e.ordering_key
                       AND b.status IN ('pending', 'processing')
                       AND b.seq <> e.seq
                       AND (b.seq < e.seq
                            OR (b.status = 'processing' AND b.locked_until > $1::bigint)))"
            ),
            ack_defer: format!(
                "UPDATE {e} SET status = 'pending', attempts = greatest(attempts - 1, 0),
                   next_attempt_at = greatest(next_attempt_at, $3::bigint), last_error = $4,
                   {unlease} {fenced}"
            ),
            // $1 now, $2 only, $3 skip.
            backlog: format!(
                "SELECT
                   EXISTS (SELECT 1 FROM {e} AS e
                           WHERE e.status = 'pending' AND e.next_attempt_at <= $1::bigint
                             AND {} AND {}),
                   EXISTS (SELECT 1 FROM {e} AS e WHERE e.status = 'processing' AND {}),
                   (SELECT min(e.next_attempt_at) FROM {e} AS e
                    WHERE e.status = 'pending' AND e.next_attempt_at > $1::bigint AND {})",
                type_ok(2, 3),
                key_free(&e, 1),
                type_ok(2, 3),
                type_ok(2, 3)
            ),
            next_wakeup: format!(
                "SELECT min(t) FROM (
                   SELECT min(e.next_attempt_at) AS t FROM {e} AS e
                   WHERE e.status = 'pending' AND e.next_attempt_at > $1::bigint AND {ok}
                   UNION ALL
                   SELECT min(e.locked_until) FROM {e} AS e
                   WHERE e.status = 'processing' AND e.locked_until > $1::bigint AND {ok}) AS x",
                ok = type_ok(2, 3)
            ),
            skip_backoff: format!(
                "UPDATE {e} AS e SET next_attempt_at = $1::bigint
                 WHERE e.status = 'pending' AND e.attempts > 0 AND e.next_attempt_at > $1::bigint
                   AND ($2::text[] IS NULL OR e.event_type = ANY($2::text[]))"
            ),
            upsert_destination: format!(
                "INSERT INTO {schema}.outbox_destinations
                   (name, hold, since, next_probe_at, last_error, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (name) DO UPDATE SET hold = excluded.hold,
                   since = excluded.since, next_probe_at = excluded.next_probe_at,
                   last_error = excluded.last_error, updated_at = excluded.updated_at"
            ),
            delete_destination: format!("DELETE FROM {schema}.outbox_destinations WHERE name = $1"),
            destinations: format!("{schema}.outbox_destinations"),
            columns: COLUMNS,
            events: e,
        }
    }
}
