//! The sender's storage side: the queue query (events after a destination's cursor that it
//! should get), cursor and failure bookkeeping, and destination leases.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use diesel::prelude::*;
use rand::RngExt;
use serde_json::Value;

use super::shared::Shared;
use super::subscriptions::{self, NewEvent, Subscription};
use crate::clock::now_ms;
use crate::db::schema::{destinations, events, inbound_peeks, joined_servers, peek_notices};
use crate::db::write_transaction;
use crate::db::{DbConnection, DbError};

/// Spec limit of PDUs per transaction.
pub const MAX_PDUS_PER_TXN: i64 = 50;
/// Back-off: a short grace after the first failure, then 2 s doubling, capped at
/// `federation.max_backoff_ms` (default 24 h).
const FIRST_RETRY: Duration = Duration::from_millis(500);
const BACKOFF_BASE: Duration = Duration::from_secs(2);

/// Delay before retry number `failures` (1 = first failure), at most `cap`, with ±20 % jitter.
pub fn backoff(failures: i32, cap: Duration) -> Duration {
    let base = if failures <= 1 {
        FIRST_RETRY.min(cap)
    } else {
        let exp = (failures - 2).min(31) as u32;
        BACKOFF_BASE.saturating_mul(2u32.saturating_pow(exp)).min(cap)
    };
    base.mul_f64(rand::rng().random_range(0.8..1.2))
}

/// What one transaction carries.
pub struct Batch {
    pub pdus: Vec<Value>,
    pub notices: Vec<(String, String)>,
    /// The cursor after this batch is delivered.
    pub next_cursor: i64,
}

#[derive(Debug, Clone, Copy)]
pub struct DestinationRow {
    pub cursor: i64,
    pub failures: i32,
    pub retry_at: Option<i64>,
}

/// Events after `cursor` that the destination should get: those of rooms it peeks, after its
/// peek started, while the peek is live (or up to where the room ended it); never its own
/// events back (PE-2). Then the `expired_peeks` notices whose peek's last event is delivered.
pub(super) async fn next_batch(shared: &Shared, destination: &str, cursor: i64) -> Result<Batch, DbError> {
    let destination = destination.to_owned();
    let our_server = shared.state.settings.server_name.to_string();
    shared.state.db.run(move |conn| next_batch_blocking(conn, &our_server, &destination, cursor)).await
}

fn next_batch_blocking(
    conn: &mut DbConnection,
    our_server: &str,
    destination: &str,
    cursor: i64,
) -> Result<Batch, DbError> {
    let now = now_ms();
    // Read the head first: every event up to it has committed (appends commit in order), so
    // what the query below does not return up to the head is not for this destination.
    let head = crate::rooms::store::stream_head(conn)?;
    // The rooms where this destination has a peek or a joined span that may still want events
    // narrow the scan; which of their events it gets is the one rule in `Subscription::wants`,
    // shared with the fan-out path, applied to its subscriptions in the rooms the page touches.
    let peeked_rooms = inbound_peeks::table
        .filter(inbound_peeks::origin.eq(destination))
        .filter(inbound_peeks::end_stream_pos.is_null().or(inbound_peeks::end_stream_pos.gt(cursor)))
        .select(inbound_peeks::room_id);
    let joined_rooms = joined_servers::table
        .filter(joined_servers::server_name.eq(destination))
        .filter(joined_servers::end_stream_pos.is_null().or(joined_servers::end_stream_pos.gt(cursor)))
        .select(joined_servers::room_id);
    let rows: Vec<(i64, String, String, String)> = events::table
        .filter(events::stream_pos.gt(cursor))
        .filter(events::stream_pos.le(head))
        .filter(events::outlier.eq(false))
        .filter(events::rejected.eq(false))
        .filter(events::room_id.eq_any(peeked_rooms).or(events::room_id.eq_any(joined_rooms)))
        .order(events::stream_pos.asc())
        .limit(MAX_PDUS_PER_TXN)
        .select((events::stream_pos, events::room_id, events::sender, events::json))
        .load(conn)?;
    // A full page may hide more after it: continue from its last row, not from the head.
    let next_cursor =
        if rows.len() as i64 == MAX_PDUS_PER_TXN { rows.last().map(|r| r.0).unwrap_or(head) } else { head };
    let mut page_rooms: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    page_rooms.sort_unstable();
    page_rooms.dedup();
    let subscriptions = subscriptions::of_destination(conn, our_server, destination, &page_rooms)?;
    let rows: Vec<(i64, String)> = rows
        .into_iter()
        .map(|(pos, room_id, sender, json)| NewEvent { pos, room_id, sender, json })
        .filter(|event| subscriptions.iter().any(|s| s.wants(event, now)))
        .map(|event| (event.pos, event.json))
        .collect();
    let pdus = rows.into_iter().filter_map(|(_, json)| serde_json::from_str(&json).ok()).collect();
    let notices: Vec<(String, String)> = peek_notices::table
        .filter(peek_notices::destination.eq(destination))
        .filter(peek_notices::after_pos.le(next_cursor))
        .select((peek_notices::room_id, peek_notices::peek_id))
        .limit(100)
        .load(conn)?;
    Ok(Batch { pdus, notices, next_cursor })
}

