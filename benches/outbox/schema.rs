//! What the schema costs a writer: the same raw insert loop into the
//! version-1 table (`STRICT`) and today's (no `STRICT`, typeof and range
//! checks, and since version 3 an index of due events by type),
//! interleaved, at both batch sizes; and today's against version 2 (today's
//! without that index). The ratio is today's rate over the older one's.

use sqlite_outbox::SCHEMA_VERSION;

use super::*;

const V1_DDL: &str = include_str!("../../migrations/001_initial.sql");

fn table(path: &Path, ddl: &str) -> Res<Connection> {
    let conn = raw_conn(path, "NORMAL")?;
    conn.execute_batch(ddl)?;
    Ok(conn)
}

/// A lean queue table, then the pieces of ours added one at a time: what
/// each costs an insert of one pending event per transaction.
const PIECES: [(&str, &str); 4] = [
    (
        "a lean queue table (rowid key, one due index)",
        "CREATE TABLE outbox_events (seq INTEGER PRIMARY KEY, id TEXT NOT NULL,
           event_type TEXT NOT NULL, payload TEXT NOT NULL, status TEXT NOT NULL,
           attempts INTEGER NOT NULL, max_attempts INTEGER NOT NULL,
           next_attempt_at INTEGER NOT NULL, created_at INTEGER NOT NULL);",
    ),
    (
        "+ AUTOINCREMENT",
        "CREATE TABLE outbox_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL,
           event_type TEXT NOT NULL, payload TEXT NOT NULL, status TEXT NOT NULL,
           attempts INTEGER NOT NULL, max_attempts INTEGER NOT NULL,
           next_attempt_at INTEGER NOT NULL, created_at INTEGER NOT NULL);",
    ),
    (
        "+ a unique id",
        "CREATE TABLE outbox_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
           event_type TEXT NOT NULL, payload TEXT NOT NULL, status TEXT NOT NULL,
           attempts INTEGER NOT NULL, max_attempts INTEGER NOT NULL,
           next_attempt_at INTEGER NOT NULL, created_at INTEGER NOT NULL);",
    ),
    (
        "+ the by-type index",
        "CREATE TABLE outbox_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
           event_type TEXT NOT NULL, payload TEXT NOT NULL, status TEXT NOT NULL,
           attempts INTEGER NOT NULL, max_attempts INTEGER NOT NULL,
           next_attempt_at INTEGER NOT NULL, created_at INTEGER NOT NULL);
         CREATE INDEX outbox_events_due_by_type
           ON outbox_events (event_type, next_attempt_at) WHERE status = 'pending';",
    ),
];

/// One pending event per transaction at NORMAL into each table of
/// [`PIECES`] and into ours, in interleaved rounds: each rate beside the
/// lean table's.
fn pieces(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let due = "CREATE INDEX outbox_events_due ON outbox_events (next_attempt_at, seq)
               WHERE status = 'pending';";
    let mut tables = Vec::new();
    for (i, (_, ddl)) in PIECES.iter().enumerate() {
        tables.push(table(
            &dir.join(format!("schema-piece-{i}.db")),
            &format!("{ddl}\n{due}"),
        )?);
    }
    tables.push(table(&dir.join("schema-piece-ours.db"), SCHEMA_SQL)?);
    let n = cfg.enqueue_n / 5;
    let rounds = 10;
    let mut secs = vec![0.0; tables.len()];
    for r in 0..rounds {
        for (k, conn) in tables.iter().enumerate() {
            let t = Instant::now();
            for i in 0..n / rounds {
                let tx = conn.unchecked_transaction()?;
                raw_insert(&tx, r * n + i)?;
                tx.commit()?;
            }
            secs[k] += t.elapsed().as_secs_f64();
        }
    }
    let names = PIECES
        .iter()
        .map(|(name, _)| *name)
        .chain(["ours: + the other columns, their checks and partial indexes"]);
    for (k, name) in names.enumerate() {
        rows.push(rate_row(
            "schema",
            format!("insert, 1 per tx, NORMAL: {name}"),
            n,
            (secs[k], secs[0]),
            "raw = the lean queue table, interleaved".into(),
        ));
    }
    Ok(())
}

pub(crate) fn schema_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    pieces(cfg, dir, rows)?;
    for batch in [1usize, 100] {
        let v2 = table(&dir.join(format!("schema-v2-{batch}.db")), SCHEMA_SQL)?;
        let v1 = table(&dir.join(format!("schema-v1-{batch}.db")), V1_DDL)?;
        let n = cfg.enqueue_n * batch.min(10);
        let rounds = (n / batch).max(1);
        let insert = |conn: &Connection, r: usize| -> Res<()> {
            let tx = conn.unchecked_transaction()?;
            for i in 0..batch {
                raw_insert(&tx, r * batch + i)?;
            }
            tx.commit()?;
            Ok(())
        };
        let times = interleave(rounds, |r| insert(&v2, r), |r| insert(&v1, r))?;
        rows.push(rate_row(
            "schema",
            format!("insert, {batch} per tx, NORMAL: version {SCHEMA_VERSION} vs version 1 STRICT"),
            rounds * batch,
            times,
            "raw = the same loop on the version-1 STRICT table".into(),
        ));
        let now = table(&dir.join(format!("schema-v3-{batch}.db")), SCHEMA_SQL)?;
        let before = table(&dir.join(format!("schema-v2i-{batch}.db")), SCHEMA_SQL)?;
        before.execute_batch("DROP INDEX outbox_events_due_by_type")?;
        let times = interleave(rounds, |r| insert(&now, r), |r| insert(&before, r))?;
        rows.push(rate_row(
            "schema",
            format!("insert, {batch} per tx, NORMAL: version 3 vs version 2 (the by-type index)"),
            rounds * batch,
            times,
            "raw = the same loop without outbox_events_due_by_type".into(),
        ));
    }
    Ok(())
}
