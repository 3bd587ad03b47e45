//! A small hostile federation peer: its own ed25519 key (ed25519-dalek, not peekgate's key
//! code), a `/_matrix/key/v2/server` endpoint that can lie in several ways, helpers to sign
//! requests correctly or incorrectly and to build signed PDUs, and a `/send` endpoint that
//! verifies everything it receives (the X-Matrix header and every PDU, with code written from
//! the spec in `verify.rs`) and records it, or fails on purpose.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use ed25519_dalek::Signer;
use reqwest::Method;
use serde_json::{json, Value};

use super::peer_room::PeerRoom;
use super::verify;

/// What the peer's key endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMode {
    /// A correct, self-signed response valid for a day.
    Good,
    /// `server_name` names another server.
    WrongServerName,
    /// Signed by a key other than the one it publishes.
    BadSelfSignature,
    /// Correctly signed, but `valid_until_ts` has passed.
    Expired,
    /// `signatures: {}`.
    EmptySignatures,
    /// The only signature is under an algorithm nobody knows.
    UnknownAlgorithmOnly,
    /// Good, and also lists `other_key` as the old key `ed25519:old` with an `expired_ts` ten
    /// years ahead.
    OldKeyFarFuture,
    /// Good, but `old_verify_keys` also lists `other_key` under the current key's ID.
    OldKeyShadowsCurrent,
}

/// The key ID [`KeyMode::OldKeyFarFuture`] publishes `other_key` under.
pub const OLD_KEY_ID: &str = "ed25519:old";

/// One transaction the peer accepted.
#[derive(Debug, Clone)]
pub struct Received {
    pub txn_id: String,
    pub origin: String,
    pub pdus: Vec<Value>,
    pub expired_peeks: Vec<Value>,
}

/// What the `/send` endpoint shares with the test.
#[derive(Default)]
pub struct Inbox {
    pub transactions: Mutex<Vec<Received>>,
    /// Every `/send` request that reached the handler, failed on purpose or not.
    pub attempts: AtomicUsize,
    /// Answer 500 to this many more requests.
    pub fail_remaining: AtomicUsize,
    /// Problems found while verifying what arrived (the tests assert this stays empty).
    pub problems: Mutex<Vec<String>>,
    /// Servers whose keys the peer may fetch: name -> base URL.
    pub key_sources: Mutex<HashMap<String, String>>,
    keys: Mutex<HashMap<String, Vec<(String, String)>>>,
    /// What `PUT /peek` answers: `(status, body)`; `None` answers 404 `M_UNRECOGNIZED`, as a
    /// server without MSC2444 (Synapse today) does.
    pub peek_answer: Mutex<Option<(u16, Value)>>,
    /// Every peek request that reached the peer: `(method, path)`.
    pub peek_requests: Mutex<Vec<(String, String)>>,
    /// When each `PUT /peek` arrived (renewals included), in order.
    pub peek_put_times: Mutex<Vec<std::time::Instant>>,
    /// A room the peer serves as a peek target (answers built from it; renewals of a peek_id
    /// it answered before get `{}`), and whose missing events it hands out.
    pub hosted: Mutex<Option<Arc<Mutex<PeerRoom>>>>,
    /// Answer 503 to every federation request (the server "disappeared").
    pub down: std::sync::atomic::AtomicBool,
    /// `get_missing_events` requests answered.
    pub missing_requests: AtomicUsize,
    /// `/send` answers only after this many milliseconds (a slow peer: transactions in flight).
    pub send_delay_ms: AtomicUsize,
    /// When set, what the key endpoint answers instead of the response the mode made.
    pub key_response: Mutex<Option<Value>>,
    /// The hosted room is served in another implementation's dialect (issue 14, OP-4.6): the
    /// peek answer has a `messages` list and no `latest_event`/`latest_event_id`, renewals get
    /// a full answer too, and the reads of a server with no member are refused with 403 except
    /// `/backfill` (which gives at most [`BACKFILL_PAGE_CAP`] events per page).
    pub dialect: std::sync::atomic::AtomicBool,
    /// `get_missing_events`, `/event` and `/state` requests refused in the dialect.
    pub refused_reads: AtomicUsize,
    /// `/backfill` requests answered.
    pub backfill_requests: AtomicUsize,
    /// `/backfill` answers carry events altered after signing (their signatures fail).
    pub forge_backfill: std::sync::atomic::AtomicBool,
    /// What `make_join` and `send_join` answer (a hostile room server, JN-6); `None`: 404.
    pub make_join_answer: Mutex<Option<Value>>,
    pub send_join_answer: Mutex<Option<Value>>,
    /// The join events `send_join` received.
    pub joins_received: Mutex<Vec<Value>>,
    /// What `/state_ids` answers, and the events `/event/{id}` serves (JN-8 state fetches),
    /// unless the peer is in the dialect.
    pub state_ids_answer: Mutex<Option<Value>>,
    pub served_events: Mutex<HashMap<String, Value>>,
}

