//! OP-4.6, OP-9: filling a gap in a peeked room through `/backfill`, for targets that refuse
//! `get_missing_events` (and `/event`, `/state`) to servers with no member in the room, even
//! for world-readable rooms, but serve `/backfill`.
//!
//! The walk goes back page by page from the events we lack: the first page from the event(s)
//! that could not be appended, each further one from the `prev_events` still unknown. Nothing
//! is appended until the fetched events link up with what we hold; then they are appended
//! parents first. Everything the target sends is bounded (events per page, pages, events in
//! all) and checked like any received PDU; when the gap cannot be closed within the bounds the
//! caller falls back to a fresh `PUT /peek` (a new starting point, OP-9).

use std::collections::{HashMap, HashSet};

use ruma::{RoomId, ServerName};
use serde_json::Value;

use super::targets::enc;
use super::validate;
use super::OutboundError;
use super::OutboundPeeks;
use crate::events::{Pdu, RoomVersion};
use crate::federation::client::FederationError;

/// Events asked for in one `/backfill` page (the most an answer may carry; more are ignored).
pub const PAGE_LIMIT: usize = 100;
/// Pages walked for one gap.
pub const MAX_PAGES: usize = 20;
/// Events fetched for one gap, in all.
pub const MAX_EVENTS: usize = 1_000;
/// Event IDs named in one request's `v`.
const MAX_FROM: usize = 20;

/// Does this answer to `get_missing_events` mean "not for you" or "not served" (then the gap
/// is walked with `/backfill`)? 403 from targets that serve non-members only `/backfill`, 404
/// and 400 from those that do not know the endpoint or the request.
pub fn refuses_reads(error: &FederationError) -> bool {
    matches!(error.status(), Some(400 | 403 | 404))
}

/// Fetches the history behind `latest` (events the target has and we lack) through
/// `/backfill` from `origin`, and appends it oldest first; `latest` itself is left to the
/// caller. Returns how many events were appended. Fails before appending anything when the
/// walk does not reach events we hold within the bounds, or the target stops giving new valid
/// events; an event refused by the auth rules while appending stops there (those before it
/// are linked and valid, and stay).
pub async fn fill_gap(
    state: &OutboundPeeks,
    origin: &ServerName,
    room_id: &RoomId,
    version: RoomVersion,
    latest: &[String],
) -> Result<usize, OutboundError> {
    let mut fetched: HashMap<String, Pdu> = HashMap::new();
    let mut stored: HashSet<String> = HashSet::new();
    let mut frontier: Vec<String> = latest.to_vec();
    let mut pages = 0;
    while !frontier.is_empty() {
        if pages == MAX_PAGES {
            return Err(gap(format!("more than {MAX_PAGES} /backfill pages")));
        }
        pages += 1;
        let mut new = 0;
        for pdu in page(state, origin, room_id, version, &frontier).await? {
            let id = pdu.event_id.to_string();
            if fetched.contains_key(&id) || stored.contains(&id) {
                continue;
            }
            if state.rooms.event(&id).await?.is_some() {
                stored.insert(id); // the walk reached what we hold
                continue;
            }
            fetched.insert(id, pdu);
            new += 1;
        }
        if fetched.len() > MAX_EVENTS {
            return Err(gap(format!("more than {MAX_EVENTS} events behind it")));
        }
        if new == 0 {
            return Err(gap("/backfill gave nothing new".into()));
        }
        frontier = unknown_prevs(state, &fetched, &mut stored).await?;
    }
    append_in_order(state, room_id, fetched, latest).await
}

fn gap(reason: String) -> OutboundError {
    OutboundError::NotFound(format!("the gap cannot be filled through /backfill: {reason}"))
}

/// One `GET /backfill` page: the events that pass their checks (room, signatures, hash; the
/// redacted form on a hash mismatch, as for any received PDU). Others are logged and left out,
/// so that the walk stops at them.
async fn page(
    state: &OutboundPeeks,
    origin: &ServerName,
    room_id: &RoomId,
    version: RoomVersion,
    from: &[String],
) -> Result<Vec<Pdu>, OutboundError> {
    let mut path = format!("/_matrix/federation/v1/backfill/{}?limit={PAGE_LIMIT}", enc(room_id.as_str()));
    for id in from.iter().take(MAX_FROM) {
        path.push_str("&v=");
        path.push_str(&enc(id));
    }
    let answer = state.federation.get(origin, &path).await.map_err(|e| gap(format!("/backfill: {e}")))?;
    let Some(pdus) = answer.get("pdus").and_then(Value::as_array) else {
        return Err(gap("the /backfill answer has no `pdus` list".into()));
    };
    let mut events = Vec::new();
    for raw in pdus.iter().take(PAGE_LIMIT) {
        match validate::check_pdu(&state.keys, room_id, version, raw, crate::events::intake::Hashes::Redact).await {
            Ok(pdu) => events.push(pdu),
            Err(e) => tracing::info!(room = %room_id, %origin, error = %e, "a backfilled event failed its checks"),
        }
    }
    Ok(events)
}

/// The `prev_events` of fetched events that are neither fetched nor stored: where the next
/// page starts.
async fn unknown_prevs(
    state: &OutboundPeeks,
    fetched: &HashMap<String, Pdu>,
    stored: &mut HashSet<String>,
) -> Result<Vec<String>, OutboundError> {
    let mut open: Vec<String> = Vec::new();
    for pdu in fetched.values() {
        for prev in &pdu.prev_events {
            let prev = prev.as_str();
            if fetched.contains_key(prev) || stored.contains(prev) || open.iter().any(|o| o == prev) {
                continue;
            }
            if state.rooms.event(prev).await?.is_some() {
                stored.insert(prev.to_owned());
            } else {
                open.push(prev.to_owned());
            }
        }
    }
    open.sort();
    Ok(open)
}

/// Appends the fetched events (but `latest`), each once its fetched `prev_events` are in,
/// shallowest first among those ready.
async fn append_in_order(
    state: &OutboundPeeks,
    room_id: &RoomId,
    fetched: HashMap<String, Pdu>,
    latest: &[String],
) -> Result<usize, OutboundError> {
    let mut pending: Vec<Pdu> =
        fetched.into_values().filter(|p| !latest.iter().any(|l| l == p.event_id.as_str())).collect();
    pending.sort_by_key(|p| p.depth);
    let mut appended = 0;
    while !pending.is_empty() {
        let waiting_ids: HashSet<String> = pending.iter().map(|p| p.event_id.to_string()).collect();
        let (ready, waiting): (Vec<Pdu>, Vec<Pdu>) =
            pending.into_iter().partition(|p| p.prev_events.iter().all(|prev| !waiting_ids.contains(prev.as_str())));
        if ready.is_empty() {
            return Err(gap("the fetched events' prev_events form a cycle".into()));
        }
        for pdu in ready {
            if state.rooms.append_remote(room_id, pdu).await?.is_some() {
                appended += 1;
            }
        }
        pending = waiting;
    }
    Ok(appended)
}
