//! `outbox relay`: deliver events over HTTP or to a command, as a service
//! (until SIGINT/SIGTERM) or as a batch (`--drain`).

mod exec;
mod http;
mod metrics;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};
use sqlite_outbox::admin::format_duration;
use sqlite_outbox::{
    Backlog, Dispatcher, DispatcherBuilder, Event, Handler, Operator, RetryPolicy, ShutdownReport,
    Store,
};

use crate::db::Db;
use crate::{describe, duration_arg, Failure};

/// The exit code of `--drain` when it stopped with events failed during the
/// run or retries still scheduled.
const EXIT_UNFINISHED: u8 = 3;

#[derive(Args)]
pub(crate) struct RelayArgs {
    /// POST each event as JSON to this URL.
    #[arg(long, conflicts_with_all = ["exec", "nats", "mqtt"], required_unless_present_any = ["exec", "nats", "mqtt"])]
    http: Option<String>,
    /// Publish each event to this MQTT 5 broker (mqtt://host:1883, or
    /// mqtts://host:8883 over TLS) at QoS 1; done on the broker's PUBACK.
    /// A user in OUTBOX_MQTT_USER and its password in OUTBOX_MQTT_PASSWORD
    /// or --mqtt-password-file.
    #[arg(long, conflicts_with_all = ["exec", "nats"], value_name = "URL")]
    mqtt: Option<String>,
    /// The topic of each event, `{type}` standing for its type.
    #[arg(long, default_value = "outbox/{type}", requires = "mqtt")]
    topic: String,
    /// A client id of the relay's own, which also keeps a persistent
    /// session across reconnects and restarts (default: a random id).
    #[arg(long, requires = "mqtt")]
    mqtt_client_id: Option<String>,
    /// The MQTT user, from the environment only.
    #[arg(long = "mqtt-user-from-env", env = "OUTBOX_MQTT_USER", hide = true)]
    mqtt_user: Option<String>,
    /// The MQTT password, from the environment only.
    #[arg(
        long = "mqtt-password-from-env",
        env = "OUTBOX_MQTT_PASSWORD",
        hide_env_values = true,
        hide = true
    )]
    mqtt_password: Option<String>,
    /// A file whose first line is the MQTT password (instead of
    /// OUTBOX_MQTT_PASSWORD).
    #[arg(long, value_name = "PATH", requires = "mqtt")]
    mqtt_password_file: Option<PathBuf>,
    /// Publish each event to NATS JetStream through this server
    /// (nats://host:4222, or tls://host:4222); done when a stream
    /// acknowledges it. A token in
    /// OUTBOX_NATS_TOKEN, or a credentials file in --nats-creds.
    #[arg(long, conflicts_with = "exec", value_name = "URL")]
    nats: Option<String>,
    /// The subject of each event, `{type}` standing for its type.
    #[arg(long, default_value = "outbox.{type}", requires = "nats")]
    subject: String,
    /// CA certificates (PEM) that the broker's certificate must chain to,
    /// for --nats and --mqtt over TLS (`tls://`, `mqtts://`; given, TLS is
    /// required). Default: the system's roots (NATS), Mozilla's (MQTT).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["http", "exec"])]
    broker_ca: Option<PathBuf>,
    /// A NATS credentials file (user JWT and NKey seed).
    #[arg(long, value_name = "PATH", requires = "nats")]
    nats_creds: Option<PathBuf>,
    /// A NATS token, from the environment only.
    #[arg(
        long = "nats-token-from-env",
        env = "OUTBOX_NATS_TOKEN",
        hide_env_values = true,
        hide = true
    )]
    nats_token: Option<String>,
    /// Extra request header, `Name: value` (repeatable). Visible to other
    /// users in the process list: put secrets in --header-file or
    /// OUTBOX_HEADERS instead.
    #[arg(long = "header", requires = "http")]
    headers: Vec<String>,
    /// A file of extra request headers, one `Name: value` per line (`#`
    /// starts a comment).
    #[arg(long, requires = "http")]
    header_file: Option<PathBuf>,
    /// Extra request headers from the environment, one `Name: value` per line.
    #[arg(
        long = "headers-from-env",
        env = "OUTBOX_HEADERS",
        hide_env_values = true,
        hide = true
    )]
    env_headers: Option<String>,
    /// With --http: up to this many events per request, as one JSON array
    /// (see the README for what the answer decides; default 1, one per
    /// request). With --nats and --mqtt: up to this many publishes in
    /// flight before their acks are awaited (default 256).
    #[arg(long, conflicts_with = "exec", value_parser = batch_count)]
    batch: Option<usize>,
    /// With --http --batch: at most this many bytes of events per request
    /// (an event larger than this goes alone).
    #[arg(long, default_value = "1MiB", requires = "http", value_parser = byte_size)]
    batch_bytes: usize,
    /// What is sent for each event over --http, --nats or --mqtt:
    /// `envelope` (the outbox's JSON), `cloudevents` (a CloudEvent in
    /// structured mode) or `cloudevents-binary` (the payload, with the
    /// attributes as headers or properties).
    #[arg(long, default_value = "envelope", value_parser = ["envelope", "cloudevents", "cloudevents-binary"])]
    format: String,
    /// The CloudEvents `source` attribute (a URI reference).
    #[arg(long, default_value = sqlite_outbox::sink::DEFAULT_CLOUDEVENTS_SOURCE)]
    source: String,
    /// HTTP request timeout, or how long --exec may run.
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    timeout: Duration,
    /// Run this shell command per event, the event JSON on its stdin.
    #[arg(long)]
    exec: Option<String>,
    /// Exit code of --exec that means "never retry".
    #[arg(long, default_value_t = 65)]
    permanent_exit_code: i32,
    /// Only these event types (repeatable; default: all).
    #[arg(long = "type")]
    types: Vec<String>,
    /// Stop once nothing is due and nothing is in flight. Exit status 0 if
    /// every event was delivered, 3 if some failed during the run or
    /// retries are still scheduled.
    #[arg(long)]
    drain: bool,
    /// With --drain: also wait for retries that fall due within this long.
    #[arg(long, value_parser = duration_arg, requires = "drain")]
    wait_retries: Option<Duration>,
    /// Parallel deliveries.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// How long a claimed event is held (renewed while its delivery runs);
    /// events held by a relay that was killed are claimed again after it.
    #[arg(long, default_value = "60s", value_parser = duration_arg)]
    lease: Duration,
    /// Retry delays, e.g. 1s,10s,1m (the last repeats). Default: the
    /// standard schedule (30s, 2m, 10m, ... 24h).
    #[arg(long, value_delimiter = ',', value_parser = duration_arg)]
    backoff: Vec<Duration>,
    /// Attempts before an event fails, for events enqueued without their own.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// How often to look for events committed by other programs.
    #[arg(long, default_value = "500ms", value_parser = duration_arg)]
    poll: Duration,
    /// How long in-flight deliveries may finish after SIGINT/SIGTERM.
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    grace: Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics: deliveries,
    /// retries, failures, handler run times, and the outbox's counts.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// More log lines on stderr (-v: debug, -vv: trace). RUST_LOG, when
    /// set, decides instead.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

