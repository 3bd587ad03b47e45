//! One of our users joins a room of another server (JN-6): `make_join` through the candidate
//! servers in OP-1 order, our copy of the template hashed and signed, `send_join`, and the
//! answer validated like a peek answer (every event's signatures and strict hashes, one create
//! event, the auth rules over the state and auth chain) and our join checked against it, all
//! before anything is stored. Then, in one transaction: the state after the join becomes the
//! room's current state, the servers with joined members become destinations of our events
//! (JN-10), and the user's device peeks of the room end (CP-10). A candidate that fails is
//! logged and the next one tried; nothing is half-stored.

use ruma::{RoomId, ServerName, UserId};
use serde_json::Value;

use super::MembershipError;
use crate::events::{Pdu, RoomVersion};
use crate::federation::client::{FedRequest, FederationError};
use crate::peeks::outbound::validate::{self, InvalidPeek};
use crate::peeks::outbound::OutboundPeeks;
use crate::rooms::RoomError;

/// Candidate servers tried per join, at most.
pub const MAX_JOIN_CANDIDATES: usize = 10;

/// Why one candidate could not join us.
#[derive(Debug, thiserror::Error)]
pub enum JoinAttemptError {
    #[error("{0}")]
    Federation(#[from] FederationError),
    #[error("room version {0:?} is not supported")]
    UnsupportedVersion(String),
    #[error("the template is not a join of this user to this room: {0}")]
    BadTemplate(String),
    #[error("invalid send_join answer: {0}")]
    InvalidAnswer(#[from] InvalidPeek),
    #[error(transparent)]
    Room(#[from] RoomError),
}

impl JoinAttemptError {
    /// The remote server refused the join itself (not a failure to reach or understand it).
    pub fn refused(&self) -> bool {
        matches!(self, JoinAttemptError::Federation(FederationError::Status { status: 403, .. }))
    }
}

/// Joins `user` to `room_id` through the first candidate that succeeds; the error tells the
/// client what the last candidate said.
pub async fn join(
    state: &OutboundPeeks,
    user: &UserId,
    room_id: &RoomId,
    candidates: &[String],
) -> Result<(), MembershipError> {
    let mut last = None;
    for server in servers(candidates) {
        match join_via(state, server, user, room_id).await {
            Ok(()) => {
                tracing::info!(room = %room_id, user = %user, via = %server, "joined a room of another server");
                return Ok(());
            }
            Err(e) => last = Some(failed(room_id, user, server, "join", e)),
        }
    }
    Err(match last {
        None => MembershipError::NoJoinServer,
        Some(e) if e.refused() => MembershipError::Forbidden(format!("the room's server refused the join: {e}")),
        Some(e) => MembershipError::JoinFailed(e.to_string()),
    })
}

async fn join_via(
    state: &OutboundPeeks,
    server: &ServerName,
    user: &UserId,
    room_id: &RoomId,
) -> Result<(), JoinAttemptError> {
    let versions: String = RoomVersion::SUPPORTED.iter().map(|v| format!("&ver={}", v.as_str())).collect();
    let path = format!(
        "/_matrix/federation/v1/make_join/{}/{}?{}",
        crate::ids::path_segment(room_id.as_str()),
        crate::ids::path_segment(user.as_str()),
        &versions[1..]
    );
    let (version, join) = our_copy_of_template(state, server, &path).await?;
    check_template(&join, user, room_id)?;
    let path = format!(
        "/_matrix/federation/v2/send_join/{}/{}",
        crate::ids::path_segment(room_id.as_str()),
        crate::ids::path_segment(join.event_id.as_str())
    );
    let request = FedRequest {
        method: reqwest::Method::PUT,
        destination: server,
        path: &path,
        body: Some(join.federation_json()),
        signed: true,
    };
    let answer = state.federation.send(request).await?;
    let valid = validate::validate_state(&state.keys, room_id, version, &answer).await?;
    let state_after = validate::check_join_against(version, &join, &valid)?;
    let outliers: Vec<Pdu> = valid.all.into_values().collect();
    let our_server = state.settings.server_name.to_string();
    let record = move |conn: &mut crate::db::DbConnection, join: &Pdu, position: i64| {
        crate::membership::spans::open_for_current_members(conn, &our_server, join.room_id.as_str(), position)?;
        crate::membership::invites::forget(conn, join.sender.as_str(), join.room_id.as_str())?;
        crate::peeks::devices::after_state_event(conn, &our_server, join, position)
    };
    state.rooms.store_snapshot_then(room_id, version, state_after, outliers, join, Vec::new(), record).await?;
    Ok(())
}

/// The template must be this user's join to this room: anything else would sign something the
/// user did not ask for.
fn check_template(join: &Pdu, user: &UserId, room_id: &RoomId) -> Result<(), JoinAttemptError> {
    let problem = if join.room_id != room_id {
        Some("another room")
    } else if join.event_type() != "m.room.member" {
        Some("not a member event")
    } else if join.sender != user || join.state_key.as_deref() != Some(user.as_str()) {
        Some("another user")
    } else if join.content_value()["membership"] != "join" {
        Some("not a join")
    } else {
        None
    };
    problem.map_or(Ok(()), |p| Err(JoinAttemptError::BadTemplate(p.into())))
}

/// A client's join (`/join/{roomIdOrAlias}`, `/rooms/{roomId}/join`): in a room we host, or one
/// of our users is already in, the join is our own event appended like any other (and sent to
/// the servers in the room); otherwise a federated join through `candidates`.
pub async fn join_room(
    state: &OutboundPeeks,
    user: &UserId,
    room_id: &RoomId,
    candidates: &[String],
) -> Result<(), MembershipError> {
    let resident = match state.rooms.room(room_id).await? {
        Some(row) if row.is_local => true,
        Some(_) => state.rooms.server_is_joined(room_id, &state.settings.server_name).await?,
        None => false,
    };
    if resident {
        let content = serde_json::json!({ "membership": "join" });
        state.rooms.send(room_id, user, "m.room.member", Some(user.as_str()), content).await?;
        return Ok(());
    }
    join(state, user, room_id, candidates).await
}

/// A client's `/rooms/{roomId}/leave`: in a room we host or one of our users is in, our own leave
/// event, appended and sent to the servers in the room; otherwise (an invite to a room we are
/// not in is declined, JN-7) `make_leave`/`send_leave` through the inviting server and the room
/// ID's server, and the invite is forgotten.
pub async fn leave_room(state: &OutboundPeeks, user: &UserId, room_id: &RoomId) -> Result<(), MembershipError> {
    let row = state.rooms.room(room_id).await?.ok_or(MembershipError::UnknownRoom)?;
    let resident = row.is_local || state.rooms.server_is_joined(room_id, &state.settings.server_name).await?;
    if resident {
        let content = serde_json::json!({ "membership": "leave" });
        state.rooms.send(room_id, user, "m.room.member", Some(user.as_str()), content).await?;
        return Ok(());
    }
    let inviter = super::invites::inviting_server(state, user, room_id).await?;
    let candidates: Vec<String> = inviter.into_iter().chain(room_id.server_name().map(|s| s.to_string())).collect();
    let mut last = None;
    for server in servers(&candidates) {
        match leave_via(state, server, user, room_id).await {
            Ok(()) => {
                super::invites::forget_invite(state, user, room_id).await?;
                tracing::info!(room = %room_id, user = %user, via = %server, "declined an invite");
                return Ok(());
            }
            Err(e) => last = Some(failed(room_id, user, server, "leave", e)),
        }
    }
    Err(match last {
        None => MembershipError::NoJoinServer,
        Some(e) => MembershipError::JoinFailed(format!("the leave could not be sent: {e}")),
    })
}

async fn leave_via(
    state: &OutboundPeeks,
    server: &ServerName,
    user: &UserId,
    room_id: &RoomId,
) -> Result<(), JoinAttemptError> {
    let path = format!(
        "/_matrix/federation/v1/make_leave/{}/{}",
        crate::ids::path_segment(room_id.as_str()),
        crate::ids::path_segment(user.as_str())
    );
    let (_, leave) = our_copy_of_template(state, server, &path).await?;
    if leave.room_id != room_id
        || leave.sender != user
        || leave.state_key.as_deref() != Some(user.as_str())
        || leave.event_type() != "m.room.member"
        || leave.content_value()["membership"] != "leave"
    {
        return Err(JoinAttemptError::BadTemplate("not a leave of this user from this room".into()));
    }
    let path = format!(
        "/_matrix/federation/v2/send_leave/{}/{}",
        crate::ids::path_segment(room_id.as_str()),
        crate::ids::path_segment(leave.event_id.as_str())
    );
    let request = FedRequest {
        method: reqwest::Method::PUT,
        destination: server,
        path: &path,
        body: Some(leave.federation_json()),
        signed: true,
    };
    state.federation.send(request).await?;
    Ok(())
}

/// The first [`MAX_JOIN_CANDIDATES`] candidates that are server names.
fn servers(candidates: &[String]) -> impl Iterator<Item = &ServerName> {
    candidates.iter().take(MAX_JOIN_CANDIDATES).filter_map(|c| <&ServerName>::try_from(c.as_str()).ok())
}

/// Logs a candidate's failure (the next one is tried) and returns it.
fn failed(room_id: &RoomId, user: &UserId, server: &ServerName, what: &str, e: JoinAttemptError) -> JoinAttemptError {
    tracing::warn!(room = %room_id, user = %user, via = %server, error = %e, "{what} through a candidate failed");
    e
}

/// `make_join`/`make_leave` at `server` (`path`): the room version and our signed copy of the
/// template (the caller checks it is what it asked for).
async fn our_copy_of_template(
    state: &OutboundPeeks,
    server: &ServerName,
    path: &str,
) -> Result<(RoomVersion, Pdu), JoinAttemptError> {
    let made = state.federation.get(server, path).await?;
    let raw_version = made.get("room_version").and_then(Value::as_str).unwrap_or("1");
    let version =
        RoomVersion::parse(raw_version).ok_or_else(|| JoinAttemptError::UnsupportedVersion(raw_version.to_owned()))?;
    let template =
        made.get("event").and_then(Value::as_object).ok_or_else(|| JoinAttemptError::BadTemplate("no event".into()))?;
    Ok((version, state.rooms.complete_template(template, version)?))
}
