//! The dashboard's pages and actions.

use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlite_outbox::admin::parse_duration;
use sqlite_outbox::{Event, EventId, ListFilter, Requeue, Status, Why};
use uuid::Uuid;

use super::html::{age, badge, enc, esc, excerpt, page, time_from, Frame};
use super::{Overview, Reply, Req, Ui};
use crate::describe;

/// How many events a page of the list shows.
const PAGE: usize = 50;
/// How many sequence numbers a page of the list looks at, at most: a
/// filter that matches few events on a large outbox still answers fast,
/// with a link to search on.
const SCAN: u64 = 200_000;

impl Ui {
    fn frame<'a>(&'a self, title: &'a str, tab: &'a str) -> Frame<'a> {
        Frame {
            title,
            tab,
            db: &self.db,
            read_only: self.read_only,
            refresh: self.refresh,
        }
    }
}

/// The message a finished action left, from the fixed set (nothing from
/// the URL is shown but a number).
fn notice(req: &Req) -> String {
    let n = req.q("n").and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    let text = match req.q("done") {
        Some("retried") => "Retried: the event is pending and due now.".to_owned(),
        Some("failed") => {
            "The event is failed; it will not be delivered unless retried.".to_owned()
        }
        Some("requeued") => format!("Retried {n} failed event(s): pending and due now."),
        Some("purged") => format!("Purged {n} finished event(s)."),
        _ => return String::new(),
    };
    format!("<p class=\"notice\" role=\"status\">{}</p>", esc(&text))
}

fn error_page(ui: &Ui, status: u16, title: &str, message: &str) -> Reply {
    let body = format!(
        "<h1>{}</h1><p class=\"error\">{}</p><p><a href=\"/\">Back to the overview</a></p>",
        esc(title),
        esc(message)
    );
    Reply::html(status, page(&ui.frame(title, ""), "", &body))
}

pub(super) fn not_found(ui: &Ui) -> String {
    page(
        &ui.frame("Not found", ""),
        "",
        "<h1>Not found</h1><p><a href=\"/\">Back to the overview</a></p>",
    )
}

/// A hidden field with the form token of the request's session.
fn csrf_field(req: &Req) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(&req.csrf)
    )
}

/// The sign-in page: nothing about the outbox (not even which one) before
/// sign-in, and no form token (signing in needs the access token itself).
pub(super) fn login_page(ui: &Ui, wrong: bool) -> String {
    let frame = Frame {
        refresh: 0,
        db: "",
        ..ui.frame("Sign in", "")
    };
    let wrong = if wrong {
        "<p class=\"error\">That is not the access token.</p>"
    } else {
        ""
    };
    page(
        &frame,
        "",
        &format!(
            "<h1>Sign in</h1>{wrong}<form method=\"post\" action=\"/login\" class=\"stack\">\
             <label>Access token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" required></label>\
             <button type=\"submit\">Sign in</button></form>"
        ),
    )
}

// ---- overview ---------------------------------------------------------------

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
    let mut b = String::new();
    let s = &o.stats;
    let _ = write!(
        b,
        "<div data-live><section class=\"cards\">{}{}{}{}{}</section>",
        card(
            "pending",
            s.pending,
            &format!("{} due now", s.due),
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
    b.push_str("<section><h2>Finished events</h2><div class=\"charts\">");
    b.push_str(&chart(
        "Last hour, per minute",
        o.hour.iter().copied(),
        o.at,
        60,
        Duration::from_secs(60),
    ));
    b.push_str(&chart(
        "Last day, per hour",
        o.day.iter().copied(),
        o.at,
        24,
        Duration::from_secs(3600),
    ));
    b.push_str("</div></section>");
    b.push_str("<section><h2>Processing now</h2>");
    match processing {
        Ok(events) if events.is_empty() => {
            b.push_str("<p class=\"muted\">Nothing is being handled.</p>")
        }
        Ok(events) => {
            b.push_str("<table><thead><tr><th>Event</th><th>Type</th><th>Attempt</th><th>Lease taken</th><th>Lease ends</th></tr></thead><tbody>");
            for e in &events {
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td>{}</td><td>{}/{}</td><td>{}</td><td>{}</td></tr>",
                    event_link(e),
                    esc(&e.event_type),
                    e.attempts,
                    e.max_attempts,
                    e.locked_at.map(|t| time_from(t, o.at)).unwrap_or_default(),
                    e.locked_until
                        .map(|t| time_from(t, o.at))
                        .unwrap_or_default(),
                );
            }
            b.push_str("</tbody></table>");
        }
        Err(e) => {
            let _ = write!(b, "<p class=\"error\">{}</p>", esc(&describe(&e)));
        }
    }
    b.push_str("</section>");
    by_type(ui, &o, &mut b);
    let _ = write!(
        b,
        "<p class=\"muted small\">Counted {}.</p></div>",
        time_from(o.at, Utc::now())
    );
    if !ui.read_only {
        b.push_str(
            "<section><h2>Maintenance</h2><p><a class=\"button secondary\" href=\"/confirm?action=purge\">Purge finished events…</a></p></section>",
        );
    }
    Reply::html(
        200,
        page(&ui.frame("Overview", "overview"), &notice(req), &b),
    )
}

