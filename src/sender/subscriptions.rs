//! Who gets which event of a room, for both the queue and the fan-out path: a server that
//! peeks the room (PE-1..3: every event after the peek started but its own, while the peek is
//! live or up to its end) and a server with a joined member (JN-10: only *our* events inside
//! its joined span; every server sends its own events to the room itself).

use diesel::prelude::*;

use crate::db::schema::{events, inbound_peeks, joined_servers};
use crate::db::DbConnection;
use crate::ids;

pub struct NewEvent {
    pub pos: i64,
    pub room_id: String,
    pub sender: String,
    pub json: String,
}

/// A destination's interest in one room's events between two stream positions.
pub struct Subscription {
    pub destination: String,
    pub room_id: String,
    /// Events after this position.
    pub start: i64,
    /// Events up to and including this position (`None`: still open).
    pub end: Option<i64>,
    /// An open peek lapses at this time; a joined span never does (`i64::MAX`).
    pub expires_ts: i64,
    /// Joined servers get only events sent by this server's users (ours); peekers get all.
    pub only_from: Option<String>,
}

impl Subscription {
    pub fn wants(&self, event: &NewEvent, now: i64) -> bool {
        let live = match self.end {
            Some(end) => event.pos <= end,
            None => self.expires_ts >= now,
        };
        self.room_id == event.room_id
            && self.start < event.pos
            && live
            && !ids::is_user_of(&event.sender, &self.destination)
            && self.only_from.as_deref().is_none_or(|server| ids::is_user_of(&event.sender, server))
    }
}

/// The columns a peek's subscription is loaded from.
type PeekColumns = (
    inbound_peeks::origin,
    inbound_peeks::room_id,
    inbound_peeks::start_stream_pos,
    inbound_peeks::end_stream_pos,
    inbound_peeks::expires_ts,
);
const PEEK_COLUMNS: PeekColumns = (
    inbound_peeks::origin,
    inbound_peeks::room_id,
    inbound_peeks::start_stream_pos,
    inbound_peeks::end_stream_pos,
    inbound_peeks::expires_ts,
);
type SpanColumns = (
    joined_servers::server_name,
    joined_servers::room_id,
    joined_servers::start_stream_pos,
    joined_servers::end_stream_pos,
);
const SPAN_COLUMNS: SpanColumns = (
    joined_servers::server_name,
    joined_servers::room_id,
    joined_servers::start_stream_pos,
    joined_servers::end_stream_pos,
);

fn from_peek((destination, room_id, start, end, expires_ts): (String, String, i64, Option<i64>, i64)) -> Subscription {
    Subscription { destination, room_id, start, end, expires_ts, only_from: None }
}

fn from_span(our_server: &str) -> impl Fn((String, String, i64, Option<i64>)) -> Subscription + '_ {
    move |(destination, room_id, start, end)| Subscription {
        destination,
        room_id,
        start,
        end,
        expires_ts: i64::MAX,
        only_from: Some(our_server.to_owned()),
    }
}

/// `destination`'s subscriptions in `rooms`.
pub fn of_destination(
    conn: &mut DbConnection,
    our_server: &str,
    destination: &str,
    rooms: &[&str],
) -> Result<Vec<Subscription>, diesel::result::Error> {
    let peeks = inbound_peeks::table
        .filter(inbound_peeks::origin.eq(destination))
        .filter(inbound_peeks::room_id.eq_any(rooms))
        .select(PEEK_COLUMNS)
        .load(conn)?;
    let spans = joined_servers::table
        .filter(joined_servers::server_name.eq(destination))
        .filter(joined_servers::room_id.eq_any(rooms))
        .select(SPAN_COLUMNS)
        .load(conn)?;
    Ok(peeks.into_iter().map(from_peek).chain(spans.into_iter().map(from_span(our_server))).collect())
}

/// Every subscription that may still want an event after `since`, in the rooms with events in
/// `(since, head]` (found by a subquery: no extra round trip on the fan-out path).
pub fn in_changed_rooms(
    conn: &mut DbConnection,
    our_server: &str,
    since: i64,
    head: i64,
) -> Result<Vec<Subscription>, diesel::result::Error> {
    let changed_rooms = || {
        events::table.filter(events::stream_pos.gt(since)).filter(events::stream_pos.le(head)).select(events::room_id)
    };
    let peeks = inbound_peeks::table
        .filter(inbound_peeks::room_id.eq_any(changed_rooms()))
        .filter(inbound_peeks::end_stream_pos.is_null().or(inbound_peeks::end_stream_pos.gt(since)))
        .select(PEEK_COLUMNS)
        .load(conn)?;
    let spans = joined_servers::table
        .filter(joined_servers::room_id.eq_any(changed_rooms()))
        .filter(joined_servers::end_stream_pos.is_null().or(joined_servers::end_stream_pos.gt(since)))
        .select(SPAN_COLUMNS)
        .load(conn)?;
    Ok(peeks.into_iter().map(from_peek).chain(spans.into_iter().map(from_span(our_server))).collect())
}
