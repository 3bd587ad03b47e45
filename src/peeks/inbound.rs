//! MSC2444, we are the peeked server: create, renew, delete and evict inbound peeks, and end
//! them when the room stops being peekable (RE-3, RE-4).
//!
//! A peek is recorded at stream position P under the append lock *before* the state at P is
//! read (PE-3), so every event after P reaches the peeker and none is missed.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ruma::events::room::server_acl::RoomServerAclEventContent;
use ruma::{OwnedRoomId, RoomId, ServerName};
use serde::Serialize;
use serde_json::Value;

use super::PeekId;
use crate::clock::now_ms;
use crate::config::Settings;
use crate::db::schema::inbound_peeks;
use crate::db::write_transaction;
use crate::db::{Db, DbConnection, DbError};
use crate::events::Pdu;
use crate::ids;
use crate::rooms::store::{self, RoomRow};
use crate::rooms::{visibility, RoomError, Rooms};
use crate::sender::destinations as sender;

#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    #[error("server ACL denies {0}")]
    Acl(String),
    #[error("unknown room")]
    UnknownRoom,
    #[error("invalid peek ID")]
    InvalidPeekId,
    #[error("room version {0} is not among the peeker's versions")]
    IncompatibleVersion(String),
    #[error("room is not peekable: {0}")]
    NotPeekable(&'static str),
    #[error("too many peeks")]
    LimitExceeded { retry_after_ms: u64 },
    #[error("no such peek")]
    NoSuchPeek,
    #[error(transparent)]
    Room(#[from] RoomError),
}

impl From<crate::db::DbError> for PeekError {
    fn from(e: crate::db::DbError) -> Self {
        PeekError::Room(RoomError::Db(e))
    }
}

impl From<diesel::result::Error> for PeekError {
    fn from(e: diesel::result::Error) -> Self {
        PeekError::Room(e.into())
    }
}

/// The Rev A answer to a new peek (FP-7).
#[derive(Debug, Serialize)]
pub struct PeekResponse {
    pub room_version: String,
    pub state: Vec<Value>,
    pub auth_chain: Vec<Value>,
    pub latest_event: Value,
    pub latest_event_id: String,
    pub renewal_interval: u64,
}

pub enum PutOutcome {
    /// A live peek was renewed: answer `{}` (FP-9).
    Renewed,
    Created(Box<PeekResponse>),
}

/// Limits of FP-12 and the timings of RE-1/RE-2.
struct Limits {
    renewal_interval_ms: i64,
    grace_ms: i64,
    max_active_per_origin: i64,
    max_ids_per_room: i64,
    lenient_peek_ids: bool,
}

pub struct InboundPeeks {
    db: Db,
    limits: Limits,
    new_peeks: DefaultKeyedRateLimiter<String>,
    facts: Arc<FactsCache>,
    /// PostgreSQL: renewals of live peeks share database round trips.
    batcher: Option<super::renewals::RenewalBatcher>,
}

/// What the PUT checks need to know about a room's current state.
struct RoomFacts {
    acl: Option<RoomServerAclEventContent>,
    /// FP-6: world-readable and not encrypted, or why not.
    peekable: Result<(), &'static str>,
}

/// Room facts per room, valid while the room's current state group is the recorded one (state
/// groups never change, so this is correct across instances).
type FactsCache = Mutex<HashMap<String, FactsEntry>>;

struct FactsEntry {
    group: i64,
    facts: Arc<RoomFacts>,
    room: RoomRow,
    /// When the room row was last read. Renewals trust an entry this recent without reading the
    /// row again: a renewal cannot revive a peek the room ended (the update checks that), so the
    /// only staleness is an ACL change made on another instance, bounded by [`RENEWAL_FACTS_TTL`].
    checked: Instant,
}

/// How long a renewal may rely on cached room facts.
const RENEWAL_FACTS_TTL: Duration = Duration::from_secs(1);

/// The room row and its facts; `UnknownRoom` for rooms we do not hold (or only as a stub).
/// With `fresh_within`, a cached entry younger than that is used without reading the room row.
fn room_facts(
    conn: &mut DbConnection,
    cache: &FactsCache,
    room_id: &str,
    fresh_within: Option<Duration>,
) -> Result<(RoomRow, Arc<RoomFacts>), PeekError> {
    if let Some(ttl) = fresh_within {
        if let Some(entry) = cache.lock().unwrap().get(room_id) {
            if entry.checked.elapsed() < ttl {
                return Ok((entry.room.clone(), entry.facts.clone()));
            }
        }
    }
    let room = store::room(conn, room_id)?.ok_or(PeekError::UnknownRoom)?;
    // Rooms we only peek ourselves are not ours to offer to other servers.
    if !room.is_local {
        return Err(PeekError::UnknownRoom);
    }
    let group = room.current_state_group.ok_or(PeekError::UnknownRoom)?;
    if let Some(entry) = cache.lock().unwrap().get_mut(room_id) {
        if entry.group == group {
            entry.checked = Instant::now();
            entry.room = room.clone();
            return Ok((room, entry.facts.clone()));
        }
    }
    let content = |conn: &mut DbConnection, kind: &str| -> Result<Option<Value>, PeekError> {
        Ok(match store::current_state_id(conn, room_id, kind, "")? {
            Some(id) => store::event_by_id(conn, &id)?.map(|e| e.pdu.content_value()),
            None => None,
        })
    };
    let acl = content(conn, "m.room.server_acl")?.and_then(|c| serde_json::from_value(c).ok());
    let peekable = crate::rooms::visibility::peekability(conn, room_id)?;
    let facts = Arc::new(RoomFacts { acl, peekable });
    let entry = FactsEntry { group, facts: facts.clone(), room: room.clone(), checked: Instant::now() };
    cache.lock().unwrap().insert(room_id.to_owned(), entry);
    Ok((room, facts))
}

/// The cached room facts, when read within [`RENEWAL_FACTS_TTL`] (no database access).
fn cached_facts(cache: &FactsCache, room_id: &str) -> Option<(RoomRow, Arc<RoomFacts>)> {
    let cache = cache.lock().unwrap();
    let entry = cache.get(room_id).filter(|entry| entry.checked.elapsed() < RENEWAL_FACTS_TTL)?;
    Some((entry.room.clone(), entry.facts.clone()))
}

/// FP check steps 1 and 3-5 on known room facts (step 2, the room itself, is `room_facts`).
fn apply_checks(
    origin: &ServerName,
    room: &RoomRow,
    facts: &RoomFacts,
    peek_id: Option<PeekId>,
    offered: &[String],
) -> Result<PeekId, PeekError> {
    if facts.acl.as_ref().is_some_and(|acl| !acl.is_allowed(origin)) {
        return Err(PeekError::Acl(origin.to_string()));
    }
    let peek_id = peek_id.ok_or(PeekError::InvalidPeekId)?;
    if !offered.iter().any(|v| v == room.version.as_str()) {
        return Err(PeekError::IncompatibleVersion(room.version.as_str().to_owned()));
    }
    facts.peekable.map_err(PeekError::NotPeekable)?;
    Ok(peek_id)
}

/// Renews a live peek (not lapsed, not ended by the room); `false` otherwise.
fn renew_live_blocking(
    conn: &mut DbConnection,
    origin: &str,
    room_id: &str,
    peek_id: &str,
    interval: i64,
    grace: i64,
) -> Result<bool, PeekError> {
    // Callers run this on the soft-state pool: a renewal lost in a crash is simply sent again.
    renew_update(conn, origin, room_id, peek_id, interval, grace, now_ms())
}

fn renew_update(
    conn: &mut DbConnection,
    origin: &str,
    room_id: &str,
    peek_id: &str,
    interval: i64,
    grace: i64,
    now: i64,
) -> Result<bool, PeekError> {
    let renewed = diesel::update(
        inbound_peeks::table
            .filter(inbound_peeks::origin.eq(origin))
            .filter(inbound_peeks::room_id.eq(room_id))
            .filter(inbound_peeks::peek_id.eq(peek_id))
            .filter(inbound_peeks::expires_ts.ge(now))
            .filter(inbound_peeks::end_stream_pos.is_null()),
    )
    .set((
        inbound_peeks::renewed_ts.eq(now),
        inbound_peeks::renewal_interval_ms.eq(interval),
        inbound_peeks::expires_ts.eq(now + interval + grace),
    ))
    .execute(conn)?;
    Ok(renewed > 0)
}

/// RE-2: the grace after the interval is min(10 % of the interval, configured grace).
fn grace_ms(interval_ms: i64, configured: i64) -> i64 {
    (interval_ms / 10).min(configured)
}

impl InboundPeeks {
    pub fn new(db: Db, settings: &Settings) -> InboundPeeks {
        let raw = &settings.raw;
        let interval = raw.peeks.renewal_interval_ms as i64;
        let peek = &raw.federation.peek;
        let quota = Quota::per_minute(NonZeroU32::new(peek.new_peeks_per_minute).expect("validated > 0"))
            .allow_burst(NonZeroU32::new(peek.new_peeks_burst).expect("validated > 0"));
        let grace = grace_ms(interval, raw.peeks.eviction_grace_ms as i64);
        let batcher = (db.backend() == crate::db::Backend::Postgres)
            .then(|| super::renewals::RenewalBatcher::start(db.clone(), interval, grace));
        InboundPeeks {
            db,
            batcher,
            limits: Limits {
                renewal_interval_ms: interval,
                grace_ms: grace,
                max_active_per_origin: peek.max_active_per_origin.into(),
                max_ids_per_room: peek.max_ids_per_room.into(),
                lenient_peek_ids: peek.lenient_peek_ids,
            },
            new_peeks: RateLimiter::keyed(quota),
            facts: Arc::default(),
        }
    }

    pub fn renewal_interval_ms(&self) -> i64 {
        self.limits.renewal_interval_ms
    }

    /// `PUT /peek/{roomId}/{peekId}`: the check order of peeking.md §1, then renew or create.
    /// The checks and a renewal take one database round trip (room facts are cached per state
    /// group); only a new peek does more.
    pub async fn put(
        &self,
        rooms: &Rooms,
        origin: &ServerName,
        room_id: &RoomId,
        raw_peek_id: &str,
        versions: &[String],
    ) -> Result<PutOutcome, PeekError> {
        let peek_id = PeekId::parse(raw_peek_id, self.limits.lenient_peek_ids);
        // FP-3: no `ver` means ["1"], as for make_join.
        let offered = if versions.is_empty() { vec!["1".to_owned()] } else { versions.to_vec() };
        // The common case, a renewal with fresh room facts in memory: checked here, renewed in a
        // shared round trip. Anything else takes the full path below.
        if let (Some(batcher), Some((room, facts))) = (&self.batcher, cached_facts(&self.facts, room_id.as_str())) {
            let checked = apply_checks(origin, &room, &facts, peek_id.clone(), &offered)?;
            let key = (origin.to_string(), room_id.to_string(), checked.as_str().to_owned());
            if batcher.renew(key).await.map_err(|e| PeekError::Room(RoomError::Internal(e)))? {
                return Ok(PutOutcome::Renewed);
            }
        }
        let (o, r) = (origin.to_owned(), room_id.to_string());
        let (cache, interval, grace) = (self.facts.clone(), self.limits.renewal_interval_ms, self.limits.grace_ms);
        let step = self
            .db
            .run_soft::<_, PeekError, _>(move |conn| {
                let (room, facts) = room_facts(conn, &cache, &r, Some(RENEWAL_FACTS_TTL))?;
                let checked = apply_checks(&o, &room, &facts, peek_id.clone(), &offered)?;
                if renew_live_blocking(conn, o.as_str(), &r, checked.as_str(), interval, grace)? {
                    return Ok(None);
                }
                // A new peek: check again on the room as it is now.
                let (room, facts) = room_facts(conn, &cache, &r, None)?;
                let peek_id = apply_checks(&o, &room, &facts, peek_id, &offered)?;
                Ok(Some((room, peek_id)))
            })
            .await?;
        let Some((room, peek_id)) = step else {
            return Ok(PutOutcome::Renewed);
        };
        self.check_limits(origin, room_id).await?;
        let response = self.create(rooms, origin, room, &peek_id).await?;
        Ok(PutOutcome::Created(Box::new(response)))
    }

    /// Checks 1 and 2: server ACL, then a room we actually hold.
    async fn check_room(&self, origin: &ServerName, room_id: &RoomId) -> Result<RoomRow, PeekError> {
        let (o, r, cache) = (origin.to_owned(), room_id.to_string(), self.facts.clone());
        self.db
            .run::<_, PeekError, _>(move |conn| {
                let (room, facts) = room_facts(conn, &cache, &r, None)?;
                if facts.acl.as_ref().is_some_and(|acl| !acl.is_allowed(&o)) {
                    return Err(PeekError::Acl(o.to_string()));
                }
                Ok(room)
            })
            .await
    }

    /// FP-9 / Rev B `/renew`: renews a live peek; `false` when unknown, lapsed or ended.
    pub async fn renew_live(&self, origin: &ServerName, room_id: &RoomId, peek_id: &PeekId) -> Result<bool, PeekError> {
        let key = (origin.to_string(), room_id.to_string(), peek_id.as_str().to_owned());
        let (interval, grace) = (self.limits.renewal_interval_ms, self.limits.grace_ms);
        self.db.run_soft(move |conn| renew_live_blocking(conn, &key.0, &key.1, &key.2, interval, grace)).await
    }

    /// Rev B `POST .../renew` on a live peek, after the same room checks as a PUT.
    pub async fn renew(&self, origin: &ServerName, room_id: &RoomId, raw_peek_id: &str) -> Result<i64, PeekError> {
        self.check_room(origin, room_id).await?;
        let peek_id = PeekId::parse(raw_peek_id, self.limits.lenient_peek_ids).ok_or(PeekError::InvalidPeekId)?;
        if self.renew_live(origin, room_id, &peek_id).await? {
            Ok(self.limits.renewal_interval_ms)
        } else {
            Err(PeekError::NoSuchPeek)
        }
    }

    /// FP-12: the per-origin rate of new peeks, then the caps on live peeks.
    async fn check_limits(&self, origin: &ServerName, room_id: &RoomId) -> Result<(), PeekError> {
        if let Err(not_until) = self.new_peeks.check_key(&origin.to_string()) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(PeekError::LimitExceeded { retry_after_ms: wait.as_millis().max(1) as u64 });
        }
        let (o, r) = (origin.to_string(), room_id.to_string());
        let (total, in_room) = self
            .db
            .run::<_, PeekError, _>(move |conn| {
                let now = now_ms();
                let live = inbound_peeks::table
                    .filter(inbound_peeks::origin.eq(&o))
                    .filter(inbound_peeks::expires_ts.ge(now))
                    .filter(inbound_peeks::end_stream_pos.is_null());
                let total: i64 = live.count().get_result(conn)?;
                let in_room: i64 = live.filter(inbound_peeks::room_id.eq(&r)).count().get_result(conn)?;
                Ok((total, in_room))
            })
            .await?;
        if total >= self.limits.max_active_per_origin || in_room >= self.limits.max_ids_per_room {
            return Err(PeekError::LimitExceeded { retry_after_ms: 60_000 });
        }
        Ok(())
    }

    /// Records the peek at the room's stream position P under the append lock, reads the state
    /// at P in the same transaction, then answers with it and its auth chain (FP-7, PE-3).
    async fn create(
        &self,
        rooms: &Rooms,
        origin: &ServerName,
        room: RoomRow,
        peek_id: &PeekId,
    ) -> Result<PeekResponse, PeekError> {
        let (o, r, p) = (origin.to_string(), room.room_id.clone(), peek_id.as_str().to_owned());
        let (interval, grace) = (self.limits.renewal_interval_ms, self.limits.grace_ms);
        let (state_ids, latest) = self
            .db
            .run::<_, PeekError, _>(move |conn| {
                write_transaction::<_, PeekError, _>(conn, |conn| {
                    let room = store::lock_for_append(conn, &r)?;
                    let position = store::latest_stream_pos(conn, &r)?;
                    record_peek(conn, &o, &r, &p, position, interval, grace)?;
                    let state_ids: Vec<String> = store::current_state_map(conn, &room.room_id)?.into_values().collect();
                    let latest = store::events_in_range(conn, &r, position + 1, false, 1)?
                        .into_iter()
                        .next()
                        .ok_or(RoomError::EventNotFound)?;
                    Ok((state_ids, latest))
                })
            })
            .await?;
        let room_id: OwnedRoomId = RoomId::parse(&room.room_id).map_err(|e| RoomError::Internal(e.to_string()))?;
        let state = rooms.events_by_ids(&room_id, state_ids.clone()).await?;
        let auth_chain = rooms.auth_chain(state_ids).await?;
        Ok(PeekResponse {
            room_version: room.version.as_str().to_owned(),
            state: state.iter().map(Pdu::federation_json).collect(),
            auth_chain: auth_chain.iter().map(Pdu::federation_json).collect(),
            latest_event: latest.pdu.federation_json(),
            latest_event_id: latest.pdu.event_id.to_string(),
            renewal_interval: interval as u64,
        })
    }

    /// FP-10: deletes the caller's own peek; `NoSuchPeek` when unknown or already expired.
    pub async fn delete(&self, origin: &ServerName, room_id: &RoomId, raw_peek_id: &str) -> Result<(), PeekError> {
        let peek_id = PeekId::parse(raw_peek_id, self.limits.lenient_peek_ids).ok_or(PeekError::NoSuchPeek)?;
        let key = (origin.to_string(), room_id.to_string(), peek_id.as_str().to_owned());
        let deleted = self
            .db
            .run::<_, PeekError, _>(move |conn| {
                Ok(diesel::delete(
                    inbound_peeks::table
                        .filter(inbound_peeks::origin.eq(&key.0))
                        .filter(inbound_peeks::room_id.eq(&key.1))
                        .filter(inbound_peeks::peek_id.eq(&key.2))
                        .filter(inbound_peeks::expires_ts.ge(now_ms()))
                        .filter(inbound_peeks::end_stream_pos.is_null()),
                )
                .execute(conn)?)
            })
            .await?;
        if deleted == 0 {
            return Err(PeekError::NoSuchPeek);
        }
        Ok(())
    }

    /// Live peeks right now (the `peekgate_inbound_peeks` gauge).
    pub async fn live_count(&self) -> Result<i64, PeekError> {
        self.db
            .run::<_, PeekError, _>(|conn| {
                Ok(inbound_peeks::table
                    .filter(inbound_peeks::expires_ts.ge(now_ms()))
                    .filter(inbound_peeks::end_stream_pos.is_null())
                    .count()
                    .get_result(conn)?)
            })
            .await
    }
}