fn card(label: &str, n: u64, sub: &str, href: &str) -> String {
    format!(
        "<a class=\"card {cls}\" href=\"{href}\"><span class=\"label\">{label}</span>\
         <span class=\"value\" data-count=\"{cls}\">{n}</span><span class=\"sub\">{sub}</span></a>",
        cls = label,
        sub = esc(sub)
    )
}

fn card_text(label: &str, value: &str, sub: &str) -> String {
    format!(
        "<div class=\"card\"><span class=\"label\">{label}</span><span class=\"value\">{value}</span>\
         <span class=\"sub\">{sub}</span></div>"
    )
}

/// What is stuck, first: failed events per type, a backlog nothing is
/// working on, destinations held back.
fn attention(ui: &Ui, o: &Overview, ran_out: usize, b: &mut String) {
    let s = &o.stats;
    let mut items = Vec::new();
    if ran_out > 0 {
        items.push(format!(
            "<li><strong>{ran_out} processing</strong> with a lease that ran out: the worker holding it \
             stopped; a running dispatcher claims it again</li>"
        ));
    }
    for t in s.by_type.iter().filter(|t| t.failed > 0) {
        let retry = if ui.read_only {
            String::new()
        } else {
            format!(
                " <a class=\"button small\" href=\"/confirm?action=retry-type&amp;type={}\">Retry all {}</a>",
                enc(&t.event_type),
                t.failed
            )
        };
        items.push(format!(
            "<li><strong>{n} failed</strong> of type <a href=\"/events?status=failed&amp;type={ty}\">{name}</a>{retry}</li>",
            n = t.failed,
            ty = enc(&t.event_type),
            name = esc(&t.event_type),
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
        items.push(format!(
            "<li><strong>{} due</strong>; the oldest has waited {}{hint}</li>",
            s.due,
            age(wait)
        ));
    }
    for d in &s.destinations {
        let error = d
            .last_error
            .as_deref()
            .map(|e| format!(": <q>{}</q>", excerpt(e, 120)))
            .unwrap_or_default();
        items.push(format!(
            "<li>Destination <strong>{}</strong> is {} since {}{error}</li>",
            esc(&d.name),
            d.hold.as_str(),
            time_from(d.since, o.at)
        ));
    }
    b.push_str("<section class=\"attention\"><h2>Needs attention</h2>");
    if items.is_empty() {
        b.push_str("<p class=\"ok\">Nothing is stuck.</p>");
    } else {
        let _ = write!(b, "<ul>{}</ul>", items.join(""));
    }
    b.push_str("</section>");
}

/// The most frequent last errors of each type with failed events (from
/// the latest 200 failures of the type), with their counts.
fn failure_reasons(ui: &Ui, o: &Overview) -> Vec<String> {
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
        let mut counts: Vec<(String, usize)> = Vec::new();
        for e in &failed {
            let reason = excerpt(e.last_error.as_deref().unwrap_or("no error recorded"), 100);
            match counts.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => counts.push((reason, 1)),
            }
        }
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        let top: Vec<String> = counts
            .iter()
            .take(3)
            .map(|(r, n)| format!("{n}× <q>{r}</q>"))
            .collect();
        items.push(format!(
            "<li class=\"reasons\">Why <strong>{}</strong> failed{}: {}</li>",
            esc(&t.event_type),
            if t.failed > 200 {
                " (the latest 200)"
            } else {
                ""
            },
            top.join(", ")
        ));
    }
    items
}

