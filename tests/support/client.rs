//! A small Matrix client for tests: real HTTP against a test server's client API.

use reqwest::Method;
use serde_json::{json, Value};

pub struct Client {
    pub base: String,
    pub token: Option<String>,
    pub user_id: String,
    pub device_id: String,
    http: reqwest::Client,
}

pub fn http() -> reqwest::Client {
    peekgate::app::install_crypto_provider();
    reqwest::Client::new()
}

/// Sends a request and returns `(status, JSON body)`.
pub async fn request(
    base: &str,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut req = http().request(method, format!("{base}{path}"));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.json(body);
    }
    let response = req.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Percent-encodes one path segment (room IDs, aliases, state keys).
pub fn enc(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect::<String>().replace('+', "%20")
}

impl Client {
    /// Registers `localpart` through the m.login.dummy flow (registration must be open).
    pub async fn register(base: &str, localpart: &str) -> Client {
        let body = json!({ "username": localpart, "password": "pw-123456", "auth": { "type": "m.login.dummy" } });
        let (status, answer) = request(base, None, Method::POST, "/_matrix/client/v3/register", Some(&body)).await;
        assert_eq!(status, 200, "register {localpart}: {answer}");
        Client::from_session(base, &answer)
    }

    /// A client for the session a register or login answer opened.
    fn from_session(base: &str, answer: &Value) -> Client {
        Client {
            base: base.to_owned(),
            token: answer["access_token"].as_str().map(str::to_owned),
            user_id: answer["user_id"].as_str().unwrap().to_owned(),
            device_id: answer["device_id"].as_str().unwrap().to_owned(),
            http: http(),
        }
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let response = req.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `createRoom`, returning whatever the server answered.
    pub async fn create_room_raw(&self, body: Value) -> (u16, Value) {
        self.call(Method::POST, "/_matrix/client/v3/createRoom", Some(&body)).await
    }

    /// `createRoom`; panics unless it succeeds.
    pub async fn create_room(&self, body: Value) -> String {
        let (status, answer) = self.call(Method::POST, "/_matrix/client/v3/createRoom", Some(&body)).await;
        assert_eq!(status, 200, "createRoom: {answer}");
        answer["room_id"].as_str().unwrap().to_owned()
    }

    /// A world-readable public room with `alias`.
    pub async fn create_world_readable_room(&self, alias: &str, version: &str) -> String {
        self.create_room(json!({
            "preset": "public_chat",
            "room_alias_name": alias,
            "room_version": version,
            "initial_state": [{ "type": "m.room.history_visibility", "content": { "history_visibility": "world_readable" } }],
        }))
        .await
    }

    pub async fn send_message(&self, room_id: &str, txn: &str, body: &str) -> (u16, Value) {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room_id));
        self.call(Method::PUT, &path, Some(&json!({ "msgtype": "m.text", "body": body }))).await
    }

    /// Sends a message and returns its event ID; panics unless it succeeds.
    pub async fn say(&self, room_id: &str, body: &str) -> String {
        let txn = uuid::Uuid::new_v4().simple().to_string();
        let (status, answer) = self.send_message(room_id, &txn, body).await;
        assert_eq!(status, 200, "send: {answer}");
        answer["event_id"].as_str().unwrap().to_owned()
    }

    pub async fn put_state(&self, room_id: &str, kind: &str, state_key: &str, content: Value) -> (u16, Value) {
        let path = format!("/_matrix/client/v3/rooms/{}/state/{kind}/{}", enc(room_id), enc(state_key));
        self.call(Method::PUT, &path, Some(&content)).await
    }

    pub async fn join(&self, room_id_or_alias: &str) -> (u16, Value) {
        self.call(Method::POST, &format!("/_matrix/client/v3/join/{}", enc(room_id_or_alias)), Some(&json!({}))).await
    }

    /// The message bodies of a room as this user reads them (`/messages`), oldest first.
    pub async fn bodies(&self, room_id: &str) -> Vec<String> {
        let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(room_id));
        let (status, answer) = self.call(Method::GET, &path, None).await;
        assert_eq!(status, 200, "/messages: {answer}");
        chunk_bodies(&answer)
    }

    /// Logs in as the same user again: a second device.
    pub async fn login_device(&self) -> Client {
        let localpart = self.user_id.trim_start_matches('@').split(':').next().unwrap().to_owned();
        Client::login(&self.base, &localpart).await
    }

    /// Logs in with the password every test user has (`pw-123456`).
    pub async fn login(base: &str, localpart: &str) -> Client {
        let body = json!({
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": localpart },
            "password": "pw-123456",
        });
        let (status, answer) = request(base, None, Method::POST, "/_matrix/client/v3/login", Some(&body)).await;
        assert_eq!(status, 200, "login: {answer}");
        Client::from_session(base, &answer)
    }

    /// `POST /peek/{roomIdOrAlias}` with `server_name` query parameters.
    pub async fn peek(&self, target: &str, servers: &[&str]) -> (u16, Value) {
        let query: Vec<String> = servers.iter().map(|s| format!("server_name={}", enc(s))).collect();
        let path = format!("/_matrix/client/v3/peek/{}?{}", enc(target), query.join("&"));
        self.call(Method::POST, &path, Some(&json!({}))).await
    }

    pub async fn unpeek(&self, room_id: &str) -> (u16, Value) {
        self.call(Method::POST, &format!("/_matrix/client/v3/rooms/{}/unpeek", enc(room_id)), Some(&json!({}))).await
    }

    /// `GET /sync`; panics unless it answers 200. Timelines hold up to 100 events.
    pub async fn sync(&self, since: Option<&str>, timeout_ms: u64) -> Value {
        let filter = enc(r#"{"room":{"timeline":{"limit":100}}}"#);
        let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}&filter={filter}");
        if let Some(since) = since {
            path = format!("{path}&since={}", enc(since));
        }
        let (status, answer) = self.call(Method::GET, &path, None).await;
        assert_eq!(status, 200, "sync: {answer}");
        answer
    }
}

/// The message bodies of a backwards `/messages` answer, oldest first.
pub fn chunk_bodies(answer: &Value) -> Vec<String> {
    let mut bodies: Vec<String> = answer["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect();
    bodies.reverse();
    bodies
}
