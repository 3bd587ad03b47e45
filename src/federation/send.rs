//! `PUT /_matrix/federation/v1/send/{txnId}`: transactions from other servers. Each PDU is
//! checked on its own (signature by its sender's server, hash, auth rules) and answered with a
//! per-PDU result; only transport, auth and format problems fail the whole transaction.

use std::collections::BTreeMap;

use actix_web::{web, HttpResponse};
use diesel::prelude::*;
use ruma::{CanonicalJsonObject, CanonicalJsonValue, RoomId, ServerName};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::clock::now_ms;
use crate::db::schema::received_txns;
use crate::db::DbError;
use crate::error::{internal_error, MatrixError};
use crate::events::{self, Pdu, RoomVersion};
use crate::federation::auth::SignedRequest;
use crate::on_backend;
use crate::peeks::outbound;
use crate::rooms::RoomError;
use crate::state::AppState;

pub const MAX_PDUS: usize = 50;
pub const MAX_EDUS: usize = 100;

#[derive(Deserialize)]
struct Transaction {
    origin: String,
    #[allow(dead_code)]
    origin_server_ts: i64,
    #[serde(default)]
    pdus: Vec<Value>,
    #[serde(default)]
    edus: Vec<Value>,
}

pub async fn send(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, MatrixError> {
    let txn_id = path.into_inner();
    if request.body.is_none() {
        return Err(MatrixError::not_json("A transaction body is required"));
    }
    let txn: Transaction = request.json()?;
    if txn.origin != request.origin.as_str() {
        return Err(MatrixError::bad_json("Transaction origin does not match the authenticated origin"));
    }
    if txn.pdus.len() > MAX_PDUS || txn.edus.len() > MAX_EDUS {
        return Err(MatrixError::bad_json(format!("At most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs per transaction")));
    }
    let origin = request.origin.to_string();
    if let Some(cached) = cached_response(&state, &origin, &txn_id).await? {
        return Ok(HttpResponse::Ok().json(cached));
    }
    let mut results = BTreeMap::new();
    for pdu in txn.pdus {
        let (event_id, result) = receive_pdu(&state, &request.origin, pdu).await;
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
    remember_response(&state, &origin, &txn_id, &response).await?;
    Ok(HttpResponse::Ok().json(response))
}

/// Checks and stores one PDU. Returns its event ID and `Ok(true)` when stored, `Ok(false)` for
/// a duplicate, or the per-PDU error text.
async fn receive_pdu(state: &web::Data<AppState>, origin: &ServerName, pdu: Value) -> (String, Result<bool, String>) {
    let object: CanonicalJsonObject = match CanonicalJsonValue::try_from(pdu) {
        Ok(CanonicalJsonValue::Object(object)) => object,
        _ => return ("".into(), Err("PDU is not a canonical JSON object".into())),
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
    let event_id =
        ruma::signatures::reference_hash(&object, &version.rules()).map(|h| format!("${h}")).unwrap_or_default();
    let (Some(room_id), Some(row)) = (room, row) else {
        return (event_id, Err("Unknown room".into()));
    };
    // OP-9: a room of another server is accepted only from the target we peek it through.
    if !row.is_local && !outbound::accepts_from(state, &room_id, origin).await.unwrap_or(false) {
        return (event_id, Err("This server does not peek the room through you".into()));
    }
    let verified = match events::verify_received(&state.keys, object, version).await {
        Ok(verified) => verified,
        Err(e) => return (event_id, Err(e.to_string())),
    };
    let pdu = match Pdu::from_federation(verified, version) {
        Ok(pdu) => pdu,
        Err(e) => return (event_id, Err(e.to_string())),
    };
    match state.rooms.append_remote(&room_id, pdu.clone()).await {
        Ok(appended) => (event_id, Ok(appended.is_some())),
        // OP-9: fill the gap from the target (WR-1 lets a peeker ask), then try once more.
        Err(RoomError::MissingPrevEvents(_)) if !row.is_local => {
            if let Err(e) = outbound::fill_gap(state, origin, &room_id, vec![event_id.clone()]).await {
                resync_in_background(state, &room_id);
                return (event_id, Err(format!("prev events unknown and not fetched: {e}")));
            }
            match state.rooms.append_remote(&room_id, pdu).await {
                Ok(appended) => (event_id, Ok(appended.is_some())),
                Err(e) => (event_id, Err(e.to_string())),
            }
        }
        Err(e) => (event_id, Err(e.to_string())),
    }
}

/// A peeked room whose gap could not be filled would refuse every later PDU too: re-peek it
/// for a new starting point, without holding up the transaction's answer.
fn resync_in_background(state: &web::Data<AppState>, room_id: &RoomId) {
    let (state, room_id, refused_at) = (state.clone(), room_id.to_owned(), crate::clock::now_ms());
    tokio::spawn(async move {
        if let Err(e) = outbound::resync(&state, &room_id, refused_at).await {
            tracing::warn!(room = %room_id, error = %e, "re-sync of a peeked room failed");
        }
    });
}

async fn cached_response(state: &AppState, origin: &str, txn_id: &str) -> Result<Option<Value>, MatrixError> {
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
        .await
        .map_err(|e| internal_error("reading received transactions", e))?;
    Ok(cached.and_then(|text| serde_json::from_str(&text).ok()))
}

async fn remember_response(state: &AppState, origin: &str, txn_id: &str, response: &Value) -> Result<(), MatrixError> {
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
        .map_err(|e| internal_error("recording a received transaction", e))
}