/// Ordering keys whose head holds events back: how many wait behind each
/// and what the head waits for (from the oldest 500 pending events).
fn stalled_keys(ui: &Ui, o: &Overview) -> Vec<String> {
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
            format!(
                "<li class=\"stalled\"><strong>{n} events</strong> wait behind ordering key \
                 <a href=\"/events?status=pending&amp;key={}\">{}</a>: {} \
                 <a href=\"/events/{head}\">Open the head</a></li>",
                enc(key),
                esc(key),
                esc(&why.head_summary().unwrap_or_default())
            )
        })
        .collect()
}

fn by_type(ui: &Ui, o: &Overview, b: &mut String) {
    let _ = ui;
    b.push_str("<section><h2>By event type</h2>");
    if o.stats.by_type.is_empty() {
        b.push_str("<p class=\"muted\">The outbox is empty.</p></section>");
        return;
    }
    b.push_str("<table><thead><tr><th>Type</th><th class=\"num\">Pending</th><th class=\"num\">Due</th><th class=\"num\">Processing</th><th class=\"num\">Done</th><th class=\"num\">Failed</th></tr></thead><tbody>");
    for t in &o.stats.by_type {
        let ty = enc(&t.event_type);
        let cell = |status: &str, n: u64| {
            if n == 0 {
                "<td class=\"num muted\">0</td>".to_owned()
            } else {
                format!("<td class=\"num\"><a href=\"/events?status={status}&amp;type={ty}\">{n}</a></td>")
            }
        };
        let _ = write!(
            b,
            "<tr><td><a href=\"/events?type={ty}\">{}</a></td>{}<td class=\"num\">{}</td>{}{}{}</tr>",
            esc(&t.event_type),
            cell("pending", t.pending),
            t.due,
            cell("processing", t.processing),
            cell("done", t.done),
            cell("failed", t.failed),
        );
    }
    b.push_str("</tbody></table></section>");
}

/// Stacked bars of done and failed events per span, as SVG drawn here:
/// no script, no style attribute (the policy allows neither inline).
fn chart(
    title: &str,
    data: impl IntoIterator<Item = (DateTime<Utc>, u64, u64)>,
    now: DateTime<Utc>,
    spans: i64,
    span: Duration,
) -> String {
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
    let mut svg = format!(
        "<svg viewBox=\"0 0 {w} {h}\" class=\"chart\" role=\"img\" aria-label=\"{title}: {done} done, {failed} failed\">"
    );
    for (i, (d, f)) in bars.iter().enumerate() {
        let x = i as f64 * step;
        let start = chrono::DateTime::<Utc>::from_timestamp_millis(first + i as i64 * span_ms)
            .unwrap_or(now);
        let hd = *d as f64 / top as f64 * (h - 4.0);
        let hf = *f as f64 / top as f64 * (h - 4.0);
        let _ = write!(
            svg,
            "<g><title>{}: {d} done, {f} failed</title>\
             <rect class=\"slot\" x=\"{x:.1}\" y=\"0\" width=\"{bw:.1}\" height=\"{h}\"/>\
             <rect class=\"done\" x=\"{x:.1}\" y=\"{yd:.1}\" width=\"{bw:.1}\" height=\"{hd:.1}\"/>\
             <rect class=\"failed\" x=\"{x:.1}\" y=\"{yf:.1}\" width=\"{bw:.1}\" height=\"{hf:.1}\"/></g>",
            start.format("%H:%M UTC"),
            bw = (step - 1.0).max(1.0),
            yd = h - hd,
            yf = h - hd - hf,
        );
    }
    svg.push_str("</svg>");
    format!(
        "<figure><figcaption>{title}: <span class=\"legend done\">{done} done</span> \
         <span class=\"legend failed\">{failed} failed</span> (up to {top} per span)</figcaption>{svg}</figure>"
    )
}

// ---- events -----------------------------------------------------------------

