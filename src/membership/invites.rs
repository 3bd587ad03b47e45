//! Invites over federation: another server invites one of our users (JN-5), one of our users
//! invites another server's user (JN-7), and the invites `/sync` shows in `rooms.invite`.
//!
//! An invite from another server is checked through the intake (its sender's server's
//! signature, strict content hash, ID equal to the path's), must be a member event inviting a
//! user of ours who exists, sent by a user of the requesting server; we add our signature and
//! answer with it. When one of our users is in the room the event reaches us again through
//! `/send` like any event; otherwise it is stored as an outlier of the room with the stripped
//! state the inviter sent, for `/sync`.

use diesel::prelude::*;
use ruma::{CanonicalJsonValue, RoomId, ServerName, UserId};
use serde_json::{json, Value};

use super::MembershipError;
use crate::db::schema::invites;
use crate::db::DbConnection;
use crate::events::intake::{self, Hashes};
use crate::events::{Pdu, RoomVersion};
use crate::federation::client::FedRequest;
use crate::keys::RemoteKeys;
use crate::rooms::{RoomError, Rooms};

/// Stripped state events kept per invite, at most (the rest of a long list is dropped).
const MAX_INVITE_STATE: usize = 50;

/// The state types a stripped invite state carries, from the room's current state (JN-7).
const STRIPPED_TYPES: [&str; 7] = [
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.canonical_alias",
    "m.room.avatar",
    "m.room.encryption",
    "m.room.topic",
];

/// `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}` (JN-5): the event with our signature
/// added. The invited user must have an account here.
pub async fn receive(
    rooms: &Rooms,
    keys: &RemoteKeys,
    origin: &ServerName,
    room_id: &RoomId,
    event_id: &str,
    body: &Value,
    accounts: &crate::accounts::Accounts,
) -> Result<Value, MembershipError> {
    let raw_version = body.get("room_version").and_then(Value::as_str).unwrap_or("1");
    let version =
        RoomVersion::parse(raw_version).ok_or_else(|| MembershipError::IncompatibleVersion(raw_version.to_owned()))?;
    let event = body.get("event").cloned().ok_or_else(|| MembershipError::BadEvent("no event".into()))?;
    let object = intake::parse(event).map_err(|e| MembershipError::BadEvent(e.to_string()))?;
    let computed = intake::event_id(&object, version);
    if computed != event_id {
        return Err(MembershipError::BadEvent(format!("the event's ID is {computed:?}, not {event_id:?}")));
    }
    let invitee = check_invite_shape(&object, origin, room_id, rooms.server_name())?;
    let exists =
        accounts.exists(&invitee).await.map_err(|e| MembershipError::Room(RoomError::Internal(e.to_string())))?;
    if !exists {
        return Err(MembershipError::NotFound(format!("{invitee} has no account here")));
    }
    let pdu = intake::check(keys, room_id, version, object, Hashes::Strict).await.map_err(super::inbound::refused)?;
    let signed = rooms.countersign(&pdu, version)?;
    if !rooms.server_is_joined(room_id, rooms.server_name()).await.unwrap_or(false) {
        let stripped = stripped_state(body.get("invite_room_state"), &signed);
        let (user, room, id) = (invitee.to_string(), room_id.to_string(), signed.event_id.to_string());
        let record =
            move |conn: &mut DbConnection, position: i64| record_invite(conn, &user, &room, &id, position, &stripped);
        rooms.store_invite_then(room_id, version, signed.clone(), record).await?;
    }
    tracing::info!(origin = %origin, room = %room_id, invitee = %invitee, "invite received");
    Ok(json!({ "event": signed.federation_json() }))
}

/// A member event of this room, membership `invite`, inviting a user of ours, sent by a user of
/// the requesting server. Returns the invitee.
fn check_invite_shape(
    object: &ruma::CanonicalJsonObject,
    origin: &ServerName,
    room_id: &RoomId,
    ours: &ServerName,
) -> Result<ruma::OwnedUserId, MembershipError> {
    let text = |key: &str| match object.get(key) {
        Some(CanonicalJsonValue::String(s)) => s.as_str(),
        _ => "",
    };
    let membership = match object.get("content") {
        Some(CanonicalJsonValue::Object(content)) => match content.get("membership") {
            Some(CanonicalJsonValue::String(m)) => m.as_str(),
            _ => "",
        },
        _ => "",
    };
    if text("type") != "m.room.member" || membership != "invite" {
        return Err(MembershipError::BadEvent("not an invite".into()));
    }
    if text("room_id") != room_id.as_str() {
        return Err(MembershipError::BadEvent("room_id is not the room of the request".into()));
    }
    let sender = UserId::parse(text("sender")).map_err(|e| MembershipError::BadEvent(format!("sender: {e}")))?;
    if sender.server_name() != origin {
        return Err(MembershipError::Forbidden(format!("{sender} is not a user of {origin}")));
    }
    let invitee = UserId::parse(text("state_key")).map_err(|e| MembershipError::BadEvent(format!("state_key: {e}")))?;
    if invitee.server_name() != ours {
        return Err(MembershipError::BadEvent(format!("{invitee} is not a user of this server")));
    }
    Ok(invitee)
}

