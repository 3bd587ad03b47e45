//! MSC2444, we are the peeker (OP-1..9): choose targets, `PUT /peek`, validate the answer
//! (OP-4, in [`super::validate`]), store it as the room's starting point, renew while a local
//! device still watches (TBD-1), fail over to the next candidate, fill gaps with
//! `get_missing_events`, and `DELETE` the peek when nobody watches any more.
//!
//! One federation peek per room (OP-2), shared by every local device that peeks it; the
//! `outbound_peeks` row remembers the target, the peek_id and the candidates for failover.

use std::collections::HashMap;
use std::sync::Arc;

use diesel::prelude::*;
use rand::distr::{Alphanumeric, SampleString};
use reqwest::Method;
use ruma::{OwnedRoomId, OwnedServerName, RoomAliasId, RoomId, ServerName};
use serde_json::{json, Value};

use super::devices;
use super::validate::{self, InvalidPeek, ValidPeek};
use crate::clock::now_ms;
use crate::db::schema::{outbound_claims, outbound_peeks};
use crate::db::{write_transaction, DbConnection};
use crate::events::{Pdu, RoomVersion};
use crate::federation::client::{FedRequest, FederationError};
use crate::on_backend;
use crate::rooms::{RoomError, StateMap};
use crate::state::AppState;

/// Ended device peeks are kept this long for their leave entry (CP-12), then forgotten.
const KEEP_ENDED_DEVICE_PEEKS_MS: i64 = 24 * 3_600_000;
/// OP-7: renew at renewed + min(interval / 2, 1 h).
const MAX_RENEWAL_SPACING_MS: i64 = 3_600_000;
const MIN_RENEWAL_SPACING_MS: i64 = 500;
/// Events asked for in one `get_missing_events`.
const MISSING_EVENTS_LIMIT: usize = 100;
/// `get_missing_events` calls for one gap: up to 1,000 events. A longer gap is not filled
/// (the caller re-syncs from a state snapshot instead, or refuses the PDU).
const MISSING_EVENTS_ROUNDS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// OP-5: the room's version is one we do not support; trying other servers cannot help.
    #[error("incompatible room version {0}")]
    IncompatibleVersion(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error(transparent)]
    Room(#[from] RoomError),
}

impl From<diesel::result::Error> for OutboundError {
    fn from(e: diesel::result::Error) -> Self {
        OutboundError::Room(e.into())
    }
}

/// An `outbound_peeks` row.
#[derive(Debug, Clone, Queryable)]
pub struct OutboundPeek {
    pub room_id: String,
    pub target: String,
    pub peek_id: String,
    pub candidates: String,
    pub created_ts: i64,
    pub renewed_ts: i64,
    pub renewal_interval_ms: i64,
    pub next_renewal_ts: i64,
    pub failures: i32,
    pub ended_ts: Option<i64>,
}

impl OutboundPeek {
    fn candidates(&self) -> Vec<String> {
        serde_json::from_str(&self.candidates).unwrap_or_default()
    }

    fn lapsed(&self, now: i64) -> bool {
        now > self.renewed_ts + self.renewal_interval_ms
    }
}

/// OP-1: the ordered, de-duplicated candidate targets, without our own name.
pub fn candidates<'a>(ours: &ServerName, lists: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for server in lists {
        let valid = ServerName::parse(server).is_ok();
        if valid && server != ours.as_str() && !out.iter().any(|s| s == server) {
            out.push(server.to_owned());
        }
    }
    out
}

fn enc(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}

fn peek_path(room_id: &str, peek_id: &str, with_versions: bool) -> String {
    let mut path = format!("/_matrix/federation/v1/peek/{}/{}", enc(room_id), enc(peek_id));
    if with_versions {
        let versions: Vec<String> = RoomVersion::SUPPORTED.iter().map(|v| format!("ver={}", v.as_str())).collect();
        path = format!("{path}?{}", versions.join("&"));
    }
    path
}

fn server(name: &str) -> Result<OwnedServerName, OutboundError> {
    ServerName::parse(name).map_err(|_| OutboundError::NotFound(format!("invalid server name {name:?}")))
}

