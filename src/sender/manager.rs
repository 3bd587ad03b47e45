//! The manager: starts one worker per destination with work, feeds workers through the
//! fan-out path (one body serialised for many destinations), and wakes the others for the
//! queue path.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use ruma::OwnedServerName;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use super::destinations;
use super::fan_out::{self, WorkerHandle, HANDOFF_CAPACITY};
use super::leases::{self, Leases};
use super::queue::{release_leases, save_many, take_leases};
use super::shared::{SenderContext, Shared, WorkerStatus};
use super::worker::{self, Assignment};
use crate::clock::now_ms;
use crate::db::schema::{self, events, inbound_peeks, joined_servers, peek_notices};
use crate::db::{DbConnection, DbError};

/// How often the manager looks for destinations with work, besides wake-ups.
const MANAGER_TICK: Duration = Duration::from_millis(500);
/// A full scan for destinations with work (start-up, and a safety net).
const FULL_SCAN_EVERY: Duration = Duration::from_secs(30);
/// How often the gauges are recomputed.
const GAUGE_EVERY: Duration = Duration::from_secs(5);
/// Longest wait for the previous fan-out round before starting the next.
const COALESCE_WAIT: Duration = Duration::from_millis(100);
/// Cursor moves of the fan-out path are written this long after the first of them, together
/// (under a steady stream, one statement per few rounds). A crash loses at most this much of
/// them: those transactions are sent again (at least once; receivers drop PDUs they have).
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// While the fan-out is catching workers up, the manager looks again this soon even when
/// nothing new arrived (a worker whose peer was slow takes bodies again once it has answered).
const LAGGARD_TICK: Duration = Duration::from_millis(20);

/// A running sender: stops on [`SenderHandle::stop`].
pub struct SenderHandle {
    shutdown: watch::Sender<bool>,
    manager: JoinHandle<()>,
    /// The sender's own threads (see [`sender_runtime`]); `None` once stopped.
    runtime: Option<tokio::runtime::Runtime>,
}

impl SenderHandle {
    /// Stops the manager and every worker. A transaction in flight finishes (or times out); its
    /// cursor moves only if it succeeded, so nothing queued is lost.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        let _ = (&mut self.manager).await;
    }
}

impl Drop for SenderHandle {
    fn drop(&mut self) {
        // Dropping a runtime waits for its threads, which async code must not do.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// How much lower than the rest of the server the sender's threads run (a nice increment).
const SENDER_NICENESS: i32 = 10;

/// Delivery is background work: the sender runs on threads of its own, at a lower CPU priority
/// than the rest of the server. Fanning an event out to a thousand servers keeps both cores
/// busy for tens of milliseconds; at equal priority every round trip of an append (a dozen per
/// event, under the append lock) waited behind it, and appends, not delivery, bounded the
/// sustained rate. Now appends and client requests come first, and the fan-out uses what they
/// leave, in bigger transactions.
///
/// The sender's database work does not run here but on the blocking threads of the runtime
/// that started it, at the normal priority (see [`Db::blocking_on`](crate::db::Db::blocking_on)).
fn sender_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("peekgate-sender")
        .on_thread_start(lower_this_threads_priority)
        .enable_all()
        .build()
}

/// On Linux the nice value is per thread, so this lowers only the calling thread.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system calls on the calling thread; a failure leaves the priority as it was.
    unsafe {
        let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let current = libc::getpriority(libc::PRIO_PROCESS, thread);
        libc::setpriority(libc::PRIO_PROCESS, thread, (current + SENDER_NICENESS).min(19));
    }
}

pub fn start(mut state: SenderContext) -> SenderHandle {
    if let Ok(here) = tokio::runtime::Handle::try_current() {
        state.db = state.db.blocking_on(here);
    }
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (progress, progress_rx) = mpsc::unbounded_channel();
    let lease_ms = state.settings.raw.federation.sender_lease_ms as i64;
    let worker_idle = Duration::from_millis(state.settings.raw.federation.sender_idle_ms);
    let shared = Arc::new(Shared {
        instance: state.instance_id.clone(),
        txn_counter: AtomicU64::new(0),
        started_ms: now_ms(),
        state,
        shutdown: shutdown_rx,
        progress,
        lease_ms,
        worker_idle,
    });
    let runtime = match sender_runtime() {
        Ok(runtime) => Some(runtime),
        Err(e) => {
            tracing::warn!(error = %e, "sender: cannot start its own threads; it shares the server's");
            None
        }
    };
    let manager = match &runtime {
        Some(runtime) => runtime.spawn(manage(shared, progress_rx)),
        None => tokio::spawn(manage(shared, progress_rx)),
    };
    SenderHandle { shutdown, manager, runtime }
}

