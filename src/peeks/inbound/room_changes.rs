//! RE-3, RE-4: the append-path hook that ends a room's inbound peeks when it stops being
//! peekable or our last member leaves.

use super::*;

/// Why the room ended its peeks (the `reason` label of the eviction counter).
pub const REASON_VISIBILITY: &str = "visibility_changed";
pub const REASON_LEFT: &str = "room_left";
pub const REASON_LAPSED: &str = "lapsed";

/// Called by the append path inside its transaction after every state event (a hook that
/// `app` registers with the append path): when the room
/// stops being peekable (RE-3) or our last member leaves (RE-4), every inbound peek on it ends at
/// this event. The event itself is still delivered; `expired_peeks` follows (PE-7).
pub fn after_state_event(
    conn: &mut DbConnection,
    server_name: &str,
    pdu: &Pdu,
    position: i64,
) -> Result<(), RoomError> {
    let reason = if visibility::ends_peekability(pdu) {
        Some(REASON_VISIBILITY)
    } else if pdu.event_type().as_str() == "m.room.member" {
        let local_leave = pdu.state_key.as_deref().is_some_and(|k| ids::is_user_of(k, server_name))
            && pdu.content_value()["membership"] != "join";
        (local_leave && !has_local_member(conn, pdu.room_id.as_str(), server_name)?).then_some(REASON_LEFT)
    } else {
        None
    };
    if let Some(reason) = reason {
        end_room_peeks(conn, pdu.room_id.as_str(), position, reason)?;
    }
    Ok(())
}

pub(super) fn has_local_member(conn: &mut DbConnection, room_id: &str, server_name: &str) -> Result<bool, RoomError> {
    let members: Vec<String> = store::current_state_map(conn, room_id)?
        .into_iter()
        .filter(|((kind, key), _)| kind == "m.room.member" && ids::is_user_of(key, server_name))
        .map(|(_, id)| id)
        .collect();
    Ok(store::events_by_ids(conn, &members)?.iter().any(|e| e.pdu.content_value()["membership"] == "join"))
}

/// Ends every live inbound peek on the room at `position` and queues `expired_peeks` notices.
///
/// A peek that already lapsed (and waits for the eviction job) is left alone (H6): ending it
/// here would give it an end position, and delivery runs up to an end whatever the expiry, so a
/// lapsed peeker would be sent the events since its lapse. The eviction job tells it instead.
pub(super) fn end_room_peeks(
    conn: &mut DbConnection,
    room_id: &str,
    position: i64,
    reason: &str,
) -> Result<(), RoomError> {
    let now = now_ms();
    let live = inbound_peeks::table
        .filter(inbound_peeks::room_id.eq(room_id))
        .filter(inbound_peeks::end_stream_pos.is_null())
        .filter(inbound_peeks::expires_ts.ge(now));
    let open: Vec<(String, String)> = live.select((inbound_peeks::origin, inbound_peeks::peek_id)).load(conn)?;
    diesel::update(live)
        .set((inbound_peeks::end_stream_pos.eq(position), inbound_peeks::end_reason.eq(reason)))
        .execute(conn)?;
    for (origin, peek_id) in open {
        sender::queue_expired_peek(conn, &origin, room_id, &peek_id, position)?;
    }
    Ok(())
}
