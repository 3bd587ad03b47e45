//! The single append path (local and remote events), room creation rows, client transaction
//! IDs, and storing a peek answer as a room's starting point.

use super::*;

/// Takes the append lock. On PostgreSQL a transaction-scoped advisory lock makes appends (and
/// so stream positions) commit in order; on SQLite the first write makes the transaction hold
/// the database's write lock. Then the room row is locked by a no-op update.
pub fn lock_for_append(conn: &mut DbConnection, room_id: &str) -> Result<RoomRow, RoomError> {
    take_append_lock(conn)?;
    lock_room_row(conn, room_id)
}

/// The append lock alone (PostgreSQL); held until the transaction ends.
pub fn take_append_lock(conn: &mut DbConnection) -> Result<(), RoomError> {
    if matches!(conn, DbConnection::Postgresql(_)) {
        diesel::sql_query(append_lock_statement()).execute(conn)?;
    }
    Ok(())
}

/// The statement that takes the append lock on PostgreSQL, for a transaction that opens with it
/// (see `db::write_transaction_opening_with`).
pub fn append_lock_statement() -> String {
    format!("SELECT pg_advisory_xact_lock({APPEND_LOCK_KEY})")
}

/// The room row, locked by a no-op update until the transaction ends.
pub fn lock_room_row(conn: &mut DbConnection, room_id: &str) -> Result<RoomRow, RoomError> {
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

/// Builds, authorises and stores one of our own events at the end of the room.
pub fn append_local(
    conn: &mut DbConnection,
    key: &SigningKey,
    hooks: &AppendHooks,
    room: &RoomRow,
    draft: EventDraft,
) -> Result<Appended, RoomError> {
    append_local_at(conn, key, hooks, RoomEnd::of(room.clone()), draft, None).map(|(appended, _)| appended)
}

/// What one append in a transaction of several leaves known about the room's end, so that the
/// next append to the same room in that transaction reads none of it again. Kept only after an
/// event that changes no state and rewrites no other event (neither a state event nor a
/// redaction): the room's state, so its auth state and those events, are then as before.
pub struct RoomEnd {
    pub row: RoomRow,
    /// The room's forward extremities, when the last append replaced all of them.
    extremities: Option<Vec<String>>,
    /// The auth state the last event was checked against.
    auth: Option<AuthState>,
}

impl RoomEnd {
    /// Only the locked room row is known.
    pub fn of(row: RoomRow) -> RoomEnd {
        RoomEnd { row, extremities: None, auth: None }
    }
}

/// The current-state entries an event's auth rules read (`needed`, keyed by the auth types it
/// was read for; `state` adds the create event) and those events, parsed.
struct AuthState {
    types: Vec<(StateEventType, String)>,
    needed: HashMap<(String, String), String>,
    state: HashMap<(String, String), String>,
    loaded: HashMap<String, Pdu>,
}

/// [`append_local`] for a transaction that appends several events: starts from what the
/// previous append to this room left known, and returns what this one leaves (see [`RoomEnd`]).
/// Records the client transaction that sent it, if any.
pub fn append_local_at(
    conn: &mut DbConnection,
    key: &SigningKey,
    hooks: &AppendHooks,
    end: RoomEnd,
    draft: EventDraft,
    txn: Option<&ClientTxn<'_>>,
) -> Result<(Appended, Option<RoomEnd>), RoomError> {
    let (pdu, used) = prepare_at(conn, key, hooks.server_name(), end, draft)?;
    let appended = store_event_sent(conn, hooks, &used.row, &pdu, txn)?;
    let unchanged_state = pdu.state_key.is_none() && pdu.kind != TimelineEventType::RoomRedaction;
    let after = unchanged_state.then(|| {
        let prev = used.extremities.expect("prepare_at returns the prev events it used");
        RoomEnd {
            row: RoomRow { max_depth: used.row.max_depth.max(pdu.depth), ..used.row },
            // All the extremities were its prev events, so the event alone replaced them.
            extremities: (prev.len() < MAX_PREV_EVENTS as usize).then(|| vec![pdu.event_id.to_string()]),
            auth: used.auth,
        }
    });
    Ok((appended, after))
}

/// Fills in an event for the end of the room (auth events from the current state, the forward
/// extremities as prev events, the next depth), signs it with our key and checks the auth rules
/// against the current state. Nothing is stored: [`append_local`] stores it, a `make_join`
/// template is made from it.
pub fn prepare_at_end(
    conn: &mut DbConnection,
    key: &SigningKey,
    server_name: &str,
    room: &RoomRow,
    draft: EventDraft,
) -> Result<Pdu, RoomError> {
    prepare_at(conn, key, server_name, RoomEnd::of(room.clone()), draft).map(|(pdu, _)| pdu)
}

/// [`prepare_at_end`], reading only what `end` does not know; also returns what it used: the
/// room row, the prev events and the auth state (taken over from `end`, not copied).
fn prepare_at(
    conn: &mut DbConnection,
    key: &SigningKey,
    server_name: &str,
    end: RoomEnd,
    mut draft: EventDraft,
) -> Result<(Pdu, RoomEnd), RoomError> {
    let RoomEnd { row, extremities, auth: known_auth } = end;
    let room = &row;
    let types = pdus::auth_types(room.version, &draft.kind, &draft.sender, draft.state_key.as_deref(), &draft.content)
        .map_err(|e| RoomError::BadEvent(e.to_string()))?;
    let auth = match known_auth {
        Some(known) if known.types == types => known,
        _ => {
            let needed = current_state_for(conn, &room.room_id, &types)?;
            let auth_events: Vec<String> = needed.values().cloned().collect();
            let (state, loaded) = load_for_auth(conn, room, &auth_events, &needed)?;
            AuthState { types, needed, state, loaded }
        }
    };
    draft.auth_events = auth.needed.values().map(|id| EventId::parse(id).expect("stored IDs are valid")).collect();
    draft.auth_events.sort();
    let prev: Vec<String> = match extremities {
        Some(known) => known,
        None => forward_extremities::table
            .filter(forward_extremities::room_id.eq(&room.room_id))
            .select(forward_extremities::event_id)
            .limit(MAX_PREV_EVENTS)
            .load(conn)?,
    };
    draft.prev_events = prev.iter().map(|id| EventId::parse(id).expect("stored IDs are valid")).collect();
    draft.depth = room.max_depth + 1;
    let pdu = pdus::build(key, server_name, room.version, draft).map_err(|e| RoomError::BadEvent(e.to_string()))?;
    check_loaded(room, &pdu, &auth.state, &auth.loaded)?;
    Ok((pdu, RoomEnd { row, extremities: Some(prev), auth: Some(auth) }))
}

/// Authorises against the current state and stores an event of ours built beforehand (a v12
/// create event, whose ID names the room; an invite its invitee's server signed too).
pub fn append_prepared(
    conn: &mut DbConnection,
    hooks: &AppendHooks,
    room: &RoomRow,
    pdu: &Pdu,
) -> Result<Appended, RoomError> {
    let auth_types =
        pdus::auth_types(room.version, &pdu.event_type(), &pdu.sender, pdu.state_key.as_deref(), &pdu.content_value())
            .map_err(|e| RoomError::BadEvent(e.to_string()))?;
    let state = current_state_for(conn, &room.room_id, &auth_types)?;
    authorise(conn, room, pdu, &state)?;
    store_event(conn, hooks, room, pdu)
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
    // JN-8: an event that does not follow the current state is checked against the state
    // before it (rejected when refused), then against the current state (soft-failed).
    if let Some(before) = super::resolve::fork_state_before(conn, room, pdu)? {
        authorise(conn, room, pdu, &super::resolve::needed_from(&before, &auth_types))?;
        let soft_failed = authorise(conn, room, pdu, &state).is_err();
        return super::resolve::store_forked(conn, hooks, room, pdu, &before, soft_failed).map(Some);
    }
    authorise(conn, room, pdu, &state)?;
    store_event(conn, hooks, room, pdu).map(Some)
}

/// The current state event IDs of the given keys, in one query.
pub(super) fn current_state_for(
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
pub(super) fn authorise(
    conn: &mut DbConnection,
    room: &RoomRow,
    pdu: &Pdu,
    state: &HashMap<(String, String), String>,
) -> Result<(), RoomError> {
    let auth_events: Vec<String> = pdu.auth_events.iter().map(|id| id.to_string()).collect();
    let (state, loaded) = load_for_auth(conn, room, &auth_events, state)?;
    check_loaded(room, pdu, &state, &loaded)
}

/// What the auth rules read: `state` with the create event added (the rules always read it
/// from the state, also in v12 where it is in no event's auth events), and the events of both
/// it and `auth_events`, parsed.
#[allow(clippy::type_complexity)]
fn load_for_auth(
    conn: &mut DbConnection,
    room: &RoomRow,
    auth_events: &[String],
    state: &HashMap<(String, String), String>,
) -> Result<(HashMap<(String, String), String>, HashMap<String, Pdu>), RoomError> {
    let mut state = state.clone();
    if let std::collections::hash_map::Entry::Vacant(slot) = state.entry(("m.room.create".to_owned(), String::new())) {
        if let Some(id) = current_state_id(conn, &room.room_id, "m.room.create", "")? {
            slot.insert(id);
        }
    }
    let mut ids: Vec<String> = auth_events.iter().cloned().chain(state.values().cloned()).collect();
    ids.sort();
    ids.dedup();
    let loaded = events_by_ids_in(conn, &ids, room)?.into_iter().map(|e| (e.pdu.event_id.to_string(), e.pdu)).collect();
    Ok((state, loaded))
}

/// The auth rules over events already loaded by [`load_for_auth`].
fn check_loaded(
    room: &RoomRow,
    pdu: &Pdu,
    state: &HashMap<(String, String), String>,
    loaded: &HashMap<String, Pdu>,
) -> Result<(), RoomError> {
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
    store_event_sent(conn, hooks, room, pdu, None)
}

/// [`store_event`], recording the client transaction that sent the event with it.
fn store_event_sent(
    conn: &mut DbConnection,
    hooks: &AppendHooks,
    room: &RoomRow,
    pdu: &Pdu,
    txn: Option<&ClientTxn<'_>>,
) -> Result<Appended, RoomError> {
    let before = room.current_state_group;
    let after = match (&pdu.state_key, before) {
        (Some(state_key), _) => {
            new_state_group(conn, &room.room_id, before, &pdu.event_type(), state_key, pdu.event_id.as_str())?
        }
        (None, Some(group)) => group,
        (None, None) => return Err(RoomError::BadEvent("the first event of a room must be its create event".into())),
    };
    let stream_pos = super::at_end::insert_at_end(conn, room, pdu, (before, after), txn)?;
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
    // H19: a redaction rewrites the event it names, and an event arriving after its redaction
    // is rewritten at once, in the same transaction.
    super::redactions::after_store(conn, room, pdu, hooks.server_name())?;
    // In the same transaction, the registered hooks: peeks end when the room stops being
    // peekable (RE-3, RE-4, CP-11) and a local user's peeks end when they join (CP-10).
    if pdu.is_state() {
        hooks.after_state_event(conn, pdu, stream_pos)?;
    }
    Ok(Appended { event_id: pdu.event_id.clone(), stream_pos })
}

/// The event replaces its prev events among the room's forward extremities.
pub(super) fn replace_prev_extremities(conn: &mut DbConnection, room_id: &str, pdu: &Pdu) -> Result<(), RoomError> {
    let prevs: Vec<String> = pdu.prev_events.iter().map(|id| id.to_string()).collect();
    diesel::delete(
        forward_extremities::table
            .filter(forward_extremities::room_id.eq(room_id))
            .filter(forward_extremities::event_id.eq_any(prevs)),
    )
    .execute(conn)?;
    diesel::insert_into(forward_extremities::table)
        .values((forward_extremities::room_id.eq(room_id), forward_extremities::event_id.eq(pdu.event_id.as_str())))
        .execute(conn)?;
    Ok(())
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
    super::resolve::reset_current_state(conn, room_id, snapshot.state)?;
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

pub(super) fn insert_event_row(
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

/// An invite to a room of another server that we are not in (JN-5): stored as an outlier of
/// that room (a room row without state is made for it) so that it has a stream position for
/// `/sync`, under the append lock like any event. An invite stored before keeps its position.
pub fn store_invite_outlier(
    conn: &mut DbConnection,
    room_id: &str,
    version: RoomVersion,
    now: i64,
    pdu: &Pdu,
) -> Result<i64, RoomError> {
    if room(conn, room_id)?.is_none() {
        insert_room(conn, room_id, version, false, now)?;
    }
    lock_for_append(conn, room_id)?;
    if let Some(stored) = event_by_id(conn, pdu.event_id.as_str())? {
        return Ok(stored.stream_pos);
    }
    let group = insert_group(conn, room_id, None, 0, &StateMap::new())?;
    insert_event_row(conn, room_id, pdu, None, group, true)
}

/// Deletes everything stored about a room of another server (its events, state and
/// extremities): what a peek left behind once nobody peeks the room. Our own rooms, and rooms
/// one of our users has joined, are never purged. Returns whether the room was purged.
pub fn purge_remote_room(conn: &mut DbConnection, our_server: &str, room_id: &str) -> Result<bool, RoomError> {
    match room(conn, room_id)? {
        Some(row) if !row.is_local => {}
        _ => return Ok(false),
    }
    // A room one of our users has joined is theirs to read, peeked or not (JN-6).
    if has_joined_member_of(conn, room_id, our_server)? {
        return Ok(false);
    }
    let groups = state_groups::table.filter(state_groups::room_id.eq(room_id)).select(state_groups::id);
    diesel::delete(state_group_entries::table.filter(state_group_entries::group_id.eq_any(groups))).execute(conn)?;
    diesel::delete(state_groups::table.filter(state_groups::room_id.eq(room_id))).execute(conn)?;
    diesel::delete(events::table.filter(events::room_id.eq(room_id))).execute(conn)?;
    super::redactions::forget_room(conn, room_id)?;
    diesel::delete(current_state::table.filter(current_state::room_id.eq(room_id))).execute(conn)?;
    diesel::delete(forward_extremities::table.filter(forward_extremities::room_id.eq(room_id))).execute(conn)?;
    diesel::delete(rooms::table.filter(rooms::room_id.eq(room_id))).execute(conn)?;
    Ok(true)
}
