//! Sharing the one writer: an app enqueueing while a dispatcher runs, and
//! a steady stream near the enqueue capacity, in this process and from
//! another one.

use super::*;

/// One event and one app row per transaction, `n` times.
fn enqueue_app_rows(store: &SqliteStore, n: usize, from: usize) -> Res<()> {
    for i in 0..n {
        store.transaction(|tx| {
            tx.prepare_cached("INSERT INTO app (v) VALUES (?1)")?
                .execute([i as i64])?;
            store.enqueue_tx(tx, event(from + i))?;
            Ok::<_, sqlite_outbox::Error>(())
        })?;
    }
    Ok(())
}

/// Handler start times (ns) by event id, and every start in order.
#[derive(Default)]
struct Starts {
    by_id: HashMap<String, i64>,
    all: Vec<i64>,
}

fn recording_dispatcher(
    store: &SqliteStore,
    starts: &Arc<Mutex<Starts>>,
    poll: Duration,
) -> Res<Dispatcher> {
    let s = starts.clone();
    Ok(Dispatcher::builder(store.clone())
        .poll_interval(poll)
        .handle("bench.event", move |e: &Event| {
            let t = now_ns();
            if let Ok(mut s) = s.lock() {
                s.by_id.insert(e.id.to_string(), t);
                s.all.push(t);
            }
            Ok(())
        })
        .start()?)
}

/// The longest gap between consecutive handler starts within
/// `[from, to]` (ns), in ms.
fn longest_gap(all: &[i64], from: i64, to: i64) -> f64 {
    let mut inside: Vec<i64> = all
        .iter()
        .copied()
        .filter(|t| (from..=to).contains(t))
        .collect();
    inside.sort_unstable();
    let mut points = vec![from];
    points.extend(inside);
    points.push(to);
    points
        .windows(2)
        .map(|w| (w[1] - w[0]) as f64 / 1e6)
        .fold(0.0, f64::max)
}

pub(crate) fn contention_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    enqueue_beside_dispatcher(cfg, dir, rows)?;
    steady_stream(cfg, dir, rows)
}

/// The app's enqueue rate while a 4-worker dispatcher delivers what it
/// writes, against the same enqueue with no dispatcher, interleaved.
fn enqueue_beside_dispatcher(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let n = cfg.enqueue_n / 10;
    let rounds = 4;
    let per = n / rounds;
    let busy = our_db(&dir.join("cont-busy.db"), Durability::Normal)?;
    let quiet = our_db(&dir.join("cont-quiet.db"), Durability::Normal)?;
    let dispatcher = Dispatcher::builder(busy.clone())
        .workers(4)
        .handle("bench.event", |_: &Event| Ok(()))
        .start()?;
    let times = interleave(
        rounds,
        |r| enqueue_app_rows(&busy, per, r * per),
        |r| enqueue_app_rows(&quiet, per, r * per),
    )?;
    let report = dispatcher.shutdown(Duration::from_secs(30));
    let mut row = rate_row(
        "contention",
        "enqueue 1 event + 1 app row per tx while a 4-worker dispatcher delivers them, NORMAL".into(),
        n,
        times,
        format!(
            "{n} tx; raw column = the same enqueue with no dispatcher; {} delivered meanwhile in {} claim and {} outcome transactions ({} of them paced), {} store errors",
            report.metrics.done, report.metrics.claim_batches, report.metrics.settle_batches, report.metrics.writes_yielded_to_app, report.metrics.store_errors
        ),
    );
    row.name.push_str(" (vs no dispatcher)");
    rows.push(row);
    Ok(())
}

/// A steady FULL stream at 80 % of the measured enqueue capacity, with a
/// dispatcher at its defaults: the longest pause in handler starts, the
/// latency tail and any error, from this process and from another.
fn steady_stream(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let secs = if cfg.quick { 2 } else { 10 };
    // Capacity: back-to-back transactions for a second, nothing else running.
    let probe = our_db(&dir.join("cont-capacity.db"), Durability::Full)?;
    let t = Instant::now();
    let mut capacity = 0usize;
    while t.elapsed() < Duration::from_secs(1) {
        enqueue_app_rows(&probe, 10, capacity)?;
        capacity += 10;
    }
    let rate = (capacity as f64 / t.elapsed().as_secs_f64() * 0.8).max(1.0);
    let n = (rate * secs as f64) as usize;

    // Another process's commits are noticed by polling: at 100 ms, as in
    // the latency group (the default is 500 ms).
    for (place, path, poll) in [
        (
            "in-process",
            dir.join("cont-stream.db"),
            sqlite_outbox::DEFAULT_POLL_INTERVAL,
        ),
        (
            "other-process (poll 100 ms)",
            dir.join("cont-stream-child.db"),
            Duration::from_millis(100),
        ),
    ] {
        let store = our_db(&path, Durability::Full)?;
        let starts: Arc<Mutex<Starts>> = Arc::default();
        let dispatcher = recording_dispatcher(&store, &starts, poll)?;
        let (from, to, committed, app_errors) = if place == "in-process" {
            let mut committed = HashMap::new();
            let mut errors = 0;
            let from = now_ns();
            let t0 = Instant::now();
            for i in 0..n {
                let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let result = store.transaction(|tx| {
                    tx.prepare_cached("INSERT INTO app (v) VALUES (?1)")?
                        .execute([i as i64])?;
                    store.enqueue_tx(tx, event(i))
                });
                match result {
                    Ok(e) => {
                        committed.insert(e.id.to_string(), now_ns());
                    }
                    Err(_) => errors += 1,
                }
            }
            (from, now_ns(), committed, errors)
        } else {
            let from = now_ns();
            let out = Command::new(std::env::current_exe()?)
                .args([
                    "child-enqueue",
                    &path.display().to_string(),
                    &n.to_string(),
                    &(rate as u64).to_string(),
                ])
                .stdout(Stdio::piped())
                .output()?;
            let to = now_ns();
            let committed = super::latency::committed_times(&out.stdout);
            let errors = n.saturating_sub(committed.len());
            (from, to, committed, errors)
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while dispatcher.metrics().done < committed.len() as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let report = dispatcher.shutdown(Duration::from_secs(10));
        let s = starts.lock().map_err(|_| "poisoned")?;
        let mut lat: Vec<f64> = committed
            .iter()
            .filter_map(|(id, c)| s.by_id.get(id).map(|t| ((t - c).max(0)) as f64 / 1e6))
            .collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        let gap = longest_gap(&s.all, from, to);
        let note = format!(
            "{} events at {rate:.0}/s (80 % of {:.0}/s) for {secs} s; {} store errors, {app_errors} app errors, {} delivered",
            committed.len(),
            rate / 0.8,
            report.metrics.store_errors,
            lat.len()
        );
        let values = [
            ("longest gap between handler starts", gap),
            ("enqueue → handler p50", percentile(&lat, 0.5)),
            ("enqueue → handler p99", percentile(&lat, 0.99)),
            ("enqueue → handler max", percentile(&lat, 1.0)),
        ];
        let name = |what: &str| format!("FULL stream, {place}: {what}");
        super::latency::ms_rows(rows, "contention", name, &values, &note);
    }
    Ok(())
}
