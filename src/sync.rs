//! `/sync` for local devices: joined rooms, the device's peeked rooms (MSC2753 CP-9, same shape
//! as joined rooms) and ended peeks as leave entries (CP-12), with long-polling.
//!
//! A token is `s<event stream position>_<device peek sequence>`: events and peek changes are
//! two streams, because an unpeek writes no event but must still reach the next sync.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ruma::RoomId;
use serde_json::{json, Map, Value};

use crate::accounts::Session;
use crate::config::Settings;
use crate::peeks::devices::{self, DevicePeek, DevicePeeks};
use crate::peeks::outbound;
use crate::peeks::outbound::OutboundPeeks;
use crate::rooms::Rooms;
use crate::rooms::{RoomError, StoredEvent, Visibility};

/// Long-polls wake up at least this often, so events appended by another instance are seen.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// Longest long-poll a client may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub pos: i64,
    pub seq: i64,
}

impl Token {
    pub fn parse(raw: &str) -> Option<Token> {
        let (pos, seq) = raw.strip_prefix('s')?.split_once('_')?;
        Some(Token { pos: pos.parse().ok()?, seq: seq.parse().ok()? })
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s{}_{}", self.pos, self.seq)
    }
}

pub struct SyncParams {
    pub since: Option<Token>,
    pub timeout: Duration,
    pub filter: RoomFilter,
}

/// The parts of a sync filter peekgate applies (`room.timeline.limit`,
/// `room.state.lazy_load_members`), for joined and peeked rooms alike (CP-9).
#[derive(Debug, Clone, Copy)]
pub struct RoomFilter {
    /// Timeline events per room.
    pub limit: i64,
    /// Only the member events of the timeline's senders go into `state`.
    pub lazy_members: bool,
}

#[derive(Default)]
struct RoomsResponse {
    join: Map<String, Value>,
    peek: Map<String, Value>,
    leave: Map<String, Value>,
    invite: Map<String, Value>,
    /// Peeks whose gap the device is told about in this response.
    gaps_reported: Vec<String>,
}

impl RoomsResponse {
    fn is_empty(&self) -> bool {
        self.join.is_empty() && self.peek.is_empty() && self.leave.is_empty() && self.invite.is_empty()
    }
}

/// What `/sync` reads: borrowed from the server's shared state for one request.
pub struct SyncContext<'a> {
    pub settings: &'a Settings,
    pub rooms: &'a Rooms,
    /// The invites of our users to rooms we are not in (`rooms.invite`, JN-5).
    pub db: &'a crate::db::Db,
    pub device_peeks: &'a DevicePeeks,
    /// A device's sync keeps its rooms' federation peeks alive, and re-establishes them (TBD-1).
    pub outbound: &'a OutboundPeeks,
}

/// One `/sync`: records the device as live, applies CP-8, re-establishes federation peeks of a
/// device that idled (TBD-1), then answers, waiting up to `timeout` for something to report.
pub async fn sync(state: &SyncContext<'_>, session: &Session, params: SyncParams) -> Result<Value, RoomError> {
    let (user, device) = (session.user_id.as_str(), session.device_id.as_str());
    state.device_peeks.touch_device(user, device).await?;
    if params.since.is_none() && state.settings.raw.client.peek.clear_on_initial_sync {
        for room in state.device_peeks.end_device(user, device, devices::END_INITIAL_SYNC).await? {
            if let Ok(room_id) = RoomId::parse(&room) {
                outbound::release_if_unwatched(state.outbound, &room_id).await?;
            }
        }
    }
    reestablish_peeks(state, session).await?;
    let deadline = Instant::now() + params.timeout.min(MAX_TIMEOUT);
    let mut events = state.rooms.subscribe();
    let mut peeks = state.device_peeks.subscribe();
    loop {
        events.borrow_and_update();
        peeks.borrow_and_update();
        let now = Token { pos: state.rooms.max_stream_pos().await?, seq: state.device_peeks.max_seq().await? };
        let rooms = build(state, session, params.since, now, params.filter).await?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        if params.since.is_none() || !rooms.is_empty() || remaining.is_zero() {
            if !rooms.gaps_reported.is_empty() {
                state.device_peeks.clear_gappy(user, device, rooms.gaps_reported.clone()).await?;
            }
            return Ok(render(rooms, now));
        }
        tokio::select! {
            _ = events.changed() => {}
            _ = peeks.changed() => {}
            _ = tokio::time::sleep(remaining.min(POLL_EVERY)) => {}
        }
    }
}

