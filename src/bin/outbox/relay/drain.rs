//! Watching a relay run, and what it says when it ends: whether `--drain`
//! is done, what is left and why.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlite_outbox::text::format_duration;
use sqlite_outbox::{Backlog, Dispatcher, Operator, ShutdownReport};

use super::RelayArgs;

/// How many events of the relay's types are still pending, and why, in a
/// few words: retries scheduled (the next, and after what), events behind
/// their ordering key (the key, and what its head waits for), events
/// held back with their destination. The reasons come from a sample of
/// the oldest pending events.
pub(super) fn left_behind(
    store: &dyn Operator,
    types: Option<&[String]>,
) -> sqlite_outbox::Result<(u64, String)> {
    use sqlite_outbox::{ListFilter, Status, Why};
    const SAMPLE: usize = 500;
    let stats = store.stats()?;
    let mine = |t: &str| types.is_none_or(|ts| ts.iter().any(|x| x == t));
    let waiting: u64 = stats
        .by_type
        .iter()
        .filter(|t| mine(&t.event_type))
        .map(|t| t.pending)
        .sum();
    if waiting == 0 {
        return Ok((0, String::new()));
    }
    let wanted: Vec<Option<String>> = match types {
        Some(ts) => ts.iter().cloned().map(Some).collect(),
        None => vec![None],
    };
    let mut sample = Vec::new();
    for t in wanted {
        sample.extend(store.list(&ListFilter {
            status: Some(Status::Pending),
            event_type: t,
            limit: SAMPLE,
            ..ListFilter::default()
        })?);
    }
    let (mut scheduled, mut next): (u64, Option<(chrono::DateTime<chrono::Utc>, String)>) =
        (0, None);
    let mut keys: std::collections::BTreeMap<String, (u64, String)> = Default::default();
    let (mut held, mut due) = (0u64, 0u64);
    for e in sample.iter().take(SAMPLE) {
        match store.why(e)? {
            Why::Scheduled { at, last_error } => {
                scheduled += 1;
                if next.as_ref().is_none_or(|(t, _)| at < *t) {
                    next = Some((at, last_error.unwrap_or_default()));
                }
            }
            w @ Why::BehindKey { .. } => {
                if let Why::BehindKey { key, .. } = &w {
                    let entry = keys.entry(key.clone()).or_insert((0, w.to_string()));
                    entry.0 += 1;
                }
            }
            Why::HeldBack(_) => held += 1,
            _ => due += 1,
        }
    }
    let mut parts = Vec::new();
    if let Some((at, error)) = next {
        parts.push(format!(
            "{scheduled} due later, the next at {}{}",
            at.format("%Y-%m-%d %H:%M:%S UTC"),
            if error.is_empty() {
                String::new()
            } else {
                format!(" (after: {})", crate::text::excerpt(&error, 120))
            }
        ));
    }
    for (n, said) in keys.values().take(3) {
        parts.push(format!("{n} {}", crate::text::excerpt(said, 200)));
    }
    if keys.len() > 3 {
        parts.push(format!("and behind {} more ordering keys", keys.len() - 3));
    }
    if held > 0 {
        parts.push(format!("{held} held back with their destination"));
    }
    if due > 0 {
        parts.push(format!("{due} due (handled elsewhere, or just enqueued)"));
    }
    if sample.len() >= SAMPLE {
        parts.push(format!("(reasons from the oldest {SAMPLE})"));
    }
    Ok((waiting, parts.join("; ")))
}

/// The last line (or JSON object) of a run.
pub(super) fn print_summary(json_mode: bool, report: &ShutdownReport, waited: Option<&Backlog>) {
    let m = &report.metrics;
    tracing::info!(
        delivered = m.done,
        retried = m.retried,
        failed = m.failed,
        released = report.released,
        "relay stopped"
    );
    if json_mode {
        let summary = json!({
            "delivered": m.done,
            "retried": m.retried,
            "failed": m.failed,
            "released": report.released,
            "still_running": report.still_running,
            "next_retry_at": waited.and_then(|b| b.next_due_at),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).unwrap_or_default()
        );
    } else {
        println!(
            "delivered {}, retried {}, failed {}, released {}, still running {}",
            m.done, m.retried, m.failed, report.released, report.still_running
        );
    }
}

/// Shows progress on a terminal and, with `--drain`, waits until nothing is
/// left to do; returns the backlog it stopped on (`None` when stopped by a
/// signal).
pub(super) fn watch(
    store: &Arc<dyn Operator>,
    dispatcher: &Dispatcher,
    stop: &AtomicBool,
    a: &RelayArgs,
    types: Option<&[String]>,
) -> sqlite_outbox::Result<Option<sqlite_outbox::Backlog>> {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last_draw = Instant::now();
    let wait_retries = a.wait_retries.unwrap_or(Duration::ZERO);
    let result = loop {
        if stop.load(Ordering::SeqCst) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
        if dispatcher.halted().is_some() {
            break None;
        }
        let m = dispatcher.metrics();
        if a.drain {
            // Outcomes the store refused for good leave their events to
            // their leases: not in hand any more.
            let in_hand = m.claimed.saturating_sub(
                m.done
                    + m.retried
                    + m.failed
                    + m.released
                    + m.held_back
                    + m.lease_lost
                    + m.dropped_outcomes,
            );
            if in_hand == 0 && m.dropped_outcomes > 0 {
                // The store refused outcomes for good: waiting would only
                // deliver their events again when their leases run out.
                break Some(store.backlog(types)?);
            }
            let held = dispatcher.destinations();
            // A destination held back (unreachable, or busy until a time it
            // gave) is waited for only if its next probe falls within
            // --wait-retries; otherwise what is left waits for a later run.
            let probe_soon = held.iter().all(|d| {
                d.next_probe_at.is_some_and(|t| {
                    (t - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO) <= wait_retries
                })
            });
            if in_hand == 0 && !held.is_empty() && !probe_soon {
                break Some(store.backlog(types)?);
            }
            if in_hand == 0 && held.is_empty() {
                let backlog = store.backlog(types)?;
                let soon = backlog.next_due_at.is_some_and(|t| {
                    (t - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO) <= wait_retries
                });
                if !backlog.due && !backlog.processing && !soon {
                    break Some(backlog);
                }
            }
        }
        if tty && last_draw.elapsed() >= Duration::from_millis(250) {
            eprint!(
                "\r  delivered {}  retried {}  failed {}  ({:.0}/s)   ",
                m.done,
                m.retried,
                m.failed,
                m.done as f64 / started.elapsed().as_secs_f64().max(0.001)
            );
            last_draw = Instant::now();
        }
    };
    if tty {
        eprintln!();
    }
    if let Some(b) = &result {
        if let Some(next) = b.next_due_at {
            tracing::info!(
                "drained; retries are scheduled, the next in {}",
                format_duration(
                    (next - chrono::Utc::now())
                        .to_std()
                        .unwrap_or(Duration::ZERO)
                )
            );
        }
    }
    Ok(result)
}
