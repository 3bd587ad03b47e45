//! Durable delivery to peeking servers (design.md §4), after Lemmy's federation queue: the
//! events table is the queue; each destination keeps one persisted cursor (`last_sent_pos`) that
//! moves only over transactions answered 200; one task per destination batches at most 50 PDUs
//! per signed `/send`, retries the same transaction ID until it succeeds, and backs off with
//! jitter, so a slow or dead peer never delays another. Delivery is at-least-once: after a
//! restart a destination resends from its last persisted cursor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::web;
use diesel::prelude::*;
use rand::RngExt;
use reqwest::Method;
use ruma::OwnedServerName;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::db::schema::{destinations, events, inbound_peeks, peek_notices};
use crate::db::{DbConnection, DbError};
use crate::federation::client::FedRequest;
use crate::keys::now_ms;
use crate::state::AppState;

/// Spec limit of PDUs per transaction.
const MAX_PDUS_PER_TXN: i64 = 50;
/// Back-off: a short grace after the first failure, then 2 s doubling, capped.
const FIRST_RETRY: Duration = Duration::from_millis(500);
const BACKOFF_BASE: Duration = Duration::from_secs(2);
const BACKOFF_CAP: Duration = Duration::from_secs(3600);
/// A destination's lease; renewed on every loop of its worker.
const LEASE_MS: i64 = 30_000;
/// How often the manager looks for destinations with work, besides wake-ups.
const MANAGER_TICK: Duration = Duration::from_millis(500);
/// A full scan for destinations with work (start-up, and a safety net).
const FULL_SCAN_EVERY: Duration = Duration::from_secs(30);
/// How often the gauges are recomputed.
const GAUGE_EVERY: Duration = Duration::from_secs(5);
/// An idle worker exits after this long without work (the manager starts it again).
const WORKER_IDLE: Duration = Duration::from_secs(2);

/// Delay before retry number `failures` (1 = first failure), with ±20 % jitter.
pub fn backoff(failures: i32) -> Duration {
    let base = if failures <= 1 {
        FIRST_RETRY
    } else {
        let exp = (failures - 2).min(20) as u32;
        BACKOFF_BASE.saturating_mul(2u32.saturating_pow(exp)).min(BACKOFF_CAP)
    };
    base.mul_f64(rand::rng().random_range(0.8..1.2))
}

/// A running sender: stops on [`SenderHandle::stop`].
pub struct SenderHandle {
    shutdown: watch::Sender<bool>,
    manager: JoinHandle<()>,
}

impl SenderHandle {
    /// Stops the manager and every worker. A transaction in flight finishes (or times out); its
    /// cursor moves only if it succeeded, so nothing queued is lost.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.manager.await;
    }
}

struct Worker {
    wake: Arc<Notify>,
    task: JoinHandle<()>,
}

struct Shared {
    state: web::Data<AppState>,
    instance: String,
    txn_counter: AtomicU64,
    started_ms: i64,
    shutdown: watch::Receiver<bool>,
}

pub fn start(state: web::Data<AppState>) -> SenderHandle {
    let (shutdown, shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        instance: format!("{}-{}", std::process::id(), now_ms()),
        txn_counter: AtomicU64::new(0),
        started_ms: now_ms(),
        state,
        shutdown: shutdown_rx,
    });
    let manager = tokio::spawn(manage(shared));
    SenderHandle { shutdown, manager }
}

