//! The manager: starts one worker per destination with work, and feeds caught-up workers
//! through the fan-out path (one body serialised for many destinations).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use diesel::prelude::*;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use super::queue::{fan_out_inputs, save_many};
use super::subscriptions::NewEvent;

use super::leases::{self, Leases};
use super::shared::{BodyFor, Prepared, PreparedBody, SenderContext, Shared, WorkerStatus};
use super::{destinations, worker};
use crate::clock::now_ms;
use crate::db::schema::{self, events, inbound_peeks, joined_servers, peek_notices};
use crate::db::{DbConnection, DbError};

/// How often the manager looks for destinations with work, besides wake-ups.
const MANAGER_TICK: Duration = Duration::from_millis(500);
/// A full scan for destinations with work (start-up, and a safety net).
const FULL_SCAN_EVERY: Duration = Duration::from_secs(30);
/// How often the gauges are recomputed.
const GAUGE_EVERY: Duration = Duration::from_secs(5);
/// Events per fan-out chunk: one transaction (the spec allows 50 PDUs).
const FAN_OUT_MAX_EVENTS: i64 = 50;
/// Chunks per manager round; a longer burst continues in the next round at once. Bounds the
/// bodies one round queues for each worker.
const FAN_OUT_MAX_CHUNKS: usize = 4;
/// Longest wait for the previous fan-out round before starting the next.
const COALESCE_WAIT: Duration = Duration::from_millis(100);
/// Cursor moves of the fan-out path are written this long after the first of them, together
/// (under a steady stream, one statement per few rounds). A crash loses at most this much of
/// them: those transactions are sent again (at least once; receivers drop PDUs they have).
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Bodies handed to one worker and not yet taken (H5): a worker whose peer is slow holds at
/// most this many (one round's chunks); after that it catches up from the queue instead.
const HANDOFF_CAPACITY: usize = FAN_OUT_MAX_CHUNKS;

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

/// What the manager keeps per running worker.
struct WorkerHandle {
    wake: Arc<Notify>,
    prepared: mpsc::Sender<Prepared>,
    /// The worker's cursor, and whether it is stalled on a failing or silent peer.
    status: Arc<WorkerStatus>,
    /// The cursor the worker will have once it has handled what it was handed (manager side).
    promised: i64,
    task: JoinHandle<()>,
}

