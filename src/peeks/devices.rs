//! Local devices' peeks (MSC2753, CP-5): one row per (user, device, room), with the
//! `device_peek_log` sequence numbers of its start and end so `/sync` can tell what changed
//! since a token, and each device's `last_sync_ts` for TBD-1 (is anybody still watching?).

use std::num::NonZeroU32;
use std::sync::Arc;

use diesel::prelude::*;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::config::ClientPeekConfig;
use crate::db::schema::{device_peek_log, device_peeks, devices};
use crate::db::write_transaction;
use crate::db::{Db, DbConnection};
use crate::events::Pdu;
use crate::ids;
use crate::rooms::{store, visibility, RoomError};

/// Why a device's peek ended; `joined` and `initial_sync` show no leave entry (CP-8, CP-10).
pub const END_UNPEEK: &str = "unpeek";
pub const END_INITIAL_SYNC: &str = "initial_sync";
pub const END_JOINED: &str = "joined";
pub const END_VISIBILITY: &str = "visibility_changed";
pub const END_LOGOUT: &str = "logout";
pub const END_LOST: &str = "lost";
pub const END_ADMIN: &str = "admin";

/// One device peek as `/sync` reads it.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = device_peeks)]
pub struct DevicePeek {
    pub room_id: String,
    pub start_seq: i64,
    pub end_seq: Option<i64>,
    pub end_pos: Option<i64>,
    pub end_reason: Option<String>,
    pub gappy: bool,
}

const KEY_COLUMNS: (device_peeks::user_id, device_peeks::device_id, device_peeks::room_id) =
    (device_peeks::user_id, device_peeks::device_id, device_peeks::room_id);

/// Which open peeks to end: one user's, narrowed to a device and/or a room.
struct Scope {
    user: String,
    device: Option<String>,
    room: Option<String>,
}

