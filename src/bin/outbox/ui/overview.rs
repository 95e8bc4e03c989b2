//! The dashboard's overview: counts, what needs attention (failures and
//! their most frequent errors, keys held by their head, destinations held
//! back, a backlog nobody works on), finished events per minute and hour,
//! and what is in flight.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlite_outbox::{ListFilter, Status, Why};

use super::html::{age, enc, excerpt, html, page, time_from, Html};
use super::pages::{error_page, event_link, notice};
use super::{Overview, Reply, Req, Ui};
use crate::describe;

pub(super) fn overview(ui: &Ui, req: &Req) -> Reply {
    let o = match ui.overview() {
        Ok(o) => o,
        Err(e) => return error_page(ui, 503, "The outbox cannot be read", &e),
    };
    let processing = ui.store.list(&ListFilter {
        status: Some(Status::Processing),
        limit: 20,
        ..ListFilter::default()
    });
    let now = Utc::now();
    // Leases that ran out: their worker stopped (or the file is only read
    // by nobody); the next dispatcher to look claims them again.
    let ran_out = processing.as_ref().map_or(0, |events| {
        events
            .iter()
            .filter(|e| e.locked_until.is_some_and(|t| t <= now))
            .count()
    });
    let s = &o.stats;
    let mut b = html!(
        "<div data-live><section class=\"cards\">{}{}{}{}{}</section>",
        card(
            "pending",
            s.pending,
            &match s.by_priority.iter().map(|p| p.pending).sum::<u64>() {
                0 => format!("{} due now", s.due),
                urgent => format!("{} due now, {urgent} of raised priority", s.due),
            },
            "/events?status=pending"
        ),
        card(
            "processing",
            s.processing,
            "under lease",
            "/events?status=processing"
        ),
        card("failed", s.failed, "need a look", "/events?status=failed"),
        card("done", s.done, "delivered", "/events?status=done"),
        card_text(
            "oldest due",
            &s.oldest_due_age.map(age).unwrap_or_else(|| "—".into()),
            "waiting since due",
        ),
    );
    attention(ui, &o, ran_out, &mut b);
    b.push(Html::lit(
        "<section><h2>Finished events</h2><div class=\"charts\">",
    ));
    b.push(chart(
        "Last hour, per minute",
        o.hour.iter().copied(),
        o.at,
        60,
        Duration::from_secs(60),
    ));
    b.push(chart(
        "Last day, per hour",
        o.day.iter().copied(),
        o.at,
        24,
        Duration::from_secs(3600),
    ));
    b.push(Html::lit("</div></section>"));
    b.push(Html::lit("<section><h2>Processing now</h2>"));
    match processing {
        Ok(events) if events.is_empty() => {
            b.push(Html::lit(
                "<p class=\"muted\">Nothing is being handled.</p>",
            ));
        }
        Ok(events) => {
            b.push(Html::lit("<table><thead><tr><th>Event</th><th>Type</th><th>Attempt</th><th>Lease taken</th><th>Lease ends</th></tr></thead><tbody>"));
            for e in &events {
                b.push(html!(
                    "<tr><td>{}</td><td>{}</td><td>{}/{}</td><td>{}</td><td>{}</td></tr>",
                    event_link(e),
                    e.event_type,
                    e.attempts,
                    e.max_attempts,
                    e.locked_at.map(|t| time_from(t, o.at)).unwrap_or_default(),
                    e.locked_until
                        .map(|t| time_from(t, o.at))
                        .unwrap_or_default(),
                ));
            }
            b.push(Html::lit("</tbody></table>"));
        }
        Err(e) => b.push(html!("<p class=\"error\">{}</p>", describe(&e))),
    }
    b.push(Html::lit("</section>"));
    by_type(&o, &mut b);
    limits(&o, &mut b);
    b.push(html!(
        "<p class=\"muted small\">Counted {}.</p></div>",
        time_from(o.at, Utc::now())
    ));
    if !ui.read_only {
        b.push(Html::lit(
            "<section><h2>Maintenance</h2><p><a class=\"button secondary\" href=\"/confirm?action=purge\">Purge finished events…</a></p></section>",
        ));
    }
    Reply::html(
        200,
        page(&ui.frame("Overview", "overview"), &notice(req), &b).into_string(),
    )
}

