//! `Authorization: X-Matrix` request authentication: one function builds the signed request
//! object, used both to sign our outbound requests and to verify inbound ones, and an actix
//! extractor ([`SignedRequest`]) that authenticates every federation request before a handler
//! sees it.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header::{AUTHORIZATION, CONTENT_LENGTH};
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::StreamExt;
use ruma::api::federation::authentication::XMatrix;
use ruma::signatures::{to_canonical_json_string_for_signing, verify_canonical_json_bytes};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, OwnedServerName, SigningKeyAlgorithm};
use serde::de::DeserializeOwned;

use crate::error::MatrixError;
use crate::keys::SigningKey;
use crate::state::AppState;

/// The object that is signed (never sent): method, raw URI with query, origin, destination and,
/// only when the request has a body, `content`.
pub fn request_object(
    method: &str,
    uri: &str,
    origin: &str,
    destination: &str,
    content: Option<CanonicalJsonValue>,
) -> CanonicalJsonObject {
    let mut object = CanonicalJsonObject::new();
    object.insert("method".into(), CanonicalJsonValue::String(method.to_owned()));
    object.insert("uri".into(), CanonicalJsonValue::String(uri.to_owned()));
    object.insert("origin".into(), CanonicalJsonValue::String(origin.to_owned()));
    object.insert("destination".into(), CanonicalJsonValue::String(destination.to_owned()));
    if let Some(content) = content {
        object.insert("content".into(), content);
    }
    object
}

/// The `Authorization` header value for an outbound request.
pub fn authorization_header(
    key: &SigningKey,
    origin: &str,
    destination: &str,
    method: &str,
    uri: &str,
    content: Option<CanonicalJsonValue>,
) -> String {
    let object = request_object(method, uri, origin, destination, content);
    let canonical = to_canonical_json_string_for_signing(&object)
        .expect("a request object of strings and canonical JSON serialises");
    let sig = key.sign_bytes(canonical.as_bytes());
    format!("X-Matrix origin=\"{origin}\",destination=\"{destination}\",key=\"{}\",sig=\"{sig}\"", key.key_id())
}

/// The `Authorization` header for a request whose body is already canonical JSON
/// (`canonical_content`). The signed object is assembled as text in canonical key order, so a
/// body serialised once can be signed for many destinations (the sender's fan-out).
pub fn authorization_header_for_canonical(
    key: &SigningKey,
    origin: &str,
    destination: &str,
    method: &str,
    uri: &str,
    canonical_content: &str,
) -> String {
    let quote = |s: &str| serde_json::to_string(s).expect("strings serialise");
    let signed = format!(
        "{{\"content\":{canonical_content},\"destination\":{},\"method\":{},\"origin\":{},\"uri\":{}}}",
        quote(destination),
        quote(method),
        quote(origin),
        quote(uri)
    );
    let sig = key.sign_bytes(signed.as_bytes());
    format!("X-Matrix origin=\"{origin}\",destination=\"{destination}\",key=\"{}\",sig=\"{sig}\"", key.key_id())
}

/// Why an inbound request failed authentication; the label of
/// `peekgate_xmatrix_auth_failures_total{reason}` (a closed set, so bounded cardinality).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    MissingHeader,
    MalformedHeader,
    OwnOrigin,
    WrongDestination,
    UnknownAlgorithm,
    KeyUnavailable,
    BadSignature,
    BodyTooLarge,
}

impl AuthFailure {
    pub const ALL: [AuthFailure; 8] = [
        AuthFailure::MissingHeader,
        AuthFailure::MalformedHeader,
        AuthFailure::OwnOrigin,
        AuthFailure::WrongDestination,
        AuthFailure::UnknownAlgorithm,
        AuthFailure::KeyUnavailable,
        AuthFailure::BadSignature,
        AuthFailure::BodyTooLarge,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::MissingHeader => "missing_header",
            AuthFailure::MalformedHeader => "malformed_header",
            AuthFailure::OwnOrigin => "own_origin",
            AuthFailure::WrongDestination => "wrong_destination",
            AuthFailure::UnknownAlgorithm => "unknown_algorithm",
            AuthFailure::KeyUnavailable => "key_unavailable",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::BodyTooLarge => "body_too_large",
        }
    }

    fn message(self) -> &'static str {
        match self {
            AuthFailure::MissingHeader => "Missing X-Matrix Authorization header",
            AuthFailure::MalformedHeader => "Malformed X-Matrix Authorization header",
            AuthFailure::OwnOrigin => "Requests may not claim to come from this server",
            AuthFailure::WrongDestination => "X-Matrix destination is not this server",
            AuthFailure::UnknownAlgorithm => "Unsupported signing key algorithm",
            AuthFailure::KeyUnavailable => "Cannot find a valid key for the origin",
            AuthFailure::BadSignature => "Invalid X-Matrix signature",
            AuthFailure::BodyTooLarge => "Request body exceeds the limit",
        }
    }
}

/// An authenticated federation request: who sent it and its parsed JSON body (if any).
#[derive(Debug)]
pub struct SignedRequest {
    pub origin: OwnedServerName,
    pub body: Option<serde_json::Value>,
}

impl SignedRequest {
    /// The body as `T`; a missing body reads as `{}`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, MatrixError> {
        let value = self.body.clone().unwrap_or_else(|| serde_json::json!({}));
        serde_json::from_value(value).map_err(|e| MatrixError::bad_json(e.to_string()))
    }
}

impl FromRequest for SignedRequest {
    type Error = MatrixError;
    type Future = Pin<Box<dyn Future<Output = Result<SignedRequest, MatrixError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let payload = payload.take();
        Box::pin(async move {
            let state = req.app_data::<web::Data<AppState>>().cloned().ok_or_else(MatrixError::internal)?;
            authenticate(&state, &req, payload).await
        })
    }
}

