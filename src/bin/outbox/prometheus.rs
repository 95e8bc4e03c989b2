//! The outbox's state in the Prometheus text format (version 0.0.4): for
//! `outbox stats --prometheus` (node-exporter's textfile collector) and the
//! dashboard's `/metrics`.

use std::fmt::Write as _;

use sqlite_outbox::{Stats, Status};

/// One metric family: its help line, type and samples.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", label_value(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// A label value as the text format writes it: backslash, double quote
/// and newline escaped. Event types and destination names come from the
/// database, so anything may be in them.
pub(crate) fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            // A value another program wrote must not drive the terminal
            // of whoever reads the metrics there.
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// The gauges a look at the database gives: counts per status and type,
/// due events, the oldest due event's wait, held-back destinations.
pub(crate) fn render(stats: &Stats) -> String {
    let mut out = String::new();
    let mut f = Family::new(
        &mut out,
        "outbox_events",
        "gauge",
        "Events in the outbox, by status and event type.",
    );
    for t in &stats.by_type {
        for status in Status::ALL {
            let n = match status {
                Status::Pending => t.pending,
                Status::Processing => t.processing,
                Status::Done => t.done,
                Status::Failed => t.failed,
            };
            f.sample(
                "outbox_events",
                &[("status", status.as_str()), ("type", &t.event_type)],
                n,
            );
        }
    }
    let mut f = Family::new(
        &mut out,
        "outbox_events_due",
        "gauge",
        "Pending events that are due now, by event type.",
    );
    for t in &stats.by_type {
        f.sample("outbox_events_due", &[("type", &t.event_type)], t.due);
    }
    let mut f = Family::new(
        &mut out,
        "outbox_events_behind_key",
        "gauge",
        "Due events that wait behind the unfinished head of their ordering key.",
    );
    f.sample("outbox_events_behind_key", &[], stats.behind_key);
    let mut f = Family::new(
        &mut out,
        "outbox_events_pending_by_priority",
        "gauge",
        "Pending events of raised priority (above 0), by priority; due: those due now.",
    );
    for p in &stats.by_priority {
        let priority = p.priority.to_string();
        f.sample(
            "outbox_events_pending_by_priority",
            &[("priority", &priority), ("due", "false")],
            p.pending - p.due.min(p.pending),
        );
        f.sample(
            "outbox_events_pending_by_priority",
            &[("priority", &priority), ("due", "true")],
            p.due,
        );
    }
    let mut f = Family::new(
        &mut out,
        "outbox_limit_max",
        "gauge",
        "What a limit dispatchers keep allows: events at once (concurrency) or per interval (rate).",
    );
    for l in &stats.limits {
        f.sample(
            "outbox_limit_max",
            &[
                ("scope", l.scope.as_str()),
                ("name", &l.name),
                ("kind", l.kind.as_str()),
            ],
            l.kind.max(),
        );
    }
    let mut f = Family::new(
        &mut out,
        "outbox_limit_in_flight",
        "gauge",
        "Events under a live lease that a concurrency limit counts, in every process.",
    );
    for l in &stats.limits {
        if let Some(n) = l.in_flight {
            f.sample(
                "outbox_limit_in_flight",
                &[("scope", l.scope.as_str()), ("name", &l.name)],
                n,
            );
        }
    }
    let mut f = Family::new(
        &mut out,
        "outbox_limit_waiting",
        "gauge",
        "1 while due events wait for a limit (every slot taken, or the rate spent), else 0.",
    );
    for l in &stats.limits {
        f.sample(
            "outbox_limit_waiting",
            &[
                ("scope", l.scope.as_str()),
                ("name", &l.name),
                ("kind", l.kind.as_str()),
            ],
            u8::from(l.limited_since.is_some()),
        );
    }
    let mut f = Family::new(
        &mut out,
        "outbox_oldest_due_age_seconds",
        "gauge",
        "How long the oldest due event has waited since it became due (0 when none is due).",
    );
    let age = stats.oldest_due_age.map_or(0.0, |d| d.as_secs_f64());
    f.sample("outbox_oldest_due_age_seconds", &[], age);
    let mut f = Family::new(
        &mut out,
        "outbox_destination_held",
        "gauge",
        "Destinations a dispatcher holds back (unreachable or paused), 1 each.",
    );
    for d in &stats.destinations {
        f.sample(
            "outbox_destination_held",
            &[("destination", &d.name), ("hold", d.hold.as_str())],
            1,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(label_value("plain.type"), "plain.type");
        assert_eq!(label_value("x\u{1b}[31m"), "x\u{FFFD}[31m");
    }

    #[test]
    fn an_empty_outbox_still_reports_its_oldest_due_age() {
        let text = render(&Stats::default());
        assert!(
            text.contains("\noutbox_oldest_due_age_seconds 0\n"),
            "{text}"
        );
        assert!(!text.contains("outbox_events{"), "{text}");
    }
}
