//! `make_join`/`send_join` and `make_leave`/`send_leave` (JN-1, JN-2, JN-4): another server's
//! user joins or leaves one of our rooms; `invite` (JN-5): one of our users is invited. The logic lives in `membership::inbound`; `v1`
//! `send_*` answers are wrapped as `[200, answer]`, as that version of the spec has it.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::error::MatrixError;
use crate::federation::auth::SignedRequest;
use crate::membership::{inbound, invites, Membership};
use crate::state::AppState;

/// `GET /_matrix/federation/v1/make_join/{roomId}/{userId}?ver=...`
pub async fn make_join(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> Result<HttpResponse, MatrixError> {
    let room_id = room(&path.0)?;
    let offered: Vec<String> = url::form_urlencoded::parse(req.query_string().as_bytes())
        .filter(|(k, _)| k == "ver")
        .map(|(_, v)| v.into_owned())
        .collect();
    let answer = inbound::make(&state.rooms, &request.origin, &room_id, &path.1, Membership::Join, &offered).await?;
    Ok(HttpResponse::Ok().json(answer))
}

/// `GET /_matrix/federation/v1/make_leave/{roomId}/{userId}`
pub async fn make_leave(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, MatrixError> {
    let room_id = room(&path.0)?;
    let answer = inbound::make(&state.rooms, &request.origin, &room_id, &path.1, Membership::Leave, &[]).await?;
    Ok(HttpResponse::Ok().json(answer))
}

pub async fn send_join_v2(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, MatrixError> {
    Ok(HttpResponse::Ok().json(send(&state, request, &path, Membership::Join).await?))
}

pub async fn send_join_v1(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, MatrixError> {
    Ok(HttpResponse::Ok().json(json!([200, send(&state, request, &path, Membership::Join).await?])))
}

pub async fn send_leave_v2(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, MatrixError> {
    Ok(HttpResponse::Ok().json(send(&state, request, &path, Membership::Leave).await?))
}

pub async fn send_leave_v1(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, MatrixError> {
    Ok(HttpResponse::Ok().json(json!([200, send(&state, request, &path, Membership::Leave).await?])))
}

/// The shared part of the `send_*` handlers: the body is the signed event.
async fn send(
    state: &AppState,
    request: SignedRequest,
    path: &(String, String),
    membership: Membership,
) -> Result<serde_json::Value, MatrixError> {
    let room_id = room(&path.0)?;
    let body = request.body.ok_or_else(|| MatrixError::not_json("The body must be the signed event"))?;
    let keys = &state.keys;
    Ok(inbound::send(&state.rooms, keys, &request.origin, &room_id, &path.1, body, membership).await?)
}

/// An ID that cannot be a room ID names no room of ours.
fn room(raw: &str) -> Result<ruma::OwnedRoomId, MatrixError> {
    crate::ids::room_id(raw).map_err(|_| MatrixError::not_found("Unknown room"))
}

/// `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}` (JN-5): one of our users is invited.
pub async fn invite_v2(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, MatrixError> {
    let room_id = room(&path.0)?;
    let body = request.body.as_ref().ok_or_else(|| MatrixError::not_json("The body must be a JSON object"))?;
    let (rooms, keys, accounts) = (&state.rooms, &state.keys, &state.accounts);
    let answer = invites::receive(rooms, keys, &request.origin, &room_id, &path.1, body, accounts).await?;
    Ok(HttpResponse::Ok().json(answer))
}
