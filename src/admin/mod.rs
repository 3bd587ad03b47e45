//! The operator's views and actions, shared by the CLI (`peekgate peeks list`,
//! `peekgate destinations ...`) and the HTTP admin API under `/_peekgate/admin/v1/` ([`http`]):
//! inbound, outbound and device peeks, destinations with their back-off, resetting a
//! destination, ending a peek.

pub mod http;

use diesel::prelude::*;
use serde::Serialize;

use crate::db::schema::{device_peeks, inbound_peeks, outbound_peeks};
use crate::db::{Db, DbConnection, DbError};

#[derive(Debug, Serialize, Queryable)]
pub struct InboundPeekView {
    pub origin: String,
    pub room_id: String,
    pub peek_id: String,
    pub created_ts: i64,
    pub renewed_ts: i64,
    pub expires_ts: i64,
    pub end_reason: Option<String>,
}

#[derive(Debug, Serialize, Queryable)]
pub struct OutboundPeekView {
    pub room_id: String,
    pub target: String,
    pub peek_id: String,
    pub renewed_ts: i64,
    pub next_renewal_ts: i64,
    pub failures: i32,
    pub ended_ts: Option<i64>,
}

#[derive(Debug, Serialize, Queryable)]
pub struct DevicePeekView {
    pub user_id: String,
    pub device_id: String,
    pub room_id: String,
    pub created_ts: i64,
}

#[derive(Debug, Serialize)]
pub struct PeeksReport {
    pub inbound: Vec<InboundPeekView>,
    pub outbound: Vec<OutboundPeekView>,
    pub device: Vec<DevicePeekView>,
}

pub use crate::sender::destinations::DestinationView;

/// Every open peek of each kind (ended device peeks and ended inbound peeks are left out).
pub async fn peeks(db: &Db) -> Result<PeeksReport, DbError> {
    db.run(|conn: &mut DbConnection| {
        let inbound = inbound_peeks::table
            .filter(inbound_peeks::end_stream_pos.is_null())
            .order((inbound_peeks::room_id, inbound_peeks::origin))
            .select((
                inbound_peeks::origin,
                inbound_peeks::room_id,
                inbound_peeks::peek_id,
                inbound_peeks::created_ts,
                inbound_peeks::renewed_ts,
                inbound_peeks::expires_ts,
                inbound_peeks::end_reason,
            ))
            .load(conn)?;
        let outbound = outbound_peeks::table
            .order(outbound_peeks::room_id)
            .select((
                outbound_peeks::room_id,
                outbound_peeks::target,
                outbound_peeks::peek_id,
                outbound_peeks::renewed_ts,
                outbound_peeks::next_renewal_ts,
                outbound_peeks::failures,
                outbound_peeks::ended_ts,
            ))
            .load(conn)?;
        let device = device_peeks::table
            .filter(device_peeks::end_seq.is_null())
            .order((device_peeks::user_id, device_peeks::device_id, device_peeks::room_id))
            .select((device_peeks::user_id, device_peeks::device_id, device_peeks::room_id, device_peeks::created_ts))
            .load(conn)?;
        Ok(PeeksReport { inbound, outbound, device })
    })
    .await
}

pub async fn destinations(db: &Db) -> Result<Vec<DestinationView>, DbError> {
    crate::sender::destinations::list(db).await
}

/// Clears a destination's back-off; `false` when the server is not a destination.
pub async fn reset_destination(db: &Db, server: &str) -> Result<bool, DbError> {
    crate::sender::destinations::reset(db, server).await
}

/// Plain-text tables for the CLI.
pub fn render_peeks(report: &PeeksReport) -> String {
    let mut out = format!("inbound peeks ({})\n", report.inbound.len());
    for p in &report.inbound {
        out += &format!("  {}  {}  peek_id={}  expires_ts={}\n", p.room_id, p.origin, p.peek_id, p.expires_ts);
    }
    out += &format!("outbound peeks ({})\n", report.outbound.len());
    for p in &report.outbound {
        let status = match p.ended_ts {
            Some(ts) => format!("ended_ts={ts}"),
            None => format!("next_renewal_ts={} failures={}", p.next_renewal_ts, p.failures),
        };
        out += &format!("  {}  via {}  peek_id={}  {status}\n", p.room_id, p.target, p.peek_id);
    }
    out += &format!("device peeks ({})\n", report.device.len());
    for p in &report.device {
        out += &format!("  {}  {} {}\n", p.room_id, p.user_id, p.device_id);
    }
    out
}

pub fn render_destinations(list: &[DestinationView], now: i64) -> String {
    let mut out = format!("destinations ({})\n", list.len());
    for d in list {
        let state = if d.backing_off(now) {
            format!("BACKING OFF failures={} retry_at={}", d.failure_count, d.retry_at.unwrap_or_default())
        } else {
            format!("ok failures={}", d.failure_count)
        };
        out += &format!("  {}  cursor={}  {state}\n", d.server_name, d.last_sent_pos);
    }
    out
}