/// A 200: move the cursor, clear the failure state, drop the notices that went out. Only while
/// this instance holds the destination's lease (H4); `false` when it does not, and then
/// nothing changed. The cursor never moves back (a new peek may have moved it ahead).
pub(super) async fn save_progress(
    shared: &Shared,
    destination: &str,
    cursor: i64,
    notices: &[(String, String)],
) -> Result<bool, DbError> {
    let (destination, me) = (destination.to_owned(), shared.instance.clone());
    let notices = notices.to_vec();
    shared
        .state
        .db
        .run(move |conn| {
            // One statement, so no transaction, in the usual case: the cursor only moves forward
            // (`cursor` is a number, safe to write into the SQL).
            let forward = diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!(
                "CASE WHEN last_sent_pos < {cursor} THEN {cursor} ELSE last_sent_pos END"
            ));
            let mine = destinations::table
                .filter(destinations::server_name.eq(&destination))
                .filter(destinations::lease_owner.eq(&me));
            let saved = |conn: &mut crate::db::DbConnection| {
                diesel::update(mine)
                    .set((
                        destinations::failure_count.eq(0),
                        destinations::retry_at.eq(None::<i64>),
                        destinations::last_success_ts.eq(now_ms()),
                        destinations::last_sent_pos.eq(forward),
                    ))
                    .execute(conn)
                    .map(|held| held > 0)
            };
            if notices.is_empty() {
                return Ok(saved(conn)?);
            }
            write_transaction::<_, DbError, _>(conn, |conn| {
                if !saved(conn)? {
                    return Ok(false);
                }
                for (room, peek) in &notices {
                    diesel::delete(
                        peek_notices::table
                            .filter(peek_notices::destination.eq(&destination))
                            .filter(peek_notices::room_id.eq(room))
                            .filter(peek_notices::peek_id.eq(peek)),
                    )
                    .execute(conn)?;
                }
                Ok(true)
            })
        })
        .await
}

/// Records a failed attempt and when to retry (only while holding the lease, H4).
pub(super) async fn save_failure(
    shared: &Shared,
    destination: &str,
    failures: i32,
    retry_at: i64,
) -> Result<(), DbError> {
    let (destination, me) = (destination.to_owned(), shared.instance.clone());
    shared
        .state
        .db
        .run(move |conn| {
            diesel::update(
                destinations::table
                    .filter(destinations::server_name.eq(&destination))
                    .filter(destinations::lease_owner.eq(&me)),
            )
            .set((destinations::failure_count.eq(failures), destinations::retry_at.eq(retry_at)))
            .execute(conn)?;
            Ok(())
        })
        .await
}

