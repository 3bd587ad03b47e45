//! Transactions from other servers (`PUT /_matrix/federation/v1/send/{txnId}`). Each PDU goes
//! through the intake ([`crate::events::intake`]) to the append path and gets its own result;
//! only the transaction's own problems (origin, size) fail it as a whole. A PDU for a room we
//! peek whose `prev_events` we lack has its gap filled from the target first (OP-9). The answer
//! is remembered per `(origin, txn_id)`, so a retried transaction is answered the same.

use std::collections::BTreeMap;

use diesel::prelude::*;
use ruma::{CanonicalJsonValue, RoomId, ServerName};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::clock::now_ms;
use crate::db::schema::received_txns;
use crate::db::{Db, DbError};
use crate::events::intake::{self, Hashes};
use crate::events::RoomVersion;
use crate::keys::RemoteKeys;
use crate::membership::catch_up;
use crate::metrics::Metrics;
use crate::on_backend;
use crate::peeks::outbound::{self, OutboundPeeks};
use crate::rooms::{RoomError, Rooms};

pub const MAX_PDUS: usize = 50;
pub const MAX_EDUS: usize = 100;

/// A transaction body; unknown fields are ignored.
#[derive(Deserialize)]
pub struct Transaction {
    origin: String,
    #[allow(dead_code)]
    origin_server_ts: i64,
    #[serde(default)]
    pdus: Vec<Value>,
    #[serde(default)]
    edus: Vec<Value>,
}

/// Why a whole transaction was refused.
#[derive(Debug, thiserror::Error)]
pub enum TransactionError {
    #[error("Transaction origin does not match the authenticated origin")]
    WrongOrigin,
    #[error("At most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs per transaction")]
    TooLarge,
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What receiving a transaction needs, borrowed from the server's shared state.
pub struct Inbox<'a> {
    pub db: &'a Db,
    pub rooms: &'a Rooms,
    pub keys: &'a RemoteKeys,
    pub outbound: &'a OutboundPeeks,
    pub metrics: &'a Metrics,
}

/// Receives one transaction from `origin` (authenticated): the per-PDU results, as answered
/// the first time for a retried transaction ID.
pub async fn receive(
    state: &Inbox<'_>,
    origin: &ServerName,
    txn_id: &str,
    txn: Transaction,
) -> Result<Value, TransactionError> {
    if txn.origin != origin.as_str() {
        return Err(TransactionError::WrongOrigin);
    }
    if txn.pdus.len() > MAX_PDUS || txn.edus.len() > MAX_EDUS {
        return Err(TransactionError::TooLarge);
    }
    if let Some(cached) = cached_response(state, origin.as_str(), txn_id).await? {
        return Ok(cached);
    }
    let mut results = BTreeMap::new();
    for pdu in txn.pdus {
        let (event_id, result) = receive_pdu(state, origin, pdu).await;
        state.metrics.received_pdu(match &result {
            Ok(true) => "accepted",
            Ok(false) => "duplicate",
            Err(_) => "rejected",
        });
        let entry = match result {
            Ok(_) => json!({}),
            Err(error) => json!({ "error": error }),
        };
        results.insert(event_id, entry);
    }
    let response = json!({ "pdus": results });
    remember_response(state, origin.as_str(), txn_id, &response).await?;
    Ok(response)
}

