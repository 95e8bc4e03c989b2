//! Building a [`PostgresStore`]: where to connect, which schema, and the
//! pool, the migration and the listener that come with it.

use super::*;

/// Builds a [`PostgresStore`]: where to connect, which schema, and the
/// store's clock and retry policy.
pub struct PostgresStoreBuilder {
    url: String,
    schema: String,
    pool_size: u32,
    connect_timeout: Duration,
    clock: Arc<dyn Clock>,
    policy: RetryPolicy,
    create: bool,
    read_only: bool,
}

impl fmt::Debug for PostgresStoreBuilder {
    /// The connection string as [`PostgresTarget`] shows it: never its
    /// password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = PostgresTarget::parse(&self.url).map_or_else(
            |_| "(a connection string that cannot be read)".into(),
            |t| t.to_string(),
        );
        f.debug_struct("PostgresStoreBuilder")
            .field("target", &target)
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("policy", &self.policy)
            .field("create", &self.create)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// A builder for a store at `url`.
    pub fn builder(url: &str) -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            url: url.to_owned(),
            schema: DEFAULT_POSTGRES_SCHEMA.to_owned(),
            pool_size: 8,
            connect_timeout: Duration::from_secs(10),
            clock: Arc::new(SystemClock),
            policy: RetryPolicy::default(),
            create: true,
            read_only: false,
        }
    }
}

impl PostgresStoreBuilder {
    /// Whether to create the outbox's objects when the schema holds none.
    /// Default: true. With false, a schema without an outbox (a mistyped
    /// name, say) is a `NotAnOutbox` error, and nothing is created.
    pub fn create(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// Open without changing anything: no DDL (a missing or older outbox
    /// is an error, not created or migrated), and every connection's
    /// transactions are read-only (`default_transaction_read_only`), so
    /// the server refuses any write. Default: false.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// The schema that holds the outbox's objects (created if missing):
    /// lowercase ASCII letters, digits and `_`, starting with a letter or
    /// `_`, at most 40 characters. Default: `outbox`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Connections in the pool. Default: 8.
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size;
        self
    }

    /// The longest to wait for a connection, from the pool or the server.
    /// Default: 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The clock that times are taken from. Default: the system clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The retry policy for failed attempts.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Connects, and creates the outbox's objects in the schema if they are
    /// missing (in one transaction, under an advisory lock, so processes
    /// that start together create them once).
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a URL or schema name that cannot be used;
    /// `Postgres` when the server cannot be reached or refuses; `SchemaTooNew`
    /// when the schema holds an outbox written by a newer build;
    /// `NotAnOutbox` when it holds an `outbox_events` table that is not one.
    pub fn build(self) -> Result<PostgresStore> {
        migrate::check_schema_name(&self.schema)?;
        let mut target = PostgresTarget::parse(&self.url)?;
        if target.config().get_connect_timeout().is_none() {
            target.config_mut().connect_timeout(self.connect_timeout);
        }
        if self.read_only {
            let options = match target.config().get_options() {
                Some(o) if !o.trim().is_empty() => {
                    format!("{o} -c default_transaction_read_only=on")
                }
                _ => "-c default_transaction_read_only=on".to_owned(),
            };
            target.config_mut().options(&options);
        }
        let mode = match (self.read_only, self.create) {
            (true, _) => migrate::Mode::ReadOnly,
            (false, true) => migrate::Mode::Create,
            (false, false) => migrate::Mode::Existing,
        };
        let target = Arc::new(target);
        let manager = conn::Manager {
            target: Arc::clone(&target),
        };
        let pool = r2d2::Pool::builder()
            .max_size(self.pool_size.max(1))
            .min_idle(Some(0))
            // A dropped connection fails its next statement (which the
            // caller retries) and is then discarded: no test query per
            // checkout.
            .test_on_check_out(false)
            .connection_timeout(self.connect_timeout)
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(manager);
        // The first connection is made directly: a server that is not
        // there is reported at once, with its cause, not after the pool's
        // timeout.
        let mut client = target.connect()?;
        migrate::migrate(&mut client, &self.schema, mode)?;
        drop(client);
        let notifier = Arc::new(Notifier::default());
        let listener = listen::Listener::new(Arc::clone(&target), &self.schema, notifier.clone());
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                pool,
                sql: Sql::new(&self.schema),
                schema: self.schema,
                target,
                clock: self.clock,
                policy: self.policy,
                notifier,
                listener,
            }),
        })
    }
}

pub(super) fn pool_error(err: &r2d2::Error) -> Error {
    Error::with_source(ErrorKind::Pool, err.to_string())
}
