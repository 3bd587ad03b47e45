//! `peekgate bench receiver`: one lightweight federation receiver that answers 200 to every
//! `/send` for any number of destinations, and counts the PDUs it got per body marker. Runs as
//! its own process so its CPU is not counted as the gateway's.
//!
//! Once told a server's key (`PUT /trust`, `bench peeks --verify-signatures`), it authenticates
//! every `/send` as a homeserver would: the body's canonical text (the body itself when it is
//! canonical, as [`peekgate::canonical_json::canonical_text`] checks), the X-Matrix header
//! verified by the gateway's own verifier ([`peekgate::xmatrix::verify`]) for the destination
//! it names, and a 401 for any that fails. That costs the receiver most of its CPU, on the cores
//! the gateway runs on, so it is off unless asked for.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use ed25519_dalek::VerifyingKey;
use ruma::{OwnedServerName, ServerName};
use serde_json::json;
use tokio::sync::Notify;

use peekgate::clock::now_ms;
use peekgate::xmatrix::{self, RequestKeys};

/// marker -> (PDUs received, time of the last one in ms), and a wake-up for `/wait`; and, once
/// a key is trusted, the `/send`s verified and refused.
#[derive(Default)]
struct Counts {
    by_marker: Mutex<HashMap<String, (u64, i64)>>,
    changed: Notify,
    trusted: RwLock<Option<TrustedKey>>,
    verified: AtomicU64,
    refused: AtomicU64,
}

/// `PUT /trust`: the one server key `/send`s must be signed with from then on.
#[derive(serde::Deserialize)]
struct TrustRequest {
    origin: OwnedServerName,
    key_id: String,
    /// Unpadded base64, as in `/_matrix/key/v2/server`.
    key: String,
}

/// The trusted key, decompressed once, as the gateway's key cache keeps it.
#[derive(Clone)]
struct TrustedKey {
    origin: OwnedServerName,
    key_id: String,
    key: VerifyingKey,
}

#[async_trait::async_trait]
impl RequestKeys for TrustedKey {
    async fn request_key(&self, server: &ServerName, key_id: &str) -> Result<VerifyingKey, String> {
        if server != self.origin || key_id != self.key_id {
            return Err(format!("no trusted key {key_id} of {server}"));
        }
        Ok(self.key)
    }
}

/// Authenticates one `/send` as a homeserver would (see the module's comment): whether the body
/// was canonical as it came (its text, then), or `Err` saying why it is refused.
async fn authenticate<'b>(
    trusted: &TrustedKey,
    request: &HttpRequest,
    body: &'b [u8],
) -> Result<Option<&'b str>, String> {
    let headers: Vec<&str> = request.headers().get_all("authorization").filter_map(|v| v.to_str().ok()).collect();
    // The receiver stands in for every destination: the one the header names is "ours".
    let first = headers.first().ok_or("no Authorization header")?;
    let named = ruma::api::federation::authentication::XMatrix::parse(first).map_err(|e| e.to_string())?;
    let destination = named.destination.ok_or("no destination in the header")?;
    // As the gateway's own edge does: a canonical body is signed over as it is.
    let canonical = peekgate::canonical_json::canonical_text(body).map_err(|e| format!("the body: {e}"))?;
    let inbound = xmatrix::Inbound {
        method: "PUT",
        uri: request.uri().path_and_query().map(|pq| pq.as_str()).unwrap_or("/"),
        canonical_content: Some(&canonical),
    };
    xmatrix::verify(trusted, destination.as_str(), &headers, &inbound)
        .await
        .map(|_| match canonical {
            Cow::Borrowed(text) => Some(text),
            Cow::Owned(_) => None,
        })
        .map_err(|(failure, _, detail)| format!("{}: {detail}", failure.label()))
}

/// The marker of every PDU in a transaction: its `content.body`, or `""` without one.
/// `canonical` is the body's text when the receiver found it canonical.
fn markers<'b>(body: &'b [u8], canonical: Option<&'b str>) -> Vec<Cow<'b, str>> {
    canonical.and_then(markers_in_canonical_text).unwrap_or_else(|| markers_parsed(body))
}

/// What precedes the marker in each of the bench's PDUs in canonical JSON: `content` (an object
/// key, because every `"` inside a string is written `\"`, so this cannot occur in one) holding an
/// object whose first key is `body`.
const MARKER_START: &str = r#""content":{"body":""#;

/// The markers found by looking for [`MARKER_START`] in a body the receiver found canonical, which
/// costs a fraction of parsing it (the receiver shares the gateway's cores); `None` for a marker
/// with an escape in it.
fn markers_in_canonical_text(text: &str) -> Option<Vec<Cow<'_, str>>> {
    text.match_indices(MARKER_START)
        .map(|(at, _)| {
            let marker = &text[at + MARKER_START.len()..];
            let end = marker.find(['"', '\\'])?;
            (marker.as_bytes()[end] == b'"').then(|| Cow::Borrowed(&marker[..end]))
        })
        .collect()
}

/// The markers, parsing the transaction (only the fields counted; the rest is skipped).
fn markers_parsed(body: &[u8]) -> Vec<Cow<'_, str>> {
    #[derive(serde::Deserialize)]
    struct Txn<'a> {
        #[serde(borrow, default)]
        pdus: Vec<MarkedPdu<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct MarkedPdu<'a> {
        #[serde(borrow, default)]
        content: Option<Marker<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Marker<'a> {
        #[serde(borrow, default)]
        body: Option<Cow<'a, str>>,
    }
    let txn = serde_json::from_slice::<Txn>(body).unwrap_or(Txn { pdus: Vec::new() });
    txn.pdus.into_iter().map(|pdu| pdu.content.and_then(|c| c.body).unwrap_or_default()).collect()
}

