//! Start-up: build the shared state (key, database, federation client) and run the listeners
//! (plain HTTP, optional TLS, metrics).

use std::io::BufReader;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use rand::distr::{Alphanumeric, SampleString};
use tracing_actix_web::TracingLogger;

use crate::accounts::Accounts;
use crate::config::{Settings, TlsSettings};
use crate::db::{notify, Backend, Db, DbError};
use crate::federation::client::FederationClient;
use crate::federation::resolve::{Dns, HickoryDns};
use crate::keys::{RemoteKeys, SigningKey};
use crate::metrics::Metrics;
use crate::peeks::devices::DevicePeeks;
use crate::peeks::inbound::InboundPeeks;
use crate::peeks::outbound::OutboundPeeks;
use crate::rooms::hooks::StateEventHook;
use crate::rooms::Rooms;
use crate::schedule::{self, ScheduleHandle};
use crate::sender::{self, SenderHandle};
use crate::state::AppState;
use crate::{admin, client_api, federation, http, keys};

/// rustls needs one process-wide crypto provider before any client or server config exists.
pub fn install_crypto_provider() {
    // Err means another caller (another in-process server) installed it already: fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Loads or creates the signing key, connects to and migrates the database, builds clients.
pub async fn build_state(settings: Settings, dns: Option<Arc<dyn Dns>>) -> anyhow::Result<AppState> {
    install_crypto_provider();
    let key_path = settings.raw.signing.key_path.clone();
    let (key, generated) = SigningKey::load_or_generate(&key_path)?;
    if generated {
        tracing::info!(path = %key_path.display(), key_id = %key.key_id(), "generated a new signing key");
    }
    let key = Arc::new(key);
    let (url, pool_size) = (settings.raw.database.url.clone(), settings.raw.database.pool_size);
    let db = tokio::task::spawn_blocking(move || -> anyhow::Result<Db> {
        let db = Db::connect(&url, pool_size)?;
        let applied = db.migrate()?;
        if applied > 0 {
            tracing::info!(applied, "database migrations applied");
        }
        Ok(db)
    })
    .await??;
    if db.backend() == Backend::Sqlite {
        tracing::info!("SQLite storage: single instance only (use PostgreSQL to run several)");
    }
    let dns = dns.unwrap_or_else(|| Arc::new(HickoryDns::from_system()));
    let federation = Arc::new(FederationClient::new(&settings, key.clone(), dns)?);
    let keys = RemoteKeys::new(
        db.clone(),
        federation.clone(),
        settings.server_name.clone(),
        key.clone(),
        settings.raw.signing.old_keys.clone(),
    );
    // The append path publishes; the peek modules subscribe (design.md §1).
    let state_event_hooks: Vec<StateEventHook> = vec![
        crate::peeks::inbound::after_state_event,
        crate::peeks::devices::after_state_event,
        crate::membership::spans::after_state_event,
    ];
    let rooms = Rooms::new(db.clone(), key.clone(), settings.server_name.clone(), state_event_hooks);
    let accounts = Accounts::new(db.clone());
    let inbound = InboundPeeks::new(db.clone(), &settings);
    let device_peeks = DevicePeeks::new(db.clone(), &settings.raw.client.peek);
    let instance_id = format!("{}-{}", std::process::id(), Alphanumeric.sample_string(&mut rand::rng(), 12));
    let (keys, metrics, rooms) = (Arc::new(keys), Arc::new(Metrics::new()), Arc::new(rooms));
    let outbound = OutboundPeeks {
        instance_id: instance_id.clone(),
        settings: settings.clone(),
        db: db.clone(),
        rooms: rooms.clone(),
        federation: federation.clone(),
        keys: keys.clone(),
        metrics: metrics.clone(),
        device_peeks: device_peeks.clone(),
        locks: Default::default(),
    };
    Ok(AppState {
        instance_id,
        settings,
        db,
        key,
        keys,
        federation,
        metrics,
        rooms,
        accounts,
        inbound: Arc::new(inbound),
        device_peeks,
        outbound,
        destination_resets: tokio::sync::watch::Sender::new(0),
        scheduler_jobs: Default::default(),
    })
}

/// Sockets bound before the server starts (tests bind port 0 and read the port back).
pub struct Listeners {
    pub http: TcpListener,
    pub tls: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    pub fn bind(settings: &Settings) -> anyhow::Result<Listeners> {
        let bind = |addr: SocketAddr, what: &str| {
            TcpListener::bind(addr).with_context(|| format!("cannot bind {what} on {addr}"))
        };
        Ok(Listeners {
            http: bind(settings.http_bind, "http.bind")?,
            tls: settings.tls.as_ref().map(|t| bind(t.bind, "http.tls_bind")).transpose()?,
            metrics: settings.metrics_bind.map(|a| bind(a, "metrics.bind")).transpose()?,
        })
    }
}

/// A started server: its addresses, and handles to stop it.
pub struct RunningServer {
    pub state: web::Data<AppState>,
    pub http_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    handles: Vec<ServerHandle>,
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    sender: Option<SenderHandle>,
    schedule: Option<ScheduleHandle>,
    listener: Option<notify::Listener>,
    announcer: Option<tokio::task::JoinHandle<()>>,
}

impl RunningServer {
    /// Stops accepting connections, lets in-flight requests finish, and waits for the listeners.
    /// Then stops the scheduler and the sender: a transaction in flight finishes, and the
    /// cursors on disk say what was delivered, so nothing queued is lost.
    pub async fn stop(mut self) {
        for handle in &self.handles {
            handle.stop(true).await;
        }
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        if let Some(schedule) = self.schedule.take() {
            schedule.stop().await;
        }
        if let Some(sender) = self.sender.take() {
            sender.stop().await;
        }
        if let Some(announcer) = self.announcer.take() {
            announcer.abort();
        }
        if let Some(listener) = self.listener.take() {
            let _ = tokio::task::spawn_blocking(move || listener.stop()).await;
        }
    }

    /// Waits until the listeners end (e.g. after [`RunningServer::stop`] from a signal handler).
    pub fn handles(&self) -> Vec<ServerHandle> {
        self.handles.clone()
    }
}

/// Every route the main listeners serve.
pub fn configure_routes(cfg: &mut web::ServiceConfig) {
    cfg.configure(http::health_routes)
        .configure(keys::http::routes)
        .configure(federation::server::routes)
        .configure(client_api::routes)
        .configure(admin::http::routes)
        .default_service(web::to(http::not_found));
}

pub fn start(state: AppState, listeners: Listeners) -> anyhow::Result<RunningServer> {
    let tls_config = state.settings.tls.as_ref().map(load_tls_config).transpose()?;
    let workers = state.settings.raw.http.workers;
    let state = web::Data::new(state);
    let http_addr = listeners.http.local_addr()?;
    let tls_addr = listeners.tls.as_ref().map(|l| l.local_addr()).transpose()?;
    let metrics_addr = listeners.metrics.as_ref().map(|l| l.local_addr()).transpose()?;

    let app_state = state.clone();
    let mut main = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            .app_data(http::query_config())
            .app_data(http::path_config())
            .wrap(actix_web::middleware::from_fn(http::body_read_deadline))
            .wrap(TracingLogger::<crate::logging::RedactingRootSpan>::new())
            .configure(configure_routes)
    })
    .disable_signals()
    .listen(listeners.http)?;
    if workers > 0 {
        main = main.workers(workers);
    }
    if let (Some(listener), Some(config)) = (listeners.tls, tls_config) {
        main = main.listen_rustls_0_23(listener, config)?;
    }
    let main = main.run();
    let mut handles = vec![main.handle()];
    let mut tasks = vec![tokio::spawn(main)];

    if let Some(listener) = listeners.metrics {
        let metrics_state = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(metrics_state.clone())
                .route("/metrics", web::get().to(http::metrics_text))
                .default_service(web::to(http::not_found))
        })
        .disable_signals()
        .workers(1)
        .listen(listener)?
        .run();
        handles.push(server.handle());
        tasks.push(tokio::spawn(server));
    }
    let listener = start_listener(&state);
    let announcer = start_announcer(&state);
    let sender = Some(sender::start(state.sender_context()));
    let schedule = Some(schedule::start(state.jobs()));
    tracing::info!(%http_addr, ?tls_addr, ?metrics_addr, server_name = %state.settings.server_name, "peekgate listening");
    Ok(RunningServer {
        state,
        http_addr,
        tls_addr,
        metrics_addr,
        handles,
        tasks,
        sender,
        schedule,
        listener,
        announcer,
    })
}