impl Inbox {
    /// Whether the peer has fetched `server`'s keys (it checks signatures with them from then on).
    pub fn has_keys_of(&self, server: &str) -> bool {
        self.keys.lock().unwrap().get(server).is_some_and(|keys| !keys.is_empty())
    }

    /// The paths of the peek requests that used `method`.
    pub fn peek_requests(&self, method: &str) -> Vec<String> {
        self.peek_requests.lock().unwrap().iter().filter(|(m, _)| m == method).map(|(_, p)| p.clone()).collect()
    }

    /// The distinct peek_ids of the `PUT /peek` requests: one per peek, however often renewed.
    pub fn put_peek_ids(&self) -> std::collections::BTreeSet<String> {
        self.peek_requests("PUT")
            .iter()
            .map(|path| path.split('?').next().unwrap().rsplit('/').next().unwrap().to_owned())
            .collect()
    }

    /// Every PDU received, in arrival order.
    pub fn pdus(&self) -> Vec<Value> {
        self.transactions.lock().unwrap().iter().flat_map(|t| t.pdus.clone()).collect()
    }

    /// Event IDs of received PDUs of `version` (computed by the test's own code).
    pub fn event_ids(&self, version: &str) -> Vec<String> {
        self.pdus().iter().map(|p| verify::event_id(p, version)).collect()
    }

    pub fn expired_peeks(&self) -> Vec<Value> {
        self.transactions.lock().unwrap().iter().flat_map(|t| t.expired_peeks.clone()).collect()
    }

    fn problem(&self, text: String) {
        self.problems.lock().unwrap().push(text);
    }
}

pub struct TestPeer {
    pub name: String,
    pub key: ed25519_dalek::SigningKey,
    pub key_id: String,
    /// A second key the peer never publishes.
    pub other_key: ed25519_dalek::SigningKey,
    pub url: String,
    pub inbox: Arc<Inbox>,
    handle: ServerHandle,
}

fn random_key() -> ed25519_dalek::SigningKey {
    let mut seed = [0u8; 32];
    rand::fill(&mut seed);
    ed25519_dalek::SigningKey::from_bytes(&seed)
}

pub fn b64(bytes: &[u8]) -> String {
    STANDARD_NO_PAD.encode(bytes)
}

/// Canonical JSON of `value` without `signatures` and `unsigned` (what Signing JSON signs).
pub fn signing_bytes(value: &Value) -> Vec<u8> {
    let mut value = value.clone();
    if let Some(object) = value.as_object_mut() {
        object.remove("signatures");
        object.remove("unsigned");
    }
    verify::canonical(&value)
}

pub fn sign_value(key: &ed25519_dalek::SigningKey, value: &Value) -> String {
    b64(&key.sign(&signing_bytes(value)).to_bytes())
}

/// Parses `X-Matrix origin=..,destination=..,key=..,sig=..` (values quoted or bare).
fn parse_xmatrix(header: &str) -> Option<HashMap<String, String>> {
    let rest = header.strip_prefix("X-Matrix ")?;
    let mut params = HashMap::new();
    for part in rest.split(',') {
        let (name, value) = part.trim().split_once('=')?;
        params.insert(name.to_ascii_lowercase(), value.trim_matches('"').to_owned());
    }
    Some(params)
}

