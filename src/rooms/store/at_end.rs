//! What an append writes at the end of a room, in one statement on PostgreSQL.
//!
//! Appending an event writes its row, swaps its prev events for it among the room's forward
//! extremities, moves the room's current state group and depth, and for a client's send records
//! its transaction ID: five statements, each a round trip to the server, and under fan-out load
//! each round trip waits for a busy CPU. On PostgreSQL they are one statement with
//! data-modifying CTEs; they touch different rows, so that all of them see one snapshot does not
//! matter. SQLite runs in-process, with no round trip to save, and keeps them apart.

use diesel::sql_types::{Array, Nullable};

use super::*;

/// A client's transaction ID for a send (`PUT /rooms/{roomId}/send/{type}/{txnId}`), recorded
/// with the event it created so that a repeat returns that event.
pub struct ClientTxn<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
    pub txn_id: &'a str,
}

/// The events row, the forward extremities and the room row of an event appended at the end of
/// `room`, whose state group before it is `before` and after it `after`, and the client
/// transaction that sent it; returns its stream position. A transaction ID recorded before
/// fails the statement (its primary key).
pub(super) fn insert_at_end(
    conn: &mut DbConnection,
    room: &RoomRow,
    pdu: &Pdu,
    (before, after): (Option<i64>, i64),
    txn: Option<&ClientTxn<'_>>,
) -> Result<i64, RoomError> {
    let max_depth = room.max_depth.max(pdu.depth);
    let DbConnection::Postgresql(pg) = conn else {
        let stream_pos = insert_event_row(conn, &room.room_id, pdu, before, after, false)?;
        replace_prev_extremities(conn, &room.room_id, pdu)?;
        diesel::update(rooms::table.filter(rooms::room_id.eq(&room.room_id)))
            .set((rooms::current_state_group.eq(after), rooms::max_depth.eq(max_depth)))
            .execute(conn)?;
        if let Some(txn) = txn {
            record_client_txn(conn, txn.user_id, txn.device_id, txn.txn_id, pdu.event_id.as_str())?;
        }
        return Ok(stream_pos);
    };
    #[derive(QueryableByName)]
    struct Inserted {
        #[diesel(sql_type = BigInt)]
        stream_pos: i64,
    }
    let prevs: Vec<String> = pdu.prev_events.iter().map(|id| id.to_string()).collect();
    let json = serde_json::to_string(&pdu.json).expect("canonical JSON serialises");
    let inserted: Inserted = diesel::sql_query(
        "WITH replaced AS (
             DELETE FROM forward_extremities WHERE room_id = $1 AND event_id = ANY($2)
         ), added AS (
             INSERT INTO forward_extremities (room_id, event_id) VALUES ($1, $5)
         ), moved AS (
             UPDATE rooms SET current_state_group = $3, max_depth = $4 WHERE room_id = $1
         ), recorded AS (
             INSERT INTO client_txns (user_id, device_id, txn_id, event_id)
             SELECT $13, $14, $15, $5 WHERE $13 IS NOT NULL
         )
         INSERT INTO events (event_id, room_id, event_type, state_key, sender, depth, origin_server_ts, json,
                             state_group_before, state_group, outlier)
         VALUES ($5, $1, $6, $7, $8, $9, $10, $11, $12, $3, FALSE)
         RETURNING stream_pos",
    )
    .bind::<Text, _>(&room.room_id)
    .bind::<Array<Text>, _>(&prevs)
    .bind::<BigInt, _>(after)
    .bind::<BigInt, _>(max_depth)
    .bind::<Text, _>(pdu.event_id.as_str())
    .bind::<Text, _>(pdu.event_type())
    .bind::<Nullable<Text>, _>(pdu.state_key.as_deref())
    .bind::<Text, _>(pdu.sender.as_str())
    .bind::<BigInt, _>(pdu.depth)
    .bind::<BigInt, _>(i64::from(pdu.origin_server_ts.0))
    .bind::<Text, _>(json)
    .bind::<Nullable<BigInt>, _>(before)
    .bind::<Nullable<Text>, _>(txn.map(|t| t.user_id))
    .bind::<Nullable<Text>, _>(txn.map(|t| t.device_id))
    .bind::<Nullable<Text>, _>(txn.map(|t| t.txn_id))
    .get_result(pg)?;
    Ok(inserted.stream_pos)
}