/// Ends an inbound peek the way a lapse does (the peeker is told through `expired_peeks`).
pub async fn end_now(db: &Db, origin: &str, room_id: &str, peek_id: &str) -> Result<bool, DbError> {
    let (origin, room, peek) = (origin.to_owned(), room_id.to_owned(), peek_id.to_owned());
    db.run(move |conn: &mut DbConnection| {
        let changed = diesel::update(
            inbound_peeks::table
                .filter(inbound_peeks::origin.eq(&origin))
                .filter(inbound_peeks::room_id.eq(&room))
                .filter(inbound_peeks::peek_id.eq(&peek))
                .filter(inbound_peeks::end_stream_pos.is_null()),
        )
        .set(inbound_peeks::expires_ts.eq(now_ms() - 1))
        .execute(conn)?;
        Ok(changed == 1)
    })
    .await
}

/// Inserts the peek (replacing a lapsed or ended one with the same key) and makes sure its
/// server has a delivery cursor. A destination with no other live peek starts at P.
fn record_peek(
    conn: &mut DbConnection,
    origin: &str,
    room_id: &str,
    peek_id: &str,
    position: i64,
    interval: i64,
    grace: i64,
) -> Result<(), PeekError> {
    let now = now_ms();
    diesel::delete(
        inbound_peeks::table
            .filter(inbound_peeks::origin.eq(origin))
            .filter(inbound_peeks::room_id.eq(room_id))
            .filter(inbound_peeks::peek_id.eq(peek_id)),
    )
    .execute(conn)?;
    sender::forget_expired_peek(conn, origin, room_id, peek_id)?;
    let others: i64 = inbound_peeks::table
        .filter(inbound_peeks::origin.eq(origin))
        .filter(inbound_peeks::expires_ts.ge(now))
        .count()
        .get_result(conn)?;
    diesel::insert_into(inbound_peeks::table)
        .values((
            inbound_peeks::origin.eq(origin),
            inbound_peeks::room_id.eq(room_id),
            inbound_peeks::peek_id.eq(peek_id),
            inbound_peeks::created_ts.eq(now),
            inbound_peeks::renewed_ts.eq(now),
            inbound_peeks::renewal_interval_ms.eq(interval),
            inbound_peeks::expires_ts.eq(now + interval + grace),
            inbound_peeks::start_stream_pos.eq(position),
        ))
        .execute(conn)?;
    // With no other live peek, nothing else is due to this server before P.
    sender::ensure_cursor(conn, origin, position, others == 0)?;
    Ok(())
}

