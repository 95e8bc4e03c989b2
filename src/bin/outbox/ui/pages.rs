//! The dashboard's pages: the list, one event, sign-in and errors.

use chrono::{DateTime, Utc};
use sqlite_outbox::{Event, EventId, ListFilter, Status, Why};
use uuid::Uuid;

use super::html::{badge, enc, excerpt, html, page, time_from, Frame, Html};
use super::{Reply, Req, Ui};
use crate::describe;

/// How many events a page of the list shows.
const PAGE: usize = 50;
/// How many sequence numbers a page of the list looks at, at most: a
/// filter that matches few events on a large outbox still answers fast,
/// with a link to search on.
const SCAN: u64 = 200_000;

impl Ui {
    pub(super) fn frame<'a>(&'a self, title: &'a str, tab: &'a str) -> Frame<'a> {
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
pub(super) fn notice(req: &Req) -> Html {
    let n = req.q("n").and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    let text = match req.q("done") {
        Some("retried") => "Retried: the event is pending and due now.".to_owned(),
        Some("failed") => {
            "The event is failed; it will not be delivered unless retried.".to_owned()
        }
        Some("requeued") => format!("Retried {n} failed event(s): pending and due now."),
        Some("purged") => format!("Purged {n} finished event(s)."),
        _ => return Html::default(),
    };
    html!("<p class=\"notice\" role=\"status\">{}</p>", text)
}

pub(super) fn error_page(ui: &Ui, status: u16, title: &str, message: &str) -> Reply {
    let body = html!(
        "<h1>{}</h1><p class=\"error\">{}</p><p><a href=\"/\">Back to the overview</a></p>",
        title,
        message
    );
    Reply::html(
        status,
        page(&ui.frame(title, ""), &Html::default(), &body).into_string(),
    )
}

pub(super) fn not_found(ui: &Ui) -> String {
    page(
        &ui.frame("Not found", ""),
        &Html::default(),
        &Html::lit("<h1>Not found</h1><p><a href=\"/\">Back to the overview</a></p>"),
    )
    .into_string()
}

/// A hidden field with the form token of the request's session.
pub(super) fn csrf_field(req: &Req) -> Html {
    html!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        req.csrf
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
        Html::lit("<p class=\"error\">That is not the access token.</p>")
    } else {
        Html::default()
    };
    page(
        &frame,
        &Html::default(),
        &html!(
            "<h1>Sign in</h1>{}<form method=\"post\" action=\"/login\" class=\"stack\">\
             <label>Access token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" required></label>\
             <button type=\"submit\">Sign in</button></form>",
            wrong
        ),
    )
    .into_string()
}

// ---- overview ---------------------------------------------------------------

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
    .join("&")
}

pub(super) fn events(ui: &Ui, req: &Req) -> Reply {
    let mut b = Html::lit("<h1>Events</h1>");
    filter_form(ui, req, &mut b);
    b.push(Html::lit("<div data-live>"));
    match filter_from(req) {
        Err(e) => b.push(html!("<p class=\"error\">{}</p>", e)),
        Ok(filter) => match ui.store.list_page(&filter) {
            Err(e) => b.push(html!("<p class=\"error\">{}</p>", describe(&e))),
            Ok(page_of) => {
                event_table(ui, &page_of.events, &mut b);
                let q = query_of(req);
                let mut nav = Vec::new();
                if filter.after_seq.is_some() {
                    nav.push(html!("<a href=\"/events?{}\">« first page</a>", q));
                }
                if let Some(next) = page_of.next {
                    let label = if page_of.events.len() < PAGE {
                        "search further »"
                    } else {
                        "next page »"
                    };
                    let sep = if q.is_empty() { "" } else { "&" };
                    nav.push(html!(
                        "<a rel=\"next\" href=\"/events?{}{}after={}\">{}</a>",
                        q,
                        sep,
                        next,
                        label
                    ));
                }
                if page_of.events.len() < PAGE && page_of.next.is_some() {
                    b.push(html!(
                        "<p class=\"muted\">Each page looks at {} events at most; more may match further on.</p>",
                        SCAN
                    ));
                }
                b.push(html!("<nav class=\"pages\">{}</nav>", Html::join(nav, " ")));
            }
        },
    }
    b.push(Html::lit("</div>"));
    Reply::html(
        200,
        page(&ui.frame("Events", "events"), &notice(req), &b).into_string(),
    )
}

