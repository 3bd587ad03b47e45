//! The synchronous storage side of rooms (runs inside `Db::run`): the single append path,
//! state groups (state at any event), current state, forward extremities and event lookups.

use std::collections::{BTreeMap, HashMap};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use ruma::events::StateEventType;
use ruma::{EventId, OwnedEventId};

use super::hooks::AppendHooks;
use super::RoomError;
use crate::db::schema::{
    client_txns, current_state, events, forward_extremities, rooms, state_group_entries, state_groups,
};
use crate::db::DbConnection;
use crate::events as pdus;
use crate::events::{EventDraft, Pdu, RoomVersion};
use crate::keys::SigningKey;
use crate::on_backend;

/// A full state map: `(type, state_key)` → event ID.
pub type StateMap = BTreeMap<(String, String), String>;

/// A full snapshot is stored after this many deltas, bounding the walk to compute a state.
const SNAPSHOT_EVERY: i32 = 50;

/// Any `prev_events` list is capped by the spec at 20.
const MAX_PREV_EVENTS: i64 = 20;

/// Arbitrary constant naming the append lock in PostgreSQL's advisory-lock space.
const APPEND_LOCK_KEY: i64 = 0x7065_656b; // "peek"

/// What the append path needs to know about a room.
#[derive(Debug, Clone)]
pub struct RoomRow {
    pub room_id: String,
    pub version: RoomVersion,
    pub is_local: bool,
    pub current_state_group: Option<i64>,
    pub max_depth: i64,
}

/// An event as stored, with its position in the stream.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub stream_pos: i64,
    pub pdu: Pdu,
    pub state_group_before: Option<i64>,
    pub state_group: i64,
}

/// The result of appending one event.
#[derive(Debug, Clone)]
pub struct Appended {
    pub event_id: OwnedEventId,
    pub stream_pos: i64,
}

/// Takes the append lock. On PostgreSQL a transaction-scoped advisory lock makes appends (and
/// so stream positions) commit in order; on SQLite the first write makes the transaction hold
/// the database's write lock. Then the room row is locked by a no-op update.
pub fn lock_for_append(conn: &mut DbConnection, room_id: &str) -> Result<RoomRow, RoomError> {
    if matches!(conn, DbConnection::Postgresql(_)) {
        diesel::sql_query(format!("SELECT pg_advisory_xact_lock({APPEND_LOCK_KEY})")).execute(conn)?;
    }
    let row: Option<(String, String, bool, Option<i64>, i64)> =
        diesel::update(rooms::table.filter(rooms::room_id.eq(room_id)))
            .set(rooms::max_depth.eq(rooms::max_depth))
            .returning((
                rooms::room_id,
                rooms::room_version,
                rooms::is_local,
                rooms::current_state_group,
                rooms::max_depth,
            ))
            .get_result(conn)
            .optional()?;
    let (room_id, version, is_local, current_state_group, max_depth) = row.ok_or(RoomError::NotFound)?;
    let version = RoomVersion::parse(&version)
        .ok_or_else(|| RoomError::Internal(format!("room {room_id} has unsupported version {version}")))?;
    Ok(RoomRow { room_id, version, is_local, current_state_group, max_depth })
}

pub fn room(conn: &mut DbConnection, room_id: &str) -> Result<Option<RoomRow>, RoomError> {
    let row: Option<(String, String, bool, Option<i64>, i64)> = rooms::table
        .filter(rooms::room_id.eq(room_id))
        .select((rooms::room_id, rooms::room_version, rooms::is_local, rooms::current_state_group, rooms::max_depth))
        .first(conn)
        .optional()?;
    row.map(|(room_id, version, is_local, current_state_group, max_depth)| {
        let version = RoomVersion::parse(&version)
            .ok_or_else(|| RoomError::Internal(format!("room {room_id} has unsupported version {version}")))?;
        Ok(RoomRow { room_id, version, is_local, current_state_group, max_depth })
    })
    .transpose()
}

pub fn insert_room(
    conn: &mut DbConnection,
    room_id: &str,
    version: RoomVersion,
    is_local: bool,
    now: i64,
) -> Result<(), RoomError> {
    diesel::insert_into(rooms::table)
        .values((
            rooms::room_id.eq(room_id),
            rooms::room_version.eq(version.as_str()),
            rooms::is_local.eq(is_local),
            rooms::created_ts.eq(now),
            rooms::max_depth.eq(0i64),
        ))
        .execute(conn)?;
    Ok(())
}

