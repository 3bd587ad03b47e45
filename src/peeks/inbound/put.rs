//! Creating, renewing and deleting inbound peeks (FP-*, PE-*, RE-1): the checks in FP order,
//! then the peek recorded at stream position P under the append lock before the state at P is
//! read (PE-3).

use super::*;

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
            server_name: settings.server_name.as_str().into(),
            batcher,
            limits: Limits {
                renewal_interval_ms: interval,
                grace_ms: grace,
                max_active_per_origin: peek.max_active_per_origin.into(),
                max_ids_per_room: peek.max_ids_per_room.into(),
                max_active_total: peek.max_active_total.into(),
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
        let offered = versions_or_default(versions);
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
        let ours = self.server_name.clone();
        let step = self
            .db
            .run_soft::<_, PeekError, _>(move |conn| {
                let (room, facts) = room_facts(conn, &cache, &ours, &r, Some(RENEWAL_FACTS_TTL))?;
                let checked = apply_checks(&o, &room, &facts, peek_id.clone(), &offered)?;
                if renew_live_blocking(conn, o.as_str(), &r, checked.as_str(), interval, grace)? {
                    return Ok(None);
                }
                // A new peek: check again on the room as it is now.
                let (room, facts) = room_facts(conn, &cache, &ours, &r, None)?;
                let peek_id = apply_checks(&o, &room, &facts, peek_id, &offered)?;
                Ok(Some((room, peek_id)))
            })
            .await?;
        let Some((room, peek_id)) = step else {
            return Ok(PutOutcome::Renewed);
        };
        self.check_limits(origin, room_id).await?;
        crate::pause::point(crate::pause::points::INBOUND_PEEK_RECORD, room_id.as_str()).await;
        match self.create(rooms, origin, room, &peek_id, versions_or_default(versions)).await {
            Ok(Some(response)) => Ok(PutOutcome::Created(Box::new(response))),
            Ok(None) => Ok(PutOutcome::Renewed),
            Err(PeekError::StillEnding) => {
                // The peeker is talking to us, so it is up: end any back-off so that what it is
                // owed goes out now and its retry can succeed.
                sender::reset(&self.db, origin.as_str()).await?;
                Err(PeekError::StillEnding)
            }
            Err(e) => Err(e),
        }
    }

    /// FP-9 / Rev B `/renew`: renews a live peek; `false` when unknown, lapsed or ended.
    pub async fn renew_live(&self, origin: &ServerName, room_id: &RoomId, peek_id: &PeekId) -> Result<bool, PeekError> {
        let key = (origin.to_string(), room_id.to_string(), peek_id.as_str().to_owned());
        let (interval, grace) = (self.limits.renewal_interval_ms, self.limits.grace_ms);
        self.db.run_soft(move |conn| renew_live_blocking(conn, &key.0, &key.1, &key.2, interval, grace)).await
    }

    /// Rev B `POST .../renew` on a live peek, after the same room checks as a PUT, peekability
    /// included (H1: a room that stopped being peekable renews nothing; RE-5: that is a 404).
    pub async fn renew(&self, origin: &ServerName, room_id: &RoomId, raw_peek_id: &str) -> Result<i64, PeekError> {
        let peek_id = PeekId::parse(raw_peek_id, self.limits.lenient_peek_ids);
        let (o, r, cache, ours) =
            (origin.to_owned(), room_id.to_string(), self.facts.clone(), self.server_name.clone());
        let (interval, grace) = (self.limits.renewal_interval_ms, self.limits.grace_ms);
        let renewed = self
            .db
            .run_soft::<_, PeekError, _>(move |conn| {
                let (room, facts) = room_facts(conn, &cache, &ours, &r, None)?;
                // Rev B carries no `ver`: the room's own version is the one in use.
                let version = [room.version.as_str().to_owned()];
                let peek_id = match apply_checks(&o, &room, &facts, peek_id, &version) {
                    // RE-5: a room that stopped being peekable ended its peeks: 404, not 403.
                    Err(PeekError::NotPeekable(_)) => return Ok(false),
                    checked => checked?,
                };
                renew_live_blocking(conn, o.as_str(), &r, peek_id.as_str(), interval, grace)
            })
            .await?;
        if renewed {
            Ok(self.limits.renewal_interval_ms)
        } else {
            Err(PeekError::NoSuchPeek)
        }
    }

    /// FP-12: the per-origin rate of new peeks, then the caps on live peeks: per origin, per
    /// room and (H18) over all origins.
    async fn check_limits(&self, origin: &ServerName, room_id: &RoomId) -> Result<(), PeekError> {
        if let Err(not_until) = crate::limits::check_key(&self.new_peeks, &origin.to_string()) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(PeekError::LimitExceeded { retry_after_ms: wait.as_millis().max(1) as u64 });
        }
        let (o, r) = (origin.to_string(), room_id.to_string());
        let (everyone, total, in_room) = self
            .db
            .run::<_, PeekError, _>(move |conn| {
                let now = now_ms();
                let all_live = inbound_peeks::table
                    .filter(inbound_peeks::expires_ts.ge(now))
                    .filter(inbound_peeks::end_stream_pos.is_null());
                let everyone: i64 = all_live.count().get_result(conn)?;
                let live = all_live.filter(inbound_peeks::origin.eq(&o));
                let total: i64 = live.count().get_result(conn)?;
                let in_room: i64 = live.filter(inbound_peeks::room_id.eq(&r)).count().get_result(conn)?;
                Ok((everyone, total, in_room))
            })
            .await?;
        if everyone >= self.limits.max_active_total
            || total >= self.limits.max_active_per_origin
            || in_room >= self.limits.max_ids_per_room
        {
            return Err(PeekError::LimitExceeded { retry_after_ms: 60_000 });
        }
        Ok(())
    }

    /// Records the peek at the room's stream position P under the append lock, reads the state
    /// at P in the same transaction, then answers with it and its auth chain (FP-7, PE-3).
    ///
    /// The checks run again under that lock (H1): a visibility change, ACL or last leave
    /// committed since the first check is seen here, and no event can slip in between the check
    /// and the record. A live peek with the same key recorded meanwhile by a concurrent PUT is
    /// renewed instead of replaced (H9: replacing it would move its start past events it is owed);
    /// that is `None`.
    async fn create(
        &self,
        rooms: &Rooms,
        origin: &ServerName,
        room: RoomRow,
        peek_id: &PeekId,
        offered: Vec<String>,
    ) -> Result<Option<PeekResponse>, PeekError> {
        let (o, r, p) = (origin.to_owned(), room.room_id.clone(), peek_id.clone());
        let (interval, grace) = (self.limits.renewal_interval_ms, self.limits.grace_ms);
        let (cache, ours) = (self.facts.clone(), self.server_name.clone());
        let recorded = self
            .db
            .run::<_, PeekError, _>(move |conn| {
                write_transaction::<_, PeekError, _>(conn, |conn| {
                    store::lock_for_append(conn, &r)?;
                    let (room, facts) = room_facts(conn, &cache, &ours, &r, None)?;
                    let p = apply_checks(&o, &room, &facts, Some(p), &offered)?;
                    if renew_update(conn, o.as_str(), &r, p.as_str(), interval, grace, now_ms())? {
                        return Ok(None);
                    }
                    if ended_undelivered(conn, o.as_str(), &r, p.as_str())? {
                        return Err(PeekError::StillEnding);
                    }
                    let position = store::latest_stream_pos(conn, &r)?;
                    record_peek(conn, o.as_str(), &r, p.as_str(), position, interval, grace)?;
                    let state_ids: Vec<String> = store::current_state_map(conn, &room.room_id)?.into_values().collect();
                    let latest = store::events_in_range(conn, &r, position + 1, false, 1)?
                        .into_iter()
                        .next()
                        .ok_or(RoomError::EventNotFound)?;
                    Ok(Some((state_ids, latest)))
                })
            })
            .await?;
        let Some((state_ids, latest)) = recorded else {
            return Ok(None);
        };
        let room_id: OwnedRoomId = RoomId::parse(&room.room_id).map_err(|e| RoomError::Internal(e.to_string()))?;
        let state = rooms.events_by_ids(&room_id, state_ids.clone()).await?;
        let auth_chain = rooms.auth_chain(state_ids).await?;
        Ok(Some(PeekResponse {
            room_version: room.version.as_str().to_owned(),
            state: state.iter().map(Pdu::federation_json).collect(),
            auth_chain: auth_chain.iter().map(Pdu::federation_json).collect(),
            latest_event: latest.pdu.federation_json(),
            latest_event_id: latest.pdu.event_id.to_string(),
            renewal_interval: interval as u64,
        }))
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

/// Is there a peek with this key that the room ended (RE-3, RE-4) and whose server has not been
/// sent everything up to its end? Replacing it would start the new peek after events the old
/// one still owes, the change event that ended it among them (H6).
fn ended_undelivered(conn: &mut DbConnection, origin: &str, room_id: &str, peek_id: &str) -> Result<bool, PeekError> {
    let end: Option<Option<i64>> = inbound_peeks::table
        .filter(inbound_peeks::origin.eq(origin))
        .filter(inbound_peeks::room_id.eq(room_id))
        .filter(inbound_peeks::peek_id.eq(peek_id))
        .select(inbound_peeks::end_stream_pos)
        .first(conn)
        .optional()?;
    let Some(Some(end)) = end else {
        return Ok(false);
    };
    Ok(sender::cursor(conn, origin)?.is_some_and(|cursor| cursor < end))
}

/// FP-3: no `ver` means ["1"], as for make_join.
fn versions_or_default(versions: &[String]) -> Vec<String> {
    if versions.is_empty() {
        vec!["1".to_owned()]
    } else {
        versions.to_vec()
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
pub(super) fn record_peek(
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
