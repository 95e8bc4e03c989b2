//! Wake-ups from other processes: a thread per store that `LISTEN`s on the
//! schema's channel, which every committed insert notifies (the trigger in
//! `schema.postgres.sql`), and wakes this process's dispatchers at once.
//! It only hastens pickup: dispatchers also look at every poll interval,
//! whatever it hears, since a connection can go silent without an error.
//! Keepalives and a TCP user timeout (set by [`super::PostgresTarget`])
//! end such a connection within about a minute, and the thread reconnects.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;

use super::PostgresTarget;
use crate::store::Notifier;

/// How often the thread looks whether its store is gone.
const TICK: Duration = Duration::from_millis(500);

/// The longest pause between attempts to reconnect.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct State {
    /// The store is gone: the thread ends.
    stop: AtomicBool,
}

pub(super) struct Listener {
    target: Arc<PostgresTarget>,
    channel: String,
    notifier: Arc<Notifier>,
    state: Arc<State>,
    started: Once,
}

impl Listener {
    pub(super) fn new(target: Arc<PostgresTarget>, schema: &str, notifier: Arc<Notifier>) -> Self {
        Listener {
            target,
            channel: format!("outbox_{schema}"),
            notifier,
            state: Arc::new(State {
                stop: AtomicBool::new(false),
            }),
            started: Once::new(),
        }
    }

    /// The channel the schema's inserts notify.
    pub(super) fn channel(&self) -> &str {
        &self.channel
    }

    /// Starts the thread, once.
    pub(super) fn ensure_running(&self) {
        self.started.call_once(|| {
            let (target, channel, notifier, state) = (
                Arc::clone(&self.target),
                self.channel.clone(),
                self.notifier.clone(),
                self.state.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name("outbox-listen".into())
                .spawn(move || listen_loop(&target, &channel, &notifier, &state));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "outbox cannot start its PostgreSQL listener; polling instead");
            }
        });
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
    }
}

fn listen_loop(target: &PostgresTarget, channel: &str, notifier: &Notifier, state: &State) {
    let mut backoff = Duration::from_millis(250);
    let mut was_down = false;
    while !state.stop.load(Ordering::SeqCst) {
        let mut client = match target.connect() {
            Ok(c) => c,
            Err(e) => {
                if !was_down {
                    tracing::warn!(error = %e, "outbox lost its PostgreSQL listener; polling until it reconnects");
                    was_down = true;
                }
                sleep_unless_stopped(state, backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if let Err(e) = client.batch_execute(&format!("LISTEN {channel}")) {
            tracing::warn!(error = %e, "outbox cannot LISTEN on PostgreSQL; polling instead");
            sleep_unless_stopped(state, backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        if was_down {
            tracing::info!("outbox's PostgreSQL listener is back");
            was_down = false;
        }
        backoff = Duration::from_millis(250);
        // Whatever was committed while not listening is looked at once.
        notifier.wake();
        while !state.stop.load(Ordering::SeqCst) {
            let mut notices = client.notifications();
            let next = notices.timeout_iter(TICK).next();
            match next {
                Ok(None) => {}
                Ok(Some(_)) => {
                    // Take every notice already here, then wake once.
                    while let Ok(Some(_)) = notices.iter().next() {}
                    notifier.wake();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox lost its PostgreSQL listener; polling until it reconnects");
                    was_down = true;
                    break;
                }
            }
        }
    }
}

fn sleep_unless_stopped(state: &State, pause: Duration) {
    let mut left = pause;
    while !left.is_zero() && !state.stop.load(Ordering::SeqCst) {
        let step = left.min(TICK);
        std::thread::sleep(step);
        left -= step;
    }
}
