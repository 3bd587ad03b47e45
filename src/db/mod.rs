//! Storage: one diesel connection type over PostgreSQL (production) and SQLite (embedded
//! default), an r2d2 pool that picks the backend from the URL scheme, and embedded migrations.
//!
//! diesel is synchronous: callers go through [`Db::run`], which moves the work onto tokio's
//! blocking pool, never onto an actix worker thread.

pub mod notify;
pub mod schema;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{self, ManageConnection, Pool, PooledConnection};
use diesel::{PgConnection, SqliteConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    Postgresql(PgConnection),
    Sqlite(SqliteConnection),
}

/// Runs the same query expression on whichever backend the connection is. For the few
/// diesel features that do not compile on the multi-connection (upserts, batch inserts).
#[macro_export]
macro_rules! on_backend {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::db::DbConnection::Postgresql($c) => $body,
            $crate::db::DbConnection::Sqlite($c) => $body,
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database url {0:?} must start with postgres:// or sqlite://")]
    UnknownScheme(String),
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    #[error("cannot create the SQLite directory {0}: {1}")]
    Directory(String, std::io::Error),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("database pool: {0}")]
    Pool(String),
    #[error("database query: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("database task was cancelled")]
    Cancelled,
}

/// Runs `work` in a transaction meant to write.
///
/// On SQLite the transaction starts with `BEGIN IMMEDIATE`, taking the write lock up front. A
/// plain (deferred) transaction that reads and then writes cannot wait for a concurrent writer:
/// SQLite refuses the upgrade at once with "database is locked", busy timeout or not, because
/// the snapshot it read may be stale. Nested calls become savepoints as usual.
pub fn write_transaction<T, E, F>(conn: &mut DbConnection, work: F) -> Result<T, E>
where
    F: FnOnce(&mut DbConnection) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    use diesel::connection::AnsiTransactionManager;
    let DbConnection::Sqlite(sqlite) = conn else {
        return conn.transaction(work);
    };
    match AnsiTransactionManager::begin_transaction_sql(sqlite, "BEGIN IMMEDIATE") {
        Ok(()) => {}
        Err(diesel::result::Error::AlreadyInTransaction) => return conn.transaction(work),
        Err(e) => return Err(e.into()),
    }
    let result = work(conn);
    end_transaction(conn, result)
}

/// [`write_transaction`] that on PostgreSQL sends `opening` (statements to run first, such as
/// taking a lock) in the same round trip as its `BEGIN`: one wait for the server instead of
/// two. `work` learns whether they ran: not on SQLite, and not when the connection was already
/// in a transaction (`work` then runs in a savepoint, as with [`write_transaction`]).
pub fn write_transaction_opening_with<T, E, F>(conn: &mut DbConnection, opening: &str, work: F) -> Result<T, E>
where
    F: FnOnce(&mut DbConnection, bool) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    use diesel::connection::AnsiTransactionManager;
    let DbConnection::Postgresql(pg) = conn else {
        return write_transaction(conn, |conn| work(conn, false));
    };
    match AnsiTransactionManager::begin_transaction_sql(pg, &format!("BEGIN; {opening}")) {
        Ok(()) => {}
        Err(diesel::result::Error::AlreadyInTransaction) => return conn.transaction(|conn| work(conn, false)),
        Err(e) => {
            // BEGIN may have run and `opening` failed: the session is then in an aborted
            // transaction that diesel does not know of.
            let _ = pg.batch_execute("ROLLBACK");
            return Err(e.into());
        }
    }
    let result = work(conn, true);
    end_transaction(conn, result)
}

/// Commits a transaction begun by hand when `result` is `Ok`, rolls it back otherwise.
fn end_transaction<T, E>(conn: &mut DbConnection, result: Result<T, E>) -> Result<T, E>
where
    E: From<diesel::result::Error>,
{
    use diesel::connection::TransactionManager;
    type Manager = <DbConnection as Connection>::TransactionManager;
    match result {
        Ok(value) => {
            Manager::commit_transaction(conn)?;
            Ok(value)
        }
        Err(e) => {
            Manager::rollback_transaction(conn)?;
            Err(e)
        }
    }
}

/// Connections being opened right now, on any thread of the process.
static CONNECTS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Counts one connect in [`CONNECTS_IN_FLIGHT`] for as long as it lives.
struct ConnectInFlight;

impl ConnectInFlight {
    fn begin() -> ConnectInFlight {
        CONNECTS_IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
        ConnectInFlight
    }
}