/// The list's filter from the query, or what is wrong with it.
fn filter_from(req: &Req) -> Result<ListFilter, String> {
    let uuid = |key: &str| -> Result<Option<Uuid>, String> {
        req.q(key)
            .map(|v| {
                Uuid::parse_str(v.trim()).map_err(|_| format!("{key}: {} is not a UUID", v.trim()))
            })
            .transpose()
    };
    let status = req
        .q("status")
        .map(|s| s.parse::<Status>().map_err(|e| e.to_string()))
        .transpose()?;
    let after_seq = req
        .q("after")
        .map(|a| {
            a.parse::<i64>()
                .map_err(|_| format!("after: {a} is not a number"))
        })
        .transpose()?;
    Ok(ListFilter {
        status,
        event_type: req.q("type").map(str::to_owned),
        org_id: uuid("org")?,
        user_id: uuid("user")?,
        correlation_id: req.q("correlation").map(str::to_owned),
        ordering_key: req.q("key").map(str::to_owned),
        error_contains: req.q("error").map(str::to_owned),
        limit: PAGE,
        newest_first: req.q("order") != Some("oldest"),
        after_seq,
        scan_limit: Some(SCAN),
    })
}

/// The query string of `filter`'s fields (not its cursor).
fn query_of(req: &Req) -> String {
    [
        "status",
        "type",
        "org",
        "user",
        "correlation",
        "key",
        "error",
        "order",
    ]
    .iter()
    .filter_map(|k| req.q(k).map(|v| format!("{k}={}", enc(v))))
    .collect::<Vec<_>>()
    .join("&amp;")
}

pub(super) fn events(ui: &Ui, req: &Req) -> Reply {
    let mut b = String::from("<h1>Events</h1>");
    filter_form(ui, req, &mut b);
    b.push_str("<div data-live>");
    match filter_from(req) {
        Err(e) => {
            let _ = write!(b, "<p class=\"error\">{}</p>", esc(&e));
        }
        Ok(filter) => match ui.store.list_page(&filter) {
            Err(e) => {
                let _ = write!(b, "<p class=\"error\">{}</p>", esc(&describe(&e)));
            }
            Ok(page_of) => {
                event_table(&page_of.events, &mut b);
                let q = query_of(req);
                let mut nav = Vec::new();
                if filter.after_seq.is_some() {
                    nav.push(format!("<a href=\"/events?{q}\">« first page</a>"));
                }
                if let Some(next) = page_of.next {
                    let label = if page_of.events.len() < PAGE {
                        "search further »"
                    } else {
                        "next page »"
                    };
                    nav.push(format!(
                        "<a rel=\"next\" href=\"/events?{q}{}after={next}\">{label}</a>",
                        if q.is_empty() { "" } else { "&amp;" }
                    ));
                }
                if page_of.events.len() < PAGE && page_of.next.is_some() {
                    let _ = write!(
                        b,
                        "<p class=\"muted\">Each page looks at {SCAN} events at most; more may match further on.</p>"
                    );
                }
                let _ = write!(b, "<nav class=\"pages\">{}</nav>", nav.join(" "));
            }
        },
    }
    b.push_str("</div>");
    Reply::html(200, page(&ui.frame("Events", "events"), &notice(req), &b))
}

fn filter_form(ui: &Ui, req: &Req, b: &mut String) {
    let v = |k: &str| esc(req.q(k).unwrap_or_default());
    let status = req.q("status").unwrap_or_default();
    let mut options = String::from("<option value=\"\">any</option>");
    for s in Status::ALL {
        let sel = if s.as_str() == status {
            " selected"
        } else {
            ""
        };
        let _ = write!(options, "<option{sel}>{}</option>", s.as_str());
    }
    // The types last counted: a page of the list never waits for a count
    // of the whole outbox.
    let types = ui
        .last_overview()
        .map(|o| {
            o.stats
                .by_type
                .iter()
                .map(|t| format!("<option value=\"{}\">", esc(&t.event_type)))
                .collect::<String>()
        })
        .unwrap_or_default();
    let oldest = req.q("order") == Some("oldest");
    let _ = write!(
        b,
        "<form method=\"get\" action=\"/events\" class=\"filters\" id=\"filters\">\
         <label>Status <select name=\"status\">{options}</select></label>\
         <label>Type <input name=\"type\" list=\"types\" value=\"{}\"></label><datalist id=\"types\">{types}</datalist>\
         <label>Org <input name=\"org\" value=\"{}\" placeholder=\"UUID\"></label>\
         <label>User <input name=\"user\" value=\"{}\" placeholder=\"UUID\"></label>\
         <label>Correlation id <input name=\"correlation\" value=\"{}\"></label>\
         <label>Ordering key <input name=\"key\" value=\"{}\"></label>\
         <label>Error contains <input name=\"error\" value=\"{}\"></label>\
         <label>Order <select name=\"order\"><option value=\"newest\">newest first</option>\
         <option value=\"oldest\"{}>oldest first</option></select></label>\
         <button type=\"submit\">Filter</button> <a href=\"/events\">clear</a></form>",
        v("type"),
        v("org"),
        v("user"),
        v("correlation"),
        v("key"),
        v("error"),
        if oldest { " selected" } else { "" },
    );
}