fn card(label: &str, n: u64, sub: &str, href: &str) -> Html {
    html!(
        "<a class=\"card {cls}\" href=\"{href}\"><span class=\"label\">{label}</span>\
         <span class=\"value\" data-count=\"{cls}\">{n}</span><span class=\"sub\">{sub}</span></a>",
        cls = label,
        href = href,
        label = label,
        n = n,
        sub = sub,
    )
}

fn card_text(label: &str, value: &str, sub: &str) -> Html {
    html!(
        "<div class=\"card\"><span class=\"label\">{}</span><span class=\"value\">{}</span>\
         <span class=\"sub\">{}</span></div>",
        label,
        value,
        sub
    )
}

/// What is stuck, first: failed events per type, a backlog nothing is
/// working on, destinations held back.
fn attention(ui: &Ui, o: &Overview, ran_out: usize, b: &mut Html) {
    let s = &o.stats;
    let mut items = Vec::new();
    if ran_out > 0 {
        items.push(html!(
            "<li><strong>{} processing</strong> with a lease that ran out: the worker holding it \
             stopped; a running dispatcher claims it again</li>",
            ran_out
        ));
    }
    for t in s.by_type.iter().filter(|t| t.failed > 0) {
        let retry = if ui.read_only {
            Html::default()
        } else {
            html!(
                " <a class=\"button small\" href=\"/confirm?action=retry-type&amp;type={}\">Retry all {}</a>",
                enc(&t.event_type),
                t.failed
            )
        };
        items.push(html!(
            "<li><strong>{n} failed</strong> of type <a href=\"/events?status=failed&amp;type={ty}\">{name}</a>{retry}</li>",
            n = t.failed,
            ty = enc(&t.event_type),
            name = t.event_type,
            retry = retry,
        ));
    }
    items.extend(failure_reasons(ui, o));
    items.extend(stalled_keys(ui, o));
    if let Some(wait) = s.oldest_due_age.filter(|w| *w >= Duration::from_secs(60)) {
        let working = u64::try_from(ran_out).map_or(0, |r| s.processing.saturating_sub(r));
        // A dispatcher shows itself by leases it holds or by destinations
        // it wrote down in the last ten minutes.
        let recently = o.at - chrono::Duration::minutes(10);
        let live = working > 0 || s.destinations.iter().any(|d| d.updated_at >= recently);
        let hint = if s.due > 0 && s.due == s.behind_key {
            ", every one behind the head of its ordering key"
        } else if !live {
            " and nothing is being handled: is a dispatcher running on this outbox?"
        } else {
            ""
        };
        items.push(html!(
            "<li><strong>{} due</strong>; the oldest has waited {}{}</li>",
            s.due,
            age(wait),
            hint
        ));
    }
    for l in s.limits.iter().filter(|l| l.limited_since.is_some()) {
        let since = l
            .limited_since
            .map(|t| time_from(t, o.at))
            .unwrap_or_default();
        let cause = match l.kind {
            sqlite_outbox::LimitKind::Concurrency(_) => "a free slot",
            sqlite_outbox::LimitKind::Rate { .. } => "the rate limit",
        };
        items.push(html!(
            "<li>Events of {} <strong>{}</strong> wait for {} since {} ({})</li>",
            l.scope.as_str(),
            l.name,
            cause,
            since,
            l.describe()
        ));
    }
    for d in &s.destinations {
        let error = d
            .last_error
            .as_deref()
            .map(|e| html!(": <q>{}</q>", excerpt(e, 120)))
            .unwrap_or_default();
        items.push(html!(
            "<li>Destination <strong>{}</strong> is {} since {}{}</li>",
            d.name,
            d.hold.as_str(),
            time_from(d.since, o.at),
            error
        ));
    }
    b.push(Html::lit(
        "<section class=\"attention\"><h2>Needs attention</h2>",
    ));
    if items.is_empty() {
        b.push(Html::lit("<p class=\"ok\">Nothing is stuck.</p>"));
    } else {
        b.push(html!("<ul>{}</ul>", Html::join(items, "")));
    }
    b.push(Html::lit("</section>"));
}

