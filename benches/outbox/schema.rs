//! What the schema's checks cost a writer: the same raw insert loop into
//! the version-1 table (`STRICT`) and the version-2 table (no `STRICT`,
//! typeof and range checks), interleaved, at both batch sizes. Here "raw"
//! is version 1, so the ratio is version 2's rate over version 1's.

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
            format!("insert, {batch} per tx, NORMAL: version 2 checks vs version 1 STRICT"),
            rounds * batch,
            times,
            "raw = the same loop on the version-1 STRICT table".into(),
        ));
    }
    Ok(())
}
