//! One destination's worker: takes the destination's lease, then delivers bodies handed over by
//! the fan-out path, or reads its own batches from the queue when it is behind, retrying each
//! transaction with the same ID until it gets a 200.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use ruma::OwnedServerName;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};

use super::queue::{self, backoff, DestinationRow, LEASE_MS};
use super::shared::{Prepared, Shared};
use crate::clock::now_ms;
use crate::federation::client::{FedRequest, FederationError};

/// An idle worker exits after this long (the manager starts it again when there is work).
const WORKER_IDLE: Duration = Duration::from_secs(60);

/// Why a worker stops before finishing.
struct Stop;

/// Marks one handed-over body as handled when dropped (also when the worker stops mid-way).
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

pub(super) async fn run(
    shared: Arc<Shared>,
    destination: String,
    wake: Arc<Notify>,
    mut prepared: mpsc::UnboundedReceiver<Prepared>,
    cursor: Arc<AtomicI64>,
) {
    let Ok(server) = OwnedServerName::try_from(destination.as_str()) else {
        tracing::warn!(destination, "sender: not a server name; skipping");
        return;
    };
    let mut shutdown = shared.shutdown.clone();
    // The lease makes this instance the only one moving the destination's cursor, so the row
    // read here stays true while we hold it.
    let mut row = match queue::take_lease(&shared, &destination).await {
        Ok(Some(row)) => row,
        Ok(None) => return, // another instance owns this destination
        Err(e) => {
            tracing::warn!(destination, error = %e, "sender: cannot read destination");
            return;
        }
    };
    cursor.store(row.cursor, Ordering::Release);
    let mut lease_taken = Instant::now();
    let mut needs_queue = true;
    loop {
        if *shutdown.borrow() {
            break;
        }
        if lease_taken.elapsed() > Duration::from_millis(LEASE_MS as u64 / 3) {
            match queue::take_lease(&shared, &destination).await {
                Ok(Some(_)) => lease_taken = Instant::now(),
                _ => break,
            }
        }
        if needs_queue {
            if catch_up(&shared, &server, &destination, &mut row, &cursor, &mut shutdown).await.is_err() {
                break;
            }
            needs_queue = false;
        }
        tokio::select! {
            message = prepared.recv() => match message {
                Some(p) if p.from == cursor.load(Ordering::Acquire) => {
                    let _done = InFlight(&shared);
                    if let Some(body) = &p.body {
                        let path = format!("/_matrix/federation/v1/send/{}", body.txn_id);
                        let attempt = || {
                            shared.state.federation.send_prepared(Method::PUT, &server, &path, body.json.clone(), &body.canonical)
                        };
                        if send_with_retries(&shared, &destination, &mut row.failures, body.pdus, attempt, &mut shutdown).await.is_err() {
                            break;
                        }
                    }
                    cursor.store(p.to, Ordering::Release);
                    row.cursor = p.to;
                    let _ = shared.progress.send((destination.clone(), p.to));
                }
                Some(_) => {
                    let _done = InFlight(&shared);
                    needs_queue = true;
                }
                None => break,
            },
            _ = wake.notified() => needs_queue = true,
            _ = tokio::time::sleep(WORKER_IDLE) => break,
            _ = shutdown.changed() => break,
        }
    }
    // Bodies still queued were not sent: the cursor did not move past them, so the next worker
    // resends them from the queue. Only the count needs settling.
    prepared.close();
    while prepared.try_recv().is_ok() {
        drop(InFlight(&shared));
    }
    queue::release_lease(&shared, &destination).await;
}

/// The queue path: batch after batch from the database until nothing is left.
async fn catch_up(
    shared: &Shared,
    server: &OwnedServerName,
    destination: &str,
    row: &mut DestinationRow,
    cursor: &AtomicI64,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), Stop> {
    loop {
        if let Some(retry_at) = row.retry_at.take() {
            let wait = retry_at - now_ms();
            if wait > 0 && wait_out_backoff(shared, destination, Duration::from_millis(wait as u64), shutdown).await? {
                row.failures = 0;
            }
        }
        let batch = queue::next_batch(shared, destination, row.cursor).await.map_err(|e| {
            tracing::warn!(destination, error = %e, "sender: cannot read the queue");
            Stop
        })?;
        if batch.pdus.is_empty() && batch.notices.is_empty() {
            if batch.next_cursor != row.cursor {
                let _ = queue::save_progress(shared, destination, batch.next_cursor, &[]).await;
                row.cursor = batch.next_cursor;
                cursor.store(row.cursor, Ordering::Release);
            }
            return Ok(());
        }
        let txn_id = shared.next_txn_id();
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
        let pdus = body["pdus"].as_array().map(Vec::len).unwrap_or(0);
        let attempt = || {
            shared.state.federation.send(FedRequest {
                method: Method::PUT,
                destination: server,
                path: &path,
                body: Some(body.clone()),
                signed: true,
            })
        };
        send_with_retries(shared, destination, &mut row.failures, pdus, attempt, shutdown).await?;
        if let Err(e) = queue::save_progress(shared, destination, batch.next_cursor, &batch.notices).await {
            tracing::warn!(destination, error = %e, "sender: cannot save the cursor");
        }
        row.cursor = batch.next_cursor;
        cursor.store(row.cursor, Ordering::Release);
    }
}

/// Sends one transaction (the same ID every time) until it gets a 200, backing off between
/// attempts; `Stop` when shutting down first (the cursor stays: at-least-once).
async fn send_with_retries<F, Fut>(
    shared: &Shared,
    destination: &str,
    failures: &mut i32,
    pdus: usize,
    mut attempt: F,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), Stop>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Value, FederationError>>,
{
    loop {
        let started = Instant::now();
        let result = attempt().await;
        shared.state.metrics.sent_transaction(result.is_ok(), pdus, started.elapsed());
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
                if wait_out_backoff(shared, destination, delay, shutdown).await? {
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
    shutdown: &mut watch::Receiver<bool>,
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
            _ = shutdown.changed() => return Err(Stop),
        }
        if let Ok(None) = queue::stored_retry_at(shared, destination).await {
            tracing::info!(destination, "sender: back-off cleared by an operator; retrying now");
            return Ok(true);
        }
    }
}