/// The inviter's stripped state (objects with `type`, `state_key`, `content`, `sender` only,
/// at most [`MAX_INVITE_STATE`]) and the invite itself, stripped.
fn stripped_state(listed: Option<&Value>, invite: &Pdu) -> Vec<Value> {
    let mut out: Vec<Value> = listed
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e["type"].is_string() && e["state_key"].is_string() && e["content"].is_object())
        .filter(|e| !(e["type"] == "m.room.member" && e["state_key"] == invite.state_key.as_deref().unwrap_or_default()))
        .take(MAX_INVITE_STATE)
        .map(|e| json!({ "type": e["type"], "state_key": e["state_key"], "content": e["content"], "sender": e["sender"] }))
        .collect();
    out.push(strip(invite));
    out
}

fn strip(pdu: &Pdu) -> Value {
    json!({ "type": pdu.event_type(), "state_key": pdu.state_key, "content": pdu.content_value(), "sender": pdu.sender })
}

fn record_invite(
    conn: &mut DbConnection,
    user: &str,
    room: &str,
    event_id: &str,
    position: i64,
    stripped: &[Value],
) -> Result<(), RoomError> {
    let state = serde_json::to_string(stripped).expect("JSON serialises");
    diesel::delete(invites::table.find((user, room))).execute(conn)?;
    diesel::insert_into(invites::table)
        .values((
            invites::user_id.eq(user),
            invites::room_id.eq(room),
            invites::event_id.eq(event_id),
            invites::stream_pos.eq(position),
            invites::invite_state.eq(state),
        ))
        .execute(conn)?;
    Ok(())
}

/// Forgets a user's invite to a room once they joined it (JN-6 calls it in the join's
/// transaction).
pub fn forget(conn: &mut DbConnection, user: &str, room: &str) -> Result<(), RoomError> {
    diesel::delete(invites::table.find((user, room))).execute(conn)?;
    Ok(())
}

/// The rooms `user` is invited to with an invite after `since` (all pending ones when `None`)
/// up to `now`, with what `rooms.invite` shows: invites to rooms we are not in (stored above)
/// and invites in rooms we are in (`memberships`: the user's, from the rooms' current state).
pub async fn for_sync(
    rooms: &Rooms,
    db: &crate::db::Db,
    user: &UserId,
    memberships: &[(String, String, i64)],
    since: Option<i64>,
    now: i64,
) -> Result<serde_json::Map<String, Value>, RoomError> {
    let in_window = |pos: i64| since.is_none_or(|since| pos > since) && pos <= now;
    let mut out = serde_json::Map::new();
    for (room, membership, pos) in memberships {
        if membership == "invite" && in_window(*pos) {
            let room_id = RoomId::parse(room).map_err(|e| RoomError::Internal(e.to_string()))?;
            out.insert(
                room.clone(),
                json!({ "invite_state": { "events": current_stripped(rooms, &room_id, user).await? } }),
            );
        }
    }
    let user_id = user.to_string();
    let pending: Vec<(String, i64, String)> = db
        .run::<_, RoomError, _>(move |conn| {
            Ok(invites::table
                .filter(invites::user_id.eq(&user_id))
                .select((invites::room_id, invites::stream_pos, invites::invite_state))
                .load(conn)?)
        })
        .await?;
    for (room, pos, state) in pending {
        // A membership in the room's state (joined since, or left) supersedes the invite.
        if memberships.iter().any(|(r, m, _)| *r == room && m != "invite") || !in_window(pos) {
            continue;
        }
        let events: Value = serde_json::from_str(&state).unwrap_or_else(|_| json!([]));
        out.insert(room, json!({ "invite_state": { "events": events } }));
    }
    Ok(out)
}

