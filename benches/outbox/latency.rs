//! Latency from enqueue to handler under a steady load, from another process.

use super::*;

pub(crate) fn latency_rows(rows: &mut Vec<Row>, name: &str, mut ms: Vec<f64>) {
    ms.sort_by(|a, b| a.total_cmp(b));
    let note = format!("{} events", ms.len());
    let values = [
        ("p50", percentile(&ms, 0.5)),
        ("p99", percentile(&ms, 0.99)),
        ("p99.9", percentile(&ms, 0.999)),
        ("max", percentile(&ms, 1.0)),
    ];
    ms_rows(
        rows,
        "latency",
        |label| format!("{name} {label}"),
        &values,
        &note,
    );
}

/// One row in milliseconds per `(label, value)`, named by `name(label)`.
pub(crate) fn ms_rows(
    rows: &mut Vec<Row>,
    group: &'static str,
    name: impl Fn(&str) -> String,
    values: &[(&str, f64)],
    note: &str,
) {
    for (label, v) in values {
        rows.push(Row {
            group,
            name: name(label),
            ours: *v,
            raw: None,
            unit: "ms",
            ratio: None,
            note: note.to_owned(),
        });
    }
}

pub(crate) fn latency_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    latency_bench(
        cfg,
        &dir.join("latency-full.db"),
        Durability::Full,
        "FULL",
        rows,
    )?;
    latency_bench(
        cfg,
        &dir.join("latency-normal.db"),
        Durability::Normal,
        "NORMAL",
        rows,
    )
}

/// Enqueue → handler start at a steady 1,000 events/s.
pub(crate) fn latency_bench(
    cfg: &Config,
    path: &Path,
    durability: Durability,
    label: &str,
    rows: &mut Vec<Row>,
) -> Res<()> {
    let n = cfg.latency_secs as usize * 1000;
    let starts: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let store = our_db(path, durability)?;
    let s = starts.clone();
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(4)
        .poll_interval(Duration::from_millis(100))
        .handle("bench.event", move |e: &Event| {
            let t = now_ns();
            s.lock().map(|mut m| m.insert(e.id.to_string(), t)).ok();
            Ok(())
        })
        .start()?;

    // (a) in this process
    let mut committed = HashMap::new();
    let t0 = Instant::now();
    for i in 0..n {
        let due = t0 + Duration::from_micros(i as u64 * 1000);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let e = store.enqueue(event(i))?;
        committed.insert(e.id.to_string(), now_ns());
    }
    std::thread::sleep(Duration::from_millis(300));
    let lat = |committed: &HashMap<String, i64>| -> Res<Vec<f64>> {
        let starts = starts.lock().map_err(|_| "poisoned")?;
        Ok(committed
            .iter()
            .filter_map(|(id, c)| starts.get(id).map(|s| ((s - c).max(0)) as f64 / 1e6))
            .collect())
    };
    latency_rows(
        rows,
        &format!("{label}: in-process enqueue → handler"),
        lat(&committed)?,
    );
    if durability != Durability::Full {
        dispatcher.shutdown(Duration::from_secs(5));
        return Ok(());
    }

    // (b) another process enqueues; noticed by a look at data_version every
    // 100 ms, then every 5 ms while its commits keep bringing events
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args([
            "child-enqueue",
            &path.display().to_string(),
            &n.to_string(),
            "1000",
        ])
        .stdout(Stdio::piped())
        .output()?;
    std::thread::sleep(Duration::from_millis(300));
    let committed = committed_times(&out.stdout);
    latency_rows(
        rows,
        &format!("{label}: other-process enqueue → handler (poll 100 ms)"),
        lat(&committed)?,
    );
    dispatcher.shutdown(Duration::from_secs(5));
    Ok(())
}

/// The `id commit-time` lines a `child-enqueue` process printed.
pub(crate) fn committed_times(stdout: &[u8]) -> HashMap<String, i64> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| {
            l.split_once(' ')
                .and_then(|(id, t)| t.parse().ok().map(|t| (id.to_owned(), t)))
        })
        .collect()
}

pub(crate) fn child_enqueue(path: &str, n: usize, per_sec: u64) -> Res<()> {
    let store = SqliteStore::open(path)?;
    let t0 = Instant::now();
    let mut out = String::new();
    for i in 0..n {
        let due = t0 + Duration::from_micros(i as u64 * 1_000_000 / per_sec);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let e = store.enqueue(event(i))?;
        out.push_str(&format!("{} {}\n", e.id, now_ns()));
    }
    print!("{out}");
    Ok(())
}