/// How long the announcer gathers appends into one notification.
const ANNOUNCE_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// On PostgreSQL: tells other instances of this instance's appends, after they commit. Appends
/// within [`ANNOUNCE_EVERY`] share one notification carrying the newest position, so a busy
/// append path pays for a few notifications a second, not one per event.
fn start_announcer(state: &web::Data<AppState>) -> Option<tokio::task::JoinHandle<()>> {
    state.db.postgres_url()?;
    let state = state.clone();
    let mut local = state.rooms.subscribe_local();
    Some(tokio::spawn(async move {
        while local.changed().await.is_ok() {
            tokio::time::sleep(ANNOUNCE_EVERY).await;
            let pos = *local.borrow_and_update();
            // On the soft-state pool: a notification needs no WAL flush of its own (with one,
            // appends measured about 20 % slower), and one lost in a crash wakes nobody late
            // for long, as every waiter also polls.
            let sent =
                state.db.run_soft(move |conn| notify::notify(conn, notify::EVENTS, pos).map_err(DbError::Query)).await;
            if let Err(e) = sent {
                tracing::warn!(error = %e, "cannot notify other instances of new events");
            }
        }
    }))
}

/// On PostgreSQL: wake-ups from other instances sharing the database (design.md §6).
fn start_listener(state: &web::Data<AppState>) -> Option<notify::Listener> {
    let url = state.db.postgres_url()?;
    let state = state.clone();
    Some(notify::Listener::start(url, move |channel, value| match channel {
        notify::EVENTS => state.rooms.note_appended(value),
        notify::DEVICE_PEEKS => state.device_peeks.note_changed(value),
        notify::REDACTIONS => crate::rooms::store::redactions::note_applied_elsewhere(),
        _ => {}
    }))
}

fn load_tls_config(tls: &TlsSettings) -> anyhow::Result<rustls::ServerConfig> {
    let cert_file =
        std::fs::File::open(&tls.cert).with_context(|| format!("http.tls_cert: cannot open {}", tls.cert.display()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(cert_file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("http.tls_cert: {} is not PEM", tls.cert.display()))?;
    let key_file =
        std::fs::File::open(&tls.key).with_context(|| format!("http.tls_key: cannot open {}", tls.key.display()))?;
    let key = rustls_pemfile::private_key(&mut BufReader::new(key_file))
        .with_context(|| format!("http.tls_key: {} is not PEM", tls.key.display()))?
        .with_context(|| format!("http.tls_key: no private key in {}", tls.key.display()))?;
    rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("http.tls_cert / http.tls_key do not form a usable certificate")
}

/// `peekgate serve`: start everything and run until SIGINT or SIGTERM, then stop gracefully.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&settings)?;
    let state = build_state(settings, None).await?;
    let server = start(state, listeners)?;
    shutdown_signal().await;
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    server.stop().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