async fn server_keys(inbox: &Inbox, server: &str) -> Vec<(String, String)> {
    if let Some(keys) = inbox.keys.lock().unwrap().get(server) {
        return keys.clone();
    }
    let Some(base) = inbox.key_sources.lock().unwrap().get(server).cloned() else {
        return Vec::new();
    };
    let Ok(response) = reqwest::get(format!("{base}/_matrix/key/v2/server")).await else {
        return Vec::new();
    };
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let keys: Vec<(String, String)> = body["verify_keys"]
        .as_object()
        .map(|m| m.iter().map(|(id, k)| (id.clone(), k["key"].as_str().unwrap_or("").to_owned())).collect())
        .unwrap_or_default();
    inbox.keys.lock().unwrap().insert(server.to_owned(), keys.clone());
    keys
}

/// `PUT /_matrix/federation/v1/send/{txnId}`: check the X-Matrix signature and every PDU.
async fn receive(req: HttpRequest, body: web::Bytes, peer: web::Data<(String, Arc<Inbox>)>) -> HttpResponse {
    let (name, inbox) = (&peer.0, &peer.1);
    inbox.attempts.fetch_add(1, Ordering::SeqCst);
    if inbox.fail_remaining.load(Ordering::SeqCst) > 0 {
        inbox.fail_remaining.fetch_sub(1, Ordering::SeqCst);
        return HttpResponse::InternalServerError().json(json!({ "errcode": "M_UNKNOWN", "error": "down on purpose" }));
    }
    let header = req.headers().get("Authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(params) = parse_xmatrix(header) else {
        inbox.problem(format!("no X-Matrix header: {header:?}"));
        return HttpResponse::Unauthorized().finish();
    };
    let origin = params.get("origin").cloned().unwrap_or_default();
    if params.get("destination") != Some(name) {
        inbox.problem(format!("destination {:?} is not {name}", params.get("destination")));
        return HttpResponse::Unauthorized().finish();
    }
    let content: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let uri = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("");
    let object = json!({ "method": "PUT", "uri": uri, "origin": origin, "destination": name, "content": content });
    let keys = server_keys(inbox, &origin).await;
    let sig = params.get("sig").and_then(|s| STANDARD_NO_PAD.decode(s).ok()).and_then(|s| <[u8; 64]>::try_from(s).ok());
    let key = keys.iter().find(|(id, _)| Some(id) == params.get("key"));
    let verified = match (sig, key) {
        (Some(sig), Some((_, public))) => {
            let public: [u8; 32] = STANDARD_NO_PAD.decode(public).unwrap().try_into().unwrap();
            ed25519_dalek::VerifyingKey::from_bytes(&public)
                .unwrap()
                .verify_strict(&signing_bytes(&object), &ed25519_dalek::Signature::from_bytes(&sig))
                .is_ok()
        }
        _ => false,
    };
    if !verified {
        inbox.problem(format!("bad X-Matrix signature from {origin}"));
        return HttpResponse::Unauthorized().finish();
    }
    // A slow peer: it has read and authenticated the request (while the sender was surely up
    // to serve its key), and takes its time over the rest.
    let delay = inbox.send_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay as u64)).await;
    }
    let pdus = content["pdus"].as_array().cloned().unwrap_or_default();
    let mut results = serde_json::Map::new();
    for pdu in &pdus {
        let sender_server =
            pdu["sender"].as_str().and_then(|s| s.split_once(':')).map(|(_, s)| s.to_owned()).unwrap_or_default();
        let sender_keys = server_keys(inbox, &sender_server).await;
        let version = if pdu.get("origin").is_some() { "10" } else { "11" };
        if let Err(e) = verify::check_event(pdu, version, &sender_server, &sender_keys, None) {
            inbox.problem(format!("PDU {} from {sender_server} failed verification: {e}", pdu["type"]));
        }
        results.insert(verify::event_id(pdu, version), json!({}));
    }
    let txn_id = req.match_info().get("txn").unwrap_or("").to_owned();
    inbox.transactions.lock().unwrap().push(Received {
        txn_id,
        origin,
        pdus,
        expired_peeks: content["expired_peeks"].as_array().cloned().unwrap_or_default(),
    });
    HttpResponse::Ok().json(json!({ "pdus": results }))
}

/// The renewal interval a peer advertises for its hosted room: short, so failover is quick.
pub const HOSTED_RENEWAL_INTERVAL_MS: u64 = 2_000;

