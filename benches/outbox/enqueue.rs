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
        format!("{n} events; one process"),
    ));
    for sync in ["FULL", "NORMAL"] {
        batches_in_processes(cfg, dir, sync, rows)?;
    }

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

/// `child-enqueue-batches PATH ours|raw N SYNC`: appends `n` events to the
/// file at `path` in transactions of 100, through the crate or the raw
/// insert loop, and prints the seconds it took.
pub(crate) fn child_batches(path: &str, ours: bool, n: usize, sync: &str) -> Res<()> {
    let offset = chrono::Utc::now().timestamp_micros() as usize;
    let t;
    if ours {
        let durability = if sync == "FULL" {
            Durability::Full
        } else {
            Durability::Normal
        };
        let store = our_db(Path::new(path), durability)?;
        t = Instant::now();
        for b in 0..n / 100 {
            store.transaction(|tx| {
                store.enqueue_batch_tx(
                    tx,
                    (0..100).map(|i| event(offset + b * 100 + i)).collect(),
                )?;
                Ok::<_, sqlite_outbox::Error>(())
            })?;
        }
    } else {
        let mut raw = if Path::new(path).exists() {
            raw_conn(Path::new(path), sync)?
        } else {
            raw_db(Path::new(path), sync)?
        };
        t = Instant::now();
        for b in 0..n / 100 {
            let tx = raw.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for i in 0..100 {
                raw_insert(&tx, offset + b * 100 + i)?;
            }
            tx.commit()?;
        }
    }
    println!("{}", t.elapsed().as_secs_f64());
    Ok(())
}

/// Batches of 100 at `sync`, ours and the raw loop each in a process of
/// its own (as an app runs), in alternating chunks: in one process, while
/// the raw loop's connection works on another file, ours re-reads pages
/// from its WAL (see BENCHMARKS.md).
fn batches_in_processes(cfg: &Config, dir: &Path, sync: &str, rows: &mut Vec<Row>) -> Res<()> {
    let n = cfg.enqueue_n;
    let rounds = 10;
    let exe = std::env::current_exe()?;
    let (mut t_ours, mut t_raw) = (0.0, 0.0);
    for _ in 0..rounds {
        for (side, total) in [("ours", &mut t_ours), ("raw", &mut t_raw)] {
            let file = dir.join(format!("enq100p-{sync}-{side}.db"));
            let out = Command::new(&exe)
                .args(["child-enqueue-batches", &file.display().to_string(), side])
                .arg((n / rounds).to_string())
                .arg(sync)
                .stderr(Stdio::inherit())
                .output()?;
            if !out.status.success() {
                return Err(format!("child-enqueue-batches {side} failed").into());
            }
            *total += String::from_utf8_lossy(&out.stdout).trim().parse::<f64>()?;
        }
    }
    rows.push(rate_row(
        "enqueue",
        format!("100 events per tx, {sync}, each side in its own process"),
        n,
        (t_ours, t_raw),
        format!("{n} events in {rounds} alternating chunks"),
    ));
    Ok(())
}
