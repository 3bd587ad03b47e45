//! JN-10: which servers have a joined member in a room, as spans of stream positions. A span
//! opens at the event that gives a server its first joined member and closes at the event that
//! takes its last one away; the sender sends that server our own events of the room inside the
//! span (each server sends its own events to the others; peekers are different, we relay every
//! event to them). The spans are kept by a hook on the append path, in the append transaction,
//! so they always agree with the stored membership.

use diesel::prelude::*;

use crate::db::schema::joined_servers;
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
    // Only rooms we are in: a room we merely peek sends nobody anything of ours.
    let ours = store::room(conn, room_id)?.is_some_and(|r| r.is_local);
    if !ours && !store::has_joined_member_of(conn, room_id, our_server)? {
        return Ok(());
    }
    let joined = store::has_joined_member_of(conn, room_id, server)?;
    if joined {
        open_span(conn, room_id, server, position)?;
    } else {
        // Its own leave is the last event it gets from us (a kick or ban is news to it).
        diesel::update(joined_servers::table)
            .filter(joined_servers::room_id.eq(room_id))
            .filter(joined_servers::server_name.eq(server))
            .filter(joined_servers::end_stream_pos.is_null())
            .set(joined_servers::end_stream_pos.eq(position))
            .execute(conn)?;
    }
    Ok(())
}

/// Opens a span for `server` from `position` unless one is open; the server becomes a
/// destination, starting after that position.
fn open_span(conn: &mut DbConnection, room_id: &str, server: &str, position: i64) -> Result<(), RoomError> {
    let open = joined_servers::table
        .filter(joined_servers::room_id.eq(room_id))
        .filter(joined_servers::server_name.eq(server))
        .filter(joined_servers::end_stream_pos.is_null());
    if diesel::select(diesel::dsl::exists(open)).get_result::<bool>(conn)? {
        return Ok(());
    }
    diesel::insert_into(joined_servers::table)
        .values((
            joined_servers::room_id.eq(room_id),
            joined_servers::server_name.eq(server),
            joined_servers::start_stream_pos.eq(position),
        ))
        .execute(conn)?;
    crate::sender::destinations::ensure_cursor(conn, server, position, false)?;
    Ok(())
}

/// After one of our users joined a room of another server from a `send_join` answer (JN-6):
/// every other server with a joined member in the room's current state gets a span from the
/// join on (the spans of a room we were already in stay as they are).
pub fn open_for_current_members(
    conn: &mut DbConnection,
    our_server: &str,
    room_id: &str,
    position: i64,
) -> Result<(), RoomError> {
    for server in store::joined_servers_now(conn, room_id)? {
        if server != our_server {
            open_span(conn, room_id, &server, position)?;
        }
    }
    Ok(())
}
