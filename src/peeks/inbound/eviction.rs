//! RE-2: set-based eviction of lapsed peeks (claimed with `FOR UPDATE SKIP LOCKED` on
//! PostgreSQL), and of peeks a room ended once their server was sent everything up to the end.

use diesel::result::DatabaseErrorKind;

use super::*;

/// One eviction batch of the `evict_inbound` job: deletes up to `batch` lapsed peeks, queueing
/// `expired_peeks` for them. On PostgreSQL the rows are claimed with `FOR UPDATE SKIP LOCKED`,
/// so several instances never evict the same peek. Returns how many were evicted.
pub fn evict_lapsed_batch(conn: &mut DbConnection, now: i64, batch: i64) -> Result<usize, diesel::result::Error> {
    match conn {
        DbConnection::Postgresql(_) => {
            // A notice still pending for the same peek (a peek that lapsed, came back under its
            // ID and lapsed again before the first notice went out) is rare: the batch is tried
            // with plain inserts first, and again skipping such notices only when one exists.
            match write_transaction(conn, |conn| evict_claimed_batch(conn, now, batch, false)) {
                Err(diesel::result::Error::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => {
                    write_transaction(conn, |conn| evict_claimed_batch(conn, now, batch, true))
                }
                other => other,
            }
        }
        DbConnection::Sqlite(_) => write_transaction(conn, |conn| {
            // Single instance: the whole sweep in one transaction, so both statements see the
            // same rows.
            let head = store::stream_head(conn)?;
            let lapsed = format!("expires_ts < {now} AND end_stream_pos IS NULL");
            let source = format!("inbound_peeks WHERE {lapsed}");
            diesel::sql_query(sender::queue_expired_peeks_sql(&source, head, true)).execute(conn)?;
            diesel::sql_query(format!("DELETE FROM inbound_peeks WHERE {lapsed}")).execute(conn)
        }),
    }
}

/// PostgreSQL: one statement moves a whole batch of lapsed peeks into notices. The rows are
/// claimed and deleted by their physical address (ctid; stable while they are locked FOR
/// UPDATE): about a quarter faster than matching the three key columns again.
fn evict_claimed_batch(
    conn: &mut DbConnection,
    now: i64,
    batch: i64,
    skip_pending: bool,
) -> Result<usize, diesel::result::Error> {
    let head = store::stream_head(conn)?;
    let noted = sender::queue_expired_peeks_sql("gone", head, skip_pending);
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
    Ok(counted.first().map(|c| c.n as usize).unwrap_or(0))
}

/// Deletes the peeks a room ended (RE-3, RE-4) once their server's cursor passed the end.
/// Returns how many, by reason. One statement, found through the partial index
/// `inbound_peeks_ended` (migration 000009).
pub fn evict_ended(conn: &mut DbConnection) -> Result<BTreeMap<String, usize>, diesel::result::Error> {
    let delivered =
        inbound_peeks::end_stream_pos.le(diesel::dsl::sql::<diesel::sql_types::Nullable<diesel::sql_types::BigInt>>(
            "(SELECT d.last_sent_pos FROM destinations d WHERE d.server_name = inbound_peeks.origin)",
        ));
    let reasons: Vec<Option<String>> =
        diesel::delete(inbound_peeks::table.filter(inbound_peeks::end_stream_pos.is_not_null()).filter(delivered))
            .returning(inbound_peeks::end_reason)
            .get_results(conn)?;
    let mut ended: BTreeMap<String, usize> = BTreeMap::new();
    for reason in reasons {
        *ended.entry(reason.unwrap_or_else(|| REASON_VISIBILITY.to_owned())).or_default() += 1;
    }
    Ok(ended)
}

#[derive(diesel::QueryableByName)]
pub(super) struct Counted {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}