/// `POST /_matrix/federation/v1/get_missing_events/{roomId}` for the hosted room.
async fn missing_events(body: web::Json<Value>, peer: web::Data<(String, Arc<Inbox>)>) -> HttpResponse {
    let inbox = &peer.1;
    if inbox.down.load(Ordering::SeqCst) {
        return HttpResponse::ServiceUnavailable().finish();
    }
    let Some(room) = inbox.hosted.lock().unwrap().clone() else {
        return HttpResponse::NotFound().json(json!({ "errcode": "M_NOT_FOUND", "error": "no such room" }));
    };
    let ids = |name: &str| -> Vec<String> {
        body[name]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    if inbox.dialect.load(Ordering::SeqCst) {
        inbox.refused_reads.fetch_add(1, Ordering::SeqCst);
        return forbidden_to_non_members();
    }
    let limit = body["limit"].as_u64().unwrap_or(10) as usize;
    inbox.missing_requests.fetch_add(1, Ordering::SeqCst);
    let events = room.lock().unwrap().missing(&ids("earliest_events"), &ids("latest_events"), limit);
    HttpResponse::Ok().json(json!({ "events": events }))
}

/// Events the peer gives in one `/backfill` answer, whatever the `limit` (hosts cap it too).
pub const BACKFILL_PAGE_CAP: usize = 10;
/// Events in a dialect peek answer's `messages`.
pub const DIALECT_MESSAGES: usize = 10;

fn forbidden_to_non_members() -> HttpResponse {
    HttpResponse::Forbidden().json(json!({ "errcode": "M_FORBIDDEN", "error": "Host not in room." }))
}

/// `GET /_matrix/federation/v1/backfill/{roomId}?v=..&limit=..` for the hosted room.
async fn backfill(req: HttpRequest, peer: web::Data<(String, Arc<Inbox>)>) -> HttpResponse {
    let inbox = &peer.1;
    if inbox.down.load(Ordering::SeqCst) {
        return HttpResponse::ServiceUnavailable().finish();
    }
    let Some(room) = inbox.hosted.lock().unwrap().clone() else {
        return HttpResponse::NotFound().json(json!({ "errcode": "M_NOT_FOUND", "error": "no such room" }));
    };
    let query = req.uri().query().unwrap_or("");
    let mut from = Vec::new();
    let mut limit = 10;
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "v" => from.push(value.into_owned()),
            "limit" => limit = value.parse().unwrap_or(10),
            _ => {}
        }
    }
    inbox.backfill_requests.fetch_add(1, Ordering::SeqCst);
    let Some(mut pdus) = room.lock().unwrap().backfill(&from, limit.min(BACKFILL_PAGE_CAP)) else {
        return HttpResponse::NotFound().json(json!({ "errcode": "M_NOT_FOUND", "error": "unknown event" }));
    };
    if inbox.forge_backfill.load(Ordering::SeqCst) {
        for pdu in &mut pdus {
            pdu["origin_server_ts"] = json!(pdu["origin_server_ts"].as_i64().unwrap() + 1);
        }
    }
    HttpResponse::Ok().json(json!({
        "origin": peer.0,
        "origin_server_ts": chrono::Utc::now().timestamp_millis(),
        "pdus": pdus,
    }))
}

/// `/event`, `/state`, `/state_ids`: refused to non-members in the dialect, not served otherwise.
async fn other_reads(req: HttpRequest, peer: web::Data<(String, Arc<Inbox>)>) -> HttpResponse {
    let inbox = &peer.1;
    if inbox.dialect.load(Ordering::SeqCst) {
        inbox.refused_reads.fetch_add(1, Ordering::SeqCst);
        return forbidden_to_non_members();
    }
    let path = req.uri().path();
    if path.contains("/state_ids/") {
        if let Some(answer) = inbox.state_ids_answer.lock().unwrap().clone() {
            return HttpResponse::Ok().json(answer);
        }
    }
    if let Some(id) = path.strip_prefix("/_matrix/federation/v1/event/") {
        let id = url::form_urlencoded::parse(format!("x={id}").as_bytes()).next().unwrap().1.into_owned();
        if let Some(event) = inbox.served_events.lock().unwrap().get(&id).cloned() {
            return HttpResponse::Ok().json(json!({ "origin": peer.0, "origin_server_ts": 1, "pdus": [event] }));
        }
    }
    HttpResponse::NotFound().json(json!({ "errcode": "M_UNRECOGNIZED", "error": "Unrecognized request" }))
}

