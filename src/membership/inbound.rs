//! Another server's user joins or leaves one of our rooms (JN-1, JN-2, JN-4). `make_*` answers
//! a template built at the end of the room and checked against the auth rules; `send_*` takes
//! the signed event through the one intake path for remote PDUs and the one append path, so it
//! is authorised against its auth events and the current state, stored, and sent on like any
//! event. A refused event leaves nothing stored.

use ruma::events::room::server_acl::RoomServerAclEventContent;
use ruma::{CanonicalJsonObject, CanonicalJsonValue, RoomId, ServerName, UserId};
use serde_json::{json, Value};

use crate::events::intake::{self, Hashes, IntakeError};
use crate::events::{EventError, RoomVersion};
use crate::keys::RemoteKeys;
use crate::rooms::{RoomError, Rooms, StoredEvent};

/// The membership a `make_*`/`send_*` pair is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    Join,
    Leave,
}

impl Membership {
    pub fn as_str(self) -> &'static str {
        match self {
            Membership::Join => "join",
            Membership::Leave => "leave",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("unknown room")]
    UnknownRoom,
    /// The room's version, which the joining server did not offer.
    #[error("room version {0} was not offered")]
    IncompatibleVersion(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("bad event: {0}")]
    BadEvent(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// JN-6: no candidate server to join a room of another server through.
    #[error("no server to join the room through")]
    NoJoinServer,
    /// JN-6: every candidate failed; the last one's failure.
    #[error("no server could join you to the room: {0}")]
    JoinFailed(String),
    #[error(transparent)]
    Room(RoomError),
}

impl From<RoomError> for MembershipError {
    fn from(e: RoomError) -> Self {
        match e {
            RoomError::NotFound => MembershipError::UnknownRoom,
            RoomError::Forbidden(reason) => MembershipError::Forbidden(reason),
            RoomError::BadEvent(reason) => MembershipError::BadEvent(reason),
            RoomError::MissingPrevEvents(ids) => MembershipError::BadEvent(format!(
                "prev_events {ids:?} are unknown here; build the event from a fresh make_* template"
            )),
            other => MembershipError::Room(other),
        }
    }
}

/// `make_join`/`make_leave`: `{room_version, event}` for `user_id`, who must be `origin`'s.
/// `offered` is the `ver` query list (`make_join` only; none means `["1"]`, as the spec says).
pub async fn make(
    rooms: &Rooms,
    origin: &ServerName,
    room_id: &RoomId,
    user_id: &str,
    membership: Membership,
    offered: &[String],
) -> Result<Value, MembershipError> {
    let user = UserId::parse(user_id).map_err(|e| MembershipError::BadEvent(format!("user ID {user_id:?}: {e}")))?;
    if user.server_name() != origin {
        return Err(MembershipError::Forbidden(format!("{user} is not a user of {origin}")));
    }
    let version = hosted_room_version(rooms, room_id).await?;
    if membership == Membership::Join {
        let offered_default = ["1".to_owned()];
        let offered = if offered.is_empty() { &offered_default[..] } else { offered };
        if !offered.iter().any(|v| v == version.as_str()) {
            return Err(MembershipError::IncompatibleVersion(version.as_str().to_owned()));
        }
    }
    check_acl(rooms, room_id, origin).await?;
    let template = rooms.membership_template(room_id, &user, membership.as_str(), origin).await;
    if membership == Membership::Join && matches!(template, Err(RoomError::Forbidden(_))) {
        refuse_restricted(rooms, room_id).await?;
    }
    let (version, event) = template?;
    Ok(json!({ "room_version": version.as_str(), "event": event }))
}

/// `send_join`/`send_leave`: checks and appends the signed event. A join is answered with the
/// state before it and the auth chain of that state and the join (JN-2); a leave with `{}`.
/// A retried request for an event already stored gets the same answer.
pub async fn send(
    rooms: &Rooms,
    keys: &RemoteKeys,
    origin: &ServerName,
    room_id: &RoomId,
    event_id: &str,
    body: Value,
    membership: Membership,
) -> Result<Value, MembershipError> {
    let version = hosted_room_version(rooms, room_id).await?;
    let object = intake::parse(body).map_err(|e| MembershipError::BadEvent(e.to_string()))?;
    let computed = intake::event_id(&object, version);
    if computed != event_id {
        return Err(MembershipError::BadEvent(format!("the event's ID is {computed:?}, not {event_id:?}")));
    }
    check_shape(&object, origin, room_id, membership)?;
    check_acl(rooms, room_id, origin).await?;
    // A join or leave is the member's own act: refuse altered content instead of keeping a
    // redacted form, which would be a different membership.
    let pdu = intake::check(keys, room_id, version, object, Hashes::Strict).await.map_err(refused)?;
    rooms.append_remote(room_id, pdu).await?;
    tracing::info!(origin = %origin, room = %room_id, event_id, membership = membership.as_str(), "remote membership stored");
    match membership {
        Membership::Leave => Ok(json!({})),
        Membership::Join => join_answer(rooms, event_id).await,
    }
}

/// JN-3: a join the rules refuse in a `restricted` room would need one of our members to
/// authorise it (`join_authorised_via_users_server`), which peekgate does not do yet: say so.
async fn refuse_restricted(rooms: &Rooms, room_id: &RoomId) -> Result<(), MembershipError> {
    let rules = rooms.state_event(room_id, "m.room.join_rules", "").await?;
    let rule = rules.map(|e| e.content_value()["join_rule"].as_str().unwrap_or_default().to_owned());
    if matches!(rule.as_deref(), Some("restricted" | "knock_restricted")) {
        return Err(MembershipError::Forbidden(
            "This room's joins are restricted to members of other rooms; this server does not authorise \
             restricted joins yet: ask for an invite"
                .into(),
        ));
    }
    Ok(())
}

/// The room must be one we host (a room we only peek is another server's to join).
async fn hosted_room_version(rooms: &Rooms, room_id: &RoomId) -> Result<RoomVersion, MembershipError> {
    match rooms.room(room_id).await? {
        Some(row) if row.is_local => Ok(row.version),
        _ => Err(MembershipError::UnknownRoom),
    }
}

/// The room's server ACL must allow the requesting server.
async fn check_acl(rooms: &Rooms, room_id: &RoomId, origin: &ServerName) -> Result<(), MembershipError> {
    let acl = rooms.state_event(room_id, "m.room.server_acl", "").await?;
    let acl: Option<RoomServerAclEventContent> = acl.and_then(|e| serde_json::from_value(e.content_value()).ok());
    if acl.is_some_and(|acl| !acl.is_allowed(origin)) {
        return Err(MembershipError::Forbidden(format!("the room's server ACL forbids {origin}")));
    }
    Ok(())
}

/// Cheap checks before any signature: a member event of `origin`'s user about themselves, with
/// the membership the endpoint is for, in this room.
fn check_shape(
    object: &CanonicalJsonObject,
    origin: &ServerName,
    room_id: &RoomId,
    membership: Membership,
) -> Result<(), MembershipError> {
    let text = |key: &str| match object.get(key) {
        Some(CanonicalJsonValue::String(s)) => Some(s.as_str()),
        _ => None,
    };
    if text("type") != Some("m.room.member") {
        return Err(MembershipError::BadEvent("not an m.room.member event".into()));
    }
    if text("room_id") != Some(room_id.as_str()) {
        return Err(MembershipError::BadEvent("room_id is not the room of the request".into()));
    }
    let sender = text("sender").unwrap_or_default();
    if text("state_key") != Some(sender) {
        return Err(MembershipError::BadEvent("state_key must be the sender".into()));
    }
    let user = UserId::parse(sender).map_err(|e| MembershipError::BadEvent(format!("sender: {e}")))?;
    if user.server_name() != origin {
        return Err(MembershipError::Forbidden(format!("{user} is not a user of {origin}")));
    }
    let claimed = match object.get("content") {
        Some(CanonicalJsonValue::Object(content)) => match content.get("membership") {
            Some(CanonicalJsonValue::String(m)) => m.as_str(),
            _ => "",
        },
        _ => "",
    };
    if claimed != membership.as_str() {
        return Err(MembershipError::BadEvent(format!("membership is {claimed:?}, not {:?}", membership.as_str())));
    }
    Ok(())
}

/// Intake failures: a bad signature is a refusal (403), anything else a bad event (400).
pub(super) fn refused(e: IntakeError) -> MembershipError {
    match e {
        IntakeError::Event(EventError::Signature(reason)) => MembershipError::Forbidden(format!("signature: {reason}")),
        other => MembershipError::BadEvent(other.to_string()),
    }
}

/// JN-2's answer: the state before the join, and the auth chain of that state and the join.
async fn join_answer(rooms: &Rooms, event_id: &str) -> Result<Value, MembershipError> {
    let stored: StoredEvent = rooms.event(event_id).await?.ok_or(RoomError::EventNotFound)?;
    let state = match stored.state_group_before {
        Some(group) => rooms.state_of_group(group).await?,
        None => Vec::new(),
    };
    let mut chain_of: Vec<String> = state.iter().map(|e| e.event_id.to_string()).collect();
    chain_of.push(event_id.to_owned());
    let auth_chain = rooms.auth_chain(chain_of).await?;
    Ok(json!({
        "origin": rooms.server_name().as_str(),
        "state": state.iter().map(|e| e.federation_json()).collect::<Vec<_>>(),
        "auth_chain": auth_chain.iter().map(|e| e.federation_json()).collect::<Vec<_>>(),
        "event": stored.pdu.federation_json(),
        "members_omitted": false,
    }))
}
