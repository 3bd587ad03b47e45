//! The fan-out path: a chunk of events is read once for many workers, and each distinct
//! transaction body is serialised once and signed in batches for its audience. A round hands
//! out two kinds of chunk, each to the workers that are exactly at its start:
//! - the round's new events `(since, head]`, for the workers caught up with the last round;
//! - catch-up chunks, for workers a little behind it (a peer too slow to take the last rounds'
//!   bodies, a worker back from the queue path), grouped by where they are. A thousand workers
//!   at a handful of positions cost a handful of reads and bodies, not a thousand reads and
//!   unshared signatures: with a receiver that verified every `/send`, that storm of queue
//!   reads brought sustained delivery down to 22 events/s.
//!
//! A worker with nothing in a chunk is moved past it without a message: the manager notes that
//! nothing for it lies in `(handed_up_to, promised]`, and the next body it gets says so (its
//! `quiet_from`). So a busy room does not wake the workers of servers that do not read it, and
//! they do not fall behind the fan-out because of it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use super::queue::fan_out_inputs;
use super::shared::{BodyFor, Prepared, PreparedBody, Shared, WorkerStatus};
use super::subscriptions::NewEvent;
use crate::clock::now_ms;

/// Stream positions per chunk, so at most one transaction's events (the spec allows 50 PDUs).
const CHUNK_EVENTS: i64 = 50;
/// Chunks of new events per round; a longer burst continues in the next round at once. Bounds
/// the bodies one round queues for each worker.
const MAX_CHUNKS: usize = 4;
/// Catch-up chunks per round, so that catching up never holds back a round's new events long.
const MAX_CATCH_UP_CHUNKS: usize = 8;
/// How far behind a round a worker may be and still be caught up by the fan-out. Further
/// behind, its own queue reads are cheaper: they skip the events of rooms it does not read.
const CATCH_UP_WINDOW: i64 = 20 * CHUNK_EVENTS;
/// Bodies handed to one worker and not yet taken (H5): a worker whose peer is slow holds at most
/// one round's chunks; it is caught up later, from where it is.
pub(super) const HANDOFF_CAPACITY: usize = MAX_CHUNKS;

/// What the manager keeps per running worker.
pub(super) struct WorkerHandle {
    pub wake: Arc<Notify>,
    pub prepared: mpsc::Sender<Prepared>,
    /// The worker's cursor, and whether it is stalled on a failing or silent peer.
    pub status: Arc<WorkerStatus>,
    pub task: JoinHandle<()>,
    /// Where the worker will be once it has sent what it was handed.
    handed_up_to: i64,
    /// Where the fan-out has taken it: nothing for it lies in `(handed_up_to, promised]`.
    promised: i64,
}

impl WorkerHandle {
    pub fn new(
        wake: Arc<Notify>,
        prepared: mpsc::Sender<Prepared>,
        status: Arc<WorkerStatus>,
        task: JoinHandle<()>,
    ) -> Self {
        WorkerHandle { wake, prepared, status, task, handed_up_to: -1, promised: -1 }
    }

    pub fn handed_up_to(&self) -> i64 {
        self.handed_up_to
    }

    /// `(quiet_from, next)`: the next chunk for this worker starts at `next`, and nothing for it
    /// lies in `(quiet_from, next]`. The worker's cursor is read once: a worker on the queue path
    /// may pass what it was promised, and then it is where its cursor is.
    fn position(&self) -> (i64, i64) {
        let cursor = self.status.cursor();
        if self.promised >= cursor {
            (self.handed_up_to, self.promised)
        } else {
            (cursor, cursor)
        }
    }

    /// The worker can be handed a catch-up chunk now: its cursor is known, it reads no queue of
    /// its own, its peer answers (H5) and it has room for another body.
    fn can_take_catch_up(&self, now: i64) -> bool {
        self.status.cursor() >= 0
            && !self.status.on_queue_path()
            && !self.status.stalled(now)
            && self.prepared.capacity() > 0
    }

    /// Where this worker's next catch-up chunk starts, when it can take one now and is behind
    /// `before` by no more than [`CATCH_UP_WINDOW`].
    fn catch_up_start(&self, now: i64, before: i64) -> Option<i64> {
        let next = self.position().1;
        (self.can_take_catch_up(now) && (before - CATCH_UP_WINDOW..before).contains(&next)).then_some(next)
    }

