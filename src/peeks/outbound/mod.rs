//! MSC2444, we are the peeker (OP-1..9): choose targets, `PUT /peek`, validate the answer
//! (OP-4, in [`validate`]), store it as the room's starting point, renew while a local device
//! still watches (TBD-1), fail over to the next candidate, fill gaps with `get_missing_events`
//! or `/backfill` ([`backfill`]), and `DELETE` the peek when nobody watches any more.
//!
//! One federation peek per room (OP-2), shared by every local device that peeks it; the
//! `outbound_peeks` row remembers the target, the peek_id and the candidates for failover.
//!
//! The files of this folder are parts of one module: they share the imports below through
//! `use super::*`, and this file re-exports what the rest of the crate calls.

pub mod backfill;
mod claims;
mod establish;
mod gaps;
mod renewals;
mod targets;
pub mod validate;

pub use claims::*;
pub use establish::*;
pub use gaps::*;
pub use renewals::*;
pub use targets::*;

use std::collections::HashMap;
use std::sync::Arc;

use diesel::prelude::*;
use rand::distr::{Alphanumeric, SampleString};
use reqwest::Method;
use ruma::{OwnedRoomId, OwnedServerName, RoomAliasId, RoomId, ServerName};
use serde_json::{json, Value};

use super::devices::{self, DevicePeeks};
use crate::clock::now_ms;
use crate::config::Settings;
use crate::db::schema::{outbound_claims, outbound_peeks};
use crate::db::{write_transaction, Db, DbConnection};
use crate::events::{Pdu, RoomVersion};
use crate::federation::client::{FedRequest, FederationClient, FederationError};
use crate::keys::RemoteKeys;
use crate::metrics::Metrics;
use crate::on_backend;
use crate::rooms::{RoomError, Rooms, StateMap};
use validate::{InvalidPeek, ValidPeek};

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// OP-5: the room's version is one we do not support; trying other servers cannot help.
    #[error("incompatible room version {0}")]
    IncompatibleVersion(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error(transparent)]
    Room(#[from] RoomError),
}

impl From<diesel::result::Error> for OutboundError {
    fn from(e: diesel::result::Error) -> Self {
        OutboundError::Room(e.into())
    }
}

/// What outbound peeks need from the rest of the server: built once at start-up, cheap to
/// clone (every field is shared).
#[derive(Clone)]
pub struct OutboundPeeks {
    /// This process among the instances sharing the database (room claims name it).
    pub instance_id: String,
    pub settings: Settings,
    pub db: Db,
    pub rooms: Arc<Rooms>,
    pub federation: Arc<FederationClient>,
    pub keys: Arc<RemoteKeys>,
    pub metrics: Arc<Metrics>,
    pub device_peeks: DevicePeeks,
    /// One establishing `PUT` per room at a time within this instance.
    pub locks: Arc<RoomLocks>,
}

/// An `outbound_peeks` row.
#[derive(Debug, Clone, Queryable)]
pub struct OutboundPeek {
    pub room_id: String,
    pub target: String,
    pub peek_id: String,
    pub candidates: String,
    pub created_ts: i64,
    pub renewed_ts: i64,
    pub renewal_interval_ms: i64,
    pub next_renewal_ts: i64,
    pub failures: i32,
    pub ended_ts: Option<i64>,
}

impl OutboundPeek {
    fn candidates(&self) -> Vec<String> {
        serde_json::from_str(&self.candidates).unwrap_or_default()
    }

    fn lapsed(&self, now: i64) -> bool {
        now > self.renewed_ts + self.renewal_interval_ms
    }
}

/// The room's outbound peek row, ended or not.
pub async fn get(state: &OutboundPeeks, room_id: &RoomId) -> Result<Option<OutboundPeek>, RoomError> {
    let room = room_id.to_string();
    state.db.run::<_, RoomError, _>(move |conn| row(conn, &room)).await
}

fn row(conn: &mut DbConnection, room_id: &str) -> Result<Option<OutboundPeek>, RoomError> {
    Ok(outbound_peeks::table.find(room_id).select(outbound_peeks::all_columns).first(conn).optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op1_candidates_keep_first_occurrence_and_drop_our_name() {
        let ours = ServerName::parse("us.test").unwrap();
        let list = candidates(&ours, ["a.test", "us.test", "b.test", "a.test", "not a server", "c.test:8448"]);
        assert_eq!(list, ["a.test", "b.test", "c.test:8448"]);
    }

    #[test]
    fn h16_candidate_lists_are_capped() {
        let ours = ServerName::parse("us.test").unwrap();
        let many: Vec<String> = (0..50).map(|i| format!("s{i}.test")).collect();
        let list = candidates(&ours, many.iter().map(String::as_str));
        assert_eq!(list.len(), MAX_CANDIDATES);
        assert_eq!(list[0], "s0.test", "the first ones are kept, in order");
    }

    #[test]
    fn op7_renewal_spacing_is_half_the_interval_clamped() {
        assert_eq!(renewal_spacing(60_000), 30_000);
        assert_eq!(renewal_spacing(3_600_000_000), MAX_RENEWAL_SPACING_MS);
        assert_eq!(renewal_spacing(10), MIN_RENEWAL_SPACING_MS);
        assert!(retry_spacing(1, 60_000) <= 15_000);
        assert_eq!(retry_spacing(20, 60_000), 15_000);
    }
}