/// Why the room ended its peeks (the `reason` label of the eviction counter).
pub const REASON_VISIBILITY: &str = "visibility_changed";
pub const REASON_LEFT: &str = "room_left";
pub const REASON_LAPSED: &str = "lapsed";

/// Called by the append path inside its transaction after every state event (a hook that
/// `app` registers with the append path): when the room
/// stops being peekable (RE-3) or our last member leaves (RE-4), every inbound peek on it ends at
/// this event. The event itself is still delivered; `expired_peeks` follows (PE-7).
pub fn after_state_event(
    conn: &mut DbConnection,
    server_name: &str,
    pdu: &Pdu,
    position: i64,
) -> Result<(), RoomError> {
    let reason = if visibility::ends_peekability(pdu) {
        Some(REASON_VISIBILITY)
    } else if pdu.event_type().as_str() == "m.room.member" {
        let local_leave = pdu.state_key.as_deref().is_some_and(|k| ids::is_user_of(k, server_name))
            && pdu.content_value()["membership"] != "join";
        (local_leave && !has_local_member(conn, pdu.room_id.as_str(), server_name)?).then_some(REASON_LEFT)
    } else {
        None
    };
    if let Some(reason) = reason {
        end_room_peeks(conn, pdu.room_id.as_str(), position, reason)?;
    }
    Ok(())
}