    /// The fan-out will bring this worker up to `reached` in later rounds, so waking it for the
    /// queue path would only make it read what the fan-out reads once for everyone.
    pub fn left_to_catch_up(&self, reached: i64) -> bool {
        self.status.cursor() >= 0
            && !self.status.on_queue_path()
            && !self.status.failing()
            && reached - self.position().1 <= CATCH_UP_WINDOW
    }
}

/// What a round of the fan-out did.
#[derive(Default)]
pub(super) struct Round {
    /// The destinations handed everything up to `reached`.
    pub served: BTreeSet<String>,
    /// The end of the new events handed out: the head, or less when the burst continues.
    pub reached: i64,
    /// The workers handed a body or a cursor move.
    pub handed: BTreeSet<String>,
    /// Destinations whose body could not be prepared: the queue path delivers to them.
    pub to_queue: Vec<String>,
    /// Some worker that can take catch-up chunks is still behind `reached`.
    pub laggards: bool,
}

/// One round: catch-up chunks for the workers behind `since`, then the new events in
/// `(since, head]`, in chunks of one transaction, at most [`MAX_CHUNKS`] of them.
pub(super) async fn round(
    shared: &Shared,
    workers: &mut HashMap<String, WorkerHandle>,
    since: i64,
    head: i64,
) -> Round {
    let mut round = Round::default();
    catch_up(shared, workers, since, &mut round).await;
    let mut served: Option<BTreeSet<String>> = None;
    let mut from = since;
    for _ in 0..MAX_CHUNKS {
        if from >= head {
            break;
        }
        let to = head.min(from + CHUNK_EVENTS);
        let Some(chunk) = chunk(shared, workers, from, to, &mut round).await else {
            // Nobody is served: the workers at `from` fall behind, and a later round catches
            // them up (or, too far behind, they are woken for their queues).
            served = None;
            from = head;
            break;
        };
        served = Some(match served {
            None => chunk,
            Some(before) => before.intersection(&chunk).cloned().collect(),
        });
        from = to;
    }
    round.served = served.unwrap_or_default();
    round.reached = from.max(since);
    let now = now_ms();
    round.laggards = workers.values().any(|w| w.catch_up_start(now, round.reached).is_some());
    round
}

/// Catch-up chunks for the workers behind `since`, lowest position first. A chunk ends at the
/// next position where other workers wait, so that the two groups go on as one.
async fn catch_up(shared: &Shared, workers: &mut HashMap<String, WorkerHandle>, since: i64, round: &mut Round) {
    let mut tried = BTreeSet::new();
    for _ in 0..MAX_CATCH_UP_CHUNKS {
        let now = now_ms();
        let starts: BTreeSet<i64> = workers.values().filter_map(|w| w.catch_up_start(now, since)).collect();
        // Each start once a round: workers a chunk cannot serve wait for the next round.
        let Some(&from) = starts.iter().find(|start| !tried.contains(*start)) else { break };
        tried.insert(from);
        let to = starts.range(from + 1..).next().copied().unwrap_or(since).min(from + CHUNK_EVENTS);
        if chunk(shared, workers, from, to, round).await.is_none() {
            break;
        }
    }
}