/// CP-14, H18: live peeks one device, and all of one user's devices together, may hold.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub per_device: i64,
    pub per_user: i64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Started {
    New,
    /// The device already peeked the room (CP-4: idempotent).
    Already,
    /// CP-14: the device (or the user, over all devices) holds its maximum of live peeks.
    AtCap,
    /// CP-3: not world-readable, or encrypted, in the current state when the peek was to be
    /// recorded.
    NotPeekable(&'static str),
}

/// The device-peek service: the database plus an in-process wake-up for waiting `/sync`s.
#[derive(Clone)]
pub struct DevicePeeks {
    db: Db,
    changed: watch::Sender<i64>,
    /// CP-14: `/peek` and `/unpeek` calls per user (H18: per device, every new login had a
    /// fresh allowance).
    calls: Arc<DefaultKeyedRateLimiter<String>>,
}

impl DevicePeeks {
    pub fn new(db: Db, config: &ClientPeekConfig) -> DevicePeeks {
        let quota = Quota::per_minute(NonZeroU32::new(config.per_minute).expect("validated > 0"))
            .allow_burst(NonZeroU32::new(config.burst).expect("validated > 0"));
        DevicePeeks { db, changed: watch::Sender::new(0), calls: Arc::new(RateLimiter::keyed(quota)) }
    }

    /// CP-14: `Err(retry_after_ms)` when the user calls `/peek` or `/unpeek` too often, from
    /// whichever devices.
    pub fn check_rate(&self, user_id: &str) -> Result<(), u64> {
        crate::limits::check_key(&self.calls, &user_id.to_owned())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()).as_millis().max(1) as u64)
    }

    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.changed.subscribe()
    }

    /// Another instance changed device peeks up to `seq` (a PostgreSQL notification).
    pub fn note_changed(&self, seq: i64) {
        self.notify(seq);
    }

    fn notify(&self, seq: i64) {
        self.changed.send_if_modified(|current| {
            let newer = seq > *current;
            if newer {
                *current = seq;
            }
            newer
        });
    }

    /// Starts the device's peek on the room (or finds it running).
    pub async fn start(&self, user_id: &str, device_id: &str, room_id: &str, caps: Caps) -> Result<Started, RoomError> {
        let (user, device, room) = (user_id.to_owned(), device_id.to_owned(), room_id.to_owned());
        let (started, seq) = self
            .db
            .run(move |conn| {
                write_transaction::<_, RoomError, _>(conn, |conn| start(conn, &user, &device, &room, caps))
            })
            .await?;
        self.notify(seq);
        Ok(started)
    }

    /// Ends one device's peek; `false` when it was not peeking the room.
    pub async fn end(&self, user_id: &str, device_id: &str, room_id: &str, reason: &str) -> Result<bool, RoomError> {
        let scope =
            Scope { user: user_id.to_owned(), device: Some(device_id.to_owned()), room: Some(room_id.to_owned()) };
        Ok(!self.end_open(scope, reason).await?.is_empty())
    }

    /// Ends every peek of one device (CP-8, CP-13); returns the rooms.
    pub async fn end_device(&self, user_id: &str, device_id: &str, reason: &str) -> Result<Vec<String>, RoomError> {
        self.end_open(Scope { user: user_id.to_owned(), device: Some(device_id.to_owned()), room: None }, reason).await
    }

    /// Ends the open peeks in `scope`, each with its own log entry; returns their rooms.
    async fn end_open(&self, scope: Scope, reason: &str) -> Result<Vec<String>, RoomError> {
        let reason = reason.to_owned();
        let (rooms, seq) = self
            .db
            .run(move |conn| {
                write_transaction::<_, RoomError, _>(conn, |conn| {
                    let mut open = device_peeks::table
                        .filter(device_peeks::user_id.eq(scope.user))
                        .filter(device_peeks::end_seq.is_null())
                        .into_boxed();
                    if let Some(device) = scope.device {
                        open = open.filter(device_peeks::device_id.eq(device));
                    }
                    if let Some(room) = scope.room {
                        open = open.filter(device_peeks::room_id.eq(room));
                    }
                    let open: Vec<(String, String, String)> = open.select(KEY_COLUMNS).load(conn)?;
                    let end_pos = store::max_stream_pos(conn)?;
                    end_rows(conn, open, &reason, end_pos)
                })
            })
            .await?;
        self.notify(seq);
        Ok(rooms)
    }

    /// The device's peeks that were open at `upto` or changed after `since` (sequence numbers).
    pub async fn for_sync(&self, user_id: &str, device_id: &str, since: i64) -> Result<Vec<DevicePeek>, RoomError> {
        let (user, device) = (user_id.to_owned(), device_id.to_owned());
        self.db
            .run(move |conn| {
                Ok(device_peeks::table
                    .filter(device_peeks::user_id.eq(&user))
                    .filter(device_peeks::device_id.eq(&device))
                    .filter(device_peeks::end_seq.is_null().or(device_peeks::end_seq.gt(since)))
                    .select(DevicePeek::as_select())
                    .load(conn)?)
            })
            .await
    }

    /// Clears the gap marks the device has now been told about.
    pub async fn clear_gappy(&self, user_id: &str, device_id: &str, rooms: Vec<String>) -> Result<(), RoomError> {
        let (user, device) = (user_id.to_owned(), device_id.to_owned());
        self.db
            .run(move |conn| {
                diesel::update(
                    device_peeks::table
                        .filter(device_peeks::user_id.eq(&user))
                        .filter(device_peeks::device_id.eq(&device))
                        .filter(device_peeks::room_id.eq_any(rooms)),
                )
                .set(device_peeks::gappy.eq(false))
                .execute(conn)?;
                Ok(())
            })
            .await
    }

    /// Marks every open peek on the room as having a gap (TBD-1: the federation peek was
    /// re-established after nobody watched for a while).
    pub async fn mark_gappy(&self, room_id: &str) -> Result<(), RoomError> {
        let room = room_id.to_owned();
        self.db
            .run(move |conn| {
                diesel::update(
                    device_peeks::table.filter(device_peeks::room_id.eq(&room)).filter(device_peeks::end_seq.is_null()),
                )
                .set(device_peeks::gappy.eq(true))
                .execute(conn)?;
                Ok(())
            })
            .await
    }

    /// The newest sequence number (the peek half of a `/sync` token).
    pub async fn max_seq(&self) -> Result<i64, RoomError> {
        self.db.run(max_seq).await
    }

    /// Records the start of a `/sync` (TBD-1). Also called by `/peek`: a device that peeks is active.
    pub async fn touch_device(&self, user_id: &str, device_id: &str) -> Result<(), RoomError> {
        let (user, device) = (user_id.to_owned(), device_id.to_owned());
        self.db
            .run(move |conn| {
                diesel::update(
                    devices::table.filter(devices::user_id.eq(&user)).filter(devices::device_id.eq(&device)),
                )
                .set(devices::last_sync_ts.eq(now_ms()))
                .execute(conn)?;
                Ok(())
            })
            .await
    }
}

