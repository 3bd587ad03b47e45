//! MSC2753 for local devices: `POST /peek/{roomIdOrAlias}`, `POST /rooms/{roomId}/unpeek`
//! (CP-1..7, CP-14) and `GET /sync` (CP-8..12, in [`crate::sync`]).

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use ruma::{OwnedRoomId, RoomAliasId, RoomId};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Authed;
use crate::accounts::Session;
use crate::clock::now_ms;
use crate::error::{parse_json, MatrixError};
use crate::ids::{self, RoomRef};
use crate::peeks::devices::{self, Started};
use crate::peeks::outbound;
use crate::state::AppState;
use crate::sync::{self, RoomFilter, SyncParams, Token};

/// CP-16: the lifetime we announce; every `/sync` of the device renews it implicitly (TBD-1).
const PEEK_LIFETIME_MS: i64 = 24 * 3_600_000;

#[derive(Deserialize, Default)]
struct PeekBody {
    /// Revision B's candidate servers.
    #[serde(default)]
    servers: Vec<String>,
}

fn bad_state(error: &str) -> MatrixError {
    MatrixError::new(StatusCode::BAD_REQUEST, "M_BAD_STATE", error)
}

fn rate_limit(state: &AppState, session: &Session) -> Result<(), MatrixError> {
    state
        .device_peeks
        .check_rate(session.user_id.as_str(), &session.device_id)
        .map_err(|retry_after_ms| MatrixError::limit_exceeded("Too many peek requests", retry_after_ms))
}

/// An empty body counts as `{}`; anything else must be a JSON object.
fn optional_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, MatrixError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_json(body)
}

