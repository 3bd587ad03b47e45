//! H19: redactions are applied. An accepted `m.room.redaction` replaces the stored JSON of the
//! event it names with that event's redacted form (the room version's redaction algorithm), in
//! the transaction that stores the redaction. Everything that serves events reads the stored
//! JSON: `/sync`, `/messages`, `/event`, peek answers, `/backfill`, and the sender's queue and
//! fan-out, so all of them serve the redacted event from then on, on every instance.
//!
//! A redaction applies when its sender's server is the redacted event's sender's server, or its
//! sender's power level reaches the room's `redact` level (the spec's rule for room versions 3
//! and later, where the auth rules leave this check to the receiving server). Every redaction is
//! also recorded in `redactions` by the event it names: an event stored after its redaction (a
//! backfilled event, or one on another branch of the room's graph) is redacted as it is stored.

use std::sync::atomic::{AtomicU64, Ordering};

use diesel::prelude::*;
use serde_json::Value;

use super::{current_state_id, event_by_id, RoomError, RoomRow};
use crate::db::schema::{events, redactions};
use crate::db::DbConnection;
use crate::events::Pdu;
use crate::on_backend;

/// Bumped whenever this process applies a redaction or hears that another instance did:
/// in-memory copies of events read before are stale (see `EventCache`).
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// The current redaction epoch.
pub fn epoch() -> u64 {
    EPOCH.load(Ordering::Acquire)
}

/// Another instance applied a redaction (a PostgreSQL notification).
pub fn note_applied_elsewhere() {
    EPOCH.fetch_add(1, Ordering::AcqRel);
}

/// Called by the append path for every event it stores in `room`: a redaction is recorded and
/// applied to the event it names; any other event of another server gets the redactions stored
/// before it. Our own events are new when stored (their IDs are hashes of what we just built),
/// so the local append path skips that lookup.
pub(super) fn after_store(
    conn: &mut DbConnection,
    room: &RoomRow,
    pdu: &Pdu,
    our_server: &str,
) -> Result<(), RoomError> {
    if pdu.event_type() == "m.room.redaction" {
        let Some(target_id) = pdu.redacts.as_ref() else {
            return Ok(());
        };
        let row = (
            redactions::redacts.eq(target_id.to_string()),
            redactions::event_id.eq(pdu.event_id.to_string()),
            redactions::room_id.eq(room.room_id.clone()),
        );
        on_backend!(&mut *conn, |c| diesel::insert_into(redactions::table)
            .values(row.clone())
            .on_conflict_do_nothing()
            .execute(c))?;
        return apply(conn, room, pdu);
    }
    if pdu.sender.server_name().as_str() == our_server {
        return Ok(());
    }
    let earlier: Vec<String> = redactions::table
        .filter(redactions::redacts.eq(pdu.event_id.as_str()))
        .filter(redactions::room_id.eq(&room.room_id))
        .select(redactions::event_id)
        .load(conn)?;
    for redaction_id in earlier {
        if let Some(redaction) = event_by_id(conn, &redaction_id)? {
            apply(conn, room, &redaction.pdu)?;
        }
    }
    Ok(())
}

/// Forgets the room's redactions (its events are being purged).
pub(super) fn forget_room(conn: &mut DbConnection, room_id: &str) -> Result<(), RoomError> {
    diesel::delete(redactions::table.filter(redactions::room_id.eq(room_id))).execute(conn)?;
    Ok(())
}

/// Applies `redaction` (stored in `room`) to the event it names, if that event is stored, in
/// the same room, and the redaction is allowed to apply.
fn apply(conn: &mut DbConnection, room: &RoomRow, redaction: &Pdu) -> Result<(), RoomError> {
    let Some(target_id) = redaction.redacts.as_ref() else {
        return Ok(());
    };
    let Some(target) = event_by_id(conn, target_id.as_str())? else {
        tracing::info!(redaction = %redaction.event_id, target = %target_id, "redaction of an event we do not hold yet; applied when it arrives");
        return Ok(());
    };
    if target.pdu.room_id != redaction.room_id || !may_redact(conn, &room.room_id, redaction, &target.pdu)? {
        tracing::info!(redaction = %redaction.event_id, target = %target_id, "redaction not allowed to apply");
        return Ok(());
    }
    let rules = room.version.rules();
    let redacted = ruma::canonical_json::redact(target.pdu.json.clone(), &rules.redaction, None)
        .map_err(|e| RoomError::Internal(format!("cannot redact {target_id}: {e}")))?;
    let json = serde_json::to_string(&redacted).expect("canonical JSON serialises");
    diesel::update(events::table.filter(events::event_id.eq(target_id.as_str())))
        .set(events::json.eq(json))
        .execute(conn)?;
    EPOCH.fetch_add(1, Ordering::AcqRel);
    crate::db::notify::notify(conn, crate::db::notify::REDACTIONS, target.stream_pos)?;
    Ok(())
}

/// Same server as the redacted event's sender, or enough power to redact others' events.
fn may_redact(conn: &mut DbConnection, room_id: &str, redaction: &Pdu, target: &Pdu) -> Result<bool, RoomError> {
    if redaction.sender.server_name() == target.sender.server_name() {
        return Ok(true);
    }
    let levels = match current_state_id(conn, room_id, "m.room.power_levels", "")? {
        Some(id) => event_by_id(conn, &id)?.map(|e| e.pdu.content_value()).unwrap_or(Value::Null),
        None => Value::Null,
    };
    Ok(power_of(&levels, redaction.sender.as_str()) >= levels["redact"].as_i64().unwrap_or(50))
}

/// A user's power level in a power-levels content (`users`, else `users_default`, else 0).
fn power_of(levels: &Value, user_id: &str) -> i64 {
    levels["users"][user_id].as_i64().or_else(|| levels["users_default"].as_i64()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_comes_from_users_then_the_default() {
        let levels = serde_json::json!({ "users": { "@a:x": 100 }, "users_default": 10, "redact": 50 });
        assert_eq!(power_of(&levels, "@a:x"), 100);
        assert_eq!(power_of(&levels, "@b:x"), 10);
        assert_eq!(power_of(&Value::Null, "@b:x"), 0);
    }
}
