//! The outbox's objects in their schema: created when missing (if the
//! opener may), brought forward from an older layout, and checked against
//! what this build reads and writes before anything else runs.
//!
//! Every step runs in one transaction under an advisory lock of the
//! outbox's own (the two-key form, whose key space is apart from the
//! one-key locks an app takes), with `search_path` set to the outbox's
//! schema, then `pg_catalog`, then `pg_temp`, so that nothing in a
//! session's own path can stand in for what the DDL names.

use crate::error::{Error, ErrorKind, Result};

use super::{POSTGRES_SCHEMA_SQL, POSTGRES_SCHEMA_VERSION};

/// The step from version 1 to 2 (a `traceparent` column).
const MIGRATION_2: &str = include_str!("../../../migrations/postgres_002_traceparent.sql");

/// The step from version 2 to 3 (the notify trigger's `search_path`).
const MIGRATION_3: &str = include_str!("../../../migrations/postgres_003_pinned_search_path.sql");

/// The step from version 3 to 4 (a `priority` column and its index).
const MIGRATION_4: &str =
    include_str!("../../../migrations/postgres_004_priorities_and_limits.sql");

/// The first key of the outbox's advisory locks: `outb` in ASCII.
const LOCK_SPACE: i32 = 0x6F75_7462;

/// The columns of `outbox_events` this build reads and writes, with the
/// type `information_schema.columns.data_type` names.
const COLUMNS: &[(&str, &str)] = &[
    ("seq", "bigint"),
    ("id", "uuid"),
    ("event_type", "text"),
    ("payload", "json"),
    ("status", "text"),
    ("attempts", "bigint"),
    ("max_attempts", "bigint"),
    ("next_attempt_at", "bigint"),
    ("locked_at", "bigint"),
    ("locked_until", "bigint"),
    ("lease_token", "bigint"),
    ("completed_at", "bigint"),
    ("delivered_at", "bigint"),
    ("last_error", "text"),
    ("correlation_id", "text"),
    ("org_id", "uuid"),
    ("user_id", "uuid"),
    ("ordering_key", "text"),
    ("idempotency_key", "text"),
    ("created_at", "bigint"),
    ("traceparent", "text"),
    ("priority", "smallint"),
];

/// What an opener may do to the schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    /// Create the outbox when it is missing, and migrate it.
    Create,
    /// Migrate an outbox that is there; a missing one is an error.
    Existing,
    /// Change nothing: a missing or older outbox is an error.
    ReadOnly,
}

/// A schema name that needs no quoting anywhere it appears (SQL, channel
/// names), so nothing from it can reach a statement as SQL, and that is
/// not a system schema.
pub(super) fn check_schema_name(schema: &str) -> Result<()> {
    let mut chars = schema.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !(first_ok && rest_ok && schema.len() <= 40) {
        return Err(Error::invalid(format!(
            "schema name {schema:?} is not usable: lowercase letters, digits and _, \
             starting with a letter or _, at most 40 characters"
        )));
    }
    if schema.starts_with("pg_") || schema == "information_schema" {
        return Err(Error::invalid(format!(
            "schema {schema} belongs to PostgreSQL itself (pg_dump leaves it out); \
             choose a schema of your own, such as outbox"
        )));
    }
    Ok(())
}

