//! OP-2..5, OP-8: establish a room's federation peek through the candidates, adopt a validated
//! answer as the room's starting point, and cancel the peek when nobody watches any more.

use super::*;

/// OP-2: reuses the room's live federation peek, or establishes one through the candidates.
/// Returns whether a new peek was established after an earlier one (the timeline may have a gap).
pub async fn ensure(state: &OutboundPeeks, room_id: &RoomId, candidates: Vec<String>) -> Result<bool, OutboundError> {
    Ok(ensure_held(state, room_id, candidates).await?.0)
}

/// [`ensure`], still holding the room's lock: a device's `/peek` records the device's peek
/// before letting go, so that the renewal job never sees a federation peek nobody watches in
/// between and cancels it (found by `renewals_keep_the_peek_alive` under load).
pub async fn ensure_held(
    state: &OutboundPeeks,
    room_id: &RoomId,
    candidates: Vec<String>,
) -> Result<(bool, RoomGuard), OutboundError> {
    let room = lock_room(state, room_id).await?;
    let existing = get(state, room_id).await?;
    if existing.as_ref().is_some_and(|p| p.ended_ts.is_none()) {
        return Ok((false, room));
    }
    let mut all = candidates;
    if let Some(old) = &existing {
        all = self::candidates(
            &state.settings.server_name,
            all.iter().map(String::as_str).chain(old.candidates().iter().map(String::as_str)),
        );
    }
    let gappy = establish(state, room_id, &all).await?;
    Ok((existing.is_some() || gappy, room))
}

/// OP-3..5: tries each candidate in order with a fresh peek_id until one answer validates.
/// Returns whether the stored timeline has a gap (the new state could not be joined to ours).
pub(super) async fn establish(
    state: &OutboundPeeks,
    room_id: &RoomId,
    candidates: &[String],
) -> Result<bool, OutboundError> {
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
pub(super) async fn adopt(
    state: &OutboundPeeks,
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

pub(super) async fn store(state: &OutboundPeeks, room_id: &RoomId, valid: &ValidPeek) -> Result<i64, RoomError> {
    let state_map: StateMap = valid.state.clone();
    let (outliers, latest, timeline) = (valid.events.clone(), valid.latest.clone(), valid.timeline.clone());
    state.rooms.store_snapshot(room_id, valid.version, state_map, outliers, latest, timeline).await
}

/// Records the room's federation peek (replacing an earlier one).
pub(super) async fn record(
    state: &OutboundPeeks,
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
pub(super) fn renewal_spacing(interval_ms: i64) -> i64 {
    (interval_ms / 2).clamp(MIN_RENEWAL_SPACING_MS, MAX_RENEWAL_SPACING_MS)
}

/// Back-off between failed renewals of a peek that has not lapsed yet (OP-6).
pub(super) fn retry_spacing(failures: i32, interval_ms: i64) -> i64 {
    let backoff = 1000i64.saturating_mul(1 << failures.clamp(0, 10));
    backoff.min((interval_ms / 4).max(MIN_RENEWAL_SPACING_MS))
}

/// `DELETE` of one federation peek, best effort: a 404 means it is gone already (OP-8).
pub(super) async fn delete_remote(state: &OutboundPeeks, target: &ServerName, room_id: &RoomId, peek_id: &str) {
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
pub async fn cancel(state: &OutboundPeeks, room_id: &RoomId) -> Result<(), RoomError> {
    cancel_unless_watched(state, room_id, None).await.map(|_| ())
}

/// [`cancel`], unless (checked under the room's lock) a device that synced after `live_since`
/// peeks the room: the renewal job's decision, which a `/peek` finishing meanwhile overrides.
/// Returns whether it cancelled.
pub async fn cancel_unless_watched(
    state: &OutboundPeeks,
    room_id: &RoomId,
    live_since: Option<i64>,
) -> Result<bool, RoomError> {
    let _room = lock_room(state, room_id).await?;
    let Some(peek) = get(state, room_id).await?.filter(|p| p.ended_ts.is_none()) else {
        return Ok(false);
    };
    if let Some(live_since) = live_since {
        let room = room_id.to_string();
        let live = state.db.run::<_, RoomError, _>(move |conn| devices::live_count(conn, &room, live_since)).await?;
        if live > 0 {
            return Ok(false);
        }
    }
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
    Ok(true)
}

/// Cancels the room's federation peek when no local device peeks it any more (unpeek, CP-8).
pub async fn release_if_unwatched(state: &OutboundPeeks, room_id: &RoomId) -> Result<(), RoomError> {
    let room = room_id.to_string();
    let open = state.db.run::<_, RoomError, _>(move |conn| devices::open_count(conn, &room)).await?;
    if open == 0 {
        cancel(state, room_id).await?;
    }
    Ok(())
}

/// OP-9: does `origin` hold our peek on the room (or held it until `peeks.outbound_linger_ms`
/// ago, for transactions in flight)?
pub async fn accepts_from(state: &OutboundPeeks, room_id: &RoomId, origin: &ServerName) -> Result<bool, RoomError> {
    let (now, linger) = (now_ms(), linger_ms(state));
    Ok(get(state, room_id)
        .await?
        .is_some_and(|p| p.target == origin.as_str() && p.ended_ts.is_none_or(|ended| now - ended < linger)))
}

pub(super) fn linger_ms(state: &OutboundPeeks) -> i64 {
    state.settings.raw.peeks.outbound_linger_ms as i64
}
