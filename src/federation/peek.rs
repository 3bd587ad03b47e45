//! MSC2444 routes, we are the peeked server: `PUT`, `POST .../renew` and `DELETE`
//! `/_matrix/federation/v1/peek/{roomId}/{peekId}`. The logic lives in `peeks::inbound`.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::error::MatrixError;
use crate::federation::auth::SignedRequest;
use crate::peeks::inbound::{PeekError, PutOutcome};
use crate::state::AppState;

fn room_and_peek(path: &(String, String)) -> Result<(ruma::OwnedRoomId, &str), MatrixError> {
    // An ID that cannot be a room ID names no room of ours.
    let room_id = crate::ids::room_id(&path.0).map_err(|_| MatrixError::not_found("Unknown room"))?;
    Ok((room_id, path.1.as_str()))
}

/// `PUT /_matrix/federation/v1/peek/{roomId}/{peekId}?ver=...`
pub async fn put(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> Result<HttpResponse, MatrixError> {
    // FP-2: the body is a JSON object (normally `{}`); unknown keys are ignored.
    if request.body.is_none() {
        return Err(MatrixError::not_json("The peek body must be a JSON object"));
    }
    let (room_id, peek_id) = room_and_peek(&path)?;
    let versions: Vec<String> = url::form_urlencoded::parse(req.query_string().as_bytes())
        .filter(|(k, _)| k == "ver")
        .map(|(_, v)| v.into_owned())
        .collect();
    let outcome = state.inbound.put(&state.rooms, &request.origin, &room_id, peek_id, &versions).await;
    match outcome {
        Ok(PutOutcome::Renewed) => {
            state.metrics.peek_renewal("inbound", "ok");
            Ok(HttpResponse::Ok().json(json!({})))
        }
        Ok(PutOutcome::Created(response)) => {
            tracing::info!(origin = %request.origin, room = %room_id, peek_id, "inbound peek created");
            Ok(HttpResponse::Ok().json(response))
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /_matrix/federation/v1/peek/{roomId}/{peekId}/renew` (Rev B).
pub async fn renew(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, MatrixError> {
    let (room_id, peek_id) = room_and_peek(&path)?;
    match state.inbound.renew(&request.origin, &room_id, peek_id).await {
        Ok(interval) => {
            state.metrics.peek_renewal("inbound", "ok");
            Ok(HttpResponse::Ok().json(json!({ "renewal_interval": interval })))
        }
        Err(PeekError::NoSuchPeek) => {
            state.metrics.peek_renewal("inbound", "unknown");
            Err(PeekError::NoSuchPeek.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// `DELETE /_matrix/federation/v1/peek/{roomId}/{peekId}` (FP-10): only the caller's own peek.
pub async fn delete(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, MatrixError> {
    let (room_id, peek_id) = room_and_peek(&path)?;
    state.inbound.delete(&request.origin, &room_id, peek_id).await?;
    tracing::info!(origin = %request.origin, room = %room_id, peek_id, "inbound peek deleted");
    Ok(HttpResponse::Ok().json(json!({})))
}
