//! Read endpoints (WR-1..4, JN-11): servers with no member in the room read only
//! `world_readable` history, judged at each event (WR-2); servers with members read what the
//! spec's per-server history-visibility rule allows (`rooms::visibility::server_may_see`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use ruma::{OwnedRoomId, ServerName};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client_api::rooms::directory_answer;
use crate::clock::now_ms;
use crate::error::MatrixError;
use crate::federation::auth::SignedRequest;
use crate::ids;
use crate::rooms::StoredEvent;
use crate::state::AppState;

/// Most events one backfill or get_missing_events answer carries.
const MAX_EVENTS_PER_READ: usize = 100;

fn query_values(req: &HttpRequest, name: &str) -> Vec<String> {
    url::form_urlencoded::parse(req.query_string().as_bytes())
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// May `origin` see `event` (JN-11)? `joined`: it has a member in the room now.
async fn may_see(
    state: &AppState,
    origin: &ServerName,
    event: &StoredEvent,
    joined: bool,
) -> Result<bool, MatrixError> {
    Ok(state.rooms.server_may_see(event, origin, joined).await?)
}

async fn known_room(state: &AppState, raw: &str) -> Result<OwnedRoomId, MatrixError> {
    let room_id = ids::room_id(raw)?;
    // Rooms we only peek are other servers' to serve: we hold a partial copy at best.
    if !state.rooms.room(&room_id).await?.is_some_and(|r| r.is_local) {
        return Err(MatrixError::not_found("Room not found"));
    }
    Ok(room_id)
}

/// The event in `room_id`, which `origin` must be allowed to see.
async fn visible_event(
    state: &AppState,
    origin: &ServerName,
    room_id: Option<&OwnedRoomId>,
    event_id: &str,
) -> Result<Arc<StoredEvent>, MatrixError> {
    let (event, visible) = state
        .rooms
        .event_for_server(event_id, origin)
        .await?
        .ok_or_else(|| MatrixError::not_found("Event not found"))?;
    if room_id.is_some_and(|r| *r != event.pdu.room_id) {
        return Err(MatrixError::not_found("Event not found in this room"));
    }
    if !visible {
        return Err(MatrixError::forbidden("You may not see this event"));
    }
    Ok(event)
}

fn pdus(events: &[crate::events::Pdu]) -> Vec<Value> {
    events.iter().map(|e| e.federation_json()).collect()
}

/// `GET /_matrix/federation/v1/event/{eventId}`
pub async fn event(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, MatrixError> {
    let event = visible_event(&state, &request.origin, None, &path).await?;
    Ok(HttpResponse::Ok().json(json!({
        "origin": state.settings.server_name.as_str(),
        "origin_server_ts": now_ms(),
        "pdus": [event.pdu.federation_json()],
    })))
}

/// The state before `event_id` and its auth chain (what `/state` and `/state_ids` describe).
async fn state_before(
    state: &AppState,
    origin: &ServerName,
    room_id: &OwnedRoomId,
    req: &HttpRequest,
) -> Result<(Vec<crate::events::Pdu>, Vec<crate::events::Pdu>), MatrixError> {
    let event_id =
        query_values(req, "event_id").into_iter().next().ok_or_else(|| MatrixError::missing_param("event_id"))?;
    let event = visible_event(state, origin, Some(room_id), &event_id).await?;
    let state_events = match event.state_group_before {
        Some(group) => state.rooms.state_of_group(group).await?,
        None => Vec::new(), // the create event: nothing before it
    };
    let ids: Vec<String> = state_events.iter().map(|e| e.event_id.to_string()).collect();
    let auth_chain = state.rooms.auth_chain(ids).await?;
    Ok((state_events, auth_chain))
}

/// `GET /_matrix/federation/v1/state/{roomId}?event_id=`
pub async fn room_state(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, MatrixError> {
    let room_id = known_room(&state, &path).await?;
    let (state_events, auth_chain) = state_before(&state, &request.origin, &room_id, &req).await?;
    Ok(HttpResponse::Ok().json(json!({ "pdus": pdus(&state_events), "auth_chain": pdus(&auth_chain) })))
}

/// `GET /_matrix/federation/v1/state_ids/{roomId}?event_id=`
pub async fn room_state_ids(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, MatrixError> {
    let room_id = known_room(&state, &path).await?;
    let (state_events, auth_chain) = state_before(&state, &request.origin, &room_id, &req).await?;
    let ids = |events: &[crate::events::Pdu]| events.iter().map(|e| e.event_id.to_string()).collect::<Vec<_>>();
    Ok(HttpResponse::Ok().json(json!({ "pdu_ids": ids(&state_events), "auth_chain_ids": ids(&auth_chain) })))
}

/// `GET /_matrix/federation/v1/event_auth/{roomId}/{eventId}`
pub async fn event_auth(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, MatrixError> {
    let (room, event_id) = path.into_inner();
    let room_id = known_room(&state, &room).await?;
    let event = visible_event(&state, &request.origin, Some(&room_id), &event_id).await?;
    let chain = state.rooms.auth_chain(vec![event.pdu.event_id.to_string()]).await?;
    Ok(HttpResponse::Ok().json(json!({ "auth_chain": pdus(&chain) })))
}

/// Walks `prev_events` backwards from `start`, newest first by depth, stopping at `stop` and
/// after `limit` events; keeps only what `origin` may see (WR-3).
async fn walk_back(
    state: &AppState,
    origin: &ServerName,
    room_id: &OwnedRoomId,
    start: Vec<String>,
    stop: &BTreeSet<String>,
    limit: usize,
    include_start: bool,
) -> Result<(Vec<Value>, usize), MatrixError> {
    let joined = state.rooms.server_is_joined(room_id, origin).await?;
    let mut queue: BTreeMap<(i64, String), StoredEvent> = BTreeMap::new();
    let mut seen: BTreeSet<String> = stop.clone();
    let mut enqueue = |events: Vec<StoredEvent>, queue: &mut BTreeMap<(i64, String), StoredEvent>| {
        for e in events {
            if e.pdu.room_id == *room_id && seen.insert(e.pdu.event_id.to_string()) {
                queue.insert((e.pdu.depth, e.pdu.event_id.to_string()), e);
            }
        }
    };
    let mut first = Vec::new();
    for id in &start {
        if let Some(event) = state.rooms.event(id).await? {
            first.push(event);
        }
    }
    if include_start {
        enqueue(first, &mut queue);
    } else {
        for event in first {
            let mut prevs = Vec::new();
            for prev in &event.pdu.prev_events {
                if let Some(p) = state.rooms.event(prev.as_str()).await? {
                    prevs.push(p);
                }
            }
            enqueue(prevs, &mut queue);
        }
    }
    let (mut out, mut considered) = (Vec::new(), 0);
    while considered < limit {
        let Some((_, event)) = queue.pop_last() else {
            break;
        };
        considered += 1;
        let mut prevs = Vec::new();
        for prev in &event.pdu.prev_events {
            if let Some(p) = state.rooms.event(prev.as_str()).await? {
                prevs.push(p);
            }
        }
        enqueue(prevs, &mut queue);
        if may_see(state, origin, &event, joined).await? {
            out.push(event.pdu.federation_json());
        }
    }
    Ok((out, considered))
}

/// Event IDs a read may name in one list (H12): each is a lookup, whatever the caller sends.
pub const MAX_IDS_PER_READ: usize = 100;

fn at_most_ids(name: &str, count: usize) -> Result<(), MatrixError> {
    if count > MAX_IDS_PER_READ {
        return Err(MatrixError::invalid_param(format!("{name} names {count} events; at most {MAX_IDS_PER_READ}")));
    }
    Ok(())
}

/// `GET /_matrix/federation/v1/backfill/{roomId}?v=...&limit=`
pub async fn backfill(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, MatrixError> {
    let room_id = known_room(&state, &path).await?;
    let from = query_values(&req, "v");
    if from.is_empty() {
        return Err(MatrixError::missing_param("v"));
    }
    at_most_ids("v", from.len())?;
    let limit = query_values(&req, "limit")
        .first()
        .map(|l| l.parse::<usize>().map_err(|_| MatrixError::invalid_param("limit must be an integer")))
        .transpose()?
        .unwrap_or(10)
        .clamp(1, MAX_EVENTS_PER_READ);
    let (events, considered) =
        walk_back(&state, &request.origin, &room_id, from, &BTreeSet::new(), limit, true).await?;
    if events.is_empty() && considered > 0 {
        return Err(MatrixError::forbidden("No event in this range is visible to you"));
    }
    Ok(HttpResponse::Ok().json(json!({
        "origin": state.settings.server_name.as_str(),
        "origin_server_ts": now_ms(),
        "pdus": events,
    })))
}

#[derive(Deserialize)]
pub struct MissingEventsBody {
    #[serde(default)]
    earliest_events: Vec<String>,
    latest_events: Vec<String>,
    limit: Option<usize>,
}

/// `POST /_matrix/federation/v1/get_missing_events/{roomId}`
pub async fn get_missing_events(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, MatrixError> {
    let room_id = known_room(&state, &path).await?;
    let body: MissingEventsBody = request.json()?;
    at_most_ids("latest_events", body.latest_events.len())?;
    at_most_ids("earliest_events", body.earliest_events.len())?;
    let limit = body.limit.unwrap_or(10).clamp(1, MAX_EVENTS_PER_READ);
    let stop: BTreeSet<String> = body.earliest_events.into_iter().collect();
    let (mut events, considered) =
        walk_back(&state, &request.origin, &room_id, body.latest_events, &stop, limit, false).await?;
    if events.is_empty() && considered > 0 {
        return Err(MatrixError::forbidden("No event in this range is visible to you"));
    }
    // Oldest first, as the spec's examples give them.
    events.reverse();
    Ok(HttpResponse::Ok().json(json!({ "events": events })))
}

#[derive(Deserialize)]
pub struct DirectoryQuery {
    room_alias: Option<String>,
}

/// `GET /_matrix/federation/v1/query/directory?room_alias=`
pub async fn query_directory(
    state: web::Data<AppState>,
    _request: SignedRequest,
    query: web::Query<DirectoryQuery>,
) -> Result<HttpResponse, MatrixError> {
    let alias = query.room_alias.as_deref().ok_or_else(|| MatrixError::missing_param("room_alias"))?;
    Ok(HttpResponse::Ok().json(directory_answer(&state, alias).await?))
}
