//! MSC2444, we are the peeked server: create, renew, delete and evict inbound peeks, and end
//! them when the room stops being peekable (RE-3, RE-4).
//!
//! A peek is recorded at stream position P under the append lock *before* the state at P is
//! read (PE-3), so every event after P reaches the peeker and none is missed.
//!
//! The files of this folder are parts of one module: they share the imports below through
//! `use super::*`, and this file re-exports what the rest of the crate calls.

mod eviction;
mod facts;
mod put;
mod renewals;
mod room_changes;

pub use eviction::*;
use facts::*;
pub use put::*;
pub use room_changes::*;

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ruma::events::room::server_acl::RoomServerAclEventContent;
use ruma::{OwnedRoomId, RoomId, ServerName};
use serde::Serialize;
use serde_json::Value;

use super::PeekId;
use crate::clock::now_ms;
use crate::config::Settings;
use crate::db::schema::inbound_peeks;
use crate::db::write_transaction;
use crate::db::{Db, DbConnection, DbError};
use crate::events::Pdu;
use crate::ids;
use crate::rooms::store::{self, RoomRow};
use crate::rooms::{visibility, RoomError, Rooms};
use crate::sender::destinations as sender;

#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    #[error("server ACL denies {0}")]
    Acl(String),
    #[error("unknown room")]
    UnknownRoom,
    #[error("invalid peek ID")]
    InvalidPeekId,
    #[error("room version {0} is not among the peeker's versions")]
    IncompatibleVersion(String),
    #[error("room is not peekable: {0}")]
    NotPeekable(&'static str),
    #[error("too many peeks")]
    LimitExceeded { retry_after_ms: u64 },
    /// H6: a peek with this key was ended by the room and its server has not yet been sent
    /// everything up to the end; a new peek replacing it would drop those events.
    #[error("the previous peek with this ID is still being wound up")]
    StillEnding,
    #[error("no such peek")]
    NoSuchPeek,
    #[error(transparent)]
    Room(#[from] RoomError),
}

impl From<crate::db::DbError> for PeekError {
    fn from(e: crate::db::DbError) -> Self {
        PeekError::Room(RoomError::Db(e))
    }
}

impl From<diesel::result::Error> for PeekError {
    fn from(e: diesel::result::Error) -> Self {
        PeekError::Room(e.into())
    }
}

/// The Rev A answer to a new peek (FP-7).
#[derive(Debug, Serialize)]
pub struct PeekResponse {
    pub room_version: String,
    pub state: Vec<Value>,
    pub auth_chain: Vec<Value>,
    pub latest_event: Value,
    pub latest_event_id: String,
    pub renewal_interval: u64,
}

pub enum PutOutcome {
    /// A live peek was renewed: answer `{}` (FP-9).
    Renewed,
    Created(Box<PeekResponse>),
}

/// Limits of FP-12 and the timings of RE-1/RE-2.
pub(super) struct Limits {
    renewal_interval_ms: i64,
    grace_ms: i64,
    max_active_per_origin: i64,
    max_ids_per_room: i64,
    max_active_total: i64,
    lenient_peek_ids: bool,
}

pub struct InboundPeeks {
    db: Db,
    /// Ours: RE-4 asks whether any of our users is still in the room.
    server_name: Arc<str>,
    limits: Limits,
    new_peeks: DefaultKeyedRateLimiter<String>,
    facts: Arc<FactsCache>,
    /// PostgreSQL: renewals of live peeks share database round trips.
    batcher: Option<renewals::RenewalBatcher>,
}

/// H6: how long a peeker whose re-PUT found its previous peek still winding up waits.
pub const STILL_ENDING_RETRY_MS: u64 = 1_000;

/// RE-2: the grace after the interval is min(10 % of the interval, configured grace).
pub(super) fn grace_ms(interval_ms: i64, configured: i64) -> i64 {
    (interval_ms / 10).min(configured)
}
