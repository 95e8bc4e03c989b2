//! Starting the dispatcher: its context, its threads, and the
//! supervision that restarts a thread's loop after a panic.

use super::*;

fn spawn<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|e| Error::with_source(crate::ErrorKind::Io, e))
}

/// The pause after the next panic of a supervised loop: twice the last,
/// at most 5 s.
fn next_pause(last: Duration) -> Duration {
    (last * 2).min(Duration::from_secs(5))
}

/// Runs a thread's loop, restarting it when it panics: the panic is
/// counted, logged, and followed by a growing pause, so a loop that panics
/// at once every time cannot spin. Returns once the loop returns.
fn supervise(ctx: &Ctx, thread: &str, mut body: impl FnMut()) {
    let mut pause_for = Duration::from_millis(50);
    loop {
        match catch_unwind(AssertUnwindSafe(&mut body)) {
            Ok(()) => return,
            Err(payload) => {
                Counters::add(&ctx.counters.thread_panics, 1);
                let message = panic_message(&*payload);
                let _ = catch_unwind(AssertUnwindSafe(|| {
                    tracing::error!(thread, panic = %message, "outbox thread panicked; restarting it");
                }));
                if ctx.shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(pause_for);
                pause_for = next_pause(pause_for);
            }
        }
    }
}

pub(crate) fn start(b: DispatcherBuilder) -> Result<Dispatcher> {
    let (store, name, workers_n, shutdown_timeout) = (
        b.store.clone(),
        b.name.clone(),
        b.workers,
        b.shutdown_timeout,
    );
    let ctx = context(b)?;
    let (counters, shared, types, capacity, destinations) = (
        ctx.counters.clone(),
        ctx.shared.clone(),
        ctx.types.clone(),
        ctx.capacity,
        ctx.destinations.clone(),
    );
    let limits = ctx.limits.clone();

    let (jobs_tx, jobs_rx) = bounded::<Event>(capacity);
    *shared.jobs() = Some(jobs_tx.clone());
    let (outcomes_tx, outcomes_rx) = unbounded::<Outcome>();
    let (wake_tx, wake_rx) = bounded::<()>(1);
    let (nudge_tx, nudge_rx) = bounded::<()>(1);
    let (stop_poller_tx, stop_poller_rx) = bounded::<()>(1);
    let (stop_heartbeat_tx, stop_heartbeat_rx) = bounded::<()>(1);
    let (flush_tx, flush_rx) = bounded::<Instant>(1);
    let (worker_exit_tx, worker_exit_rx) = unbounded::<()>();
    let store_wake_rx = store.subscribe();

    let workers = spawn_workers(
        &name,
        workers_n,
        &ctx,
        jobs_rx,
        &outcomes_tx,
        worker_exit_tx,
    )?;

    let completer = {
        let ctx = ctx.clone();
        spawn(format!("{name}-completer"), move || {
            completer_loop(&ctx, &outcomes_rx, &flush_rx, &nudge_tx)
        })?
    };
    drop(outcomes_tx);

    let heartbeat = {
        let ctx = ctx.clone();
        spawn(format!("{name}-heartbeat"), move || {
            supervise(&ctx, "heartbeat", || {
                heartbeat_loop(&ctx, &stop_heartbeat_rx)
            });
        })?
    };

    let poller = {
        let ctx = ctx.clone();
        spawn(format!("{name}-poller"), move || {
            supervise(&ctx, "poller", || {
                poll_loop(
                    &ctx,
                    &jobs_tx,
                    &wake_rx,
                    &store_wake_rx,
                    &nudge_rx,
                    &stop_poller_rx,
                );
            });
            // Workers see the queue close and exit (once a claim the
            // completer may be making is queued).
            ctx.shared.jobs().take();
            drop(jobs_tx);
        })?
    };

    let policy = store.retry_policy().clone();
    Ok(Dispatcher {
        policy,
        runtime: Some(Runtime {
            store,
            types,
            limits,
            counters,
            destinations,
            shared,
            wake_tx,
            stop_poller_tx,
            stop_heartbeat_tx,
            flush_tx,
            poller: Some(poller),
            heartbeat: Some(heartbeat),
            workers,
            worker_exit_rx,
            completer: Some(completer),
        }),
        shutdown_timeout,
    })
}

/// What every thread of one dispatcher shares, from its builder.
fn context(b: DispatcherBuilder) -> Result<Ctx> {
    let types: Option<Arc<[String]>> = if b.fallback.is_some() {
        None
    } else {
        let mut t: Vec<String> = b.handlers.keys().cloned().collect();
        t.sort();
        Some(t.into())
    };
    // A handler of batches gets full ones only if a claim can fill them.
    let widest = b
        .handlers
        .values()
        .chain(b.fallback.as_ref())
        .map(|h| h.batch_limit().clamp(1, MAX_HANDLER_BATCH))
        .max()
        .unwrap_or(1);
    let batch_size = b.batch_size.max(widest);
    let destinations = Arc::new(Destinations::new(
        b.routes,
        b.default_destination,
        b.store.clone(),
    ));
    let limits = Arc::new(crate::dispatch::limits::Limits::new(
        b.limits,
        &destinations,
        types.as_deref(),
    )?);
    limits.record_all(&*b.store, b.store.clock().now());
    #[cfg(feature = "metrics")]
    Counters::describe();
    Ok(Ctx {
        destinations,
        limits,
        store: b.store,
        counters: Arc::new(Counters::default()),
        shared: Arc::new(Shared {
            stopping: AtomicBool::new(false),
            inflight: Mutex::new(HashMap::new()),
            claiming: Mutex::new(()),
            jobs: Mutex::new(None),
            pacer: pace::Pacer::default(),
            halted: Mutex::new(None),
        }),
        handlers: Arc::new(b.handlers),
        fallback: b.fallback,
        types,
        lease: b.lease,
        max_run_time: b.max_run_time,
        max_age: b.max_age,
        batch_size,
        // Claimed events wait in the queue or run: what the workers run
        // (one each, or a handler's batch), and two claims, so that the
        // workers have one to run while the outcomes of the other are
        // written and its room claimed again.
        capacity: b.workers * widest + 2 * batch_size,
        poll_interval: b.poll_interval,
    })
}

/// Starts `n` workers on the job queue; each reports on `exit_tx` when its
/// thread ends, however it ends.
fn spawn_workers(
    name: &str,
    n: usize,
    ctx: &Ctx,
    jobs_rx: Receiver<Event>,
    outcomes_tx: &Sender<Outcome>,
    exit_tx: Sender<()>,
) -> Result<Vec<JoinHandle<()>>> {
    let mut workers = Vec::with_capacity(n);
    for i in 0..n {
        let (ctx, jobs_rx, outcomes_tx, exit_tx) = (
            ctx.clone(),
            jobs_rx.clone(),
            outcomes_tx.clone(),
            exit_tx.clone(),
        );
        workers.push(spawn(format!("{name}-worker-{i}"), move || {
            let _exited = OnDrop(Some(move || {
                let _ = exit_tx.send(());
            }));
            supervise(&ctx, "worker", || worker_loop(&ctx, &jobs_rx, &outcomes_tx));
        })?);
    }
    Ok(workers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_after_panics_slow_down_to_five_seconds() {
        let mut pause = Duration::from_millis(50);
        let mut seen = Vec::new();
        for _ in 0..9 {
            pause = next_pause(pause);
            seen.push(pause.as_millis());
        }
        assert_eq!(
            seen,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000],
            "a loop that panics every time cannot spin"
        );
    }
}
