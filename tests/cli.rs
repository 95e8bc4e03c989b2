//! The `outbox` binary, driven as an operator or another program would.
#![cfg(feature = "cli")]

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use serde_json::{json, Value};
use sqlite_outbox::{NewEvent, Operator, SqliteStore, Status, Store};

mod common;

use common::cli::{json_of, ok, outbox, stderr, BIN};
use common::TestResult;

#[test]
fn operator_commands_in_tables_and_json() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    assert!(ok(&outbox(&db, &["init"])?)?.contains("outbox ready"));
    let org = uuid::Uuid::new_v4();
    let id = ok(&outbox(
        &db,
        &[
            "enqueue",
            "email.invite",
            r#"{"to":"ada@example.com"}"#,
            "--org",
            &org.to_string(),
            "--correlation-id",
            "req-1",
        ],
    )?)?
    .trim()
    .to_owned();
    let payload_file = dir.path().join("p.json");
    std::fs::write(&payload_file, r#"{"doc": 7}"#)?;
    let second = json_of(&outbox(
        &db,
        &[
            "--json",
            "enqueue",
            "sync.push",
            &format!("@{}", payload_file.display()),
            "--ordering-key",
            "doc-7",
            "--delay",
            "1h",
            "--priority",
            "7",
        ],
    )?)?;
    assert_eq!(second["payload"], json!({"doc": 7}));
    assert_eq!(second["ordering_key"], json!("doc-7"));
    assert_eq!(second["priority"], json!(7));

    let stats = json_of(&outbox(&db, &["--json", "stats"])?)?;
    assert_eq!(
        (stats["pending"].as_u64(), stats["due"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(stats["by_type"][0]["type"], json!("email.invite"));
    let table = ok(&outbox(&db, &["stats"])?)?;
    assert!(table.contains("pending 2  (due 1)"), "{table}");
    assert!(
        table.contains("raised priority: 1 at priority 7 (0 due)"),
        "{table}"
    );
    assert_eq!(
        stats["by_priority"],
        json!([{"priority": 7, "pending": 1, "due": 0}])
    );
    let metrics = ok(&outbox(&db, &["stats", "--prometheus"])?)?;
    assert!(
        metrics.contains("outbox_events_pending_by_priority{priority=\"7\",due=\"false\"} 1"),
        "{metrics}"
    );
    assert!(table.contains("sync.push"), "{table}");

    let listed = json_of(&outbox(
        &db,
        &["--json", "list", "--org", &org.to_string()],
    )?)?;
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    assert_eq!(listed[0]["id"], json!(id));
    let table = ok(&outbox(&db, &["list", "--newest"])?)?;
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("ID"));
    assert!(
        lines[1].contains("sync.push") && lines[2].contains("email.invite"),
        "{table}"
    );

    let shown = json_of(&outbox(&db, &["--json", "show", &id])?)?;
    assert_eq!(shown["correlation_id"], json!("req-1"));
    assert_eq!(shown["status"], json!("pending"));
    assert!(ok(&outbox(&db, &["show", &id])?)?.contains("email.invite"));

    // cancel, then requeue it
    let cancelled = json_of(&outbox(
        &db,
        &["--json", "cancel", &id, "--reason", "address bounced"],
    )?)?;
    assert_eq!(cancelled["cancelled"], json!(id));
    let failed = json_of(&outbox(&db, &["--json", "show", &id])?)?;
    assert_eq!(
        (failed["status"].clone(), failed["last_error"].clone()),
        (json!("failed"), json!("address bounced"))
    );
    assert_eq!(
        json_of(&outbox(&db, &["--json", "requeue", &id])?)?["requeued"],
        json!(1)
    );
    ok(&outbox(&db, &["cancel", &id, "--reason", "again"])?)?;
    assert_eq!(
        json_of(&outbox(
            &db,
            &["--json", "requeue", "--failed", "--type", "email.invite"]
        )?)?["requeued"],
        json!(1)
    );
    // The names of earlier versions still work.
    ok(&outbox(&db, &["fail", &id, "--reason", "once more"])?)?;
    assert_eq!(
        json_of(&outbox(&db, &["--json", "retry", &id])?)?["requeued"],
        json!(1)
    );

    // erase, backup, purge
    assert_eq!(
        json_of(&outbox(
            &db,
            &["--json", "erase", "--org", &org.to_string()]
        )?)?["deleted"],
        json!(1)
    );
    let copy = dir.path().join("copy.db");
    ok(&outbox(&db, &["backup", &copy.display().to_string()])?)?;
    assert_eq!(
        json_of(&outbox(&copy, &["--json", "stats"])?)?["total"],
        json!(1)
    );
    assert_eq!(
        json_of(&outbox(&db, &["--json", "purge", "--older-than", "30d"])?)?["deleted"],
        json!(0)
    );
    assert!(ok(&outbox(&db, &["schema"])?)?.contains("CREATE TABLE outbox_events ("));
    assert_eq!(
        json_of(&outbox(&db, &["--json", "verify"])?)?["ok"],
        json!(true)
    );
    Ok(())
}

#[test]
fn bad_input_is_a_clear_error_and_writes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    ok(&outbox(&db, &["init"])?)?;
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["enqueue", "t", "{not json"], 2, "not valid JSON"),
        (vec!["enqueue", "t", "{} trailing"], 2, "not valid JSON"),
        (vec!["enqueue", "", "{}"], 2, "event type is empty"),
        (vec!["enqueue", "t", "{}", "--priority", "256"], 2, "256"),
        (vec!["enqueue", "t", "{}", "--priority", "-1"], 2, "-1"),
        (
            vec!["enqueue", "t", "@/nonexistent/file"],
            2,
            "cannot read the payload",
        ),
        (vec!["list", "--status", "weird"], 2, "unknown status"),
        (vec!["purge", "--older-than", "soon"], 2, "not a duration"),
        (vec!["show", "not-a-uuid"], 2, "not an event id"),
        (
            vec!["show", "01a21c71-edfa-732d-ae0d-5813e86758c4"],
            1,
            "no event with id",
        ),
        (
            vec!["requeue", "01a21c71-edfa-732d-ae0d-5813e86758c4"],
            1,
            "no event with id",
        ),
        (vec!["frobnicate"], 2, "unrecognized subcommand"),
    ];
    for (args, code, needle) in cases {
        let out = outbox(&db, &args)?;
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        // Our errors are one line; clap's usage errors add a usage hint.
        let first = stderr(&out).lines().next().unwrap_or_default().to_owned();
        assert!(
            first.contains(needle),
            "{args:?}: the first line should say it: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).lines().count() <= 5,
            "{args:?}: not one clear error: {}",
            stderr(&out)
        );
    }
    assert_eq!(
        json_of(&outbox(&db, &["--json", "stats"])?)?["total"],
        json!(0),
        "nothing was written"
    );

    // Read commands never create a file.
    let missing = dir.path().join("missing.db");
    for args in [
        vec!["stats"],
        vec!["list"],
        vec!["requeue", "--failed"],
        vec!["purge", "--older-than", "1d"],
    ] {
        let out = outbox(&missing, &args)?;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("missing.db: no such file"),
            "{}",
            stderr(&out)
        );
        assert!(!missing.exists());
    }

    // Foreign and newer files are refused and left as they were.
    let foreign = dir.path().join("foreign.db");
    Connection::open(&foreign)?
        .execute_batch("PRAGMA application_id = 42; CREATE TABLE outbox_events (x);")?;
    let newer = dir.path().join("newer.db");
    Connection::open(&newer)?.execute_batch(
        "CREATE TABLE outbox_meta (key TEXT PRIMARY KEY, value);
         INSERT INTO outbox_meta VALUES ('schema_version', 99);",
    )?;
    let text = dir.path().join("text.db");
    std::fs::write(&text, "hello, I am not a database\n".repeat(100))?;
    for (file, needle) in [
        (&foreign, "not an outbox"),
        (&newer, "newer than this version"),
        (&text, "not an outbox"),
    ] {
        let before = std::fs::read(file)?;
        for args in [vec!["stats"], vec!["enqueue", "t", "{}"], vec!["init"]] {
            let out = outbox(file, &args)?;
            assert_eq!(out.status.code(), Some(1), "{args:?}");
            let err = stderr(&out);
            assert!(
                err.contains(needle) && err.contains(&file.display().to_string()),
                "{err}"
            );
        }
        assert!(std::fs::read(file)? == before, "{} changed", file.display());
    }
    Ok(())
}

