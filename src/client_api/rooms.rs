//! Room routes of the client-server API for local users: createRoom, send, state, join, leave,
//! messages and the room directory.

use actix_web::{web, HttpRequest, HttpResponse};
use ruma::RoomId;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Authed;
use crate::error::{parse_json, MatrixError};
use crate::ids;
use crate::rooms::{CreateRoomRequest, Visibility};
use crate::state::AppState;

/// Readers must be joined, or the room must be world-readable now.
async fn require_reader(
    state: &AppState,
    room_id: &RoomId,
    session: &crate::accounts::Session,
) -> Result<bool, MatrixError> {
    if state.rooms.room(room_id).await?.is_none() {
        return Err(MatrixError::not_found("Room not found"));
    }
    if state.rooms.membership(room_id, &session.user_id).await?.as_deref() == Some("join") {
        return Ok(true);
    }
    if state.rooms.current_visibility(room_id).await? == Visibility::WorldReadable {
        return Ok(false);
    }
    Err(MatrixError::forbidden("You are not in this room and it is not world-readable"))
}

pub async fn create_room(
    state: web::Data<AppState>,
    Authed(session): Authed,
    body: web::Bytes,
) -> Result<HttpResponse, MatrixError> {
    let request: CreateRoomRequest = parse_json(&body)?;
    let alias = request.room_alias_name.as_ref().map(|name| format!("#{name}:{}", state.settings.server_name));
    let room_id = state.rooms.create_room(&session.user_id, request).await?;
    let mut answer = json!({ "room_id": room_id });
    if let Some(alias) = alias {
        answer["room_alias"] = Value::from(alias);
    }
    Ok(HttpResponse::Ok().json(answer))
}

pub async fn send_event(
    state: web::Data<AppState>,
    Authed(session): Authed,
    path: web::Path<(String, String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, MatrixError> {
    let (room, kind, txn_id) = path.into_inner();
    let room_id = ids::room_id(&room)?;
    let content: Value = parse_json(&body)?;
    let appended = state
        .rooms
        .send_once(&room_id, &session.user_id, &kind, None, content, Some((session.device_id.clone(), txn_id)))
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "event_id": appended.event_id })))
}

