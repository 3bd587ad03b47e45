//! A PDU as peekgate holds it: the signed federation JSON (the source of truth) plus the
//! fields the auth rules and the room store read, parsed once and validated by ruma's types.

use ruma::events::TimelineEventType;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId,
    OwnedUserId, RoomId, UInt, UserId,
};
use serde_json::value::RawValue as RawJsonValue;
use serde_json::Value;

use super::version::{EventError, RoomVersion};

#[derive(Debug, Clone)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub kind: TimelineEventType,
    pub content: Box<RawJsonValue>,
    pub state_key: Option<String>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub redacts: Option<OwnedEventId>,
    pub depth: i64,
    pub rejected: bool,
    /// The PDU exactly as it travels over federation (no `event_id` in v10/v11).
    pub json: CanonicalJsonObject,
}

fn field<'a>(json: &'a CanonicalJsonObject, name: &str) -> Result<&'a CanonicalJsonValue, EventError> {
    json.get(name).ok_or_else(|| EventError::Malformed(format!("missing {name}")))
}

fn string<'a>(json: &'a CanonicalJsonObject, name: &str) -> Result<&'a str, EventError> {
    match field(json, name)? {
        CanonicalJsonValue::String(s) => Ok(s),
        _ => Err(EventError::Malformed(format!("{name} is not a string"))),
    }
}

fn event_ids(json: &CanonicalJsonObject, name: &str) -> Result<Vec<OwnedEventId>, EventError> {
    match field(json, name)? {
        CanonicalJsonValue::Array(items) => items
            .iter()
            .map(|item| match item {
                CanonicalJsonValue::String(s) => {
                    EventId::parse(s).map_err(|e| EventError::Malformed(format!("{name}: {e}")))
                }
                _ => Err(EventError::Malformed(format!("{name} holds a non-string"))),
            })
            .collect(),
        _ => Err(EventError::Malformed(format!("{name} is not an array"))),
    }
}

impl Pdu {
    /// Parses a federation PDU of `version`, computing its event ID from the reference hash.
    pub fn from_federation(mut json: CanonicalJsonObject, version: RoomVersion) -> Result<Pdu, EventError> {
        // The event ID is derived, never taken from the sender (v3+).
        json.remove("event_id");
        let rules = version.rules();
        ruma::state_res::check_pdu_format(&json, &rules.event_format).map_err(EventError::Malformed)?;
        let hash = ruma::signatures::reference_hash(&json, &rules).map_err(|e| EventError::Malformed(e.to_string()))?;
        let event_id = EventId::parse(format!("${hash}")).map_err(|e| EventError::Malformed(e.to_string()))?;
        Pdu::parse_fields(event_id, json, version)
    }

    /// Rebuilds a PDU we stored ourselves after checking it: the stored event ID is trusted,
    /// so the reference hash is not recomputed on every read.
    pub fn from_stored(event_id: &str, json: CanonicalJsonObject, version: RoomVersion) -> Result<Pdu, EventError> {
        let event_id = EventId::parse(event_id).map_err(|e| EventError::Malformed(e.to_string()))?;
        Pdu::parse_fields(event_id, json, version)
    }

    fn parse_fields(
        event_id: OwnedEventId,
        json: CanonicalJsonObject,
        version: RoomVersion,
    ) -> Result<Pdu, EventError> {
        let room_id = match json.get("room_id") {
            // v12: the create event names no room; the room's ID is derived from its own.
            None if version.room_id_is_create_hash() && string(&json, "type")? == "m.room.create" => {
                create_room_id(&event_id)?
            }
            _ => {
                RoomId::parse(string(&json, "room_id")?).map_err(|e| EventError::Malformed(format!("room_id: {e}")))?
            }
        };
        let sender =
            UserId::parse(string(&json, "sender")?).map_err(|e| EventError::Malformed(format!("sender: {e}")))?;
        let origin_server_ts = match field(&json, "origin_server_ts")? {
            CanonicalJsonValue::Integer(ts) => {
                UInt::try_from(i64::from(*ts)).map_err(|_| EventError::Malformed("negative origin_server_ts".into()))?
            }
            _ => return Err(EventError::Malformed("origin_server_ts is not an integer".into())),
        };
        let depth = match field(&json, "depth")? {
            CanonicalJsonValue::Integer(d) if i64::from(*d) >= 0 => i64::from(*d),
            _ => return Err(EventError::Malformed("depth is not a non-negative integer".into())),
        };
        let content_value = match field(&json, "content")? {
            CanonicalJsonValue::Object(_) => serde_json::to_string(&json["content"]).expect("serialises"),
            _ => return Err(EventError::Malformed("content is not an object".into())),
        };
        let content = RawJsonValue::from_string(content_value).expect("valid JSON");
        let state_key = match json.get("state_key") {
            None => None,
            Some(CanonicalJsonValue::String(s)) => Some(s.clone()),
            Some(_) => return Err(EventError::Malformed("state_key is not a string".into())),
        };
        let kind = TimelineEventType::from(string(&json, "type")?);
        let redacts = redacts(&json, version)?;
        Ok(Pdu {
            event_id,
            room_id,
            sender,
            origin_server_ts: MilliSecondsSinceUnixEpoch(origin_server_ts),
            kind,
            content,
            state_key,
            prev_events: event_ids(&json, "prev_events")?,
            auth_events: event_ids(&json, "auth_events")?,
            redacts,
            depth,
            rejected: false,
            json,
        })
    }