/// Creates, migrates or only checks the outbox in `schema`, as `mode`
/// allows.
pub(super) fn migrate(client: &mut postgres::Client, schema: &str, mode: Mode) -> Result<()> {
    let mut tx = client.transaction()?;
    // A word the server reserves would need quoting wherever it appears.
    let reserved: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_get_keywords() \
             WHERE word = $1 AND catcode IN ('R', 'T'))",
            &[&schema],
        )?
        .get(0);
    if reserved {
        return Err(Error::invalid(format!(
            "schema name {schema} is a reserved word in PostgreSQL; choose another, such as outbox_{schema}"
        )));
    }
    if mode != Mode::ReadOnly {
        // Two processes that start at once: the second waits, then finds it.
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&LOCK_SPACE, &schema],
        )?;
    }
    let exists = |tx: &mut postgres::Transaction<'_>, table: &str| -> Result<bool> {
        let found: Option<String> = tx
            .query_one(
                "SELECT to_regclass(format('%I.%I', $1::text, $2::text))::text",
                &[&schema, &table],
            )?
            .get(0);
        Ok(found.is_some())
    };
    if !exists(&mut tx, "outbox_meta")? {
        if exists(&mut tx, "outbox_events")? {
            return Err(Error::not_an_outbox(format!(
                "schema {schema} has an outbox_events table but no outbox_meta: \
                 it is not an outbox this crate wrote"
            )));
        }
        if mode != Mode::Create {
            return Err(Error::not_an_outbox(format!(
                "schema {schema} holds no outbox (a mistyped --schema?); \
                 `outbox init` creates one"
            )));
        }
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}; \
             SET LOCAL search_path TO {schema}, pg_catalog, pg_temp;"
        ))?;
        tx.batch_execute(POSTGRES_SCHEMA_SQL)?;
        check_shape(&mut tx, schema)?;
        tx.commit()?;
        return Ok(());
    }
    let version: Option<i64> = tx
        .query_opt(
            &format!("SELECT value::text FROM {schema}.outbox_meta WHERE key = 'schema_version'"),
            &[],
        )?
        .and_then(|r| r.try_get::<_, String>(0).ok())
        .and_then(|v| v.parse().ok());
    match version {
        Some(v) if v > POSTGRES_SCHEMA_VERSION => Err(Error::new(ErrorKind::SchemaTooNew {
            found: v,
            supported: POSTGRES_SCHEMA_VERSION,
        })),
        Some(POSTGRES_SCHEMA_VERSION) => check_shape(&mut tx, schema),
        Some(v @ 1..) if mode == Mode::ReadOnly => Err(Error::new(ErrorKind::SchemaMismatch {
            reason: format!(
                "schema {schema} holds an outbox of layout {v}, older than this build's \
                     {POSTGRES_SCHEMA_VERSION}; opened read-only it is not migrated \
                     (`outbox init`, or any writer, migrates it)"
            ),
        })),
        Some(from @ 1..) => {
            tracing::info!(
                schema,
                from,
                to = POSTGRES_SCHEMA_VERSION,
                "migrating the outbox schema"
            );
            tx.batch_execute(&format!(
                "SET LOCAL search_path TO {schema}, pg_catalog, pg_temp;"
            ))?;
            if from < 2 {
                tx.batch_execute(MIGRATION_2)?;
            }
            if from < 3 {
                tx.batch_execute(MIGRATION_3)?;
            }
            tx.batch_execute(MIGRATION_4)?;
            check_shape(&mut tx, schema)?;
            tx.commit()?;
            Ok(())
        }
        other => Err(Error::not_an_outbox(format!(
            "schema {schema}'s outbox_meta holds schema_version {other:?}, which no build wrote"
        ))),
    }
}

/// Whether the outbox's tables have every column this build uses, of the
/// type it expects; the first thing wrong otherwise.
fn check_shape(tx: &mut postgres::Transaction<'_>, schema: &str) -> Result<()> {
    let rows = tx.query(
        "SELECT table_name::text, column_name::text, data_type::text \
         FROM information_schema.columns \
         WHERE table_schema = $1 \
           AND table_name IN ('outbox_events', 'outbox_destinations', 'outbox_limits', \
                              'outbox_meta')",
        &[&schema],
    )?;
    let found: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let wrong = |reason: String| Error::new(ErrorKind::SchemaMismatch { reason });
    for table in ["outbox_events", "outbox_destinations", "outbox_limits"] {
        if !found.iter().any(|(t, _, _)| t == table) {
            return Err(wrong(format!("schema {schema} has no table {table}")));
        }
    }
    for (name, ty) in COLUMNS {
        match found
            .iter()
            .find(|(t, c, _)| t == "outbox_events" && c == name)
        {
            None => {
                return Err(wrong(format!(
                    "{schema}.outbox_events has no column {name} ({ty})"
                )))
            }
            Some((_, _, actual)) if actual != ty => {
                return Err(wrong(format!(
                    "{schema}.outbox_events.{name} is {actual}, not {ty}"
                )))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_schemas_and_names_that_need_quoting_are_refused() {
        for ok in ["outbox", "_x", "billing_outbox_2"] {
            assert!(check_schema_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Outbox",
            "1x",
            "a-b",
            "a b",
            "x\"; DROP TABLE t; --",
            "pg_catalog",
            "pg_toast",
            "information_schema",
            &"x".repeat(41),
        ] {
            assert!(check_schema_name(bad).is_err(), "{bad}");
        }
        let err = check_schema_name("information_schema")
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("PostgreSQL itself")));
    }
}