/// Stripped state of a room we hold, for an invite in it: the usual types and the invite.
async fn current_stripped(rooms: &Rooms, room_id: &RoomId, user: &UserId) -> Result<Vec<Value>, RoomError> {
    let state = rooms.current_state(room_id).await?;
    Ok(state
        .iter()
        .filter(|e| {
            STRIPPED_TYPES.contains(&e.event_type().as_str())
                || (e.event_type() == "m.room.member" && e.state_key.as_deref() == Some(user.as_str()))
        })
        .map(strip)
        .collect())
}

/// `POST /rooms/{roomId}/invite`: a user of ours is invited by an event of ours, appended; a
/// user of another server through [`invite_remote`].
pub async fn invite(
    rooms: &Rooms,
    keys: &RemoteKeys,
    federation: &crate::federation::client::FederationClient,
    room_id: &RoomId,
    inviter: &UserId,
    invitee: &UserId,
) -> Result<(), MembershipError> {
    if invitee.server_name() == rooms.server_name() {
        let content = json!({ "membership": "invite" });
        rooms.send(room_id, inviter, "m.room.member", Some(invitee.as_str()), content).await?;
        return Ok(());
    }
    invite_remote(rooms, keys, federation, room_id, inviter, invitee).await
}

/// `/rooms/{roomId}/invite` of another server's user (JN-7): our invite event goes to the
/// invitee's server first (`PUT /v2/invite` with the stripped state), must come back with its
/// signature and otherwise unchanged, and is then appended and sent to the servers in the room.
pub async fn invite_remote(
    rooms: &Rooms,
    keys: &RemoteKeys,
    federation: &crate::federation::client::FederationClient,
    room_id: &RoomId,
    inviter: &UserId,
    invitee: &UserId,
) -> Result<(), MembershipError> {
    let content = json!({ "membership": "invite" });
    let (version, pdu) =
        rooms.prepare_event(room_id, inviter, "m.room.member", Some(invitee.as_str()), content).await?;
    let invite_room_state = current_stripped(rooms, room_id, inviter).await?;
    let body = json!({ "event": pdu.federation_json(), "room_version": version.as_str(), "invite_room_state": invite_room_state });
    let path = format!(
        "/_matrix/federation/v2/invite/{}/{}",
        crate::ids::path_segment(room_id.as_str()),
        crate::ids::path_segment(pdu.event_id.as_str())
    );
    let server = invitee.server_name();
    let request =
        FedRequest { method: reqwest::Method::PUT, destination: server, path: &path, body: Some(body), signed: true };
    let answer = federation.send(request).await.map_err(|e| match e.status() {
        Some(403) => MembershipError::Forbidden(format!("{server} refused the invite: {e}")),
        _ => MembershipError::JoinFailed(format!("{server} did not take the invite: {e}")),
    })?;
    let returned =
        answer.get("event").cloned().ok_or_else(|| MembershipError::JoinFailed("no event in the answer".into()))?;
    let returned = intake::check_raw(keys, room_id, version, returned, Hashes::Strict)
        .await
        .map_err(|e| MembershipError::JoinFailed(format!("the returned invite: {e}")))?;
    if returned.event_id != pdu.event_id || !signed_by(&returned, server) {
        return Err(MembershipError::JoinFailed(format!("{server} returned another event or did not sign it")));
    }
    rooms.append_remote(room_id, returned).await?;
    Ok(())
}

fn signed_by(pdu: &Pdu, server: &ServerName) -> bool {
    matches!(pdu.json.get("signatures"), Some(CanonicalJsonValue::Object(s)) if s.contains_key(server.as_str()))
}

/// The server of the user who invited `user` to a room we are not in (from the stored invite).
pub async fn inviting_server(
    state: &crate::peeks::outbound::OutboundPeeks,
    user: &UserId,
    room_id: &RoomId,
) -> Result<Option<String>, RoomError> {
    let (user, room) = (user.to_string(), room_id.to_string());
    let event_id: Option<String> = state
        .db
        .run::<_, RoomError, _>(move |conn| {
            Ok(invites::table.find((&user, &room)).select(invites::event_id).first(conn).optional()?)
        })
        .await?;
    let Some(event_id) = event_id else { return Ok(None) };
    Ok(state.rooms.event(&event_id).await?.map(|e| e.pdu.sender.server_name().to_string()))
}

/// Forgets `user`'s invite to a room (declined, JN-7).
pub async fn forget_invite(
    state: &crate::peeks::outbound::OutboundPeeks,
    user: &UserId,
    room_id: &RoomId,
) -> Result<(), RoomError> {
    let (user, room) = (user.to_string(), room_id.to_string());
    state.db.run::<_, RoomError, _>(move |conn| forget(conn, &user, &room)).await
}
