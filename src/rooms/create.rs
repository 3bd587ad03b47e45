//! `createRoom`: the initial events of a new room, in the order the client-server spec gives,
//! all appended through the normal append path inside one transaction.

use diesel::prelude::*;
use ruma::{RoomId, ServerName, UserId};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::RoomError;
use super::hooks::AppendHooks;
use super::store;
use crate::clock::now_ms;
use crate::db::schema::room_aliases;
use crate::db::DbConnection;
use crate::events::{EventDraft, Pdu, RoomVersion};
use crate::keys::SigningKey;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct CreateRoomRequest {
    pub preset: Option<String>,
    pub visibility: Option<String>,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub room_alias_name: Option<String>,
    #[serde(default)]
    pub initial_state: Vec<InitialStateEvent>,
    pub room_version: Option<String>,
    pub creation_content: Option<serde_json::Map<String, Value>>,
    pub power_level_content_override: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InitialStateEvent {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub state_key: String,
    pub content: Value,
}

/// The validated plan: version, alias and the state events to create, in order.
pub struct Plan {
    version: RoomVersion,
    alias: Option<String>,
    events: Vec<(String, String, Value)>,
}

pub fn plan(
    server_name: &ServerName,
    creator: &UserId,
    _room_id: &RoomId,
    request: CreateRoomRequest,
) -> Result<Plan, RoomError> {
    let version = match request.room_version.as_deref() {
        None => RoomVersion::V10,
        Some(v) => RoomVersion::parse(v).ok_or_else(|| RoomError::UnsupportedVersion(v.to_owned()))?,
    };
    let alias = match &request.room_alias_name {
        Some(name) => {
            let alias = format!("#{name}:{server_name}");
            if name.is_empty() || name.contains(':') || name.chars().any(char::is_whitespace) {
                return Err(RoomError::InvalidParam(format!("invalid room_alias_name {name:?}")));
            }
            crate::ids::room_alias(&alias).map_err(|e| RoomError::InvalidParam(format!("room_alias_name: {e}")))?;
            Some(alias)
        }
        None => None,
    };
    let preset = match (request.preset.as_deref(), request.visibility.as_deref()) {
        (Some(p), _) => p.to_owned(),
        (None, Some("public")) => "public_chat".to_owned(),
        (None, _) => "private_chat".to_owned(),
    };
    let (join_rule, guest_access) = match preset.as_str() {
        "public_chat" => ("public", None),
        "private_chat" | "trusted_private_chat" => ("invite", Some("can_join")),
        other => return Err(RoomError::InvalidParam(format!("unknown preset {other:?}"))),
    };

    let mut create = request.creation_content.unwrap_or_default();
    create.insert("room_version".into(), Value::from(version.as_str()));
    if version == RoomVersion::V10 {
        create.insert("creator".into(), Value::from(creator.as_str()));
    }
    let mut power_levels = json!({
        "users": { creator.as_str(): 100 },
        "users_default": 0,
        "events": {
            "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
            "m.room.server_acl": 100, "m.room.encryption": 100
        },
        "events_default": 0, "state_default": 50, "ban": 50, "kick": 50, "redact": 50, "invite": 0,
    });
    if version.room_id_is_create_hash() {
        // v12: the creator has unlimited power from the create event and is not listed.
        power_levels["users"] = json!({});
    }
    if let Some(overrides) = request.power_level_content_override {
        for (k, v) in overrides {
            power_levels[k] = v;
        }
    }

    let mut events = vec![
        ("m.room.create".to_owned(), String::new(), Value::Object(create)),
        ("m.room.member".to_owned(), creator.to_string(), json!({ "membership": "join" })),
        ("m.room.power_levels".to_owned(), String::new(), power_levels),
    ];
    if let Some(alias) = &alias {
        events.push(("m.room.canonical_alias".into(), String::new(), json!({ "alias": alias })));
    }
    events.push(("m.room.join_rules".into(), String::new(), json!({ "join_rule": join_rule })));
    events.push(("m.room.history_visibility".into(), String::new(), json!({ "history_visibility": "shared" })));
    if let Some(access) = guest_access {
        events.push(("m.room.guest_access".into(), String::new(), json!({ "guest_access": access })));
    }
    for event in request.initial_state {
        if !event.content.is_object() {
            return Err(RoomError::InvalidParam(format!("initial_state {}: content must be an object", event.kind)));
        }
        if event.kind == "m.room.create" || event.kind == "m.room.member" {
            return Err(RoomError::InvalidParam(format!("initial_state may not contain {}", event.kind)));
        }
        events.push((event.kind, event.state_key, event.content));
    }
    if let Some(name) = request.name {
        events.push(("m.room.name".into(), String::new(), json!({ "name": name })));
    }
    if let Some(topic) = request.topic {
        events.push(("m.room.topic".into(), String::new(), json!({ "topic": topic })));
    }
    Ok(Plan { version, alias, events })
}

impl Plan {
    pub fn version(&self) -> RoomVersion {
        self.version
    }
}

/// Room version 12: the create event is built (and signed) before anything is stored, as its
/// reference hash is the room's ID. `provisional` only fills the draft; it is not in the event.
pub fn build_create(
    key: &SigningKey,
    server_name: &ServerName,
    creator: &UserId,
    provisional: &RoomId,
    plan: &Plan,
) -> Result<Pdu, RoomError> {
    let (kind, _, content) = plan.events.first().ok_or_else(|| RoomError::Internal("no create event".into()))?;
    let draft = EventDraft {
        room_id: provisional.to_owned(),
        sender: creator.to_owned(),
        kind: kind.clone(),
        state_key: Some(String::new()),
        content: content.clone(),
        prev_events: Vec::new(),
        auth_events: Vec::new(),
        depth: 1,
        origin_server_ts: now_ms(),
    };
    crate::events::build(key, server_name.as_str(), plan.version, draft).map_err(|e| RoomError::BadEvent(e.to_string()))
}

/// Runs inside a transaction: the room row, the alias, then every event via the append path
/// (`create`: the create event built beforehand, room version 12). Returns the stream position
/// of the last event.
pub fn execute(
    conn: &mut DbConnection,
    key: &SigningKey,
    hooks: &AppendHooks,
    room_id: &RoomId,
    creator: &UserId,
    plan: Plan,
    mut create: Option<Pdu>,
) -> Result<i64, RoomError> {
    if let Some(alias) = &plan.alias {
        let taken: i64 = room_aliases::table.filter(room_aliases::alias.eq(alias)).count().get_result(conn)?;
        if taken > 0 {
            return Err(RoomError::AliasInUse);
        }
    }
    store::insert_room(conn, room_id.as_str(), plan.version, true, now_ms())?;
    if let Some(alias) = &plan.alias {
        diesel::insert_into(room_aliases::table)
            .values((
                room_aliases::alias.eq(alias),
                room_aliases::room_id.eq(room_id.as_str()),
                room_aliases::creator.eq(creator.as_str()),
            ))
            .execute(conn)?;
    }
    let mut last = 0;
    for (kind, state_key, content) in plan.events {
        let room = store::lock_for_append(conn, room_id.as_str())?;
        if let Some(create) = create.take() {
            last = store::append_prepared(conn, hooks, &room, &create)?.stream_pos;
            continue;
        }
        let draft = EventDraft {
            room_id: room_id.to_owned(),
            sender: creator.to_owned(),
            kind,
            state_key: Some(state_key),
            content,
            prev_events: Vec::new(),
            auth_events: Vec::new(),
            depth: 0,
            origin_server_ts: now_ms(),
        };
        last = store::append_local(conn, key, hooks, &room, draft)?.stream_pos;
    }
    Ok(last)
}