fn has_local_member(conn: &mut DbConnection, room_id: &str, server_name: &str) -> Result<bool, RoomError> {
    let suffix = format!(":{server_name}");
    let members: Vec<String> = store::current_state_map(conn, room_id)?
        .into_iter()
        .filter(|((kind, key), _)| kind == "m.room.member" && key.ends_with(&suffix))
        .map(|(_, id)| id)
        .collect();
    Ok(store::events_by_ids(conn, &members)?.iter().any(|e| e.pdu.content_value()["membership"] == "join"))
}

/// Ends every open inbound peek on the room at `position` and queues `expired_peeks` notices.
fn end_room_peeks(conn: &mut DbConnection, room_id: &str, position: i64, reason: &str) -> Result<(), RoomError> {
    let open: Vec<(String, String)> = inbound_peeks::table
        .filter(inbound_peeks::room_id.eq(room_id))
        .filter(inbound_peeks::end_stream_pos.is_null())
        .select((inbound_peeks::origin, inbound_peeks::peek_id))
        .load(conn)?;
    diesel::update(
        inbound_peeks::table.filter(inbound_peeks::room_id.eq(room_id)).filter(inbound_peeks::end_stream_pos.is_null()),
    )
    .set((inbound_peeks::end_stream_pos.eq(position), inbound_peeks::end_reason.eq(reason)))
    .execute(conn)?;
    for (origin, peek_id) in open {
        sender::queue_expired_peek(conn, &origin, room_id, &peek_id, position)?;
    }
    Ok(())
}