/// The most frequent last errors of each type with failed events (from
/// the latest 200 failures of the type), with their counts.
fn failure_reasons(ui: &Ui, o: &Overview) -> Vec<Html> {
    let mut items = Vec::new();
    for t in o.stats.by_type.iter().filter(|t| t.failed > 0).take(10) {
        let Ok(failed) = ui.store.list(&ListFilter {
            status: Some(Status::Failed),
            event_type: Some(t.event_type.clone()),
            limit: 200,
            newest_first: true,
            ..ListFilter::default()
        }) else {
            continue;
        };
        let mut counts: Vec<(Html, usize)> = Vec::new();
        for e in &failed {
            let reason = excerpt(e.last_error.as_deref().unwrap_or("no error recorded"), 100);
            match counts.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => counts.push((reason, 1)),
            }
        }
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        let top = counts
            .iter()
            .take(3)
            .map(|(r, n)| html!("{}× <q>{}</q>", *n, r));
        items.push(html!(
            "<li class=\"reasons\">Why <strong>{}</strong> failed{}: {}</li>",
            t.event_type,
            if t.failed > 200 {
                " (the latest 200)"
            } else {
                ""
            },
            Html::join(top, ", ")
        ));
    }
    items
}

/// Ordering keys whose head holds events back: how many wait behind each
/// and what the head waits for (from the oldest 500 pending events).
fn stalled_keys(ui: &Ui, o: &Overview) -> Vec<Html> {
    if o.stats.behind_key == 0 {
        return Vec::new();
    }
    let Ok(pending) = ui.store.list(&ListFilter {
        status: Some(Status::Pending),
        limit: 500,
        ..ListFilter::default()
    }) else {
        return Vec::new();
    };
    let mut keys: Vec<(String, usize, Why)> = Vec::new();
    for e in pending.iter().filter(|e| e.ordering_key.is_some()) {
        let Ok(why @ Why::BehindKey { .. }) = ui.store.why(e) else {
            continue;
        };
        let Why::BehindKey { key, .. } = &why else {
            continue;
        };
        match keys.iter_mut().find(|(k, _, _)| k == key) {
            Some((_, n, _)) => *n += 1,
            None => keys.push((key.clone(), 1, why.clone())),
        }
    }
    keys.sort_by_key(|k| std::cmp::Reverse(k.1));
    keys.iter()
        .take(5)
        .map(|(key, n, why)| {
            let head = match why {
                Why::BehindKey { head, .. } => head.to_string(),
                _ => String::new(),
            };
            html!(
                "<li class=\"stalled\"><strong>{} events</strong> wait behind ordering key \
                 <a href=\"/events?status=pending&amp;key={}\">{}</a>: {} \
                 <a href=\"/events/{}\">Open the head</a></li>",
                *n,
                enc(key),
                key,
                why.head_summary().unwrap_or_default(),
                head
            )
        })
        .collect()
}

fn by_type(o: &Overview, b: &mut Html) {
    b.push(Html::lit("<section><h2>By event type</h2>"));
    if o.stats.by_type.is_empty() {
        b.push(Html::lit(
            "<p class=\"muted\">The outbox is empty.</p></section>",
        ));
        return;
    }
    b.push(Html::lit("<table><thead><tr><th>Type</th><th class=\"num\">Pending</th><th class=\"num\">Due</th><th class=\"num\">Processing</th><th class=\"num\">Done</th><th class=\"num\">Failed</th></tr></thead><tbody>"));
    for t in &o.stats.by_type {
        let ty = enc(&t.event_type);
        let cell = |status: &str, n: u64| {
            if n == 0 {
                Html::lit("<td class=\"num muted\">0</td>")
            } else {
                html!(
                    "<td class=\"num\"><a href=\"/events?status={}&amp;type={}\">{}</a></td>",
                    status,
                    ty,
                    n
                )
            }
        };
        b.push(html!(
            "<tr><td><a href=\"/events?type={}\">{}</a></td>{}<td class=\"num\">{}</td>{}{}{}</tr>",
            ty,
            t.event_type,
            cell("pending", t.pending),
            t.due,
            cell("processing", t.processing),
            cell("done", t.done),
            cell("failed", t.failed),
        ));
    }
    b.push(Html::lit("</tbody></table></section>"));
}

/// The limits dispatchers keep, with what is in flight against each
/// concurrency limit and since when events wait.
fn limits(o: &Overview, b: &mut Html) {
    if o.stats.limits.is_empty() {
        return;
    }
    b.push(Html::lit(
        "<section id=\"limits\"><h2>Limits</h2><table><thead><tr><th>Of</th><th>Name</th>\
         <th>Allows</th><th class=\"num\">In flight</th><th>Kept by</th><th>Events</th></tr>\
         </thead><tbody>",
    ));
    for l in &o.stats.limits {
        let allows = match l.kind {
            sqlite_outbox::LimitKind::Concurrency(max) => html!("{} at once", max),
            sqlite_outbox::LimitKind::Rate { max, per } => html!("{} per {}", max, age(per)),
        };
        let waiting = match l.limited_since {
            Some(t) => html!("<strong>waiting</strong> since {}", time_from(t, o.at)),
            None => Html::lit("flowing"),
        };
        b.push(html!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            l.scope.as_str(),
            l.name,
            allows,
            l.in_flight.map(|n| n.to_string()).unwrap_or_else(|| "—".into()),
            if l.shared { "every dispatcher" } else { "each dispatcher" },
            waiting
        ));
    }
    b.push(Html::lit("</tbody></table></section>"));
}

