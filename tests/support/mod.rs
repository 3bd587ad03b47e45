//! Test support shared by every integration test: a fresh database per test (PostgreSQL or
//! SQLite), a peekgate server started in-process on ephemeral 127.0.0.1 ports, and (in
//! `peer`) a small hostile federation peer with its own key.
//!
//! PostgreSQL tests never skip. `PEEKGATE_TEST_POSTGRES_URL` points at the admin database
//! (default: the local server); when nothing answers there, the test binary starts a throwaway
//! cluster of its own from the machine's `initdb` (see [`postgres_admin_url`]), and fails with
//! the reason only when that is impossible too.

#![allow(dead_code)]

pub mod client;
pub mod gateways;
pub mod peer;
pub mod peer_room;
pub mod pg_cluster;
pub mod process;
pub mod synapse;
pub mod verify;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use peekgate::app::{self, Listeners, RunningServer};
use peekgate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Postgres,
    Sqlite,
}

/// Runs the async test body `name(DbKind)` once per backend, as the tests `name::postgres`
/// and `name::sqlite`.
#[macro_export]
macro_rules! both_backends {
    ($body:ident) => {
        mod $body {
            #[test]
            fn postgres() {
                $crate::support::run_async(super::$body($crate::support::DbKind::Postgres))
            }
            #[test]
            fn sqlite() {
                $crate::support::run_async(super::$body($crate::support::DbKind::Sqlite))
            }
        }
    };
}

/// Runs a test body on a runtime of its own like `#[tokio::test]`, then drops the runtime (and
/// with it every pool the test's servers made) and waits for connects still under way, so the
/// test binary never exits under one (see `peekgate::db::settle_connects`).
pub fn run_async(test: impl std::future::Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(test);
    drop(runtime);
    peekgate::db::settle_connects(std::time::Duration::from_secs(15));
}

/// The admin database URL PostgreSQL tests use: `PEEKGATE_TEST_POSTGRES_URL` (default: the local
/// server on 5432) when it answers, else a throwaway cluster this test binary starts once (H22).
pub fn postgres_admin_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let configured = std::env::var("PEEKGATE_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let configured = without_tls(&configured);
        if PgConnection::establish(&configured).is_ok() {
            return configured;
        }
        match start_throwaway_cluster() {
            Ok(url) => url,
            Err(why) => {
                let _ = CLUSTER_FAILURE.set(why);
                configured
            }
        }
    })
    .clone()
}

/// The URL with `sslmode=disable` unless it names a mode. The tests' server is on loopback, and
/// a connection without TLS keeps OpenSSL out of libpq: a test binary exits while in-process
/// servers' pools still hold connections, and OpenSSL's exit-time clean-up under a connection
/// in use corrupted the heap ("free(): invalid size", SIGABRT after every test had passed).
pub fn without_tls(url: &str) -> String {
    if url.contains("sslmode=") {
        return url.to_owned();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}sslmode=disable")
}

/// Why no throwaway cluster could be started, for the failing tests' message.
static CLUSTER_FAILURE: OnceLock<String> = OnceLock::new();

/// Keeps the throwaway cluster's keeper shell alive: its stdin closes when this process exits,
/// and the shell then stops the cluster and deletes its directory.
static CLUSTER_KEEPER: Mutex<Option<std::process::Child>> = Mutex::new(None);

/// The newest `initdb` under `/usr/lib/postgresql/*/bin/`, else one on `PATH`.
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(PathBuf::from).find(|dir| dir.join("initdb").exists())
}

pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// A `sh -c script` command, run as the `postgres` OS user when we are root (PostgreSQL refuses
/// to run as root).
pub fn cluster_shell(script: &str, as_postgres: bool) -> Command {
    if as_postgres {
        let mut command = Command::new("su");
        command.args(["postgres", "-s", "/bin/sh", "-c", script]);
        command
    } else {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }
}

