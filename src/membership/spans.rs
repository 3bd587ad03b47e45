//! JN-10: which servers have a joined member in a room, as spans of stream positions. A span
//! opens at the event that gives a server its first joined member and closes at the event that
//! takes its last one away; the sender sends that server our own events of the room inside the
//! span (each server sends its own events to the others; peekers are different, we relay every
//! event to them). The spans are kept by a hook on the append path, in the append transaction,
//! so they always agree with the stored membership.

use diesel::prelude::*;

use crate::db::schema::{current_state, joined_servers};
use crate::db::DbConnection;
use crate::events::Pdu;
use crate::rooms::{store, RoomError};

/// The append hook: after a member event about another server's user, open or close that
/// server's span. Events about our own users change nothing here.
pub fn after_state_event(conn: &mut DbConnection, our_server: &str, pdu: &Pdu, position: i64) -> Result<(), RoomError> {
    if pdu.event_type() != "m.room.member" {
        return Ok(());
    }
    let Some(server) = pdu.state_key.as_deref().and_then(|user| user.split_once(':')).map(|(_, s)| s) else {
        return Ok(());
    };
    if server == our_server {
        return Ok(());
    }
    let room_id = pdu.room_id.as_str();
    let joined = has_joined_member(conn, room_id, server)?;
    let open = joined_servers::table
        .filter(joined_servers::room_id.eq(room_id))
        .filter(joined_servers::server_name.eq(server))
        .filter(joined_servers::end_stream_pos.is_null());
    let is_open = diesel::select(diesel::dsl::exists(open)).get_result::<bool>(conn)?;
    match (joined, is_open) {
        (true, false) => {
            diesel::insert_into(joined_servers::table)
                .values((
                    joined_servers::room_id.eq(room_id),
                    joined_servers::server_name.eq(server),
                    joined_servers::start_stream_pos.eq(position),
                ))
                .execute(conn)?;
            // The server becomes a destination, starting after its join.
            crate::sender::destinations::ensure_cursor(conn, server, position, false)?;
        }
        (false, true) => {
            // Its own leave is the last event it gets from us (a kick or ban is news to it).
            diesel::update(open).set(joined_servers::end_stream_pos.eq(position)).execute(conn)?;
        }
        _ => {}
    }
    Ok(())
}

/// Does `server` have a user whose membership in the room's current state is `join`?
fn has_joined_member(conn: &mut DbConnection, room_id: &str, server: &str) -> Result<bool, RoomError> {
    let suffix = format!(":{server}");
    // `LIKE` narrows the rows; the exact suffix test below decides (`_` is a LIKE wildcard).
    let ids: Vec<(String, String)> = current_state::table
        .filter(current_state::room_id.eq(room_id))
        .filter(current_state::event_type.eq("m.room.member"))
        .filter(current_state::state_key.like(format!("%{suffix}")))
        .select((current_state::state_key, current_state::event_id))
        .load(conn)?;
    let ids: Vec<String> = ids.into_iter().filter(|(user, _)| user.ends_with(&suffix)).map(|(_, id)| id).collect();
    if ids.is_empty() {
        return Ok(false);
    }
    Ok(store::events_by_ids(conn, &ids)?.iter().any(|e| e.pdu.content_value()["membership"] == "join"))
}