pub fn start(mut state: SenderContext) -> SenderHandle {
    if let Ok(here) = tokio::runtime::Handle::try_current() {
        state.db = state.db.blocking_on(here);
    }
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (progress, progress_rx) = mpsc::unbounded_channel();
    let lease_ms = state.settings.raw.federation.sender_lease_ms as i64;
    let shared = Arc::new(Shared {
        instance: state.instance_id.clone(),
        txn_counter: AtomicU64::new(0),
        started_ms: now_ms(),
        state,
        shutdown: shutdown_rx,
        progress,
        lease_ms,
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
        workers.retain(|_, w| !w.task.is_finished());
        let full = seen_head.is_none() || last_full_scan.elapsed() >= FULL_SCAN_EVERY;
        let mut burst_left = false;
        match destinations_with_work(&shared, if full { None } else { seen_head }).await {
            Ok((head, list)) => {
                let (served, reached) = match seen_head.filter(|since| *since < head && !full) {
                    Some(since) => fan_out(&shared, &mut workers, since, head).await,
                    None => (BTreeSet::new(), head),
                };
                handed = served.iter().filter_map(|d| workers.get(d)).map(|w| (w.status.clone(), w.promised)).collect();
                seen_head = Some(reached);
                burst_left = reached < head;
                if full {
                    last_full_scan = Instant::now();
                }
                // Everything the fan-out did not hand over goes through the queue path.
                for destination in list.iter().filter(|d| !served.contains(*d)) {
                    ensure_worker(&shared, &leases, &mut workers, destination).wake.notify_one();
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
            tokio::select! {
                _ = stream.changed() => {}
                _ = tokio::time::sleep(MANAGER_TICK) => {}
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
    for (_, worker) in workers.drain() {
        worker.wake.notify_one();
        let _ = worker.task.await;
    }
    // Workers are gone: the flusher writes what they left and ends.
    workers_done.notify_one();
    let _ = flusher.await;
}

fn ensure_worker<'a>(
    shared: &Arc<Shared>,
    leases: &Arc<Leases>,
    workers: &'a mut HashMap<String, WorkerHandle>,
    destination: &str,
) -> &'a WorkerHandle {
    workers.entry(destination.to_owned()).or_insert_with(|| {
        let wake = Arc::new(Notify::new());
        let (tx, rx) = mpsc::channel(HANDOFF_CAPACITY);
        let status = Arc::new(WorkerStatus::new());
        let task = tokio::spawn(worker::run(
            shared.clone(),
            leases.clone(),
            destination.to_owned(),
            wake.clone(),
            rx,
            status.clone(),
        ));
        WorkerHandle { wake, prepared: tx, status, promised: -1, task }
    })
}

/// The fan-out path for events in `(since, head]`, in chunks of one transaction, at most
/// [`FAN_OUT_MAX_CHUNKS`] of them: a burst is read once for every caught-up worker instead of
/// by each worker from the queue (with 1,000 destinations that storm halved the sustained
/// delivery rate). Returns the destinations handed everything up to the returned position:
/// `head`, or less when the burst continues in the next round.
async fn fan_out(
    shared: &Arc<Shared>,
    workers: &mut HashMap<String, WorkerHandle>,
    since: i64,
    head: i64,
) -> (BTreeSet<String>, i64) {
    let mut served: Option<BTreeSet<String>> = None;
    let mut from = since;
    for _ in 0..FAN_OUT_MAX_CHUNKS {
        if from >= head {
            break;
        }
        let to = head.min(from + FAN_OUT_MAX_EVENTS);
        let Some(chunk) = fan_out_chunk(shared, workers, from, to).await else {
            // The queue path delivers everything from each worker's own cursor.
            return (BTreeSet::new(), head);
        };
        served = Some(match served {
            None => chunk,
            Some(before) => before.intersection(&chunk).cloned().collect(),
        });
        from = to;
    }
    (served.unwrap_or_default(), from)
}

/// One chunk of [`fan_out`]: read the events in `(since, head]` and the peeks on their rooms
/// once, build one body per distinct set of PDUs, and hand it to each caught-up worker.
/// Destinations whose worker is not caught up, stalled on its peer (H5), already holds
/// [`HANDOFF_CAPACITY`] bodies, or is not running are left to the queue path.
/// Returns the destinations it handed a body (or a cursor move) to; `None` when the read failed.
async fn fan_out_chunk(
    shared: &Arc<Shared>,
    workers: &mut HashMap<String, WorkerHandle>,
    since: i64,
    head: i64,
) -> Option<BTreeSet<String>> {
    let mut served = BTreeSet::new();
    let (new_events, subscriptions) = match fan_out_inputs(shared, since, head, FAN_OUT_MAX_EVENTS).await {
        Ok(inputs) => inputs,
        Err(e) => {
            tracing::warn!(error = %e, "sender: fan-out read failed; the queue path will deliver");
            return None;
        }
    };
    let now = now_ms();
    let mut wanted: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for subscription in &subscriptions {
        let entry = wanted.entry(subscription.destination.clone()).or_default();
        entry.extend(new_events.iter().enumerate().filter(|(_, e)| subscription.wants(e, now)).map(|(i, _)| i));
    }
    let (handed, audiences) = assign_audiences(workers, wanted, since, now);
    let bodies: Vec<Option<Arc<PreparedBody>>> = audiences
        .into_iter()
        .map(|(indices, audience)| prepare(shared, &new_events, &indices, audience).map(Arc::new))
        .collect();
    for (destination, place) in handed {
        let body = match place {
            None => None,
            Some((number, slot)) => match &bodies[number] {
                Some(body) => Some(BodyFor { body: body.clone(), slot }),
                None => continue, // left to the queue path
            },
        };
        let Some(worker) = workers.get_mut(&destination) else { continue };
        if worker.prepared.try_send(Prepared { from: since, to: head, body }).is_ok() {
            worker.promised = head;
            served.insert(destination);
        }
    }
    Some(served)
}

/// A destination to hand something to: its audience and slot there, or `None` for a bare
/// cursor move (nothing in the chunk for it).
type Handout = (String, Option<(usize, usize)>);
/// The PDUs (indices into the chunk's events) one body carries, and the destinations getting it.
type Audience = (Vec<usize>, Vec<String>);

/// Which caught-up workers take a body now and which PDUs each gets, grouped into one audience
/// per distinct set of PDUs. Workers that are not running, not exactly caught up to
/// `since`, stalled (H5) or without room for another body are left to the queue path; only the
/// manager hands bodies over, so room found here is still there when it does.
fn assign_audiences(
    workers: &HashMap<String, WorkerHandle>,
    wanted: BTreeMap<String, Vec<usize>>,
    since: i64,
    now: i64,
) -> (Vec<Handout>, Vec<Audience>) {
    let mut handed = Vec::new();
    let mut audiences: Vec<Audience> = Vec::new();
    let mut audience_of: HashMap<Vec<usize>, usize> = HashMap::new();
    for (destination, mut indices) in wanted {
        indices.sort_unstable();
        indices.dedup();
        let Some(worker) = workers.get(&destination) else {
            continue; // not running: the work list starts it on the queue path
        };
        // Bodies queue up in order behind the ones the worker is still sending, as long as they
        // follow on exactly.
        let expected = worker.promised.max(worker.status.cursor());
        if expected != since || worker.status.stalled(now) || worker.prepared.capacity() == 0 {
            continue;
        }
        if indices.is_empty() {
            handed.push((destination, None));
            continue;
        }
        let number = *audience_of.entry(indices).or_insert_with_key(|indices| {
            audiences.push((indices.clone(), Vec::new()));
            audiences.len() - 1
        });
        let audience = &mut audiences[number].1;
        handed.push((destination.clone(), Some((number, audience.len()))));
        audience.push(destination);
    }
    (handed, audiences)
}

/// Serialises a transaction once, as canonical JSON (sent as it is, and signed for each
/// destination of `audience`).
fn prepare(shared: &Shared, new_events: &[NewEvent], indices: &[usize], audience: Vec<String>) -> Option<PreparedBody> {
    let pdus = indices.iter().filter_map(|i| serde_json::from_str(&new_events[*i].json).ok()).collect();
    let transaction = shared
        .transaction(pdus, &[])
        .map_err(|e| tracing::warn!(error = %e, "sender: a transaction is not canonical JSON; the queue path will try"))
        .ok()?;
    let authorization = shared.state.federation.put_authorization(&transaction.path, &transaction.canonical);
    Some(PreparedBody::new(
        transaction.path,
        Bytes::from(transaction.canonical),
        transaction.pdus,
        authorization,
        audience,
    ))
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

/// The head of the stream and the destinations with work. With `since`, only servers peeking a
/// room that has events after `since`; without, every server behind the head with a live or not
/// fully delivered peek. Both add servers with pending notices or a back-off in progress.
///
/// The manager asks this on every wake-up, so the usual case (`since`) is one query after the
/// head's: the four sources in one `UNION`, not a round trip each.
async fn destinations_with_work(shared: &Shared, since: Option<i64>) -> Result<(i64, Vec<String>), DbError> {
    shared
        .state
        .db
        .run(move |conn| {
            let head = crate::rooms::store::stream_head(conn)?;
            let mut list = match since {
                Some(since) => changed_or_waiting(conn, since, head)?,
                None => {
                    let mut list = behind_head(conn, head)?;
                    list.extend(changed_or_waiting(conn, head, head)?);
                    list
                }
            };
            list.sort();
            list.dedup();
            Ok((head, list))
        })
        .await
}

/// Servers peeking or joined to a room with events in `(since, head]` (none when `since` is the
/// head), and servers with a pending notice or a back-off in progress.
fn changed_or_waiting(conn: &mut DbConnection, since: i64, head: i64) -> Result<Vec<String>, DbError> {
    let changed_rooms = || {
        events::table.filter(events::stream_pos.gt(since)).filter(events::stream_pos.le(head)).select(events::room_id)
    };
    let peeking = inbound_peeks::table
        .filter(inbound_peeks::room_id.eq_any(changed_rooms()))
        .filter(inbound_peeks::end_stream_pos.is_null().or(inbound_peeks::end_stream_pos.gt(since)))
        .select(inbound_peeks::origin);
    let joined = joined_servers::table
        .filter(joined_servers::room_id.eq_any(changed_rooms()))
        .filter(joined_servers::end_stream_pos.is_null().or(joined_servers::end_stream_pos.gt(since)))
        .select(joined_servers::server_name);
    let noticed = peek_notices::table.select(peek_notices::destination);
    let retrying = schema::destinations::table
        .filter(schema::destinations::retry_at.is_not_null())
        .select(schema::destinations::server_name);
    // diesel's multi-backend connection has no UNION; the same query runs on either backend.
    let list = crate::on_backend!(conn, |c| peeking.union(joined).union(noticed).union(retrying).load::<String>(c))?;
    Ok(list)
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
