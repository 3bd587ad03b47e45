//! Real Synapse for interop tests (JN-13): `matrix-synapse` from PyPI in a virtualenv, started
//! on loopback in a temp dir with a TLS federation listener (`server_name = localhost:<port>`,
//! so it never looks up SRV or `.well-known`), a plain HTTP client listener and SQLite.
//!
//! The virtualenv is `<CARGO_MANIFEST_DIR>/target/synapse-venv` unless `PEEKGATE_SYNAPSE_VENV`
//! names another. Installing happens once per machine: an install marker holding the version is
//! written after success, and the install runs under `flock` on `<venv>.lock`, so tests of one
//! binary (a `OnceLock`) and several binaries never install over each other. A failed install
//! fails the test with pip's output: these tests never skip.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use super::client::{enc, request};
use super::{DbKind, ServerSpec};

/// The one Synapse release these tests run against (checked to install and run on CPython 3.11).
pub const SYNAPSE_VERSION: &str = "1.163.2";

/// Every test user's password.
pub const PASSWORD: &str = "pw-123456";

/// Where the virtualenv lives.
pub fn venv_dir() -> PathBuf {
    match std::env::var_os("PEEKGATE_SYNAPSE_VENV") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("synapse-venv"),
    }
}

/// The virtualenv's python with Synapse [`SYNAPSE_VERSION`] importable; panics with the reason
/// when it cannot be installed.
pub fn python() -> PathBuf {
    static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match INSTALLED.get_or_init(|| install(&venv_dir())) {
        Ok(python) => python.clone(),
        Err(why) => panic!("Synapse {SYNAPSE_VERSION} could not be installed: {why}"),
    }
}

const MARKER: &str = "peekgate-synapse-installed";