fn filter_form(ui: &Ui, req: &Req, b: &mut Html) {
    let v = |k: &str| req.q(k).unwrap_or_default().to_owned();
    let status = req.q("status").unwrap_or_default();
    let mut options = Html::lit("<option value=\"\">any</option>");
    for s in Status::ALL {
        let sel = if s.as_str() == status {
            Html::lit(" selected")
        } else {
            Html::default()
        };
        options.push(html!("<option{}>{}</option>", sel, s.as_str()));
    }
    // The types last counted: a page of the list never waits for a count
    // of the whole outbox.
    let types = ui
        .last_overview()
        .map(|o| {
            o.stats
                .by_type
                .iter()
                .map(|t| html!("<option value=\"{}\">", t.event_type))
                .collect::<Html>()
        })
        .unwrap_or_default();
    let oldest = req.q("order") == Some("oldest");
    b.push(html!(
        "<form method=\"get\" action=\"/events\" class=\"filters\" id=\"filters\">\
         <label>Status <select name=\"status\">{}</select></label>\
         <label>Type <input name=\"type\" list=\"types\" value=\"{}\"></label><datalist id=\"types\">{}</datalist>\
         <label>Org <input name=\"org\" value=\"{}\" placeholder=\"UUID\"></label>\
         <label>User <input name=\"user\" value=\"{}\" placeholder=\"UUID\"></label>\
         <label>Correlation id <input name=\"correlation\" value=\"{}\"></label>\
         <label>Ordering key <input name=\"key\" value=\"{}\"></label>\
         <label>Error contains <input name=\"error\" value=\"{}\"></label>\
         <label>Order <select name=\"order\"><option value=\"newest\">newest first</option>\
         <option value=\"oldest\"{}>oldest first</option></select></label>\
         <button type=\"submit\">Filter</button> <a href=\"/events\">clear</a></form>",
        options,
        v("type"),
        types,
        v("org"),
        v("user"),
        v("correlation"),
        v("key"),
        v("error"),
        if oldest {
            Html::lit(" selected")
        } else {
            Html::default()
        },
    ));
}

pub(super) fn event_link(e: &Event) -> Html {
    html!("<a href=\"/events/{0}\" class=\"mono\">{0}</a>", e.id)
}

fn event_table(ui: &Ui, events: &[Event], b: &mut Html) {
    if events.is_empty() {
        b.push(Html::lit(
            "<p class=\"muted\" id=\"no-events\">No events match.</p>",
        ));
        return;
    }
    let now = Utc::now();
    let held = ui.store.destinations().unwrap_or_default();
    let limited: Vec<_> = ui
        .store
        .limits()
        .unwrap_or_default()
        .into_iter()
        .filter(|l| l.limited_since.is_some())
        .collect();
    // Why a pending event is not moving, in a few words: its destination
    // is held back, it waits for a limit, or it waits behind the head of
    // its key.
    let why = |e: &Event| -> Html {
        if e.status != Status::Pending {
            return Html::default();
        }
        if let Some(d) = held.iter().find(|d| d.name == e.event_type) {
            return html!(
                " <span class=\"why\">held back ({})</span>",
                d.hold.as_str()
            );
        }
        if e.next_attempt_at <= now {
            if let Some(l) = limited.iter().find(|l| l.covers(&e.event_type)) {
                return html!(
                    " <span class=\"why\">waits for a {} limit</span>",
                    l.kind.as_str()
                );
            }
        }
        match e.ordering_key.as_ref().map(|_| ui.store.why(e)) {
            Some(Ok(Why::BehindKey { key, .. })) => {
                html!(" <span class=\"why\">behind key {}</span>", key)
            }
            _ => Html::default(),
        }
    };
    b.push(Html::lit(
        "<table class=\"events\"><thead><tr><th class=\"num\">Seq</th><th>Event</th><th>Type</th><th>Status</th>\
         <th class=\"num\">Attempts</th><th>Created</th><th>Next attempt / finished</th><th>Last error</th></tr></thead><tbody>",
    ));
    for e in events {
        let when = match e.status {
            Status::Pending => time_from(e.next_attempt_at, now),
            Status::Processing => e
                .locked_until
                .map(|t| html!("lease ends {}", time_from(t, now)))
                .unwrap_or_default(),
            Status::Done | Status::Failed => e
                .completed_at
                .map(|t| time_from(t, now))
                .unwrap_or_default(),
        };
        b.push(html!(
            "<tr data-seq=\"{seq}\"><td class=\"num\">{seq}</td><td>{link}</td><td>{ty}</td><td>{badge}</td>\
             <td class=\"num\">{a}/{m}</td><td>{created}</td><td>{when}{why}</td><td class=\"error-text\">{err}</td></tr>",
            seq = e.seq,
            link = event_link(e),
            ty = e.event_type,
            badge = badge(e.status),
            a = e.attempts,
            m = e.max_attempts,
            created = time_from(e.created_at, now),
            err = excerpt(e.last_error.as_deref().unwrap_or_default(), 80),
            when = when,
            why = why(e),
        ));
    }
    b.push(Html::lit("</tbody></table>"));
}

