//! Group commit of local appends: events that local users send at the same time are stored in
//! one transaction.
//!
//! Appends commit in stream order under one lock (the advisory lock on PostgreSQL, the write
//! lock on SQLite), so concurrent senders queue on it, and each handover costs the next writer a
//! wake-up and its own `BEGIN`, lock and `COMMIT` round trips. Under fan-out load every round
//! trip waits for a busy CPU, and that queue was what bounded the sustained event rate. Here the
//! first sender to find no commit running starts one (in a task of its own, so a caller that
//! goes away cannot leave it half done); whoever arrives meanwhile joins the next group.
//!
//! A group is all or nothing in the database, but its events are not: when one fails (a
//! forbidden event, say), the transaction is rolled back and each event is stored alone, so one
//! sender's error never costs another its event.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::error::RoomError;
use super::hooks::AppendHooks;
use super::store::{self, Appended, ClientTxn, RoomEnd};
use crate::db::{write_transaction_opening_with, Db, DbConnection};
use crate::events::EventDraft;
use crate::keys::SigningKey;

/// At most this many events per transaction.
const MAX_GROUP: usize = 64;

/// One local event to append.
pub(super) struct LocalAppend {
    pub room_id: String,
    pub draft: EventDraft,
    /// The client transaction `(device_id, txn_id)`: a repeat returns the event it created.
    pub txn: Option<(String, String)>,
}

type Reply = oneshot::Sender<Result<Appended, RoomError>>;

/// What the appends of one server share.
pub(super) struct GroupCommit {
    db: Db,
    key: Arc<SigningKey>,
    hooks: AppendHooks,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<(LocalAppend, Reply)>,
    /// A task is committing groups until `waiting` is empty.
    committing: bool,
}

impl GroupCommit {
    pub fn new(db: Db, key: Arc<SigningKey>, hooks: AppendHooks) -> GroupCommit {
        GroupCommit { db, key, hooks, queue: Mutex::default() }
    }

    /// Appends `append` with whatever else is waiting; returns once it is committed.
    pub async fn append(self: &Arc<Self>, append: LocalAppend) -> Result<Appended, RoomError> {
        let (reply, answer) = oneshot::channel();
        let start_committing = {
            let mut queue = self.queue.lock().expect("append queue lock");
            queue.waiting.push((append, reply));
            !std::mem::replace(&mut queue.committing, true)
        };
        if start_committing {
            tokio::spawn(self.clone().commit_until_empty());
        }
        answer.await.map_err(|_| RoomError::Internal("the append task ended before committing".into()))?
    }

    async fn commit_until_empty(self: Arc<Self>) {
        loop {
            let group: Vec<(LocalAppend, Reply)> = {
                let mut queue = self.queue.lock().expect("append queue lock");
                if queue.waiting.is_empty() {
                    queue.committing = false;
                    return;
                }
                let take = queue.waiting.len().min(MAX_GROUP);
                queue.waiting.drain(..take).collect()
            };
            let (appends, replies): (Vec<LocalAppend>, Vec<Reply>) = group.into_iter().unzip();
            let (key, hooks) = (self.key.clone(), self.hooks.clone());
            let results = self.db.run(move |conn| Ok::<_, RoomError>(commit_group(conn, &key, &hooks, &appends))).await;
            match results {
                Ok(results) => {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result);
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    for reply in replies {
                        let _ = reply.send(Err(RoomError::Internal(message.clone())));
                    }
                }
            }
        }
    }
}

/// Stores `appends` in one transaction, or each in its own when the group fails.
///
/// The group does not look for repeated client transaction IDs first: a repeat is rare, and the
/// client transactions' primary key fails the group when there is one. Each event is then stored
/// alone, and there a repeat is looked for first and answered with the event it created. A group
/// of one is tried the same way, so that a client's send costs no look-up in the usual case.
fn commit_group(
    conn: &mut DbConnection,
    key: &SigningKey,
    hooks: &AppendHooks,
    appends: &[LocalAppend],
) -> Vec<Result<Appended, RoomError>> {
    let lock = store::append_lock_statement();
    let together = write_transaction_opening_with(conn, &lock, |conn, locked| {
        let mut held = Held { append_lock: locked, room: None, look_for_repeats: false };
        appends
            .iter()
            .map(|append| append_one(conn, key, hooks, append, &mut held))
            .collect::<Result<Vec<_>, RoomError>>()
    });
    if let Ok(appended) = together {
        return appended.into_iter().map(Ok).collect();
    }
    appends
        .iter()
        .map(|append| {
            write_transaction_opening_with(conn, &lock, |conn, locked| {
                let mut held = Held { append_lock: locked, room: None, look_for_repeats: true };
                append_one(conn, key, hooks, append, &mut held)
            })
        })
        .collect()
}

/// What the appends of one transaction carry from one to the next, so that a group of events
/// sent to one room takes its locks once and reads the room's end once: whether the append lock
/// is held (on PostgreSQL it is taken with the transaction's `BEGIN`, in one round trip), and
/// what is known of the room appended to last (its locked row, and while nothing changed its
/// state, its forward extremities and auth state; see [`RoomEnd`]).
struct Held {
    append_lock: bool,
    room: Option<RoomEnd>,
    /// Look up each client transaction ID before appending (a repeat returns the first event),
    /// instead of leaving a repeat to fail the transaction.
    look_for_repeats: bool,
}

/// One event, inside the caller's transaction: the append lock and the room row (once per
/// transaction and room), the client transaction check when asked for (a repeat returns the
/// first event), and the append, which records the client transaction.
fn append_one(
    conn: &mut DbConnection,
    key: &SigningKey,
    hooks: &AppendHooks,
    append: &LocalAppend,
    held: &mut Held,
) -> Result<Appended, RoomError> {
    if !held.append_lock {
        store::take_append_lock(conn)?;
        held.append_lock = true;
    }
    let end = match held.room.take() {
        Some(end) if end.row.room_id == append.room_id => end,
        _ => RoomEnd::of(store::lock_room_row(conn, &append.room_id)?),
    };
    let sender = append.draft.sender.to_string();
    let txn = append.txn.as_ref().map(|(device_id, txn_id)| ClientTxn { user_id: &sender, device_id, txn_id });
    if let Some(txn) = txn.as_ref().filter(|_| held.look_for_repeats) {
        if let Some(done) = store::client_txn(conn, txn.user_id, txn.device_id, txn.txn_id)? {
            held.room = Some(end);
            return Ok(done);
        }
    }
    let (appended, end_after) = store::append_local_at(conn, key, hooks, end, append.draft.clone(), txn.as_ref())?;
    held.room = end_after;
    Ok(appended)
}