/// Starts and feeds workers. Work is found from what changed (the rooms of new events, pending
/// notices, back-offs); a full scan runs at start and every [`FULL_SCAN_EVERY`] as a safety net.
async fn manage(shared: Arc<Shared>, progress: mpsc::UnboundedReceiver<(String, i64)>) {
    let workers_done = Arc::new(Notify::new());
    let flusher = tokio::spawn(flush_progress(shared.clone(), progress, workers_done.clone()));
    let leases = Arc::new(Leases::default());
    let lease_keeper = tokio::spawn(leases::keep(shared.clone(), leases.clone()));
    let mut stream = shared.state.rooms.subscribe();
    let mut shutdown = shared.shutdown.clone();
    let mut workers: HashMap<String, WorkerHandle> = HashMap::new();
    let mut seen_head: Option<i64> = None;
    let mut last_full_scan = Instant::now();
    let mut last_gauges = Instant::now() - GAUGE_EVERY;
    // The workers handed bodies in the last round, and the cursor each will have after them.
    let mut handed: Vec<(Arc<WorkerStatus>, i64)> = Vec::new();
    loop {
        let full = seen_head.is_none() || last_full_scan.elapsed() >= FULL_SCAN_EVERY;
        let mut burst_left = false;
        let mut laggards = false;
        match destinations_with_work(&shared, if full { None } else { seen_head }).await {
            Ok(Work { head, changed, waiting }) => {
                let round = match seen_head.filter(|_| !full) {
                    Some(since) => fan_out::round(&shared, &mut workers, since, head).await,
                    None => fan_out::Round { reached: head, ..fan_out::Round::default() },
                };
                handed = round
                    .handed
                    .iter()
                    .filter_map(|d| workers.get(d))
                    .map(|w| (w.status.clone(), w.handed_up_to()))
                    .collect();
                seen_head = Some(round.reached);
                burst_left = round.reached < head;
                laggards = round.laggards;
                if full {
                    last_full_scan = Instant::now();
                }
                let behind: Vec<&String> = changed.iter().filter(|d| !round.served.contains(*d)).collect();
                // Notices and back-offs are the queue path's work, and so are bodies that could
                // not be prepared. Notices are woken for even when the fan-out keeps a worker
                // busy, or they would wait for a quiet moment in the room.
                let queue_work: Vec<&String> = waiting.iter().chain(&round.to_queue).collect();
                let wanted = behind.iter().chain(&queue_work).copied().collect();
                // A worker that went idle and stopped just now is replaced at once if there is
                // work for it; until the next full scan nothing else would notice.
                reap_finished_workers(&shared, &mut workers).await;
                // New workers the fan-out is to catch up are served in the next round, soon.
                laggards |= start_workers(&shared, &leases, &mut workers, wanted).await;
                for destination in behind {
                    if let Some(worker) = workers.get(destination).filter(|w| !w.left_to_catch_up(round.reached)) {
                        worker.wake.notify_one();
                    }
                }
                for destination in queue_work {
                    if let Some(worker) = workers.get(destination) {
                        worker.wake.notify_one();
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "sender: cannot list destinations"),
        }
        if last_gauges.elapsed() >= GAUGE_EVERY {
            update_gauges(&shared).await;
            last_gauges = Instant::now();
        }
        if burst_left {
            if *shutdown.borrow() {
                break;
            }
        } else {
            let tick = if laggards { LAGGARD_TICK } else { MANAGER_TICK };
            tokio::select! {
                _ = stream.changed() => {}
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => break,
            }
        }
        // Let the previous round drain (at most COALESCE_WAIT) so that events arriving
        // meanwhile travel together. Stalled workers are not waited for (H5).
        let waiting = Instant::now();
        while waiting.elapsed() < COALESCE_WAIT
            && handed.iter().any(|(status, to)| status.cursor() < *to && !status.stalled(now_ms()))
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // The keeper stops every worker at shutdown.
    let _ = lease_keeper.await;
    let mut stopped = Vec::with_capacity(workers.len());
    for (destination, worker) in workers.drain() {
        worker.wake.notify_one();
        let _ = worker.task.await;
        stopped.push(destination);
    }
    release_leases(&shared, stopped).await;
    // Workers are gone: the flusher writes what they left and ends.
    workers_done.notify_one();
    let _ = flusher.await;
}

/// Forgets the workers that stopped (idle, lease lost, a database error) and releases their
/// leases in one statement: a thousand workers going idle together are one `UPDATE`, not a
/// thousand blocking threads each waiting for a connection to write its own.
async fn reap_finished_workers(shared: &Shared, workers: &mut HashMap<String, WorkerHandle>) {
    let finished: Vec<String> = workers.iter().filter(|(_, w)| w.task.is_finished()).map(|(d, _)| d.clone()).collect();
    for destination in &finished {
        workers.remove(destination);
    }
    release_leases(shared, finished).await;
}

/// Starts workers for those of `destinations` without one: their leases are taken in one
/// statement, and each worker starts at its stored cursor. A thousand workers starting together
/// used to take a lease and read their queue each, at once: hundreds of blocking threads waiting
/// for a connection. Now the fan-out catches most of them up together in the next round.
/// Destinations another instance holds are left to it. Returns whether any worker started.
async fn start_workers(
    shared: &Arc<Shared>,
    leases: &Arc<Leases>,
    workers: &mut HashMap<String, WorkerHandle>,
    destinations: BTreeSet<&String>,
) -> bool {
    let names: Vec<String> = destinations
        .into_iter()
        .filter(|d| !workers.contains_key(*d))
        .filter(|d| {
            let valid = OwnedServerName::try_from(d.as_str()).is_ok();
            if !valid {
                tracing::warn!(destination = %d, "sender: not a server name; skipping");
            }
            valid
        })
        .cloned()
        .collect();
    if names.is_empty() {
        return false;
    }
    let rows = match take_leases(shared, names).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, "sender: cannot take destinations' leases");
            return false;
        }
    };
    let started = !rows.is_empty();
    for (destination, row) in rows {
        let Ok(server) = OwnedServerName::try_from(destination.as_str()) else { continue };
        let wake = Arc::new(Notify::new());
        let (tx, prepared) = mpsc::channel(HANDOFF_CAPACITY);
        let status = Arc::new(WorkerStatus::starting_at(row.cursor, row.retry_at.is_some()));
        let stop = leases.hold(&destination);
        let assignment = Assignment { server, row, stop, wake: wake.clone(), prepared, status: status.clone() };
        let task = tokio::spawn(worker::run(shared.clone(), leases.clone(), assignment));
        workers.insert(destination, WorkerHandle::new(wake, tx, status, task));
    }
    started
}