fn event_link(e: &Event) -> String {
    format!(
        "<a href=\"/events/{id}\" class=\"mono\">{id}</a>",
        id = e.id
    )
}

fn event_table(events: &[Event], b: &mut String) {
    if events.is_empty() {
        b.push_str("<p class=\"muted\" id=\"no-events\">No events match.</p>");
        return;
    }
    let now = Utc::now();
    b.push_str(
        "<table class=\"events\"><thead><tr><th class=\"num\">Seq</th><th>Event</th><th>Type</th><th>Status</th>\
         <th class=\"num\">Attempts</th><th>Created</th><th>Next attempt / finished</th><th>Last error</th></tr></thead><tbody>",
    );
    for e in events {
        let when = match e.status {
            Status::Pending => time_from(e.next_attempt_at, now),
            Status::Processing => e
                .locked_until
                .map(|t| format!("lease ends {}", time_from(t, now)))
                .unwrap_or_default(),
            Status::Done | Status::Failed => e
                .completed_at
                .map(|t| time_from(t, now))
                .unwrap_or_default(),
        };
        let _ = write!(
            b,
            "<tr data-seq=\"{seq}\"><td class=\"num\">{seq}</td><td>{link}</td><td>{ty}</td><td>{badge}</td>\
             <td class=\"num\">{a}/{m}</td><td>{created}</td><td>{when}</td><td class=\"error-text\">{err}</td></tr>",
            seq = e.seq,
            link = event_link(e),
            ty = esc(&e.event_type),
            badge = badge(e.status),
            a = e.attempts,
            m = e.max_attempts,
            created = time_from(e.created_at, now),
            err = excerpt(e.last_error.as_deref().unwrap_or_default(), 80),
        );
    }
    b.push_str("</tbody></table>");
}

// ---- one event ----------------------------------------------------------------

fn find(ui: &Ui, id: &str) -> Result<Event, Reply> {
    let id: EventId = id
        .parse()
        .map_err(|_| error_page(ui, 404, "No such event", "That is not an event id."))?;
    match ui.store.find(id) {
        Ok(Some(e)) => Ok(e),
        Ok(None) => Err(error_page(
            ui,
            404,
            "No such event",
            &format!("No event has the id {id}."),
        )),
        Err(e) => Err(error_page(
            ui,
            503,
            "The outbox cannot be read",
            &describe(&e),
        )),
    }
}