fn render(rooms: RoomsResponse, now: Token) -> Value {
    let mut body = json!({ "join": rooms.join, "leave": rooms.leave, "invite": rooms.invite });
    // The `peek` key is omitted when empty, as Dendrite does.
    if !rooms.peek.is_empty() {
        body["peek"] = Value::Object(rooms.peek);
    }
    json!({
        "next_batch": now.to_string(),
        "rooms": body,
        "account_data": { "events": [] },
        "presence": { "events": [] },
        "to_device": { "events": [] },
    })
}

/// TBD-1: a device that syncs again after idling finds the federation peek of its rooms gone;
/// it is re-established (new PUT) before the answer, and the timeline is marked gappy. A room
/// that cannot be peeked any more ends the device's peek (a leave entry).
async fn reestablish_peeks(state: &SyncContext<'_>, session: &Session) -> Result<(), RoomError> {
    let (user, device) = (session.user_id.as_str(), session.device_id.as_str());
    for peek in state.device_peeks.for_sync(user, device, i64::MAX).await? {
        let Ok(room_id) = RoomId::parse(&peek.room_id) else { continue };
        if state.rooms.room(&room_id).await?.is_none_or(|r| r.is_local) {
            continue;
        }
        if outbound::get(state.outbound, &room_id).await?.is_some_and(|p| p.ended_ts.is_none()) {
            continue;
        }
        let candidates = outbound::remembered_candidates(state.outbound, &room_id).await?;
        match outbound::ensure(state.outbound, &room_id, candidates).await {
            Ok(_) => state.device_peeks.mark_gappy(room_id.as_str()).await?,
            Err(outbound::OutboundError::Room(e)) => return Err(e),
            Err(e) => {
                tracing::info!(room = %room_id, error = %e, "cannot re-establish a peek; ending it");
                state.device_peeks.end(user, device, room_id.as_str(), devices::END_LOST).await?;
            }
        }
    }
    Ok(())
}