pub fn max_seq(conn: &mut DbConnection) -> Result<i64, RoomError> {
    let seq: Option<i64> = device_peek_log::table.select(diesel::dsl::max(device_peek_log::id)).first(conn)?;
    Ok(seq.unwrap_or(0))
}

/// The PostgreSQL advisory lock that orders writers of `device_peek_log` (H2).
const DEVICE_PEEK_LOG_LOCK_KEY: i64 = 0x7065_656b_6c6f_6700; // "peeklog\0"

/// Appends one entry to `device_peek_log`; its ID is the sequence number `/sync` tokens carry.
///
/// H2: a token is the largest committed ID, so IDs must commit in order: an ID that committed
/// after a larger one would be behind a token already handed out, and that device would never
/// see the change. On PostgreSQL a sequence hands out IDs in call order, not commit order, so
/// writers take a transaction-scoped lock first and hold it until they commit: the next writer
/// gets its ID only after this one is visible. (SQLite has one writer at a time anyway.)
fn log_change(conn: &mut DbConnection, user: &str, device: &str, room: &str, change: &str) -> Result<i64, RoomError> {
    if matches!(conn, DbConnection::Postgresql(_)) {
        diesel::sql_query(format!("SELECT pg_advisory_xact_lock({DEVICE_PEEK_LOG_LOCK_KEY})")).execute(conn)?;
    }
    let seq = diesel::insert_into(device_peek_log::table)
        .values((
            device_peek_log::user_id.eq(user),
            device_peek_log::device_id.eq(device),
            device_peek_log::room_id.eq(room),
            device_peek_log::change.eq(change),
            device_peek_log::ts.eq(now_ms()),
        ))
        .returning(device_peek_log::id)
        .get_result(conn)?;
    crate::db::notify::notify(conn, crate::db::notify::DEVICE_PEEKS, seq)?;
    crate::pause::point_blocking(crate::pause::points::DEVICE_PEEK_LOG_COMMIT, room);
    Ok(seq)
}

/// Records the device's peek. The room's peekability is read under the append lock (H1): a
/// visibility change either committed before (and is seen here) or comes after, and then its
/// state-event hook ends this peek; a peek recorded after the change is impossible.
fn start(
    conn: &mut DbConnection,
    user: &str,
    device: &str,
    room: &str,
    caps: Caps,
) -> Result<(Started, i64), RoomError> {
    store::lock_for_append(conn, room)?;
    if let Err(why) = visibility::peekability(conn, room)? {
        return Ok((Started::NotPeekable(why), 0));
    }
    let mine = device_peeks::table.filter(device_peeks::user_id.eq(user)).filter(device_peeks::device_id.eq(device));
    let existing: Option<Option<i64>> =
        mine.filter(device_peeks::room_id.eq(room)).select(device_peeks::end_seq).first(conn).optional()?;
    if existing == Some(None) {
        return Ok((Started::Already, 0));
    }
    let open: i64 = mine.filter(device_peeks::end_seq.is_null()).count().get_result(conn)?;
    let users: i64 = device_peeks::table
        .filter(device_peeks::user_id.eq(user))
        .filter(device_peeks::end_seq.is_null())
        .count()
        .get_result(conn)?;
    if open >= caps.per_device || users >= caps.per_user {
        return Ok((Started::AtCap, 0));
    }
    let seq = log_change(conn, user, device, room, "start")?;
    if existing.is_some() {
        diesel::update(mine.filter(device_peeks::room_id.eq(room)))
            .set((
                device_peeks::created_ts.eq(now_ms()),
                device_peeks::start_seq.eq(seq),
                device_peeks::end_seq.eq(None::<i64>),
                device_peeks::end_pos.eq(None::<i64>),
                device_peeks::end_reason.eq(None::<String>),
                device_peeks::gappy.eq(false),
            ))
            .execute(conn)?;
    } else {
        diesel::insert_into(device_peeks::table)
            .values((
                device_peeks::user_id.eq(user),
                device_peeks::device_id.eq(device),
                device_peeks::room_id.eq(room),
                device_peeks::created_ts.eq(now_ms()),
                device_peeks::start_seq.eq(seq),
            ))
            .execute(conn)?;
    }
    Ok((Started::New, seq))
}

