//! What a peek PUT or renewal checks about a room (server ACL, peekability, room version),
//! read once per state group and cached briefly for renewals.

use super::*;

/// What the PUT checks need to know about a room's current state.
pub(super) struct RoomFacts {
    pub(super) acl: Option<RoomServerAclEventContent>,
    /// FP-6: world-readable and not encrypted, or why not.
    pub(super) peekable: Result<(), &'static str>,
    /// RE-4: a room none of our users is in any more is not ours to offer (404).
    pub(super) has_local_member: bool,
}

/// Room facts per room, valid while the room's current state group is the recorded one (state
/// groups never change, so this is correct across instances).
pub(super) type FactsCache = Mutex<HashMap<String, FactsEntry>>;

pub(super) struct FactsEntry {
    pub(super) group: i64,
    pub(super) facts: Arc<RoomFacts>,
    pub(super) room: RoomRow,
    /// When the room row was last read. Renewals trust an entry this recent without reading the
    /// row again: a renewal cannot revive a peek the room ended (the update checks that), so the
    /// only staleness is an ACL change made on another instance, bounded by [`RENEWAL_FACTS_TTL`].
    pub(super) checked: Instant,
}

/// How long a renewal may rely on cached room facts.
pub(super) const RENEWAL_FACTS_TTL: Duration = Duration::from_secs(1);

/// The room row and its facts; `UnknownRoom` for rooms we do not hold (or only as a stub).
/// With `fresh_within`, a cached entry younger than that is used without reading the room row.
pub(super) fn room_facts(
    conn: &mut DbConnection,
    cache: &FactsCache,
    server_name: &str,
    room_id: &str,
    fresh_within: Option<Duration>,
) -> Result<(RoomRow, Arc<RoomFacts>), PeekError> {
    if let Some(ttl) = fresh_within {
        if let Some(entry) = cache.lock().unwrap().get(room_id) {
            if entry.checked.elapsed() < ttl {
                return Ok((entry.room.clone(), entry.facts.clone()));
            }
        }
    }
    let room = store::room(conn, room_id)?.ok_or(PeekError::UnknownRoom)?;
    // Rooms we only peek ourselves are not ours to offer to other servers.
    if !room.is_local {
        return Err(PeekError::UnknownRoom);
    }
    let group = room.current_state_group.ok_or(PeekError::UnknownRoom)?;
    if let Some(entry) = cache.lock().unwrap().get_mut(room_id) {
        if entry.group == group {
            entry.checked = Instant::now();
            entry.room = room.clone();
            return Ok((room, entry.facts.clone()));
        }
    }
    let content = |conn: &mut DbConnection, kind: &str| -> Result<Option<Value>, PeekError> {
        Ok(match store::current_state_id(conn, room_id, kind, "")? {
            Some(id) => store::event_by_id(conn, &id)?.map(|e| e.pdu.content_value()),
            None => None,
        })
    };
    let acl = content(conn, "m.room.server_acl")?.and_then(|c| serde_json::from_value(c).ok());
    let peekable = crate::rooms::visibility::peekability(conn, room_id)?;
    let has_local_member = has_local_member(conn, room_id, server_name)?;
    let facts = Arc::new(RoomFacts { acl, peekable, has_local_member });
    let entry = FactsEntry { group, facts: facts.clone(), room: room.clone(), checked: Instant::now() };
    cache.lock().unwrap().insert(room_id.to_owned(), entry);
    Ok((room, facts))
}

/// The cached room facts, when read within [`RENEWAL_FACTS_TTL`] (no database access).
pub(super) fn cached_facts(cache: &FactsCache, room_id: &str) -> Option<(RoomRow, Arc<RoomFacts>)> {
    let cache = cache.lock().unwrap();
    let entry = cache.get(room_id).filter(|entry| entry.checked.elapsed() < RENEWAL_FACTS_TTL)?;
    Some((entry.room.clone(), entry.facts.clone()))
}

/// FP check steps 1 and 3-5 on known room facts (step 2, the room itself, is `room_facts`).
pub(super) fn apply_checks(
    origin: &ServerName,
    room: &RoomRow,
    facts: &RoomFacts,
    peek_id: Option<PeekId>,
    offered: &[String],
) -> Result<PeekId, PeekError> {
    if !facts.has_local_member {
        return Err(PeekError::UnknownRoom);
    }
    if facts.acl.as_ref().is_some_and(|acl| !acl.is_allowed(origin)) {
        return Err(PeekError::Acl(origin.to_string()));
    }
    let peek_id = peek_id.ok_or(PeekError::InvalidPeekId)?;
    if !offered.iter().any(|v| v == room.version.as_str()) {
        return Err(PeekError::IncompatibleVersion(room.version.as_str().to_owned()));
    }
    facts.peekable.map_err(PeekError::NotPeekable)?;
    Ok(peek_id)
}

/// Renews a live peek (not lapsed, not ended by the room); `false` otherwise.
pub(super) fn renew_live_blocking(
    conn: &mut DbConnection,
    origin: &str,
    room_id: &str,
    peek_id: &str,
    interval: i64,
    grace: i64,
) -> Result<bool, PeekError> {
    // Callers run this on the soft-state pool: a renewal lost in a crash is simply sent again.
    renew_update(conn, origin, room_id, peek_id, interval, grace, now_ms())
}

pub(super) fn renew_update(
    conn: &mut DbConnection,
    origin: &str,
    room_id: &str,
    peek_id: &str,
    interval: i64,
    grace: i64,
    now: i64,
) -> Result<bool, PeekError> {
    let renewed = diesel::update(
        inbound_peeks::table
            .filter(inbound_peeks::origin.eq(origin))
            .filter(inbound_peeks::room_id.eq(room_id))
            .filter(inbound_peeks::peek_id.eq(peek_id))
            .filter(inbound_peeks::expires_ts.ge(now))
            .filter(inbound_peeks::end_stream_pos.is_null()),
    )
    .set((
        inbound_peeks::renewed_ts.eq(now),
        inbound_peeks::renewal_interval_ms.eq(interval),
        inbound_peeks::expires_ts.eq(now + interval + grace),
    ))
    .execute(conn)?;
    Ok(renewed > 0)
}
