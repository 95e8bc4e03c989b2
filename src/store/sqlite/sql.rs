//! The SQL texts of the store, each written once. Each state change of an
//! event is one statement here.

use std::sync::LazyLock;

use crate::store::schema::COLUMNS;
pub(super) const INSERT_SQL: &str = "INSERT INTO outbox_events (id, event_type, payload, status, attempts, \
     max_attempts, next_attempt_at, correlation_id, org_id, user_id, ordering_key, idempotency_key, \
     created_at, traceparent, priority) \
     VALUES (?1, ?2, ?3, 'pending', 0, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
     ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING";

pub(super) static SELECT_BY_KEY_SQL: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {COLUMNS} FROM outbox_events WHERE idempotency_key = ?1"));

/// An ordering-key event `e` is held back by another event `b` of its key
/// that is earlier and unfinished, or that holds a live lease (the same rule
/// as `claimable` in the memory model).
pub(super) const KEY_FREE: &str = "(e.ordering_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM outbox_events AS b
        WHERE b.ordering_key = e.ordering_key
          AND b.status IN ('pending', 'processing')
          AND b.seq <> e.seq
          AND (b.seq < e.seq OR (b.status = 'processing' AND b.locked_until > :now))))";

/// The event types asked for (all when `:types` is NULL), minus those in
/// `:skip` (none when NULL).
pub(super) const TYPE_OK: &str =
    "(:types IS NULL OR e.event_type IN (SELECT value FROM json_each(:types)))
     AND (:skip IS NULL OR e.event_type NOT IN (SELECT value FROM json_each(:skip)))";

/// Due events with a key whose head must finish first.
pub(super) static BEHIND_KEY_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT count(*) FROM outbox_events AS e
         WHERE e.status = 'pending' AND e.next_attempt_at <= :now
           AND e.ordering_key IS NOT NULL AND NOT {KEY_FREE}"
    )
});

pub(super) static BACKLOG_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT
           EXISTS (SELECT 1 FROM outbox_events AS e
                   WHERE e.status = 'pending' AND e.next_attempt_at <= :now
                     AND {TYPE_OK} AND {KEY_FREE}),
           EXISTS (SELECT 1 FROM outbox_events AS e WHERE e.status = 'processing' AND {TYPE_OK}),
           (SELECT min(e.next_attempt_at) FROM outbox_events AS e
            WHERE e.status = 'pending' AND e.next_attempt_at > :now AND {TYPE_OK})"
    )
});

/// Expired leases are taken in the same (due time, enqueue order) as due
/// events; the lease index finds them, and there are few (the events of a
/// crashed or stalled worker), so sorting them is cheap.
///
/// `LIMIT :limit + 0` rather than `LIMIT :limit`: SQLite marks a bare
/// parameter in a LIMIT as one that may change the plan, and then prepares
/// the whole statement again on every execution (measured: 6 % of all
/// instructions while dispatching).
pub(super) static CLAIM_SQL: LazyLock<String> = LazyLock::new(|| claim_any_type_sql(true));

/// [`CLAIM_SQL`] when no lease has run out: the due events alone, without
/// the union and the second sort (a tenth of a claim's instructions).
pub(super) static CLAIM_DUE_SQL: LazyLock<String> = LazyLock::new(|| claim_any_type_sql(false));

/// The claim of the types `TYPE_OK` allows, from the due index.
fn claim_any_type_sql(with_leases: bool) -> String {
    claim_sql(
        &[due_sql(&format!("{TYPE_OK} AND {KEY_FREE}"))],
        with_leases,
    )
}

/// What a claim looks at first, in one statement: whether any lease has
/// run out, of any type (if none has, the claim uses the plainer
/// statements), and whether any pending event has a raised priority (one
/// look at the urgent index; nearly always false, and then a claim is
/// what it was before priorities).
pub(super) const CLAIM_STATE_SQL: &str = "SELECT
     EXISTS (SELECT 1 FROM outbox_events WHERE status = 'processing' AND locked_until <= ?1),
     EXISTS (SELECT 1 FROM outbox_events WHERE status = 'pending' AND priority > 0)";