/// `GET /_matrix/federation/v1/query/directory?room_alias=`: `#lobby:{peer}` names the hosted room.
async fn directory(req: HttpRequest, peer: web::Data<(String, Arc<Inbox>)>) -> HttpResponse {
    let (name, inbox) = (&peer.0, &peer.1);
    let alias = url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "room_alias")
        .map(|(_, v)| v.into_owned());
    let room = inbox.hosted.lock().unwrap().clone();
    match room {
        Some(room) if alias.as_deref() == Some(format!("#lobby:{name}").as_str()) => {
            HttpResponse::Ok().json(json!({ "room_id": room.lock().unwrap().room_id, "servers": [name] }))
        }
        _ => HttpResponse::NotFound().json(json!({ "errcode": "M_NOT_FOUND", "error": "Room alias not found" })),
    }
}

/// `GET make_join`: the template the test set (JN-6 tests of a hostile room server).
async fn make_join(peer: web::Data<(String, Arc<Inbox>)>) -> HttpResponse {
    match peer.1.make_join_answer.lock().unwrap().clone() {
        Some(body) => HttpResponse::Ok().json(body),
        None => HttpResponse::NotFound().json(json!({ "errcode": "M_NOT_FOUND", "error": "no such room" })),
    }
}

/// `PUT /v2/send_join`: records the join and answers what the test set.
async fn send_join(body: web::Bytes, peer: web::Data<(String, Arc<Inbox>)>) -> HttpResponse {
    if let Ok(event) = serde_json::from_slice::<Value>(&body) {
        peer.1.joins_received.lock().unwrap().push(event);
    }
    match peer.1.send_join_answer.lock().unwrap().clone() {
        Some(body) => HttpResponse::Ok().json(body),
        None => HttpResponse::NotFound().json(json!({ "errcode": "M_NOT_FOUND", "error": "no such room" })),
    }
}

/// `PUT` and `DELETE /_matrix/federation/v1/peek/{roomId}/{peekId}`: the peer as a peek target
/// that answers whatever the test set (a hostile or a non-implementing server).
async fn peek_target(req: HttpRequest, peer: web::Data<(String, Arc<Inbox>)>) -> HttpResponse {
    let inbox = &peer.1;
    if inbox.down.load(Ordering::SeqCst) {
        return HttpResponse::ServiceUnavailable().finish();
    }
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("").to_owned();
    let bare = path.split('?').next().unwrap_or("").to_owned();
    let seen =
        inbox.peek_requests.lock().unwrap().iter().any(|(m, p)| m == "PUT" && p.split('?').next() == Some(&bare));
    inbox.peek_requests.lock().unwrap().push((req.method().to_string(), path));
    if req.method() == actix_web::http::Method::PUT {
        inbox.peek_put_times.lock().unwrap().push(std::time::Instant::now());
    }
    if req.method() == actix_web::http::Method::DELETE {
        return HttpResponse::Ok().json(json!({}));
    }
    if let Some(room) = inbox.hosted.lock().unwrap().clone() {
        let answer = if inbox.dialect.load(Ordering::SeqCst) {
            room.lock().unwrap().dialect_peek_answer(HOSTED_RENEWAL_INTERVAL_MS, DIALECT_MESSAGES)
        } else if seen {
            json!({})
        } else {
            room.lock().unwrap().peek_answer(HOSTED_RENEWAL_INTERVAL_MS)
        };
        return HttpResponse::Ok().json(answer);
    }
    match inbox.peek_answer.lock().unwrap().clone() {
        Some((status, body)) => HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap()).json(body),
        None => HttpResponse::NotFound().json(json!({ "errcode": "M_UNRECOGNIZED", "error": "Unrecognized request" })),
    }
}