/// The current state event ID for one key.
pub fn current_state_id(
    conn: &mut DbConnection,
    room_id: &str,
    kind: &str,
    state_key: &str,
) -> Result<Option<String>, RoomError> {
    Ok(current_state::table
        .filter(current_state::room_id.eq(room_id))
        .filter(current_state::event_type.eq(kind))
        .filter(current_state::state_key.eq(state_key))
        .select(current_state::event_id)
        .first(conn)
        .optional()?)
}

pub fn current_state_map(conn: &mut DbConnection, room_id: &str) -> Result<StateMap, RoomError> {
    let rows: Vec<(String, String, String)> = current_state::table
        .filter(current_state::room_id.eq(room_id))
        .select((current_state::event_type, current_state::state_key, current_state::event_id))
        .load(conn)?;
    Ok(rows.into_iter().map(|(t, k, id)| ((t, k), id)).collect())
}

/// Builds, authorises and stores one of our own events at the end of the room.
pub fn append_local(
    conn: &mut DbConnection,
    key: &SigningKey,
    hooks: &AppendHooks,
    room: &RoomRow,
    mut draft: EventDraft,
) -> Result<Appended, RoomError> {
    let auth_types =
        pdus::auth_types(room.version, &draft.kind, &draft.sender, draft.state_key.as_deref(), &draft.content)
            .map_err(|e| RoomError::BadEvent(e.to_string()))?;
    let needed = current_state_for(conn, &room.room_id, &auth_types)?;
    draft.auth_events = needed.values().map(|id| EventId::parse(id).expect("stored IDs are valid")).collect();
    draft.auth_events.sort();
    let prev: Vec<String> = forward_extremities::table
        .filter(forward_extremities::room_id.eq(&room.room_id))
        .select(forward_extremities::event_id)
        .limit(MAX_PREV_EVENTS)
        .load(conn)?;
    draft.prev_events = prev.iter().map(|id| EventId::parse(id).expect("stored IDs are valid")).collect();
    draft.depth = room.max_depth + 1;
    let pdu =
        pdus::build(key, hooks.server_name(), room.version, draft).map_err(|e| RoomError::BadEvent(e.to_string()))?;
    authorise(conn, room, &pdu, &needed)?;
    store_event(conn, hooks, room, &pdu)
}

/// Authorises and stores an event another server sent (already signature-checked): its
/// `room_id` must be the room's, its auth events known, and it must pass the auth rules against
/// them and against the current state. `None` when we already have it.
pub fn append_remote(
    conn: &mut DbConnection,
    hooks: &AppendHooks,
    room: &RoomRow,
    pdu: &Pdu,
) -> Result<Option<Appended>, RoomError> {
    if pdu.room_id.as_str() != room.room_id {
        return Err(RoomError::BadEvent(format!("event is for {}, not {}", pdu.room_id, room.room_id)));
    }
    if event_by_id(conn, pdu.event_id.as_str())?.is_some() {
        return Ok(None);
    }
    let mut missing = Vec::new();
    for prev in &pdu.prev_events {
        match event_by_id(conn, prev.as_str())? {
            Some(known) if known.pdu.room_id == pdu.room_id => {}
            Some(_) => return Err(RoomError::BadEvent(format!("prev event {prev} is in another room"))),
            None => missing.push(prev.to_string()),
        }
    }
    if !missing.is_empty() {
        return Err(RoomError::MissingPrevEvents(missing));
    }
    let auth_types =
        pdus::auth_types(room.version, &pdu.event_type(), &pdu.sender, pdu.state_key.as_deref(), &pdu.content_value())
            .map_err(|e| RoomError::BadEvent(e.to_string()))?;
    let state = current_state_for(conn, &room.room_id, &auth_types)?;
    authorise(conn, room, pdu, &state)?;
    store_event(conn, hooks, room, pdu).map(Some)
}