/// What the test HTTP server saw.
#[derive(Default)]
struct Seen {
    requests: Vec<(String, u16, Instant)>,
    bodies: HashMap<String, Value>,
    keys_match: bool,
}

/// A local server answering by the event's `mode`: `ok` → 200; `busy` →
/// 503 with Retry-After once, then 200; `flaky` → 500 once, then 200;
/// `bad` → 400.
fn serve(server: Arc<tiny_http::Server>, seen: Arc<Mutex<Seen>>) {
    if let Ok(mut s) = seen.lock() {
        s.keys_match = true;
    }
    while let Ok(Some(mut req)) = server.recv_timeout(Duration::from_secs(60)) {
        let mut body = String::new();
        let _ = req.as_reader().read_to_string(&mut body);
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let id = v["id"].as_str().unwrap_or_default().to_owned();
        let key = req
            .headers()
            .iter()
            .find(|h| h.field.equiv("Idempotency-Key"))
            .map(|h| h.value.as_str().to_owned());
        let mode = v["payload"]["mode"].as_str().unwrap_or("ok").to_owned();
        let Ok(mut s) = seen.lock() else { return };
        if key.as_deref() != Some(id.as_str()) {
            s.keys_match = false;
        }
        let before = s.requests.iter().filter(|(i, _, _)| *i == id).count();
        let code = match (mode.as_str(), before) {
            ("busy", 0) => 503,
            ("flaky", 0) => 500,
            ("bad", _) => 400,
            _ => 200,
        };
        s.requests.push((id.clone(), code, Instant::now()));
        s.bodies.insert(id, v);
        drop(s);
        let mut resp = tiny_http::Response::from_string(if code == 400 {
            "unknown recipient\n"
        } else {
            "ok"
        })
        .with_status_code(code);
        if code == 503 {
            if let Ok(h) = tiny_http::Header::from_bytes(&b"Retry-After"[..], &b"1"[..]) {
                resp = resp.with_header(h);
            }
        }
        let _ = req.respond(resp);
    }
}