/// Resolves an alias of another server through its `/query/directory` (CP-2, OP-1.2): the room
/// and the servers the directory suggests.
pub async fn resolve_alias(state: &AppState, alias: &RoomAliasId) -> Result<(OwnedRoomId, Vec<String>), OutboundError> {
    let path = format!("/_matrix/federation/v1/query/directory?room_alias={}", enc(alias.as_str()));
    let answer = match state.federation.get(alias.server_name(), &path).await {
        Ok(answer) => answer,
        Err(e) if e.status() == Some(404) => return Err(OutboundError::NotFound("Room alias not found".into())),
        Err(e) => {
            tracing::info!(%alias, error = %e, "directory query failed");
            return Err(OutboundError::NotFound(format!("Cannot resolve the alias: {}", alias.server_name())));
        }
    };
    let room_id = answer["room_id"]
        .as_str()
        .and_then(|r| RoomId::parse(r).ok())
        .ok_or_else(|| OutboundError::NotFound("The directory answer has no valid room_id".into()))?;
    let servers = answer["servers"]
        .as_array()
        .map(|s| s.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    Ok((room_id, servers))
}

/// The room's outbound peek row, ended or not.
pub async fn get(state: &AppState, room_id: &RoomId) -> Result<Option<OutboundPeek>, RoomError> {
    let room = room_id.to_string();
    state.db.run::<_, RoomError, _>(move |conn| row(conn, &room)).await
}

fn row(conn: &mut DbConnection, room_id: &str) -> Result<Option<OutboundPeek>, RoomError> {
    Ok(outbound_peeks::table.find(room_id).select(outbound_peeks::all_columns).first(conn).optional()?)
}

/// One lock per room for establishing and cancelling its federation peek, so that two devices
/// peeking the same room at once make one `PUT`, not two (within one instance; see
/// [`lock_room`] for instances sharing a database).
#[derive(Default)]
pub struct RoomLocks(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl RoomLocks {
    pub async fn lock(&self, room_id: &RoomId) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.0.lock().unwrap();
            // Forget locks nobody holds or waits for.
            map.retain(|_, lock| Arc::strong_count(lock) > 1);
            map.entry(room_id.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

/// How long an instance may hold a room's claim before another takes it over: far longer than
/// establishing a peek takes (candidates times the request timeout), short enough that a dead
/// instance's claim does not block the room for long.
const CLAIM_TTL_MS: i64 = 120_000;
/// How often an instance waiting for a room's claim looks again.
const CLAIM_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Held while a room's federation peek is established, failed over, re-synced or cancelled:
/// the in-process [`RoomLocks`] lock and a claim row in `outbound_claims`, so that instances
/// on one database take turns too (design.md §6). Without the claim, two instances peeking a
/// new room at once both stored its state, and one of them failed. Dropping the guard releases
/// both; a claim left by a dead instance expires after [`CLAIM_TTL_MS`].
pub struct RoomGuard {
    _local: tokio::sync::OwnedMutexGuard<()>,
    claim: Option<(crate::db::Db, String, String)>,
}

impl Drop for RoomGuard {
    fn drop(&mut self) {
        let Some((db, room, owner)) = self.claim.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            let released = db
                .run::<_, RoomError, _>(move |conn| {
                    diesel::delete(outbound_claims::table.find(&room).filter(outbound_claims::owner.eq(&owner)))
                        .execute(conn)?;
                    Ok(())
                })
                .await;
            if let Err(e) = released {
                tracing::warn!(error = %e, "cannot release a room's claim; it expires on its own");
            }
        });
    }
}

/// Takes the room's lock in this process, then its claim in the database, waiting for another
/// instance to finish with it.
pub async fn lock_room(state: &AppState, room_id: &RoomId) -> Result<RoomGuard, RoomError> {
    let local = state.outbound_locks.lock(room_id).await;
    while !try_claim(state, room_id).await? {
        tokio::time::sleep(CLAIM_POLL).await;
    }
    let claim = Some((state.db.clone(), room_id.to_string(), state.instance_id.clone()));
    Ok(RoomGuard { _local: local, claim })
}

/// Claims the room for this instance when nobody else holds a live claim.
async fn try_claim(state: &AppState, room_id: &RoomId) -> Result<bool, RoomError> {
    let (room, me) = (room_id.to_string(), state.instance_id.clone());
    state
        .db
        .run(move |conn| {
            let now = now_ms();
            let fresh = (
                outbound_claims::room_id.eq(&room),
                outbound_claims::owner.eq(&me),
                outbound_claims::expires_ts.eq(now + CLAIM_TTL_MS),
            );
            let inserted = on_backend!(&mut *conn, |c| diesel::insert_into(outbound_claims::table)
                .values(fresh)
                .on_conflict_do_nothing()
                .execute(c))?;
            if inserted == 1 {
                return Ok(true);
            }
            let taken = diesel::update(
                outbound_claims::table
                    .find(&room)
                    .filter(outbound_claims::owner.eq(&me).or(outbound_claims::expires_ts.lt(now))),
            )
            .set((outbound_claims::owner.eq(&me), outbound_claims::expires_ts.eq(now + CLAIM_TTL_MS)))
            .execute(conn)?;
            Ok(taken == 1)
        })
        .await
}

/// OP-2: reuses the room's live federation peek, or establishes one through the candidates.
/// Returns whether a new peek was established after an earlier one (the timeline may have a gap).
pub async fn ensure(state: &AppState, room_id: &RoomId, candidates: Vec<String>) -> Result<bool, OutboundError> {
    let _room = lock_room(state, room_id).await?;
    let existing = get(state, room_id).await?;
    if existing.as_ref().is_some_and(|p| p.ended_ts.is_none()) {
        return Ok(false);
    }
    let mut all = candidates;
    if let Some(old) = &existing {
        all = self::candidates(
            &state.settings.server_name,
            all.iter().map(String::as_str).chain(old.candidates().iter().map(String::as_str)),
        );
    }
    let gappy = establish(state, room_id, &all).await?;
    Ok(existing.is_some() || gappy)
}

/// OP-3..5: tries each candidate in order with a fresh peek_id until one answer validates.
/// Returns whether the stored timeline has a gap (the new state could not be joined to ours).
async fn establish(state: &AppState, room_id: &RoomId, candidates: &[String]) -> Result<bool, OutboundError> {
    let mut forbidden = None;
    for target in candidates {
        let Ok(target_name) = server(target) else { continue };
        let peek_id = Alphanumeric.sample_string(&mut rand::rng(), 8);
        let path = peek_path(room_id.as_str(), &peek_id, true);
        let request = FedRequest {
            method: Method::PUT,
            destination: &target_name,
            path: &path,
            body: Some(json!({})),
            signed: true,
        };
        let answer = match state.federation.send(request).await {
            Ok(answer) => answer,
            Err(FederationError::Status { status: 400, errcode, body, .. })
                if errcode == "M_INCOMPATIBLE_ROOM_VERSION" =>
            {
                let version = body["room_version"].as_str().unwrap_or("unknown").to_owned();
                return Err(OutboundError::IncompatibleVersion(version));
            }
            Err(e) => {
                tracing::info!(room = %room_id, %target, error = %e, "peek refused or failed; trying the next server");
                if e.status() == Some(403) {
                    forbidden = Some(format!("{target} refused the peek"));
                }
                continue;
            }
        };
        match validate::validate(&state.keys, room_id, &answer).await {
            Ok(valid) => {
                let stored = match adopt(state, room_id, &target_name, &valid).await {
                    Ok(gappy) => record(state, room_id, target, &peek_id, candidates, valid.renewal_interval_ms)
                        .await
                        .map(|()| gappy)
                        .map_err(OutboundError::from),
                    Err(e) => Err(e),
                };
                match stored {
                    Ok(gappy) => {
                        tracing::info!(room = %room_id, %target, %peek_id, "outbound peek established");
                        return Ok(gappy);
                    }
                    Err(e) => {
                        // Do not leave the target holding a peek nobody will renew.
                        delete_remote(state, &target_name, room_id, &peek_id).await;
                        return Err(e);
                    }
                }
            }
            Err(invalid) => {
                tracing::warn!(room = %room_id, %target, error = %invalid, "invalid peek answer; trying the next server");
                if let InvalidPeek::NotPeekable(reason) = invalid {
                    forbidden = Some(format!("The room is not peekable: {reason}"));
                }
                delete_remote(state, &target_name, room_id, &peek_id).await;
            }
        }
    }
    Err(match forbidden {
        Some(reason) => OutboundError::Forbidden(reason),
        None => OutboundError::NotFound("No server could give a peek into the room".into()),
    })
}

/// Stores a validated answer. A room we hold already is continued when the new latest event
/// joins our timeline (the gap filled by `get_missing_events`); otherwise the snapshot replaces
/// our state and forward extremity, and `true` says the timeline has a gap.
async fn adopt(
    state: &AppState,
    room_id: &RoomId,
    target: &ServerName,
    valid: &ValidPeek,
) -> Result<bool, OutboundError> {
    let known = state.rooms.room(room_id).await?;
    if let Some(room) = &known {
        if room.is_local {
            return Err(OutboundError::Forbidden("this server hosts the room".into()));
        }
        if state.rooms.event(valid.latest.event_id.as_str()).await?.is_some() {
            return Ok(false);
        }
        if fill_gap(state, target, room_id, vec![valid.latest.event_id.to_string()]).await.is_ok()
            && state.rooms.append_remote(room_id, valid.latest.clone()).await.is_ok()
        {
            return Ok(false);
        }
    }
    store(state, room_id, valid).await?;
    Ok(known.is_some())
}

async fn store(state: &AppState, room_id: &RoomId, valid: &ValidPeek) -> Result<i64, RoomError> {
    let state_map: StateMap = valid.state.clone();
    let (outliers, latest, timeline) = (valid.events.clone(), valid.latest.clone(), valid.timeline.clone());
    state.rooms.store_snapshot(room_id, valid.version, state_map, outliers, latest, timeline).await
}

/// Records the room's federation peek (replacing an earlier one).
async fn record(
    state: &AppState,
    room_id: &RoomId,
    target: &str,
    peek_id: &str,
    candidates: &[String],
    interval_ms: i64,
) -> Result<(), RoomError> {
    let now = now_ms();
    let room = room_id.to_string();
    let row = (
        outbound_peeks::room_id.eq(room.clone()),
        outbound_peeks::target.eq(target.to_owned()),
        outbound_peeks::peek_id.eq(peek_id.to_owned()),
        outbound_peeks::candidates.eq(serde_json::to_string(candidates).expect("strings serialise")),
        outbound_peeks::created_ts.eq(now),
        outbound_peeks::renewed_ts.eq(now),
        outbound_peeks::renewal_interval_ms.eq(interval_ms),
        outbound_peeks::next_renewal_ts.eq(now + renewal_spacing(interval_ms)),
        outbound_peeks::failures.eq(0),
        outbound_peeks::ended_ts.eq(None::<i64>),
    );
    state
        .db
        .run::<_, RoomError, _>(move |conn| {
            write_transaction::<_, RoomError, _>(conn, |conn| {
                diesel::delete(outbound_peeks::table.find(&room)).execute(conn)?;
                diesel::insert_into(outbound_peeks::table).values(row.clone()).execute(conn)?;
                Ok(())
            })
        })
        .await
}

/// OP-7: renew at renewed + min(interval / 2, 1 h); absurd intervals are clamped.
fn renewal_spacing(interval_ms: i64) -> i64 {
    (interval_ms / 2).clamp(MIN_RENEWAL_SPACING_MS, MAX_RENEWAL_SPACING_MS)
}

/// Back-off between failed renewals of a peek that has not lapsed yet (OP-6).
fn retry_spacing(failures: i32, interval_ms: i64) -> i64 {
    let backoff = 1000i64.saturating_mul(1 << failures.clamp(0, 10));
    backoff.min((interval_ms / 4).max(MIN_RENEWAL_SPACING_MS))
}

/// `DELETE` of one federation peek, best effort: a 404 means it is gone already (OP-8).
async fn delete_remote(state: &AppState, target: &ServerName, room_id: &RoomId, peek_id: &str) {
    let path = peek_path(room_id.as_str(), peek_id, false);
    let request = FedRequest { method: Method::DELETE, destination: target, path: &path, body: None, signed: true };
    match state.federation.send(request).await {
        Ok(_) => {}
        Err(e) if e.status() == Some(404) => {}
        Err(e) => tracing::info!(room = %room_id, %target, error = %e, "DELETE of an outbound peek failed"),
    }
}

/// OP-8: nobody watches the room any more: DELETE its federation peek and mark it ended (PDUs
/// in flight are still accepted for a minute).
pub async fn cancel(state: &AppState, room_id: &RoomId) -> Result<(), RoomError> {
    let _room = lock_room(state, room_id).await?;
    let Some(peek) = get(state, room_id).await?.filter(|p| p.ended_ts.is_none()) else {
        return Ok(());
    };
    if let Ok(target) = server(&peek.target) {
        delete_remote(state, &target, room_id, &peek.peek_id).await;
    }
    let room = room_id.to_string();
    state
        .db
        .run::<_, RoomError, _>(move |conn| {
            diesel::update(outbound_peeks::table.find(&room))
                .set(outbound_peeks::ended_ts.eq(now_ms()))
                .execute(conn)?;
            Ok(())
        })
        .await?;
    tracing::info!(room = %room_id, target = %peek.target, "outbound peek deleted: no local device watches the room");
    Ok(())
}

/// Cancels the room's federation peek when no local device peeks it any more (unpeek, CP-8).
pub async fn release_if_unwatched(state: &AppState, room_id: &RoomId) -> Result<(), RoomError> {
    let room = room_id.to_string();
    let open = state.db.run::<_, RoomError, _>(move |conn| devices::open_count(conn, &room)).await?;
    if open == 0 {
        cancel(state, room_id).await?;
    }
    Ok(())
}

/// OP-9: does `origin` hold our peek on the room (or held it until `peeks.outbound_linger_ms`
/// ago, for transactions in flight)?
pub async fn accepts_from(state: &AppState, room_id: &RoomId, origin: &ServerName) -> Result<bool, RoomError> {
    let (now, linger) = (now_ms(), linger_ms(state));
    Ok(get(state, room_id)
        .await?
        .is_some_and(|p| p.target == origin.as_str() && p.ended_ts.is_none_or(|ended| now - ended < linger)))
}

fn linger_ms(state: &AppState) -> i64 {
    state.settings.raw.peeks.outbound_linger_ms as i64
}

/// Fetches the events between our forward extremities and `latest` from `origin` and appends
/// them oldest first (OP-6, OP-9). A gap longer than one answer is walked back page by page:
/// each further call asks for the history behind the oldest fetched events whose
/// `prev_events` we still lack. A target that refuses `get_missing_events` (403/404/400) is
/// walked with `/backfill` instead ([`super::backfill`], OP-4.6). Fails when the gap could not
/// be closed.
pub async fn fill_gap(
    state: &AppState,
    origin: &ServerName,
    room_id: &RoomId,
    latest: Vec<String>,
) -> Result<usize, OutboundError> {
    let row = state.rooms.room(room_id).await?.ok_or(RoomError::NotFound)?;
    let earliest = state.rooms.forward_extremities(room_id).await?;
    let mut fetched: HashMap<String, Pdu> = HashMap::new();
    let mut frontier = latest.clone();
    for _ in 0..MISSING_EVENTS_ROUNDS {
        let page = match missing_events(state, origin, room_id, row.version, &earliest, &frontier).await {
            Ok(page) => page,
            // OP-4.6: targets that serve non-members only `/backfill`.
            Err(e) if super::backfill::refuses_reads(&e) => {
                tracing::info!(room = %room_id, %origin, error = %e, "get_missing_events refused; walking /backfill");
                return super::backfill::fill_gap(state, origin, room_id, row.version, &latest).await;
            }
            Err(e) => return Err(OutboundError::NotFound(format!("get_missing_events: {e}"))),
        };
        let before = fetched.len();
        for pdu in page {
            fetched.entry(pdu.event_id.to_string()).or_insert(pdu);
        }
        if fetched.len() == before {
            break; // nothing new: the origin cannot take us further back
        }
        frontier = unlinked(state, &fetched, &latest).await?;
        if frontier.is_empty() {
            break;
        }
    }
    let mut events: Vec<Pdu> = fetched.into_values().filter(|p| !latest.contains(&p.event_id.to_string())).collect();
    events.sort_by_key(|p| p.depth);
    let mut appended = 0;
    for pdu in events {
        if state.rooms.append_remote(room_id, pdu).await?.is_some() {
            appended += 1;
        }
    }
    Ok(appended)
}

/// One `get_missing_events` call; the events that pass their checks (others are logged and
/// dropped, so the gap stays open behind them).
async fn missing_events(
    state: &AppState,
    origin: &ServerName,
    room_id: &RoomId,
    version: RoomVersion,
    earliest: &[String],
    latest: &[String],
) -> Result<Vec<Pdu>, FederationError> {
    let path = format!("/_matrix/federation/v1/get_missing_events/{}", enc(room_id.as_str()));
    let body =
        json!({ "earliest_events": earliest, "latest_events": latest, "limit": MISSING_EVENTS_LIMIT, "min_depth": 0 });
    let request = FedRequest { method: Method::POST, destination: origin, path: &path, body: Some(body), signed: true };
    let answer = state.federation.send(request).await?;
    let mut events = Vec::new();
    for raw in answer["events"].as_array().cloned().unwrap_or_default() {
        match validate::check_pdu(&state.keys, room_id, version, &raw, validate::Hashes::Redact).await {
            Ok(pdu) => events.push(pdu),
            Err(e) => tracing::info!(room = %room_id, %origin, error = %e, "a missing event failed its checks"),
        }
    }
    Ok(events)
}

/// The fetched events with a `prev_event` that is neither fetched, nor in `latest`, nor stored:
/// where the next page of history has to start.
async fn unlinked(
    state: &AppState,
    fetched: &HashMap<String, Pdu>,
    latest: &[String],
) -> Result<Vec<String>, OutboundError> {
    let mut open = Vec::new();
    for (id, pdu) in fetched {
        for prev in &pdu.prev_events {
            let prev = prev.as_str();
            if fetched.contains_key(prev) || latest.iter().any(|l| l == prev) {
                continue;
            }
            if state.rooms.event(prev).await?.is_none() {
                open.push(id.clone());
                break;
            }
        }
    }
    Ok(open)
}

/// What one run of the `renew_outbound` job did.
#[derive(Debug, Default)]
pub struct RenewalRun {
    pub renewed: usize,
    pub failed: usize,
    pub failed_over: usize,
    pub cancelled: usize,
}

/// The `renew_outbound` job (OP-6, OP-7, OP-8, TBD-1): cancels peeks nobody watches, renews
/// those that are due, fails over lapsed or vanished ones, forgets ended ones, and sets gauges.
pub async fn run_renewals(state: &AppState) -> Result<RenewalRun, RoomError> {
    let now = now_ms();
    let live_since = now - state.settings.raw.peeks.idle_device_ms as i64;
    let active: Vec<OutboundPeek> = state
        .db
        .run::<_, RoomError, _>(|conn| {
            Ok(outbound_peeks::table
                .filter(outbound_peeks::ended_ts.is_null())
                .select(outbound_peeks::all_columns)
                .load(conn)?)
        })
        .await?;
    let mut run = RenewalRun::default();
    let mut lag_ms = 0;
    for peek in active {
        let Ok(room_id) = RoomId::parse(&peek.room_id) else { continue };
        let room = peek.room_id.clone();
        let live = state.db.run::<_, RoomError, _>(move |conn| devices::live_count(conn, &room, live_since)).await?;
        if live == 0 {
            cancel(state, &room_id).await?;
            run.cancelled += 1;
            continue;
        }
        if peek.next_renewal_ts > now || !claim(state, &peek, now).await? {
            continue;
        }
        lag_ms = lag_ms.max(now - peek.next_renewal_ts);
        renew(state, &room_id, &peek, &mut run).await?;
    }
    forget_ended(state, now).await?;
    let (outbound, device) = state
        .db
        .run::<_, RoomError, _>(move |conn| {
            let outbound: i64 =
                outbound_peeks::table.filter(outbound_peeks::ended_ts.is_null()).count().get_result(conn)?;
            Ok((outbound, devices::live_total(conn, live_since)?))
        })
        .await?;
    state.metrics.outbound_peeks(outbound);
    state.metrics.device_peeks(device);
    state.metrics.renewal_lag(lag_ms as f64 / 1000.0);
    Ok(run)
}

/// Takes a due renewal for this run by moving its next time on, only if no other instance did.
async fn claim(state: &AppState, peek: &OutboundPeek, now: i64) -> Result<bool, RoomError> {
    let (room, seen) = (peek.room_id.clone(), peek.next_renewal_ts);
    let claimed = state
        .db
        .run::<_, RoomError, _>(move |conn| {
            Ok(diesel::update(outbound_peeks::table.find(&room).filter(outbound_peeks::next_renewal_ts.eq(seen)))
                .set(outbound_peeks::next_renewal_ts.eq(now + 30_000))
                .execute(conn)?)
        })
        .await?;
    Ok(claimed == 1)
}

/// OP-7: re-PUT with the same peek_id. `{}` renews; a full answer means the target had lapsed
/// our peek and started a new one (validated and adopted); 404 or a lapse fails over (OP-6);
/// other failures retry with back-off until the peek lapses.
async fn renew(state: &AppState, room_id: &RoomId, peek: &OutboundPeek, run: &mut RenewalRun) -> Result<(), RoomError> {
    let now = now_ms();
    let target = server(&peek.target).map_err(|e| RoomError::Internal(e.to_string()))?;
    let path = peek_path(room_id.as_str(), &peek.peek_id, true);
    let request =
        FedRequest { method: Method::PUT, destination: &target, path: &path, body: Some(json!({})), signed: true };
    let result = state.federation.send(request).await;
    let outcome = match result {
        Ok(answer) if answer.get("state").is_none() => Ok(peek.renewal_interval_ms),
        Ok(answer) => match validate::validate(&state.keys, room_id, &answer).await {
            Ok(valid) => match adopt(state, room_id, &target, &valid).await {
                Ok(gappy) => {
                    if gappy {
                        state.device_peeks.mark_gappy(room_id.as_str()).await?;
                    }
                    Ok(valid.renewal_interval_ms)
                }
                Err(e) => Err((true, e.to_string())),
            },
            Err(e) => Err((true, e.to_string())),
        },
        Err(e) => Err((e.status() == Some(404) || peek.lapsed(now), e.to_string())),
    };
    match outcome {
        Ok(interval) => {
            state.metrics.peek_renewal("outbound", "ok");
            run.renewed += 1;
            let room = peek.room_id.clone();
            state
                .db
                .run::<_, RoomError, _>(move |conn| {
                    diesel::update(outbound_peeks::table.find(&room))
                        .set((
                            outbound_peeks::renewed_ts.eq(now),
                            outbound_peeks::renewal_interval_ms.eq(interval),
                            outbound_peeks::next_renewal_ts.eq(now + renewal_spacing(interval)),
                            outbound_peeks::failures.eq(0),
                        ))
                        .execute(conn)?;
                    Ok(())
                })
                .await
        }
        Err((fail_over, reason)) => {
            state.metrics.peek_renewal("outbound", "failed");
            run.failed += 1;
            tracing::warn!(room = %room_id, target = %peek.target, %reason, fail_over, "outbound peek renewal failed");
            if fail_over && failover(state, room_id, peek).await? {
                run.failed_over += 1;
                return Ok(());
            }
            let (room, failures, interval) = (peek.room_id.clone(), peek.failures + 1, peek.renewal_interval_ms);
            state
                .db
                .run::<_, RoomError, _>(move |conn| {
                    diesel::update(outbound_peeks::table.find(&room))
                        .set((
                            outbound_peeks::failures.eq(failures),
                            outbound_peeks::next_renewal_ts.eq(now + retry_spacing(failures, interval)),
                        ))
                        .execute(conn)?;
                    Ok(())
                })
                .await
        }
    }
}

/// OP-6: a new peek (new peek_id) through the other candidates, the failed target last, plus
/// the servers with joined members in our copy of the room; the gap is filled from the new
/// target. `false` when no candidate answered.
async fn failover(state: &AppState, room_id: &RoomId, peek: &OutboundPeek) -> Result<bool, RoomError> {
    let _room = lock_room(state, room_id).await?;
    if !get(state, room_id).await?.is_some_and(|p| p.ended_ts.is_none() && p.peek_id == peek.peek_id) {
        return Ok(true); // cancelled or replaced while we waited for the lock
    }
    let known = peek.candidates();
    let joined = state.rooms.joined_servers(room_id).await.unwrap_or_default();
    let others = known.iter().chain(joined.iter()).map(String::as_str).filter(|s| *s != peek.target);
    let order = candidates(&state.settings.server_name, others.chain([peek.target.as_str()]));
    repeek(state, room_id, peek, &order, "failed over").await
}

/// A gap in a peeked room that `get_missing_events` could not close (a PDU pushed at
/// `refused_at` had prev events we could not fetch): a new peek, through the same target
/// first, gives the room a new starting point, and its devices a `limited` timeline. Nothing
/// to do when the peek ended or was re-established since (several refused PDUs ask at once).
pub async fn resync(state: &AppState, room_id: &RoomId, refused_at: i64) -> Result<bool, RoomError> {
    let _room = lock_room(state, room_id).await?;
    let Some(peek) = get(state, room_id).await?.filter(|p| p.ended_ts.is_none() && p.created_ts < refused_at) else {
        return Ok(false);
    };
    let known = peek.candidates();
    let others = known.iter().map(String::as_str).filter(|s| *s != peek.target);
    let order = candidates(&state.settings.server_name, [peek.target.as_str()].into_iter().chain(others));
    repeek(state, room_id, &peek, &order, "re-synced after a gap it could not fill").await
}

/// Replaces `peek` by a new one through the first of `order` that answers, then DELETEs the
/// old one. `false` when no candidate answered.
async fn repeek(
    state: &AppState,
    room_id: &RoomId,
    peek: &OutboundPeek,
    order: &[String],
    what: &str,
) -> Result<bool, RoomError> {
    match establish(state, room_id, order).await {
        Ok(gappy) => {
            if gappy {
                state.device_peeks.mark_gappy(room_id.as_str()).await?;
            }
            // Best effort: the old target may be gone, or may come back still holding our peek.
            if let Ok(old) = server(&peek.target) {
                delete_remote(state, &old, room_id, &peek.peek_id).await;
            }
            tracing::info!(room = %room_id, from = %peek.target, "outbound peek {what}");
            Ok(true)
        }
        Err(OutboundError::Room(e)) => Err(e),
        Err(e) => {
            tracing::warn!(room = %room_id, error = %e, "no candidate answered a new outbound peek");
            Ok(false)
        }
    }
}

/// Forgets ended peeks once PDUs in flight no longer count and no device peek would
/// re-establish them (an idle device that syncs again re-peeks through the remembered
/// candidates), and with them our copy of the room: an ended peek leaves nothing behind.
/// Ended device peeks are kept a day for their leave entries.
async fn forget_ended(state: &AppState, now: i64) -> Result<(), RoomError> {
    let ended_before = now - linger_ms(state);
    let ended: Vec<String> = state
        .db
        .run::<_, RoomError, _>(move |conn| {
            Ok(outbound_peeks::table
                .filter(outbound_peeks::ended_ts.lt(ended_before))
                .select(outbound_peeks::room_id)
                .load(conn)?)
        })
        .await?;
    for room in ended {
        let Ok(room_id) = RoomId::parse(&room) else { continue };
        // Under the room's claim, so that an instance starting a peek in this room right now
        // either finishes first (and we see its peek) or waits for us.
        let _room = lock_room(state, &room_id).await?;
        let purged = state
            .db
            .run::<_, RoomError, _>(move |conn| {
                write_transaction::<_, RoomError, _>(conn, |conn| {
                    let still_ended: i64 = outbound_peeks::table
                        .find(&room)
                        .filter(outbound_peeks::ended_ts.lt(ended_before))
                        .count()
                        .get_result(conn)?;
                    if still_ended == 0 || devices::open_count(conn, &room)? > 0 {
                        return Ok(false);
                    }
                    diesel::delete(outbound_peeks::table.find(&room)).execute(conn)?;
                    crate::rooms::store::purge_remote_room(conn, &room)
                })
            })
            .await?;
        if purged {
            tracing::info!(room = %room_id, "forgot a room nobody peeks any more");
        }
    }
    state
        .db
        .run::<_, RoomError, _>(move |conn| {
            devices::forget_ended(conn, now - KEEP_ENDED_DEVICE_PEEKS_MS)?;
            Ok(())
        })
        .await
}

/// Candidates for re-establishing a room's peek: those remembered, else the room ID's server.
pub async fn remembered_candidates(state: &AppState, room_id: &RoomId) -> Result<Vec<String>, RoomError> {
    let mut list = get(state, room_id).await?.map(|p| p.candidates()).unwrap_or_default();
    if let Some(server) = room_id.server_name() {
        list.push(server.to_string());
    }
    Ok(candidates(&state.settings.server_name, list.iter().map(String::as_str)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op1_candidates_keep_first_occurrence_and_drop_our_name() {
        let ours = ServerName::parse("us.test").unwrap();
        let list = candidates(&ours, ["a.test", "us.test", "b.test", "a.test", "not a server", "c.test:8448"]);
        assert_eq!(list, ["a.test", "b.test", "c.test:8448"]);
    }

    #[test]
    fn op7_renewal_spacing_is_half_the_interval_clamped() {
        assert_eq!(renewal_spacing(60_000), 30_000);
        assert_eq!(renewal_spacing(3_600_000_000), MAX_RENEWAL_SPACING_MS);
        assert_eq!(renewal_spacing(10), MIN_RENEWAL_SPACING_MS);
        assert!(retry_spacing(1, 60_000) <= 15_000);
        assert_eq!(retry_spacing(20, 60_000), 15_000);
    }
}