/// The current state event IDs of the given keys, in one query.
fn current_state_for(
    conn: &mut DbConnection,
    room_id: &str,
    keys: &[(StateEventType, String)],
) -> Result<HashMap<(String, String), String>, RoomError> {
    let wanted: std::collections::HashSet<(String, String)> =
        keys.iter().map(|(t, k)| (t.to_string(), k.clone())).collect();
    let types: Vec<String> = wanted.iter().map(|(t, _)| t.clone()).collect();
    let rows: Vec<(String, String, String)> = current_state::table
        .filter(current_state::room_id.eq(room_id))
        .filter(current_state::event_type.eq_any(types))
        .select((current_state::event_type, current_state::state_key, current_state::event_id))
        .load(conn)?;
    Ok(rows
        .into_iter()
        .filter(|(t, k, _)| wanted.contains(&(t.clone(), k.clone())))
        .map(|(t, k, id)| ((t, k), id))
        .collect())
}

/// The auth rules, against the event's own auth events and the current state.
fn authorise(
    conn: &mut DbConnection,
    room: &RoomRow,
    pdu: &Pdu,
    state: &HashMap<(String, String), String>,
) -> Result<(), RoomError> {
    let mut ids: Vec<String> = pdu.auth_events.iter().map(|id| id.to_string()).chain(state.values().cloned()).collect();
    ids.sort();
    ids.dedup();
    let loaded: HashMap<String, Pdu> =
        events_by_ids(conn, &ids)?.into_iter().map(|e| (e.pdu.event_id.to_string(), e.pdu)).collect();
    let fetch_event = |id: &EventId| loaded.get(id.as_str()).cloned();
    let fetch_state = |kind: &StateEventType, state_key: &str| {
        state.get(&(kind.to_string(), state_key.to_owned())).and_then(|id| loaded.get(id)).cloned()
    };
    pdus::check_auth(room.version, pdu, fetch_event, fetch_state).map_err(|e| RoomError::Forbidden(e.to_string()))
}

/// Stores an authorised event: a new state group when it is a state event, the events row,
/// current state, forward extremities and the room's depth.
pub fn store_event(
    conn: &mut DbConnection,
    hooks: &AppendHooks,
    room: &RoomRow,
    pdu: &Pdu,
) -> Result<Appended, RoomError> {
    let before = room.current_state_group;
    let after = match (&pdu.state_key, before) {
        (Some(state_key), _) => {
            new_state_group(conn, &room.room_id, before, &pdu.event_type(), state_key, pdu.event_id.as_str())?
        }
        (None, Some(group)) => group,
        (None, None) => return Err(RoomError::BadEvent("the first event of a room must be its create event".into())),
    };
    let stream_pos = insert_event_row(conn, &room.room_id, pdu, before, after, false)?;
    if let Some(state_key) = &pdu.state_key {
        let row = (
            current_state::room_id.eq(room.room_id.clone()),
            current_state::event_type.eq(pdu.event_type()),
            current_state::state_key.eq(state_key.clone()),
            current_state::event_id.eq(pdu.event_id.to_string()),
        );
        on_backend!(&mut *conn, |c| diesel::insert_into(current_state::table)
            .values(row.clone())
            .on_conflict((current_state::room_id, current_state::event_type, current_state::state_key))
            .do_update()
            .set(row.3.clone())
            .execute(c))?;
    }
    let prevs: Vec<String> = pdu.prev_events.iter().map(|id| id.to_string()).collect();
    diesel::delete(
        forward_extremities::table
            .filter(forward_extremities::room_id.eq(&room.room_id))
            .filter(forward_extremities::event_id.eq_any(prevs)),
    )
    .execute(conn)?;
    diesel::insert_into(forward_extremities::table)
        .values((
            forward_extremities::room_id.eq(&room.room_id),
            forward_extremities::event_id.eq(pdu.event_id.as_str()),
        ))
        .execute(conn)?;
    diesel::update(rooms::table.filter(rooms::room_id.eq(&room.room_id)))
        .set((rooms::current_state_group.eq(after), rooms::max_depth.eq(room.max_depth.max(pdu.depth))))
        .execute(conn)?;
    // In the same transaction, the registered hooks: peeks end when the room stops being
    // peekable (RE-3, RE-4, CP-11) and a local user's peeks end when they join (CP-10).
    if pdu.is_state() {
        hooks.after_state_event(conn, pdu, stream_pos)?;
    }
    Ok(Appended { event_id: pdu.event_id.clone(), stream_pos })
}