#[test]
fn relay_delivers_rows_inserted_with_plain_sql_over_http() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("app.db");
    ok(&outbox(&db, &["init"])?)?;
    // Another language's app: its own row and the event in one transaction,
    // following the README's contract.
    let mut conn = Connection::open(&db)?;
    conn.execute_batch("CREATE TABLE signups (email TEXT)")?;
    let modes = ["ok", "busy", "flaky", "bad", "ok", "ok"];
    for (i, mode) in modes.iter().enumerate() {
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO signups (email) VALUES (?1)",
            [format!("u{i}@example.com")],
        )?;
        tx.execute(
            "INSERT INTO outbox_events (event_type, payload, correlation_id) VALUES ('user.signed_up', ?1, ?2)",
            (json!({"mode": mode, "i": i}).to_string(), format!("req-{i}")),
        )?;
        tx.commit()?;
    }
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").map_err(|e| e.to_string())?);
    let port = server
        .server_addr()
        .to_ip()
        .map(|a| a.port())
        .ok_or("no port")?;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let (srv, s) = (server.clone(), seen.clone());
    let thread = std::thread::spawn(move || serve(srv, s));
    let url = format!("http://127.0.0.1:{port}/events");

    // One run waits out the retries (the 503's Retry-After of 1 s
    // included), and exits 3: one event failed.
    let out = outbox(
        &db,
        &[
            "relay",
            "--http",
            &url,
            "--drain",
            "--wait-retries",
            "10s",
            "--backoff",
            "200ms",
            "--header",
            "X-Test: yes",
            "--timeout",
            "5s",
        ],
    )?;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("1 event(s) failed during the run"));
    let stats = SqliteStore::builder(&db).read_only(true).build()?.stats()?;
    assert_eq!((stats.pending, stats.processing, stats.failed), (0, 0, 1));
    server.unblock();
    thread.join().map_err(|_| "server thread panicked")?;

    let store = SqliteStore::builder(&db).read_only(true).build()?;
    let events = store.list(&sqlite_outbox::ListFilter {
        limit: 100,
        ..Default::default()
    })?;
    let s = seen.lock().map_err(|_| "poisoned")?;
    assert!(s.keys_match, "Idempotency-Key must be the event id");
    for e in &events {
        let mode = e.payload["mode"].as_str().unwrap_or_default();
        let codes: Vec<u16> = s
            .requests
            .iter()
            .filter(|(i, _, _)| *i == e.id.to_string())
            .map(|(_, c, _)| *c)
            .collect();
        match mode {
            "ok" => assert_eq!((e.status, codes), (Status::Done, vec![200])),
            "busy" => assert_eq!((e.status, codes), (Status::Done, vec![503, 200])),
            "flaky" => assert_eq!((e.status, codes), (Status::Done, vec![500, 200])),
            "bad" => {
                assert_eq!((e.status, codes), (Status::Failed, vec![400]));
                let err = e.last_error.as_deref().unwrap_or_default();
                assert!(
                    err.contains("HTTP 400") && err.contains("unknown recipient"),
                    "{err}"
                );
            }
            other => panic!("mode {other}"),
        }
        let body = &s.bodies[&e.id.to_string()];
        assert_eq!(body["type"], json!("user.signed_up"));
        assert_eq!(body["correlation_id"], json!(e.correlation_id));
    }
    // Retry-After was honoured: the second try of `busy` came ≥ 1 s later.
    let busy: Vec<Instant> = events
        .iter()
        .filter(|e| e.payload["mode"] == json!("busy"))
        .flat_map(|e| {
            s.requests
                .iter()
                .filter(move |(i, _, _)| *i == e.id.to_string())
                .map(|(_, _, t)| *t)
        })
        .collect();
    assert!(
        busy[1] - busy[0] >= Duration::from_millis(950),
        "{:?}",
        busy[1] - busy[0]
    );
    // No event was posted again once it was done.
    let mut done_at: HashMap<&str, Instant> = HashMap::new();
    for (id, code, t) in &s.requests {
        assert!(
            !done_at.contains_key(id.as_str()),
            "{id} posted after it was done"
        );
        if *code == 200 {
            done_at.insert(id, *t);
        }
    }
    Ok(())
}

