//! `outbox relay --exec`: run a shell command per event, the event's JSON on
//! its stdin. The command runs in a process group of its own, so that a
//! timeout or a shutdown ends everything it started, not only the shell:
//! a script left running would deliver late while the event is retried.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use sqlite_outbox::text::format_duration;
use sqlite_outbox::{Event, HandlerError};

use super::delivery_json;
use crate::text::excerpt;

/// The outbox's own secrets, which a command never inherits: the database
/// (a connection string may hold a password), the relay's HTTP headers and
/// the dashboard's token.
const WITHHELD: &[&str] = &[
    "OUTBOX_DB",
    "OUTBOX_HEADERS",
    crate::ui::TOKEN_ENV,
    "OUTBOX_NATS_TOKEN",
    "OUTBOX_MQTT_USER",
    "OUTBOX_MQTT_PASSWORD",
];

/// How much of a command's stderr is kept for the event's last error; the
/// rest is read and dropped, so a chatty command never blocks on a full
/// pipe.
const STDERR_KEPT: usize = 64 * 1024;

/// How long to wait for a killed or finished command's stderr to close
/// (a grandchild that left the group may hold it open).
const STDERR_GRACE: Duration = Duration::from_secs(1);

/// The process groups of the commands running now.
#[derive(Debug, Default)]
pub(crate) struct Running(Mutex<HashSet<i32>>);

impl Running {
    fn groups(&self) -> MutexGuard<'_, HashSet<i32>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Kills every running command's whole process group; returns how many.
    pub(crate) fn kill_all(&self) -> usize {
        let groups: Vec<i32> = self.groups().drain().collect();
        for &g in &groups {
            let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
        }
        groups.len()
    }
}

pub(crate) fn handler(
    cmd: String,
    permanent: i32,
    timeout: Duration,
    running: Arc<Running>,
) -> impl Fn(&Event) -> Result<(), HandlerError> {
    move |event: &Event| {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new("sh");
        for name in WITHHELD {
            command.env_remove(name);
        }
        // The W3C name for trace context in a child's environment.
        match event
            .traceparent
            .as_deref()
            .filter(|t| sqlite_outbox::trace::is_valid_traceparent(t))
        {
            Some(tp) => command.env("TRACEPARENT", tp),
            None => command.env_remove("TRACEPARENT"),
        };
        let mut child = command
            .arg("-c")
            .arg(&cmd)
            .env("OUTBOX_EVENT_ID", event.id.to_string())
            .env("OUTBOX_EVENT_TYPE", &event.event_type)
            .env("OUTBOX_ATTEMPT", event.attempts.to_string())
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| HandlerError::retry(format!("cannot run {cmd:?}: {e}")))?;
        let group = i32::try_from(child.id()).unwrap_or(i32::MAX);
        running.groups().insert(group);
        let result = supervise(&mut child, group, event, permanent, timeout);
        running.groups().remove(&group);
        result
    }
}

/// Feeds the command, drains its stderr, and waits for it up to `timeout`,
/// each on its own so that none can block the others.
fn supervise(
    child: &mut Child,
    group: i32,
    event: &Event,
    permanent: i32,
    timeout: Duration,
) -> Result<(), HandlerError> {
    if let Some(mut stdin) = child.stdin.take() {
        let body = delivery_json(event).to_string();
        // A command that never reads its input only leaves this thread
        // blocked until the command ends (the pipe then breaks).
        std::thread::spawn(move || {
            let _ = stdin.write_all(body.as_bytes());
        });
    }
    let (stderr_tx, stderr_rx) = crossbeam_channel::bounded(1);
    if let Some(mut stderr) = child.stderr.take() {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut chunk = [0u8; 8192];
            loop {
                match stderr.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let room = STDERR_KEPT.saturating_sub(kept.len());
                        kept.extend_from_slice(&chunk[..n.min(room)]);
                    }
                }
            }
            let _ = stderr_tx.send(kept);
        });
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = killpg(Pid::from_raw(group), Signal::SIGKILL);
                let _ = child.wait();
                return Err(HandlerError::retry(format!(
                    "timed out after {}; the command and everything it started were killed",
                    format_duration(timeout)
                )));
            }
            Err(e) => {
                let _ = killpg(Pid::from_raw(group), Signal::SIGKILL);
                let _ = child.wait();
                return Err(HandlerError::retry(format!("waiting for the command: {e}")));
            }
        }
    };
    let stderr = stderr_rx.recv_timeout(STDERR_GRACE).unwrap_or_default();
    let said = excerpt(&String::from_utf8_lossy(&stderr), 500);
    match status.code() {
        Some(0) => Ok(()),
        Some(code) if code == permanent => {
            Err(HandlerError::permanent(format!("exit {code}: {said}")))
        }
        Some(code) => Err(HandlerError::retry(format!("exit {code}: {said}"))),
        None => Err(HandlerError::retry(format!("killed by a signal: {said}"))),
    }
}
