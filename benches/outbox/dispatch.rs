//! Dispatch rates with a no-op handler, ours beside the raw claim and complete loop.

use super::*;

/// Our dispatcher with a no-op handler over `n` pending events, until the
/// last outcome is written.
pub(crate) fn dispatch_ours(
    path: &Path,
    n: usize,
    workers: usize,
    durability: Durability,
) -> Res<f64> {
    let store = our_db(path, durability)?;
    for chunk in 0..n / 1000 {
        store.enqueue_batch((0..1000).map(|i| event(chunk * 1000 + i)).collect())?;
    }
    let t = Instant::now();
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(workers)
        .batch_size(256)
        .handle("bench.event", |_: &Event| Ok(()))
        .start()?;
    while dispatcher.metrics().done < n as u64 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let secs = t.elapsed().as_secs_f64();
    let report = dispatcher.shutdown(Duration::from_secs(10));
    if store.stats()?.done != n as u64 || !report.is_clean() {
        return Err(format!("dispatch incomplete: {report:?}").into());
    }
    Ok(secs)
}

/// The raw loop: claim 100 in one UPDATE ... RETURNING, complete them in
/// another transaction.
pub(crate) fn dispatch_raw(path: &Path, n: usize, sync: &str) -> Res<f64> {
    let mut conn = raw_db(path, sync)?;
    {
        let tx = conn.transaction()?;
        for i in 0..n {
            raw_insert(&tx, i)?;
        }
        tx.commit()?;
    }
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let now = chrono::Utc::now().timestamp_millis();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let claimed: Vec<(i64, i64)> = tx
            .prepare_cached(
                "UPDATE outbox_events SET status = 'processing', attempts = attempts + 1, locked_at = ?1,
                   locked_until = ?1 + 60000, lease_token = random()
                 WHERE seq IN (SELECT seq FROM outbox_events WHERE status = 'pending' AND next_attempt_at <= ?1
                               ORDER BY next_attempt_at, seq LIMIT 100)
                 RETURNING seq, lease_token",
            )?
            .query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        tx.commit()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (seq, token) in &claimed {
            tx.prepare_cached(
                "UPDATE outbox_events SET status = 'done', completed_at = ?3, locked_at = NULL,
                   locked_until = NULL, lease_token = NULL
                 WHERE seq = ?1 AND lease_token = ?2 AND status = 'processing'",
            )?
            .execute(params![seq, token, now])?;
        }
        tx.commit()?;
        done += claimed.len();
    }
    Ok(t.elapsed().as_secs_f64())
}

pub(crate) fn dispatch_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let n = cfg.dispatch_n;
    for (label, durability, sync, worker_counts) in [
        ("FULL", Durability::Full, "FULL", &[1, 2, 4][..]),
        ("NORMAL", Durability::Normal, "NORMAL", &[4][..]),
    ] {
        let raw_a = dispatch_raw(&dir.join(format!("disp-raw-a-{label}.db")), n, sync)?;
        let mut results = Vec::new();
        for &workers in worker_counts {
            let path = dir.join(format!("disp-{workers}-{label}.db"));
            results.push((workers, dispatch_ours(&path, n, workers, durability)?));
        }
        let raw_b = dispatch_raw(&dir.join(format!("disp-raw-b-{label}.db")), n, sync)?;
        // The raw loop runs before and after ours; the faster of the two is
        // the baseline.
        let raw = raw_a.min(raw_b);
        for (workers, secs) in results {
            rows.push(rate_row(
                "dispatch",
                format!("no-op handler, {workers} worker(s), {label}"),
                n,
                (secs, raw),
                format!("{n} events; raw = claim-100/complete-100 loop"),
            ));
        }
    }
    Ok(())
}