/// Starts a worker for every destination with work and wakes the running ones. Work is found
/// from what changed: the rooms of events appended since the last look, pending notices and
/// back-offs; a full scan runs at start and every [`FULL_SCAN_EVERY`] as a safety net.
async fn manage(shared: Arc<Shared>) {
    let mut stream = shared.state.rooms.subscribe();
    let mut shutdown = shared.shutdown.clone();
    let mut workers: HashMap<String, Worker> = HashMap::new();
    let mut seen_head: Option<i64> = None;
    let mut last_full_scan = Instant::now();
    let mut last_gauges = Instant::now() - GAUGE_EVERY;
    loop {
        let full = seen_head.is_none() || last_full_scan.elapsed() >= FULL_SCAN_EVERY;
        match destinations_with_work(&shared, if full { None } else { seen_head }).await {
            Ok((head, list)) => {
                seen_head = Some(head);
                if full {
                    last_full_scan = Instant::now();
                }
                workers.retain(|_, w| !w.task.is_finished());
                for destination in list {
                    match workers.get(&destination) {
                        Some(worker) => worker.wake.notify_one(),
                        None => {
                            let wake = Arc::new(Notify::new());
                            let task = tokio::spawn(run_worker(shared.clone(), destination.clone(), wake.clone()));
                            workers.insert(destination, Worker { wake, task });
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "sender: cannot list destinations"),
        }
        if last_gauges.elapsed() >= GAUGE_EVERY {
            update_gauges(&shared).await;
            last_gauges = Instant::now();
        }
        tokio::select! {
            _ = stream.changed() => {}
            _ = tokio::time::sleep(MANAGER_TICK) => {}
            _ = shutdown.changed() => break,
        }
    }
    for (_, worker) in workers.drain() {
        worker.wake.notify_one();
        let _ = worker.task.await;
    }
}

/// The head of the stream and the destinations with work. With `since`, only servers peeking a
/// room that has events after `since`; without, every server behind the head with a live or not
/// fully delivered peek. Both add servers with pending notices or a back-off in progress.
async fn destinations_with_work(shared: &Shared, since: Option<i64>) -> Result<(i64, Vec<String>), DbError> {
    shared
        .state
        .db
        .run(move |conn| {
            let now = now_ms();
            let head: Option<i64> = events::table.select(diesel::dsl::max(events::stream_pos)).first(conn)?;
            let head = head.unwrap_or(0);
            let mut list: Vec<String> = match since {
                Some(since) if since >= head => Vec::new(),
                Some(since) => {
                    let changed_rooms = events::table
                        .filter(events::stream_pos.gt(since))
                        .filter(events::stream_pos.le(head))
                        .select(events::room_id);
                    inbound_peeks::table
                        .filter(inbound_peeks::room_id.eq_any(changed_rooms))
                        .filter(inbound_peeks::end_stream_pos.is_null().or(inbound_peeks::end_stream_pos.gt(since)))
                        .select(inbound_peeks::origin)
                        .distinct()
                        .load(conn)?
                }
                // Only destinations behind the head: a peeker that is caught up has no work,
                // however many peeks it holds.
                None => destinations::table
                    .filter(destinations::last_sent_pos.lt(head))
                    .filter(diesel::dsl::exists(
                        inbound_peeks::table
                            .filter(inbound_peeks::origin.eq(destinations::server_name))
                            .filter(inbound_peeks::expires_ts.ge(now).or(inbound_peeks::end_stream_pos.is_not_null())),
                    ))
                    .select(destinations::server_name)
                    .load(conn)?,
            };
            let noticed: Vec<String> = peek_notices::table.select(peek_notices::destination).distinct().load(conn)?;
            let retrying: Vec<String> = destinations::table
                .filter(destinations::retry_at.is_not_null())
                .select(destinations::server_name)
                .load(conn)?;
            list.extend(noticed);
            list.extend(retrying);
            list.sort();
            list.dedup();
            Ok((head, list))
        })
        .await
}

async fn update_gauges(shared: &Shared) {
    let state = &shared.state;
    let counts = state
        .db
        .run::<_, DbError, _>(|conn| {
            let backing_off: i64 =
                destinations::table.filter(destinations::retry_at.gt(now_ms())).count().get_result(conn)?;
            Ok(backing_off)
        })
        .await;
    if let Ok(backing_off) = counts {
        state.metrics.destinations_backing_off(backing_off);
    }
    if let Ok(live) = state.inbound.live_count().await {
        state.metrics.inbound_peeks(live);
    }
}

/// What one transaction carries.
struct Batch {
    pdus: Vec<Value>,
    notices: Vec<(String, String)>,
    /// The cursor after this batch is delivered.
    next_cursor: i64,
}

#[derive(Debug)]
struct DestinationRow {
    cursor: i64,
    failures: i32,
    retry_at: Option<i64>,
}

async fn run_worker(shared: Arc<Shared>, destination: String, wake: Arc<Notify>) {
    let Ok(server) = OwnedServerName::try_from(destination.as_str()) else {
        tracing::warn!(destination, "sender: not a server name; skipping");
        return;
    };
    let mut shutdown = shared.shutdown.clone();
    // The lease makes this instance the only one moving the destination's cursor, so the row
    // read here stays true while we hold it.
    let mut row = match take_lease(&shared, &destination).await {
        Ok(Some(row)) => row,
        Ok(None) => return, // another instance owns this destination
        Err(e) => {
            tracing::warn!(destination, error = %e, "sender: cannot read destination");
            return;
        }
    };
    let mut lease_taken = Instant::now();
    loop {
        if *shutdown.borrow() {
            break;
        }
        if lease_taken.elapsed() > Duration::from_millis(LEASE_MS as u64 / 3) {
            match take_lease(&shared, &destination).await {
                Ok(Some(_)) => lease_taken = Instant::now(),
                _ => return,
            }
        }
        if let Some(retry_at) = row.retry_at {
            let wait = retry_at - now_ms();
            if wait > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                    _ = shutdown.changed() => break,
                }
            }
        }
        let batch = match next_batch(&shared, &destination, row.cursor).await {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(destination, error = %e, "sender: cannot read the queue");
                break;
            }
        };
        if batch.pdus.is_empty() && batch.notices.is_empty() {
            if batch.next_cursor != row.cursor {
                let _ = save_progress(&shared, &destination, batch.next_cursor, &[]).await;
                row = DestinationRow { cursor: batch.next_cursor, failures: 0, retry_at: None };
            }
            // Caught up: wait for the manager's wake-up, or exit (it starts us again).
            tokio::select! {
                _ = wake.notified() => continue,
                _ = tokio::time::sleep(WORKER_IDLE) => break,
                _ = shutdown.changed() => break,
            }
        }
        let next_cursor = batch.next_cursor;
        if !deliver(&shared, &server, &destination, row.failures, batch, &mut shutdown).await {
            break;
        }
        row = DestinationRow { cursor: next_cursor, failures: 0, retry_at: None };
    }
    release_lease(&shared, &destination).await;
}

