//! Renewals of live inbound peeks, batched on PostgreSQL ("group commit"): renewals that arrive
//! while one database round trip is under way wait for the next, which renews all of them with
//! one `UPDATE ... FROM unnest(...)`. Each caller still gets the database's own answer for its
//! peek (renewed, or not live), so batching changes how many round trips there are, not what a
//! `{}` renewal answer promises. The batch forms naturally: nothing waits when the server is idle.

use std::collections::HashSet;

use diesel::sql_types::{Array, BigInt, Text};
use diesel::{QueryableByName, RunQueryDsl};
use tokio::sync::{mpsc, oneshot};

use crate::clock::now_ms;
use crate::db::{Db, DbConnection, DbError};

/// `(origin, room_id, peek_id)`.
pub type PeekKey = (String, String, String);

/// Most renewals in one statement.
const MAX_BATCH: usize = 1000;

type Reply = oneshot::Sender<Result<bool, String>>;

/// A handle on the batching task.
pub struct RenewalBatcher {
    queue: mpsc::UnboundedSender<(PeekKey, Reply)>,
}

impl RenewalBatcher {
    /// Starts the batching task (on PostgreSQL; SQLite renews one by one).
    pub fn start(db: Db, interval_ms: i64, grace_ms: i64) -> RenewalBatcher {
        let (queue, mut pending) = mpsc::unbounded_channel::<(PeekKey, Reply)>();
        tokio::spawn(async move {
            while let Some(first) = pending.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match pending.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let keys: Vec<PeekKey> = batch.iter().map(|(key, _)| key.clone()).collect();
                // Soft state: a renewal lost in a crash is simply sent again.
                let renewed = db
                    .run_soft::<_, DbError, _>(move |conn| renew_many(conn, keys, interval_ms, grace_ms, now_ms()))
                    .await
                    .map_err(|e| e.to_string());
                for (key, reply) in batch {
                    let _ = reply.send(renewed.as_ref().map(|set| set.contains(&key)).map_err(Clone::clone));
                }
            }
        });
        RenewalBatcher { queue }
    }

    /// Renews the peek if it is live; `Ok(false)` when it is unknown, lapsed or ended.
    pub async fn renew(&self, key: PeekKey) -> Result<bool, String> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((key, reply)).map_err(|_| "the renewal batcher stopped".to_owned())?;
        answer.await.map_err(|_| "the renewal batcher stopped".to_owned())?
    }
}

#[derive(QueryableByName)]
struct RenewedRow {
    #[diesel(sql_type = Text)]
    origin: String,
    #[diesel(sql_type = Text)]
    room_id: String,
    #[diesel(sql_type = Text)]
    peek_id: String,
}

/// One statement renewing every live peek among `keys`; returns the ones it renewed.
fn renew_many(
    conn: &mut DbConnection,
    keys: Vec<PeekKey>,
    interval_ms: i64,
    grace_ms: i64,
    now: i64,
) -> Result<HashSet<PeekKey>, DbError> {
    let DbConnection::Postgresql(pg) = conn else {
        return Err(DbError::Pool("batched renewals need PostgreSQL".into()));
    };
    let (mut origins, mut rooms, mut peeks) = (Vec::new(), Vec::new(), Vec::new());
    for (origin, room, peek) in keys {
        origins.push(origin);
        rooms.push(room);
        peeks.push(peek);
    }
    let rows: Vec<RenewedRow> = diesel::sql_query(
        "UPDATE inbound_peeks AS p \
         SET renewed_ts = $1, renewal_interval_ms = $2, expires_ts = $1 + $2 + $3 \
         FROM unnest($4::text[], $5::text[], $6::text[]) AS v(origin, room_id, peek_id) \
         WHERE p.origin = v.origin AND p.room_id = v.room_id AND p.peek_id = v.peek_id \
           AND p.expires_ts >= $1 AND p.end_stream_pos IS NULL \
         RETURNING p.origin, p.room_id, p.peek_id",
    )
    .bind::<BigInt, _>(now)
    .bind::<BigInt, _>(interval_ms)
    .bind::<BigInt, _>(grace_ms)
    .bind::<Array<Text>, _>(origins)
    .bind::<Array<Text>, _>(rooms)
    .bind::<Array<Text>, _>(peeks)
    .load(pg)
    .map_err(DbError::Query)?;
    Ok(rows.into_iter().map(|r| (r.origin, r.room_id, r.peek_id)).collect())
}