/// Writes the fan-out path's cursor moves, batched: [`FLUSH_EVERY`] after the first move of a
/// round, so that a round's 1,000 answers make one statement (per position), not one per few
/// answers as they trickle in. A move not yet written is only resent after a crash.
/// Ends when `workers_done` fires (every worker stopped), after writing what is pending.
async fn flush_progress(
    shared: Arc<Shared>,
    mut progress: mpsc::UnboundedReceiver<(String, i64)>,
    workers_done: Arc<Notify>,
) {
    let mut pending: HashMap<String, i64> = HashMap::new();
    let note = |pending: &mut HashMap<String, i64>, (destination, cursor): (String, i64)| {
        let entry = pending.entry(destination).or_insert(cursor);
        *entry = (*entry).max(cursor);
    };
    let mut open = true;
    while open {
        tokio::select! {
            item = progress.recv() => match item {
                Some(moved) => note(&mut pending, moved),
                None => open = false,
            },
            _ = workers_done.notified() => open = false,
        }
        if open {
            tokio::select! {
                _ = tokio::time::sleep(FLUSH_EVERY) => {}
                _ = workers_done.notified() => open = false,
            }
        }
        while let Ok(moved) = progress.try_recv() {
            note(&mut pending, moved);
        }
        if !pending.is_empty() {
            let moves: Vec<(String, i64)> = pending.drain().collect();
            if let Err(e) = save_many(&shared, moves).await {
                tracing::warn!(error = %e, "sender: cannot save cursors (they are resent after a restart)");
            }
        }
    }
}

/// The head of the stream and the destinations with work (each list sorted, without repeats).
struct Work {
    head: i64,
    /// Servers with events to get: the fan-out may serve them.
    changed: Vec<String>,
    /// Servers with a pending notice or a back-off in progress: work for the queue path.
    waiting: Vec<String>,
}

/// The destinations with work. With `since`, only servers peeking a room that has events after
/// `since`; without, every server behind the head with a live or not fully delivered peek. Both
/// add the servers with pending notices or a back-off in progress.
///
/// The manager asks this on every wake-up, so the usual case (`since`) is one query after the
/// head's: the four sources in one `UNION`, not a round trip each.
async fn destinations_with_work(shared: &Shared, since: Option<i64>) -> Result<Work, DbError> {
    shared
        .state
        .db
        .run(move |conn| {
            let head = crate::rooms::store::stream_head(conn)?;
            let (mut changed, mut waiting) = match since {
                Some(since) => changed_or_waiting(conn, since, head)?,
                None => {
                    let (_, waiting) = changed_or_waiting(conn, head, head)?;
                    (behind_head(conn, head)?, waiting)
                }
            };
            for list in [&mut changed, &mut waiting] {
                list.sort();
                list.dedup();
            }
            Ok(Work { head, changed, waiting })
        })
        .await
}

