//! The room service's part in membership over federation: templates for other servers'
//! joins and leaves (JN-1, JN-4), our signed copy of another server's template (JN-6), our
//! signature on another server's invite (JN-5), our invite built before its invitee's server
//! signs it (JN-7), and storing an invite to a room we are not in.

use ruma::{RoomId, ServerName, UserId};
use serde_json::Value;

use super::error::RoomError;
use super::service::Rooms;
use super::store;
use crate::clock::now_ms;
use crate::db::{write_transaction, DbConnection};
use crate::events::{EventDraft, Pdu};

impl Rooms {
    /// A template for `user`'s `membership` event at the end of one of our rooms (the
    /// `make_join`/`make_leave` answer, JN-1, JN-4): prev events, auth events and depth from
    /// the current state, no hashes or signatures. Refused with [`RoomError::Forbidden`] when
    /// the auth rules would refuse it now. For room version 10, `origin` names `origin`.
    pub async fn membership_template(
        &self,
        room_id: &RoomId,
        user: &UserId,
        membership: &str,
        origin: &ServerName,
    ) -> Result<(crate::events::RoomVersion, Value), RoomError> {
        let (key, server_name) = (self.key.clone(), self.server_name.clone());
        let content = serde_json::json!({ "membership": membership });
        let draft = EventDraft::new(room_id, user, "m.room.member", Some(user.as_str()), content);
        let room = room_id.to_string();
        let (version, pdu) = self
            .read(move |conn| {
                let row = store::room(conn, &room)?.ok_or(RoomError::NotFound)?;
                // Signed with our key only so that it is a complete event for the auth check;
                // the joining server hashes and signs the template itself.
                let pdu = store::prepare_at_end(conn, &key, server_name.as_str(), &row, draft)?;
                Ok((row.version, pdu))
            })
            .await?;
        let mut template = pdu.federation_json();
        if let Some(fields) = template.as_object_mut() {
            fields.remove("hashes");
            fields.remove("signatures");
            fields.remove("event_id");
            if fields.contains_key("origin") {
                fields.insert("origin".into(), Value::String(origin.to_string()));
            }
        }
        Ok((version, template))
    }

    /// Stores an invite to a room we are not in as an outlier (see
    /// [`store::store_invite_outlier`]), then `then(conn, its position)` in the same
    /// transaction; wakes `/sync`.
    pub async fn store_invite_then(
        &self,
        room_id: &RoomId,
        version: crate::events::RoomVersion,
        pdu: Pdu,
        then: impl FnOnce(&mut DbConnection, i64) -> Result<(), RoomError> + Send + 'static,
    ) -> Result<i64, RoomError> {
        let room = room_id.to_string();
        self.write_and_publish(move |conn| {
            let pos = store::store_invite_outlier(conn, &room, version, now_ms(), &pdu)?;
            then(conn, pos)?;
            Ok(pos)
        })
        .await
    }

    /// Adds our signature to another server's event (an invite of one of our users, JN-5).
    pub fn countersign(&self, pdu: &Pdu, version: crate::events::RoomVersion) -> Result<Pdu, RoomError> {
        let mut object = pdu.json.clone();
        object.remove("event_id");
        crate::events::hash_and_sign(&self.key, self.server_name.as_str(), &mut object, version)
            .map_err(|e| RoomError::BadEvent(e.to_string()))?;
        Pdu::from_federation(object, version).map_err(|e| RoomError::BadEvent(e.to_string()))
    }

    /// An event of ours for the end of the room, built, signed and authorised but not stored
    /// (an invite of another server's user goes to their server first, JN-7).
    pub async fn prepare_event(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
    ) -> Result<(crate::events::RoomVersion, Pdu), RoomError> {
        let (key, server_name) = (self.key.clone(), self.server_name.clone());
        let draft = EventDraft::new(room_id, sender, kind, state_key, content);
        let room = room_id.to_string();
        self.read(move |conn| {
            let row = store::room(conn, &room)?.ok_or(RoomError::NotFound)?;
            let pdu = store::prepare_at_end(conn, &key, server_name.as_str(), &row, draft)?;
            Ok((row.version, pdu))
        })
        .await
    }

    /// Our copy of a template another server made for one of our users (`make_join`, JN-6):
    /// `origin_server_ts` now, `origin` us (room version 10), then hashed and signed with our
    /// key. Other fields are the template's; the caller checks they are what it asked for.
    pub fn complete_template(
        &self,
        template: &serde_json::Map<String, Value>,
        version: crate::events::RoomVersion,
    ) -> Result<Pdu, RoomError> {
        let mut event = template.clone();
        for unsigned_only in ["signatures", "hashes", "unsigned", "event_id"] {
            event.remove(unsigned_only);
        }
        event.insert("origin_server_ts".into(), Value::from(now_ms()));
        if version == crate::events::RoomVersion::V10 {
            event.insert("origin".into(), Value::String(self.server_name.to_string()));
        }
        let mut object = match ruma::CanonicalJsonValue::try_from(Value::Object(event)) {
            Ok(ruma::CanonicalJsonValue::Object(object)) => object,
            _ => return Err(RoomError::BadEvent("the template is not canonical JSON".into())),
        };
        crate::events::hash_and_sign(&self.key, self.server_name.as_str(), &mut object, version)
            .map_err(|e| RoomError::BadEvent(e.to_string()))?;
        Pdu::from_federation(object, version).map_err(|e| RoomError::BadEvent(e.to_string()))
    }

    /// Stores an event we missed with the state around it (see
    /// [`store::store_outlier_with_state`]), all or nothing.
    pub async fn store_fetched_state(
        &self,
        room_id: &RoomId,
        outliers: Vec<Pdu>,
        event: Pdu,
        before: store::StateMap,
        after: store::StateMap,
    ) -> Result<(), RoomError> {
        let room = room_id.to_string();
        self.db
            .run(move |conn| {
                write_transaction::<_, RoomError, _>(conn, |conn| {
                    store::store_outlier_with_state(conn, &room, &outliers, &event, &before, &after)
                })
            })
            .await
    }
}