/// `--batch`: from 1 to 10,000 events.
fn batch_count(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(n),
        _ => Err("a batch holds from 1 to 10000 events".to_owned()),
    }
}

/// A size in bytes: a number, with `KiB`, `MiB`, `KB` or `MB` after it
/// if wanted, from 1 KiB to 64 MiB.
fn byte_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: usize = n
        .parse()
        .map_err(|_| "a size is a number of bytes, like 1048576 or 1MiB".to_owned())?;
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1024,
        "MiB" => 1024 * 1024,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        _ => return Err("the unit of a size is B, KiB, MiB, KB or MB".to_owned()),
    };
    let bytes = n.saturating_mul(scale);
    if !(1024..=64 * 1024 * 1024).contains(&bytes) {
        return Err("a batch's size is from 1KiB to 64MiB".to_owned());
    }
    Ok(bytes)
}

/// The body posted (or piped) for each event: the sinks' envelope.
fn delivery_json(event: &Event) -> Value {
    sqlite_outbox::sink::envelope(event)
}

/// Log lines on stderr, whatever stderr is (a terminal, a pipe, a
/// journal): what a service manager collects.
fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// `Name: value` lines from --header, --header-file and OUTBOX_HEADERS.
fn collect_headers(a: &RelayArgs) -> Result<Vec<(String, String)>, Failure> {
    let mut lines: Vec<String> = a.headers.clone();
    if let Some(path) = &a.header_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::usage(format!("--header-file {}: {e}", path.display())))?;
        lines.extend(text.lines().map(str::to_owned));
    }
    if let Some(text) = &a.env_headers {
        lines.extend(text.lines().map(str::to_owned));
    }
    lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            // Never echo a value: it is likely a secret.
            let bad = || {
                Failure::usage(format!(
                    "a header is not `Name: value` with a valid name (it starts {:?})",
                    crate::text::terminal_safe(&line.chars().take(12).collect::<String>())
                ))
            };
            let (name, value) = line.split_once(':').ok_or_else(bad)?;
            let (name, value) = (name.trim(), value.trim());
            let name_ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !name_ok || value.chars().any(|c| c.is_control() && c != '\t') {
                return Err(bad());
            }
            Ok((name.to_owned(), value.to_owned()))
        })
        .collect()
}