/// Sends one batch, retrying the same transaction ID until it gets a 200. Returns `false` when
/// shutting down before it succeeded (the cursor stays where it was: at-least-once).
async fn deliver(
    shared: &Shared,
    server: &OwnedServerName,
    destination: &str,
    mut failures: i32,
    batch: Batch,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let txn_id = format!("{}-{}", shared.started_ms, shared.txn_counter.fetch_add(1, Ordering::Relaxed));
    let mut body = json!({
        "origin": shared.state.settings.server_name.as_str(),
        "origin_server_ts": now_ms(),
        "pdus": batch.pdus,
        "edus": [],
    });
    if !batch.notices.is_empty() {
        // PE-7: ended peeks, for receivers that understand it (others ignore unknown keys).
        body["expired_peeks"] =
            batch.notices.iter().map(|(room, peek)| json!({ "room_id": room, "peek_id": peek })).collect();
    }
    let path = format!("/_matrix/federation/v1/send/{txn_id}");
    let pdu_count = batch.pdus_len();
    loop {
        let started = Instant::now();
        let request = FedRequest {
            method: Method::PUT,
            destination: server,
            path: &path,
            body: Some(body.clone()),
            signed: true,
        };
        let result = shared.state.federation.send(request).await;
        let ok = result.is_ok();
        shared.state.metrics.sent_transaction(ok, pdu_count, started.elapsed());
        if ok {
            if let Err(e) = save_progress(shared, destination, batch.next_cursor, &batch.notices).await {
                tracing::warn!(destination, error = %e, "sender: cannot save the cursor");
            }
            return true;
        }
        failures += 1;
        let delay = backoff(failures);
        tracing::info!(destination, txn_id, failures, delay_ms = delay.as_millis() as u64, error = %result.unwrap_err(), "sender: transaction failed; retrying");
        let _ = save_failure(shared, destination, failures, now_ms() + delay.as_millis() as i64).await;
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return false,
        }
    }
}

impl Batch {
    fn pdus_len(&self) -> usize {
        self.pdus.len()
    }
}

/// Events after `cursor` that the destination should get: those of rooms it peeks, after its
/// peek started, while the peek is live (or up to where the room ended it); never its own
/// events back (PE-2). Then the `expired_peeks` notices whose peek's last event is delivered.
async fn next_batch(shared: &Shared, destination: &str, cursor: i64) -> Result<Batch, DbError> {
    let destination = destination.to_owned();
    shared.state.db.run(move |conn| next_batch_blocking(conn, &destination, cursor)).await
}