fn end_rows(
    conn: &mut DbConnection,
    open: Vec<(String, String, String)>,
    reason: &str,
    end_pos: i64,
) -> Result<(Vec<String>, i64), RoomError> {
    let mut last = 0;
    let mut rooms = Vec::new();
    for (user, device, room) in open {
        let seq = log_change(conn, &user, &device, &room, reason)?;
        diesel::update(
            device_peeks::table
                .filter(device_peeks::user_id.eq(&user))
                .filter(device_peeks::device_id.eq(&device))
                .filter(device_peeks::room_id.eq(&room)),
        )
        .set((
            device_peeks::end_seq.eq(seq),
            device_peeks::end_pos.eq(end_pos),
            device_peeks::end_reason.eq(reason),
            device_peeks::gappy.eq(false),
        ))
        .execute(conn)?;
        last = seq;
        rooms.push(room);
    }
    Ok((rooms, last))
}

/// Called by the append path inside its transaction after every state event (a hook that
/// `app` registers with the append path):
/// - CP-11: when the room stops being peekable, every device peek on it ends at this event (the
///   event is still shown in the leave entry);
/// - CP-10: when a local user joins, that user's peeks on the room end on every device, in the
///   same transaction as the join, without a leave entry.
pub fn after_state_event(
    conn: &mut DbConnection,
    server_name: &str,
    pdu: &Pdu,
    position: i64,
) -> Result<(), RoomError> {
    let local_member = pdu.state_key.as_deref().filter(|k| ids::is_user_of(k, server_name));
    let (user, reason) = if visibility::ends_peekability(pdu) {
        (None, END_VISIBILITY)
    } else if pdu.event_type().as_str() == "m.room.member"
        && pdu.content_value()["membership"] == "join"
        && local_member.is_some()
    {
        (local_member, END_JOINED)
    } else {
        return Ok(());
    };
    let mut open = device_peeks::table
        .filter(device_peeks::room_id.eq(pdu.room_id.as_str()))
        .filter(device_peeks::end_seq.is_null())
        .into_boxed();
    if let Some(user) = user {
        open = open.filter(device_peeks::user_id.eq(user.to_owned()));
    }
    let open: Vec<(String, String, String)> = open.select(KEY_COLUMNS).load(conn)?;
    end_rows(conn, open, reason, position)?;
    Ok(())
}

/// Open device peeks on the room whose device synced after `live_since` (TBD-1).
pub fn live_count(conn: &mut DbConnection, room_id: &str, live_since: i64) -> Result<i64, RoomError> {
    Ok(device_peeks::table
        .inner_join(
            devices::table
                .on(devices::user_id.eq(device_peeks::user_id).and(devices::device_id.eq(device_peeks::device_id))),
        )
        .filter(device_peeks::room_id.eq(room_id))
        .filter(device_peeks::end_seq.is_null())
        .filter(devices::last_sync_ts.gt(live_since))
        .count()
        .get_result(conn)?)
}

/// Open device peeks on the room, live or not.
pub fn open_count(conn: &mut DbConnection, room_id: &str) -> Result<i64, RoomError> {
    Ok(device_peeks::table
        .filter(device_peeks::room_id.eq(room_id))
        .filter(device_peeks::end_seq.is_null())
        .count()
        .get_result(conn)?)
}

/// Live device peeks over all rooms (the `peekgate_device_peeks` gauge).
pub fn live_total(conn: &mut DbConnection, live_since: i64) -> Result<i64, RoomError> {
    Ok(device_peeks::table
        .inner_join(
            devices::table
                .on(devices::user_id.eq(device_peeks::user_id).and(devices::device_id.eq(device_peeks::device_id))),
        )
        .filter(device_peeks::end_seq.is_null())
        .filter(devices::last_sync_ts.gt(live_since))
        .count()
        .get_result(conn)?)
}

/// Deletes device peeks that ended before `before` (their leave entries are long shown or no
/// longer wanted) and the log entries older than that, keeping the newest log entry so that
/// sequence numbers never go back.
pub fn forget_ended(conn: &mut DbConnection, before: i64) -> Result<(), RoomError> {
    let old_log = device_peek_log::table.filter(device_peek_log::ts.lt(before));
    let newest = max_seq(conn)?;
    let ended_before: Option<i64> =
        old_log.filter(device_peek_log::id.lt(newest)).select(diesel::dsl::max(device_peek_log::id)).first(conn)?;
    if let Some(last_old) = ended_before {
        diesel::delete(device_peeks::table.filter(device_peeks::end_seq.le(last_old))).execute(conn)?;
        diesel::delete(device_peek_log::table.filter(device_peek_log::id.le(last_old))).execute(conn)?;
    }
    Ok(())
}
