//! Enqueue rates: one event per transaction and batches, ours beside the raw insert loop, at both durabilities.

use super::*;

pub(crate) fn enqueue_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let rounds = 10;
    for (label, durability, sync) in [
        ("FULL", Durability::Full, "FULL"),
        ("NORMAL", Durability::Normal, "NORMAL"),
    ] {
        let n = cfg.enqueue_n / 10;
        let store = our_db(&dir.join(format!("enq1-{label}.db")), durability)?;
        let mut raw = raw_db(&dir.join(format!("enq1-{label}-raw.db")), sync)?;
        let per = n / rounds;
        let times = interleave(
            rounds,
            |r| {
                for i in 0..per {
                    store.transaction(|tx| {
                        tx.prepare_cached("INSERT INTO app (v) VALUES (?1)")?
                            .execute([i as i64])?;
                        store.enqueue_tx(tx, event(r * per + i))?;
                        Ok::<_, sqlite_outbox::Error>(())
                    })?;
                }
                Ok(())
            },
            |r| {
                for i in 0..per {
                    let tx = raw.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    tx.prepare_cached("INSERT INTO app (v) VALUES (?1)")?
                        .execute([i as i64])?;
                    raw_insert(&tx, r * per + i)?;
                    tx.commit()?;
                }
                Ok(())
            },
        )?;
        rows.push(rate_row(
            "enqueue",
            format!("1 event + 1 app row per tx, {label}"),
            n,
            times,
            format!("{n} tx"),
        ));
    }

    let n = cfg.enqueue_n;
    let store = our_db(&dir.join("enq100.db"), Durability::Full)?;
    let mut raw = raw_db(&dir.join("enq100-raw.db"), "FULL")?;
    let batches = n / 100;
    let times = interleave(
        rounds,
        |r| {
            for b in 0..batches / rounds {
                store.transaction(|tx| {
                    store.enqueue_batch_tx(
                        tx,
                        (0..100)
                            .map(|i| event(r * 1_000_000 + b * 100 + i))
                            .collect(),
                    )?;
                    Ok::<_, sqlite_outbox::Error>(())
                })?;
            }
            Ok(())
        },
        |r| {
            for b in 0..batches / rounds {
                let tx = raw.transaction_with_behavior(TransactionBehavior::Immediate)?;
                for i in 0..100 {
                    raw_insert(&tx, r * 1_000_000 + b * 100 + i)?;
                }
                tx.commit()?;
            }
            Ok(())
        },
    )?;
    rows.push(rate_row(
        "enqueue",
        "100 events per tx, FULL".into(),
        n,
        times,
        format!("{n} events"),
    ));

    // Four threads at once, one event per transaction.
    let n = cfg.enqueue_n / 10;
    let store = our_db(&dir.join("enq4.db"), Durability::Full)?;
    let raw_path = dir.join("enq4-raw.db");
    drop(raw_db(&raw_path, "FULL")?);
    let times = interleave(
        2,
        |_| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let store = store.clone();
                    std::thread::spawn(move || -> sqlite_outbox::Result<()> {
                        for i in 0..n / 8 {
                            store.transaction(|tx| {
                                store.enqueue_tx(tx, event(t * n + i)).map(|_| ())
                            })?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| "thread panicked")??;
            }
            Ok(())
        },
        |_| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let path = raw_path.clone();
                    std::thread::spawn(move || -> Result<(), String> {
                        let mut conn = raw_conn(&path, "FULL").map_err(|e| e.to_string())?;
                        for i in 0..n / 8 {
                            let tx = conn
                                .transaction_with_behavior(TransactionBehavior::Immediate)
                                .map_err(|e| e.to_string())?;
                            raw_insert(&tx, t * n + i).map_err(|e| e.to_string())?;
                            tx.commit().map_err(|e| e.to_string())?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| "thread panicked")??;
            }
            Ok(())
        },
    )?;
    rows.push(rate_row(
        "enqueue",
        "4 threads, 1 event per tx, FULL".into(),
        n,
        times,
        format!("{n} tx"),
    ));
    Ok(())
}