fn next_batch_blocking(conn: &mut DbConnection, destination: &str, cursor: i64) -> Result<Batch, DbError> {
    let now = now_ms();
    // Read the head first: every event up to it has committed (appends commit in order), so
    // what the query below does not return up to the head is not for this destination.
    let head: Option<i64> = events::table.select(diesel::dsl::max(events::stream_pos)).first(conn)?;
    let head = head.unwrap_or(0);
    let own_events = format!("%:{}", destination.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
    let peeked = inbound_peeks::table
        .filter(inbound_peeks::origin.eq(destination))
        .filter(inbound_peeks::room_id.eq(events::room_id))
        .filter(inbound_peeks::start_stream_pos.lt(events::stream_pos))
        .filter(
            inbound_peeks::end_stream_pos
                .is_null()
                .and(inbound_peeks::expires_ts.ge(now))
                .or(inbound_peeks::end_stream_pos.ge(events::stream_pos.nullable())),
        );
    let rows: Vec<(i64, String)> = events::table
        .filter(events::stream_pos.gt(cursor))
        .filter(events::stream_pos.le(head))
        .filter(events::outlier.eq(false))
        .filter(events::rejected.eq(false))
        .filter(events::sender.not_like(own_events).escape('\\'))
        .filter(diesel::dsl::exists(peeked))
        .order(events::stream_pos.asc())
        .limit(MAX_PDUS_PER_TXN)
        .select((events::stream_pos, events::json))
        .load(conn)?;
    let next_cursor =
        if rows.len() as i64 == MAX_PDUS_PER_TXN { rows.last().map(|r| r.0).unwrap_or(head) } else { head };
    let pdus = rows.into_iter().filter_map(|(_, json)| serde_json::from_str(&json).ok()).collect();
    let notices: Vec<(String, String)> = peek_notices::table
        .filter(peek_notices::destination.eq(destination))
        .filter(peek_notices::after_pos.le(next_cursor))
        .select((peek_notices::room_id, peek_notices::peek_id))
        .limit(100)
        .load(conn)?;
    Ok(Batch { pdus, notices, next_cursor })
}

/// A 200: move the cursor, clear the failure state, drop the notices that went out.
async fn save_progress(
    shared: &Shared,
    destination: &str,
    cursor: i64,
    notices: &[(String, String)],
) -> Result<(), DbError> {
    let destination = destination.to_owned();
    let notices = notices.to_vec();
    shared
        .state
        .db
        .run(move |conn| {
            conn.transaction::<_, DbError, _>(|conn| {
                diesel::update(destinations::table.filter(destinations::server_name.eq(&destination)))
                    .set((
                        destinations::last_sent_pos.eq(cursor),
                        destinations::failure_count.eq(0),
                        destinations::retry_at.eq(None::<i64>),
                        destinations::last_success_ts.eq(now_ms()),
                    ))
                    .execute(conn)?;
                for (room, peek) in &notices {
                    diesel::delete(
                        peek_notices::table
                            .filter(peek_notices::destination.eq(&destination))
                            .filter(peek_notices::room_id.eq(room))
                            .filter(peek_notices::peek_id.eq(peek)),
                    )
                    .execute(conn)?;
                }
                Ok(())
            })
        })
        .await
}

async fn save_failure(shared: &Shared, destination: &str, failures: i32, retry_at: i64) -> Result<(), DbError> {
    let destination = destination.to_owned();
    shared
        .state
        .db
        .run(move |conn| {
            diesel::update(destinations::table.filter(destinations::server_name.eq(&destination)))
                .set((destinations::failure_count.eq(failures), destinations::retry_at.eq(retry_at)))
                .execute(conn)?;
            Ok(())
        })
        .await
}

/// Takes (or renews) this instance's lease on the destination and reads its row; `None` when
/// another live instance holds it.
async fn take_lease(shared: &Shared, destination: &str) -> Result<Option<DestinationRow>, DbError> {
    let (destination, me) = (destination.to_owned(), shared.instance.clone());
    shared
        .state
        .db
        .run(move |conn| {
            let now = now_ms();
            let taken = diesel::update(
                destinations::table.filter(destinations::server_name.eq(&destination)).filter(
                    destinations::lease_owner
                        .is_null()
                        .or(destinations::lease_owner.eq(&me))
                        .or(destinations::lease_expires.lt(now)),
                ),
            )
            .set((destinations::lease_owner.eq(&me), destinations::lease_expires.eq(now + LEASE_MS)))
            .execute(conn)?;
            if taken == 0 {
                return Ok(None);
            }
            let (cursor, failures, retry_at) = destinations::table
                .filter(destinations::server_name.eq(&destination))
                .select((destinations::last_sent_pos, destinations::failure_count, destinations::retry_at))
                .first(conn)?;
            Ok(Some(DestinationRow { cursor, failures, retry_at }))
        })
        .await
}

async fn release_lease(shared: &Shared, destination: &str) {
    let (destination, me) = (destination.to_owned(), shared.instance.clone());
    let _ = shared
        .state
        .db
        .run::<_, DbError, _>(move |conn| {
            diesel::update(
                destinations::table
                    .filter(destinations::server_name.eq(&destination))
                    .filter(destinations::lease_owner.eq(&me)),
            )
            .set((destinations::lease_owner.eq(None::<String>), destinations::lease_expires.eq(None::<i64>)))
            .execute(conn)?;
            Ok(())
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for _ in 0..50 {
            let first = backoff(1);
            assert!(first >= Duration::from_millis(400) && first <= Duration::from_millis(600), "{first:?}");
            let second = backoff(2);
            assert!(second >= Duration::from_millis(1600) && second <= Duration::from_millis(2400), "{second:?}");
            let fourth = backoff(4);
            assert!(fourth >= Duration::from_millis(6400) && fourth <= Duration::from_millis(9600), "{fourth:?}");
            assert!(backoff(100) <= BACKOFF_CAP.mul_f64(1.2));
        }
    }
}
