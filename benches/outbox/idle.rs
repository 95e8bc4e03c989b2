//! CPU time of a dispatcher with nothing to do.

use super::*;

/// CPU time (user + system) this process has used, from /proc/self/stat.
pub(crate) fn cpu_time() -> Res<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Ok(Duration::from_millis(ticks * 10))
}

/// CPU time (ms per second) an idle dispatcher uses over `secs`: one
/// started on an empty outbox in `path`.
pub(crate) fn idle_cpu(path: &Path, secs: u64) -> Res<f64> {
    let store = our_db(path, Durability::Full)?;
    let dispatcher = Dispatcher::builder(store)
        .handle("bench.event", |_: &Event| Ok(()))
        .start()?;
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_time()?;
    std::thread::sleep(Duration::from_secs(secs));
    let used = cpu_time()? - before;
    dispatcher.shutdown(Duration::from_secs(5));
    Ok(used.as_secs_f64() * 1000.0 / secs as f64)
}

/// What an idle dispatcher costs: CPU time while nothing is due.
pub(crate) fn idle_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let secs = if cfg.quick { 2 } else { 10 };
    rows.push(Row {
        group: "idle",
        name: "CPU used by an idle dispatcher (default 500 ms poll)".into(),
        ours: idle_cpu(&dir.join("idle.db"), secs)?,
        raw: None,
        unit: "ms CPU/s",
        ratio: None,
        note: format!("over {secs} s; 10 ms resolution"),
    });
    Ok(())
}