/// The rooms part of a sync from `since` to `now`.
async fn build(
    state: &SyncContext<'_>,
    session: &Session,
    since: Option<Token>,
    now: Token,
    filter: RoomFilter,
) -> Result<RoomsResponse, RoomError> {
    let limit = filter.limit;
    let (user, device) = (session.user_id.as_str(), session.device_id.as_str());
    let peeks = state.device_peeks.for_sync(user, device, since.map_or(0, |t| t.seq)).await?;
    let memberships = state.rooms.memberships(&session.user_id).await?;
    let joined: Vec<(String, i64)> =
        memberships.iter().filter(|(_, m, _)| m == "join").map(|(room, _, pos)| (room.clone(), *pos)).collect();
    let joined_ids: BTreeSet<&str> = joined.iter().map(|(room, _)| room.as_str()).collect();
    let (user_id, since_pos) = (&session.user_id, since.map(|t| t.pos));
    let invite =
        crate::membership::invites::for_sync(state.rooms, state.db, user_id, &memberships, since_pos, now.pos).await?;
    let mut out = RoomsResponse { invite, ..RoomsResponse::default() };
    // Rooms the user left (or was removed from) since the last sync: once, with the events up
    // to the leave.
    if let Some(since) = since {
        for (room, _, pos) in
            memberships.iter().filter(|(_, m, pos)| (m == "leave" || m == "ban") && *pos > since.pos && *pos <= now.pos)
        {
            let room_id = parse_room(room)?;
            out.leave.insert(room.clone(), leave_entry(state, &room_id, since.pos, *pos, limit, false).await?);
        }
    }
    for (room, join_pos) in &joined {
        let room_id = parse_room(room)?;
        // CP-10: a device that was peeking gets the join incrementally, without full state.
        let was_peeking = since.is_some_and(|since| {
            peeks.iter().any(|p| {
                p.room_id == *room && p.end_reason.as_deref() == Some(devices::END_JOINED) && p.start_seq <= since.seq
            })
        });
        let entry = match since {
            Some(since) if *join_pos <= since.pos || was_peeking => {
                incremental(state, &room_id, since.pos, now.pos, filter, false).await?
            }
            _ => Some(full(state, &room_id, now.pos, filter, false, false).await?),
        };
        if let Some(entry) = entry {
            out.join.insert(room.clone(), entry);
        }
    }
    for peek in peeks.iter().filter(|p| !joined_ids.contains(p.room_id.as_str())) {
        let room_id = parse_room(&peek.room_id)?;
        if peek.end_seq.is_none_or(|end| end > now.seq) {
            let first = since.is_none_or(|since| peek.start_seq > since.seq);
            let entry = match since {
                Some(since) if !first && !peek.gappy => {
                    incremental(state, &room_id, since.pos, now.pos, filter, true).await?
                }
                _ => Some(full(state, &room_id, now.pos, filter, true, peek.gappy).await?),
            };
            if peek.gappy {
                out.gaps_reported.push(peek.room_id.clone());
            }
            if let Some(entry) = entry {
                out.peek.insert(peek.room_id.clone(), entry);
            }
        } else if let Some(since) = since.filter(|since| shows_leave(peek, *since)) {
            let upto = peek.end_pos.unwrap_or(now.pos).min(now.pos);
            out.leave.insert(peek.room_id.clone(), leave_entry(state, &room_id, since.pos, upto, limit, true).await?);
        }
    }
    Ok(out)
}

/// CP-12: an ended peek the device knew about is shown once as a leave entry; peeks ended by a
/// join (CP-10) or by the initial sync (CP-8) are not.
fn shows_leave(peek: &DevicePeek, since: Token) -> bool {
    let reason = peek.end_reason.as_deref();
    peek.start_seq <= since.seq && reason != Some(devices::END_JOINED) && reason != Some(devices::END_INITIAL_SYNC)
}

fn parse_room(room: &str) -> Result<ruma::OwnedRoomId, RoomError> {
    RoomId::parse(room).map_err(|e| RoomError::Internal(format!("stored room ID {room}: {e}")))
}

/// The newest events after `after` up to `upto` (at most `limit`, oldest first), and whether
/// more were left out. Peekers see only world-readable events (CP-9).
async fn timeline(
    state: &SyncContext<'_>,
    room_id: &RoomId,
    after: i64,
    upto: i64,
    limit: i64,
    peeking: bool,
) -> Result<(Vec<StoredEvent>, bool), RoomError> {
    let mut events = match state.rooms.events_in_range(room_id, upto + 1, false, limit + 1).await {
        Ok(events) => events,
        // A room nobody peeks any more is forgotten; an old token still gets its (empty) entry.
        Err(RoomError::NotFound) => return Ok((Vec::new(), false)),
        Err(e) => return Err(e),
    };
    events.retain(|e| e.stream_pos > after);
    let limited = events.len() as i64 > limit;
    events.truncate(limit as usize);
    events.reverse();
    if peeking {
        let mut visible = Vec::with_capacity(events.len());
        for event in events {
            if state.rooms.visibility_of(&event).await? == Visibility::WorldReadable {
                visible.push(event);
            }
        }
        events = visible;
    }
    Ok((events, limited))
}

