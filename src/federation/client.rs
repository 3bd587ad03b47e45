//! The outbound federation client: resolves a server name (or uses the configured
//! `federation.destinations` override), signs the request with X-Matrix, bounds the time and
//! the response size, and never connects to an address the [`AddressPolicy`] refuses.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use reqwest::{redirect, Method};
use ruma::{OwnedServerName, ServerName};
use serde_json::Value;
use url::Url;

use super::resolve::{AddressPolicy, Dns, ResolveError, ResolvedServer, Resolver, WellKnownFetcher};
use crate::config::Settings;
use crate::keys::signing::SigningKey;
use crate::xmatrix;

#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error("cannot resolve {server}: {source}")]
    Resolve { server: String, source: ResolveError },
    #[error("request to {server} failed: {reason}")]
    Transport { server: String, reason: String },
    #[error("response from {server} exceeds {limit} bytes")]
    TooLarge { server: String, limit: usize },
    #[error("response from {server} is not a JSON object")]
    NotJson { server: String },
    #[error("{server} answered {status} {errcode}")]
    Status { server: String, status: u16, errcode: String, body: Value },
    #[error("request body is not canonical JSON: {0}")]
    BadBody(String),
}

impl FederationError {
    /// The HTTP status of a remote error answer, if that is what this is.
    pub fn status(&self) -> Option<u16> {
        match self {
            FederationError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Names pinned at most (H14).
const PINNED_MAX: usize = 10_000;

/// DNS for the guarded HTTP client: names pinned by server-name resolution answer from the
/// pin; any other name (a well-known host) is looked up and filtered by the policy.
///
/// Pinned names kept at most ([`PINNED_MAX`]).
struct GuardedDns {
    pinned: Mutex<HashMap<String, Vec<IpAddr>>>,
    dns: Arc<dyn Dns>,
    policy: AddressPolicy,
}

impl GuardedDns {
    fn pin(&self, host: &str, addrs: Vec<IpAddr>) {
        let mut pinned = self.pinned.lock().unwrap();
        if pinned.len() >= PINNED_MAX {
            // H14: a pin is made again by the next resolution of its name; a forgotten one
            // only costs a policy-filtered lookup.
            pinned.clear();
        }
        pinned.insert(host.to_ascii_lowercase(), addrs);
    }
}

/// reqwest's handle on [`GuardedDns`].
struct GuardedResolve(Arc<GuardedDns>);

impl Resolve for GuardedResolve {
    fn resolve(&self, name: Name) -> Resolving {
        let this = self.0.clone();
        let host = name.as_str().to_ascii_lowercase();
        Box::pin(async move {
            let pinned = this.pinned.lock().unwrap().get(&host).cloned();
            let ips = match pinned {
                Some(ips) => ips,
                None => {
                    let resolver = Resolver::new(this.dns.clone(), this.policy.clone());
                    resolver.lookup_permitted(&host).await?
                }
            };
            let addrs: Addrs = Box::new(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// A request to send; `path` is the full path and query, already percent-encoded.
pub struct FedRequest<'a> {
    pub method: Method,
    pub destination: &'a ServerName,
    pub path: &'a str,
    pub body: Option<Value>,
    pub signed: bool,
}

pub struct FederationClient {
    origin: OwnedServerName,
    key: Arc<SigningKey>,
    /// For resolved destinations: connects only to policy-checked addresses.
    guarded: reqwest::Client,
    /// For operator-configured `federation.destinations` overrides, which are trusted.
    direct: reqwest::Client,
    guarded_dns: Arc<GuardedDns>,
    resolver: Resolver,
    destinations: BTreeMap<OwnedServerName, Url>,
    pub(super) max_response_bytes: usize,
    /// TLS for the sender's own HTTP/1.1 connections (ALPN `http/1.1`).
    pub(super) http1_tls: Arc<rustls::ClientConfig>,
    pub(super) connect_timeout: Duration,
    pub(super) request_timeout: Duration,
}

/// Where requests for a destination go (see [`FederationClient::way_to`]).
enum Way<'a> {
    Override(&'a Url),
    Resolved(ResolvedServer),
}

/// Where [`FederationClient::connect_target`] says to connect.
pub(super) struct ConnectTarget {
    pub addrs: Vec<SocketAddr>,
    /// The name the certificate must be valid for; `None`: plain HTTP (an operator override).
    pub tls: Option<String>,
    pub host_header: String,
    /// The path of an override URL, put before every request path.
    pub path_prefix: String,
}

pub(super) const USER_AGENT: &str = concat!("peekgate/", env!("CARGO_PKG_VERSION"));

/// The client TLS configuration reqwest would build: the process's crypto provider, every TLS
/// version, the platform's certificate verifier, or none with `accept_invalid_certs` (tests and
/// private federations).
fn tls_config(accept_invalid_certs: bool) -> Result<rustls::ClientConfig, FederationError> {
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| transport("(client)", e))?
        .dangerous();
    let builder = if accept_invalid_certs {
        builder.with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
    } else {
        let verifier = rustls_platform_verifier::Verifier::new(provider).map_err(|e| transport("(client)", e))?;
        builder.with_custom_certificate_verifier(Arc::new(verifier))
    };
    Ok(builder.with_no_client_auth())
}

fn http1_tls(mut tls: rustls::ClientConfig) -> rustls::ClientConfig {
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls
}

/// `federation.accept_invalid_certs`: any certificate is taken (reqwest's own switch does the
/// same); signatures on the handshake are not checked either.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.verify_tls12_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl FederationClient {
    pub fn new(settings: &Settings, key: Arc<SigningKey>, dns: Arc<dyn Dns>) -> Result<Self, FederationError> {
        let fed = &settings.raw.federation;
        let policy =
            AddressPolicy { allow_private: fed.allow_private_ranges, allowed: settings.allowed_ranges.clone() };
        let guarded_dns =
            Arc::new(GuardedDns { pinned: Mutex::new(HashMap::new()), dns: dns.clone(), policy: policy.clone() });
        // One TLS configuration for reqwest and for the sender's own connections
        // (`federation::connection`), so both verify certificates the same way.
        let tls = tls_config(fed.accept_invalid_certs)?;
        let mut reqwest_tls = tls.clone();
        reqwest_tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let builder = || {
            reqwest::Client::builder()
                .user_agent(USER_AGENT)
                .timeout(Duration::from_millis(fed.request_timeout_ms))
                .connect_timeout(Duration::from_millis(fed.connect_timeout_ms))
                .use_preconfigured_tls(reqwest_tls.clone())
                .no_proxy()
        };
        // Redirects are never followed (H15): a federation answer or a well-known answer that
        // redirects is an error, so no remote can bounce us to an address or scheme of its choice.
        let guarded = builder()
            .dns_resolver(GuardedResolve(guarded_dns.clone()))
            .redirect(redirect::Policy::none())
            .build()
            .map_err(|e| transport("(client)", e))?;
        let direct = builder().redirect(redirect::Policy::none()).build().map_err(|e| transport("(client)", e))?;
        Ok(FederationClient {
            origin: settings.server_name.clone(),
            key,
            guarded,
            direct,
            guarded_dns,
            resolver: Resolver::new(dns, policy),
            destinations: settings.destinations.clone(),
            max_response_bytes: fed.max_response_bytes,
            http1_tls: Arc::new(http1_tls(tls)),
            connect_timeout: Duration::from_millis(fed.connect_timeout_ms),
            request_timeout: Duration::from_millis(fed.request_timeout_ms),
        })
    }

    /// Where a connection of our own to `destination` goes (`federation::connection`): the
    /// addresses (policy-checked, unless an operator override names them), the TLS server name
    /// when it is TLS, the `Host` header, and the path prefix of an override URL. The same
    /// choice [`FederationClient::target`] makes for reqwest.
    pub(super) async fn connect_target(&self, destination: &ServerName) -> Result<ConnectTarget, FederationError> {
        let server = destination.as_str();
        match self.way_to(destination).await? {
            Way::Override(base) => {
                let host = base.host_str().ok_or_else(|| transport(server, "override URL has no host"))?;
                let port = base.port_or_known_default().ok_or_else(|| transport(server, "override URL has no port"))?;
                let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
                let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
                    Ok(ip) => vec![SocketAddr::new(ip, port)],
                    // Operator-configured overrides are trusted, as for reqwest's direct client.
                    Err(_) => tokio::net::lookup_host((host.as_str(), port))
                        .await
                        .map_err(|e| transport(server, e))?
                        .collect(),
                };
                let tls = (base.scheme() == "https").then_some(host);
                let prefix = base.path().trim_end_matches('/').to_owned();
                Ok(ConnectTarget { addrs, tls, host_header: server.to_owned(), path_prefix: prefix })
            }
            Way::Resolved(resolved) => {
                let addrs = resolved.addrs.iter().map(|ip| SocketAddr::new(*ip, resolved.port)).collect();
                let host = resolved.url_host.trim_start_matches('[').trim_end_matches(']').to_owned();
                Ok(ConnectTarget {
                    addrs,
                    tls: Some(host),
                    host_header: resolved.host_header,
                    path_prefix: String::new(),
                })
            }
        }
    }

    /// The one choice both clients make: a `federation.destinations` override, else server-name
    /// resolution (whose addresses are already checked against the address policy).
    async fn way_to(&self, destination: &ServerName) -> Result<Way<'_>, FederationError> {
        if let Some(base) = self.destinations.get(destination) {
            return Ok(Way::Override(base));
        }
        self.resolver
            .resolve(destination, self)
            .await
            .map(Way::Resolved)
            .map_err(|source| FederationError::Resolve { server: destination.as_str().to_owned(), source })
    }

    /// The X-Matrix header of a request from us to `destination`.
    pub(super) fn authorization(&self, destination: &str, method: &str, path: &str, content: Option<&str>) -> String {
        xmatrix::authorization_header(&self.key, self.origin.as_str(), destination, method, path, content)
    }

    /// The X-Matrix headers of one `PUT` body for many destinations (the fan-out's `/send`).
    pub fn put_authorization(&self, path: &str, content: &str) -> xmatrix::SharedBodyAuthorization {
        xmatrix::SharedBodyAuthorization::new(&self.key, self.origin.as_str(), "PUT", path, content)
    }

    pub fn origin(&self) -> &ServerName {
        &self.origin
    }

    /// A signed GET.
    pub async fn get(&self, destination: &ServerName, path: &str) -> Result<Value, FederationError> {
        self.send(FedRequest { method: Method::GET, destination, path, body: None, signed: true }).await
    }

    /// An unsigned GET (key endpoints need no authentication).
    pub async fn get_unsigned(&self, destination: &ServerName, path: &str) -> Result<Value, FederationError> {
        self.send(FedRequest { method: Method::GET, destination, path, body: None, signed: false }).await
    }

    /// An unsigned GET that also returns the answer's `Date` header (clock-skew diagnostics).
    pub async fn get_unsigned_dated(
        &self,
        destination: &ServerName,
        path: &str,
    ) -> Result<(Value, Option<String>), FederationError> {
        let server = destination.as_str();
        let (client, url, host_header) = self.target(destination, path).await?;
        let mut builder = client.get(url);
        if let Some(host) = host_header {
            builder = builder.header(HOST, HeaderValue::from_str(&host).map_err(|e| transport(server, e))?);
        }
        self.execute_dated(server, builder).await
    }

    /// Where requests for `destination` go: the base URL, the `Host` header, and whether a
    /// `federation.destinations` override or server-name resolution chose it.
    pub async fn route(&self, destination: &ServerName) -> Result<String, FederationError> {
        let (_, url, host) = self.target(destination, "/").await?;
        let how = if self.destinations.contains_key(destination) {
            "federation.destinations override"
        } else {
            "server-name resolution"
        };
        Ok(format!("{url} (Host: {}; {how})", host.unwrap_or_default()))
    }

    /// Sends the request and returns the JSON object of a 2xx answer; any other status is
    /// [`FederationError::Status`] with the remote `errcode`.
    pub async fn send(&self, request: FedRequest<'_>) -> Result<Value, FederationError> {
        let server = request.destination.as_str();
        let (client, url, host_header) = self.target(request.destination, request.path).await?;
        let mut builder = client.request(request.method.clone(), url);
        if let Some(host) = host_header {
            let value = HeaderValue::from_str(&host).map_err(|e| transport(server, e))?;
            builder = builder.header(HOST, value);
        }
        let body_bytes = match &request.body {
            Some(body) => Some(serde_json::to_vec(body).map_err(|e| FederationError::BadBody(e.to_string()))?),
            None => None,
        };
        if request.signed {
            let content = match &request.body {
                Some(body) => Some(
                    crate::canonical_json::encode_value(body.clone())
                        .map_err(|e| FederationError::BadBody(e.to_string()))?,
                ),
                None => None,
            };
            let header = xmatrix::authorization_header(
                &self.key,
                self.origin.as_str(),
                server,
                request.method.as_str(),
                request.path,
                content.as_deref(),
            );
            builder = builder.header(AUTHORIZATION, header);
        }
        if let Some(bytes) = body_bytes {
            builder = builder.header(CONTENT_TYPE, "application/json").body(bytes);
        }
        self.execute(server, builder).await
    }

    /// Sends a built request: the JSON object of a 2xx answer, or [`FederationError::Status`].
    async fn execute(&self, server: &str, builder: reqwest::RequestBuilder) -> Result<Value, FederationError> {
        self.execute_dated(server, builder).await.map(|(body, _)| body)
    }

    /// Like [`FederationClient::execute`], also returning the answer's `Date` header.
    async fn execute_dated(
        &self,
        server: &str,
        builder: reqwest::RequestBuilder,
    ) -> Result<(Value, Option<String>), FederationError> {
        let response = builder.send().await.map_err(|e| transport(server, e))?;
        let status = response.status().as_u16();
        if response.status().is_redirection() {
            return Err(transport(server, format!("answered {status} (a redirect, which is not followed)")));
        }
        let date = response.headers().get(reqwest::header::DATE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = self.read_json(server, response).await?;
        if (200..300).contains(&status) {
            Ok((body, date))
        } else {
            let errcode = body.get("errcode").and_then(Value::as_str).unwrap_or("").to_owned();
            Err(FederationError::Status { server: server.to_owned(), status, errcode, body })
        }
    }

    /// Chooses client, URL and `Host` header: a configured override, or spec resolution.
    async fn target(
        &self,
        destination: &ServerName,
        path: &str,
    ) -> Result<(&reqwest::Client, Url, Option<String>), FederationError> {
        let server = destination.as_str();
        let resolved = match self.way_to(destination).await? {
            Way::Override(base) => {
                let url = join(base, path).map_err(|e| transport(server, e))?;
                return Ok((&self.direct, url, Some(server.to_owned())));
            }
            Way::Resolved(resolved) => resolved,
        };
        if resolved.url_host.parse::<IpAddr>().is_err() && !resolved.url_host.starts_with('[') {
            self.guarded_dns.pin(&resolved.url_host, resolved.addrs.clone());
        }
        let base = Url::parse(&format!("https://{}:{}/", resolved.url_host, resolved.port))
            .map_err(|e| transport(server, e))?;
        let url = join(&base, path).map_err(|e| transport(server, e))?;
        Ok((&self.guarded, url, Some(resolved.host_header)))
    }

    /// Reads at most `max_response_bytes` and parses a JSON object.
    async fn read_json(&self, server: &str, response: reqwest::Response) -> Result<Value, FederationError> {
        read_json_limited(server, response, self.max_response_bytes).await
    }
}

/// Reads at most `limit` bytes of a response and parses a JSON object.
async fn read_json_limited(
    server: &str,
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Value, FederationError> {
    let too_large = || FederationError::TooLarge { server: server.to_owned(), limit };
    if response.content_length().is_some_and(|len| len as usize > limit) {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| transport(server, e))? {
        if bytes.len() + chunk.len() > limit {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(value) if value.is_object() => Ok(value),
        _ => Err(FederationError::NotJson { server: server.to_owned() }),
    }
}

/// The largest `.well-known/matrix/server` answer read (H15); real ones are a few dozen bytes.
pub const WELL_KNOWN_MAX_BYTES: usize = 64 * 1024;

#[async_trait]
impl WellKnownFetcher for FederationClient {
    async fn fetch_well_known(&self, host: &str) -> Option<String> {
        let url = Url::parse(&format!("https://{host}/.well-known/matrix/server")).ok()?;
        let response = self.guarded.get(url).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let limit = WELL_KNOWN_MAX_BYTES.min(self.max_response_bytes);
        let body = read_json_limited(host, response, limit).await.ok()?;
        body.get("m.server").and_then(Value::as_str).map(str::to_owned)
    }
}

/// Joins a path-and-query (starting with `/`) to a base URL, keeping its percent-encoding.
fn join(base: &Url, path: &str) -> Result<Url, url::ParseError> {
    let base = base.as_str().trim_end_matches('/');
    Url::parse(&format!("{base}{path}"))
}

pub(super) fn transport(server: &str, e: impl std::fmt::Display) -> FederationError {
    FederationError::Transport { server: server.to_owned(), reason: e.to_string() }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use actix_web::{web, App, HttpResponse, HttpServer};

    use super::*;
    use crate::federation::resolve::HickoryDns;

    /// A client for resolved destinations that may reach 127.0.0.1 (private ranges allowed,
    /// self-signed certificates accepted), as an operator could configure it.
    fn loopback_client() -> FederationClient {
        crate::app::install_crypto_provider();
        let mut config = crate::config::Config::default();
        config.federation.allow_private_ranges = true;
        config.federation.accept_invalid_certs = true;
        let settings = config.validate().unwrap();
        FederationClient::new(&settings, Arc::new(SigningKey::generate()), Arc::new(HickoryDns::from_system())).unwrap()
    }

    /// A TLS server on 127.0.0.1 that redirects `/redirect` to `target` and serves a well-known
    /// answer of about `well_known_bytes`; its port.
    fn tls_server(target: String, well_known_bytes: usize) -> u16 {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let well_known =
            serde_json::json!({ "m.server": "delegated.example:443", "pad": "x".repeat(well_known_bytes) });
        let server = HttpServer::new(move || {
            let target = target.clone();
            let well_known = well_known.clone();
            App::new()
                .route(
                    "/redirect",
                    web::to(move || {
                        let target = target.clone();
                        async move { HttpResponse::Found().insert_header(("Location", target)).finish() }
                    }),
                )
                .route(
                    "/.well-known/matrix/server",
                    web::to(move || {
                        let body = well_known.clone();
                        async move { HttpResponse::Ok().json(body) }
                    }),
                )
        })
        .workers(1)
        .disable_signals()
        .listen_rustls_0_23(listener, tls)
        .unwrap()
        .run();
        tokio::spawn(server);
        port
    }

    /// H15: a redirect is never followed, not even to plain `http://` on an allowed address.
    #[tokio::test]
    async fn redirects_are_not_followed() {
        let hits = Arc::new(AtomicUsize::new(0));
        let plain = TcpListener::bind("127.0.0.1:0").unwrap();
        let plain_port = plain.local_addr().unwrap().port();
        let counter = hits.clone();
        let server = HttpServer::new(move || {
            let counter = counter.clone();
            App::new().default_service(web::to(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async { HttpResponse::Ok().json(serde_json::json!({ "followed": true })) }
            }))
        })
        .workers(1)
        .disable_signals()
        .listen(plain)
        .unwrap()
        .run();
        tokio::spawn(server);
        let port = tls_server(format!("http://127.0.0.1:{plain_port}/_matrix/key/v2/server"), 0);
        let client = loopback_client();
        let destination = OwnedServerName::try_from(format!("127.0.0.1:{port}")).unwrap();
        let result = client.get_unsigned(&destination, "/redirect").await;
        assert!(result.is_err(), "the redirect was followed: {result:?}");
        assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect target was contacted");
    }

    /// H15: `.well-known/matrix/server` answers are read only up to a small limit.
    #[tokio::test]
    async fn well_known_answers_are_bounded() {
        let client = loopback_client();
        let small = tls_server(String::new(), 100);
        let host = format!("127.0.0.1:{small}");
        assert_eq!(client.fetch_well_known(&host).await.as_deref(), Some("delegated.example:443"));
        let large = tls_server(String::new(), WELL_KNOWN_MAX_BYTES);
        let host = format!("127.0.0.1:{large}");
        assert_eq!(client.fetch_well_known(&host).await, None, "an oversized well-known answer is refused");
    }

    #[test]
    fn join_keeps_encoding_and_query() {
        let base = Url::parse("http://127.0.0.1:9008").unwrap();
        let url = join(&base, "/_matrix/federation/v1/peek/%21r%3Ax/ab?ver=10&ver=11").unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:9008/_matrix/federation/v1/peek/%21r%3Ax/ab?ver=10&ver=11");
    }
}