/// The due pending events that pass `test`, in (due time, enqueue order),
/// at most `:limit`: a query without its `SELECT` list.
fn due_sql(test: &str) -> String {
    format!(
        "FROM outbox_events AS e
         WHERE e.status = 'pending' AND e.next_attempt_at <= :now AND {test}
         ORDER BY e.next_attempt_at, e.seq LIMIT :limit + 0"
    )
}

/// The claim of the events of the `due` queries and, `with_leases`, the
/// expired leases: at most `:limit`, in (due time, enqueue order).
fn claim_sql(due: &[String], with_leases: bool) -> String {
    let chosen = match (due, with_leases) {
        // One query, already in order: no second sort.
        ([one], false) => format!("SELECT e.seq {one}"),
        _ => {
            let mut parts: Vec<String> = due
                .iter()
                .map(|d| {
                    format!(
                        "SELECT seq, next_attempt_at FROM (SELECT e.seq, e.next_attempt_at {d})"
                    )
                })
                .collect();
            if with_leases {
                parts.push(format!(
                    "SELECT seq, next_attempt_at FROM (
                       SELECT e.seq, e.next_attempt_at FROM outbox_events AS e
                       WHERE e.status = 'processing' AND e.locked_until <= :now AND {TYPE_OK} AND {KEY_FREE}
                       ORDER BY e.next_attempt_at, e.seq LIMIT :limit + 0)"
                ));
            }
            format!(
                "SELECT seq FROM ({}) ORDER BY next_attempt_at, seq LIMIT :limit + 0",
                parts.join("\n             UNION ALL\n             ")
            )
        }
    };
    claim_update(&chosen)
}

/// Leases the events whose `seq` the query `chosen` gives.
fn claim_update(chosen: &str) -> String {
    format!(
        "UPDATE outbox_events
         SET status = 'processing', attempts = attempts + 1, locked_at = :now,
             locked_until = :until, lease_token = random()
         WHERE seq IN ({chosen})
         RETURNING {COLUMNS}"
    )
}

/// The first step of a claim when some pending event has a raised priority:
/// the due events of priority above 0 (and, `with_leases`, the expired
/// leases of such events) of the types `TYPE_OK` allows, highest priority
/// first, then in (due time, enqueue order), read from the urgent index.
/// The claim's usual statements take the rest of the batch after it, in
/// the same transaction: what this step left of raised priority cannot be
/// claimed now (behind its key, of another type), so they leave it too.
pub(super) static CLAIM_URGENT_SQL: LazyLock<[String; 2]> =
    LazyLock::new(|| [claim_urgent_sql(false), claim_urgent_sql(true)]);

fn claim_urgent_sql(with_leases: bool) -> String {
    let order = "ORDER BY e.priority DESC, e.next_attempt_at, e.seq LIMIT :limit + 0";
    let due = format!(
        "FROM outbox_events AS e
         WHERE e.status = 'pending' AND e.priority > 0 AND e.next_attempt_at <= :now
           AND {TYPE_OK} AND {KEY_FREE}
         {order}"
    );
    if !with_leases {
        return claim_update(&format!("SELECT e.seq {due}"));
    }
    let cols = "SELECT e.seq, e.priority, e.next_attempt_at";
    claim_update(&format!(
        "SELECT seq FROM (
           SELECT * FROM ({cols} {due})
           UNION ALL
           SELECT * FROM ({cols} FROM outbox_events AS e
             WHERE e.status = 'processing' AND e.locked_until <= :now AND e.priority > 0
               AND {TYPE_OK} AND {KEY_FREE}
             {order}))
         ORDER BY priority DESC, next_attempt_at, seq LIMIT :limit + 0"
    ))
}

/// The most event types a claim names one by one (each reads its own
/// stretch of the by-type index); longer lists filter the due index.
pub(super) const MAX_TYPED_CLAIM: usize = 16;