impl Drop for ConnectInFlight {
    fn drop(&mut self) {
        CONNECTS_IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits, at most `limit`, until no connection is being opened. The binary calls it last,
/// after every pool is dropped.
///
/// Why: r2d2 tops a pool up on a background thread whenever a checkout leaves it below
/// `min_idle`, and dropping the pool does not wait for that thread. A process that exits while
/// such a connect is inside libpq runs OpenSSL's exit-time cleanup under it, and that thread
/// crashes (SIGSEGV; about 1 run in 100 of a short command on PostgreSQL, before this).
pub fn settle_connects(limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while CONNECTS_IN_FLIGHT.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Where to connect, parsed from the configured URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub backend: Backend,
    /// What diesel's `establish` receives: the Postgres URL or the SQLite file path.
    pub connect_string: String,
}

impl Target {
    pub fn from_url(url: &str) -> Result<Target, DbError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Target { backend: Backend::Postgres, connect_string: url.to_owned() });
        }
        if let Some(rest) = url.strip_prefix("sqlite:") {
            // sqlite://relative/path, sqlite:///absolute/path, sqlite::memory: and sqlite:path
            let path = rest.strip_prefix("//").unwrap_or(rest);
            return Ok(Target { backend: Backend::Sqlite, connect_string: path.to_owned() });
        }
        Err(DbError::UnknownScheme(url.to_owned()))
    }

    /// Opens one connection, returning the backend's own error text on failure.
    pub fn connect(&self) -> Result<DbConnection, DbError> {
        let _counted = ConnectInFlight::begin();
        match self.backend {
            Backend::Postgres => PgConnection::establish(&self.connect_string)
                .map(DbConnection::Postgresql)
                .map_err(|e| DbError::Connect(e.to_string())),
            Backend::Sqlite => {
                self.ensure_sqlite_directory()?;
                let mut conn =
                    SqliteConnection::establish(&self.connect_string).map_err(|e| DbError::Connect(e.to_string()))?;
                // Without these a pool of writers hits "database is locked".
                conn.batch_execute(
                    "PRAGMA busy_timeout=5000; PRAGMA journal_mode=WAL; \
                     PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;",
                )
                .map_err(|e| DbError::Connect(e.to_string()))?;
                Ok(DbConnection::Sqlite(conn))
            }
        }
    }

    fn ensure_sqlite_directory(&self) -> Result<(), DbError> {
        if self.connect_string.starts_with(':') {
            return Ok(());
        }
        if let Some(dir) = Path::new(&self.connect_string).parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|e| DbError::Directory(dir.display().to_string(), e))?;
            }
        }
        Ok(())
    }
}

/// How long a connection may sit in the pool before its next checkout asks the server whether it
/// is still there. A busy pool hands its connections out again within milliseconds, and asking
/// each time was one round trip in seven on the append path; a connection that sat idle through
/// a database restart is still caught at checkout, and one whose work failed is checked when it
/// comes back (see [`PoolConnection`]).
const IDLE_BEFORE_CHECK: Duration = Duration::from_secs(1);

/// A connection of a pool, with what the pool knows of its health. Derefs to the diesel
/// connection.
pub struct PoolConnection {
    conn: DbConnection,
    /// When it last went back into the pool (or was opened).
    returned: Instant,
    /// The work of its last checkout failed: the server may have gone, so the pool asks before
    /// keeping it. Set by [`Db::run`] and [`Db::run_soft`].
    failed: bool,
}

impl std::ops::Deref for PoolConnection {
    type Target = DbConnection;
    fn deref(&self) -> &DbConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for PoolConnection {
    fn deref_mut(&mut self) -> &mut DbConnection {
        &mut self.conn
    }
}

impl PoolConnection {
    fn answers(&mut self) -> bool {
        self.conn.batch_execute("SELECT 1").is_ok()
    }
}

/// r2d2 manager that connects to exactly the configured backend (diesel's derived
/// `establish` tries both and hides the real error).
pub struct ConnectionManager {
    target: Target,
    /// Connections of the soft-state pool commit without waiting for the WAL flush.
    soft: bool,
}

#[derive(Debug)]
pub struct ManagerError(String);

impl std::fmt::Display for ManagerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ManagerError {}

impl ManageConnection for ConnectionManager {
    type Connection = PoolConnection;
    type Error = ManagerError;

    fn connect(&self) -> Result<PoolConnection, ManagerError> {
        let mut conn = self.target.connect().map_err(|e| ManagerError(e.to_string()))?;
        if self.soft && matches!(conn, DbConnection::Postgresql(_)) {
            conn.batch_execute("SET synchronous_commit = off").map_err(|e| ManagerError(e.to_string()))?;
        }
        Ok(PoolConnection { conn, returned: Instant::now(), failed: false })
    }

    /// At checkout: only a connection that sat idle for a while is asked.
    fn is_valid(&self, conn: &mut PoolConnection) -> Result<(), ManagerError> {
        if conn.returned.elapsed() < IDLE_BEFORE_CHECK || conn.answers() {
            return Ok(());
        }
        Err(ManagerError("the connection no longer answers".into()))
    }

