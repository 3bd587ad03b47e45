//! One destination's worker, started by the manager under the destination's lease: delivers
//! bodies handed over by the fan-out path, or reads its own batches from the queue when woken
//! for it (far behind, notices, a back-off), retrying each transaction with the same ID until it
//! gets a 200. The manager releases the lease once the worker stopped.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ruma::OwnedServerName;
use serde_json::Value;
use tokio::sync::{mpsc, watch, Mutex, Notify};

use super::leases::Leases;
use super::queue::{self, backoff, DestinationRow};
use super::shared::{BodyFor, Prepared, Shared, Transaction, WorkerStatus};
use crate::clock::now_ms;
use crate::federation::client::FederationError;
use crate::federation::connection::DestinationConnection;

/// Why a worker stops before finishing.
struct Stop;

/// What the manager hands a worker it starts: the destination, its row as read when the
/// manager took its lease, and the worker's ends of the manager's channels.
pub(super) struct Assignment {
    pub server: OwnedServerName,
    /// Read under the lease, which makes this instance the only one moving the destination's
    /// cursor: it stays true while the lease is held.
    pub row: DestinationRow,
    /// Turns `true` at shutdown and when the lease is lost (see [`Leases::hold`]).
    pub stop: watch::Receiver<bool>,
    pub wake: Arc<Notify>,
    pub prepared: mpsc::Receiver<Prepared>,
    pub status: Arc<WorkerStatus>,
}

pub(super) async fn run(shared: Arc<Shared>, leases: Arc<Leases>, assignment: Assignment) {
    let Assignment { server, mut row, mut stop, wake, mut prepared, status } = assignment;
    let destination = server.to_string();
    // The worker's own kept-alive connection for its transactions (both paths).
    let connection = Mutex::new(DestinationConnection::new(shared.state.federation.clone(), server.clone()));
    // A worker starts where its cursor is stored and waits for the fan-out to catch it up (or
    // for the manager to wake it for its queue: far behind, notices); a back-off left by the
    // last worker is waited out first.
    let mut needs_queue = status.on_queue_path();
    loop {
        if *stop.borrow() {
            break;
        }
        if needs_queue {
            status.on_queue_path.store(true, Ordering::Release);
            if catch_up(&shared, &connection, &destination, &mut row, &status, &mut stop).await.is_err() {
                break;
            }
            needs_queue = false;
            status.on_queue_path.store(false, Ordering::Release);
        }
        tokio::select! {
            // A body handed over wins over the idle time running out at the same moment.
            biased;
            message = prepared.recv() => match message {
                // From where it is: at the body's start, or before it with nothing for it between.
                Some(p) if (p.quiet_from..=p.from).contains(&status.cursor()) => {
                    if let Some(BodyFor { body, slot }) = &p.body {
                        let authorization = body.header(*slot).await;
                        let attempt = || async { connection.lock().await.put_authorized(&body.path, &body.json, authorization).await };
                        if send_with_retries(&shared, &destination, &mut row.failures, body.pdus, &status, attempt, &mut stop).await.is_err() {
                            break;
                        }
                    }
                    status.cursor.store(p.to, Ordering::Release);
                    row.cursor = p.to;
                    let _ = shared.progress.send((destination.clone(), p.to));
                }
                Some(_) => needs_queue = true,
                None => break,
            },
            _ = wake.notified() => needs_queue = true,
            // Idle this long: stop (the manager starts a worker again when there is work). A
            // body the fan-out handed over just before the channel closed is counted as this
            // worker's, so it is still sent: the loop goes on until `recv` has none left.
            _ = tokio::time::sleep(shared.worker_idle) => {
                crate::pause::point(crate::pause::points::SENDER_WORKER_IDLE, &destination).await;
                prepared.close();
                if prepared.is_empty() {
                    break;
                }
            }
            _ = stop.changed() => break,
        }
    }
    // Bodies still queued were not sent: the cursor did not move past them, so the next worker
    // resends them from the queue.
    prepared.close();
    // The manager releases the lease in the database once it sees this task finished, together
    // with those of the other workers that stopped meanwhile.
    leases.forget(&destination);
}

