//! Limits kept in the schema: each limited claim takes an advisory lock of
//! its limit's own for its transaction, so that claims under one limit
//! take turns across every dispatcher (those under other limits, and
//! unlimited ones, do not wait), then counts the live leases or takes from
//! the token bucket in `outbox_limits`.

use super::lease::type_lists;
use super::*;
use crate::store::limits::{
    claim_within, Bucket, LimitKind, LimitScope, LimitState, Limited, SharedLimit,
};

/// The first key of the limits' advisory locks: `outl` in ASCII (apart
/// from the schema lock's `outb`).
const LIMIT_LOCK_SPACE: i32 = 0x6F75_746C;

impl PostgresStore {
    pub(super) fn claim_limited_events(
        &self,
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
        shared: &[SharedLimit<'_>],
    ) -> Result<Limited> {
        let (events_table, schema) = (&self.inner.sql.events, &self.inner.schema);
        self.write(|tx| {
            // In a fixed order, so that two claims under the same two
            // limits cannot each hold one lock and wait for the other.
            let mut keys: Vec<String> = shared
                .iter()
                .map(|l| format!("{schema}.{}.{}", l.scope.as_str(), l.name))
                .collect();
            keys.sort();
            keys.dedup();
            for key in &keys {
                tx.execute(
                    "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                    &[&LIMIT_LOCK_SPACE, key],
                )?;
            }
            // In whole milliseconds, as the bucket's time is stored: a
            // refill never counts the same fraction of a millisecond twice.
            let now_ms = clock::to_millis(self.now());
            let now = clock::from_millis(now_ms);
            claim_within(
                tx,
                (shared, now, limit),
                |tx| live_leases(tx, events_table, filter, now_ms),
                |tx, l| read_bucket(tx, schema, l),
                |tx, want| self.claim_in(tx, want, lease, filter),
                |tx, l, b| write_bucket(tx, schema, l, b, now_ms),
            )
        })
    }

    pub(super) fn write_limit(&self, state: &LimitState) -> Result<()> {
        let schema = &self.inner.schema;
        let types = state
            .event_types
            .as_ref()
            .and_then(|t| serde_json::to_string(t).ok());
        self.write(|tx| {
            tx.execute(
                &format!(
                    "INSERT INTO {schema}.outbox_limits (scope, name, kind, max, per_ms, shared,
                       event_types, limited_since, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, CAST($7::text AS json), $8, $9)
                     ON CONFLICT (scope, name, kind) DO UPDATE SET max = excluded.max,
                       per_ms = excluded.per_ms, shared = excluded.shared,
                       event_types = excluded.event_types,
                       limited_since = excluded.limited_since, updated_at = excluded.updated_at"
                ),
                &[
                    &state.scope.as_str(),
                    &state.name,
                    &state.kind.as_str(),
                    &i64::from(state.kind.max()),
                    &state.kind.per().map(|p| p.as_millis() as i64),
                    &state.shared,
                    &types,
                    &state.limited_since.map(clock::to_millis),
                    &clock::to_millis(state.updated_at),
                ],
            )?;
            Ok(())
        })
    }
}

fn read_bucket(tx: &mut Tx<'_>, schema: &str, l: &SharedLimit<'_>) -> Result<Option<Bucket>> {
    let row = tx.query_opt(
        &format!(
            "SELECT tokens, refilled_at FROM {schema}.outbox_limits
             WHERE scope = $1 AND name = $2 AND kind = 'rate'"
        ),
        &[&l.scope.as_str(), &l.name],
    )?;
    Ok(row.and_then(|r| {
        match (
            r.try_get::<_, Option<f64>>(0),
            r.try_get::<_, Option<i64>>(1),
        ) {
            (Ok(Some(tokens)), Ok(Some(at))) => Some(Bucket {
                tokens,
                at: clock::from_millis(at),
            }),
            _ => None,
        }
    }))
}