/// One chunk: read the events in `(from, to]` and the peeks on their rooms once, build one body
/// per distinct set of PDUs, and hand it to each worker at `from`. Workers at `from` with
/// nothing in the chunk move past it silently. Workers not at `from`, reading their own queue,
/// stalled on their peer (H5) or already holding [`HANDOFF_CAPACITY`] bodies are left for later.
/// Returns the destinations handed a body (or a cursor move); `None` when the read failed.
async fn chunk(
    shared: &Shared,
    workers: &mut HashMap<String, WorkerHandle>,
    from: i64,
    to: i64,
    round: &mut Round,
) -> Option<BTreeSet<String>> {
    let (new_events, subscriptions) = match fan_out_inputs(shared, from, to, CHUNK_EVENTS).await {
        Ok(inputs) => inputs,
        Err(e) => {
            tracing::warn!(error = %e, "sender: fan-out read failed; a later round delivers");
            return None;
        }
    };
    let now = now_ms();
    let mut wanted: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for subscription in &subscriptions {
        let entry = wanted.entry(subscription.destination.clone()).or_default();
        entry.extend(new_events.iter().enumerate().filter(|(_, e)| subscription.wants(e, now)).map(|(i, _)| i));
    }
    pass_over_the_uninterested(workers, &wanted, from, to);
    let (handouts, audiences) = assign_audiences(workers, wanted, from, now);
    let bodies: Vec<Option<Arc<PreparedBody>>> = audiences
        .into_iter()
        .map(|(indices, audience)| prepare(shared, &new_events, &indices, audience).map(Arc::new))
        .collect();
    let mut served = BTreeSet::new();
    for Handout { destination, quiet_from, place } in handouts {
        let body = match place {
            None => None,
            Some((number, slot)) => match &bodies[number] {
                Some(body) => Some(BodyFor { body: body.clone(), slot }),
                None => {
                    round.to_queue.push(destination);
                    continue;
                }
            },
        };
        let Some(worker) = workers.get_mut(&destination) else { continue };
        if worker.prepared.try_send(Prepared { quiet_from, from, to, body }).is_ok() {
            (worker.handed_up_to, worker.promised) = (to, to);
            crate::pause::point(crate::pause::points::SENDER_BODY_HANDED, &destination).await;
            round.handed.insert(destination.clone());
            served.insert(destination);
        }
    }
    Some(served)
}

/// Workers at `from` without a subscription in the chunk's rooms have nothing in it: they are
/// promised its end without a message.
fn pass_over_the_uninterested(
    workers: &mut HashMap<String, WorkerHandle>,
    wanted: &BTreeMap<String, Vec<usize>>,
    from: i64,
    to: i64,
) {
    for (destination, worker) in workers.iter_mut() {
        let (quiet_from, next) = worker.position();
        if next == from && !wanted.contains_key(destination) {
            (worker.handed_up_to, worker.promised) = (quiet_from, to);
        }
    }
}

/// A worker to hand something to: since where nothing for it lies before the chunk, and its
/// audience and slot there, or `None` for a bare cursor move (nothing in the chunk for it).
struct Handout {
    destination: String,
    quiet_from: i64,
    place: Option<(usize, usize)>,
}
/// The PDUs (indices into the chunk's events) one body carries, and the destinations getting it.
type Audience = (Vec<usize>, Vec<String>);