#[test]
fn relay_exec_maps_exit_codes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    let good = store.enqueue(NewEvent::new("job", json!({"kind": "good"})))?;
    let later = store.enqueue(NewEvent::new("job", json!({"kind": "later"})))?;
    let never = store.enqueue(NewEvent::new("job", json!({"kind": "never"})))?;
    let other = store.enqueue(NewEvent::new("other", json!({})))?;
    let log = dir.path().join("log");
    let script = dir.path().join("handler.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nbody=$(cat)\necho \"$OUTBOX_EVENT_ID $OUTBOX_EVENT_TYPE $OUTBOX_ATTEMPT\" >> {log}\n\
             case \"$body\" in\n  *good*) exit 0 ;;\n  *never*) echo 'no such account' >&2; exit 65 ;;\n\
             *) [ \"$OUTBOX_ATTEMPT\" -ge 2 ] && exit 0; echo 'try later' >&2; exit 1 ;;\nesac\n",
            log = log.display()
        ),
    )?;
    let cmd = format!("sh {}", script.display());
    let relay = |wait: &str| {
        outbox(
            &db,
            &[
                "relay",
                "--exec",
                &cmd,
                "--type",
                "job",
                "--drain",
                "--backoff",
                "100ms",
                "--wait-retries",
                wait,
            ],
        )
    };
    // Without waiting for retries, a drain that leaves one scheduled (and
    // one failed) says so in its exit status.
    let first = relay("0s")?;
    assert_eq!(first.status.code(), Some(3), "{}", stderr(&first));
    assert!(
        stderr(&first).contains("retries are scheduled"),
        "{}",
        stderr(&first)
    );
    let second = relay("5s")?;
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    let get = |id| store.find(id).ok().flatten().ok_or("gone");
    assert_eq!(get(good.id)?.status, Status::Done);
    let l = get(later.id)?;
    assert_eq!((l.status, l.attempts), (Status::Done, 2));
    assert_eq!(l.last_error.as_deref(), Some("exit 1: try later"));
    let n = get(never.id)?;
    assert_eq!((n.status, n.attempts), (Status::Failed, 1));
    assert_eq!(n.last_error.as_deref(), Some("exit 65: no such account"));
    assert_eq!(
        get(other.id)?.status,
        Status::Pending,
        "--type limits the relay"
    );
    let lines = std::fs::read_to_string(&log)?;
    assert!(lines.contains(&format!("{} job 1", good.id)));
    Ok(())
}