impl TestPeer {
    pub fn start(name: &str, mode: KeyMode) -> TestPeer {
        let key = random_key();
        let other_key = random_key();
        let key_id = "ed25519:p1".to_owned();
        let response = key_response(name, &key, &key_id, &other_key, mode);
        let inbox = Arc::new(Inbox::default());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let data = web::Data::new((name.to_owned(), inbox.clone()));
        let server = HttpServer::new(move || {
            let response = response.clone();
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(16 * 1024 * 1024))
                .route(
                    "/_matrix/key/v2/server",
                    web::get().to(move |peer: web::Data<(String, Arc<Inbox>)>| {
                        let answer = peer.1.key_response.lock().unwrap().clone();
                        let response = answer.unwrap_or_else(|| response.clone());
                        async move { HttpResponse::Ok().json(response) }
                    }),
                )
                .route("/_matrix/federation/v1/send/{txn}", web::put().to(receive))
                .route("/_matrix/federation/v1/make_join/{room}/{user}", web::get().to(make_join))
                .route("/_matrix/federation/v2/send_join/{room}/{event}", web::put().to(send_join))
                .route("/_matrix/federation/v1/peek/{room}/{peek_id}", web::put().to(peek_target))
                .route("/_matrix/federation/v1/peek/{room}/{peek_id}", web::delete().to(peek_target))
                .route("/_matrix/federation/v1/get_missing_events/{room}", web::post().to(missing_events))
                .route("/_matrix/federation/v1/backfill/{room}", web::get().to(backfill))
                .route("/_matrix/federation/v1/event/{event}", web::get().to(other_reads))
                .route("/_matrix/federation/v1/state/{room}", web::get().to(other_reads))
                .route("/_matrix/federation/v1/state_ids/{room}", web::get().to(other_reads))
                .route("/_matrix/federation/v1/query/directory", web::get().to(directory))
        })
        .disable_signals()
        .workers(1)
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        TestPeer { name: name.to_owned(), key, key_id, other_key, url, inbox, handle }
    }

    /// Lets the peer fetch `server`'s keys from `base_url` (to verify what it receives).
    pub fn trust(&self, server: &str, base_url: &str) {
        self.inbox.key_sources.lock().unwrap().insert(server.to_owned(), base_url.to_owned());
    }

    /// The peer's published keys, as `(key_id, public key)`.
    pub fn public_keys(&self) -> Vec<(String, String)> {
        vec![(self.key_id.clone(), b64(self.key.verifying_key().as_bytes()))]
    }

    /// The object X-Matrix signs, built independently of peekgate's code.
    pub fn request_object(&self, method: &str, uri: &str, destination: &str, content: Option<&Value>) -> Value {
        let mut object = json!({
            "method": method,
            "uri": uri,
            "origin": self.name,
            "destination": destination,
        });
        if let Some(content) = content {
            object["content"] = content.clone();
        }
        object
    }

    /// The key ID [`TestPeer::rotate`] publishes `other_key` under.
    pub const ROTATED_KEY_ID: &'static str = "ed25519:rotated";

    /// The peer's key endpoint publishes `other_key` under [`TestPeer::ROTATED_KEY_ID`] from
    /// now on (self-signed by it), as after a key rotation.
    pub fn rotate(&self) {
        let response = key_response(&self.name, &self.other_key, Self::ROTATED_KEY_ID, &self.key, KeyMode::Good);
        *self.inbox.key_response.lock().unwrap() = Some(response);
    }

    /// A correct `Authorization` header for the request.
    pub fn authorization(&self, method: &str, uri: &str, destination: &str, content: Option<&Value>) -> String {
        let sig = sign_value(&self.key, &self.request_object(method, uri, destination, content));
        format!("X-Matrix origin=\"{}\",destination=\"{destination}\",key=\"{}\",sig=\"{sig}\"", self.name, self.key_id)
    }

    /// Sends a correctly signed request to a gateway and returns `(status, JSON body)`.
    pub async fn call(
        &self,
        base: &str,
        destination: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        peekgate::app::install_crypto_provider();
        let auth = self.authorization(method.as_str(), path, destination, body);
        let mut req = reqwest::Client::new().request(method, format!("{base}{path}")).header("Authorization", auth);
        if let Some(body) = body {
            req = req.json(body);
        }
        let response = req.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Sends `pdus` to a gateway in one signed transaction, as a peek target relays them.
    pub async fn send_transaction(&self, base: &str, destination: &str, pdus: Vec<Value>) -> (u16, Value) {
        let txn = uuid::Uuid::new_v4().simple().to_string();
        let body =
            json!({ "origin": self.name, "origin_server_ts": chrono::Utc::now().timestamp_millis(), "pdus": pdus });
        self.call(base, destination, Method::PUT, &format!("/_matrix/federation/v1/send/{txn}"), Some(&body)).await
    }

    /// A PDU authored by `@{localpart}:{peer}`, hashed and signed by the peer (spec algorithm,
    /// the test's own code). Returns the PDU and its event ID.
    #[allow(clippy::too_many_arguments)]
    pub fn build_pdu(
        &self,
        version: &str,
        room_id: &str,
        localpart: &str,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
        auth_events: &[String],
        prev_events: &[String],
        depth: i64,
    ) -> (Value, String) {
        let event = (kind, state_key, content);
        self.build_pdu_with(version, room_id, localpart, event, auth_events, prev_events, depth, &[])
    }

    /// [`TestPeer::build_pdu`] with extra top-level fields (a v10 redaction's `redacts`).
    #[allow(clippy::too_many_arguments)]
    pub fn build_pdu_with(
        &self,
        version: &str,
        room_id: &str,
        localpart: &str,
        (kind, state_key, content): (&str, Option<&str>, Value),
        auth_events: &[String],
        prev_events: &[String],
        depth: i64,
        extra: &[(&str, Value)],
    ) -> (Value, String) {
        let mut pdu = json!({
            "room_id": room_id,
            "sender": format!("@{localpart}:{}", self.name),
            "type": kind,
            "content": content,
            "auth_events": auth_events,
            "prev_events": prev_events,
            "depth": depth,
            "origin_server_ts": chrono::Utc::now().timestamp_millis(),
        });
        if let Some(state_key) = state_key {
            pdu["state_key"] = Value::from(state_key);
        }
        if version == "10" {
            pdu["origin"] = Value::from(self.name.clone());
        }
        for (key, value) in extra {
            pdu[*key] = value.clone();
        }
        pdu["hashes"] = json!({ "sha256": verify::content_hash(&pdu) });
        let redacted = verify::redact(&pdu, version);
        pdu["signatures"] = json!({ self.name.clone(): { self.key_id.clone(): sign_value(&self.key, &redacted) } });
        let id = verify::event_id(&pdu, version);
        (pdu, id)
    }

    /// Completes an event template (a `make_join`/`make_leave` answer) as the joining server
    /// does: a fresh `origin_server_ts`, then our content hash and signature. Returns the
    /// event and its ID.
    pub fn complete_template(&self, template: &Value, version: &str) -> (Value, String) {
        let mut pdu = template.clone();
        pdu["origin_server_ts"] = Value::from(chrono::Utc::now().timestamp_millis());
        pdu["hashes"] = json!({ "sha256": verify::content_hash(&pdu) });
        let redacted = verify::redact(&pdu, version);
        pdu["signatures"] = json!({ self.name.clone(): { self.key_id.clone(): sign_value(&self.key, &redacted) } });
        let id = verify::event_id(&pdu, version);
        (pdu, id)
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}

fn key_response(
    name: &str,
    key: &ed25519_dalek::SigningKey,
    key_id: &str,
    other_key: &ed25519_dalek::SigningKey,
    mode: KeyMode,
) -> Value {
    let now = chrono::Utc::now().timestamp_millis();
    let valid_until = if mode == KeyMode::Expired { now - 60_000 } else { now + 86_400_000 };
    let server_name = if mode == KeyMode::WrongServerName { "someone-else.test" } else { name };
    let far_future = now + 10 * 365 * 86_400_000;
    let other = b64(other_key.verifying_key().as_bytes());
    let old_verify_keys = match mode {
        KeyMode::OldKeyFarFuture => json!({ OLD_KEY_ID: { "key": other, "expired_ts": far_future } }),
        KeyMode::OldKeyShadowsCurrent => json!({ key_id: { "key": other, "expired_ts": far_future } }),
        _ => json!({}),
    };
    let mut response = json!({
        "server_name": server_name,
        "verify_keys": { key_id: { "key": b64(key.verifying_key().as_bytes()) } },
        "old_verify_keys": old_verify_keys,
        "valid_until_ts": valid_until,
    });
    let signer = if mode == KeyMode::BadSelfSignature { other_key } else { key };
    let sig = sign_value(signer, &response);
    response["signatures"] = match mode {
        KeyMode::EmptySignatures => json!({}),
        KeyMode::UnknownAlgorithmOnly => json!({ name: { "curve25519:p1": sig } }),
        _ => json!({ server_name: { key_id: sig } }),
    };
    response
}