pub(super) fn event(ui: &Ui, req: &Req, id: &str) -> Reply {
    let e = match find(ui, id) {
        Ok(e) => e,
        Err(reply) => return reply,
    };
    let now = Utc::now();
    let opt_time =
        |t: Option<DateTime<Utc>>| t.map(|t| time_from(t, now)).unwrap_or_else(|| "—".into());
    let opt = |v: Option<String>| v.map(|v| esc(&v)).unwrap_or_else(|| "—".into());
    let mut b = format!(
        "<div data-live><h1><span class=\"mono\">{id}</span> {badge}</h1><p class=\"lead\">{ty}</p>",
        id = e.id,
        badge = badge(e.status),
        ty = esc(&e.event_type)
    );
    match ui.store.why(&e) {
        Ok(why) => {
            let head = match &why {
                Why::BehindKey { head, .. } => {
                    format!(" <a href=\"/events/{head}\" id=\"head\">Open the head</a>")
                }
                _ => String::new(),
            };
            let _ = write!(
                b,
                "<p class=\"why\" id=\"why\"><strong>Why:</strong> {}{head}</p>",
                esc(&why.to_string())
            );
        }
        Err(err) => {
            let _ = write!(b, "<p class=\"error\">{}</p>", esc(&describe(&err)));
        }
    }
    if !ui.read_only {
        let mut actions = Vec::new();
        if e.status == Status::Failed {
            actions.push(format!(
                "<a class=\"button\" id=\"retry\" href=\"/confirm?action=retry&amp;id={}\">Retry…</a>",
                e.id
            ));
        }
        if matches!(e.status, Status::Pending | Status::Processing) {
            actions.push(format!(
                "<a class=\"button danger\" id=\"fail\" href=\"/confirm?action=fail&amp;id={}\">Fail…</a>",
                e.id
            ));
        }
        if !actions.is_empty() {
            let _ = write!(b, "<p class=\"actions\">{}</p>", actions.join(" "));
        }
    }
    let lease = match (e.locked_at, e.locked_until) {
        (Some(at), Some(until)) if e.status == Status::Processing => {
            format!(
                "taken {}, ends {}",
                time_from(at, now),
                time_from(until, now)
            )
        }
        _ => "—".into(),
    };
    let rows = [
        ("Seq", e.seq.to_string()),
        ("Status", e.status.as_str().to_owned()),
        ("Attempts", format!("{} of {}", e.attempts, e.max_attempts)),
        ("Created", time_from(e.created_at, now)),
        (
            "Next attempt",
            if e.status == Status::Pending {
                time_from(e.next_attempt_at, now)
            } else {
                "—".into()
            },
        ),
        ("Lease", lease),
        ("Delivered", opt_time(e.delivered_at)),
        ("Finished", opt_time(e.completed_at)),
        ("Correlation id", opt(e.correlation_id.clone())),
        ("Ordering key", opt(e.ordering_key.clone())),
        ("Idempotency key", opt(e.idempotency_key.clone())),
        ("Traceparent", opt(e.traceparent.clone())),
        ("Organisation", opt(e.org_id.map(|u| u.to_string()))),
        ("User", opt(e.user_id.map(|u| u.to_string()))),
    ];
    b.push_str("<dl class=\"fields\">");
    for (k, v) in rows {
        let _ = write!(b, "<dt>{k}</dt><dd>{v}</dd>");
    }
    b.push_str("</dl><h2>Last error</h2>");
    match &e.last_error {
        Some(err) => {
            let _ = write!(
                b,
                "<pre class=\"error-text\" id=\"last-error\">{}</pre>",
                esc(err)
            );
        }
        None => b.push_str("<p class=\"muted\">None.</p>"),
    }
    let payload = serde_json::to_string_pretty(e.payload.value())
        .unwrap_or_else(|_| e.payload.get().to_owned());
    let _ = write!(
        b,
        "<h2>Payload</h2><pre id=\"payload\">{}</pre></div>",
        esc(&payload)
    );
    Reply::html(
        200,
        page(&ui.frame(&e.event_type, "events"), &notice(req), &b),
    )
}

// ---- actions ----------------------------------------------------------------