/// A new group: one delta on top of `prev`, or a full snapshot every [`SNAPSHOT_EVERY`] steps.
fn new_state_group(
    conn: &mut DbConnection,
    room_id: &str,
    prev: Option<i64>,
    kind: &str,
    state_key: &str,
    event_id: &str,
) -> Result<i64, RoomError> {
    let prev_depth: Option<i32> = match prev {
        Some(group) => Some(state_groups::table.find(group).select(state_groups::delta_depth).first(conn)?),
        None => None,
    };
    let snapshot = prev_depth.is_some_and(|d| d + 1 >= SNAPSHOT_EVERY);
    let (prev_group, delta_depth) = match (prev, prev_depth) {
        (Some(group), Some(depth)) if !snapshot => (Some(group), depth + 1),
        _ => (None, 0),
    };
    let mut entries = if snapshot {
        state_map_at_group(conn, prev.expect("snapshot has a previous group"))?
    } else {
        StateMap::new()
    };
    entries.insert((kind.to_owned(), state_key.to_owned()), event_id.to_owned());
    insert_group(conn, room_id, prev_group, delta_depth, &entries)
}

/// Stores a state group: `entries` on top of `prev_group` (or, without one, the whole state).
fn insert_group(
    conn: &mut DbConnection,
    room_id: &str,
    prev_group: Option<i64>,
    delta_depth: i32,
    entries: &StateMap,
) -> Result<i64, RoomError> {
    let id: i64 = diesel::insert_into(state_groups::table)
        .values((
            state_groups::room_id.eq(room_id),
            state_groups::prev_group.eq(prev_group),
            state_groups::delta_depth.eq(delta_depth),
        ))
        .returning(state_groups::id)
        .get_result(conn)?;
    let rows: Vec<_> = entries
        .iter()
        .map(|((t, k), e)| {
            (
                state_group_entries::group_id.eq(id),
                state_group_entries::event_type.eq(t.clone()),
                state_group_entries::state_key.eq(k.clone()),
                state_group_entries::event_id.eq(e.clone()),
            )
        })
        .collect();
    // A snapshot holds the whole state: one multi-row insert per chunk, not one per entry.
    for chunk in rows.chunks(500) {
        on_backend!(&mut *conn, |c| diesel::insert_into(state_group_entries::table).values(chunk).execute(c))?;
    }
    Ok(id)
}

#[derive(QueryableByName)]
struct GroupEntry {
    #[diesel(sql_type = Text)]
    event_type: String,
    #[diesel(sql_type = Text)]
    state_key: String,
    #[diesel(sql_type = Text)]
    event_id: String,
    #[diesel(sql_type = BigInt)]
    level: i64,
}

/// The full state of a group: one recursive query over the delta chain; nearer deltas win.
pub fn state_map_at_group(conn: &mut DbConnection, group: i64) -> Result<StateMap, RoomError> {
    // `group` is an i64 from our own tables, so formatting it into the SQL is safe; it avoids the
    // backends' different bind placeholder syntax.
    let query = format!(
        "WITH RECURSIVE chain(id, prev, level) AS ( \
             SELECT id, prev_group, CAST(0 AS BIGINT) FROM state_groups WHERE id = {group} \
             UNION ALL \
             SELECT g.id, g.prev_group, c.level + 1 FROM state_groups g JOIN chain c ON g.id = c.prev \
         ) \
         SELECT e.event_type, e.state_key, e.event_id, c.level AS level \
         FROM chain c JOIN state_group_entries e ON e.group_id = c.id"
    );
    let rows: Vec<GroupEntry> = diesel::sql_query(query).load(conn)?;
    let mut best: BTreeMap<(String, String), (i64, String)> = BTreeMap::new();
    for row in rows {
        let key = (row.event_type, row.state_key);
        match best.get(&key) {
            Some((level, _)) if *level <= row.level => {}
            _ => {
                best.insert(key, (row.level, row.event_id));
            }
        }
    }
    Ok(best.into_iter().map(|(k, (_, id))| (k, id)).collect())
}

type EventRow = (i64, String, Option<i64>, i64, String, String);
type EventColumns = (
    events::stream_pos,
    events::json,
    events::state_group_before,
    events::state_group,
    events::room_id,
    events::event_id,
);
const EVENT_COLUMNS: EventColumns = (
    events::stream_pos,
    events::json,
    events::state_group_before,
    events::state_group,
    events::room_id,
    events::event_id,
);

