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

pub(crate) fn schema_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
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
