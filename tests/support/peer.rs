//! A small hostile federation peer: its own ed25519 key (ed25519-dalek, not peekgate's key
//! code), a `/_matrix/key/v2/server` endpoint that can lie in several ways, and helpers to sign
//! requests correctly or incorrectly.

use std::net::TcpListener;

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpResponse, HttpServer};
use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use ed25519_dalek::Signer;
use serde_json::{json, Value};

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
}

pub struct TestPeer {
    pub name: String,
    pub key: ed25519_dalek::SigningKey,
    pub key_id: String,
    /// A second key the peer never publishes.
    pub other_key: ed25519_dalek::SigningKey,
    pub url: String,
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
    let canonical = ruma::CanonicalJsonValue::try_from(value).expect("canonical JSON");
    serde_json::to_vec(&canonical).unwrap()
}

pub fn sign_value(key: &ed25519_dalek::SigningKey, value: &Value) -> String {
    b64(&key.sign(&signing_bytes(value)).to_bytes())
}

impl TestPeer {
    pub fn start(name: &str, mode: KeyMode) -> TestPeer {
        let key = random_key();
        let other_key = random_key();
        let key_id = "ed25519:p1".to_owned();
        let response = key_response(name, &key, &key_id, &other_key, mode);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = HttpServer::new(move || {
            let response = response.clone();
            App::new().route(
                "/_matrix/key/v2/server",
                web::get().to(move || {
                    let response = response.clone();
                    async move { HttpResponse::Ok().json(response) }
                }),
            )
        })
        .disable_signals()
        .workers(1)
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        TestPeer { name: name.to_owned(), key, key_id, other_key, url, handle }
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

    /// A correct `Authorization` header for the request.
    pub fn authorization(&self, method: &str, uri: &str, destination: &str, content: Option<&Value>) -> String {
        let sig = sign_value(&self.key, &self.request_object(method, uri, destination, content));
        format!("X-Matrix origin=\"{}\",destination=\"{destination}\",key=\"{}\",sig=\"{sig}\"", self.name, self.key_id)
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
    let mut response = json!({
        "server_name": server_name,
        "verify_keys": { key_id: { "key": b64(key.verifying_key().as_bytes()) } },
        "old_verify_keys": {},
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
