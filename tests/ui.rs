//! `outbox ui` in a real headless Chromium (WebDriver, ChromeDriver), and
//! its HTTP surface with a plain client: what a user sees and can do, and
//! what a hostile page or payload cannot.
#![cfg(feature = "cli")]

mod common;

use std::path::Path;

use common::browser::{chromium, csrf_of, Browser, Dashboard, Result, Visitor};
use common::cli::outbox;
use serde_json::json;
use sqlite_outbox::legacy::UnfencedStore;
use sqlite_outbox::{EventId, NewEvent, SqliteStore, Status, Store};

/// A payload and an error that would run script if they reached the page
/// as markup.
const HOSTILE_PAYLOAD: &str = "<script>window.__pwned = 1</script>";
const HOSTILE_ERROR: &str = "HTTP 503 <img src=x onerror=\"window.__pwned = 2\">";

struct Known {
    store: SqliteStore,
    hostile: EventId,
    other_failed: EventId,
    pending: EventId,
}

/// An outbox with known events: 3 done, 2 failed (one hostile), 1 pending.
fn known_outbox(path: &Path) -> Result<Known> {
    let store = SqliteStore::open(path)?;
    for i in 0..3 {
        let e = store.enqueue(NewEvent::new("email.send", json!({ "n": i })))?;
        store.mark_done(e.id)?;
    }
    let hostile = store.enqueue(NewEvent::new(
        "webhook.post",
        json!({ "html": HOSTILE_PAYLOAD }),
    ))?;
    store.mark_failed(hostile.id, HOSTILE_ERROR)?;
    let other = store.enqueue(NewEvent::new("webhook.post", json!({ "n": 9 })))?;
    store.mark_failed(other.id, "connection refused")?;
    let pending = store
        .enqueue(NewEvent::new("sync.push", json!({ "doc": 7 })).with_ordering_key("doc-7"))?;
    Ok(Known {
        store,
        hostile: hostile.id,
        other_failed: other.id,
        pending: pending.id,
    })
}

fn status_of(store: &SqliteStore, id: EventId) -> Result<Status> {
    Ok(store.find(id)?.ok_or("event gone")?.status)
}