pub(crate) fn run(db: &Db, json_mode: bool, a: &RelayArgs) -> Result<(), Failure> {
    init_logging(a.verbose);
    let fail = |e: sqlite_outbox::Error| Failure(format!("{}: {}", db, describe(&e)), 1);
    // Everything the operator gave is checked before anything is claimed.
    let running = Arc::new(exec::Running::default());
    let (handler, target) = delivery(a, &running)?;
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    // Without a handler SIGINT kills the process; with one, in-flight
    // deliveries finish or are given back.
    if let Err(e) = ctrlc::set_handler(move || s.store(true, Ordering::SeqCst)) {
        tracing::warn!("cannot catch SIGINT/SIGTERM ({e}); stop with care");
    }
    let Some(store) = open_when_up(db, a, &stop)? else {
        return Ok(());
    };
    if let Some(addr) = a.metrics {
        let bound = metrics::serve(addr, Arc::clone(&store))?;
        tracing::info!("metrics at http://{bound}/metrics");
    }
    // Rows set aside at claim time (undecodable) fail outside the
    // dispatcher's counters: the exit status counts them from the file.
    let failed_before = store.stats().map_err(fail)?.failed;
    // One endpoint or command: one destination, so one probe stands for
    // all of it while it cannot be reached.
    let dispatcher = dispatcher(&store, a, &handler)
        .default_destination(target.clone())
        .start()
        .map_err(fail)?;
    tracing::info!(
        db = %db,
        to = %target,
        types = ?a.types,
        workers = a.workers,
        drain = a.drain,
        "relay started"
    );
    let types = (!a.types.is_empty()).then(|| a.types.clone());
    let waited = watch(&store, &dispatcher, &stop, a, types.as_deref()).map_err(fail)?;
    let halted = dispatcher.halted();
    let unreachable = dispatcher.destinations().into_iter().next();
    let report = dispatcher.shutdown(a.grace);
    let killed = running.kill_all();
    if killed > 0 {
        tracing::warn!(
            killed,
            "commands still running after the grace period were killed"
        );
    }
    print_summary(json_mode, &report, waited.as_ref());
    if report.metrics.dropped_outcomes > 0 {
        return Err(Failure(
            format!(
                "{db}: {} outcome(s) could not be written (the store refused them for good); \
                 their events will be delivered again once their leases run out",
                report.metrics.dropped_outcomes
            ),
            1,
        ));
    }
    if let Some(why) = halted {
        return Err(Failure(
            format!(
                "{db}: the relay stopped: {}",
                crate::text::terminal_safe(&why)
            ),
            1,
        ));
    }
    let Some(left) = waited else {
        return Ok(());
    };
    let (waiting, why_waiting) = left_behind(store.as_ref(), types.as_deref()).map_err(fail)?;
    if let Some(held) = unreachable {
        return Err(Failure(
            format!(
                "{} is {} since {} ({}); {waiting} event(s) wait for a later run",
                held.name,
                if held
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("HTTP 429") || e.starts_with("HTTP 503"))
                {
                    "busy"
                } else {
                    "unreachable"
                },
                held.since.format("%Y-%m-%d %H:%M:%S UTC"),
                crate::text::terminal_safe(held.last_error.as_deref().unwrap_or("no answer"))
            ),
            EXIT_UNFINISHED,
        ));
    }
    let failed_in_file = store
        .stats()
        .map_err(fail)?
        .failed
        .saturating_sub(failed_before);
    let _ = left;
    match (report.metrics.failed.max(failed_in_file), waiting) {
        (0, 0) => Ok(()),
        (failed, waiting) => {
            let mut parts = Vec::new();
            if failed > 0 {
                parts.push(format!("{failed} event(s) failed during the run"));
            }
            if waiting > 0 {
                parts.push(format!(
                    "{waiting} event(s) wait: {}",
                    crate::text::terminal_safe(&why_waiting)
                ));
            }
            Err(Failure(parts.join("; "), EXIT_UNFINISHED))
        }
    }
}

