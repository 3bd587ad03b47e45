//! JN-8: events from several servers. A remote event whose `prev_events` do not lead to the
//! room's current state (a fork: its server had not seen our latest events, or sent at the same
//! time as another) is checked against the state before it, the state at its prev events,
//! resolved by ruma's state resolution (v2; v2.1 from room version 12) when they differ, and
//! then against the current state. Failing the first rejects it. Failing only the second
//! soft-fails it: it is stored (with `rejected` set, so it is never served to clients or sent
//! on) and changes neither the forward extremities nor the current state. Otherwise it is
//! stored with the state before it, becomes a forward extremity, and a state event makes the
//! current state the resolution of the current state and the state after it.

use std::collections::HashSet;

use ruma::state_res::utils::event_id_set::EventIdSet;
use ruma::OwnedEventId;

use super::*;

/// The state before a remote event, when it differs from the room's current state; `None` when
/// the event follows the current state (the usual case, handled by the plain append path).
pub(super) fn fork_state_before(
    conn: &mut DbConnection,
    room: &RoomRow,
    pdu: &Pdu,
) -> Result<Option<StateMap>, RoomError> {
    let mut groups = Vec::new();
    for prev in &pdu.prev_events {
        let stored =
            event_by_id(conn, prev.as_str())?.ok_or_else(|| RoomError::MissingPrevEvents(vec![prev.to_string()]))?;
        groups.push(stored.state_group);
    }
    groups.sort_unstable();
    groups.dedup();
    if groups.len() == 1 && Some(groups[0]) == room.current_state_group {
        return Ok(None);
    }
    let maps: Vec<StateMap> = groups.iter().map(|group| state_map_at_group(conn, *group)).collect::<Result<_, _>>()?;
    let before = match maps.len() {
        1 => maps.into_iter().next().expect("one map"),
        _ => resolve_states(conn, room, &maps)?,
    };
    let current = current_state_map(conn, &room.room_id)?;
    Ok((before != current).then_some(before))
}

/// The entries of `state` the auth rules need for an event with these auth types.
pub(super) fn needed_from(
    state: &StateMap,
    auth_types: &[(StateEventType, String)],
) -> HashMap<(String, String), String> {
    auth_types
        .iter()
        .filter_map(|(kind, key)| {
            let key = (kind.to_string(), key.clone());
            state.get(&key).map(|id| (key, id.clone()))
        })
        .collect()
}

/// Stores a forked remote event that passed the auth rules against the state before it (see
/// the module comment); `soft_failed` when it failed them against the current state.
pub(super) fn store_forked(
    conn: &mut DbConnection,
    hooks: &AppendHooks,
    room: &RoomRow,
    pdu: &Pdu,
    before: &StateMap,
    soft_failed: bool,
) -> Result<Appended, RoomError> {
    let group_before = insert_group(conn, &room.room_id, None, 0, before)?;
    let group_after = match &pdu.state_key {
        Some(key) => {
            new_state_group(conn, &room.room_id, Some(group_before), &pdu.event_type(), key, pdu.event_id.as_str())?
        }
        None => group_before,
    };
    let stream_pos = insert_event_row(conn, &room.room_id, pdu, Some(group_before), group_after, false)?;
    let appended = Appended { event_id: pdu.event_id.clone(), stream_pos };
    if soft_failed {
        diesel::update(events::table.filter(events::stream_pos.eq(stream_pos)))
            .set(events::rejected.eq(true))
            .execute(conn)?;
        tracing::info!(room = %room.room_id, event_id = %pdu.event_id, "soft-failed: not allowed by the current state");
        return Ok(appended);
    }
    replace_prev_extremities(conn, &room.room_id, pdu)?;
    diesel::update(rooms::table.filter(rooms::room_id.eq(&room.room_id)))
        .set(rooms::max_depth.eq(room.max_depth.max(pdu.depth)))
        .execute(conn)?;
    super::redactions::after_store(conn, room, pdu, hooks.server_name())?;
    if let Some(key) = &pdu.state_key {
        let mut after = before.clone();
        after.insert((pdu.event_type(), key.clone()), pdu.event_id.to_string());
        let current = current_state_map(conn, &room.room_id)?;
        let resolved = resolve_states(conn, room, &[current.clone(), after])?;
        if resolved != current {
            let group = insert_group(conn, &room.room_id, None, 0, &resolved)?;
            reset_current_state(conn, &room.room_id, &resolved)?;
            diesel::update(rooms::table.filter(rooms::room_id.eq(&room.room_id)))
                .set(rooms::current_state_group.eq(group))
                .execute(conn)?;
        }
        hooks.after_state_event(conn, pdu, stream_pos)?;
    }
    Ok(appended)
}

/// Replaces the room's current state rows with `state`.
pub(super) fn reset_current_state(conn: &mut DbConnection, room_id: &str, state: &StateMap) -> Result<(), RoomError> {
    diesel::delete(current_state::table.filter(current_state::room_id.eq(room_id))).execute(conn)?;
    let rows: Vec<_> = state
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
    Ok(())
}