/// The queue path: batch after batch from the database until nothing is left.
async fn catch_up(
    shared: &Shared,
    connection: &Mutex<DestinationConnection>,
    destination: &str,
    row: &mut DestinationRow,
    status: &WorkerStatus,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Stop> {
    loop {
        if let Some(retry_at) = row.retry_at.take() {
            let wait = retry_at - now_ms();
            if wait > 0 && wait_out_backoff(shared, destination, Duration::from_millis(wait as u64), stop).await? {
                row.failures = 0;
            }
        }
        let batch = queue::next_batch(shared, destination, row.cursor).await.map_err(|e| {
            tracing::warn!(destination, error = %e, "sender: cannot read the queue");
            Stop
        })?;
        if batch.pdus.is_empty() && batch.notices.is_empty() {
            if batch.next_cursor != row.cursor {
                save_progress(shared, destination, batch.next_cursor, &[]).await?;
                row.cursor = batch.next_cursor;
                status.cursor.store(row.cursor, Ordering::Release);
            }
            return Ok(());
        }
        let Transaction { path, canonical, pdus } = shared.transaction(batch.pdus, &batch.notices).map_err(|e| {
            tracing::warn!(destination, error = %e, "sender: a queued transaction is not canonical JSON");
            Stop
        })?;
        shared.state.metrics.queue_transaction();
        let attempt = || async { connection.lock().await.put(&path, canonical.as_bytes()).await };
        send_with_retries(shared, destination, &mut row.failures, pdus, status, attempt, stop).await?;
        save_progress(shared, destination, batch.next_cursor, &batch.notices).await?;
        row.cursor = batch.next_cursor;
        status.cursor.store(row.cursor, Ordering::Release);
    }
}

/// Saves the queue path's progress; `Stop` when this instance no longer holds the lease (H4:
/// only the holder moves the cursor). A database error is logged and the worker goes on: the
/// transaction is resent after a restart at worst.
async fn save_progress(
    shared: &Shared,
    destination: &str,
    cursor: i64,
    notices: &[(String, String)],
) -> Result<(), Stop> {
    match queue::save_progress(shared, destination, cursor, notices).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            tracing::warn!(destination, "sender: lost this destination to another instance; stopping");
            Err(Stop)
        }
        Err(e) => {
            tracing::warn!(destination, error = %e, "sender: cannot save the cursor");
            Ok(())
        }
    }
}

/// Sends one transaction (the same ID every time) until it gets a 200, backing off between
/// attempts; `Stop` when shutting down first (the cursor stays: at-least-once).
async fn send_with_retries<F, Fut>(
    shared: &Shared,
    destination: &str,
    failures: &mut i32,
    pdus: usize,
    status: &WorkerStatus,
    mut attempt: F,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Stop>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Value, FederationError>>,
{
    loop {
        let started = Instant::now();
        status.sending_since_ms.store(now_ms(), Ordering::Release);
        // A lost lease or a shutdown abandons the attempt: the cursor has not moved, so the
        // transaction is sent again by whoever holds the destination next (at least once).
        let result = tokio::select! {
            result = attempt() => Some(result),
            _ = stop.changed() => None,
        };
        status.sending_since_ms.store(0, Ordering::Release);
        let Some(result) = result.filter(|_| !*stop.borrow()) else {
            return Err(Stop);
        };
        shared.state.metrics.sent_transaction(result.is_ok(), pdus, started.elapsed());
        status.failing.store(result.is_err(), Ordering::Release);
        match result {
            Ok(_) => {
                *failures = 0;
                return Ok(());
            }
            Err(error) => {
                *failures += 1;
                let delay =
                    backoff(*failures, Duration::from_millis(shared.state.settings.raw.federation.max_backoff_ms));
                tracing::info!(destination, failures = *failures, delay_ms = delay.as_millis() as u64, %error, "sender: transaction failed; retrying");
                let _ = queue::save_failure(shared, destination, *failures, now_ms() + delay.as_millis() as i64).await;
                if wait_out_backoff(shared, destination, delay, stop).await? {
                    *failures = 0;
                }
            }
        }
    }
}

/// How often a backing-off worker looks whether an operator cleared its back-off from another
/// process (`peekgate destinations reset`).
const RESET_POLL: Duration = Duration::from_secs(2);

/// Sleeps out a back-off, or less when an operator resets the destination (the HTTP admin API
/// wakes us at once; the CLI clears `retry_at`, seen within [`RESET_POLL`]). `Ok(true)` after a
/// reset.
async fn wait_out_backoff(
    shared: &Shared,
    destination: &str,
    delay: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Result<bool, Stop> {
    let until = Instant::now() + delay;
    let mut resets = shared.state.destination_resets.clone();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        tokio::select! {
            _ = tokio::time::sleep(left.min(RESET_POLL)) => {}
            _ = resets.changed() => {}
            _ = stop.changed() => return Err(Stop),
        }
        if let Ok(None) = queue::stored_retry_at(shared, destination).await {
            tracing::info!(destination, "sender: back-off cleared by an operator; retrying now");
            return Ok(true);
        }
    }
}