pub(super) fn confirm(ui: &Ui, req: &Req) -> Reply {
    if ui.read_only {
        return error_page(
            ui,
            403,
            "Read-only",
            "The dashboard is read-only: it changes nothing.",
        );
    }
    let form = |action: &str,
                fields: &str,
                question: &str,
                button: &str,
                class: &str,
                back: &str| {
        format!(
            "<h1>Are you sure?</h1><p>{question}</p><form method=\"post\" action=\"/actions/{action}\" class=\"stack\">{}{fields}\
             <p><button type=\"submit\" class=\"{class}\" id=\"confirm\">{button}</button> <a href=\"{back}\">cancel</a></p></form>",
            csrf_field(req)
        )
    };
    let body = match req.q("action") {
        Some(action @ ("retry" | "fail")) => {
            let e = match find(ui, req.q("id").unwrap_or_default()) {
                Ok(e) => e,
                Err(reply) => return reply,
            };
            let id_field = format!("<input type=\"hidden\" name=\"id\" value=\"{}\">", e.id);
            let back = format!("/events/{}", e.id);
            if action == "retry" {
                form(
                    "retry",
                    &id_field,
                    &format!(
                        "Retry event <span class=\"mono\">{}</span> ({}): it becomes pending and due now, with its attempts reset.",
                        e.id,
                        esc(&e.event_type)
                    ),
                    "Retry event",
                    "",
                    &back,
                )
            } else {
                form(
                    "fail",
                    &format!("{id_field}<label>Reason (kept as its last error) <textarea name=\"reason\" required rows=\"3\"></textarea></label>"),
                    &format!(
                        "Fail event <span class=\"mono\">{}</span> ({}): it will not be delivered unless retried.",
                        e.id,
                        esc(&e.event_type)
                    ),
                    "Fail event",
                    "danger",
                    &back,
                )
            }
        }
        Some("retry-type") => {
            let Some(ty) = req.q("type") else {
                return error_page(ui, 400, "No type", "Say which event type to retry.");
            };
            let n = ui
                .last_overview()
                .and_then(|o| o.stats.by_type.iter().find(|t| t.event_type == ty).map(|t| t.failed))
                .map(|n| format!(" ({n} when last counted)"))
                .unwrap_or_default();
            form(
                "retry-type",
                &format!("<input type=\"hidden\" name=\"type\" value=\"{}\">", esc(ty)),
                &format!(
                    "Retry every failed event of type <strong>{}</strong>{n}: they become pending and due now, with their attempts reset.",
                    esc(ty)
                ),
                "Retry all",
                "",
                "/",
            )
        }
        Some("purge") => form(
            "purge",
            "<label>Older than <input name=\"older_than\" value=\"30d\" required> (e.g. 7d, 12h)</label>",
            "Delete done and failed events created before the given age. Pending and processing events are never purged.",
            "Purge",
            "danger",
            "/",
        ),
        _ => return error_page(ui, 400, "Unknown action", "There is no such action."),
    };
    Reply::html(
        200,
        page(
            &Frame {
                refresh: 0,
                ..ui.frame("Confirm", "")
            },
            "",
            &body,
        ),
    )
}

/// Carries out a confirmed action through the same operator calls as the
/// command-line tool, then sends the browser on to see the result.
pub(super) fn act(ui: &Ui, req: &Req) -> Reply {
    let fail = |e: sqlite_outbox::Error| {
        let status = if e.is_invalid_input() || e.is_not_found() {
            409
        } else {
            503
        };
        error_page(ui, status, "Not done", &describe(&e))
    };
    let id = || -> Result<EventId, Reply> {
        req.f("id")
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| error_page(ui, 400, "Not done", "The form named no event."))
    };
    let reply = match req.path.as_str() {
        "/actions/retry" => id().and_then(|id| {
            ui.store
                .requeue(Requeue::One(id))
                .map(|_| Reply::redirect(format!("/events/{id}?done=retried")))
                .map_err(fail)
        }),
        "/actions/fail" => id().and_then(|id| {
            let Some(reason) = req.f("reason") else {
                return Err(error_page(ui, 400, "Not done", "Give a reason."));
            };
            ui.store
                .cancel(id, reason)
                .map(|()| Reply::redirect(format!("/events/{id}?done=failed")))
                .map_err(fail)
        }),
        "/actions/retry-type" => match req.f("type") {
            None => Err(error_page(
                ui,
                400,
                "Not done",
                "The form named no event type.",
            )),
            Some(ty) => ui
                .store
                .requeue(Requeue::Type(ty.to_owned()))
                .map(|n| Reply::redirect(format!("/?done=requeued&n={n}")))
                .map_err(fail),
        },
        "/actions/purge" => match req.f("older_than").map(parse_duration) {
            Some(Ok(age)) => match chrono::Duration::from_std(age)
                .ok()
                .and_then(|age| Utc::now().checked_sub_signed(age))
            {
                Some(cutoff) => ui
                    .store
                    .purge(cutoff)
                    .map(|n| Reply::redirect(format!("/?done=purged&n={n}")))
                    .map_err(fail),
                None => Err(error_page(
                    ui,
                    400,
                    "Not done",
                    "That age reaches back before any date this outbox can hold.",
                )),
            },
            _ => Err(error_page(
                ui,
                400,
                "Not done",
                "Give an age such as 30d or 12h.",
            )),
        },
        _ => Err(error_page(ui, 404, "Not found", "There is no such action.")),
    };
    ui.changed();
    reply.unwrap_or_else(|r| r)
}

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
        let svg = chart("t", data, now, 60, Duration::from_secs(60));
        assert!(svg.contains("14 done"), "{svg}");
        assert!(svg.contains("2 failed"), "{svg}");
        assert!(svg.contains("up to 12 per span"), "{svg}");
        assert_eq!(svg.matches("class=\"slot\"").count(), 60);
    }
}
