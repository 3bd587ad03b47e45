//! JN-8: a gap `get_missing_events` could not close in a room we are in. For each prev event
//! we lack, the server that sent the new event is asked for the state before it (`/state_ids`)
//! and for the events of that state and its auth chain we do not have (`/event`, bounded). The
//! whole is checked like a `send_join` answer (every event's signatures and strict hash, one
//! create event, the auth rules over the state and auth chain, the prev event against that
//! state) before the prev event is stored as an outlier carrying the state before and after it.
//! Then the new event can be placed (and, when it forks, resolved) by the append path.

use ruma::{RoomId, ServerName};
use serde_json::{json, Value};

use crate::events::RoomVersion;
use crate::federation::client::FederationError;
use crate::peeks::outbound::validate::{self, InvalidPeek};
use crate::peeks::outbound::OutboundPeeks;
use crate::rooms::RoomError;

/// Events fetched for one gap, at most (state events and auth chain we lack).
pub const MAX_FETCHED_EVENTS: usize = 2_000;
/// Prev events a new event may make us fetch the state of.
const MAX_PREVS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    #[error("{0}")]
    Federation(#[from] FederationError),
    #[error("the state names {0} events we lack (at most {MAX_FETCHED_EVENTS})")]
    TooLarge(usize),
    #[error("malformed answer: {0}")]
    Malformed(String),
    #[error("invalid state: {0}")]
    Invalid(#[from] InvalidPeek),
    #[error(transparent)]
    Room(#[from] RoomError),
}

/// Fetches and stores the state at each of `prevs` (events of `room_id` we lack) from `origin`.
pub async fn fetch_state_at(
    state: &OutboundPeeks,
    origin: &ServerName,
    room_id: &RoomId,
    version: RoomVersion,
    prevs: &[String],
) -> Result<(), CatchUpError> {
    for prev in prevs.iter().take(MAX_PREVS) {
        if state.rooms.event(prev).await?.is_some() {
            continue;
        }
        let path = format!(
            "/_matrix/federation/v1/state_ids/{}?event_id={}",
            crate::ids::path_segment(room_id.as_str()),
            crate::ids::path_segment(prev)
        );
        let ids = state.federation.get(origin, &path).await?;
        let list = |name: &str| -> Vec<String> {
            ids.get(name)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        };
        let (state_ids, chain_ids) = (list("pdu_ids"), list("auth_chain_ids"));
        if state_ids.len() + chain_ids.len() > MAX_FETCHED_EVENTS {
            return Err(CatchUpError::TooLarge(state_ids.len() + chain_ids.len()));
        }
        let state_events = events(state, origin, room_id, &state_ids).await?;
        let chain_events = events(state, origin, room_id, &chain_ids).await?;
        let prev_event = events(state, origin, room_id, std::slice::from_ref(prev)).await?;
        let body = json!({ "state": state_events, "auth_chain": chain_events });
        let valid = validate::validate_state(&state.keys, room_id, version, &body).await?;
        let raw = prev_event.first().ok_or_else(|| CatchUpError::Malformed("no prev event".into()))?;
        let pdu =
            validate::check_pdu(&state.keys, room_id, version, raw, crate::events::intake::Hashes::Strict).await?;
        if pdu.event_id.as_str() != prev {
            return Err(CatchUpError::Malformed(format!("{origin} answered {} for {prev}", pdu.event_id)));
        }
        let after = validate::check_event_against(version, &pdu, &valid)?;
        let outliers = valid.all.into_values().collect();
        state.rooms.store_fetched_state(room_id, outliers, pdu, valid.state, after).await?;
        tracing::info!(room = %room_id, %origin, prev = %prev, "gap closed with a state fetch");
    }
    Ok(())
}

/// The events `ids` as JSON: ours from the store, the rest from `origin` (`/event`).
async fn events(
    state: &OutboundPeeks,
    origin: &ServerName,
    room_id: &RoomId,
    ids: &[String],
) -> Result<Vec<Value>, CatchUpError> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(stored) = state.rooms.event(id).await?.filter(|e| e.pdu.room_id == room_id) {
            out.push(stored.pdu.federation_json());
            continue;
        }
        let answer = state
            .federation
            .get(origin, &format!("/_matrix/federation/v1/event/{}", crate::ids::path_segment(id)))
            .await?;
        let pdu = answer.get("pdus").and_then(Value::as_array).and_then(|p| p.first()).cloned();
        out.push(pdu.ok_or_else(|| CatchUpError::Malformed(format!("/event {id} answered no PDU")))?);
    }
    Ok(out)
}
