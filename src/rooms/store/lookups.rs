//! Reading events and rooms: by ID, by stream position, auth chains, forward extremities and
//! the stream head.

use super::*;

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

pub(super) type EventRow = (i64, String, Option<i64>, i64, String, String);
pub(super) type EventColumns = (
    events::stream_pos,
    events::json,
    events::state_group_before,
    events::state_group,
    events::room_id,
    events::event_id,
);
pub(super) const EVENT_COLUMNS: EventColumns = (
    events::stream_pos,
    events::json,
    events::state_group_before,
    events::state_group,
    events::room_id,
    events::event_id,
);

pub(super) fn to_stored(conn_version: RoomVersion, row: EventRow) -> Result<StoredEvent, RoomError> {
    let (stream_pos, json, state_group_before, state_group, _, event_id) = row;
    let json: ruma::CanonicalJsonObject =
        serde_json::from_str(&json).map_err(|e| RoomError::Internal(format!("stored event JSON: {e}")))?;
    let pdu = Pdu::from_stored(&event_id, json, conn_version)
        .map_err(|e| RoomError::Internal(format!("stored event: {e}")))?;
    Ok(StoredEvent { stream_pos, pdu, state_group_before, state_group })
}

pub(super) fn version_of(conn: &mut DbConnection, room_id: &str) -> Result<RoomVersion, RoomError> {
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

pub(super) fn parse_version(version: &str) -> Result<RoomVersion, RoomError> {
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
    // Soft-failed events (JN-8, `rejected`) are kept but never served.
    let base = events::table
        .filter(events::room_id.eq(room_id))
        .filter(events::outlier.eq(false))
        .filter(events::rejected.eq(false));
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
    events_by_ids_knowing(conn, ids, HashMap::new())
}

/// [`events_by_ids`] of events expected in `room`, whose version the caller holds: the append
/// path loads a new event's auth events this way, without a lookup of the room's version.
pub(super) fn events_by_ids_in(
    conn: &mut DbConnection,
    ids: &[String],
    room: &RoomRow,
) -> Result<Vec<StoredEvent>, RoomError> {
    events_by_ids_knowing(conn, ids, HashMap::from([(room.room_id.clone(), room.version)]))
}

fn events_by_ids_knowing(
    conn: &mut DbConnection,
    ids: &[String],
    mut versions: HashMap<String, RoomVersion>,
) -> Result<Vec<StoredEvent>, RoomError> {
    // Events first, then each distinct room's version: a join here makes PostgreSQL plan
    // worse for long ID lists.
    let mut out = Vec::with_capacity(ids.len());
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

/// The memberships of `server`'s users among member state entries `(user ID, event ID)`.
pub fn memberships_of_server(
    conn: &mut DbConnection,
    members: impl IntoIterator<Item = (String, String)>,
    server: &str,
) -> Result<Vec<String>, RoomError> {
    let suffix = format!(":{server}");
    let ids: Vec<String> = members.into_iter().filter(|(user, _)| user.ends_with(&suffix)).map(|(_, id)| id).collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(events_by_ids(conn, &ids)?
        .iter()
        .filter_map(|e| e.pdu.content_value()["membership"].as_str().map(str::to_owned))
        .collect())
}

/// Does `server` have a user whose current membership in the room is `join`?
pub fn has_joined_member_of(conn: &mut DbConnection, room_id: &str, server: &str) -> Result<bool, RoomError> {
    // `LIKE` narrows the rows; `memberships_of_server` tests the exact suffix (`_` is a LIKE
    // wildcard).
    let members: Vec<(String, String)> = current_state::table
        .filter(current_state::room_id.eq(room_id))
        .filter(current_state::event_type.eq("m.room.member"))
        .filter(current_state::state_key.like(format!("%:{server}")))
        .select((current_state::state_key, current_state::event_id))
        .load(conn)?;
    Ok(memberships_of_server(conn, members, server)?.iter().any(|m| m == "join"))
}

/// The servers with a joined member in the room's current state.
pub fn joined_servers_now(
    conn: &mut DbConnection,
    room_id: &str,
) -> Result<std::collections::BTreeSet<String>, RoomError> {
    let members: Vec<String> = current_state_map(conn, room_id)?
        .into_iter()
        .filter(|((kind, _), _)| kind == "m.room.member")
        .map(|(_, id)| id)
        .collect();
    Ok(events_by_ids(conn, &members)?
        .iter()
        .filter(|e| e.pdu.content_value()["membership"] == "join")
        .filter_map(|e| e.pdu.state_key.as_deref().and_then(|k| k.split_once(':')).map(|(_, s)| s.to_owned()))
        .collect())
}