#[test]
fn a_user_finds_what_is_stuck_and_retries_it_in_a_browser() -> Result<()> {
    let Some((chromium, chromedriver)) = chromium() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("app.db");
    let k = known_outbox(&db)?;
    let ui = Dashboard::start(&db, &["--refresh", "1"])?;
    let b = Browser::start(&chromium, &chromedriver)?;

    // The overview: the counts, and the failed type with its retry.
    b.go(&format!("{}/", ui.url))?;
    assert!(b.title()?.contains("Overview"), "{}", b.title()?);
    assert_eq!(b.text("[data-count=failed]")?, "2");
    assert_eq!(b.text("[data-count=done]")?, "3");
    assert_eq!(b.text("[data-count=pending]")?, "1");
    let attention = b.text(".attention")?;
    assert!(
        attention.contains("2 failed of type webhook.post"),
        "{attention}"
    );

    // Live: a change in the file shows without a reload, filters kept.
    b.go(&format!("{}/events?status=failed&order=oldest", ui.url))?;
    b.run("window.__same_page = true; return null;")?;
    assert_eq!(b.all("table.events tbody tr")?.len(), 2);
    let late = k.store.enqueue(NewEvent::new("webhook.post", json!({})))?;
    k.store.mark_failed(late.id, "late")?;
    b.wait_for(10, "the list to refresh", |b| {
        Ok(b.all("table.events tbody tr")?.len() == 3)
    })?;
    assert_eq!(b.run("return window.__same_page === true;")?, json!(true));
    assert_eq!(
        b.run("return document.querySelector('select[name=status]').value;")?,
        json!("failed")
    );
    assert!(b.url()?.contains("status=failed"));

    // Filter the list with the form: type and error text.
    b.go(&format!("{}/events", ui.url))?;
    b.type_into("input[name=type]", "webhook.post")?;
    b.type_into("input[name=error]", "503")?;
    b.click("#filters button[type=submit]")?;
    b.wait_for(10, "the filtered list", |b| {
        Ok(b.url()?.contains("error=503"))
    })?;
    let rows = b.all("table.events tbody tr")?;
    assert_eq!(rows.len(), 1, "{}", b.source()?);

    // Open the event: the hostile payload and error are text, not markup.
    b.click(&format!("a[href='/events/{}']", k.hostile))?;
    b.wait_for(10, "the event page", |b| {
        Ok(b.url()?.ends_with(&k.hostile.to_string()))
    })?;
    assert!(
        b.text("#payload")?.contains(HOSTILE_PAYLOAD),
        "{}",
        b.text("#payload")?
    );
    assert_eq!(b.text("#last-error")?, HOSTILE_ERROR);
    assert_eq!(b.run("return window.__pwned === undefined;")?, json!(true));
    assert!(b.all("#payload script, #last-error img")?.is_empty());

    // Retry it: a confirmation, then the database changed.
    b.click("#retry")?;
    b.wait_for(10, "the confirmation", |b| {
        Ok(b.url()?.contains("/confirm"))
    })?;
    assert_eq!(
        status_of(&k.store, k.hostile)?,
        Status::Failed,
        "not before confirming"
    );
    b.click("#confirm")?;
    b.wait_for(10, "the retried event", |b| {
        Ok(b.url()?.contains("done=retried"))
    })?;
    assert_eq!(status_of(&k.store, k.hostile)?, Status::Pending);
    assert!(b.text(".notice")?.contains("Retried"));

    // Fail the pending event, with a reason.
    b.go(&format!("{}/events/{}", ui.url, k.pending))?;
    b.click("#fail")?;
    b.type_into("textarea[name=reason]", "customer left")?;
    b.click("#confirm")?;
    b.wait_for(10, "the failed event", |b| {
        Ok(b.url()?.contains("done=failed"))
    })?;
    let failed = k.store.find(k.pending)?.ok_or("gone")?;
    assert_eq!(
        (failed.status, failed.last_error.as_deref()),
        (Status::Failed, Some("customer left"))
    );

    // A page of another origin posting to the dashboard, even with the
    // right form token, is refused, and nothing changes.
    let token = b.run("return document.querySelector('input[name=csrf]') && document.querySelector('input[name=csrf]').value;")?;
    let token = match token.as_str() {
        Some(t) => t.to_owned(),
        None => {
            b.go(&format!(
                "{}/confirm?action=retry&id={}",
                ui.url, k.other_failed
            ))?;
            b.run("return document.querySelector('input[name=csrf]').value;")?
                .as_str()
                .ok_or("no token")?
                .to_owned()
        }
    };
    let evil = EvilPage::serve(&format!(
        "<!doctype html><form method=post action=\"{}/actions/retry\">\
         <input type=hidden name=csrf value=\"{token}\"><input type=hidden name=id value=\"{}\">\
         <button id=go>go</button></form>",
        ui.url, k.other_failed
    ))?;
    b.go(&evil.url)?;
    b.click("#go")?;
    b.wait_for(10, "the refusal", |b| Ok(b.source()?.contains("refused")))?;
    assert_eq!(status_of(&k.store, k.other_failed)?, Status::Failed);

    // Read-only: no actions shown, and none taken.
    let ro = Dashboard::start(&db, &["--read-only"])?;
    b.go(&format!("{}/", ro.url))?;
    assert!(b.text(".attention")?.contains("failed"));
    assert!(b.all(".attention .button")?.is_empty());
    b.go(&format!("{}/events/{}", ro.url, k.other_failed))?;
    assert!(b.text("h1")?.contains("failed"));
    assert!(b.all("#retry, #fail")?.is_empty());
    b.go(&format!(
        "{}/confirm?action=retry&id={}",
        ro.url, k.other_failed
    ))?;
    assert!(b.source()?.contains("read-only"));
    let same_origin_post = b.run(&format!(
        "var x = new XMLHttpRequest(); x.open('POST', '/actions/retry', false);\
         x.setRequestHeader('Content-Type', 'application/x-www-form-urlencoded');\
         x.send('csrf={token}&id={}'); return x.status;",
        k.other_failed
    ))?;
    assert_eq!(same_origin_post, json!(403));
    assert_eq!(status_of(&k.store, k.other_failed)?, Status::Failed);
    Ok(())
}

