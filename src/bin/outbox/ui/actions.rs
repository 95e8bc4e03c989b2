//! The dashboard's actions: a confirmation page, then the change, through
//! the same operator calls as the command-line tool.

use chrono::Utc;
use sqlite_outbox::text::parse_duration;
use sqlite_outbox::{EventId, Requeue};

use super::html::{html, page, Frame, Html};
use super::pages::{csrf_field, error_page, find};
use super::{Reply, Req, Ui};
use crate::describe;

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
                fields: Html,
                question: Html,
                button: &str,
                class: &str,
                back: &str| {
        html!(
            "<h1>Are you sure?</h1><p>{question}</p><form method=\"post\" action=\"/actions/{action}\" class=\"stack\">{csrf}{fields}\
             <p><button type=\"submit\" class=\"{class}\" id=\"confirm\">{button}</button> <a href=\"{back}\">cancel</a></p></form>",
            question = question,
            action = action,
            csrf = csrf_field(req),
            fields = fields,
            class = class,
            button = button,
            back = back,
        )
    };
    let body = match req.q("action") {
        Some(action @ ("retry" | "fail")) => {
            let e = match find(ui, req.q("id").unwrap_or_default()) {
                Ok(e) => e,
                Err(reply) => return reply,
            };
            let id_field = html!("<input type=\"hidden\" name=\"id\" value=\"{}\">", e.id);
            let back = format!("/events/{}", e.id);
            if action == "retry" {
                form(
                    "retry",
                    id_field,
                    html!(
                        "Retry event <span class=\"mono\">{}</span> ({}): it becomes pending and due now, with its attempts reset.",
                        e.id,
                        e.event_type
                    ),
                    "Retry event",
                    "",
                    &back,
                )
            } else {
                form(
                    "fail",
                    html!("{}<label>Reason (kept as its last error) <textarea name=\"reason\" required rows=\"3\"></textarea></label>", id_field),
                    html!(
                        "Fail event <span class=\"mono\">{}</span> ({}): it will not be delivered unless retried.",
                        e.id,
                        e.event_type
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
                html!("<input type=\"hidden\" name=\"type\" value=\"{}\">", ty),
                html!(
                    "Retry every failed event of type <strong>{}</strong>{}: they become pending and due now, with their attempts reset.",
                    ty,
                    n
                ),
                "Retry all",
                "",
                "/",
            )
        }
        Some("purge") => form(
            "purge",
            Html::lit("<label>Older than <input name=\"older_than\" value=\"30d\" required> (e.g. 7d, 12h)</label>"),
            Html::lit("Delete done and failed events created before the given age. Pending and processing events are never purged."),
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
            &Html::default(),
            &body,
        )
        .into_string(),
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