// ---- one event ----------------------------------------------------------------

pub(super) fn find(ui: &Ui, id: &str) -> Result<Event, Reply> {
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
    let dash = || Html::lit("—");
    let opt_time = |t: Option<DateTime<Utc>>| t.map(|t| time_from(t, now)).unwrap_or_else(dash);
    let opt = |v: Option<String>| v.map(|v| Html::text(&v)).unwrap_or_else(dash);
    let mut b = html!(
        "<div data-live><h1><span class=\"mono\">{}</span> {}</h1><p class=\"lead\">{}</p>",
        e.id,
        badge(e.status),
        e.event_type
    );
    match ui.store.why(&e) {
        Ok(why) => {
            let head = match &why {
                Why::BehindKey { head, .. } => {
                    html!(
                        " <a href=\"/events/{}\" id=\"head\">Open the head</a>",
                        *head
                    )
                }
                _ => Html::default(),
            };
            b.push(html!(
                "<p class=\"why\" id=\"why\"><strong>Why:</strong> {}{}</p>",
                why.to_string(),
                head
            ));
        }
        Err(err) => b.push(html!("<p class=\"error\">{}</p>", describe(&err))),
    }
    if !ui.read_only {
        let mut actions = Vec::new();
        if e.status == Status::Failed {
            actions.push(html!(
                "<a class=\"button\" id=\"retry\" href=\"/confirm?action=retry&amp;id={}\">Retry…</a>",
                e.id
            ));
        }
        if matches!(e.status, Status::Pending | Status::Processing) {
            actions.push(html!(
                "<a class=\"button danger\" id=\"fail\" href=\"/confirm?action=fail&amp;id={}\">Fail…</a>",
                e.id
            ));
        }
        if !actions.is_empty() {
            b.push(html!(
                "<p class=\"actions\">{}</p>",
                Html::join(actions, " ")
            ));
        }
    }
    let lease = match (e.locked_at, e.locked_until) {
        (Some(at), Some(until)) if e.status == Status::Processing => html!(
            "taken {}, ends {}",
            time_from(at, now),
            time_from(until, now)
        ),
        _ => dash(),
    };
    let rows = [
        ("Seq", Html::text(&e.seq.to_string())),
        ("Status", Html::text(e.status.as_str())),
        ("Attempts", html!("{} of {}", e.attempts, e.max_attempts)),
        ("Priority", Html::text(&e.priority.to_string())),
        ("Created", time_from(e.created_at, now)),
        (
            "Next attempt",
            if e.status == Status::Pending {
                time_from(e.next_attempt_at, now)
            } else {
                dash()
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
    b.push(Html::lit("<dl class=\"fields\">"));
    for (k, v) in rows {
        b.push(html!("<dt>{}</dt><dd>{}</dd>", k, v));
    }
    b.push(Html::lit("</dl><h2>Last error</h2>"));
    match &e.last_error {
        Some(err) => b.push(html!(
            "<pre class=\"error-text\" id=\"last-error\">{}</pre>",
            err
        )),
        None => b.push(Html::lit("<p class=\"muted\">None.</p>")),
    }
    let payload = serde_json::to_string_pretty(e.payload.value())
        .unwrap_or_else(|_| e.payload.get().to_owned());
    b.push(html!(
        "<h2>Payload</h2><pre id=\"payload\">{}</pre></div>",
        payload
    ));
    Reply::html(
        200,
        page(&ui.frame(&e.event_type, "events"), &notice(req), &b).into_string(),
    )
}