/// Servers peeking or joined to a room with events in `(since, head]` (none when `since` is the
/// head), and apart from them the servers with a pending notice or a back-off in progress.
fn changed_or_waiting(conn: &mut DbConnection, since: i64, head: i64) -> Result<(Vec<String>, Vec<String>), DbError> {
    use diesel::dsl::sql;
    use diesel::sql_types::Bool;
    let changed_rooms = || {
        events::table.filter(events::stream_pos.gt(since)).filter(events::stream_pos.le(head)).select(events::room_id)
    };
    // The second column tells the two kinds apart: `false` for changed, `true` for waiting.
    let peeking = inbound_peeks::table
        .filter(inbound_peeks::room_id.eq_any(changed_rooms()))
        .filter(inbound_peeks::end_stream_pos.is_null().or(inbound_peeks::end_stream_pos.gt(since)))
        .select((inbound_peeks::origin, sql::<Bool>("1 = 0")));
    let joined = joined_servers::table
        .filter(joined_servers::room_id.eq_any(changed_rooms()))
        .filter(joined_servers::end_stream_pos.is_null().or(joined_servers::end_stream_pos.gt(since)))
        .select((joined_servers::server_name, sql::<Bool>("1 = 0")));
    let noticed = peek_notices::table.select((peek_notices::destination, sql::<Bool>("1 = 1")));
    let retrying = schema::destinations::table
        .filter(schema::destinations::retry_at.is_not_null())
        .select((schema::destinations::server_name, sql::<Bool>("1 = 1")));
    // diesel's multi-backend connection has no UNION; the same query runs on either backend.
    let rows =
        crate::on_backend!(conn, |c| peeking.union(joined).union(noticed).union(retrying).load::<(String, bool)>(c))?;
    let (waiting, changed): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(_, waiting)| *waiting);
    Ok((changed.into_iter().map(|r| r.0).collect(), waiting.into_iter().map(|r| r.0).collect()))
}

/// Every server behind the head with a live or not fully delivered peek or joined span (a
/// peeker that is caught up has no work, however many peeks it holds).
fn behind_head(conn: &mut DbConnection, head: i64) -> Result<Vec<String>, DbError> {
    let now = now_ms();
    Ok(schema::destinations::table
        .filter(schema::destinations::last_sent_pos.lt(head))
        .filter(
            diesel::dsl::exists(
                inbound_peeks::table
                    .filter(inbound_peeks::origin.eq(schema::destinations::server_name))
                    .filter(inbound_peeks::expires_ts.ge(now).or(inbound_peeks::end_stream_pos.is_not_null())),
            )
            .or(diesel::dsl::exists(
                joined_servers::table.filter(joined_servers::server_name.eq(schema::destinations::server_name)).filter(
                    joined_servers::end_stream_pos
                        .is_null()
                        .or(joined_servers::end_stream_pos.gt(schema::destinations::last_sent_pos.nullable())),
                ),
            )),
        )
        .select(schema::destinations::server_name)
        .load(conn)?)
}

async fn update_gauges(shared: &Shared) {
    let state = &shared.state;
    if let Ok(count) = destinations::backing_off_count(&state.db, now_ms()).await {
        state.metrics.destinations_backing_off(count);
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use crate::db::{Db, DbError};

    fn this_threads_niceness() -> i32 {
        // SAFETY: plain system calls about the calling thread.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::syscall(libc::SYS_gettid) as libc::id_t) }
    }

    /// The fan-out runs lower; the sender's database work does not (a starved thread holding a
    /// pool connection or SQLite's write lock would hold up everyone else).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sender_runs_lower_but_its_database_work_does_not() {
        let normal = this_threads_niceness();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("db.sqlite").display());
        let db = Db::connect(&url, 2).unwrap().blocking_on(tokio::runtime::Handle::current());
        let runtime = crate::sender::manager::sender_runtime().unwrap();
        let (sending, database) = runtime
            .spawn(async move {
                let database = db.run(|_| Ok::<_, DbError>(this_threads_niceness())).await.unwrap();
                (this_threads_niceness(), database)
            })
            .await
            .unwrap();
        runtime.shutdown_background();
        assert_eq!(sending, (normal + crate::sender::manager::SENDER_NICENESS).min(19), "a sender thread");
        assert_eq!(database, normal, "the sender's database work");
    }
}