/// A page on another port of loopback: another origin.
struct EvilPage {
    url: String,
    _thread: std::thread::JoinHandle<()>,
}

impl EvilPage {
    fn serve(html: &str) -> Result<EvilPage> {
        let server = tiny_http::Server::http("127.0.0.1:0").map_err(|e| e.to_string())?;
        let url = format!("http://{}/", server.server_addr());
        let html = html.to_owned();
        let thread = std::thread::spawn(move || {
            for rq in server.incoming_requests() {
                let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"text/html"[..]);
                let mut res = tiny_http::Response::from_string(html.clone());
                if let Ok(h) = header {
                    res = res.with_header(h);
                }
                let _ = rq.respond(res);
            }
        });
        Ok(EvilPage {
            url,
            _thread: thread,
        })
    }
}

// ---- over plain HTTP ----------------------------------------------------------

/// A key whose head retries after an error: the overview says how many
/// wait behind it and why, the waiting event's page names the head, the
/// head's page says when it retries, failures are grouped by error, and
/// `/metrics` counts the events behind their key.
#[test]
fn a_stalled_key_and_the_reasons_of_failures_are_explained() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("app.db");
    let store = SqliteStore::open(&db)?;
    let head =
        store.enqueue(NewEvent::new("user.updated", json!({})).with_ordering_key("user-17"))?;
    let behind =
        store.enqueue(NewEvent::new("user.updated", json!({})).with_ordering_key("user-17"))?;
    store.enqueue(NewEvent::new("user.updated", json!({})).with_ordering_key("user-17"))?;
    let lease = store
        .claim(1, std::time::Duration::from_secs(60), None)?
        .first()
        .and_then(sqlite_outbox::Event::lease)
        .ok_or("no lease")?;
    store.retry(
        &lease,
        "HTTP 500: database is down",
        Some(std::time::Duration::from_secs(3600)),
    )?;
    for error in ["HTTP 410: gone", "HTTP 410: gone", "timeout"] {
        let e = store.enqueue(NewEvent::new("webhook.post", json!({})))?;
        store.mark_failed(e.id, error)?;
    }
    let ui = Dashboard::start(&db, &[])?;
    let metrics = ureq::get(&format!("{}/metrics", ui.url))
        .call()?
        .into_string()?;
    assert!(
        metrics.contains("\noutbox_events_behind_key 2\n"),
        "{metrics}"
    );
    let Some((chromium, chromedriver)) = chromium() else {
        return Ok(());
    };
    let b = Browser::start(&chromium, &chromedriver)?;
    b.go(&format!("{}/", ui.url))?;
    let attention = b.text(".attention")?;
    assert!(
        attention.contains("2 events wait behind ordering key user-17")
            && attention.contains("HTTP 500: database is down"),
        "{attention}"
    );
    assert!(
        attention.contains("Why webhook.post failed: 2× HTTP 410: gone, 1× timeout"),
        "{attention}"
    );
    assert!(
        !attention.contains("is a dispatcher running"),
        "{attention}"
    );
    b.go(&format!("{}/events?status=pending", ui.url))?;
    let list = b.text("table.events")?;
    assert_eq!(list.matches("behind key user-17").count(), 2, "{list}");
    b.go(&format!("{}/events/{}", ui.url, behind.id))?;
    let why = b.text("#why")?;
    assert!(
        why.contains("behind ordering key \"user-17\"") && why.contains(&head.id.to_string()),
        "{why}"
    );
    b.click("#head")?;
    b.wait_for(10, "the head's page", |b| {
        Ok(b.url()?.contains(&head.id.to_string()))
    })?;
    let why = b.text("#why")?;
    assert!(
        why.contains("waits until") && why.contains("HTTP 500: database is down"),
        "{why}"
    );
    Ok(())
}