    pub fn event_type(&self) -> String {
        self.kind.to_string()
    }

    pub fn is_state(&self) -> bool {
        self.state_key.is_some()
    }

    /// The content as a JSON value.
    pub fn content_value(&self) -> Value {
        serde_json::from_str(self.content.get()).expect("content is valid JSON")
    }

    /// The federation JSON as a serde value (what `/send`, `/event`, `/state` carry).
    pub fn federation_json(&self) -> Value {
        serde_json::to_value(&self.json).expect("canonical JSON converts")
    }

    /// The client-server format: the event with its ID, without federation-only fields.
    pub fn client_json(&self) -> Value {
        let mut value = serde_json::json!({
            "event_id": self.event_id.as_str(),
            "room_id": self.room_id.as_str(),
            "sender": self.sender.as_str(),
            "type": self.event_type(),
            "origin_server_ts": u64::from(self.origin_server_ts.0),
            "content": self.content_value(),
        });
        if let Some(state_key) = &self.state_key {
            value["state_key"] = Value::from(state_key.clone());
        }
        if let Some(redacts) = &self.redacts {
            value["redacts"] = Value::from(redacts.as_str());
        }
        value
    }
}

/// v10 carries `redacts` at the top level; v11 (and v12) moved it into `content`.
fn redacts(json: &CanonicalJsonObject, version: RoomVersion) -> Result<Option<OwnedEventId>, EventError> {
    let raw = match version {
        RoomVersion::V10 => json.get("redacts"),
        RoomVersion::V11 | RoomVersion::V12 => match json.get("content") {
            Some(CanonicalJsonValue::Object(content)) => content.get("redacts"),
            _ => None,
        },
    };
    match raw {
        None => Ok(None),
        Some(CanonicalJsonValue::String(s)) => {
            EventId::parse(s).map(Some).map_err(|e| EventError::Malformed(format!("redacts: {e}")))
        }
        Some(_) => Err(EventError::Malformed("redacts is not a string".into())),
    }
}

/// The create event a v12 room ID names: `$` and the ID's hash (the inverse of
/// [`create_room_id`]).
pub fn create_event_id_of(room_id: &RoomId) -> String {
    format!("${}", room_id.as_str().trim_start_matches('!'))
}

/// The room ID a v12 create event makes: `!` and its event ID's hash.
pub fn create_room_id(event_id: &EventId) -> Result<OwnedRoomId, EventError> {
    RoomId::parse(format!("!{}", &event_id.as_str()[1..])).map_err(|e| EventError::Malformed(format!("room_id: {e}")))
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &OwnedEventId {
        &self.event_id
    }

    fn room_id(&self) -> Option<&RoomId> {
        // A v12 create event has no `room_id`, and the auth rules check that it has none.
        self.json.contains_key("room_id").then_some(&*self.room_id)
    }

    fn sender(&self) -> &UserId {
        &self.sender
    }

    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }

    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }

    fn content(&self) -> &RawJsonValue {
        &self.content
    }

    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }

    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &OwnedEventId> + '_> {
        Box::new(self.prev_events.iter())
    }

    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &OwnedEventId> + '_> {
        Box::new(self.auth_events.iter())
    }

    fn redacts(&self) -> Option<&OwnedEventId> {
        self.redacts.as_ref()
    }

    fn rejected(&self) -> bool {
        self.rejected
    }
}