/// `initdb` in a temp dir, then `postgres` on a free 127.0.0.1 port (socket in /tmp), trust
/// authentication for the `postgres` role; returns its admin URL once it answers.
fn start_throwaway_cluster() -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let bin = postgres_bin_dir().ok_or("no initdb under /usr/lib/postgresql/*/bin/ or on PATH")?;
    let as_postgres = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    let dir = tempfile::Builder::new().prefix("peekgate-test-pg-").tempdir().map_err(|e| e.to_string())?.keep();
    if as_postgres {
        let status = Command::new("chown").arg("postgres").arg(&dir).status().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("chown postgres {}: {status}", dir.display()));
        }
    }
    let (data, log) = (dir.join("data"), dir.join("postgres.log"));
    let path = |p: &Path| shell_quote(&p.display().to_string());
    let initdb = format!(
        "{} -D {} -U postgres -A trust -E UTF8 --no-sync >{} 2>&1",
        path(&bin.join("initdb")),
        path(&data),
        path(&dir.join("initdb.log"))
    );
    let status = cluster_shell(&initdb, as_postgres).status().map_err(|e| e.to_string())?;
    if !status.success() {
        let output = std::fs::read_to_string(dir.join("initdb.log")).unwrap_or_default();
        return Err(format!("initdb failed ({status}): {output}"));
    }
    let port = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?.local_addr().unwrap().port();
    // The shell holds our pipe as stdin: `cat` returns when this process exits (however it
    // exits), and the shell then stops PostgreSQL (fast shutdown) and removes the directory.
    let keeper = format!(
        "{} -D {} -p {port} -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off \
         >{} 2>&1 & pid=$!; cat >/dev/null; kill -INT $pid; wait $pid; rm -rf {}",
        path(&bin.join("postgres")),
        path(&data),
        path(&log),
        path(&dir)
    );
    let child = cluster_shell(&keeper, as_postgres)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    *CLUSTER_KEEPER.lock().unwrap() = Some(child);
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while PgConnection::establish(&url).is_err() {
        if std::time::Instant::now() > deadline {
            let output = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("the throwaway cluster on port {port} did not start: {output}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!("PostgreSQL tests use a throwaway cluster at {url} ({})", dir.display());
    Ok(url)
}

/// A database of its own for one test; dropped (Postgres) or deleted (SQLite) afterwards.
pub struct TestDb {
    pub url: String,
    pub kind: DbKind,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub fn new(kind: DbKind) -> TestDb {
        match kind {
            DbKind::Postgres => {
                let admin = postgres_admin_url();
                let name = format!("peekgate_t_{}", uuid::Uuid::new_v4().simple());
                let mut conn = PgConnection::establish(&admin).unwrap_or_else(|e| {
                    let why = CLUSTER_FAILURE.get().map(String::as_str).unwrap_or("");
                    panic!(
                        "PostgreSQL tests need a server at {admin} (set PEEKGATE_TEST_POSTGRES_URL): {e}; \
                         no throwaway cluster either: {why}"
                    )
                });
                conn.batch_execute(&format!("CREATE DATABASE {name}")).expect("create test database");
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
                TestDb { url: without_tls(&format!("{base}/{name}")), kind, pg_name: Some(name), _dir: None }
            }
            DbKind::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("peekgate.sqlite").display());
                TestDb { url, kind, pg_name: None, _dir: Some(dir) }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = &self.pg_name {
            if let Ok(mut conn) = PgConnection::establish(&postgres_admin_url()) {
                let _ = conn.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        }
    }
}

/// A listening socket on an ephemeral port, bound before the server that will use it starts,
/// so that servers can be configured with each other's addresses.
pub struct Reserved {
    pub listener: TcpListener,
    pub port: u16,
}

impl Reserved {
    pub fn new() -> Reserved {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind ephemeral port");
        let port = listener.local_addr().unwrap().port();
        Reserved { listener, port }
    }

    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Default for Reserved {
    fn default() -> Self {
        Reserved::new()
    }
}

/// A change to a test server's config, applied before it starts.
pub type ConfigEdit = Box<dyn FnOnce(&mut Config)>;

/// How to start one in-process peekgate.
pub struct ServerSpec {
    pub server_name: String,
    pub db: DbKind,
    pub destinations: BTreeMap<String, String>,
    pub http: Reserved,
    pub tls: Option<(Reserved, PathBuf, PathBuf)>,
    pub configure: Vec<ConfigEdit>,
}

impl ServerSpec {
    pub fn new(server_name: &str, db: DbKind) -> ServerSpec {
        ServerSpec {
            server_name: server_name.to_owned(),
            db,
            destinations: BTreeMap::new(),
            http: Reserved::new(),
            tls: None,
            configure: Vec::new(),
        }
    }

    /// Send federation traffic for `server_name` to `base_url` (`federation.destinations`).
    pub fn destination(mut self, server_name: &str, base_url: &str) -> ServerSpec {
        self.destinations.insert(server_name.to_owned(), base_url.to_owned());
        self
    }

    pub fn configure(mut self, f: impl FnOnce(&mut Config) + 'static) -> ServerSpec {
        self.configure.push(Box::new(f));
        self
    }

    pub fn tls(mut self, cert: PathBuf, key: PathBuf) -> ServerSpec {
        self.tls = Some((Reserved::new(), cert, key));
        self
    }

    pub fn url(&self) -> String {
        self.http.http_url()
    }

    pub async fn start(self) -> TestServer {
        // Server logs while debugging a test: RUST_LOG=peekgate=debug cargo test ...
        if std::env::var_os("RUST_LOG").is_some() {
            peekgate::logging::init(&peekgate::config::LogConfig { format: "plain".into(), filter: "warn".into() });
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let db = TestDb::new(self.db);
        let mut config = Config { server_name: self.server_name.clone(), ..Config::default() };
        config.database.url = db.url.clone();
        config.database.pool_size = 4;
        config.signing.key_path = dir.path().join("signing.key");
        config.http.bind = "127.0.0.1:0".into();
        config.http.workers = 2;
        config.metrics.bind = "127.0.0.1:0".into();
        config.federation.destinations = self.destinations;
        let mut tls_listener = None;
        if let Some((reserved, cert, key)) = self.tls {
            config.http.tls_bind = Some("127.0.0.1:0".into());
            config.http.tls_cert = Some(cert);
            config.http.tls_key = Some(key);
            tls_listener = Some(reserved.listener);
        }
        for f in self.configure {
            f(&mut config);
        }
        let running = launch(&config, self.http.listener, tls_listener).await;
        TestServer {
            base: format!("http://{}", running.http_addr),
            running: Some(running),
            server_name: self.server_name,
            config,
            db,
            _dir: dir,
        }
    }
}

async fn launch(config: &Config, http: TcpListener, tls: Option<TcpListener>) -> RunningServer {
    let settings = config.clone().validate().expect("test config is valid");
    let metrics = TcpListener::bind("127.0.0.1:0").unwrap();
    let listeners = Listeners { http, tls, metrics: Some(metrics) };
    let state = app::build_state(settings, None).await.expect("server state builds");
    app::start(state, listeners).expect("server starts")
}

/// Polls `check` every 50 ms until it holds; panics with `what` after 60 s. A deadline for
/// progress, not a speed assertion: nothing here measures how fast it happened.
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

pub struct TestServer {
    pub base: String,
    pub server_name: String,
    pub config: Config,
    running: Option<RunningServer>,
    pub db: TestDb,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub fn state(&self) -> &peekgate::state::AppState {
        self.running.as_ref().expect("server is running").state.get_ref()
    }

    pub fn running(&self) -> &RunningServer {
        self.running.as_ref().expect("server is running")
    }

    /// The value of a counter or gauge series in this server's `/metrics` text (0 when absent).
    /// The `(key_id, public key)` pairs the server publishes at `/_matrix/key/v2/server`.
    pub async fn published_keys(&self) -> Vec<(String, String)> {
        let (_, keys) = client::request(&self.base, None, reqwest::Method::GET, "/_matrix/key/v2/server", None).await;
        keys["verify_keys"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(id, k)| (id.clone(), k["key"].as_str().unwrap().to_owned()))
            .collect()
    }

    pub async fn metric(&self, series: &str) -> f64 {
        let addr = self.running().metrics_addr.expect("metrics listener");
        let text = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
        metric_value(&text, series)
    }

    /// Stops the server and starts it again on the same database and key (a new port).
    pub async fn restart(mut self) -> TestServer {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let running = launch(&self.config, listener, None).await;
        self.base = format!("http://{}", running.http_addr);
        self.running = Some(running);
        self
    }

    /// Stops only the HTTP side and background tasks, as a crash would, keeping the database.
    pub async fn stop_running(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }
}

/// Reads one series (`name{labels}` exactly as exposed, labels in any order) from Prometheus text.
pub fn metric_value(text: &str, series: &str) -> f64 {
    let (want_name, want_labels) = split_series(series);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(s, _)| {
            let (name, labels) = split_series(s);
            name == want_name && labels == want_labels
        })
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum()
}

fn split_series(series: &str) -> (&str, Vec<&str>) {
    match series.split_once('{') {
        Some((name, rest)) => {
            let mut labels: Vec<&str> = rest.trim_end_matches('}').split(',').filter(|l| !l.is_empty()).collect();
            labels.sort();
            (name, labels)
        }
        None => (series, Vec::new()),
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost, written to `dir` as PEM files.
pub fn self_signed_cert(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("generate certificate");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    (cert_path, key_path)
}
