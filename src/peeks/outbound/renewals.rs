//! The `renew_outbound` job (OP-6..8, TBD-1): renew peeks a live device still watches, fail
//! over lapsed or vanished ones, cancel unwatched ones, and forget ended ones.

use super::*;

/// Ended device peeks are kept this long for their leave entry (CP-12), then forgotten.
pub(super) const KEEP_ENDED_DEVICE_PEEKS_MS: i64 = 24 * 3_600_000;
/// OP-7: renew at renewed + min(interval / 2, 1 h).
pub(super) const MAX_RENEWAL_SPACING_MS: i64 = 3_600_000;
pub(super) const MIN_RENEWAL_SPACING_MS: i64 = 500;

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
pub async fn run_renewals(state: &OutboundPeeks) -> Result<RenewalRun, RoomError> {
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
            // Checked again under the room's lock: a device's /peek may be finishing.
            if cancel_unless_watched(state, &room_id, Some(live_since)).await? {
                run.cancelled += 1;
            }
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
pub(super) async fn claim(state: &OutboundPeeks, peek: &OutboundPeek, now: i64) -> Result<bool, RoomError> {
    let (room, seen) = (peek.room_id.clone(), peek.next_renewal_ts);
    let claimed = state
        .db
        .run::<_, RoomError, _>(move |conn| {
            // H3: never an ended peek (a renewal would re-create it at the target).
            Ok(diesel::update(
                outbound_peeks::table
                    .find(&room)
                    .filter(outbound_peeks::next_renewal_ts.eq(seen))
                    .filter(outbound_peeks::ended_ts.is_null()),
            )
            .set(outbound_peeks::next_renewal_ts.eq(now + 30_000))
            .execute(conn)?)
        })
        .await?;
    Ok(claimed == 1)
}

/// OP-7: re-PUT with the same peek_id. `{}` renews; a full answer means the target had lapsed
/// our peek and started a new one (validated and adopted); 404 or a lapse fails over (OP-6);
/// other failures retry with back-off until the peek lapses.
pub(super) async fn renew(
    state: &OutboundPeeks,
    room_id: &RoomId,
    peek: &OutboundPeek,
    run: &mut RenewalRun,
) -> Result<(), RoomError> {
    crate::pause::point(crate::pause::points::OUTBOUND_RENEWAL_PUT, room_id.as_str()).await;
    // H3: under the room's lock, like the DELETE of `cancel`, and only while the peek is still
    // this one and live: a renewal racing the DELETE would otherwise re-create the remote peek.
    let room_guard = lock_room(state, room_id).await?;
    if !get(state, room_id).await?.is_some_and(|p| p.ended_ts.is_none() && p.peek_id == peek.peek_id) {
        return Ok(());
    }
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
            // Fail-over takes the room's lock itself (and checks again that the peek is live).
            drop(room_guard);
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
pub(super) async fn failover(state: &OutboundPeeks, room_id: &RoomId, peek: &OutboundPeek) -> Result<bool, RoomError> {
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

/// Forgets ended peeks once PDUs in flight no longer count and no device peek would
/// re-establish them (an idle device that syncs again re-peeks through the remembered
/// candidates), and with them our copy of the room: an ended peek leaves nothing behind.
/// Ended device peeks are kept a day for their leave entries.
pub(super) async fn forget_ended(state: &OutboundPeeks, now: i64) -> Result<(), RoomError> {
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
        let our_server = state.settings.server_name.to_string();
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
                    crate::rooms::store::purge_remote_room(conn, &our_server, &room)
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