/// The parameters that name a claim's types, in order.
pub(super) const TYPE_PARAMS: [&str; MAX_TYPED_CLAIM] = [
    ":t0", ":t1", ":t2", ":t3", ":t4", ":t5", ":t6", ":t7", ":t8", ":t9", ":t10", ":t11", ":t12",
    ":t13", ":t14", ":t15",
];

/// [`CLAIM_SQL`] (or, without `with_leases`, [`CLAIM_DUE_SQL`]) for the
/// event types bound as `:t0`, `:t1`, ... (`types` of them): each type's
/// due events come from the by-type index, so events of other types
/// waiting in front (a destination that is down, a type no dispatcher
/// here handles) are never read.
pub(super) fn claim_by_types_sql(types: usize, with_leases: bool) -> &'static str {
    static TEXTS: [[std::sync::OnceLock<String>; MAX_TYPED_CLAIM]; 2] =
        [const { [const { std::sync::OnceLock::new() }; MAX_TYPED_CLAIM] }; 2];
    match TEXTS[usize::from(with_leases)].get(types.saturating_sub(1)) {
        Some(text) => text.get_or_init(|| {
            let due: Vec<String> = TYPE_PARAMS[..types]
                .iter()
                .map(|t| due_sql(&format!("e.event_type = {t} AND {KEY_FREE}")))
                .collect();
            claim_sql(&due, with_leases)
        }),
        None if with_leases => &CLAIM_SQL,
        None => &CLAIM_DUE_SQL,
    }
}

/// How far a front claim reads down the due index, in claim batches: far
/// enough to fill a batch when a few events of other types are mixed in,
/// short enough that a front of other types costs little.
pub(super) const FRONT_SCAN_BATCHES: usize = 4;

/// The claim of the due events of the types bound as `:t0`, `:t1`, ...
/// (`types` of them) among the first `:scan` due events of any type: one
/// read of the due index, in order, for a dispatcher whose types make up
/// the front of the queue (nearly always). When it comes up short, the
/// caller claims the rest with [`claim_by_types_sql`]. The outer query
/// takes the rows of the sub-query (a co-routine) in its order, without a
/// second sort.
pub(super) fn claim_front_sql(types: usize) -> &'static str {
    static TEXTS: [std::sync::OnceLock<String>; MAX_TYPED_CLAIM] =
        [const { std::sync::OnceLock::new() }; MAX_TYPED_CLAIM];
    match TEXTS.get(types.saturating_sub(1)) {
        Some(text) => text.get_or_init(|| {
            let list = &TYPE_PARAMS[..types];
            let chosen = format!(
                "SELECT e.seq FROM (
                   SELECT seq, event_type, ordering_key, next_attempt_at FROM outbox_events
                   WHERE status = 'pending' AND next_attempt_at <= :now
                   ORDER BY next_attempt_at, seq LIMIT :scan + 0) AS e
                 WHERE e.event_type IN ({}) AND {KEY_FREE}
                 LIMIT :limit + 0",
                list.join(", ")
            );
            claim_update(&chosen)
        }),
        None => &CLAIM_DUE_SQL,
    }
}

/// The acknowledgements. Each is fenced: it changes the row only while the
/// lease named by (seq, token) is the current one.
pub(super) const ACK_DONE_SQL: &str = "UPDATE outbox_events SET status = 'done', completed_at = ?3,
      locked_at = NULL, locked_until = NULL, lease_token = NULL
    WHERE seq = ?1 AND lease_token = ?2 AND status = 'processing'";
pub(super) const ACK_RETRY_SQL: &str = "UPDATE outbox_events SET last_error = ?4,
      status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'pending' END,
      completed_at = CASE WHEN attempts >= max_attempts THEN ?3 END,
      next_attempt_at = CASE WHEN attempts >= max_attempts THEN next_attempt_at ELSE ?5 END,
      locked_at = NULL, locked_until = NULL, lease_token = NULL
    WHERE seq = ?1 AND lease_token = ?2 AND status = 'processing'";
pub(super) const ACK_FAIL_SQL: &str =
    "UPDATE outbox_events SET status = 'failed', completed_at = ?3,
      last_error = ?4, locked_at = NULL, locked_until = NULL, lease_token = NULL
    WHERE seq = ?1 AND lease_token = ?2 AND status = 'processing'";
