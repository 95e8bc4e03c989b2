//! Enqueueing on PostgreSQL: in the caller's transaction or the store's
//! own, one statement for a batch, idempotency keys honoured.

use super::*;

impl PostgresStore {
    /// Adds an event through the caller's client or transaction: inside a
    /// `postgres::Transaction` it commits or rolls back with the app's own
    /// writes. Dispatchers anywhere are woken when it commits.
    ///
    /// # Errors
    ///
    /// `InvalidInput` before anything is written for an invalid event;
    /// database errors from the insert (which leave the caller's
    /// transaction aborted, as any failed statement does).
    pub fn enqueue_tx(&self, client: &mut impl GenericClient, event: NewEvent) -> Result<Event> {
        let mut stored = self.enqueue_batch_tx(client, vec![event])?;
        stored
            .pop()
            .ok_or_else(|| Error::invalid("nothing was enqueued"))
    }

    /// Adds many events through the caller's client or transaction.
    /// Inside a transaction they join it; on a bare client they get one of
    /// their own, all or none.
    ///
    /// # Errors
    ///
    /// As [`PostgresStore::enqueue_tx`]; one invalid event rejects them all.
    pub fn enqueue_batch_tx(
        &self,
        client: &mut impl GenericClient,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Event>> {
        let mut run = |sql: &str, p: &[(&(dyn postgres::types::ToSql + Sync), Type)]| {
            client.query_typed(sql, p)
        };
        self.enqueue_with(&mut run, events)
    }

    /// Checks `events`, then inserts them through `run` in one statement
    /// (all or none, in order), and wakes dispatchers in this process.
    pub(super) fn enqueue_with(
        &self,
        run: &mut TypedQuery<'_>,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Event>> {
        let payloads = events
            .iter()
            .map(NewEvent::checked_payload)
            .collect::<Result<Vec<_>>>()?;
        let now = self.now();
        let stored = if events.len() == 1 {
            events
                .into_iter()
                .zip(&payloads)
                .map(|(event, payload)| self.insert(run, event, payload, now))
                .collect::<Result<Vec<_>>>()?
        } else {
            self.insert_all(run, events, &payloads, now)?
        };
        self.inner.notifier.notify();
        Ok(stored)
    }

    /// Inserts checked events in one statement (all or none, in order) and
    /// returns them as stored.
    pub(super) fn insert_all(
        &self,
        run: &mut TypedQuery<'_>,
        events: Vec<NewEvent>,
        payloads: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<Event>> {
        let policy = &self.inner.policy;
        let col =
            |f: &dyn Fn(&NewEvent) -> Option<String>| events.iter().map(f).collect::<Vec<_>>();
        let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.id.as_uuid()).collect();
        let types = col(&|e| Some(e.event_type.clone()));
        let max: Vec<i64> = events
            .iter()
            .map(|e| i64::from(e.max_attempts.unwrap_or_else(|| policy.max_attempts())))
            .collect();
        let due: Vec<i64> = events
            .iter()
            .map(|e| clock::to_millis(e.due_at(now)))
            .collect();
        let correlation = col(&|e| e.correlation_id.clone());
        let orgs: Vec<Option<uuid::Uuid>> = events.iter().map(|e| e.org_id).collect();
        let users: Vec<Option<uuid::Uuid>> = events.iter().map(|e| e.user_id).collect();
        let keys = col(&|e| e.ordering_key.clone());
        let idem = col(&|e| e.idempotency_key.clone());
        let traces = col(&|e| e.traceparent.clone());
        let priorities: Vec<i16> = events.iter().map(|e| i16::from(e.priority)).collect();
        let created = clock::to_millis(now);
        let rows = run(
            &self.inner.sql.insert_all,
            &[
                (&ids, Type::UUID_ARRAY),
                (&types, Type::TEXT_ARRAY),
                (&payloads, Type::TEXT_ARRAY),
                (&max, Type::INT8_ARRAY),
                (&due, Type::INT8_ARRAY),
                (&correlation, Type::TEXT_ARRAY),
                (&orgs, Type::UUID_ARRAY),
                (&users, Type::UUID_ARRAY),
                (&keys, Type::TEXT_ARRAY),
                (&idem, Type::TEXT_ARRAY),
                (&created, Type::INT8),
                (&traces, Type::TEXT_ARRAY),
                (&priorities, Type::INT2_ARRAY),
            ],
        )
        .map_err(|e| not_stored(e, "an event"))?;
        let seqs: std::collections::HashMap<uuid::Uuid, i64> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut stored = Vec::with_capacity(events.len());
        for (event, payload) in events.into_iter().zip(payloads) {
            if let Some(&seq) = seqs.get(&event.id.as_uuid()) {
                stored.push(event.into_stored(seq, now, policy, payload.clone()));
                continue;
            }
            // Its idempotency key is taken (perhaps by an earlier event of
            // this batch): the event that holds it.
            let existing = run(
                &self.inner.sql.select_by_key,
                &[(&event.idempotency_key, Type::TEXT)],
            )?;
            match existing.first() {
                Some(row) => stored.push(decode(row).0),
                None => {
                    return Err(Error::invalid(
                        "idempotency conflict without a stored event",
                    ))
                }
            }
        }
        Ok(stored)
    }

    /// Inserts one checked event through `run` (a typed query: one round
    /// trip, on any client) and returns it as stored.
    pub(super) fn insert(
        &self,
        run: &mut TypedQuery<'_>,
        event: NewEvent,
        payload: &str,
        now: DateTime<Utc>,
    ) -> Result<Event> {
        let policy = &self.inner.policy;
        let max_attempts = i64::from(event.max_attempts.unwrap_or_else(|| policy.max_attempts()));
        let priority = i16::from(event.priority);
        let (id, due, created) = (
            event.id.as_uuid(),
            clock::to_millis(event.due_at(now)),
            clock::to_millis(now),
        );
        let inserted = run(
            &self.inner.sql.insert,
            &[
                (&id, Type::UUID),
                (&event.event_type, Type::TEXT),
                (&payload, Type::TEXT),
                (&max_attempts, Type::INT8),
                (&due, Type::INT8),
                (&event.correlation_id, Type::TEXT),
                (&event.org_id, Type::UUID),
                (&event.user_id, Type::UUID),
                (&event.ordering_key, Type::TEXT),
                (&event.idempotency_key, Type::TEXT),
                (&created, Type::INT8),
                (&event.traceparent, Type::TEXT),
                (&priority, Type::INT2),
            ],
        );
        let inserted = inserted.map_err(|e| not_stored(e, &format!("event {}", event.id)))?;
        if let Some(row) = inserted.first() {
            return Ok(event.into_stored(row.get(0), now, policy, payload.to_owned()));
        }
        // The idempotency key is taken: return the event that holds it.
        let existing = run(
            &self.inner.sql.select_by_key,
            &[(&event.idempotency_key, Type::TEXT)],
        )?;
        match existing.first() {
            Some(row) => Ok(decode(row).0),
            None => Err(Error::invalid(
                "idempotency conflict without a stored event",
            )),
        }
    }
}

/// An insert the server refused: invalid input when the data was at fault
/// (`what` names the event), else the error as it is.
fn not_stored(e: postgres::Error, what: &str) -> Error {
    match e.code() {
        Some(c) if is_invalid_data(c) || *c == postgres::error::SqlState::UNIQUE_VIOLATION => {
            Error::with_source(
                ErrorKind::InvalidInput {
                    reason: format!("{what} could not be stored (duplicate id or invalid field)"),
                },
                e,
            )
        }
        _ => Error::from(e),
    }
}

/// Data the server refused as invalid: a check constraint, a NUL byte in
/// text, a value out of range.
pub(super) fn is_invalid_data(code: &postgres::error::SqlState) -> bool {
    use postgres::error::SqlState as S;
    *code == S::CHECK_VIOLATION || *code == S::NOT_NULL_VIOLATION || code.code().starts_with("22")
}
