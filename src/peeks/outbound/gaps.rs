//! OP-6, OP-9: close a gap in a peeked room: `get_missing_events` page by page, `/backfill`
//! for targets that refuse it (in [`super::backfill`]), and as the last resort a fresh peek
//! for a new starting point.

use super::*;

/// Events asked for in one `get_missing_events`.
pub(super) const MISSING_EVENTS_LIMIT: usize = 100;
/// `get_missing_events` calls for one gap: up to 1,000 events. A longer gap is not filled
/// (the caller re-syncs from a state snapshot instead, or refuses the PDU).
pub(super) const MISSING_EVENTS_ROUNDS: usize = 10;

/// Fetches the events between our forward extremities and `latest` from `origin` and appends
/// them oldest first (OP-6, OP-9). A gap longer than one answer is walked back page by page:
/// each further call asks for the history behind the oldest fetched events whose
/// `prev_events` we still lack. A target that refuses `get_missing_events` (403/404/400) is
/// walked with `/backfill` instead ([`super::backfill`], OP-4.6). Fails when the gap could not
/// be closed.
pub async fn fill_gap(
    state: &OutboundPeeks,
    origin: &ServerName,
    room_id: &RoomId,
    latest: Vec<String>,
) -> Result<usize, OutboundError> {
    let row = state.rooms.room(room_id).await?.ok_or(RoomError::NotFound)?;
    let earliest = state.rooms.forward_extremities(room_id).await?;
    let mut fetched: HashMap<String, Pdu> = HashMap::new();
    let mut frontier = latest.clone();
    for _ in 0..MISSING_EVENTS_ROUNDS {
        let page = match missing_events(state, origin, room_id, row.version, &earliest, &frontier).await {
            Ok(page) => page,
            // OP-4.6: targets that serve non-members only `/backfill`.
            Err(e) if super::backfill::refuses_reads(&e) => {
                tracing::info!(room = %room_id, %origin, error = %e, "get_missing_events refused; walking /backfill");
                return super::backfill::fill_gap(state, origin, room_id, row.version, &latest).await;
            }
            Err(e) => return Err(OutboundError::NotFound(format!("get_missing_events: {e}"))),
        };
        let before = fetched.len();
        for pdu in page {
            fetched.entry(pdu.event_id.to_string()).or_insert(pdu);
        }
        if fetched.len() == before {
            break; // nothing new: the origin cannot take us further back
        }
        frontier = unlinked(state, &fetched, &latest).await?;
        if frontier.is_empty() {
            break;
        }
    }
    let mut events: Vec<Pdu> = fetched.into_values().filter(|p| !latest.contains(&p.event_id.to_string())).collect();
    events.sort_by_key(|p| p.depth);
    let mut appended = 0;
    for pdu in events {
        if state.rooms.append_remote(room_id, pdu).await?.is_some() {
            appended += 1;
        }
    }
    Ok(appended)
}

/// One `get_missing_events` call; the events that pass their checks (others are logged and
/// dropped, so the gap stays open behind them).
pub(super) async fn missing_events(
    state: &OutboundPeeks,
    origin: &ServerName,
    room_id: &RoomId,
    version: RoomVersion,
    earliest: &[String],
    latest: &[String],
) -> Result<Vec<Pdu>, FederationError> {
    let path = format!("/_matrix/federation/v1/get_missing_events/{}", enc(room_id.as_str()));
    let body =
        json!({ "earliest_events": earliest, "latest_events": latest, "limit": MISSING_EVENTS_LIMIT, "min_depth": 0 });
    let request = FedRequest { method: Method::POST, destination: origin, path: &path, body: Some(body), signed: true };
    let answer = state.federation.send(request).await?;
    let mut events = Vec::new();
    // H16: no more than we asked for is checked, whatever the target sends.
    let listed = answer["events"].as_array().cloned().unwrap_or_default();
    for raw in listed.into_iter().take(MISSING_EVENTS_LIMIT) {
        match validate::check_pdu(&state.keys, room_id, version, &raw, crate::events::intake::Hashes::Redact).await {
            Ok(pdu) => events.push(pdu),
            Err(e) => tracing::info!(room = %room_id, %origin, error = %e, "a missing event failed its checks"),
        }
    }
    Ok(events)
}

/// The fetched events with a `prev_event` that is neither fetched, nor in `latest`, nor stored:
/// where the next page of history has to start.
pub(super) async fn unlinked(
    state: &OutboundPeeks,
    fetched: &HashMap<String, Pdu>,
    latest: &[String],
) -> Result<Vec<String>, OutboundError> {
    let mut open = Vec::new();
    for (id, pdu) in fetched {
        for prev in &pdu.prev_events {
            let prev = prev.as_str();
            if fetched.contains_key(prev) || latest.iter().any(|l| l == prev) {
                continue;
            }
            if state.rooms.event(prev).await?.is_none() {
                open.push(id.clone());
                break;
            }
        }
    }
    Ok(open)
}

/// A gap in a peeked room that `get_missing_events` could not close (a PDU pushed at
/// `refused_at` had prev events we could not fetch): a new peek, through the same target
/// first, gives the room a new starting point, and its devices a `limited` timeline. Nothing
/// to do when the peek ended or was re-established since (several refused PDUs ask at once).
pub async fn resync(state: &OutboundPeeks, room_id: &RoomId, refused_at: i64) -> Result<bool, RoomError> {
    let _room = lock_room(state, room_id).await?;
    let Some(peek) = get(state, room_id).await?.filter(|p| p.ended_ts.is_none() && p.created_ts < refused_at) else {
        return Ok(false);
    };
    let known = peek.candidates();
    let others = known.iter().map(String::as_str).filter(|s| *s != peek.target);
    let order = candidates(&state.settings.server_name, [peek.target.as_str()].into_iter().chain(others));
    repeek(state, room_id, &peek, &order, "re-synced after a gap it could not fill").await
}

/// Replaces `peek` by a new one through the first of `order` that answers, then DELETEs the
/// old one. `false` when no candidate answered.
pub(super) async fn repeek(
    state: &OutboundPeeks,
    room_id: &RoomId,
    peek: &OutboundPeek,
    order: &[String],
    what: &str,
) -> Result<bool, RoomError> {
    match establish(state, room_id, order).await {
        Ok(gappy) => {
            if gappy {
                state.device_peeks.mark_gappy(room_id.as_str()).await?;
            }
            // Best effort: the old target may be gone, or may come back still holding our peek.
            if let Ok(old) = server(&peek.target) {
                delete_remote(state, &old, room_id, &peek.peek_id).await;
            }
            tracing::info!(room = %room_id, from = %peek.target, "outbound peek {what}");
            Ok(true)
        }
        Err(OutboundError::Room(e)) => Err(e),
        Err(e) => {
            tracing::warn!(room = %room_id, error = %e, "no candidate answered a new outbound peek");
            Ok(false)
        }
    }
}
