//! The synchronous storage side of rooms (runs inside `Db::run`): the single append path,
//! state groups (state at any event), current state, forward extremities and event lookups.
//!
//! The files of this folder are parts of one module: they share the imports below through
//! `use super::*`, and this file re-exports what the rest of the crate calls.

mod append;
mod at_end;
mod groups;
mod lookups;
pub mod redactions;
mod resolve;

pub use append::*;
pub use at_end::ClientTxn;
pub use groups::*;
pub use lookups::*;
pub use resolve::store_outlier_with_state;

use std::collections::{BTreeMap, HashMap};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use ruma::events::{StateEventType, TimelineEventType};
use ruma::{EventId, OwnedEventId};

use super::error::RoomError;
use super::hooks::AppendHooks;
use crate::db::schema::{
    client_txns, current_state, events, forward_extremities, rooms, state_group_entries, state_groups,
};
use crate::db::DbConnection;
use crate::events as pdus;
use crate::events::{EventDraft, Pdu, RoomVersion};
use crate::keys::SigningKey;
use crate::on_backend;

/// A full state map: `(type, state_key)` → event ID.
pub type StateMap = BTreeMap<(String, String), String>;

/// A full snapshot is stored after this many deltas, bounding the walk to compute a state.
const SNAPSHOT_EVERY: i32 = 50;

/// Any `prev_events` list is capped by the spec at 20.
const MAX_PREV_EVENTS: i64 = 20;

/// Arbitrary constant naming the append lock in PostgreSQL's advisory-lock space.
const APPEND_LOCK_KEY: i64 = 0x7065_656b; // "peek"

/// What the append path needs to know about a room.
#[derive(Debug, Clone)]
pub struct RoomRow {
    pub room_id: String,
    pub version: RoomVersion,
    pub is_local: bool,
    pub current_state_group: Option<i64>,
    pub max_depth: i64,
}

/// An event as stored, with its position in the stream.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub stream_pos: i64,
    pub pdu: Pdu,
    pub state_group_before: Option<i64>,
    pub state_group: i64,
}

/// The result of appending one event.
#[derive(Debug, Clone)]
pub struct Appended {
    pub event_id: OwnedEventId,
    pub stream_pos: i64,
}