/// `POST /peek/{roomIdOrAlias}` (CP-1..5, OP-1, OP-2).
pub async fn peek(
    state: web::Data<AppState>,
    Authed(session): Authed,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, MatrixError> {
    rate_limit(&state, &session)?;
    let target = req.match_info().get("room_id_or_alias").unwrap_or_default().to_owned();
    let request: PeekBody = optional_body(&body)?;
    let mut servers: Vec<String> = url::form_urlencoded::parse(req.query_string().as_bytes())
        .filter(|(k, _)| k == "server_name")
        .map(|(_, v)| v.into_owned())
        .collect();
    servers.extend(request.servers);
    let (room_id, candidates) = resolve(&state, &target, servers).await?;
    if state.rooms.membership(&room_id, &session.user_id).await?.as_deref() == Some("join") {
        return Err(bad_state("You are joined to this room; it is in the join section of /sync"));
    }
    // A device that peeks is active: it counts as live for TBD-1 before its first sync.
    state.device_peeks.touch_device(session.user_id.as_str(), &session.device_id).await?;
    let local = state.rooms.room(&room_id).await?.is_some_and(|r| r.is_local);
    if local {
        require_peekable(&state, &room_id).await?;
    } else if room_id.server_name() == Some(&*state.settings.server_name) {
        return Err(MatrixError::not_found("Room not found"));
    } else {
        if outbound::ensure(&state, &room_id, candidates).await? {
            // Re-established after a gap: every device still peeking gets a limited timeline.
            state.device_peeks.mark_gappy(room_id.as_str()).await?;
        }
        // A reused peek may be older than a visibility change: check our copy of the state.
        require_peekable(&state, &room_id).await?;
    }
    let cap = state.settings.raw.client.peek.max_per_device.into();
    let started = state.device_peeks.start(session.user_id.as_str(), &session.device_id, room_id.as_str(), cap).await?;
    if started == Started::AtCap {
        if !local {
            outbound::release_if_unwatched(&state, &room_id).await?;
        }
        return Err(MatrixError::limit_exceeded("This device peeks too many rooms", 60_000));
    }
    tracing::info!(room = %room_id, device = %session.device_id, ?started, "device peek");
    Ok(HttpResponse::Ok().json(json!({ "room_id": room_id, "peek_expiry_ts": now_ms() + PEEK_LIFETIME_MS })))
}

/// CP-2, OP-1: the room ID and the ordered candidate servers for a room ID or an alias.
async fn resolve(
    state: &AppState,
    target: &str,
    client_servers: Vec<String>,
) -> Result<(OwnedRoomId, Vec<String>), MatrixError> {
    let ours = &state.settings.server_name;
    let room_id = match ids::room_id_or_alias(target)? {
        RoomRef::Id(room_id) => room_id,
        RoomRef::Alias(alias) => return resolve_alias(state, &alias, client_servers).await,
    };
    let room_server = room_id.server_name().map(|s| s.to_string());
    let lists = client_servers.iter().map(String::as_str).chain(room_server.as_deref());
    Ok((room_id.clone(), outbound::candidates(ours, lists)))
}

/// OP-1 for an alias: ours resolve here; others through their server's directory, with the
/// alias's server and the directory's answer as candidates after the client's.
async fn resolve_alias(
    state: &AppState,
    alias: &RoomAliasId,
    client_servers: Vec<String>,
) -> Result<(OwnedRoomId, Vec<String>), MatrixError> {
    let ours = &state.settings.server_name;
    {
        if alias.server_name() == &**ours {
            let room_id = state
                .rooms
                .resolve_alias(alias.as_str())
                .await?
                .ok_or_else(|| MatrixError::not_found("Room alias not found"))?;
            return Ok((room_id, Vec::new()));
        }
        let (room_id, directory) = outbound::resolve_alias(state, alias).await?;
        let alias_server = alias.server_name().to_string();
        let room_server = room_id.server_name().map(|s| s.to_string());
        let lists = client_servers
            .iter()
            .map(String::as_str)
            .chain([alias_server.as_str()])
            .chain(directory.iter().map(String::as_str))
            .chain(room_server.as_deref());
        Ok((room_id.clone(), outbound::candidates(ours, lists)))
    }
}

/// CP-3: world-readable and not encrypted, in our copy of the current state.
async fn require_peekable(state: &AppState, room_id: &RoomId) -> Result<(), MatrixError> {
    state.rooms.peekability(room_id).await?.map_err(MatrixError::forbidden)
}

/// `POST /rooms/{roomId}/unpeek` (CP-6, CP-7, OP-8).
pub async fn unpeek(
    state: web::Data<AppState>,
    Authed(session): Authed,
    path: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, MatrixError> {
    rate_limit(&state, &session)?;
    let room_id = ids::room_id(&path)?;
    let _: Value = parse_json(if body.is_empty() { b"{}" } else { &body })?;
    if state.rooms.room(&room_id).await?.is_none() {
        return Err(MatrixError::not_found("Room not found"));
    }
    let ended = state
        .device_peeks
        .end(session.user_id.as_str(), &session.device_id, room_id.as_str(), devices::END_UNPEEK)
        .await?;
    if !ended {
        return Err(bad_state("This device is not peeking the room"));
    }
    outbound::release_if_unwatched(&state, &room_id).await?;
    Ok(HttpResponse::Ok().json(json!({})))
}

#[derive(Deserialize)]
pub struct SyncQuery {
    since: Option<String>,
    timeout: Option<u64>,
    filter: Option<String>,
}

/// Timeline events per room when the filter does not say.
const DEFAULT_TIMELINE_LIMIT: i64 = 20;
const MAX_TIMELINE_LIMIT: i64 = 1000;

/// `GET /sync`. An inline JSON filter's `room.timeline.limit` and
/// `room.state.lazy_load_members` are honoured; other filter fields and stored filter IDs are
/// ignored.
pub async fn sync(
    state: web::Data<AppState>,
    Authed(session): Authed,
    query: web::Query<SyncQuery>,
) -> Result<HttpResponse, MatrixError> {
    let since = match &query.since {
        Some(raw) => {
            Some(Token::parse(raw).ok_or_else(|| MatrixError::invalid_param(format!("Invalid since token {raw:?}")))?)
        }
        None => None,
    };
    let filter = query.filter.as_deref().and_then(|f| serde_json::from_str::<Value>(f).ok()).unwrap_or_default();
    let filter = RoomFilter {
        limit: filter["room"]["timeline"]["limit"]
            .as_i64()
            .unwrap_or(DEFAULT_TIMELINE_LIMIT)
            .clamp(1, MAX_TIMELINE_LIMIT),
        lazy_members: filter["room"]["state"]["lazy_load_members"] == true,
    };
    let params = SyncParams { since, timeout: Duration::from_millis(query.timeout.unwrap_or(0)), filter };
    Ok(HttpResponse::Ok().json(sync::sync(&state, &session, params).await?))
}