fn write_bucket(
    tx: &mut Tx<'_>,
    schema: &str,
    l: &SharedLimit<'_>,
    bucket: Bucket,
    now: i64,
) -> Result<()> {
    tx.execute(
        &format!(
            "INSERT INTO {schema}.outbox_limits (scope, name, kind, max, per_ms, shared,
               tokens, refilled_at, updated_at)
             VALUES ($1, $2, 'rate', $3, $4, true, $5, $6, $7)
             ON CONFLICT (scope, name, kind) DO UPDATE SET max = excluded.max,
               per_ms = excluded.per_ms, shared = true, tokens = excluded.tokens,
               refilled_at = excluded.refilled_at"
        ),
        &[
            &l.scope.as_str(),
            &l.name,
            &i64::from(l.kind.max()),
            &l.kind.per().map(|p| p.as_millis() as i64),
            &bucket.tokens,
            &clock::to_millis(bucket.at),
            &now,
        ],
    )?;
    Ok(())
}

/// Events of the types `filter` allows under a live lease at `now`.
fn live_leases(tx: &mut Tx<'_>, events: &str, filter: &TypeFilter<'_>, now: i64) -> Result<usize> {
    let (only, skip) = type_lists(filter);
    let row = tx.query_one(
        &format!(
            "SELECT count(*) FROM {events} AS e
             WHERE e.status = 'processing' AND e.locked_until > $1::bigint
               AND ($2::text[] IS NULL OR e.event_type = ANY($2::text[]))
               AND ($3::text[] IS NULL OR e.event_type <> ALL($3::text[]))"
        ),
        &[&now, &only, &skip],
    )?;
    Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// The limits written down in `schema`, each concurrency limit with its
/// live leases counted at `now`. Rows another program damaged are left
/// out.
pub(super) fn read_limits(
    tx: &mut postgres::Transaction<'_>,
    schema: &str,
    events: &str,
    now: i64,
) -> Result<Vec<LimitState>> {
    let rows = tx.query(
        &format!(
            "SELECT scope, name, kind, max, per_ms, shared, event_types::text, limited_since,
                    updated_at
             FROM {schema}.outbox_limits ORDER BY scope, name, kind"
        ),
        &[],
    )?;
    let mut limits = Vec::new();
    for r in rows {
        let (Ok(scope), Ok(name), Ok(kind), Ok(max), Ok(per_ms), Ok(updated)) = (
            r.try_get::<_, String>(0),
            r.try_get::<_, String>(1),
            r.try_get::<_, String>(2),
            r.try_get::<_, i64>(3),
            r.try_get::<_, Option<i64>>(4),
            r.try_get::<_, i64>(8),
        ) else {
            continue;
        };
        let (Some(scope), Some(kind)) = (
            LimitScope::parse(&scope),
            LimitKind::from_parts(&kind, max, per_ms),
        ) else {
            continue;
        };
        let event_types: Option<Vec<String>> = r
            .try_get::<_, Option<String>>(6)
            .ok()
            .flatten()
            .and_then(|t| serde_json::from_str(&t).ok());
        let in_flight = if let LimitKind::Concurrency(_) = kind {
            let types = event_types.clone().unwrap_or_else(|| vec![name.clone()]);
            let row = tx.query_one(
                &format!(
                    "SELECT count(*) FROM {events} AS e
                     WHERE e.status = 'processing' AND e.locked_until > $1::bigint
                       AND e.event_type = ANY($2::text[])"
                ),
                &[&now, &types],
            )?;
            Some(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
        } else {
            None
        };
        limits.push(LimitState {
            scope,
            name,
            kind,
            shared: r.try_get::<_, bool>(5).unwrap_or(false),
            event_types,
            limited_since: r
                .try_get::<_, Option<i64>>(7)
                .ok()
                .flatten()
                .map(clock::from_millis),
            in_flight,
            updated_at: clock::from_millis(updated),
        });
    }
    Ok(limits)
}