fn to_stored(conn_version: RoomVersion, row: EventRow) -> Result<StoredEvent, RoomError> {
    let (stream_pos, json, state_group_before, state_group, _, event_id) = row;
    let json: ruma::CanonicalJsonObject =
        serde_json::from_str(&json).map_err(|e| RoomError::Internal(format!("stored event JSON: {e}")))?;
    let pdu = Pdu::from_stored(&event_id, json, conn_version)
        .map_err(|e| RoomError::Internal(format!("stored event: {e}")))?;
    Ok(StoredEvent { stream_pos, pdu, state_group_before, state_group })
}

fn version_of(conn: &mut DbConnection, room_id: &str) -> Result<RoomVersion, RoomError> {
    room(conn, room_id)?.map(|r| r.version).ok_or(RoomError::NotFound)
}

pub fn event_by_id(conn: &mut DbConnection, event_id: &str) -> Result<Option<StoredEvent>, RoomError> {
    let row: Option<(EventRow, String)> = events::table
        .inner_join(rooms::table)
        .filter(events::event_id.eq(event_id))
        .select((EVENT_COLUMNS, rooms::room_version))
        .first(conn)
        .optional()?;
    row.map(|(row, version)| to_stored(parse_version(&version)?, row)).transpose()
}

fn parse_version(version: &str) -> Result<RoomVersion, RoomError> {
    RoomVersion::parse(version).ok_or_else(|| RoomError::Internal(format!("unsupported stored room version {version}")))
}

/// Events of a room by stream position: after `from` going forwards, or before it going back.
pub fn events_in_range(
    conn: &mut DbConnection,
    room_id: &str,
    from: i64,
    forwards: bool,
    limit: i64,
) -> Result<Vec<StoredEvent>, RoomError> {
    let version = version_of(conn, room_id)?;
    let select = EVENT_COLUMNS;
    let base = events::table.filter(events::room_id.eq(room_id)).filter(events::outlier.eq(false));
    let rows: Vec<EventRow> = if forwards {
        base.filter(events::stream_pos.gt(from))
            .order(events::stream_pos.asc())
            .limit(limit)
            .select(select)
            .load(conn)?
    } else {
        base.filter(events::stream_pos.lt(from))
            .order(events::stream_pos.desc())
            .limit(limit)
            .select(select)
            .load(conn)?
    };
    rows.into_iter().map(|row| to_stored(version, row)).collect()
}

/// The newest stream position of the room (0 when empty).
pub fn latest_stream_pos(conn: &mut DbConnection, room_id: &str) -> Result<i64, RoomError> {
    let pos: Option<i64> =
        events::table.filter(events::room_id.eq(room_id)).select(diesel::dsl::max(events::stream_pos)).first(conn)?;
    Ok(pos.unwrap_or(0))
}

/// Loads several events by ID; unknown IDs are skipped.
pub fn events_by_ids(conn: &mut DbConnection, ids: &[String]) -> Result<Vec<StoredEvent>, RoomError> {
    // Events first, then each distinct room's version: a join here makes PostgreSQL plan
    // worse for long ID lists.
    let mut out = Vec::with_capacity(ids.len());
    let mut versions: HashMap<String, RoomVersion> = HashMap::new();
    for chunk in ids.chunks(500) {
        let rows: Vec<EventRow> =
            events::table.filter(events::event_id.eq_any(chunk)).select(EVENT_COLUMNS).load(conn)?;
        for row in rows {
            let version = match versions.get(&row.4) {
                Some(version) => *version,
                None => {
                    let version = room(conn, &row.4)?.ok_or(RoomError::NotFound)?.version;
                    versions.insert(row.4.clone(), version);
                    version
                }
            };
            out.push(to_stored(version, row)?);
        }
    }
    Ok(out)
}

/// The full auth chain of `ids`: their auth events, recursively, sorted by depth.
pub fn auth_chain(conn: &mut DbConnection, ids: &[String]) -> Result<Vec<Pdu>, RoomError> {
    let mut seen: BTreeMap<String, Pdu> = BTreeMap::new();
    let mut frontier: Vec<String> = Vec::new();
    for stored in events_by_ids(conn, ids)? {
        frontier.extend(stored.pdu.auth_events.iter().map(|id| id.to_string()));
    }
    while !frontier.is_empty() {
        frontier.retain(|id| !seen.contains_key(id));
        frontier.sort();
        frontier.dedup();
        if frontier.is_empty() {
            break;
        }
        let batch = std::mem::take(&mut frontier);
        for stored in events_by_ids(conn, &batch)? {
            frontier.extend(stored.pdu.auth_events.iter().map(|id| id.to_string()));
            seen.insert(stored.pdu.event_id.to_string(), stored.pdu);
        }
    }
    let mut chain: Vec<Pdu> = seen.into_values().collect();
    chain.sort_by_key(|p| p.depth);
    Ok(chain)
}