pub(super) const ACK_EXTEND_SQL: &str = "UPDATE outbox_events SET locked_until = ?3
    WHERE seq = ?1 AND lease_token = ?2 AND status = 'processing'";
pub(super) const ACK_DEFER_SQL: &str = "UPDATE outbox_events SET status = 'pending',
      attempts = max(attempts - 1, 0), next_attempt_at = max(next_attempt_at, ?3),
      last_error = ?4, locked_at = NULL, locked_until = NULL, lease_token = NULL
    WHERE seq = ?1 AND lease_token = ?2 AND status = 'processing'";
pub(super) const ACK_RELEASE_SQL: &str = "UPDATE outbox_events SET status = 'pending',
      attempts = max(attempts - 1, 0), locked_at = NULL, locked_until = NULL, lease_token = NULL
    WHERE seq = ?1 AND lease_token = ?2 AND status = 'processing'";

#[cfg(test)]
mod tests {
    use super::*;

    /// Each type of a typed claim reads its own stretch of the by-type
    /// index, never the whole due index.
    #[test]
    fn typed_claims_read_the_by_type_index() -> Result<(), rusqlite::Error> {
        let conn = rusqlite::Connection::open_in_memory()?;
        conn.execute_batch(crate::SCHEMA_SQL)?;
        for (types, with_leases) in [1, 3, MAX_TYPED_CLAIM]
            .into_iter()
            .flat_map(|t| [(t, true), (t, false)])
        {
            let sql = claim_by_types_sql(types, with_leases);
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
            // Unbound parameters are NULL, which is all a plan needs.
            let mut rows = stmt.raw_query();
            let mut plan = Vec::new();
            while let Some(row) = rows.next()? {
                plan.push(row.get::<_, String>(3)?);
            }
            let by_type = plan
                .iter()
                .filter(|l| {
                    l.contains("outbox_events_due_by_type (event_type=? AND next_attempt_at<?)")
                })
                .count();
            assert_eq!(by_type, types, "{plan:#?}");
            assert!(
                !plan.iter().any(|l| l.contains("outbox_events_due ")),
                "{plan:#?}"
            );
        }
        // A front claim: one read of the due index, no sort.
        for types in [2, MAX_TYPED_CLAIM] {
            let sql = claim_front_sql(types);
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
            let mut rows = stmt.raw_query();
            let mut plan = Vec::new();
            while let Some(row) = rows.next()? {
                plan.push(row.get::<_, String>(3)?);
            }
            let due = plan
                .iter()
                .filter(|l| l.contains("USING INDEX outbox_events_due (next_attempt_at<?)"))
                .count();
            assert_eq!(due, 1, "{plan:#?}");
            assert!(!plan.iter().any(|l| l.contains("TEMP B-TREE")), "{plan:#?}");
        }
        // The urgent step reads the urgent index, in its order, without a
        // sort, however long the due index is.
        for with_leases in [false, true] {
            let sql = &CLAIM_URGENT_SQL[usize::from(with_leases)];
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
            let mut rows = stmt.raw_query();
            let mut plan = Vec::new();
            while let Some(row) = rows.next()? {
                plan.push(row.get::<_, String>(3)?);
            }
            assert!(
                plan.iter()
                    .any(|l| l.contains("USING INDEX outbox_events_urgent")),
                "{plan:#?}"
            );
            assert!(
                !plan.iter().any(|l| l.contains("outbox_events_due ")),
                "{plan:#?}"
            );
            if !with_leases {
                assert!(!plan.iter().any(|l| l.contains("TEMP B-TREE")), "{plan:#?}");
            }
        }
        assert_eq!(
            claim_by_types_sql(MAX_TYPED_CLAIM + 1, true),
            CLAIM_SQL.as_str()
        );
        assert_eq!(
            claim_by_types_sql(MAX_TYPED_CLAIM + 1, false),
            CLAIM_DUE_SQL.as_str()
        );
        Ok(())
    }
}