/// Which workers take a body now and which PDUs each gets, grouped into one audience per
/// distinct set of PDUs. Workers that are not running, not exactly at `from`, reading their own
/// queue, stalled (H5) or without room for another body are left for later; only the manager hands bodies over, so
/// room found here is still there when it does.
fn assign_audiences(
    workers: &HashMap<String, WorkerHandle>,
    wanted: BTreeMap<String, Vec<usize>>,
    from: i64,
    now: i64,
) -> (Vec<Handout>, Vec<Audience>) {
    let mut handouts = Vec::new();
    let mut audiences: Vec<Audience> = Vec::new();
    let mut audience_of: HashMap<Vec<usize>, usize> = HashMap::new();
    for (destination, mut indices) in wanted {
        indices.sort_unstable();
        indices.dedup();
        let Some(worker) = workers.get(&destination) else {
            continue; // not running: the work list starts it on the queue path
        };
        // Bodies queue up in order behind the ones the worker is still sending, as long as they
        // follow on.
        let (quiet_from, next) = worker.position();
        let busy = worker.status.on_queue_path() || worker.status.stalled(now) || worker.prepared.capacity() == 0;
        if next != from || busy {
            continue;
        }
        if indices.is_empty() {
            handouts.push(Handout { destination, quiet_from, place: None });
            continue;
        }
        let number = *audience_of.entry(indices).or_insert_with_key(|indices| {
            audiences.push((indices.clone(), Vec::new()));
            audiences.len() - 1
        });
        let audience = &mut audiences[number].1;
        handouts.push(Handout { destination: destination.clone(), quiet_from, place: Some((number, audience.len())) });
        audience.push(destination);
    }
    (handouts, audiences)
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    use diesel::RunQueryDsl;
    use ruma::{OwnedRoomId, UserId};
    use serde_json::json;
    use tokio::sync::{mpsc, watch, Notify};

    use super::{round, WorkerHandle, HANDOFF_CAPACITY};
    use crate::db::DbError;
    use crate::sender::shared::{Prepared, Shared, WorkerStatus};
    use crate::state::AppState;

    /// A gateway's state on SQLite in `dir`, with a world-readable room of alice's.
    async fn gateway(dir: &std::path::Path) -> (AppState, OwnedRoomId) {
        let mut config = crate::config::Config { server_name: "gw.test".into(), ..Default::default() };
        config.database.url = format!("sqlite://{}", dir.join("db.sqlite").display());
        config.signing.key_path = dir.join("signing.key");
        config.http.bind = "127.0.0.1:0".into();
        config.metrics.bind = String::new();
        let state = crate::app::build_state(config.validate().unwrap(), None).await.unwrap();
        let alice = UserId::parse("@alice:gw.test").unwrap();
        state.accounts.create_user(&alice, "a password", false).await.unwrap();
        let request = crate::rooms::CreateRoomRequest {
            initial_state: vec![crate::rooms::InitialStateEvent {
                kind: "m.room.history_visibility".into(),
                state_key: String::new(),
                content: json!({ "history_visibility": "world_readable" }),
            }],
            ..Default::default()
        };
        let room = state.rooms.create_room(&alice, request).await.unwrap();
        (state, room)
    }

    async fn say(state: &AppState, room: &OwnedRoomId, text: &str) -> i64 {
        let alice = UserId::parse("@alice:gw.test").unwrap();
        let content = json!({ "msgtype": "m.text", "body": text });
        state.rooms.send(room, &alice, "m.room.message", None, content).await.unwrap().stream_pos
    }

    /// Live peeks of `room` by each of `origins`, receiving the events after `start`.
    async fn peeks(state: &AppState, room: &OwnedRoomId, origins: &[&str], start: i64) {
        let now = crate::clock::now_ms();
        let rows: Vec<String> = origins
            .iter()
            .map(|origin| format!("('{origin}', '{room}', 'p', {now}, {now}, 3600000, {}, {start})", now + 3_600_000))
            .collect();
        let insert = format!(
            "INSERT INTO inbound_peeks (origin, room_id, peek_id, created_ts, renewed_ts, renewal_interval_ms, expires_ts, start_stream_pos) VALUES {}",
            rows.join(", ")
        );
        state.db.run::<_, DbError, _>(move |conn| Ok(diesel::sql_query(insert).execute(conn)?)).await.unwrap();
    }

    fn shared(state: &AppState) -> Arc<Shared> {
        let (progress, _) = mpsc::unbounded_channel();
        Arc::new(Shared {
            state: state.sender_context(),
            instance: "test".into(),
            txn_counter: AtomicU64::new(0),
            started_ms: 1,
            shutdown: watch::channel(false).1,
            progress,
            lease_ms: 60_000,
            worker_idle: std::time::Duration::from_secs(60),
        })
    }

    /// A worker for the manager's books, idle at `cursor` (not reading a queue of its own unless
    /// `on_queue_path`), and the other end of its hand-off channel.
    fn worker(cursor: i64, on_queue_path: bool) -> (WorkerHandle, mpsc::Receiver<Prepared>) {
        let (tx, rx) = mpsc::channel(HANDOFF_CAPACITY);
        let status = Arc::new(WorkerStatus::starting_at(cursor, on_queue_path));
        (WorkerHandle::new(Arc::new(Notify::new()), tx, status, tokio::spawn(async {})), rx)
    }

    /// What a worker was handed: `(quiet_from, from, to, the body's path)` each.
    fn handed(rx: &mut mpsc::Receiver<Prepared>) -> Vec<(i64, i64, i64, Option<String>)> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|p| (p.quiet_from, p.from, p.to, p.body.map(|b| b.body.path.clone())))
            .collect()
    }

    /// Workers behind the round are caught up by shared chunks, grouped by where they are: a
    /// lower group's chunk ends where the next group waits, so the two go on as one, then join
    /// the round's new events. A worker on the queue path is left alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn laggards_are_caught_up_together_by_position() {
        let dir = tempfile::tempdir().unwrap();
        let (state, room) = gateway(dir.path()).await;
        let start = state.rooms.latest_stream_pos(&room).await.unwrap();
        let readers = ["caught-up.test", "behind.test", "also-behind.test", "further.test", "queue.test"];
        peeks(&state, &room, &readers, start).await;
        let mut at = vec![start];
        for i in 0..4 {
            at.push(say(&state, &room, &format!("old {i}")).await);
        }
        let since = at[4];
        let new = say(&state, &room, "new").await;
        let positions = [since, at[2], at[2], at[1], at[1]];
        let mut receivers = HashMap::new();
        let mut workers = HashMap::new();
        for (name, cursor) in readers.iter().zip(positions) {
            let (handle, rx) = worker(cursor, *name == "queue.test");
            workers.insert(name.to_string(), handle);
            receivers.insert(*name, rx);
        }

        let done = round(&shared(&state), &mut workers, since, new).await;
        let mut got: HashMap<&str, _> = receivers.iter_mut().map(|(name, rx)| (*name, handed(rx))).collect();
        let further = got.remove("further.test").unwrap();
        let spans: Vec<(i64, i64, i64)> = further.iter().map(|h| (h.0, h.1, h.2)).collect();
        assert_eq!(spans, [(at[1], at[1], at[2]), (at[2], at[2], since), (since, since, new)], "further.test");
        let behind = got.remove("behind.test").unwrap();
        assert_eq!(behind, got.remove("also-behind.test").unwrap(), "one body each time for the same group");
        assert_eq!(behind[..], further[1..], "the lower group joined the next one");
        let caught_up = got.remove("caught-up.test").unwrap();
        assert_eq!(caught_up[..], further[2..], "everyone shares the round's new event");
        assert!(further.iter().all(|h| h.3.is_some()), "each chunk carries events: {further:?}");
        assert_eq!(got.remove("queue.test").unwrap(), [], "a worker on the queue path is left alone");
        let served: Vec<&str> = done.served.iter().map(String::as_str).collect();
        assert_eq!(served, ["also-behind.test", "behind.test", "caught-up.test", "further.test"]);
        assert_eq!(done.reached, new);
        assert!(!done.laggards, "nobody the fan-out can serve is behind");
    }

    /// A worker with nothing in a chunk is moved past it without a message, and its next body
    /// says that nothing for it lies in between, so it takes it from where it is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_with_nothing_in_a_chunk_passes_it_silently() {
        let dir = tempfile::tempdir().unwrap();
        let (state, busy) = gateway(dir.path()).await;
        let alice = UserId::parse("@alice:gw.test").unwrap();
        let quiet = state.rooms.create_room(&alice, crate::rooms::CreateRoomRequest::default()).await.unwrap();
        let start = state.rooms.latest_stream_pos(&quiet).await.unwrap();
        peeks(&state, &busy, &["busy.test"], start).await;
        peeks(&state, &quiet, &["quiet.test"], start).await;
        let (mut workers, mut receivers) = (HashMap::new(), HashMap::new());
        for name in ["busy.test", "quiet.test"] {
            let (handle, rx) = worker(start, false);
            workers.insert(name.to_string(), handle);
            receivers.insert(name, rx);
        }
        let shared = shared(&state);
        let in_busy = say(&state, &busy, "only the busy room").await;
        round(&shared, &mut workers, start, in_busy).await;
        assert_eq!(handed(receivers.get_mut("quiet.test").unwrap()), [], "no message for nothing");
        assert_eq!(handed(receivers.get_mut("busy.test").unwrap()).len(), 1);

        let in_quiet = say(&state, &quiet, "now the quiet one").await;
        let done = round(&shared, &mut workers, in_busy, in_quiet).await;
        let got = handed(receivers.get_mut("quiet.test").unwrap());
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].0, got[0].1, got[0].2), (start, in_busy, in_quiet), "taken from where it is");
        assert!(got[0].3.is_some());
        assert!(!done.laggards, "the silent pass left nobody behind");
    }
}
