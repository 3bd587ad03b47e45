//! One instance at a time per room: an in-process lock and a claim row in `outbound_claims`
//! (design.md §6), held while a room's federation peek is established, failed over, re-synced
//! or cancelled.

use super::*;

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
pub(super) const CLAIM_TTL_MS: i64 = 120_000;
/// How often an instance waiting for a room's claim looks again.
pub(super) const CLAIM_POLL: std::time::Duration = std::time::Duration::from_millis(50);

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
pub async fn lock_room(state: &OutboundPeeks, room_id: &RoomId) -> Result<RoomGuard, RoomError> {
    let local = state.locks.lock(room_id).await;
    while !try_claim(state, room_id).await? {
        tokio::time::sleep(CLAIM_POLL).await;
    }
    let claim = Some((state.db.clone(), room_id.to_string(), state.instance_id.clone()));
    Ok(RoomGuard { _local: local, claim })
}

/// Claims the room for this instance when nobody else holds a live claim.
pub(super) async fn try_claim(state: &OutboundPeeks, room_id: &RoomId) -> Result<bool, RoomError> {
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
