//! The relay's arguments, and the checks and defaults made of them.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use sqlite_outbox::RetryPolicy;

use crate::{duration_arg, Failure};

#[derive(Args)]
pub(crate) struct RelayArgs {
    /// POST each event as JSON to this URL.
    #[arg(long, conflicts_with_all = ["exec", "nats", "mqtt"], required_unless_present_any = ["exec", "nats", "mqtt"])]
    pub(super) http: Option<String>,
    /// Publish each event to this MQTT 5 broker (mqtt://host:1883, or
    /// mqtts://host:8883 over TLS) at QoS 1; done on the broker's PUBACK.
    /// A user in OUTBOX_MQTT_USER and its password in OUTBOX_MQTT_PASSWORD
    /// or --mqtt-password-file.
    #[arg(long, conflicts_with_all = ["exec", "nats"], value_name = "URL")]
    pub(super) mqtt: Option<String>,
    /// The topic of each event, `{type}` standing for its type.
    #[arg(long, default_value = "outbox/{type}", requires = "mqtt")]
    pub(super) topic: String,
    /// A client id of the relay's own, which also keeps a persistent
    /// session across reconnects and restarts (default: a random id).
    #[arg(long, requires = "mqtt")]
    pub(super) mqtt_client_id: Option<String>,
    /// The MQTT user, from the environment only.
    #[arg(long = "mqtt-user-from-env", env = "OUTBOX_MQTT_USER", hide = true)]
    pub(super) mqtt_user: Option<String>,
    /// The MQTT password, from the environment only.
    #[arg(
        long = "mqtt-password-from-env",
        env = "OUTBOX_MQTT_PASSWORD",
        hide_env_values = true,
        hide = true
    )]
    pub(super) mqtt_password: Option<String>,
    /// A file whose first line is the MQTT password (instead of
    /// OUTBOX_MQTT_PASSWORD).
    #[arg(long, value_name = "PATH", requires = "mqtt")]
    pub(super) mqtt_password_file: Option<PathBuf>,
    /// Publish each event to NATS JetStream through this server
    /// (nats://host:4222, or tls://host:4222); done when a stream
    /// acknowledges it. A token in
    /// OUTBOX_NATS_TOKEN, or a credentials file in --nats-creds.
    #[arg(long, conflicts_with = "exec", value_name = "URL")]
    pub(super) nats: Option<String>,
    /// The subject of each event, `{type}` standing for its type.
    #[arg(long, default_value = "outbox.{type}", requires = "nats")]
    pub(super) subject: String,
    /// CA certificates (PEM) that the broker's certificate must chain to,
    /// for --nats and --mqtt over TLS (`tls://`, `mqtts://`; given, TLS is
    /// required). Default: the system's roots (NATS), Mozilla's (MQTT).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["http", "exec"])]
    pub(super) broker_ca: Option<PathBuf>,
    /// A NATS credentials file (user JWT and NKey seed).
    #[arg(long, value_name = "PATH", requires = "nats")]
    pub(super) nats_creds: Option<PathBuf>,
    /// A NATS token, from the environment only.
    #[arg(
        long = "nats-token-from-env",
        env = "OUTBOX_NATS_TOKEN",
        hide_env_values = true,
        hide = true
    )]
    pub(super) nats_token: Option<String>,
    /// Extra request header, `Name: value` (repeatable). Visible to other
    /// users in the process list: put secrets in --header-file or
    /// OUTBOX_HEADERS instead.
    #[arg(long = "header", requires = "http")]
    pub(super) headers: Vec<String>,
    /// A file of extra request headers, one `Name: value` per line (`#`
    /// starts a comment).
    #[arg(long, requires = "http")]
    pub(super) header_file: Option<PathBuf>,
    /// Extra request headers from the environment, one `Name: value` per line.
    #[arg(
        long = "headers-from-env",
        env = "OUTBOX_HEADERS",
        hide_env_values = true,
        hide = true
    )]
    pub(super) env_headers: Option<String>,
    /// With --http: up to this many events per request, as one JSON array
    /// (see the README for what the answer decides; default 1, one per
    /// request). With --nats and --mqtt: up to this many publishes in
    /// flight before their acks are awaited (default 256).
    #[arg(long, conflicts_with = "exec", value_parser = batch_count)]
    pub(super) batch: Option<usize>,
    /// With --http --batch: at most this many bytes of events per request
    /// (an event larger than this goes alone).
    #[arg(long, default_value = "1MiB", requires = "http", value_parser = byte_size)]
    pub(super) batch_bytes: usize,
    /// What is sent for each event over --http, --nats or --mqtt:
    /// `envelope` (the outbox's JSON), `cloudevents` (a CloudEvent in
    /// structured mode) or `cloudevents-binary` (the payload, with the
    /// attributes as headers or properties).
    #[arg(long, default_value = "envelope", value_parser = ["envelope", "cloudevents", "cloudevents-binary"])]
    pub(super) format: String,
    /// The CloudEvents `source` attribute (a URI reference).
    #[arg(long, default_value = sqlite_outbox::sink::DEFAULT_CLOUDEVENTS_SOURCE)]
    pub(super) source: String,
    /// HTTP request timeout, or how long --exec may run.
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    pub(super) timeout: Duration,
    /// Run this shell command per event, the event JSON on its stdin.
    #[arg(long)]
    pub(super) exec: Option<String>,
    /// Exit code of --exec that means "never retry".
    #[arg(long, default_value_t = 65)]
    pub(super) permanent_exit_code: i32,
    /// Only these event types (repeatable; default: all).
    #[arg(long = "type")]
    pub(super) types: Vec<String>,
    /// Stop once nothing is due and nothing is in flight. Exit status 0 if
    /// every event was delivered, 3 if some failed during the run or
    /// retries are still scheduled.
    #[arg(long)]
    pub(super) drain: bool,
    /// With --drain: also wait for retries that fall due within this long.
    #[arg(long, value_parser = duration_arg, requires = "drain")]
    pub(super) wait_retries: Option<Duration>,
    /// Parallel deliveries.
    #[arg(long, default_value_t = 4)]
    pub(super) workers: usize,
    /// At most N deliveries of event type TYPE at once, `TYPE=N`
    /// (repeatable). Events past the limit wait, pending, spending no
    /// attempt.
    #[arg(long = "concurrency", value_name = "TYPE=N", value_parser = concurrency_arg)]
    pub(super) concurrency: Vec<(String, u32)>,
    /// At most N deliveries started per interval, `N/INTERVAL` (10/s,
    /// 600/1m, 5/500ms) for the endpoint, or `TYPE=N/INTERVAL` for one
    /// event type (repeatable). Events past the limit wait, pending,
    /// spending no attempt.
    #[arg(long = "rate", value_name = "[TYPE=]N/INTERVAL", value_parser = rate_arg)]
    pub(super) rates: Vec<(Option<String>, u32, Duration)>,
    /// Keep --concurrency and --rate across every relay and dispatcher on
    /// this outbox together, instead of per relay.
    #[arg(long)]
    pub(super) shared_limits: bool,
    /// How long a claimed event is held (renewed while its delivery runs);
    /// events held by a relay that was killed are claimed again after it.
    #[arg(long, default_value = "60s", value_parser = duration_arg)]
    pub(super) lease: Duration,
    /// Retry delays, e.g. 1s,10s,1m (the last repeats). Default: the
    /// standard schedule (30s, 2m, 10m, ... 24h).
    #[arg(long, value_delimiter = ',', value_parser = duration_arg)]
    pub(super) backoff: Vec<Duration>,
    /// Attempts before an event fails, for events enqueued without their own.
    #[arg(long)]
    pub(super) max_attempts: Option<u32>,
    /// How often to look for events committed by other programs.
    #[arg(long, default_value = "500ms", value_parser = duration_arg)]
    pub(super) poll: Duration,
    /// How long in-flight deliveries may finish after SIGINT/SIGTERM.
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    pub(super) grace: Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics: deliveries,
    /// retries, failures, handler run times, and the outbox's counts.
    #[arg(long, value_name = "ADDR")]
    pub(super) metrics: Option<std::net::SocketAddr>,
    /// More log lines on stderr (-v: debug, -vv: trace). RUST_LOG, when
    /// set, decides instead.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub(super) verbose: u8,
}

