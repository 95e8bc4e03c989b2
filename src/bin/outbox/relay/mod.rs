//! `outbox relay`: deliver events over HTTP or to a command, as a service
//! (until SIGINT/SIGTERM) or as a batch (`--drain`).

mod args;
mod drain;
mod exec;
mod http;
mod metrics;

pub(crate) use args::RelayArgs;
use args::{collect_headers, format_of, policy};
use drain::{left_behind, print_summary, watch};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlite_outbox::{Dispatcher, DispatcherBuilder, Event, Handler, Operator, Store};

use crate::db::Db;
use crate::{describe, Failure};

/// The exit code of `--drain` when it stopped with events failed during the
/// run or retries still scheduled.
const EXIT_UNFINISHED: u8 = 3;

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
    let dispatcher = limits(dispatcher(&store, a, &handler), a, &target)
        .default_destination(target.clone())
        .start()
        .map_err(|e| Failure::usage(e.to_string()))?;
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
    if waited.is_none() {
        return Ok(());
    }
    let (waiting, why_waiting) = left_behind(store.as_ref(), types.as_deref()).map_err(fail)?;
    if let Some(held) = unreachable {
        return Err(Failure(
            format!(
                "{} is {} since {} ({}); {waiting} event(s) wait for a later run",
                held.name,
                held.hold.as_str(),
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
        builder.fallback_with(Arc::clone(handler))
    } else {
        builder.handle_types_with(a.types.iter().cloned(), Arc::clone(handler))
    }
}

/// `--concurrency`, `--rate` and `--shared-limits`: on event types, and a
/// rate without a type on the relay's one destination, `target`.
fn limits(mut builder: DispatcherBuilder, a: &RelayArgs, target: &str) -> DispatcherBuilder {
    use sqlite_outbox::{Limit, LimitScope};
    let shared = |l: Limit| {
        if a.shared_limits {
            l.across_dispatchers()
        } else {
            l
        }
    };
    for (event_type, n) in &a.concurrency {
        builder = builder.limit(shared(Limit::concurrency(LimitScope::Type, event_type, *n)));
    }
    for (event_type, n, per) in &a.rates {
        let limit = match event_type {
            Some(t) => Limit::rate(LimitScope::Type, t, *n, *per),
            None => Limit::rate(LimitScope::Destination, target, *n, *per),
        };
        builder = builder.limit(shared(limit));
    }
    builder
}

/// One delivery: over HTTP or to a command.
type DeliverFn = dyn Handler;