/// The destination's `retry_at` as stored (an operator's reset clears it).
pub(super) async fn stored_retry_at(shared: &Shared, destination: &str) -> Result<Option<i64>, DbError> {
    let destination = destination.to_owned();
    shared
        .state
        .db
        .run(move |conn| {
            Ok(destinations::table
                .filter(destinations::server_name.eq(&destination))
                .select(destinations::retry_at)
                .first::<Option<i64>>(conn)
                .optional()?
                .flatten())
        })
        .await
}

/// Takes (or renews) this instance's leases on `names` and reads their rows, in one statement
/// per 1,000; those another live instance holds, and names without a row, are left out.
pub(super) async fn take_leases(
    shared: &Shared,
    names: Vec<String>,
) -> Result<HashMap<String, DestinationRow>, DbError> {
    let (me, lease_ms) = (shared.instance.clone(), shared.lease_ms);
    shared
        .state
        .db
        .run(move |conn| {
            let now = now_ms();
            let mut taken = HashMap::with_capacity(names.len());
            for chunk in names.chunks(1000) {
                let rows: Vec<(String, i64, i32, Option<i64>)> = diesel::update(
                    destinations::table.filter(destinations::server_name.eq_any(chunk)).filter(
                        destinations::lease_owner
                            .is_null()
                            .or(destinations::lease_owner.eq(&me))
                            .or(destinations::lease_expires.lt(now)),
                    ),
                )
                .set((destinations::lease_owner.eq(&me), destinations::lease_expires.eq(now + lease_ms)))
                .returning((
                    destinations::server_name,
                    destinations::last_sent_pos,
                    destinations::failure_count,
                    destinations::retry_at,
                ))
                .get_results(conn)?;
                taken.extend(
                    rows.into_iter().map(|(name, cursor, failures, retry_at)| {
                        (name, DestinationRow { cursor, failures, retry_at })
                    }),
                );
            }
            Ok(taken)
        })
        .await
}

/// Extends this instance's leases on `held` (H4); returns those it still holds. A lease that
/// ran out but was not taken is ours again; one another instance took is not returned.
pub(super) async fn renew_leases(shared: &Shared, held: Vec<String>) -> Result<HashSet<String>, DbError> {
    let (me, lease_ms) = (shared.instance.clone(), shared.lease_ms);
    shared
        .state
        .db
        .run(move |conn| {
            let expires = now_ms() + lease_ms;
            let mut renewed = HashSet::with_capacity(held.len());
            for chunk in held.chunks(1000) {
                let names: Vec<String> = diesel::update(
                    destinations::table
                        .filter(destinations::server_name.eq_any(chunk))
                        .filter(destinations::lease_owner.eq(&me)),
                )
                .set(destinations::lease_expires.eq(expires))
                .returning(destinations::server_name)
                .get_results(conn)?;
                renewed.extend(names);
            }
            Ok(renewed)
        })
        .await
}

/// Releases this instance's leases on `names` (its workers there stopped), in one statement per
/// 1,000; a lease another instance took meanwhile stays its. A failure is only logged: an
/// unreleased lease runs out by itself.
pub(super) async fn release_leases(shared: &Shared, names: Vec<String>) {
    if names.is_empty() {
        return;
    }
    let me = shared.instance.clone();
    let released = shared
        .state
        .db
        .run::<_, DbError, _>(move |conn| {
            for chunk in names.chunks(1000) {
                diesel::update(
                    destinations::table
                        .filter(destinations::server_name.eq_any(chunk))
                        .filter(destinations::lease_owner.eq(&me)),
                )
                .set((destinations::lease_owner.eq(None::<String>), destinations::lease_expires.eq(None::<i64>)))
                .execute(conn)?;
            }
            Ok(())
        })
        .await;
    if let Err(e) = released {
        tracing::warn!(error = %e, "sender: cannot release leases (they run out by themselves)");
    }
}

