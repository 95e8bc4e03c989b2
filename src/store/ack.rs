//! Acknowledgements: what a worker says about an event it claimed, each
//! naming the lease it was claimed under.

use std::time::Duration;

use crate::event::Lease;

/// One acknowledgement about a claimed event, for [`crate::Store::settle`].
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    pub(crate) lease: Lease,
    pub(crate) kind: AckKind,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum AckKind {
    Complete,
    Retry {
        error: String,
        delay: Option<Duration>,
    },
    Fail {
        error: String,
    },
    Extend {
        by: Duration,
    },
    Release,
    Defer {
        error: String,
        delay: Duration,
    },
}

impl Ack {
    /// See [`crate::Store::complete`].
    pub fn complete(lease: Lease) -> Self {
        Ack {
            lease,
            kind: AckKind::Complete,
        }
    }

    /// See [`crate::Store::retry`].
    pub fn retry(lease: Lease, error: &str, delay: Option<Duration>) -> Self {
        Ack {
            lease,
            kind: AckKind::Retry {
                error: crate::event::capped_error(error),
                delay: delay.map(|d| d.min(crate::retry::MAX_RETRY_AFTER)),
            },
        }
    }

    /// See [`crate::Store::fail`].
    pub fn fail(lease: Lease, error: &str) -> Self {
        Ack {
            lease,
            kind: AckKind::Fail {
                error: crate::event::capped_error(error),
            },
        }
    }

    /// See [`crate::Store::extend`].
    pub fn extend(lease: Lease, by: Duration) -> Self {
        Ack {
            lease,
            kind: AckKind::Extend { by },
        }
    }

    /// See [`crate::Store::release`].
    pub fn release(lease: Lease) -> Self {
        Ack {
            lease,
            kind: AckKind::Release,
        }
    }

    /// Gives the event back as [`Ack::release`] does (its attempt not
    /// spent), due no sooner than `delay` from now (capped at
    /// [`crate::MAX_RETRY_AFTER`]), with `error` as its last error: its
    /// destination said it is busy and when to come back.
    pub fn defer(lease: Lease, error: &str, delay: Duration) -> Self {
        Ack {
            lease,
            kind: AckKind::Defer {
                error: crate::event::capped_error(error),
                delay: delay.min(crate::retry::MAX_RETRY_AFTER),
            },
        }
    }

    /// The lease this acknowledgement names.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }
}