/// Installs under an exclusive `flock`: whoever holds it first installs, the others find the
/// marker. The marker is written only after Synapse imports and reports the pinned version.
fn install(venv: &Path) -> Result<PathBuf, String> {
    let python = venv.join("bin").join("python");
    let marker = venv.join(MARKER);
    if std::fs::read_to_string(&marker).is_ok_and(|v| v == SYNAPSE_VERSION) {
        eprintln!("Synapse {SYNAPSE_VERSION}: already installed in {}", venv.display());
        return Ok(python);
    }
    let parent = venv.parent().ok_or("the virtualenv path has no parent")?;
    std::fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
    let mut lock = venv.as_os_str().to_owned();
    lock.push(".lock");
    let script = r#"
        set -e
        if [ "$(cat "$VENV/$MARKER" 2>/dev/null)" = "$VERSION" ]; then echo "found"; exit 0; fi
        rm -rf "$VENV"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "matrix-synapse==$VERSION"
        found=$("$VENV/bin/python" -c 'import importlib.metadata, synapse.app.homeserver; print(importlib.metadata.version("matrix-synapse"))')
        if [ "$found" != "$VERSION" ]; then echo "the virtualenv has matrix-synapse $found" >&2; exit 1; fi
        printf %s "$VERSION" > "$VENV/$MARKER"
        echo "installed"
    "#;
    let started = Instant::now();
    let output = Command::new("flock")
        .arg(&lock)
        .args(["sh", "-c", script])
        .env("VENV", venv)
        .env("MARKER", MARKER)
        .env("VERSION", SYNAPSE_VERSION)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `flock ... sh` (util-linux): {e}"))?;
    let took = started.elapsed().as_secs_f64();
    if !output.status.success() {
        return Err(format!(
            "`python3 -m venv` + `pip install matrix-synapse=={SYNAPSE_VERSION}` into {} failed ({}) after {took:.1} s:\n{}{}",
            venv.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        ));
    }
    if String::from_utf8_lossy(&output.stdout).contains("installed") {
        eprintln!("Synapse {SYNAPSE_VERSION}: installed into {} in {took:.1} s", venv.display());
    } else {
        eprintln!("Synapse {SYNAPSE_VERSION}: another test installed it ({took:.1} s waited)");
    }
    Ok(python)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One running Synapse; killed (with everything in its temp dir) on drop.
pub struct Synapse {
    /// `localhost:<federation port>`
    pub server_name: String,
    /// `http://127.0.0.1:<client port>`
    pub client_url: String,
    /// `https://localhost:<federation port>` (self-signed)
    pub federation_url: String,
    pub federation_port: u16,
    /// The keeper shell: Synapse is killed when its stdin closes (on drop, or when the test
    /// process dies however it dies).
    keeper: Child,
    keeper_stdin: Option<ChildStdin>,
    dir: tempfile::TempDir,
}

impl Synapse {
    /// Installs Synapse if needed, starts it, and waits (at most 60 s) until `/health` answers.
    pub async fn start() -> Synapse {
        let python =
            tokio::task::spawn_blocking(python).await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let dir = tempfile::Builder::new().prefix("peekgate-synapse-").tempdir().expect("temp dir");
        let (federation_port, client_port) = (free_port(), free_port());
        let server_name = format!("localhost:{federation_port}");
        let (cert, key) = super::self_signed_cert(dir.path());
        let path = |name: &str| dir.path().join(name).display().to_string();
        let log = path("homeserver.log");
        // YAML is a superset of JSON: both files are written as JSON.
        let log_config = json!({
            "version": 1,
            "formatters": { "precise": { "format": "%(asctime)s %(name)s %(levelname)s %(request)s %(message)s" } },
            "filters": { "context": { "()": "synapse.logging.context.LoggingContextFilter", "request": "" } },
            "handlers": { "file": { "class": "logging.FileHandler", "formatter": "precise", "filename": log, "filters": ["context"] } },
            "root": { "level": "INFO", "handlers": ["file"] },
            "disable_existing_loggers": false,
        });
        let unlimited = json!({ "per_second": 10000, "burst_count": 100000 });
        let config = json!({
            "server_name": server_name,
            "pid_file": path("homeserver.pid"),
            "listeners": [
                {
                    "port": federation_port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": true,
                    "resources": [{ "names": ["federation"], "compress": false }],
                },
                {
                    "port": client_port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": false,
                    "resources": [{ "names": ["client"], "compress": false }],
                },
            ],
            "tls_certificate_path": cert,
            "tls_private_key_path": key,
            "database": { "name": "sqlite3", "args": { "database": path("homeserver.db") } },
            "log_config": path("log.yaml"),
            "media_store_path": path("media"),
            "signing_key_path": path("signing.key"),
            "macaroon_secret_key": uuid::Uuid::new_v4().simple().to_string(),
            "form_secret": uuid::Uuid::new_v4().simple().to_string(),
            "report_stats": false,
            "enable_metrics": false,
            "presence": { "enabled": false },
            "url_preview_enabled": false,
            // Our peers' keys come from the peers themselves, never from matrix.org.
            "trusted_key_servers": [],
            "suppress_key_server_warning": true,
            // Peers use self-signed certificates on loopback, which Synapse refuses by default
            // (in this version `ip_range_whitelist` also covers federation, as long as the
            // deprecated `federation_ip_range_blacklist` is not set).
            "federation_verify_certificates": false,
            "ip_range_whitelist": ["127.0.0.0/8", "::1/128"],
            "enable_registration": true,
            "enable_registration_without_verification": true,
            "rc_message": unlimited,
            "rc_registration": unlimited,
            "rc_room_creation": unlimited,
            "rc_admin_redaction": unlimited,
            "rc_joins_per_room": unlimited,
            "rc_key_requests": unlimited,
            "rc_3pid_validation": unlimited,
            "rc_profile": unlimited,
            "rc_login": { "address": unlimited, "account": unlimited, "failed_attempts": unlimited },
            "rc_joins": { "local": unlimited, "remote": unlimited },
            "rc_invites": { "per_room": unlimited, "per_user": unlimited, "per_issuer": unlimited },
            "rc_federation": { "window_size": 1000, "sleep_limit": 10000, "sleep_delay": 1, "reject_limit": 100000, "concurrent": 1000 },
        });
        std::fs::write(path("log.yaml"), serde_json::to_string_pretty(&log_config).unwrap()).unwrap();
        std::fs::write(path("homeserver.yaml"), serde_json::to_string_pretty(&config).unwrap()).unwrap();

        // Synapse generates its signing key on first start (`--generate-missing-and-run`).
        // A background list's stdin is /dev/null in `sh`: the watcher reads our pipe as fd 3.
        let script = r#"
            exec 3<&0
            "$PYTHON" -m synapse.app.homeserver -c "$DIR/homeserver.yaml" >"$DIR/stdout.log" 2>&1 3<&- &
            pid=$!
            (cat <&3 >/dev/null; kill -9 $pid 2>/dev/null) &
            wait $pid
        "#;
        let mut keeper = Command::new("sh")
            .args(["-c", script])
            .env("PYTHON", &python)
            .env("DIR", dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh for Synapse");
        let keeper_stdin = keeper.stdin.take();
        let mut synapse = Synapse {
            federation_url: format!("https://localhost:{federation_port}"),
            client_url: format!("http://127.0.0.1:{client_port}"),
            server_name,
            federation_port,
            keeper,
            keeper_stdin,
            dir,
        };
        synapse.wait_healthy().await;
        synapse
    }

    async fn wait_healthy(&mut self) {
        let started = Instant::now();
        let http = super::client::http();
        loop {
            let health = http.get(format!("{}/health", self.client_url)).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                eprintln!(
                    "Synapse {} up after {:.1} s ({})",
                    self.server_name,
                    started.elapsed().as_secs_f64(),
                    self.dir.path().display()
                );
                break;
            }
            if let Some(status) = self.keeper.try_wait().unwrap() {
                panic!("Synapse exited ({status}) before answering /health:\n{}", self.log_tail());
            }
            if started.elapsed() > Duration::from_secs(60) {
                panic!("Synapse did not answer /health within 60 s:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last lines of Synapse's stdout/stderr and log, for failure messages.
    pub fn log_tail(&self) -> String {
        let tail = |name: &str| {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!("--- stdout/stderr ---\n{}\n--- homeserver.log ---\n{}", tail("stdout.log"), tail("homeserver.log"))
    }

    /// Synapse's log as it is now (to look for what it said about a request).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("homeserver.log")).unwrap_or_default()
    }

    /// A client-API request with an optional access token: `(status, JSON body)`.
    pub async fn call(&self, token: Option<&str>, method: Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        request(&self.client_url, token, method, path, body).await
    }

    /// Registers `localpart` (open registration, `m.login.dummy`): `(user_id, access_token)`.
    pub async fn register(&self, localpart: &str) -> (String, String) {
        let body = json!({ "username": localpart, "password": PASSWORD, "auth": { "type": "m.login.dummy" } });
        let (status, answer) = self.call(None, Method::POST, "/_matrix/client/v3/register", Some(&body)).await;
        assert_eq!(status, 200, "Synapse register {localpart}: {answer}");
        (answer["user_id"].as_str().unwrap().to_owned(), answer["access_token"].as_str().unwrap().to_owned())
    }

    /// `createRoom` with any options (`preset`, `room_alias_name`, `initial_state`,
    /// `room_version`, `invite`, ...); panics unless it succeeds.
    pub async fn create_room(&self, token: &str, options: Value) -> String {
        let (status, answer) =
            self.call(Some(token), Method::POST, "/_matrix/client/v3/createRoom", Some(&options)).await;
        assert_eq!(status, 200, "Synapse createRoom: {answer}");
        answer["room_id"].as_str().unwrap().to_owned()
    }

    /// A public, `world_readable` room with the alias `#<alias>:<server_name>`.
    pub async fn create_world_readable_room(&self, token: &str, alias: &str, version: &str) -> String {
        self.create_room(
            token,
            json!({
                "preset": "public_chat",
                "room_alias_name": alias,
                "room_version": version,
                "initial_state": [{ "type": "m.room.history_visibility", "content": { "history_visibility": "world_readable" } }],
            }),
        )
        .await
    }

    /// `POST /join/{roomIdOrAlias}` with `server_name` query parameters.
    pub async fn join(&self, token: &str, room_id_or_alias: &str, servers: &[&str]) -> (u16, Value) {
        let query: Vec<String> = servers.iter().map(|s| format!("server_name={}", enc(s))).collect();
        let path = format!("/_matrix/client/v3/join/{}?{}", enc(room_id_or_alias), query.join("&"));
        self.call(Some(token), Method::POST, &path, Some(&json!({}))).await
    }

    pub async fn invite(&self, token: &str, room_id: &str, user_id: &str) -> (u16, Value) {
        let path = format!("/_matrix/client/v3/rooms/{}/invite", enc(room_id));
        self.call(Some(token), Method::POST, &path, Some(&json!({ "user_id": user_id }))).await
    }

    pub async fn leave(&self, token: &str, room_id: &str) -> (u16, Value) {
        let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(room_id));
        self.call(Some(token), Method::POST, &path, Some(&json!({}))).await
    }

    /// Sends an `m.text` message; panics unless it succeeds. Returns the event ID.
    pub async fn send_message(&self, token: &str, room_id: &str, body: &str) -> String {
        let txn = uuid::Uuid::new_v4().simple().to_string();
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room_id));
        let (status, answer) =
            self.call(Some(token), Method::PUT, &path, Some(&json!({ "msgtype": "m.text", "body": body }))).await;
        assert_eq!(status, 200, "Synapse send: {answer}");
        answer["event_id"].as_str().unwrap().to_owned()
    }

    /// The bodies of the room's latest (up to 100) messages, oldest first, through `/messages`.
    pub async fn timeline_bodies(&self, token: &str, room_id: &str) -> Vec<String> {
        let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(room_id));
        let (status, answer) = self.call(Some(token), Method::GET, &path, None).await;
        assert_eq!(status, 200, "Synapse /messages: {answer}");
        super::client::chunk_bodies(&answer)
    }

    /// `GET /directory/room/{alias}`: Synapse asks the alias's server over federation when the
    /// alias is not its own.
    pub async fn resolve_alias(&self, token: &str, alias: &str) -> (u16, Value) {
        let path = format!("/_matrix/client/v3/directory/room/{}", enc(alias));
        self.call(Some(token), Method::GET, &path, None).await
    }

    /// A peekgate that Synapse can reach and that reaches Synapse: server name
    /// `localhost:<TLS port>` with a TLS listener on that port (Synapse federates only over
    /// TLS and resolves the explicit port itself), Synapse as a `federation.destinations`
    /// override (overrides may be loopback), its self-signed certificate accepted, and open
    /// registration. `certs` must outlive the start.
    pub fn gateway_spec(&self, db: DbKind, certs: &Path) -> ServerSpec {
        let (cert, key) = super::self_signed_cert(certs);
        let mut spec = ServerSpec::new("localhost", db).tls(cert, key);
        spec.server_name = format!("localhost:{}", spec.tls.as_ref().unwrap().0.port);
        spec.destination(&self.server_name, &self.federation_url).configure(|c| {
            c.federation.accept_invalid_certs = true;
            c.client.registration = "open".into();
        })
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        // Closing the keeper's stdin makes it kill Synapse; then the keeper exits.
        drop(self.keeper_stdin.take());
        let _ = self.keeper.wait();
    }
}