/// How many events of the relay's types are still pending, and why, in a
/// few words: retries scheduled (the next, and after what), events behind
/// their ordering key (the key, and what its head waits for), events
/// held back with their destination. The reasons come from a sample of
/// the oldest pending events.
fn left_behind(
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

/// The delivery the operator asked for, and how to name its target in logs
/// (credentials redacted, control characters escaped).
fn delivery(
    a: &RelayArgs,
    running: &Arc<exec::Running>,
) -> Result<(Arc<DeliverFn>, String), Failure> {
    let format = format_of(a)?;
    if let Some(url) = &a.mqtt {
        let fail = |e: sqlite_outbox::Error| Failure::usage(format!("--mqtt: {}", describe(&e)));
        let mut builder = sqlite_outbox::sink::MqttSink::builder(url)
            .map_err(fail)?
            .topic(a.topic.clone())
            .format(format.clone())
            .ack_timeout(a.timeout);
        if let Some(id) = &a.mqtt_client_id {
            builder = builder.client_id(id.clone());
        }
        if let Some(n) = a.batch {
            builder = builder.batch(n);
        }
        if let Some(path) = &a.broker_ca {
            builder = builder.ca_file(path.clone());
        }
        let password = match &a.mqtt_password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        Failure::usage(format!("--mqtt-password-file {}: {e}", path.display()))
                    })?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            None => a.mqtt_password.clone(),
        };
        match (&a.mqtt_user, password) {
            (Some(user), password) => {
                builder = builder.credentials(user.clone(), password.unwrap_or_default());
            }
            (None, Some(_)) => {
                return Err(Failure::usage(
                    "an MQTT password needs a user: set OUTBOX_MQTT_USER",
                ))
            }
            (None, None) => {}
        }
        let sink = builder.connect().map_err(fail)?;
        let name = format!("mqtt {}", a.topic);
        return Ok((Arc::new(sink), name));
    }
    if let Some(url) = &a.nats {
        let mut builder = sqlite_outbox::sink::NatsJetStream::builder(url.clone())
            .subject(a.subject.clone())
            .format(format.clone())
            .ack_timeout(a.timeout);
        if let Some(path) = &a.nats_creds {
            builder = builder.credentials_file(path.clone());
        }
        if let Some(path) = &a.broker_ca {
            builder = builder.ca_file(path.clone());
        }
        if let Some(n) = a.batch {
            builder = builder.batch(n);
        }
        if let Some(token) = &a.nats_token {
            builder = builder.token(token.clone());
        }
        let sink = builder
            .connect()
            .map_err(|e| Failure::usage(format!("--nats: {}", describe(&e))))?;
        let target = format!("{sink:?}");
        let name = format!("nats {}", a.subject);
        tracing::debug!(sink = %target, "relaying to NATS JetStream");
        return Ok((Arc::new(sink), name));
    }
    match (&a.http, &a.exec) {
        (Some(url), _) => {
            let headers = collect_headers(a)?;
            let batch = (a.batch.unwrap_or(1), a.batch_bytes);
            let sink =
                http::sink(url, headers, a.timeout, format, batch).map_err(Failure::usage)?;
            let target = sink.endpoint();
            Ok((Arc::new(sink), target))
        }
        (None, Some(cmd)) => {
            let program = cmd.split_whitespace().next().unwrap_or("").to_owned();
            let h = exec::handler(
                cmd.clone(),
                a.permanent_exit_code,
                a.timeout,
                running.clone(),
            );
            Ok((
                Arc::new(h),
                format!("command {}", crate::text::terminal_safe(&program)),
            ))
        }
        (None, None) => Err(Failure::usage(
            "give --http URL, --nats URL, --mqtt URL or --exec CMD",
        )),
    }
}