/// ruma's state resolution of several states of the room, with the auth chains of their events.
pub(super) fn resolve_states(
    conn: &mut DbConnection,
    room: &RoomRow,
    maps: &[StateMap],
) -> Result<StateMap, RoomError> {
    let rules = room.version.rules();
    let ruma::room_version_rules::StateResolutionVersion::V2(v2) = &rules.state_res else {
        return Err(RoomError::Internal(format!("room version {} needs state resolution v1", room.version.as_str())));
    };
    // Every event the algorithm may look at: the states' events and their auth chains.
    let mut events: HashMap<OwnedEventId, Pdu> = HashMap::new();
    let mut auth_chains = Vec::with_capacity(maps.len());
    let mut state_maps = Vec::with_capacity(maps.len());
    for map in maps {
        let ids: Vec<String> = map.values().cloned().collect();
        for stored in events_by_ids(conn, &ids)? {
            events.insert(stored.pdu.event_id.clone(), stored.pdu);
        }
        let chain = auth_chain(conn, &ids)?;
        auth_chains.push(chain.iter().map(|p| p.event_id.clone()).collect::<EventIdSet<OwnedEventId>>());
        for pdu in chain {
            events.insert(pdu.event_id.clone(), pdu);
        }
        let mut state_map = ruma::state_res::StateMap::new();
        for ((kind, key), id) in map {
            let id = EventId::parse(id).map_err(|e| RoomError::Internal(format!("stored event ID {id}: {e}")))?;
            state_map.insert((StateEventType::from(kind.as_str()), key.clone()), id);
        }
        state_maps.push(state_map);
    }
    let resolved = ruma::state_res::resolve(
        &rules.authorization,
        v2,
        state_maps.iter(),
        auth_chains,
        |id| events.get(id).cloned(),
        |conflicted| Some(conflicted_subgraph(&events, conflicted)),
    )
    .map_err(|e| RoomError::Internal(format!("state resolution failed: {e}")))?;
    Ok(resolved.into_iter().map(|((kind, key), id)| ((kind.to_string(), key), id.to_string())).collect())
}

/// v2.1's conflicted state subgraph: the events on auth paths from one conflicted event to
/// another, the conflicted events included.
fn conflicted_subgraph(
    events: &HashMap<OwnedEventId, Pdu>,
    conflicted: &ruma::state_res::StateMap<Vec<OwnedEventId>>,
) -> EventIdSet<OwnedEventId> {
    let conflicted: HashSet<&EventId> = conflicted.values().flatten().map(|id| &**id).collect();
    // Every auth ancestor of a conflicted event, the conflicted events included.
    let mut ancestors: HashSet<&EventId> = HashSet::new();
    let mut stack: Vec<&EventId> = conflicted.iter().copied().collect();
    while let Some(id) = stack.pop() {
        if ancestors.insert(id) {
            if let Some(pdu) = events.get(id) {
                stack.extend(pdu.auth_events.iter().map(|a| &**a));
            }
        }
    }
    // Of those, the ones that have a conflicted event among their own ancestors (or are one).
    let mut reaches: HashMap<&EventId, bool> = HashMap::new();
    ancestors
        .iter()
        .copied()
        .filter(|id| reaches_conflicted(id, events, &conflicted, &mut reaches))
        .map(EventId::to_owned)
        .collect()
}

fn reaches_conflicted<'a>(
    id: &'a EventId,
    events: &'a HashMap<OwnedEventId, Pdu>,
    conflicted: &HashSet<&EventId>,
    memo: &mut HashMap<&'a EventId, bool>,
) -> bool {
    if let Some(known) = memo.get(id) {
        return *known;
    }
    // Marked first, so that a (malformed) cycle ends the walk.
    memo.insert(id, false);
    let answer = conflicted.contains(id)
        || events
            .get(id)
            .is_some_and(|pdu| pdu.auth_events.iter().any(|a| reaches_conflicted(a, events, conflicted, memo)));
    memo.insert(id, answer);
    answer
}

/// JN-8: an event we missed, with the state before and after it as another server gave them
/// (checked by the caller), stored as an outlier carrying that state so that later events
/// naming it as a prev event can be placed; the state's and auth chain's events we lack are
/// stored as outliers too. Nothing enters the timeline or the current state.
pub fn store_outlier_with_state(
    conn: &mut DbConnection,
    room_id: &str,
    outliers: &[Pdu],
    event: &Pdu,
    before: &StateMap,
    after: &StateMap,
) -> Result<(), RoomError> {
    lock_for_append(conn, room_id)?;
    if event_by_id(conn, event.event_id.as_str())?.is_some() {
        return Ok(());
    }
    let group_before = insert_group(conn, room_id, None, 0, before)?;
    let group_after = if after == before { group_before } else { insert_group(conn, room_id, None, 0, after)? };
    for pdu in outliers.iter().filter(|p| p.event_id != event.event_id) {
        if event_by_id(conn, pdu.event_id.as_str())?.is_none() {
            insert_event_row(conn, room_id, pdu, None, group_before, true)?;
        }
    }
    insert_event_row(conn, room_id, event, Some(group_before), group_after, true)?;
    Ok(())
}