/// One eviction batch of the `evict_inbound` job: deletes up to `batch` lapsed peeks, queueing
/// `expired_peeks` for them. On PostgreSQL the rows are claimed with `FOR UPDATE SKIP LOCKED`,
/// so several instances never evict the same peek. Returns how many were evicted.
pub fn evict_lapsed_batch(conn: &mut DbConnection, now: i64, batch: i64) -> Result<usize, diesel::result::Error> {
    write_transaction(conn, |conn| {
        let head = store::stream_head(conn)?;
        // Set-based: one statement moves a whole batch of lapsed peeks into notices. The rows
        // are claimed and deleted by their physical address (ctid; stable while they are locked
        // FOR UPDATE): about a quarter faster than matching the three key columns again.
        let lapsed = match conn {
            DbConnection::Postgresql(_) => {
                let noted = sender::queue_expired_peeks_sql("gone", head);
                let query = format!(
                    "WITH gone AS ( \
                         DELETE FROM inbound_peeks WHERE ctid = ANY(ARRAY( \
                             SELECT ctid FROM inbound_peeks \
                             WHERE expires_ts < {now} AND end_stream_pos IS NULL \
                             LIMIT {batch} FOR UPDATE SKIP LOCKED)) \
                         RETURNING origin, room_id, peek_id), \
                     noted AS ({noted}) \
                     SELECT COUNT(*) AS n FROM gone"
                );
                let counted: Vec<Counted> = diesel::sql_query(query).load(conn)?;
                counted.first().map(|c| c.n as usize).unwrap_or(0)
            }
            DbConnection::Sqlite(_) => {
                // Single instance: the whole sweep in one transaction, so both statements see
                // the same rows.
                let lapsed = format!("expires_ts < {now} AND end_stream_pos IS NULL");
                let source = format!("inbound_peeks WHERE {lapsed}");
                diesel::sql_query(sender::queue_expired_peeks_sql(&source, head)).execute(conn)?;
                diesel::sql_query(format!("DELETE FROM inbound_peeks WHERE {lapsed}")).execute(conn)?
            }
        };
        Ok(lapsed)
    })
}