/// What waits for a limit, and what has a raised priority, as a user sees
/// them: the overview's attention list and limits, the event list's marks,
/// an event's page.
#[test]
fn limits_and_priorities_show_in_the_browser() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("app.db");
    let store = SqliteStore::open(&db)?;
    for i in 0..3 {
        store.enqueue(NewEvent::new("crm.call", json!({ "i": i })))?;
    }
    let urgent = store.enqueue(NewEvent::new("email.reset", json!({})).with_priority(7))?;
    let dispatcher = sqlite_outbox::Dispatcher::builder(store.clone())
        .handle("crm.call", |_| Ok(()))
        .limit(sqlite_outbox::Limit::rate(
            sqlite_outbox::LimitScope::Type,
            "crm.call",
            1,
            std::time::Duration::from_secs(600),
        ))
        .start()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !sqlite_outbox::Operator::limits(&store)?
        .iter()
        .any(|l| l.limited_since.is_some())
    {
        if std::time::Instant::now() > deadline {
            return Err("the limit was never waited for".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let waiting = sqlite_outbox::Operator::list(
        &store,
        &sqlite_outbox::ListFilter {
            status: Some(Status::Pending),
            event_type: Some("crm.call".into()),
            ..Default::default()
        },
    )?;
    let ui = Dashboard::start(&db, &[])?;
    let metrics = ureq::get(&format!("{}/metrics", ui.url))
        .call()?
        .into_string()?;
    assert!(
        metrics.contains("outbox_limit_waiting{scope=\"type\",name=\"crm.call\",kind=\"rate\"} 1"),
        "{metrics}"
    );
    let Some((chromium, chromedriver)) = chromium() else {
        dispatcher.shutdown(std::time::Duration::from_secs(5));
        return Ok(());
    };
    let b = Browser::start(&chromium, &chromedriver)?;
    b.go(&format!("{}/", ui.url))?;
    let attention = b.text(".attention")?;
    assert!(
        attention.contains("Events of type crm.call wait for the rate limit"),
        "{attention}"
    );
    let limits = b.text("#limits")?;
    assert!(
        limits.contains("crm.call") && limits.contains("1 per 10m") && limits.contains("waiting"),
        "{limits}"
    );
    let cards = b.text(".cards")?;
    assert!(cards.contains("1 of raised priority"), "{cards}");
    b.go(&format!("{}/events?status=pending", ui.url))?;
    let list = b.text("table.events")?;
    assert_eq!(list.matches("waits for a rate limit").count(), 2, "{list}");
    b.go(&format!("{}/events/{}", ui.url, waiting[0].id))?;
    let why = b.text("#why")?;
    assert!(why.contains("limited: waits for the rate limit"), "{why}");
    b.go(&format!("{}/events/{}", ui.url, urgent.id))?;
    let fields = b.text("dl.fields")?;
    assert!(
        fields.contains("Priority\n7") || fields.contains("Priority 7"),
        "{fields}"
    );
    dispatcher.shutdown(std::time::Duration::from_secs(5));
    Ok(())
}

fn get(url: &str) -> Result<(u16, String, Option<String>)> {
    Visitor::default().get(url)
}

#[test]
fn changes_need_the_sessions_token_the_origin_and_the_right_host() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("app.db");
    let k = known_outbox(&db)?;
    let ui = Dashboard::start(&db, &[])?;
    let me = Visitor::default();
    let (status, html, csp) = me.get(&format!(
        "{}/confirm?action=retry&id={}",
        ui.url, k.other_failed
    ))?;
    assert_eq!(status, 200);
    let csp = csp.ok_or("no Content-Security-Policy")?;
    assert!(
        csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    let token = csrf_of(&html)?;
    let id = k.other_failed.to_string();
    let action = format!("{}/actions/retry", ui.url);
    let form = [("csrf", token.as_str()), ("id", id.as_str())];
    let status = |r: Result<ureq::Response>| r.map(|r| r.status());
    // No Origin (nor Referer), a foreign Origin, a wrong token: refused.
    assert_eq!(status(me.post(&action, None, &form))?, 403);
    assert_eq!(
        status(me.post(&action, Some("http://evil.example"), &form))?,
        403
    );
    let zeros = "0".repeat(32);
    assert_eq!(
        status(me.post(&action, Some(&ui.url), &[("csrf", &zeros), ("id", &id)]))?,
        403
    );
    // The token belongs to this browser's session: another session (or
    // none) cannot use it.
    let other = Visitor::default();
    other.get(&format!("{}/", ui.url))?;
    assert!(other.cookie.borrow().is_some());
    assert_eq!(status(other.post(&action, Some(&ui.url), &form))?, 403);
    assert_eq!(
        status(Visitor::default().post(&action, Some(&ui.url), &form))?,
        403
    );
    // GET never changes anything, and no other method is taken.
    assert_eq!(me.get(&format!("{action}?csrf={token}&id={id}"))?.0, 405);
    for method in ["DELETE", "PUT", "PATCH"] {
        let r = ureq::request(method, &format!("{}/", ui.url)).call();
        assert!(
            matches!(r, Err(ureq::Error::Status(405, _))),
            "{method}: {r:?}"
        );
    }
    let head = ureq::request("HEAD", &format!("{}/", ui.url)).call()?;
    assert_eq!(head.status(), 200);
    assert_eq!(status_of(&k.store, k.other_failed)?, Status::Failed);
    // The dashboard's own form: done, and sent on to the event.
    assert_eq!(status(me.post(&action, Some(&ui.url), &form))?, 303);
    assert_eq!(status_of(&k.store, k.other_failed)?, Status::Pending);
    // A name that resolves to loopback but is not (DNS rebinding).
    let rebinding = ureq::get(&format!("{}/", ui.url))
        .set("Host", "evil.example:80")
        .call();
    assert!(
        matches!(rebinding, Err(ureq::Error::Status(421, _))),
        "{rebinding:?}"
    );
    // Any loopback address names it, with its port.
    let port = ui.url.rsplit(':').next().ok_or("no port")?;
    for host in [
        format!("127.0.0.2:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        let r = ureq::get(&format!("{}/", ui.url))
            .set("Host", &host)
            .call()?;
        assert_eq!(r.status(), 200, "{host}");
    }
    for host in [
        "127.0.0.1".to_owned(),
        "127.0.0.1:1".to_owned(),
        format!("evil.localhost.example:{port}"),
    ] {
        let r = ureq::get(&format!("{}/", ui.url)).set("Host", &host).call();
        assert!(
            matches!(r, Err(ureq::Error::Status(421, _))),
            "{host}: {r:?}"
        );
    }
    // An age too far back for any date is refused, not a server error.
    let (_, confirm, _) = me.get(&format!("{}/confirm?action=purge", ui.url))?;
    let token = csrf_of(&confirm)?;
    let purge = me.post(
        &format!("{}/actions/purge", ui.url),
        Some(&ui.url),
        &[("csrf", &token), ("older_than", "1000000000w")],
    )?;
    assert_eq!(purge.status(), 400);
    Ok(())
}

#[test]
fn off_loopback_an_access_token_is_required() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("app.db");
    known_outbox(&db)?;
    // Not without a token; and never from argv.
    let out = outbox(&db, &["ui", "--listen", "0.0.0.0:0"])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("access token"));
    let out = outbox(&db, &["ui", "--token", "x"])?;
    assert_eq!(out.status.code(), Some(2));
    // A token of 15 characters is too short; 16 will do.
    let short = dir.path().join("short");
    std::fs::write(&short, "fifteen-chars-x\n")?;
    let out = outbox(
        &db,
        &[
            "ui",
            "--listen",
            "0.0.0.0:0",
            "--token-file",
            short.to_str().ok_or("path")?,
        ],
    )?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 16"));
    let long_enough = Dashboard::start_with_env(
        &db,
        &["--listen", "0.0.0.0:0"],
        &[("OUTBOX_UI_TOKEN", "sixteen-chars-xx")],
    )?;
    drop(long_enough);

    let secret = "a-long-enough-access-token";
    let ui = Dashboard::start_with_env(
        &db,
        &["--listen", "0.0.0.0:0"],
        &[("OUTBOX_UI_TOKEN", secret)],
    )?;
    // Every page asks to sign in; /metrics wants a bearer token.
    let (status, _, _) = get(&format!("{}/", ui.url))?;
    assert_eq!(status, 303);
    assert_eq!(get(&format!("{}/metrics", ui.url))?.0, 401);
    let metrics = ureq::get(&format!("{}/metrics", ui.url))
        .set("Authorization", &format!("Bearer {secret}"))
        .call()?;
    assert_eq!(metrics.status(), 200);
    // The sign-in page says nothing of the outbox and hands out no token.
    let me = Visitor::default();
    let (_, login, _) = me.get(&format!("{}/login", ui.url))?;
    assert!(
        !login.contains("app.db") && !login.contains("name=\"csrf\""),
        "{login}"
    );
    assert!(me.cookie.borrow().is_none());
    // Sign in: from another origin, refused; a wrong token is refused; the
    // right one gives a session.
    let url = format!("{}/login", ui.url);
    let evil = me.post(&url, Some("http://evil.example"), &[("token", secret)])?;
    assert_eq!(evil.status(), 403);
    let wrong = me.post(&url, Some(&ui.url), &[("token", "not-the-token-at-all")])?;
    assert_eq!(wrong.status(), 403);
    let right = me.post(&url, Some(&ui.url), &[("token", secret)])?;
    assert_eq!(right.status(), 303);
    let cookie = right.header("Set-Cookie").ok_or("no cookie")?.to_owned();
    assert!(
        cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict")
            && !cookie.contains("Secure"),
        "{cookie}"
    );
    let (status, page, _) = me.get(&format!("{}/", ui.url))?;
    assert_eq!(status, 200);
    assert!(!page.contains(secret));
    // A session cookie made up, or one from another run, is no session.
    let forged = Visitor::default();
    *forged.cookie.borrow_mut() = Some(format!("outbox_ui={}", "1.ab.cd"));
    assert_eq!(forged.get(&format!("{}/", ui.url))?.0, 303);
    Ok(())
}

#[test]
fn metrics_pass_promtool_and_count_what_is_there() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("app.db");
    let k = known_outbox(&db)?;
    // A type name that needs escaping in a label.
    k.store
        .enqueue(NewEvent::new("odd \"type\"\\x", json!({})))?;
    let ui = Dashboard::start(&db, &[])?;
    let served = ureq::get(&format!("{}/metrics", ui.url)).call()?;
    assert!(served.content_type().starts_with("text/plain"));
    let served = served.into_string()?;
    let printed = common::cli::ok(&outbox(&db, &["stats", "--prometheus"])?)?;
    for text in [&served, &printed] {
        assert!(
            text.contains("outbox_events{status=\"failed\",type=\"webhook.post\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("outbox_events{status=\"done\",type=\"email.send\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("outbox_events_due{type=\"odd \\\"type\\\"\\\\x\"} 1\n"),
            "{text}"
        );
        if !common::cli::promtool_accepts(text)? {
            return Ok(());
        }
    }
    Ok(())
}

/// The same dashboard on a PostgreSQL outbox: the pages, the list and a
/// retry through the operator calls of `PostgresStore`.
#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn the_dashboard_shows_and_changes_a_postgres_outbox() -> Result<()> {
    let Some(schema) = common::pg::Schema::fresh() else {
        return Ok(());
    };
    let store = sqlite_outbox::PostgresStore::builder(&schema.url)
        .schema(&schema.name)
        .build()?;
    let failed = store.enqueue(NewEvent::new(
        "webhook.post",
        json!({ "html": HOSTILE_PAYLOAD }),
    ))?;
    store.mark_failed(failed.id, HOSTILE_ERROR)?;
    store.enqueue(NewEvent::new("email.send", json!({})))?;
    let ui = Dashboard::start(Path::new(&schema.url), &["--schema", &schema.name])?;
    let (status, overview, _) = get(&format!("{}/", ui.url))?;
    assert_eq!(status, 200);
    assert!(overview.contains("data-count=\"failed\">1<"), "{overview}");
    let (_, list, _) = get(&format!("{}/events?status=failed", ui.url))?;
    assert!(list.contains(&format!("/events/{}", failed.id)), "{list}");
    let (_, page, _) = get(&format!("{}/events/{}", ui.url, failed.id))?;
    assert!(
        page.contains("&lt;script&gt;") && !page.contains("<script>window"),
        "{page}"
    );
    let me = Visitor::default();
    let (_, confirm, _) = me.get(&format!("{}/confirm?action=retry&id={}", ui.url, failed.id))?;
    let token = csrf_of(&confirm)?;
    let id = failed.id.to_string();
    let done = me.post(
        &format!("{}/actions/retry", ui.url),
        Some(&ui.url),
        &[("csrf", &token), ("id", &id)],
    )?;
    assert_eq!(done.status(), 303);
    assert_eq!(
        store.find(failed.id)?.map(|e| e.status),
        Some(Status::Pending)
    );
    Ok(())
}

/// A self-signed certificate for localhost and 127.0.0.1, made by the
/// system's openssl: (certificate, key) paths.
fn certificate(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let (cert, key) = (dir.join("ui.crt"), dir.join("ui.key"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-x509",
            "-days",
            "2",
            "-nodes",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // A server certificate, not a CA: what a client's TLS accepts as
        // the leaf it trusts.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned().into());
    }
    Ok((cert, key))
}

/// A client that trusts only `cert`.
fn https_client(cert: &Path) -> Result<Visitor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(cert)? {
        roots.add(c?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Visitor::with(
        ureq::AgentBuilder::new().tls_config(std::sync::Arc::new(config)),
    ))
}

#[test]
fn over_tls_the_token_and_the_session_never_cross_in_clear() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("app.db");
    let k = known_outbox(&db)?;
    let (cert, key) = certificate(dir.path())?;
    let secret = "a-long-enough-access-token";
    let ui = Dashboard::start_with_env(
        &db,
        &[
            "--listen",
            "0.0.0.0:0",
            "--tls-cert",
            cert.to_str().ok_or("path")?,
            "--tls-key",
            key.to_str().ok_or("path")?,
        ],
        &[("OUTBOX_UI_TOKEN", secret)],
    )?;
    assert!(ui.url.starts_with("https://127.0.0.1:"), "{}", ui.url);
    let me = https_client(&cert)?;
    let right = me.post(
        &format!("{}/login", ui.url),
        Some(&ui.url),
        &[("token", secret)],
    )?;
    assert_eq!(right.status(), 303);
    let cookie = right.header("Set-Cookie").ok_or("no cookie")?.to_owned();
    assert!(
        cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    // A change from the dashboard's own https page.
    let (_, confirm, _) = me.get(&format!(
        "{}/confirm?action=retry&id={}",
        ui.url, k.other_failed
    ))?;
    let token = csrf_of(&confirm)?;
    let id = k.other_failed.to_string();
    let action = format!("{}/actions/retry", ui.url);
    // The same origin in plain http is another origin.
    let http_origin = ui.url.replace("https://", "http://");
    let form = [("csrf", token.as_str()), ("id", id.as_str())];
    assert_eq!(me.post(&action, Some(&http_origin), &form)?.status(), 403);
    assert_eq!(me.post(&action, Some(&ui.url), &form)?.status(), 303);
    assert_eq!(status_of(&k.store, k.other_failed)?, Status::Pending);
    // Plain HTTP on the TLS port gets nothing of the outbox.
    let plain = ureq::get(&format!("{http_origin}/metrics"))
        .set("Authorization", &format!("Bearer {secret}"))
        .call();
    assert!(plain.is_err(), "{plain:?}");
    Ok(())
}

#[test]
fn behind_a_tls_proxy_its_public_origin_signs_in() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("app.db");
    let k = known_outbox(&db)?;
    let public = "https://outbox.example.com";
    let ui = Dashboard::start(&db, &["--public-origin", public])?;
    let me = Visitor::default();
    // The proxy passes the public Host on; the browser names the public origin.
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    let page = agent
        .get(&format!(
            "{}/confirm?action=retry&id={}",
            ui.url, k.other_failed
        ))
        .set("Host", "outbox.example.com")
        .call()?;
    let cookie = page.header("Set-Cookie").ok_or("no session")?.to_owned();
    assert!(cookie.contains("Secure"), "{cookie}");
    *me.cookie.borrow_mut() = cookie.split(';').next().map(str::to_owned);
    let token = csrf_of(&page.into_string()?)?;
    let id = k.other_failed.to_string();
    let done = me.post(
        &format!("{}/actions/retry", ui.url),
        Some(public),
        &[("csrf", &token), ("id", &id)],
    )?;
    assert_eq!(done.status(), 303);
    assert_eq!(status_of(&k.store, k.other_failed)?, Status::Pending);
    // Another public name is still not this dashboard.
    let other = agent
        .get(&format!("{}/", ui.url))
        .set("Host", "evil.example.com")
        .call();
    assert!(
        matches!(other, Err(ureq::Error::Status(421, _))),
        "{other:?}"
    );
    Ok(())
}