#[test]
fn sigterm_during_relay_loses_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    store.enqueue_batch(
        (0..12)
            .map(|i| NewEvent::new("slow", json!({"i": i})))
            .collect(),
    )?;
    let started = dir.path().join("started");
    let cmd = format!("echo x >> {}; sleep 0.5", started.display());
    let mut child = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args(["relay", "--exec", &cmd, "--workers", "2", "--grace", "10s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&started)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 2
    {
        assert!(Instant::now() < deadline, "relay never started a delivery");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(status.success());
    let t = Instant::now();
    let out = loop {
        if child.try_wait()?.is_some() {
            break child.wait_with_output()?;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "relay did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("still running 0"), "{summary}");
    let events = store.list(&sqlite_outbox::ListFilter {
        limit: 100,
        ..Default::default()
    })?;
    assert_eq!(events.len(), 12);
    let done = events.iter().filter(|e| e.status == Status::Done).count();
    let started_n = std::fs::read_to_string(&started)?.lines().count();
    assert_eq!(
        done, started_n,
        "every started delivery finished and was recorded"
    );
    for e in &events {
        match e.status {
            Status::Done => {}
            Status::Pending => assert_eq!(e.attempts, 0, "a released event was charged"),
            other => panic!("event left {other}"),
        }
    }
    assert!(done < 12, "the relay was stopped mid-way");
    Ok(())
}

/// Inputs that once panicked or raced: a huge --older-than, `cancel` on an
/// event that is done by then, an id typed in upper case.
#[test]
fn odd_operator_input_is_handled() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    let e = store.enqueue(NewEvent::new("t", json!({})))?;
    let out = outbox(&db, &["purge", "--older-than", "100000000d"])?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--older-than"), "{}", stderr(&out));

    let upper = e.id.to_string().to_uppercase();
    let shown = ok(&outbox(&db, &["show", &upper])?)?;
    assert!(shown.contains(&e.id.to_string()), "{shown}");

    let claimed = store.claim(1, Duration::from_secs(30), None)?;
    store.complete(&claimed[0].lease().ok_or("no lease")?)?;
    let out = outbox(&db, &["cancel", &e.id.to_string(), "--reason", "too late"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already done"), "{}", stderr(&out));
    assert_eq!(store.find(e.id)?.map(|e| e.status), Some(Status::Done));
    Ok(())
}

/// Every command takes a PostgreSQL URL where it takes a file; the commands
/// that only make sense on a file say so; a password never shows.
#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn the_same_commands_on_a_postgresql_server() -> TestResult {
    let Some(schema) = common::pg::Schema::fresh() else {
        return Ok(());
    };
    let url = std::path::Path::new(&schema.url);
    let run = |args: &[&str]| {
        let mut all = vec!["--schema", schema.name.as_str()];
        all.extend_from_slice(args);
        outbox(url, &all)
    };
    assert!(ok(&run(&["init"])?)?.contains("outbox ready"));
    let id = ok(&run(&[
        "enqueue",
        "email.invite",
        r#"{"to":"ada@example.com"}"#,
    ])?)?
    .trim()
    .to_owned();
    let stats = json_of(&run(&["--json", "stats"])?)?;
    assert_eq!(stats["pending"].as_u64(), Some(1), "{stats}");
    let shown = json_of(&run(&["--json", "show", &id])?)?;
    assert_eq!(shown["payload"], json!({"to": "ada@example.com"}));
    assert!(ok(&run(&["list"])?)?.contains("email.invite"));
    let out = run(&["relay", "--exec", "cat > /dev/null", "--drain"])?;
    assert!(ok(&out)?.contains("delivered 1"), "{}", stderr(&out));
    let stats = json_of(&run(&["--json", "stats"])?)?;
    assert_eq!(stats["done"].as_u64(), Some(1), "{stats}");
    assert!(ok(&run(&["schema"])?)?.contains("FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify()"));

    let out = run(&["backup", "/tmp/never-written.db"])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("pg_dump"), "{}", stderr(&out));

    // A server that is not there: one line, exit 1, no password.
    let out = outbox(
        std::path::Path::new("postgres://app:s3cret@127.0.0.1:1/app?connect_timeout=2"),
        &["stats"],
    )?;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(!err.contains("s3cret"), "{err}");
    assert!(
        err.contains("host=127.0.0.1 port=1 user=app dbname=app sslmode=prefer"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    Ok(())
}

#[test]
fn verify_compares_indexes_with_their_table() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    for i in 0..20 {
        store.enqueue(NewEvent::new("t", json!({ "n": i })))?;
    }
    drop(store);
    // Everything in the main file, then one index entry pointed at a row
    // that is not there. The id index's root page ends with its first
    // entry: a record header (size 3, a 36-byte text, the row id 1 as
    // serial type 9, "the constant 1"), then the id's text. Serial type 8
    // is the constant 0: the entry then names row 0.
    let (root, page_size) = {
        let c = Connection::open(&db)?;
        c.pragma_update(None, "journal_mode", "DELETE")?;
        let root: i64 = c.query_row(
            "SELECT rootpage FROM sqlite_schema WHERE name = 'sqlite_autoindex_outbox_events_1'",
            [],
            |r| r.get(0),
        )?;
        let size: i64 = c.pragma_query_value(None, "page_size", |r| r.get(0))?;
        (root, size)
    };
    let mut bytes = std::fs::read(&db)?;
    let rowid_type = usize::try_from(root * page_size)? - 36 - 1;
    assert_eq!(
        &bytes[rowid_type - 2..=rowid_type],
        &[3, 13 + 2 * 36, 9],
        "not the record header expected"
    );
    bytes[rowid_type] = 8;
    std::fs::write(&db, &bytes)?;
    // The quick check sees a sound file; the full one (the default) does
    // not, and says where.
    let quick = outbox(&db, &["verify", "--quick"])?;
    assert!(quick.status.success(), "{}", stderr(&quick));
    let full = outbox(&db, &["verify"])?;
    assert_eq!(
        full.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&full.stdout)
    );
    let err = stderr(&full);
    assert!(
        err.contains("corrupt") && err.contains("sqlite_autoindex_outbox_events_1"),
        "{err}"
    );
    Ok(())
}

#[test]
fn operator_commands_never_plant_an_outbox_in_someone_elses_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let app = dir.path().join("app.db");
    {
        let c = Connection::open(&app)?;
        c.execute_batch("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT); INSERT INTO notes (body) VALUES ('x');")?;
    }
    let tables = || -> Result<Vec<String>, rusqlite::Error> {
        let c = Connection::open(&app)?;
        let mut s =
            c.prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")?;
        let names = s.query_map([], |r| r.get(0))?.collect();
        names
    };
    let before = tables()?;
    for args in [
        &["requeue", "--failed"][..],
        &["purge", "--older-than", "30d"],
        &["stats"],
        &["list"],
        &["verify"],
        &["erase", "--org", "00000000-0000-0000-0000-000000000001"],
    ] {
        let out = outbox(&app, args)?;
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no outbox"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert_eq!(tables()?, before, "{args:?} changed the file");
    }
    // `init` and `enqueue` may create one, on purpose.
    assert!(outbox(&app, &["init"])?.status.success());
    assert!(tables()?.contains(&"outbox_events".to_owned()));
    Ok(())
}
