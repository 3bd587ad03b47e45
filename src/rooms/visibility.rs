//! History visibility (WR-2, JN-11): which events a server may see. An event is visible to a
//! server with no member in the room iff the `m.room.history_visibility` in the state before it
//! is `world_readable`, or the event is itself the visibility change and the new setting is
//! (the spec's "before or after" rule for the visibility event); servers with members follow
//! the per-server rule of [`server_may_see`].

use std::collections::HashMap;
use std::sync::Mutex;

use diesel::prelude::*;
use diesel::sql_types::Text;

use serde_json::Value;

use super::error::RoomError;
use super::store::{self, StoredEvent};
use crate::db::DbConnection;
use crate::events::Pdu;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    WorldReadable,
    Shared,
    Invited,
    Joined,
}

impl Visibility {
    /// Unknown or missing values mean `shared` (the spec's default).
    pub fn parse(value: Option<&str>) -> Visibility {
        match value {
            Some("world_readable") => Visibility::WorldReadable,
            Some("invited") => Visibility::Invited,
            Some("joined") => Visibility::Joined,
            _ => Visibility::Shared,
        }
    }
}

#[derive(QueryableByName)]
struct EntryRow {
    #[diesel(sql_type = Text)]
    event_id: String,
}

/// The event ID of one state key in a group, walking only as far as the nearest delta holding it.
pub fn state_entry_at_group(
    conn: &mut DbConnection,
    group: i64,
    kind: &str,
    state_key: &str,
) -> Result<Option<String>, RoomError> {
    // Values are bound as literals only after escaping quotes; `group` is our own integer.
    let kind = kind.replace('\'', "''");
    let state_key = state_key.replace('\'', "''");
    let query = format!(
        "WITH RECURSIVE chain(id, prev, level) AS ( \
             SELECT id, prev_group, 0 FROM state_groups WHERE id = {group} \
             UNION ALL \
             SELECT g.id, g.prev_group, c.level + 1 FROM state_groups g JOIN chain c ON g.id = c.prev \
         ) \
         SELECT e.event_id AS event_id FROM chain c JOIN state_group_entries e ON e.group_id = c.id \
         WHERE e.event_type = '{kind}' AND e.state_key = '{state_key}' ORDER BY c.level LIMIT 1"
    );
    let rows: Vec<EntryRow> = diesel::sql_query(query).load(conn)?;
    Ok(rows.into_iter().next().map(|r| r.event_id))
}

/// Visibility per state group. State groups never change once written, so entries never go
/// stale, on this instance or any other; the map is only bounded in size.
#[derive(Default)]
pub struct VisibilityCache(Mutex<HashMap<i64, Visibility>>);

const VISIBILITY_CACHE_MAX: usize = 100_000;

impl VisibilityCache {
    fn get(&self, group: i64) -> Option<Visibility> {
        self.0.lock().unwrap().get(&group).copied()
    }

    fn insert(&self, group: i64, visibility: Visibility) {
        let mut map = self.0.lock().unwrap();
        if map.len() >= VISIBILITY_CACHE_MAX {
            map.clear();
        }
        map.insert(group, visibility);
    }
}

fn visibility_at_group(
    conn: &mut DbConnection,
    group: Option<i64>,
    cache: &VisibilityCache,
) -> Result<Visibility, RoomError> {
    let Some(group) = group else {
        return Ok(Visibility::Shared);
    };
    if let Some(known) = cache.get(group) {
        return Ok(known);
    }
    let visibility = match state_entry_at_group(conn, group, "m.room.history_visibility", "")? {
        None => Visibility::Shared,
        Some(id) => {
            let event = super::store::event_by_id(conn, &id)?.ok_or(RoomError::EventNotFound)?;
            Visibility::parse(event.pdu.content_value()["history_visibility"].as_str())
        }
    };
    cache.insert(group, visibility);
    Ok(visibility)
}

/// The visibility that applies to `event` for a server with no member in the room: the
/// setting before it, or `world_readable` when the event itself makes the room world-readable.
pub fn of_event(
    conn: &mut DbConnection,
    event: &StoredEvent,
    cache: &VisibilityCache,
) -> Result<Visibility, RoomError> {
    Ok(given_before(event, visibility_at_group(conn, event.state_group_before, cache)?))
}

/// [`of_event`] from the cache alone; `None` when the setting before the event is not cached.
pub fn of_event_cached(event: &StoredEvent, cache: &VisibilityCache) -> Option<Visibility> {
    let before = match event.state_group_before {
        None => Visibility::Shared,
        Some(group) => cache.get(group)?,
    };
    Some(given_before(event, before))
}