fn room_entry(state_events: Vec<Value>, timeline: &[StoredEvent], limited: bool, summary: Value) -> Value {
    let prev_batch = timeline.first().map(|e| format!("s{}", e.stream_pos));
    json!({
        "state": { "events": state_events },
        "timeline": {
            "events": timeline.iter().map(|e| e.pdu.client_json()).collect::<Vec<_>>(),
            "limited": limited,
            "prev_batch": prev_batch,
        },
        "ephemeral": { "events": [] },
        "account_data": { "events": [] },
        "summary": summary,
        "unread_notifications": { "highlight_count": 0, "notification_count": 0 },
    })
}

/// The `state` of a room entry: the current state without what the timeline shows, and with
/// lazy-loaded members only the member events of the timeline's senders.
fn state_section(current: &[crate::events::Pdu], timeline: &[StoredEvent], filter: RoomFilter) -> Vec<Value> {
    let in_timeline: BTreeSet<&str> = timeline.iter().map(|e| e.pdu.event_id.as_str()).collect();
    let senders: BTreeSet<&str> = timeline.iter().map(|e| e.pdu.sender.as_str()).collect();
    current
        .iter()
        .filter(|p| !in_timeline.contains(p.event_id.as_str()))
        .filter(|p| {
            !filter.lazy_members
                || p.event_type() != "m.room.member"
                || p.state_key.as_deref().is_some_and(|member| senders.contains(member))
        })
        .map(|p| p.client_json())
        .collect()
}

/// A room's first appearance (or a gappy one): its current state and the newest events.
async fn full(
    state: &SyncContext<'_>,
    room_id: &RoomId,
    upto: i64,
    filter: RoomFilter,
    peeking: bool,
    gappy: bool,
) -> Result<Value, RoomError> {
    let (events, limited) = timeline(state, room_id, 0, upto, filter.limit, peeking).await?;
    let current = state.rooms.current_state(room_id).await?;
    let joined = current
        .iter()
        .filter(|p| p.event_type() == "m.room.member" && p.content_value()["membership"] == "join")
        .count();
    let state_events = state_section(&current, &events, filter);
    let summary = json!({ "m.joined_member_count": joined, "m.invited_member_count": 0 });
    Ok(room_entry(state_events, &events, limited || gappy, summary))
}

/// A room's events since the last sync; `None` when there are none. A limited timeline carries
/// the current state, so the client never misses a state change in the gap.
async fn incremental(
    state: &SyncContext<'_>,
    room_id: &RoomId,
    since: i64,
    upto: i64,
    filter: RoomFilter,
    peeking: bool,
) -> Result<Option<Value>, RoomError> {
    let (events, limited) = timeline(state, room_id, since, upto, filter.limit, peeking).await?;
    if events.is_empty() && !limited {
        return Ok(None);
    }
    let state_events =
        if limited { state_section(&state.rooms.current_state(room_id).await?, &events, filter) } else { Vec::new() };
    Ok(Some(room_entry(state_events, &events, limited, json!({}))))
}

/// A leave entry: the events between the previous sync and the leave (for a peek, CP-12
/// revision B: its end), or `{}` when there are none.
async fn leave_entry(
    state: &SyncContext<'_>,
    room_id: &RoomId,
    since: i64,
    upto: i64,
    limit: i64,
    peeking: bool,
) -> Result<Value, RoomError> {
    let (events, limited) = timeline(state, room_id, since, upto, limit, peeking).await?;
    if events.is_empty() {
        return Ok(json!({}));
    }
    let events: Vec<Value> = events.iter().map(|e| e.pdu.client_json()).collect();
    Ok(json!({ "timeline": { "events": events, "limited": limited } }))
}

#[cfg(test)]
mod tests {
    use super::Token;

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let token = Token { pos: 72595, seq: 4 };
        assert_eq!(Token::parse(&token.to_string()), Some(token));
        for bad in ["", "s1", "72595_4", "sx_1", "s1_", "s-_1"] {
            assert_eq!(Token::parse(bad), None, "{bad:?}");
        }
    }
}