async fn send(request: HttpRequest, body: web::Bytes, counts: web::Data<Counts>) -> HttpResponse {
    let trusted = counts.trusted.read().unwrap().clone();
    let mut canonical = None;
    if let Some(trusted) = trusted {
        match authenticate(&trusted, &request, &body).await {
            Ok(text) => canonical = text,
            Err(why) => {
                counts.refused.fetch_add(1, Ordering::Relaxed);
                counts.changed.notify_waiters();
                return HttpResponse::Unauthorized().json(json!({ "errcode": "M_UNAUTHORIZED", "error": why }));
            }
        }
        counts.verified.fetch_add(1, Ordering::Relaxed);
    }
    let now = now_ms();
    let markers = markers(&body, canonical);
    {
        let mut by_marker = counts.by_marker.lock().unwrap();
        for marker in markers {
            let entry = match by_marker.get_mut(marker.as_ref()) {
                Some(entry) => entry,
                None => by_marker.entry(marker.into_owned()).or_insert((0, 0)),
            };
            entry.0 += 1;
            entry.1 = now;
        }
    }
    counts.changed.notify_waiters();
    HttpResponse::Ok().json(json!({ "pdus": {} }))
}

/// Answers once `count` PDUs with `marker` arrived, or after 10 s with what arrived so far: the
/// bench waits with one request instead of polling, so its waiting costs the measured process
/// almost nothing.
async fn wait(path: web::Path<(String, u64)>, counts: web::Data<Counts>) -> HttpResponse {
    let (marker, expected) = path.into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let changed = counts.changed.notified();
        let (count, last_ms) = counts.by_marker.lock().unwrap().get(marker.as_str()).copied().unwrap_or((0, 0));
        let refused = counts.refused.load(Ordering::Relaxed);
        if count >= expected || refused > 0 || tokio::time::Instant::now() >= deadline {
            return HttpResponse::Ok().json(json!({
                "count": count,
                "last_ms": last_ms,
                "verified": counts.verified.load(Ordering::Relaxed),
                "refused": refused,
            }));
        }
        let _ = tokio::time::timeout_at(deadline, changed).await;
    }
}

/// From now on every `/send` must be signed with this key.
async fn trust(request: web::Json<TrustRequest>, counts: web::Data<Counts>) -> HttpResponse {
    let TrustRequest { origin, key_id, key } = request.into_inner();
    let bytes = peekgate::keys::encoding::decode_base64(&key).and_then(|bytes| <[u8; 32]>::try_from(bytes).ok());
    let Some(key) = bytes.and_then(|bytes| VerifyingKey::from_bytes(&bytes).ok()) else {
        return HttpResponse::BadRequest()
            .json(json!({ "errcode": "M_INVALID_PARAM", "error": "key is not an ed25519 public key in base64" }));
    };
    *counts.trusted.write().unwrap() = Some(TrustedKey { origin, key_id, key });
    HttpResponse::Ok().json(json!({}))
}

/// Serves until the process is killed; prints `listening on <url>` first.
pub async fn receiver(bind: &str) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(bind)?;
    println!("listening on http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let counts: web::Data<Counts> = web::Data::new(Counts::default());
    HttpServer::new(move || {
        App::new()
            .app_data(counts.clone())
            .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
            .route("/_matrix/federation/v1/send/{txn}", web::put().to(send))
            .route("/wait/{marker}/{count}", web::get().to(wait))
            .route("/trust", web::put().to(trust))
    })
    .workers(2)
    .backlog(4096)
    .max_connections(50_000)
    .listen(listener)?
    .run()
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transaction as the gateway sends it: canonical, PDUs with the marker in
    /// `content.body`, and decoys: the marker pattern inside a string (escaped there), and a
    /// `content`-like key elsewhere.
    fn transaction(markers: &[&str]) -> String {
        let pdus: Vec<serde_json::Value> = markers
            .iter()
            .map(|marker| {
                json!({
                    "content": { "body": marker, "msgtype": "m.text" },
                    "origin": "gateway.test",
                    "type": "m.room.message",
                    "unsigned": { "prev_content": { "body": "not a marker" }, "note": r#""content":{"body":"x"}"# },
                })
            })
            .collect();
        let body = json!({ "edus": [], "origin": "gateway.test", "pdus": pdus });
        peekgate::canonical_json::encode_value(body).unwrap()
    }

    #[test]
    fn markers_found_in_canonical_text_are_the_parsed_ones() {
        let text = transaction(&["s1", "s2", "s1", "", "é 日本"]);
        assert!(peekgate::canonical_json::already_canonical(text.as_bytes()).is_some());
        let found = markers_in_canonical_text(&text).unwrap();
        assert_eq!(found, vec!["s1", "s2", "s1", "", "é 日本"]);
        assert_eq!(found, markers_parsed(text.as_bytes()));
        assert_eq!(markers(text.as_bytes(), Some(&text)), found);
    }

    #[test]
    fn a_marker_with_an_escape_is_parsed_instead() {
        let text = transaction(&["a\"b", "c"]);
        assert_eq!(markers_in_canonical_text(&text), None);
        assert_eq!(markers(text.as_bytes(), Some(&text)), vec!["a\"b", "c"]);
        // A body that was not canonical is parsed too.
        assert_eq!(markers(br#"{"pdus": [{"content": {"body": "d"}}]}"#, None), vec!["d"]);
    }
}