/// `--concurrency TYPE=N`.
pub(super) fn concurrency_arg(text: &str) -> Result<(String, u32), String> {
    let bad = || "a concurrency limit is TYPE=N, N from 1, like email.send=2".to_owned();
    let (name, n) = text.rsplit_once('=').ok_or_else(bad)?;
    let n: u32 = n.trim().parse().ok().filter(|n| *n >= 1).ok_or_else(bad)?;
    if name.is_empty() || name.len() > 200 {
        return Err(bad());
    }
    Ok((name.to_owned(), n))
}

/// `--rate [TYPE=]N/INTERVAL`: N from 1, the interval a duration (`s` is
/// one second, `1m` one minute).
pub(super) fn rate_arg(text: &str) -> Result<(Option<String>, u32, Duration), String> {
    let bad = || "a rate is N/INTERVAL or TYPE=N/INTERVAL, like 10/s or api.call=600/1m".to_owned();
    let (name, rate) = match text.rsplit_once('=') {
        Some((name, rate)) if !name.is_empty() && name.len() <= 200 => {
            (Some(name.to_owned()), rate)
        }
        Some(_) => return Err(bad()),
        None => (None, text),
    };
    let (n, per) = rate.split_once('/').ok_or_else(bad)?;
    let n: u32 = n.trim().parse().ok().filter(|n| *n >= 1).ok_or_else(bad)?;
    let per = per.trim();
    let per = if per.starts_with(|c: char| c.is_ascii_digit()) {
        duration_arg(per)?
    } else {
        duration_arg(&format!("1{per}"))?
    };
    if per < Duration::from_millis(1) {
        return Err(bad());
    }
    Ok((name, n, per))
}

/// `--batch`: from 1 to 10,000 events.
pub(super) fn batch_count(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(n),
        _ => Err("a batch holds from 1 to 10000 events".to_owned()),
    }
}

/// A size in bytes: a number, with `KiB`, `MiB`, `KB` or `MB` after it
/// if wanted, from 1 KiB to 64 MiB.
pub(super) fn byte_size(text: &str) -> Result<usize, String> {
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

/// `Name: value` lines from --header, --header-file and OUTBOX_HEADERS.
pub(super) fn collect_headers(a: &RelayArgs) -> Result<Vec<(String, String)>, Failure> {
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
            if !sqlite_outbox::sink::is_valid_header(name, value) {
                return Err(bad());
            }
            Ok((name.to_owned(), value.to_owned()))
        })
        .collect()
}

/// `--format` and `--source`, checked.
pub(super) fn format_of(a: &RelayArgs) -> Result<sqlite_outbox::sink::Format, Failure> {
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

/// The retry schedule: `--backoff` and `--max-attempts` over the default.
pub(super) fn policy(a: &RelayArgs) -> RetryPolicy {
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
