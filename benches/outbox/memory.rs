//! Memory of a process that enqueues and dispatches.

use super::*;

pub(crate) fn child_rss(path: &str, n: usize) -> Res<()> {
    let p = PathBuf::from(path);
    let store = fill(&p, n, 0)?;
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(4)
        .batch_size(256)
        .handle("bench.event", |_: &Event| Ok(()))
        .start()?;
    while dispatcher.metrics().done < n as u64 {
        std::thread::sleep(Duration::from_millis(5));
    }
    dispatcher.shutdown(Duration::from_secs(10));
    let status = std::fs::read_to_string("/proc/self/status")?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    println!("{hwm} {}", std::fs::metadata(&p)?.len());
    Ok(())
}

pub(crate) fn memory_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let exe = std::env::current_exe()?;
    let mut measured = Vec::new();
    for n in [cfg.scale_small, cfg.rss_large] {
        let path = dir.join(format!("rss-{n}.db"));
        let t = Instant::now();
        let out = Command::new(&exe)
            .args(["child-rss", &path.display().to_string(), &n.to_string()])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut f = text.split_whitespace();
        let (kib, bytes): (f64, f64) = (
            f.next().unwrap_or("0").parse()?,
            f.next().unwrap_or("0").parse()?,
        );
        measured.push((
            n,
            kib / 1024.0,
            bytes / 1048576.0,
            t.elapsed().as_secs_f64(),
        ));
    }
    let base = measured[0].1;
    for (n, mib, file_mib, secs) in measured {
        rows.push(Row {
            group: "memory",
            name: format!("peak RSS dispatching a {n} backlog"),
            ours: mib,
            raw: None,
            unit: "MiB",
            ratio: Some(mib / base),
            note: format!("file {file_mib:.1} MiB; {:.0} ev/s", n as f64 / secs),
        });
    }
    Ok(())
}