/// `--format` and `--source`, checked.
fn format_of(a: &RelayArgs) -> Result<sqlite_outbox::sink::Format, Failure> {
    use sqlite_outbox::sink::Format;
    if a.source.is_empty() || a.source.chars().any(char::is_control) {
        return Err(Failure::usage("--source must be a URI reference"));
    }
    let source = a.source.clone();
    Ok(match a.format.as_str() {
        "cloudevents" => Format::CloudEvents { source },
        "cloudevents-binary" => Format::CloudEventsBinary { source },
        _ => Format::Envelope,
    })
}

/// Opens the outbox; a server that cannot be reached yet (restarting,
/// booting with the machine) is waited for, with backoff, said once,
/// until it answers or the relay is stopped (`None`). Anything the server
/// says (a wrong password, a missing database, a certificate that does not
/// verify) ends the relay at once.
fn open_when_up(
    db: &Db,
    a: &RelayArgs,
    stop: &AtomicBool,
) -> Result<Option<Arc<dyn Operator>>, Failure> {
    let mut pause = Duration::from_millis(250);
    let mut said = false;
    loop {
        match db.open_write_with(policy(a), true) {
            Ok(store) => {
                if said {
                    tracing::info!("the database answers; relaying");
                }
                return Ok(Some(store));
            }
            Err(failure) if matches!(db, Db::Server { .. }) && unreachable_server(&failure.0) => {
                if !said {
                    tracing::warn!(
                        error = %failure.0,
                        "the database cannot be reached; waiting for it"
                    );
                    said = true;
                }
            }
            Err(failure) => return Err(failure),
        }
        let until = Instant::now() + pause;
        while Instant::now() < until {
            if stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// Whether a failure to open says the server could not be reached (no
/// answer, refused, reset, timed out), rather than anything it said.
fn unreachable_server(message: &str) -> bool {
    message.contains("error connecting to server")
        || message.contains("timeout waiting for server")
        || message.contains("the database system is starting up")
        || message.contains("the database system is shutting down")
        || message.contains("connection closed")
}

/// The retry schedule: `--backoff` and `--max-attempts` over the default.
fn policy(a: &RelayArgs) -> RetryPolicy {
    let policy = if a.backoff.is_empty() {
        RetryPolicy::default()
    } else {
        RetryPolicy::from_schedule(a.backoff.iter().copied())
    };
    match a.max_attempts {
        Some(n) => policy.with_max_attempts(n),
        None => policy,
    }
}

/// A dispatcher that hands the chosen types (all when none were given) to
/// the delivery.
fn dispatcher(
    store: &Arc<dyn Operator>,
    a: &RelayArgs,
    handler: &Arc<DeliverFn>,
) -> DispatcherBuilder {
    let builder = Dispatcher::builder(store.clone() as Arc<dyn Store>)
        .workers(a.workers)
        .poll_interval(a.poll)
        .lease(a.lease)
        .name("relay");
    // One handler for every type, so that a batch may hold any of them.
    if a.types.is_empty() {
        builder.fallback_handler(Arc::clone(handler))
    } else {
        builder.handler_for(a.types.iter().cloned(), Arc::clone(handler))
    }
}

/// The last line (or JSON object) of a run.
fn print_summary(json_mode: bool, report: &ShutdownReport, waited: Option<&Backlog>) {
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

/// One delivery: over HTTP or to a command.
type DeliverFn = dyn Handler;

/// Shows progress on a terminal and, with `--drain`, waits until nothing is
/// left to do; returns the backlog it stopped on (`None` when stopped by a
/// signal).
fn watch(
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
