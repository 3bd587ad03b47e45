//! The sender's tables, and the only code that writes them: `destinations` (one delivery cursor
//! and back-off per server) and `peek_notices` (`expired_peeks` to tell a server). Other modules
//! call these functions, some inside their own transactions, instead of touching the tables.

use diesel::prelude::*;
use serde::Serialize;

use crate::db::schema::{destinations, inbound_peeks, peek_notices};
use crate::db::{Db, DbConnection, DbError};
use crate::on_backend;

/// A destination as operators see it (`peekgate destinations list`, the admin API).
#[derive(Debug, Serialize, Queryable)]
pub struct DestinationView {
    pub server_name: String,
    pub last_sent_pos: i64,
    pub failure_count: i32,
    pub retry_at: Option<i64>,
    pub last_success_ts: Option<i64>,
    pub lease_owner: Option<String>,
}

impl DestinationView {
    /// Waiting out a back-off now.
    pub fn backing_off(&self, now: i64) -> bool {
        self.retry_at.is_some_and(|at| at > now)
    }
}

/// Every destination, by name.
pub async fn list(db: &Db) -> Result<Vec<DestinationView>, DbError> {
    db.run(|conn: &mut DbConnection| {
        Ok(destinations::table
            .order(destinations::server_name)
            .select((
                destinations::server_name,
                destinations::last_sent_pos,
                destinations::failure_count,
                destinations::retry_at,
                destinations::last_success_ts,
                destinations::lease_owner,
            ))
            .load(conn)?)
    })
    .await
}

/// Clears a destination's back-off; `false` when the server is not a destination. A running
/// sender notices within a couple of seconds (at once when the caller also signals a reset).
pub async fn reset(db: &Db, server: &str) -> Result<bool, DbError> {
    let server = server.to_owned();
    db.run(move |conn: &mut DbConnection| {
        let changed = diesel::update(destinations::table.find(&server))
            .set((destinations::failure_count.eq(0), destinations::retry_at.eq(None::<i64>)))
            .execute(conn)?;
        Ok(changed == 1)
    })
    .await
}

/// Makes sure `server` has a delivery cursor, starting at `position` when it is new. With
/// `skip_to_position` (the server has nothing else to receive before it) an older cursor jumps
/// ahead too, so the sender does not scan unrelated events.
pub fn ensure_cursor(
    conn: &mut DbConnection,
    server: &str,
    position: i64,
    skip_to_position: bool,
) -> Result<(), diesel::result::Error> {
    let row = (destinations::server_name.eq(server.to_owned()), destinations::last_sent_pos.eq(position));
    on_backend!(&mut *conn, |c| diesel::insert_into(destinations::table)
        .values(row.clone())
        .on_conflict_do_nothing()
        .execute(c))?;
    if skip_to_position {
        diesel::update(destinations::table.filter(destinations::server_name.eq(server)))
            .filter(destinations::last_sent_pos.lt(position))
            .set(destinations::last_sent_pos.eq(position))
            .execute(conn)?;
    }
    Ok(())
}

/// The destination's delivery cursor, if it has one.
pub fn cursor(conn: &mut DbConnection, server: &str) -> Result<Option<i64>, diesel::result::Error> {
    destinations::table.find(server).select(destinations::last_sent_pos).first(conn).optional()
}

/// Queues `expired_peeks` for one peek, sent once the destination's cursor passes `after_pos`.
pub fn queue_expired_peek(
    conn: &mut DbConnection,
    destination: &str,
    room_id: &str,
    peek_id: &str,
    after_pos: i64,
) -> Result<(), diesel::result::Error> {
    let row = (
        peek_notices::destination.eq(destination.to_owned()),
        peek_notices::room_id.eq(room_id.to_owned()),
        peek_notices::peek_id.eq(peek_id.to_owned()),
        peek_notices::after_pos.eq(after_pos),
    );
    on_backend!(&mut *conn, |c| diesel::insert_into(peek_notices::table)
        .values(row.clone())
        .on_conflict_do_nothing()
        .execute(c))?;
    Ok(())
}

/// The statement that queues `expired_peeks` for every `(origin, room_id, peek_id)` row of
/// `source` (a table expression: a CTE name, or `inbound_peeks WHERE ...`), as SQL text, so
/// that a set-based sweep queues its notices in the same statement (both backends).
/// `skip_pending`: a notice already pending for the same peek is kept and no second one queued;
/// without it such a duplicate fails the statement with a unique violation, and the insert is a
/// plain one (on PostgreSQL `ON CONFLICT` makes each row a speculative insertion, the larger
/// part of a sweep's cost).
pub fn queue_expired_peeks_sql(source: &str, after_pos: i64, skip_pending: bool) -> String {
    let on_conflict = if skip_pending { " ON CONFLICT DO NOTHING" } else { "" };
    format!(
        "INSERT INTO peek_notices (destination, room_id, peek_id, after_pos) \
         SELECT origin, room_id, peek_id, {after_pos} FROM {source}{on_conflict}"
    )
}

/// Drops a pending `expired_peeks` for a peek that is live again (its ID was reused).
pub fn forget_expired_peek(
    conn: &mut DbConnection,
    destination: &str,
    room_id: &str,
    peek_id: &str,
) -> Result<(), diesel::result::Error> {
    diesel::delete(
        peek_notices::table
            .filter(peek_notices::destination.eq(destination))
            .filter(peek_notices::room_id.eq(room_id))
            .filter(peek_notices::peek_id.eq(peek_id)),
    )
    .execute(conn)?;
    Ok(())
}

/// Forgets destinations that only hold notices nobody will receive: no inbound peek from the
/// server remains, it is failing, and it never accepted a transaction or not since `before`.
/// Returns how many were forgotten.
pub async fn forget_dead(db: &Db, before: i64) -> Result<usize, DbError> {
    db.run(move |conn: &mut DbConnection| {
        let dead: Vec<String> = destinations::table
            .filter(destinations::failure_count.gt(0))
            .filter(destinations::last_success_ts.is_null().or(destinations::last_success_ts.lt(before)))
            .filter(diesel::dsl::not(diesel::dsl::exists(
                inbound_peeks::table.filter(inbound_peeks::origin.eq(destinations::server_name)),
            )))
            .select(destinations::server_name)
            .load(conn)?;
        for chunk in dead.chunks(500) {
            diesel::delete(peek_notices::table.filter(peek_notices::destination.eq_any(chunk))).execute(conn)?;
            diesel::delete(destinations::table.filter(destinations::server_name.eq_any(chunk))).execute(conn)?;
        }
        Ok(dead.len())
    })
    .await
}

/// How many destinations wait out a back-off now (the gauge).
pub async fn backing_off_count(db: &Db, now: i64) -> Result<i64, DbError> {
    db.run(move |conn: &mut DbConnection| {
        Ok(destinations::table.filter(destinations::retry_at.gt(now)).count().get_result::<i64>(conn)?)
    })
    .await
}