/// Deletes the peeks a room ended (RE-3, RE-4) once their server's cursor passed the end.
/// Returns how many, by reason.
pub fn evict_ended(conn: &mut DbConnection) -> Result<BTreeMap<String, usize>, diesel::result::Error> {
    write_transaction(conn, |conn| {
        let delivered = inbound_peeks::end_stream_pos.le(diesel::dsl::sql::<
            diesel::sql_types::Nullable<diesel::sql_types::BigInt>,
        >(
            "(SELECT d.last_sent_pos FROM destinations d WHERE d.server_name = inbound_peeks.origin)",
        ));
        let reasons: Vec<Option<String>> = inbound_peeks::table
            .filter(inbound_peeks::end_stream_pos.is_not_null())
            .filter(delivered.clone())
            .select(inbound_peeks::end_reason)
            .load(conn)?;
        diesel::delete(inbound_peeks::table.filter(inbound_peeks::end_stream_pos.is_not_null()).filter(delivered))
            .execute(conn)?;
        let mut ended: BTreeMap<String, usize> = BTreeMap::new();
        for reason in reasons {
            *ended.entry(reason.unwrap_or_else(|| REASON_VISIBILITY.to_owned())).or_default() += 1;
        }
        Ok(ended)
    })
}

#[derive(diesel::QueryableByName)]
struct Counted {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}