/// Checks and stores one PDU. Returns its event ID and `Ok(true)` when stored, `Ok(false)` for
/// a duplicate, or the per-PDU error text.
async fn receive_pdu(state: &Inbox<'_>, origin: &ServerName, pdu: Value) -> (String, Result<bool, String>) {
    let object = match intake::parse(pdu) {
        Ok(object) => object,
        Err(e) => return ("".into(), Err(e.to_string())),
    };
    let room = object.get("room_id").and_then(|v| match v {
        CanonicalJsonValue::String(s) => RoomId::parse(s).ok(),
        _ => None,
    });
    let row = match &room {
        Some(room_id) => state.rooms.room(room_id).await.ok().flatten(),
        None => None,
    };
    // The event ID depends on the room version; an unknown room still gets a v10-style ID.
    let version = row.as_ref().map(|r| r.version).unwrap_or(RoomVersion::V10);
    let event_id = intake::event_id(&object, version);
    let (Some(room_id), Some(row)) = (room, row) else {
        return (event_id, Err("Unknown room".into()));
    };
    // OP-9: a room of another server is accepted only from the target we peek it through, or
    // (JN-8) from a server with a member in it while one of our users is in it too.
    if !row.is_local && !accepts_from(state, &room_id, origin).await {
        return (event_id, Err("This server does not peek the room through you, nor share it with you".into()));
    }
    let pdu = match intake::check(state.keys, &room_id, version, object, Hashes::Redact).await {
        Ok(pdu) => pdu,
        Err(e) => return (event_id, Err(e.to_string())),
    };
    match state.rooms.append_remote(&room_id, pdu.clone()).await {
        Ok(appended) => (event_id, Ok(appended.is_some())),
        // OP-9: fill the gap from the target (WR-1 lets a peeker ask) or the joined server
        // that sent it, then try once more.
        Err(RoomError::MissingPrevEvents(missing)) => {
            if let Err(e) = outbound::fill_gap(state.outbound, origin, &room_id, vec![event_id.clone()]).await {
                // JN-8: in a room we are in, the state at the missing prev events instead.
                if !we_are_in(state, &room_id).await {
                    if !row.is_local {
                        resync_in_background(state, &room_id);
                    }
                    return (event_id, Err(format!("prev events unknown and not fetched: {e}")));
                }
                if let Err(e) = catch_up::fetch_state_at(state.outbound, origin, &room_id, version, &missing).await {
                    return (event_id, Err(format!("prev events unknown, and the state at them not fetched: {e}")));
                }
            }
            match state.rooms.append_remote(&room_id, pdu).await {
                Ok(appended) => (event_id, Ok(appended.is_some())),
                Err(e) => (event_id, Err(e.to_string())),
            }
        }
        Err(e) => (event_id, Err(e.to_string())),
    }
}

/// Whether one of our users is joined to the room.
async fn we_are_in(state: &Inbox<'_>, room_id: &RoomId) -> bool {
    state.rooms.server_is_joined(room_id, state.rooms.server_name()).await.unwrap_or(false)
}

/// Whether a PDU of a room of another server is taken from `origin`: the target we peek the
/// room through, or a server in the room while we are in it too.
async fn accepts_from(state: &Inbox<'_>, room_id: &RoomId, origin: &ServerName) -> bool {
    if outbound::accepts_from(state.outbound, room_id, origin).await.unwrap_or(false) {
        return true;
    }
    let joined = state.rooms.joined_servers(room_id).await.unwrap_or_default();
    joined.contains(origin.as_str()) && joined.contains(state.rooms.server_name().as_str())
}

/// A peeked room whose gap could not be filled would refuse every later PDU too: re-peek it
/// for a new starting point, without holding up the transaction's answer.
fn resync_in_background(state: &Inbox<'_>, room_id: &RoomId) {
    let (outbound, room_id, refused_at) = (state.outbound.clone(), room_id.to_owned(), crate::clock::now_ms());
    tokio::spawn(async move {
        if let Err(e) = outbound::resync(&outbound, &room_id, refused_at).await {
            tracing::warn!(room = %room_id, error = %e, "re-sync of a peeked room failed");
        }
    });
}

async fn cached_response(state: &Inbox<'_>, origin: &str, txn_id: &str) -> Result<Option<Value>, DbError> {
    let (origin, txn_id) = (origin.to_owned(), txn_id.to_owned());
    let cached: Option<String> = state
        .db
        .run::<_, DbError, _>(move |conn| {
            Ok(received_txns::table
                .filter(received_txns::origin.eq(&origin))
                .filter(received_txns::txn_id.eq(&txn_id))
                .select(received_txns::response)
                .first(conn)
                .optional()?)
        })
        .await?;
    Ok(cached.and_then(|text| serde_json::from_str(&text).ok()))
}

async fn remember_response(state: &Inbox<'_>, origin: &str, txn_id: &str, response: &Value) -> Result<(), DbError> {
    let row = (
        received_txns::origin.eq(origin.to_owned()),
        received_txns::txn_id.eq(txn_id.to_owned()),
        received_txns::response.eq(response.to_string()),
        received_txns::received_ts.eq(now_ms()),
    );
    state
        .db
        .run::<_, DbError, _>(move |conn| {
            on_backend!(&mut *conn, |c| diesel::insert_into(received_txns::table)
                .values(row.clone())
                .on_conflict_do_nothing()
                .execute(c))?;
            Ok(())
        })
        .await
}

/// Forgets the answers to transactions received before `before` (the schedule's clean-up).
pub async fn forget_answers_before(db: &Db, before: i64) -> Result<(), DbError> {
    db.run::<_, DbError, _>(move |conn| {
        diesel::delete(received_txns::table.filter(received_txns::received_ts.lt(before))).execute(conn)?;
        Ok(())
    })
    .await
}
