//! State at any event without copying the whole state per event: state groups are deltas on
//! a parent, with a full snapshot every `SNAPSHOT_EVERY` steps; and the current state.

use super::*;

/// The current state event ID for one key.
pub fn current_state_id(
    conn: &mut DbConnection,
    room_id: &str,
    kind: &str,
    state_key: &str,
) -> Result<Option<String>, RoomError> {
    Ok(current_state::table
        .filter(current_state::room_id.eq(room_id))
        .filter(current_state::event_type.eq(kind))
        .filter(current_state::state_key.eq(state_key))
        .select(current_state::event_id)
        .first(conn)
        .optional()?)
}

pub fn current_state_map(conn: &mut DbConnection, room_id: &str) -> Result<StateMap, RoomError> {
    let rows: Vec<(String, String, String)> = current_state::table
        .filter(current_state::room_id.eq(room_id))
        .select((current_state::event_type, current_state::state_key, current_state::event_id))
        .load(conn)?;
    Ok(rows.into_iter().map(|(t, k, id)| ((t, k), id)).collect())
}

/// A new group: one delta on top of `prev`, or a full snapshot every [`SNAPSHOT_EVERY`] steps.
pub(super) fn new_state_group(
    conn: &mut DbConnection,
    room_id: &str,
    prev: Option<i64>,
    kind: &str,
    state_key: &str,
    event_id: &str,
) -> Result<i64, RoomError> {
    let prev_depth: Option<i32> = match prev {
        Some(group) => Some(state_groups::table.find(group).select(state_groups::delta_depth).first(conn)?),
        None => None,
    };
    let snapshot = prev_depth.is_some_and(|d| d + 1 >= SNAPSHOT_EVERY);
    let (prev_group, delta_depth) = match (prev, prev_depth) {
        (Some(group), Some(depth)) if !snapshot => (Some(group), depth + 1),
        _ => (None, 0),
    };
    let mut entries = if snapshot {
        state_map_at_group(conn, prev.expect("snapshot has a previous group"))?
    } else {
        StateMap::new()
    };
    entries.insert((kind.to_owned(), state_key.to_owned()), event_id.to_owned());
    insert_group(conn, room_id, prev_group, delta_depth, &entries)
}

/// Stores a state group: `entries` on top of `prev_group` (or, without one, the whole state).
pub(super) fn insert_group(
    conn: &mut DbConnection,
    room_id: &str,
    prev_group: Option<i64>,
    delta_depth: i32,
    entries: &StateMap,
) -> Result<i64, RoomError> {
    let id: i64 = diesel::insert_into(state_groups::table)
        .values((
            state_groups::room_id.eq(room_id),
            state_groups::prev_group.eq(prev_group),
            state_groups::delta_depth.eq(delta_depth),
        ))
        .returning(state_groups::id)
        .get_result(conn)?;
    let rows: Vec<_> = entries
        .iter()
        .map(|((t, k), e)| {
            (
                state_group_entries::group_id.eq(id),
                state_group_entries::event_type.eq(t.clone()),
                state_group_entries::state_key.eq(k.clone()),
                state_group_entries::event_id.eq(e.clone()),
            )
        })
        .collect();
    // A snapshot holds the whole state: one multi-row insert per chunk, not one per entry.
    for chunk in rows.chunks(500) {
        on_backend!(&mut *conn, |c| diesel::insert_into(state_group_entries::table).values(chunk).execute(c))?;
    }
    Ok(id)
}

#[derive(QueryableByName)]
pub(super) struct GroupEntry {
    #[diesel(sql_type = Text)]
    event_type: String,
    #[diesel(sql_type = Text)]
    state_key: String,
    #[diesel(sql_type = Text)]
    event_id: String,
    #[diesel(sql_type = BigInt)]
    level: i64,
}

/// The full state of a group: one recursive query over the delta chain; nearer deltas win.
pub fn state_map_at_group(conn: &mut DbConnection, group: i64) -> Result<StateMap, RoomError> {
    // `group` is an i64 from our own tables, so formatting it into the SQL is safe; it avoids the
    // backends' different bind placeholder syntax.
    let query = format!(
        "WITH RECURSIVE chain(id, prev, level) AS ( \
             SELECT id, prev_group, CAST(0 AS BIGINT) FROM state_groups WHERE id = {group} \
             UNION ALL \
             SELECT g.id, g.prev_group, c.level + 1 FROM state_groups g JOIN chain c ON g.id = c.prev \
         ) \
         SELECT e.event_type, e.state_key, e.event_id, c.level AS level \
         FROM chain c JOIN state_group_entries e ON e.group_id = c.id"
    );
    let rows: Vec<GroupEntry> = diesel::sql_query(query).load(conn)?;
    let mut best: BTreeMap<(String, String), (i64, String)> = BTreeMap::new();
    for row in rows {
        let key = (row.event_type, row.state_key);
        match best.get(&key) {
            Some((level, _)) if *level <= row.level => {}
            _ => {
                best.insert(key, (row.level, row.event_id));
            }
        }
    }
    Ok(best.into_iter().map(|(k, (_, id))| (k, id)).collect())
}
