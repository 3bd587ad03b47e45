//! Configuration: a TOML file plus `PEEKGATE_<SECTION>__<KEY>` environment overrides.
//! (Over 600 lines: every key's type, default and validation in one place, with their tests.)
//!
//! The config is loaded and validated once at start-up and then passed explicitly (there are
//! no globals). A bad value is reported as one line naming the key and the reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use ipnet::IpNet;
use ruma::OwnedServerName;
use serde::{Deserialize, Serialize};
use url::Url;

/// Where `serve` looks for a config file when neither `--config` nor `$PEEKGATE_CONFIG` is given.
pub const DEFAULT_CONFIG_FILE: &str = "peekgate.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("config: {0}")]
    Load(String),
}

impl ConfigError {
    /// Keeps the message on one line, whatever the underlying error printed.
    fn invalid(key: &str, reason: impl Into<String>) -> Self {
        let reason: String = reason.into();
        let lines: Vec<&str> = reason.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        ConfigError::Invalid { key: key.to_owned(), reason: lines.join(" ") }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Our Matrix server name (`host[:port]`).
    pub server_name: String,
    pub http: HttpConfig,
    pub metrics: MetricsConfig,
    pub database: DatabaseConfig,
    pub signing: SigningConfig,
    pub federation: FederationConfig,
    pub peeks: PeeksConfig,
    pub schedule: ScheduleConfig,
    pub client: ClientConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpConfig {
    /// Plain-HTTP listener for client, federation and key routes.
    pub bind: String,
    /// Optional direct TLS listener (real homeservers federate over HTTPS).
    pub tls_bind: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Largest request body accepted, checked before parsing (federation default 12.5 MiB).
    pub max_body_bytes: usize,
    /// H18: the longest a client may take to send a request body (408 after it).
    pub body_read_timeout_ms: u64,
    /// Content of `/.well-known/matrix/server` (`m.server`), served only when set.
    pub well_known_server: Option<String>,
    /// HTTP worker threads; 0 means one per CPU core.
    pub workers: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MetricsConfig {
    /// Address of the Prometheus `/metrics` listener; empty string disables it.
    pub bind: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DatabaseConfig {
    /// `sqlite://path` or `postgres://user@host/db`.
    pub url: String,
    pub pool_size: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SigningConfig {
    pub key_path: PathBuf,
    /// How long our published key response stays valid (`valid_until_ts = now + this`).
    pub key_validity_ms: u64,
    /// Keys we used before, still published under `old_verify_keys`.
    pub old_keys: Vec<OldKeyConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OldKeyConfig {
    /// Full key id, e.g. `ed25519:a_old1`.
    pub key_id: String,
    /// Unpadded base64 public key.
    pub public_key: String,
    /// When we stopped using it (ms since the epoch).
    pub expired_ts: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct FederationConfig {
    /// Server name -> base URL (`http` or `https`), used instead of server-name resolution.
    pub destinations: BTreeMap<String, String>,
    /// Allow outbound connections to private, loopback and link-local addresses.
    pub allow_private_ranges: bool,
    /// Individual ranges allowed even though they are private (e.g. `10.1.0.0/16`).
    pub allowed_ranges: Vec<String>,
    /// Accept self-signed certificates (test set-ups only).
    pub accept_invalid_certs: bool,
    pub request_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Largest response body read from a remote server.
    pub max_response_bytes: usize,
    /// Longest wait between retries of a failing destination (the sender's back-off cap).
    pub max_backoff_ms: u64,
    /// How long an instance's hold on a destination lasts unless renewed (H4: renewed every
    /// third of it while the instance works on the destination, back-offs and slow sends
    /// included). Another instance takes over a dead one's destinations after this long.
    pub sender_lease_ms: u64,
    /// How long a destination's worker waits with nothing to send before it stops (its lease is
    /// then released; the sender starts a worker again when there is work).
    pub sender_idle_ms: u64,
    pub peek: FederationPeekConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct FederationPeekConfig {
    /// FP-4 interop switch: accept any 1..255-byte printable-ASCII peek_id (Dendrite sends room IDs).
    pub lenient_peek_ids: bool,
    /// FP-12: new peeks per origin per minute, and the burst allowed above that rate.
    pub new_peeks_per_minute: u32,
    pub new_peeks_burst: u32,
    /// FP-12: live peeks one origin may hold in total, and peek_ids per room.
    pub max_active_per_origin: u32,
    pub max_ids_per_room: u32,
    /// H18: live inbound peeks from all origins together (new peeks get 429 beyond it), so that
    /// many origins cannot add up to an unbounded fan-out.
    pub max_active_total: u32,
}

impl Default for FederationPeekConfig {
    fn default() -> Self {
        FederationPeekConfig {
            lenient_peek_ids: false,
            new_peeks_per_minute: 10,
            new_peeks_burst: 20,
            max_active_per_origin: 1000,
            max_ids_per_room: 50,
            max_active_total: 100_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PeeksConfig {
    pub renewal_interval_ms: u64,
    pub eviction_grace_ms: u64,
    pub idle_device_ms: u64,
    /// After we DELETE an outbound peek: how long PDUs from its target are still accepted
    /// (transactions in flight, OP-9) and our copy of the room is kept before it is forgotten.
    pub outbound_linger_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ScheduleConfig {
    pub evict_inbound: String,
    pub renew_outbound: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientConfig {
    /// `disabled` or `open` (`m.login.dummy`).
    pub registration: String,
    pub peek: ClientPeekConfig,
}

/// Local devices' peeks (MSC2753).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientPeekConfig {
    /// CP-8: a `/sync` without `since` ends that device's peeks.
    pub clear_on_initial_sync: bool,
    /// CP-14: live peeks one device may hold (429 beyond).
    pub max_per_device: u32,
    /// H18: live peeks all of one user's devices may hold together (429 beyond): every login is
    /// a new device, so a cap per device alone bounds nothing.
    pub max_per_user: u32,
    /// CP-14: `/peek` and `/unpeek` calls per user (all their devices together) per minute, and
    /// the burst above that rate.
    pub per_minute: u32,
    pub burst: u32,
}

impl Default for ClientPeekConfig {
    fn default() -> Self {
        ClientPeekConfig {
            clear_on_initial_sync: true,
            max_per_device: 100,
            max_per_user: 300,
            per_minute: 30,
            burst: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    /// `plain` or `json`.
    pub format: String,
    /// A tracing `EnvFilter` directive; `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server_name: "localhost:8008".to_owned(),
            http: HttpConfig::default(),
            metrics: MetricsConfig::default(),
            database: DatabaseConfig::default(),
            signing: SigningConfig::default(),
            federation: FederationConfig::default(),
            peeks: PeeksConfig::default(),
            schedule: ScheduleConfig::default(),
            client: ClientConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            bind: "127.0.0.1:8008".to_owned(),
            tls_bind: None,
            tls_cert: None,
            tls_key: None,
            max_body_bytes: 12 * 1024 * 1024 + 512 * 1024,
            body_read_timeout_ms: 30_000,
            well_known_server: None,
            workers: 0,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { bind: "127.0.0.1:9093".to_owned() }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig { url: "sqlite://data/peekgate.sqlite".to_owned(), pool_size: 8 }
    }
}

impl Default for SigningConfig {
    fn default() -> Self {
        SigningConfig {
            key_path: PathBuf::from("keys/signing.key"),
            key_validity_ms: 24 * 3600 * 1000,
            old_keys: Vec::new(),
        }
    }
}

impl Default for FederationConfig {
    fn default() -> Self {
        FederationConfig {
            destinations: BTreeMap::new(),
            allow_private_ranges: false,
            allowed_ranges: Vec::new(),
            accept_invalid_certs: false,
            request_timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
            max_response_bytes: 16 * 1024 * 1024,
            max_backoff_ms: 86_400_000,
            sender_lease_ms: 30_000,
            sender_idle_ms: 60_000,
            peek: FederationPeekConfig::default(),
        }
    }
}

impl Default for PeeksConfig {
    fn default() -> Self {
        PeeksConfig {
            renewal_interval_ms: 3_600_000,
            eviction_grace_ms: 300_000,
            idle_device_ms: 900_000,
            outbound_linger_ms: 60_000,
        }
    }
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig { evict_inbound: "*/30 * * * * *".to_owned(), renew_outbound: "*/30 * * * * *".to_owned() }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig { registration: "disabled".to_owned(), peek: ClientPeekConfig::default() }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: "plain".to_owned(), filter: "info".to_owned() }
    }
}

/// The config after validation: parsed, typed values that the rest of the program uses.
#[derive(Debug, Clone)]
pub struct Settings {
    pub raw: Config,
    pub server_name: OwnedServerName,
    pub http_bind: SocketAddr,
    pub tls: Option<TlsSettings>,
    pub metrics_bind: Option<SocketAddr>,
    pub destinations: BTreeMap<OwnedServerName, Url>,
    pub allowed_ranges: Vec<IpNet>,
    pub evict_inbound: cron::Schedule,
    pub renew_outbound: cron::Schedule,
}

#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub bind: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Config {
    /// Loads the config: built-in defaults, then the file (if any), then `PEEKGATE_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!("file {} does not exist", path.display())));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::prefixed("PEEKGATE_").ignore(&["config"]).split("__"));
        figment.extract().map_err(|e| ConfigError::Load(one_line_figment_error(e)))
    }

    /// Picks the config file the contract names: `--config`, else `$PEEKGATE_CONFIG`,
    /// else `peekgate.toml` when present, else none (built-in defaults).
    pub fn locate(explicit: Option<PathBuf>) -> Option<PathBuf> {
        explicit.or_else(|| std::env::var_os("PEEKGATE_CONFIG").map(PathBuf::from)).or_else(|| {
            let default = PathBuf::from(DEFAULT_CONFIG_FILE);
            default.exists().then_some(default)
        })
    }

    /// Checks every value and turns it into the typed [`Settings`].
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let server_name = OwnedServerName::try_from(self.server_name.as_str())
            .map_err(|e| ConfigError::invalid("server_name", e.to_string()))?;
        let http_bind = parse_addr("http.bind", &self.http.bind)?;
        let tls = self.tls_settings()?;
        let metrics_bind = match self.metrics.bind.trim() {
            "" => None,
            other => Some(parse_addr("metrics.bind", other)?),
        };
        if !(self.database.url.starts_with("sqlite:")
            || self.database.url.starts_with("postgres://")
            || self.database.url.starts_with("postgresql://"))
        {
            return Err(ConfigError::invalid("database.url", "must start with sqlite:// or postgres://"));
        }
        if self.database.pool_size == 0 {
            return Err(ConfigError::invalid("database.pool_size", "must be at least 1"));
        }
        if self.signing.key_validity_ms < 3_600_000 {
            return Err(ConfigError::invalid(
                "signing.key_validity_ms",
                "must be at least one hour (the spec asks publishers not to serve shorter validity)",
            ));
        }
        for old in &self.signing.old_keys {
            validate_old_key(old)?;
        }
        let destinations = self.parse_destinations()?;
        let allowed_ranges = self
            .federation
            .allowed_ranges
            .iter()
            .map(|r| {
                IpNet::from_str(r).map_err(|e| ConfigError::invalid("federation.allowed_ranges", format!("{r:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        positive("federation.request_timeout_ms", self.federation.request_timeout_ms)?;
        positive("federation.connect_timeout_ms", self.federation.connect_timeout_ms)?;
        positive("federation.max_response_bytes", self.federation.max_response_bytes as u64)?;
        positive("federation.max_backoff_ms", self.federation.max_backoff_ms)?;
        if self.federation.sender_lease_ms < 300 {
            return Err(ConfigError::invalid("federation.sender_lease_ms", "must be at least 300"));
        }
        if self.federation.sender_idle_ms < 100 {
            return Err(ConfigError::invalid("federation.sender_idle_ms", "must be at least 100"));
        }
        positive("http.max_body_bytes", self.http.max_body_bytes as u64)?;
        positive("http.body_read_timeout_ms", self.http.body_read_timeout_ms)?;
        positive("peeks.renewal_interval_ms", self.peeks.renewal_interval_ms)?;
        let peek = &self.federation.peek;
        positive("federation.peek.new_peeks_per_minute", peek.new_peeks_per_minute.into())?;
        positive("federation.peek.new_peeks_burst", peek.new_peeks_burst.into())?;
        positive("federation.peek.max_active_per_origin", peek.max_active_per_origin.into())?;
        positive("federation.peek.max_ids_per_room", peek.max_ids_per_room.into())?;
        positive("federation.peek.max_active_total", peek.max_active_total.into())?;
        positive("peeks.idle_device_ms", self.peeks.idle_device_ms)?;
        positive("client.peek.max_per_device", self.client.peek.max_per_device.into())?;
        positive("client.peek.max_per_user", self.client.peek.max_per_user.into())?;
        positive("client.peek.per_minute", self.client.peek.per_minute.into())?;
        positive("client.peek.burst", self.client.peek.burst.into())?;
        let evict_inbound = parse_cron("schedule.evict_inbound", &self.schedule.evict_inbound)?;
        let renew_outbound = parse_cron("schedule.renew_outbound", &self.schedule.renew_outbound)?;
        if !matches!(self.client.registration.as_str(), "disabled" | "open") {
            return Err(ConfigError::invalid("client.registration", "must be \"disabled\" or \"open\""));
        }
        if !matches!(self.log.format.as_str(), "plain" | "json") {
            return Err(ConfigError::invalid("log.format", "must be \"plain\" or \"json\""));
        }
        if let Some(ws) = &self.http.well_known_server {
            // Must itself be a valid server name (host[:port]).
            OwnedServerName::try_from(ws.as_str())
                .map_err(|e| ConfigError::invalid("http.well_known_server", e.to_string()))?;
        }
        Ok(Settings {
            raw: self,
            server_name,
            http_bind,
            tls,
            metrics_bind,
            destinations,
            allowed_ranges,
            evict_inbound,
            renew_outbound,
        })
    }

    fn tls_settings(&self) -> Result<Option<TlsSettings>, ConfigError> {
        let Some(bind) = &self.http.tls_bind else {
            return Ok(None);
        };
        let bind = parse_addr("http.tls_bind", bind)?;
        let cert = self
            .http
            .tls_cert
            .clone()
            .ok_or_else(|| ConfigError::invalid("http.tls_cert", "required when http.tls_bind is set"))?;
        let key = self
            .http
            .tls_key
            .clone()
            .ok_or_else(|| ConfigError::invalid("http.tls_key", "required when http.tls_bind is set"))?;
        Ok(Some(TlsSettings { bind, cert, key }))
    }

    fn parse_destinations(&self) -> Result<BTreeMap<OwnedServerName, Url>, ConfigError> {
        let mut out = BTreeMap::new();
        for (name, base) in &self.federation.destinations {
            let key = format!("federation.destinations.{name}");
            let server = OwnedServerName::try_from(name.as_str())
                .map_err(|e| ConfigError::invalid(&key, format!("bad server name: {e}")))?;
            let url = Url::parse(base).map_err(|e| ConfigError::invalid(&key, e.to_string()))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(ConfigError::invalid(&key, "must be an http:// or https:// base URL"));
            }
            out.insert(server, url);
        }
        Ok(out)
    }
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|e| ConfigError::invalid(key, format!("{value:?} is not an ip:port address ({e})")))
}

fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::invalid(key, "must be greater than zero"));
    }
    Ok(())
}

fn parse_cron(key: &str, expr: &str) -> Result<cron::Schedule, ConfigError> {
    cron::Schedule::from_str(expr).map_err(|e| {
        ConfigError::invalid(
            key,
            // The cron crate's message draws a caret under the error; its last line says why.
            format!(
                "{expr:?} is not a cron expression with seconds ({})",
                e.to_string().lines().last().unwrap_or_default()
            ),
        )
    })
}

fn validate_old_key(old: &OldKeyConfig) -> Result<(), ConfigError> {
    let key = "signing.old_keys";
    let (alg, version) = old
        .key_id
        .split_once(':')
        .ok_or_else(|| ConfigError::invalid(key, format!("{:?} is not a key id", old.key_id)))?;
    if alg != "ed25519" || !crate::keys::encoding::is_valid_key_version(version) {
        return Err(ConfigError::invalid(key, format!("{:?} is not an ed25519 key id", old.key_id)));
    }
    let bytes = crate::keys::encoding::decode_base64(&old.public_key)
        .ok_or_else(|| ConfigError::invalid(key, format!("{}: public_key is not base64", old.key_id)))?;
    if bytes.len() != 32 {
        return Err(ConfigError::invalid(key, format!("{}: public_key is not 32 bytes", old.key_id)));
    }
    Ok(())
}

/// figment errors can span several lines and name the provider; keep the first line.
fn one_line_figment_error(e: figment::Error) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or("invalid configuration").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let s = Config::default().validate().unwrap();
        assert_eq!(s.server_name.as_str(), "localhost:8008");
        assert_eq!(s.http_bind.to_string(), "127.0.0.1:8008");
        assert!(s.raw.database.url.starts_with("sqlite://"));
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut c = Config::default();
        c.http.bind = "nope".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("http.bind"), "{err}");

        let mut c = Config::default();
        c.schedule.evict_inbound = "every minute".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("schedule.evict_inbound"), "{err}");

        let mut c = Config::default();
        c.federation.destinations.insert("b.test".into(), "ftp://x".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("federation.destinations.b.test"), "{err}");

        let c = Config { server_name: "bad name!".into(), ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("server_name"));
    }
}

#[cfg(test)]
mod example_tests {
    use std::collections::BTreeSet;

    use super::*;

    const EXAMPLE: &str = include_str!("../deploy/peekgate.example.toml");

    /// `section.key` for every key of the config (maps and lists count as one key).
    fn config_keys(prefix: &str, value: &serde_json::Value, out: &mut BTreeSet<String>) {
        match value {
            serde_json::Value::Object(map) if !map.is_empty() && prefix != "federation.destinations" => {
                for (k, v) in map {
                    let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    config_keys(&path, v, out);
                }
            }
            _ => {
                out.insert(prefix.to_owned());
            }
        }
    }

    /// Keys the example documents, set or commented out (`# key = ...`).
    fn documented_keys(text: &str) -> BTreeSet<String> {
        let mut section = String::new();
        let mut out = BTreeSet::new();
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
                continue;
            }
            let line = line.trim_start_matches('#').trim();
            if let Some((key, _)) = line.split_once(" = ") {
                if key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    out.insert(if section.is_empty() { key.to_owned() } else { format!("{section}.{key}") });
                }
            }
        }
        out
    }

    #[test]
    fn example_config_documents_every_key() {
        let mut expected = BTreeSet::new();
        config_keys("", &serde_json::to_value(Config::default()).unwrap(), &mut expected);
        let documented = documented_keys(EXAMPLE);
        let missing: Vec<_> = expected.difference(&documented).collect();
        assert!(missing.is_empty(), "keys missing from deploy/peekgate.example.toml: {missing:?}");
        let unknown: Vec<_> = documented.difference(&expected).collect();
        assert!(unknown.is_empty(), "keys in the example that the config does not have: {unknown:?}");
    }

    #[test]
    fn example_config_parses_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peekgate.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        let config: Config =
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::file(&path)).extract().unwrap();
        config.validate().unwrap();
    }
}
