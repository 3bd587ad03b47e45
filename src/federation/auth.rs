//! The X-Matrix extractor: every federation request is authenticated before its handler runs.
//! It reads the body within `http.max_body_bytes`, parses it once, asks [`xmatrix::verify`]
//! and turns a failure into a logged, counted 401 `M_UNAUTHORIZED` (413 `M_TOO_LARGE` for a body
//! over the limit).

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header::{AUTHORIZATION, CONTENT_LENGTH};
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::StreamExt;
use ruma::OwnedServerName;
use serde::de::DeserializeOwned;

use crate::canonical_json;
use crate::error::MatrixError;
use crate::state::AppState;
use crate::xmatrix::{self, AuthFailure};

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

fn refuse(
    state: &AppState,
    req: &HttpRequest,
    failure: AuthFailure,
    origin: Option<&str>,
    detail: &str,
) -> MatrixError {
    state.metrics.xmatrix_auth_failure(failure.label());
    tracing::warn!(
        reason = failure.label(),
        origin = origin.unwrap_or("-"),
        path = req.path(),
        detail,
        "federation request refused"
    );
    let error = match failure {
        // H18: an oversized body is not an authentication problem; it is counted with the
        // refusals all the same (reason `body_too_large`).
        AuthFailure::BodyTooLarge => MatrixError::too_large(failure.message()),
        _ => MatrixError::unauthorized(failure.message()),
    };
    error.already_logged()
}

async fn authenticate(state: &AppState, req: &HttpRequest, payload: Payload) -> Result<SignedRequest, MatrixError> {
    let limit = state.settings.raw.http.max_body_bytes;
    let bytes = match read_limited(req, payload, limit).await {
        Ok(bytes) => bytes,
        Err(ReadError::TooLarge) => return Err(refuse(state, req, AuthFailure::BodyTooLarge, None, "")),
        Err(ReadError::Payload(e)) => return Err(MatrixError::bad_json(format!("Cannot read body: {e}"))),
    };
    let headers: Vec<&str> = req
        .headers()
        .get_all(AUTHORIZATION)
        .filter_map(|v| v.to_str().ok())
        .filter(|v| v.trim_start().get(..8).is_some_and(|s| s.eq_ignore_ascii_case("X-Matrix")))
        .collect();
    if headers.is_empty() {
        return Err(refuse(state, req, AuthFailure::MissingHeader, None, ""));
    }
    let (body, canonical) = parse_body(&bytes)?;
    let request = xmatrix::Inbound {
        method: req.method().as_str(),
        uri: req.uri().path_and_query().map(|pq| pq.as_str()).unwrap_or("/"),
        canonical_content: canonical.as_deref(),
    };
    match xmatrix::verify(&*state.keys, state.settings.server_name.as_str(), &headers, &request).await {
        Ok(origin) => Ok(SignedRequest { origin, body }),
        Err((failure, origin, detail)) => Err(refuse(state, req, failure, origin.as_deref(), &detail)),
    }
}

/// Parses a non-empty body as a JSON object, and its canonical text. Bad JSON is a 400, not an
/// authentication failure.
fn parse_body(bytes: &[u8]) -> Result<(Option<serde_json::Value>, Option<Cow<'_, str>>), MatrixError> {
    if bytes.is_empty() {
        return Ok((None, None));
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| MatrixError::not_json(format!("Body is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(MatrixError::bad_json("Body must be a JSON object"));
    }
    // Servers send canonical bodies: those are signed over as they are, without a second copy
    // of the document built, sorted and serialised again.
    let canonical = match canonical_json::already_canonical(bytes) {
        Some(text) => Cow::Borrowed(text),
        None => canonical_json::encode_value(value.clone())
            .map(Cow::Owned)
            .map_err(|e| MatrixError::bad_json(format!("Body is not canonical JSON: {e}")))?,
    };
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