/// The event a client transaction created, if it ran before.
pub fn client_txn(
    conn: &mut DbConnection,
    user_id: &str,
    device_id: &str,
    txn_id: &str,
) -> Result<Option<Appended>, RoomError> {
    let event_id: Option<String> = client_txns::table
        .filter(client_txns::user_id.eq(user_id))
        .filter(client_txns::device_id.eq(device_id))
        .filter(client_txns::txn_id.eq(txn_id))
        .select(client_txns::event_id)
        .first(conn)
        .optional()?;
    let Some(event_id) = event_id else {
        return Ok(None);
    };
    let stream_pos: i64 =
        events::table.filter(events::event_id.eq(&event_id)).select(events::stream_pos).first(conn)?;
    let event_id = EventId::parse(event_id).map_err(|e| RoomError::Internal(e.to_string()))?;
    Ok(Some(Appended { event_id, stream_pos }))
}

pub fn record_client_txn(
    conn: &mut DbConnection,
    user_id: &str,
    device_id: &str,
    txn_id: &str,
    event_id: &str,
) -> Result<(), RoomError> {
    diesel::insert_into(client_txns::table)
        .values((
            client_txns::user_id.eq(user_id),
            client_txns::device_id.eq(device_id),
            client_txns::txn_id.eq(txn_id),
            client_txns::event_id.eq(event_id),
        ))
        .execute(conn)?;
    Ok(())
}

/// A remote room's starting point, from a validated peek answer (OP-4).
pub struct Snapshot<'a> {
    pub state: &'a StateMap,
    /// Every event of the state and the auth chain, stored as outliers (outside the timeline).
    pub outliers: &'a [Pdu],
    /// The event the state is at: it becomes the room's only forward extremity.
    pub latest: &'a Pdu,
    /// Recent events before `latest` (a target's `messages`, OP-4.6), oldest first: stored in
    /// the timeline, before `latest`, so that a device's first sync shows them.
    pub timeline: &'a [Pdu],
}

/// Stores a snapshot for a room of another server, creating the room row when it is new:
/// one full state group, outliers for the state and auth chain, the recent history and `latest`
/// in the timeline, and current state and forward extremities reset to the snapshot. Returns
/// the stream position
/// of `latest` (already stored events keep theirs).
pub fn store_snapshot(
    conn: &mut DbConnection,
    room_id: &str,
    version: RoomVersion,
    now: i64,
    snapshot: Snapshot<'_>,
) -> Result<i64, RoomError> {
    if room(conn, room_id)?.is_none() {
        insert_room(conn, room_id, version, false, now)?;
    }
    let row = lock_for_append(conn, room_id)?;
    if row.is_local {
        return Err(RoomError::Forbidden("this server hosts the room; it is not peeked".into()));
    }
    let group = insert_group(conn, room_id, None, 0, snapshot.state)?;
    let mut max_depth = row.max_depth.max(snapshot.latest.depth);
    // The recent history first, so that its stream positions come before `latest`'s. Their
    // state is approximated by the snapshot's (the answer carries no other).
    for pdu in snapshot.timeline.iter().filter(|p| p.event_id != snapshot.latest.event_id) {
        max_depth = max_depth.max(pdu.depth);
        if event_by_id(conn, pdu.event_id.as_str())?.is_none() {
            insert_event_row(conn, room_id, pdu, Some(group), group, false)?;
        }
    }
    for pdu in snapshot.outliers.iter().filter(|p| p.event_id != snapshot.latest.event_id) {
        max_depth = max_depth.max(pdu.depth);
        if event_by_id(conn, pdu.event_id.as_str())?.is_none() {
            insert_event_row(conn, room_id, pdu, None, group, true)?;
        }
    }
    let latest_pos = match event_by_id(conn, snapshot.latest.event_id.as_str())? {
        Some(stored) => stored.stream_pos,
        None => insert_event_row(conn, room_id, snapshot.latest, Some(group), group, false)?,
    };
    diesel::delete(current_state::table.filter(current_state::room_id.eq(room_id))).execute(conn)?;
    let rows: Vec<_> = snapshot
        .state
        .iter()
        .map(|((t, k), id)| {
            (
                current_state::room_id.eq(room_id.to_owned()),
                current_state::event_type.eq(t.clone()),
                current_state::state_key.eq(k.clone()),
                current_state::event_id.eq(id.clone()),
            )
        })
        .collect();
    for chunk in rows.chunks(500) {
        on_backend!(&mut *conn, |c| diesel::insert_into(current_state::table).values(chunk).execute(c))?;
    }
    diesel::delete(forward_extremities::table.filter(forward_extremities::room_id.eq(room_id))).execute(conn)?;
    diesel::insert_into(forward_extremities::table)
        .values((
            forward_extremities::room_id.eq(room_id),
            forward_extremities::event_id.eq(snapshot.latest.event_id.as_str()),
        ))
        .execute(conn)?;
    diesel::update(rooms::table.filter(rooms::room_id.eq(room_id)))
        .set((rooms::current_state_group.eq(group), rooms::max_depth.eq(max_depth)))
        .execute(conn)?;
    Ok(latest_pos)
}