/// `PUT /rooms/{roomId}/redact/{eventId}/{txnId}` (H19): an `m.room.redaction` of the event,
/// with the body's optional `reason`. Applied as it is stored (see `rooms::store::redactions`).
pub async fn redact(
    state: web::Data<AppState>,
    Authed(session): Authed,
    path: web::Path<(String, String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, MatrixError> {
    let (room, event_id, txn_id) = path.into_inner();
    let room_id = ids::room_id(&room)?;
    let event_id =
        ruma::EventId::parse(&event_id).map_err(|e| MatrixError::invalid_param(format!("Invalid event ID: {e}")))?;
    let mut content: Value = if body.iter().all(u8::is_ascii_whitespace) { json!({}) } else { parse_json(&body)? };
    content["redacts"] = Value::from(event_id.as_str());
    // Its own namespace of transaction IDs: a `/send` with the same ID is another request.
    let txn = Some((session.device_id.clone(), format!("redact/{txn_id}")));
    let appended = state.rooms.send_once(&room_id, &session.user_id, "m.room.redaction", None, content, txn).await?;
    Ok(HttpResponse::Ok().json(json!({ "event_id": appended.event_id })))
}

pub async fn put_state(
    state: web::Data<AppState>,
    Authed(session): Authed,
    path: web::Path<(String, String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, MatrixError> {
    let (room, kind, state_key) = path.into_inner();
    put_state_event(&state, &session, &room, &kind, &state_key, &body).await
}

pub async fn put_state_empty_key(
    state: web::Data<AppState>,
    Authed(session): Authed,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, MatrixError> {
    let (room, kind) = path.into_inner();
    put_state_event(&state, &session, &room, &kind, "", &body).await
}

async fn put_state_event(
    state: &AppState,
    session: &crate::accounts::Session,
    room: &str,
    kind: &str,
    state_key: &str,
    body: &[u8],
) -> Result<HttpResponse, MatrixError> {
    let room_id = ids::room_id(room)?;
    let content: Value = parse_json(body)?;
    let appended = state.rooms.send(&room_id, &session.user_id, kind, Some(state_key), content).await?;
    Ok(HttpResponse::Ok().json(json!({ "event_id": appended.event_id })))
}

pub async fn get_state(
    state: web::Data<AppState>,
    Authed(session): Authed,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse, MatrixError> {
    let (room, kind, state_key) = path.into_inner();
    get_state_event(&state, &session, &room, &kind, &state_key).await
}

pub async fn get_state_empty_key(
    state: web::Data<AppState>,
    Authed(session): Authed,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, MatrixError> {
    let (room, kind) = path.into_inner();
    get_state_event(&state, &session, &room, &kind, "").await
}

async fn get_state_event(
    state: &AppState,
    session: &crate::accounts::Session,
    room: &str,
    kind: &str,
    state_key: &str,
) -> Result<HttpResponse, MatrixError> {
    let room_id = ids::room_id(room)?;
    require_reader(state, &room_id, session).await?;
    match state.rooms.state_event(&room_id, kind, state_key).await? {
        Some(event) => Ok(HttpResponse::Ok().json(event.content_value())),
        None => Err(MatrixError::not_found("State event not found")),
    }
}

pub async fn get_full_state(
    state: web::Data<AppState>,
    Authed(session): Authed,
    path: web::Path<String>,
) -> Result<HttpResponse, MatrixError> {
    let room_id = ids::room_id(&path)?;
    require_reader(&state, &room_id, &session).await?;
    let events: Vec<Value> = state.rooms.current_state(&room_id).await?.iter().map(|e| e.client_json()).collect();
    Ok(HttpResponse::Ok().json(events))
}

/// `POST /join/{roomIdOrAlias}?server_name=...&via=...`
pub async fn join_by_id_or_alias(
    state: web::Data<AppState>,
    Authed(session): Authed,
    path: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, MatrixError> {
    let servers: Vec<String> = url::form_urlencoded::parse(req.query_string().as_bytes())
        .filter(|(k, _)| k == "server_name" || k == "via")
        .map(|(_, v)| v.into_owned())
        .collect();
    join(&state, &session, &path, servers).await
}

/// `POST /rooms/{roomId}/join`
pub async fn join_by_id(
    state: web::Data<AppState>,
    Authed(session): Authed,
    path: web::Path<String>,
) -> Result<HttpResponse, MatrixError> {
    ids::room_id(&path)?;
    join(&state, &session, &path, Vec::new()).await
}

/// Joins a room of ours, or of another server through the OP-1 candidates (JN-6). CP-10: the
/// user's device peeks of the room end with the join, in the same transaction.
async fn join(
    state: &AppState,
    session: &crate::accounts::Session,
    target: &str,
    servers: Vec<String>,
) -> Result<HttpResponse, MatrixError> {
    let (room_id, candidates) = crate::peeks::local::resolve(&state.outbound, target, servers).await?;
    crate::membership::outbound::join_room(&state.outbound, &session.user_id, &room_id, &candidates).await?;
    Ok(HttpResponse::Ok().json(json!({ "room_id": room_id })))
}

#[derive(Deserialize)]
pub struct InviteBody {
    user_id: String,
}

/// `POST /rooms/{roomId}/invite`: a user of ours or of another server (JN-7).
pub async fn invite(
    state: web::Data<AppState>,
    Authed(session): Authed,
    path: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, MatrixError> {
    let room_id = ids::room_id(&path)?;
    let body: InviteBody = parse_json(&body)?;
    let invitee = ruma::UserId::parse(&body.user_id).map_err(|e| MatrixError::invalid_param(e.to_string()))?;
    let (rooms, keys, federation) = (&state.rooms, &state.keys, &state.federation);
    crate::membership::invites::invite(rooms, keys, federation, &room_id, &session.user_id, &invitee).await?;
    Ok(HttpResponse::Ok().json(json!({})))
}

pub async fn leave(
    state: web::Data<AppState>,
    Authed(session): Authed,
    path: web::Path<String>,
) -> Result<HttpResponse, MatrixError> {
    let room_id = ids::room_id(&path)?;
    crate::membership::outbound::leave_room(&state.outbound, &session.user_id, &room_id).await?;
    Ok(HttpResponse::Ok().json(json!({})))
}

#[derive(Deserialize)]
pub struct MessagesQuery {
    from: Option<String>,
    dir: Option<String>,
    limit: Option<i64>,
}

/// Stream tokens are `s<stream position>`.
fn parse_token(token: &str) -> Result<i64, MatrixError> {
    token
        .strip_prefix('s')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| MatrixError::invalid_param(format!("Invalid pagination token {token:?}")))
}

pub async fn messages(
    state: web::Data<AppState>,
    Authed(session): Authed,
    path: web::Path<String>,
    query: web::Query<MessagesQuery>,
) -> Result<HttpResponse, MatrixError> {
    let room_id = ids::room_id(&path)?;
    let member = require_reader(&state, &room_id, &session).await?;
    let forwards = match query.dir.as_deref() {
        Some("f") => true,
        Some("b") | None => false,
        Some(other) => return Err(MatrixError::invalid_param(format!("dir must be b or f, not {other:?}"))),
    };
    let limit = query.limit.unwrap_or(10).clamp(1, 1000);
    let from = match &query.from {
        Some(token) => parse_token(token)?,
        None if forwards => 0,
        None => state.rooms.latest_stream_pos(&room_id).await? + 1,
    };
    let (chunk, end) = state.rooms.timeline_page(&room_id, from, forwards, limit, member).await?;
    let mut answer = json!({ "chunk": chunk, "start": format!("s{from}") });
    if let Some(end) = end {
        answer["end"] = Value::from(format!("s{end}"));
    }
    Ok(HttpResponse::Ok().json(answer))
}

pub async fn directory_lookup(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, MatrixError> {
    let alias = req.match_info().get("alias").unwrap_or_default();
    Ok(HttpResponse::Ok().json(directory_answer(&state, alias).await?))
}

/// `{room_id, servers}` for one of our aliases: the answer of both the client and the federation
/// directory lookups.
pub async fn directory_answer(state: &AppState, alias: &str) -> Result<Value, MatrixError> {
    let alias = ids::room_alias(alias)?;
    match state.rooms.resolve_alias(alias.as_str()).await? {
        Some(room_id) => Ok(json!({ "room_id": room_id, "servers": [state.settings.server_name.as_str()] })),
        None => Err(MatrixError::not_found("Room alias not found")),
    }
}