/// Cursor moves of the fan-out path, persisted together: one statement per distinct cursor,
/// only for destinations this instance still holds (H4), and never backwards.
pub(super) async fn save_many(shared: &Shared, moves: Vec<(String, i64)>) -> Result<(), DbError> {
    let me = shared.instance.clone();
    let mut by_cursor: std::collections::BTreeMap<i64, Vec<String>> = std::collections::BTreeMap::new();
    for (destination, cursor) in moves {
        by_cursor.entry(cursor).or_default().push(destination);
    }
    shared
        .state
        .db
        .run(move |conn| {
            let now = now_ms();
            for (cursor, names) in by_cursor {
                for chunk in names.chunks(1000) {
                    diesel::update(
                        destinations::table
                            .filter(destinations::server_name.eq_any(chunk))
                            // A worker that just stopped has released its lease; what it
                            // sent is still ours to record until another instance takes over.
                            .filter(destinations::lease_owner.eq(&me).or(destinations::lease_owner.is_null()))
                            .filter(destinations::last_sent_pos.lt(cursor)),
                    )
                    .set((
                        destinations::last_sent_pos.eq(cursor),
                        destinations::failure_count.eq(0),
                        destinations::retry_at.eq(None::<i64>),
                        destinations::last_success_ts.eq(now),
                    ))
                    .execute(conn)?;
                }
            }
            Ok(())
        })
        .await
}

/// New events after `since` (up to `head`, at most `limit`) and the subscriptions in their
/// rooms, for the fan-out path: `(events, subscriptions)`.
pub(super) async fn fan_out_inputs(
    shared: &Shared,
    since: i64,
    head: i64,
    limit: i64,
) -> Result<(Vec<NewEvent>, Vec<Subscription>), DbError> {
    let our_server = shared.state.settings.server_name.to_string();
    shared
        .state
        .db
        .run(move |conn| {
            // Subscriptions first: most appends are in rooms nobody else reads, and then no
            // event JSON is read.
            let subscriptions = subscriptions::in_changed_rooms(conn, &our_server, since, head)?;
            if subscriptions.is_empty() {
                return Ok((Vec::new(), Vec::new()));
            }
            let mut rooms: Vec<&String> = subscriptions.iter().map(|s| &s.room_id).collect();
            rooms.sort();
            rooms.dedup();
            let rows: Vec<(i64, String, String, String)> = events::table
                .filter(events::stream_pos.gt(since))
                .filter(events::stream_pos.le(head))
                .filter(events::outlier.eq(false))
                .filter(events::rejected.eq(false))
                .filter(events::room_id.eq_any(rooms))
                .order(events::stream_pos.asc())
                .limit(limit)
                .select((events::stream_pos, events::room_id, events::sender, events::json))
                .load(conn)?;
            let events =
                rows.into_iter().map(|(pos, room_id, sender, json)| NewEvent { pos, room_id, sender, json }).collect();
            Ok((events, subscriptions))
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let cap = Duration::from_millis(crate::config::FederationConfig::default().max_backoff_ms);
        assert_eq!(cap, Duration::from_secs(24 * 3600), "design.md: 24 h by default");
        for _ in 0..50 {
            let first = backoff(1, cap);
            assert!(first >= Duration::from_millis(400) && first <= Duration::from_millis(600), "{first:?}");
            let second = backoff(2, cap);
            assert!(second >= Duration::from_millis(1600) && second <= Duration::from_millis(2400), "{second:?}");
            let fourth = backoff(4, cap);
            assert!(fourth >= Duration::from_millis(6400) && fourth <= Duration::from_millis(9600), "{fourth:?}");
            // H21: the default cap is reached (not a hard-coded hour), and never exceeded.
            for failures in [40, 100, i32::MAX] {
                let long = backoff(failures, cap);
                assert!(long >= cap.mul_f64(0.8) && long <= cap.mul_f64(1.2), "{long:?}");
            }
        }
    }

    #[test]
    fn backoff_cap_is_configurable() {
        let cap = Duration::from_secs(10);
        for _ in 0..50 {
            let long = backoff(100, cap);
            assert!(long >= Duration::from_secs(8) && long <= Duration::from_secs(12), "{long:?}");
            assert!(backoff(1, Duration::from_millis(100)) <= Duration::from_millis(120));
        }
        let big = Duration::from_secs(7 * 24 * 3600);
        assert!(backoff(100, big) >= big.mul_f64(0.8));
    }
}