async fn authenticate(state: &AppState, req: &HttpRequest, payload: Payload) -> Result<SignedRequest, MatrixError> {
    let fail = |failure: AuthFailure, origin: Option<&str>, detail: &str| {
        state.metrics.xmatrix_auth_failure(failure.label());
        tracing::warn!(
            reason = failure.label(),
            origin = origin.unwrap_or("-"),
            path = req.path(),
            detail,
            "federation request refused"
        );
        MatrixError::unauthorized(failure.message()).already_logged()
    };

    let limit = state.settings.raw.http.max_body_bytes;
    let bytes = match read_limited(req, payload, limit).await {
        Ok(bytes) => bytes,
        Err(ReadError::TooLarge) => return Err(fail(AuthFailure::BodyTooLarge, None, "")),
        Err(ReadError::Payload(e)) => return Err(MatrixError::bad_json(format!("Cannot read body: {e}"))),
    };
    let headers: Vec<&str> = req
        .headers()
        .get_all(AUTHORIZATION)
        .filter_map(|v| v.to_str().ok())
        .filter(|v| v.trim_start().get(..8).is_some_and(|s| s.eq_ignore_ascii_case("X-Matrix")))
        .collect();
    if headers.is_empty() {
        return Err(fail(AuthFailure::MissingHeader, None, ""));
    }

    let (body, content) = parse_body(&bytes)?;
    let ours = state.settings.server_name.as_str();
    let uri = req.uri().path_and_query().map(|pq| pq.as_str()).unwrap_or("/");

    // Several Authorization headers (one per key) may be sent; one valid one suffices.
    let mut last = None;
    for header in headers {
        match verify_header(state, header, req.method().as_str(), uri, ours, content.clone()).await {
            Ok(origin) => return Ok(SignedRequest { origin, body }),
            Err(failure) => last = Some(failure),
        }
    }
    let (failure, origin, detail) = last.expect("at least one header was checked");
    Err(fail(failure, origin.as_deref(), &detail))
}

type HeaderFailure = (AuthFailure, Option<String>, String);

async fn verify_header(
    state: &AppState,
    header: &str,
    method: &str,
    uri: &str,
    ours: &str,
    content: Option<CanonicalJsonValue>,
) -> Result<OwnedServerName, HeaderFailure> {
    let x = XMatrix::parse(header).map_err(|e| (AuthFailure::MalformedHeader, None, e.to_string()))?;
    let origin = x.origin.to_string();
    let with_origin = |f: AuthFailure, detail: String| (f, Some(origin.clone()), detail);
    if origin == ours {
        return Err(with_origin(AuthFailure::OwnOrigin, String::new()));
    }
    if let Some(destination) = &x.destination {
        if destination.as_str() != ours {
            return Err(with_origin(AuthFailure::WrongDestination, destination.to_string()));
        }
    }
    if x.key.algorithm() != SigningKeyAlgorithm::Ed25519 {
        return Err(with_origin(AuthFailure::UnknownAlgorithm, x.key.to_string()));
    }
    let public_key = state
        .keys
        .request_key(&x.origin, x.key.as_str())
        .await
        .map_err(|e| with_origin(AuthFailure::KeyUnavailable, e.to_string()))?;
    let object = request_object(method, uri, &origin, ours, content);
    let canonical = to_canonical_json_string_for_signing(&object)
        .map_err(|e| with_origin(AuthFailure::BadSignature, e.to_string()))?;
    verify_canonical_json_bytes(&SigningKeyAlgorithm::Ed25519, &public_key, x.sig.as_bytes(), canonical.as_bytes())
        .map_err(|e| with_origin(AuthFailure::BadSignature, e.to_string()))?;
    Ok(x.origin)
}

/// Parses a non-empty body as a JSON object. Bad JSON is a 400, not an authentication failure.
fn parse_body(bytes: &[u8]) -> Result<(Option<serde_json::Value>, Option<CanonicalJsonValue>), MatrixError> {
    if bytes.is_empty() {
        return Ok((None, None));
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| MatrixError::not_json(format!("Body is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(MatrixError::bad_json("Body must be a JSON object"));
    }
    let canonical = CanonicalJsonValue::try_from(value.clone())
        .map_err(|e| MatrixError::bad_json(format!("Body is not canonical JSON: {e}")))?;
    Ok((Some(value), Some(canonical)))
}

enum ReadError {
    TooLarge,
    Payload(String),
}

/// Reads the body, refusing it as soon as it is known to exceed `limit` (before parsing).
async fn read_limited(req: &HttpRequest, mut payload: Payload, limit: usize) -> Result<Vec<u8>, ReadError> {
    let declared =
        req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ReadError::TooLarge);
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ReadError::Payload(e.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_signing_matches_the_generic_path() {
        let key = SigningKey::generate();
        let body = serde_json::json!({ "origin": "a.test", "pdus": [{ "b": "x\"y", "a": 1 }], "edus": [] });
        let canonical = CanonicalJsonValue::try_from(body).unwrap();
        let text = crate::canonical_json::encode(&canonical);
        let generic = authorization_header(
            &key,
            "a.test",
            "b.test:8448",
            "PUT",
            "/_matrix/federation/v1/send/1-2",
            Some(canonical),
        );
        let prepared = authorization_header_for_canonical(
            &key,
            "a.test",
            "b.test:8448",
            "PUT",
            "/_matrix/federation/v1/send/1-2",
            &text,
        );
        assert_eq!(generic, prepared);
    }
}