/// The event's visibility, given the setting before it (the "before or after" rule).
fn given_before(event: &StoredEvent, before: Visibility) -> Visibility {
    let is_change = event.pdu.event_type() == "m.room.history_visibility" && event.pdu.state_key.as_deref() == Some("");
    if is_change && before != Visibility::WorldReadable {
        let after = Visibility::parse(event.pdu.content_value()["history_visibility"].as_str());
        if after == Visibility::WorldReadable {
            return after;
        }
    }
    before
}

/// JN-11, the spec's rule for servers: may `server` read `event`? World-readable history: any
/// server. Otherwise a server may read what one of its users could see, judged at the event
/// (the membership in the state after it, so a member sees their own join): `shared` history
/// when the server has a member joined now or joined at the event, `invited` history when one
/// was invited or joined at the event, `joined` history only when one was joined at the event.
/// A server that joins a `joined` room today does not read what came before.
pub fn server_may_see(
    conn: &mut DbConnection,
    event: &StoredEvent,
    server: &str,
    joined_now: bool,
    cache: &VisibilityCache,
) -> Result<bool, RoomError> {
    let visibility = of_event(conn, event, cache)?;
    if visibility == Visibility::WorldReadable || (visibility == Visibility::Shared && joined_now) {
        return Ok(true);
    }
    let memberships = server_memberships_at_group(conn, event.state_group, server)?;
    let has = |wanted: &str| memberships.iter().any(|m| m == wanted);
    Ok(match visibility {
        Visibility::WorldReadable => true,
        Visibility::Shared | Visibility::Joined => has("join"),
        Visibility::Invited => has("join") || has("invite"),
    })
}

/// The memberships of `server`'s users in a state group.
fn server_memberships_at_group(conn: &mut DbConnection, group: i64, server: &str) -> Result<Vec<String>, RoomError> {
    let members: Vec<(String, String)> = store::state_map_at_group(conn, group)?
        .into_iter()
        .filter(|((kind, _), _)| kind == "m.room.member")
        .map(|((_, user), id)| (user, id))
        .collect();
    store::memberships_of_server(conn, members, server)
}

/// RE-3 / CP-11, the event-side of [`peekability`]: whether this state event makes the room
/// unpeekable (history no longer `world_readable`, or encryption turned on). Only the empty state
/// key is the room's setting; the same types with any other state key change nothing (H7).
pub fn ends_peekability(pdu: &Pdu) -> bool {
    if pdu.state_key.as_deref() != Some("") {
        return false;
    }
    match pdu.event_type().as_str() {
        "m.room.history_visibility" => pdu.content_value()["history_visibility"] != "world_readable",
        "m.room.encryption" => true,
        _ => false,
    }
}

/// FP-6 / CP-3 / OP-4.5, the one peekability rule, for our rooms, local devices and the state a
/// peek target answers with: a room can be peeked while its history visibility is
/// `world_readable` and it is not encrypted. `state_content(type)` is the content of the room's
/// state event of that type with the empty state key, if any. `Err` says why not.
pub fn peekable(state_content: impl Fn(&str) -> Option<Value>) -> Result<(), &'static str> {
    let visibility = state_content("m.room.history_visibility");
    if Visibility::parse(visibility.as_ref().and_then(|c| c["history_visibility"].as_str()))
        != Visibility::WorldReadable
    {
        return Err("Room is not world_readable");
    }
    if state_content("m.room.encryption").is_some() {
        return Err("Room is encrypted");
    }
    Ok(())
}

/// [`peekable`] over a room's current state in the database.
pub fn peekability(conn: &mut DbConnection, room_id: &str) -> Result<Result<(), &'static str>, RoomError> {
    let mut current = HashMap::new();
    for kind in ["m.room.history_visibility", "m.room.encryption"] {
        if let Some(content) = current_content(conn, room_id, kind)? {
            current.insert(kind, content);
        }
    }
    Ok(peekable(|kind| current.get(kind).cloned()))
}

/// The room's history visibility now (who may read its history from now on).
pub fn current(conn: &mut DbConnection, room_id: &str) -> Result<Visibility, RoomError> {
    let content = current_content(conn, room_id, "m.room.history_visibility")?;
    Ok(Visibility::parse(content.as_ref().and_then(|c| c["history_visibility"].as_str())))
}

/// The content of the room's current state event `(kind, "")`.
fn current_content(conn: &mut DbConnection, room_id: &str, kind: &str) -> Result<Option<Value>, RoomError> {
    Ok(match store::current_state_id(conn, room_id, kind, "")? {
        Some(id) => store::event_by_id(conn, &id)?.map(|e| e.pdu.content_value()),
        None => None,
    })
}