/// Stacked bars of done and failed events per span, as SVG drawn here:
/// no script, no style attribute (the policy allows neither inline).
fn chart(
    title: &str,
    data: impl IntoIterator<Item = (DateTime<Utc>, u64, u64)>,
    now: DateTime<Utc>,
    spans: i64,
    span: Duration,
) -> Html {
    let span_ms = i64::try_from(span.as_millis()).unwrap_or(i64::MAX).max(1);
    let last = now.timestamp_millis() / span_ms * span_ms;
    let first = last - (spans - 1) * span_ms;
    let mut bars = vec![(0u64, 0u64); usize::try_from(spans).unwrap_or(0)];
    for (start, done, failed) in data {
        let i = (start.timestamp_millis() - first) / span_ms;
        if let Some(bar) = usize::try_from(i).ok().and_then(|i| bars.get_mut(i)) {
            *bar = (done, failed);
        }
    }
    let (done, failed): (u64, u64) = bars.iter().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let top = bars.iter().map(|(d, f)| d + f).max().unwrap_or(0).max(1);
    let (w, h) = (600.0, 120.0);
    let step = w / bars.len().max(1) as f64;
    let mut svg = html!(
        "<svg viewBox=\"0 0 {} {}\" class=\"chart\" role=\"img\" aria-label=\"{}: {} done, {} failed\">",
        w,
        h,
        title,
        done,
        failed
    );
    for (i, (d, f)) in bars.iter().enumerate() {
        let x = i as f64 * step;
        let start = chrono::DateTime::<Utc>::from_timestamp_millis(first + i as i64 * span_ms)
            .unwrap_or(now);
        let hd = *d as f64 / top as f64 * (h - 4.0);
        let hf = *f as f64 / top as f64 * (h - 4.0);
        svg.push(html!(
            "<g><title>{when}: {d} done, {f} failed</title>\
             <rect class=\"slot\" x=\"{x:.1}\" y=\"0\" width=\"{bw:.1}\" height=\"{h}\"/>\
             <rect class=\"done\" x=\"{x:.1}\" y=\"{yd:.1}\" width=\"{bw:.1}\" height=\"{hd:.1}\"/>\
             <rect class=\"failed\" x=\"{x:.1}\" y=\"{yf:.1}\" width=\"{bw:.1}\" height=\"{hf:.1}\"/></g>",
            when = start.format("%H:%M UTC").to_string(),
            d = *d,
            f = *f,
            x = x,
            bw = (step - 1.0).max(1.0),
            h = h,
            yd = h - hd,
            hd = hd,
            yf = h - hd - hf,
            hf = hf,
        ));
    }
    svg.push(Html::lit("</svg>"));
    html!(
        "<figure><figcaption>{}: <span class=\"legend done\">{} done</span> \
         <span class=\"legend failed\">{} failed</span> (up to {} per span)</figcaption>{}</figure>",
        title,
        done,
        failed,
        top,
        svg
    )
}

// ---- events -----------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_places_each_span_and_scales_to_the_busiest() {
        let now = DateTime::<Utc>::from_timestamp(1_800_000_030, 0).unwrap_or_default();
        let minute = |m: i64| {
            DateTime::<Utc>::from_timestamp((1_800_000_000 / 60 - m) * 60, 0).unwrap_or_default()
        };
        // Now, 59 minutes ago, and one span too old to be shown.
        let data = [(minute(0), 10, 2), (minute(59), 4, 0), (minute(60), 99, 99)];
        let svg = chart("t", data, now, 60, Duration::from_secs(60)).into_string();
        assert!(svg.contains("14 done"), "{svg}");
        assert!(svg.contains("2 failed"), "{svg}");
        assert!(svg.contains("up to 12 per span"), "{svg}");
        assert_eq!(svg.matches("class=\"slot\"").count(), 60);
    }
}