    /// At check-in: a connection whose work failed is kept only if it still answers.
    fn has_broken(&self, conn: &mut PoolConnection) -> bool {
        conn.returned = Instant::now();
        std::mem::take(&mut conn.failed) && !conn.answers()
    }
}

/// The connection pool plus the backend it talks to.
#[derive(Clone)]
pub struct Db {
    pool: Pool<ConnectionManager>,
    /// Where the pools connect (for connections of their own, like the NOTIFY listener).
    target: Target,
    /// A small second pool for writes of soft state (peek renewals) on PostgreSQL: losing the
    /// last milliseconds of them in a crash is harmless, waiting for each WAL flush is not.
    soft: Option<Pool<ConnectionManager>>,
    backend: Backend,
    /// The runtime whose blocking threads run the work; `None`: the caller's. The sender runs
    /// on low-priority threads of its own and sends its database work here (see
    /// [`Db::blocking_on`]).
    blocking: Option<tokio::runtime::Handle>,
}

pub type Conn = PooledConnection<ConnectionManager>;

impl Db {
    /// Connects once directly (so a bad URL or password is reported as itself), then builds
    /// the pool.
    pub fn connect(url: &str, pool_size: u32) -> Result<Db, DbError> {
        let target = Target::from_url(url)?;
        drop(target.connect()?);
        let backend = target.backend;
        let build = |target: Target, soft: bool, size: u32| {
            r2d2::Pool::builder()
                .max_size(size)
                .min_idle(Some(1))
                .connection_timeout(Duration::from_secs(10))
                .build(ConnectionManager { target, soft })
                .map_err(|e| DbError::Pool(e.to_string()))
        };
        let soft = match backend {
            Backend::Postgres => Some(build(target.clone(), true, pool_size.div_ceil(2))?),
            Backend::Sqlite => None,
        };
        let pool = build(target.clone(), false, pool_size)?;
        Ok(Db { pool, target, soft, backend, blocking: None })
    }

    /// A database for a one-shot command (`migrate`, `user create`, `peeks list`, ...): one
    /// connection per pool, opened before this returns, is all such a command needs, and a pool
    /// at its maximum never opens more on a background thread (see [`settle_connects`]).
    pub fn connect_for_command(url: &str) -> Result<Db, DbError> {
        Db::connect(url, 1)
    }

    /// Like [`Db::run`], on the soft-state pool (the main pool on SQLite).
    pub async fn run_soft<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let pool = self.soft.clone().unwrap_or_else(|| self.pool.clone());
        self.on_blocking_thread(move || {
            let mut conn = pool.get().map_err(|e| DbError::Pool(e.to_string()))?;
            let result = work(&mut conn);
            conn.failed = result.is_err();
            result
        })
        .await
        .map_err(|_| E::from(DbError::Cancelled))?
    }

    /// This database, with its work run on `runtime`'s blocking threads. The sender's threads
    /// run at a lower CPU priority; a starved thread holding one of the pool's connections, or
    /// SQLite's write lock, would make everyone else wait for it.
    pub fn blocking_on(&self, runtime: tokio::runtime::Handle) -> Db {
        Db { blocking: Some(runtime), ..self.clone() }
    }

    async fn on_blocking_thread<T, F>(&self, work: F) -> Result<T, tokio::task::JoinError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        match &self.blocking {
            // Handed over from one of that runtime's own threads: a blocking thread created for
            // it inherits its creator's priority, and the caller's thread may run lower.
            Some(runtime) => {
                runtime.spawn(async move { tokio::task::spawn_blocking(work).await }).await.and_then(|r| r)
            }
            None => tokio::task::spawn_blocking(work).await,
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The PostgreSQL URL, for connections outside the pools; `None` on SQLite.
    pub fn postgres_url(&self) -> Option<String> {
        (self.backend == Backend::Postgres).then(|| self.target.connect_string.clone())
    }

    /// Applies every pending migration of this backend; returns how many ran.
    pub fn migrate(&self) -> Result<usize, DbError> {
        let mut conn = self.conn()?;
        let applied = on_backend!(&mut **conn, |c| match c.run_pending_migrations(self.migrations()) {
            Ok(versions) => versions.len(),
            Err(e) => return Err(DbError::Migration(e.to_string())),
        });
        Ok(applied)
    }

    fn migrations(&self) -> EmbeddedMigrations {
        match self.backend {
            Backend::Postgres => POSTGRES_MIGRATIONS,
            Backend::Sqlite => SQLITE_MIGRATIONS,
        }
    }

    pub fn conn(&self) -> Result<Conn, DbError> {
        self.pool.get().map_err(|e| DbError::Pool(e.to_string()))
    }

    /// Runs blocking diesel work on the blocking pool. The work's own error type is kept, so
    /// callers get their typed errors back (pool and task failures convert from [`DbError`]).
    pub async fn run<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let db = self.clone();
        self.on_blocking_thread(move || {
            let mut conn = db.conn()?;
            let result = work(&mut conn);
            conn.failed = result.is_err();
            result
        })
        .await
        .map_err(|_| E::from(DbError::Cancelled))?
    }

    /// Readiness probe: can we run a trivial query?
    pub async fn ping(&self) -> Result<(), DbError> {
        self.run(|c| {
            c.batch_execute("SELECT 1").map_err(DbError::Query)?;
            Ok(())
        })
        .await
    }
}
