//! The overview's numbers, counted at most every so often.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlite_outbox::Stats;

use super::Ui;
use crate::describe;

/// A span of a chart: its start, done and failed events.
pub(crate) type Span = (chrono::DateTime<chrono::Utc>, u64, u64);

/// The overview's numbers, counted at most every so often: on a large
/// outbox a count reads every row.
#[derive(Clone)]
pub(crate) struct Overview {
    pub(crate) stats: Stats,
    /// Finished events per minute over the last hour, and per hour over
    /// the last day: (span start, done, failed).
    pub(crate) hour: Vec<Span>,
    pub(crate) day: Vec<Span>,
    pub(crate) at: chrono::DateTime<chrono::Utc>,
}

pub(super) struct Cached {
    value: Arc<Overview>,
    at: Instant,
    cost: Duration,
}

impl Ui {
    /// The overview's numbers, counted again when the last count is older
    /// than ten times what it cost (at least a second): the dashboard
    /// takes no more than a tenth of a core from the app.
    pub(crate) fn overview(&self) -> Result<Arc<Overview>, String> {
        let mut cached = self.overview.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cached.as_ref() {
            if c.at.elapsed() < (c.cost * 10).max(Duration::from_secs(1)) {
                return Ok(Arc::clone(&c.value));
            }
        }
        let started = Instant::now();
        let now = chrono::Utc::now();
        let fail = |e: sqlite_outbox::Error| describe(&e);
        let stats = self.store.stats().map_err(fail)?;
        // One read for both charts: the day per minute, summed per hour.
        let minutes = self
            .store
            .throughput(now - chrono::Duration::hours(24), Duration::from_secs(60))
            .map_err(fail)?;
        let hour_ago = now - chrono::Duration::hours(1);
        let hour: Vec<(chrono::DateTime<chrono::Utc>, u64, u64)> = minutes
            .iter()
            .filter(|t| t.start >= hour_ago - chrono::Duration::minutes(1))
            .map(|t| (t.start, t.done, t.failed))
            .collect();
        let mut day: Vec<(chrono::DateTime<chrono::Utc>, u64, u64)> = Vec::new();
        for t in &minutes {
            let ms = t.start.timestamp_millis();
            let start = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(
                ms - ms.rem_euclid(3_600_000),
            )
            .unwrap_or(t.start);
            match day.last_mut() {
                Some(last) if last.0 == start => {
                    last.1 += t.done;
                    last.2 += t.failed;
                }
                _ => day.push((start, t.done, t.failed)),
            }
        }
        let value = Arc::new(Overview {
            stats,
            hour,
            day,
            at: now,
        });
        *cached = Some(Cached {
            value: Arc::clone(&value),
            at: Instant::now(),
            cost: started.elapsed(),
        });
        Ok(value)
    }

    /// The last numbers counted, however old, without counting: for what
    /// only decorates a page (the type names offered in a filter).
    pub(crate) fn last_overview(&self) -> Option<Arc<Overview>> {
        let cached = self.overview.lock().unwrap_or_else(|p| p.into_inner());
        cached.as_ref().map(|c| Arc::clone(&c.value))
    }

    /// Forgets the overview's numbers, after a change.
    pub(crate) fn changed(&self) {
        *self.overview.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}