fn insert_event_row(
    conn: &mut DbConnection,
    room_id: &str,
    pdu: &Pdu,
    before: Option<i64>,
    group: i64,
    outlier: bool,
) -> Result<i64, RoomError> {
    let json = serde_json::to_string(&pdu.json).expect("canonical JSON serialises");
    Ok(diesel::insert_into(events::table)
        .values((
            events::event_id.eq(pdu.event_id.as_str()),
            events::room_id.eq(room_id),
            events::event_type.eq(pdu.event_type()),
            events::state_key.eq(pdu.state_key.clone()),
            events::sender.eq(pdu.sender.as_str()),
            events::depth.eq(pdu.depth),
            events::origin_server_ts.eq(i64::from(pdu.origin_server_ts.0)),
            events::json.eq(json),
            events::state_group_before.eq(before),
            events::state_group.eq(group),
            events::outlier.eq(outlier),
        ))
        .returning(events::stream_pos)
        .get_result(conn)?)
}

/// The newest stream position of all rooms (0 when there is no event yet): the one query for
/// it, used by the sender, eviction and `/sync` alike.
pub fn stream_head(conn: &mut DbConnection) -> Result<i64, diesel::result::Error> {
    let pos: Option<i64> = events::table.select(diesel::dsl::max(events::stream_pos)).first(conn)?;
    Ok(pos.unwrap_or(0))
}

/// [`stream_head`] with the room error type.
pub fn max_stream_pos(conn: &mut DbConnection) -> Result<i64, RoomError> {
    Ok(stream_head(conn)?)
}

/// The room's forward extremities.
pub fn forward_extremities(conn: &mut DbConnection, room_id: &str) -> Result<Vec<String>, RoomError> {
    Ok(forward_extremities::table
        .filter(forward_extremities::room_id.eq(room_id))
        .select(forward_extremities::event_id)
        .load(conn)?)
}

/// Deletes everything stored about a room of another server (its events, state and
/// extremities): what a peek left behind once nobody peeks the room. Our own rooms are never
/// purged. Returns whether the room was there.
pub fn purge_remote_room(conn: &mut DbConnection, room_id: &str) -> Result<bool, RoomError> {
    match room(conn, room_id)? {
        Some(row) if !row.is_local => {}
        _ => return Ok(false),
    }
    let groups = state_groups::table.filter(state_groups::room_id.eq(room_id)).select(state_groups::id);
    diesel::delete(state_group_entries::table.filter(state_group_entries::group_id.eq_any(groups))).execute(conn)?;
    diesel::delete(state_groups::table.filter(state_groups::room_id.eq(room_id))).execute(conn)?;
    diesel::delete(events::table.filter(events::room_id.eq(room_id))).execute(conn)?;
    diesel::delete(current_state::table.filter(current_state::room_id.eq(room_id))).execute(conn)?;
    diesel::delete(forward_extremities::table.filter(forward_extremities::room_id.eq(room_id))).execute(conn)?;
    diesel::delete(rooms::table.filter(rooms::room_id.eq(room_id))).execute(conn)?;
    Ok(true)
}
