//! Jobs on the cron expressions of `[schedule]` (with seconds): `evict_inbound` and
//! `renew_outbound`. Each run takes its work from the database in claimed batches (`FOR UPDATE
//! SKIP LOCKED`, or a conditional update that only one instance wins), so several instances on
//! one database never process the same rows.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use chrono::Utc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::now_ms;
use crate::config::Settings;
use crate::db::{Db, DbError};
use crate::metrics::Metrics;
use crate::peeks::inbound::{self, InboundPeeks, REASON_LAPSED};
use crate::peeks::outbound::{self, OutboundPeeks};

/// The scheduled jobs `/ready` expects to be running.
pub const JOBS: usize = 2;

/// What the jobs need from the rest of the server, handed over at start-up.
#[derive(Clone)]
pub struct ScheduleContext {
    pub settings: Settings,
    pub db: Db,
    pub metrics: Arc<Metrics>,
    pub inbound: Arc<InboundPeeks>,
    pub outbound: OutboundPeeks,
    /// Job loops running now (`/ready` wants [`JOBS`] of them).
    pub jobs_alive: Arc<AtomicUsize>,
}

/// Counts a job loop as running for as long as it lives (also when it ends by a panic).
struct JobAlive(Arc<AtomicUsize>);

impl JobAlive {
    fn new(count: &Arc<AtomicUsize>) -> JobAlive {
        count.fetch_add(1, Ordering::AcqRel);
        JobAlive(count.clone())
    }
}

impl Drop for JobAlive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Peeks evicted per claimed batch on PostgreSQL (SQLite sweeps in one transaction).
const EVICTION_BATCH: i64 = 50_000;

/// Connections sweeping lapsed peeks at once on PostgreSQL. A sweep is CPU work in the database
/// server (index entries, WAL records); batches claimed with `SKIP LOCKED` on two connections
/// use two cores and never touch the same rows. Four connections (batches of 25,000) were
/// slower than two on the 2-core machine (BENCHMARKS.md, issue #13).
const EVICTION_CONNECTIONS: usize = 2;

pub struct ScheduleHandle {
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl ScheduleHandle {
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

pub fn start(state: ScheduleContext) -> ScheduleHandle {
    let (shutdown, rx) = watch::channel(false);
    let evict = state.settings.evict_inbound.clone();
    let renew = state.settings.renew_outbound.clone();
    let tasks = vec![
        tokio::spawn(run_job(state.clone(), "evict_inbound", evict, rx.clone())),
        tokio::spawn(run_job(state, "renew_outbound", renew, rx)),
    ];
    ScheduleHandle { shutdown, tasks }
}

async fn run_job(
    state: ScheduleContext,
    job: &'static str,
    schedule: cron::Schedule,
    mut shutdown: watch::Receiver<bool>,
) {
    let _alive = JobAlive::new(&state.jobs_alive);
    loop {
        let Some(next) = schedule.upcoming(Utc).next() else {
            tracing::warn!(job, "schedule has no future run");
            return;
        };
        let wait = (next - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        let result = match job {
            "evict_inbound" => evict_inbound(&state).await.map(|_| ()).map_err(|e| e.to_string()),
            "renew_outbound" => renew_outbound(&state).await.map_err(|e| e.to_string()),
            _ => Ok(()),
        };
        if let Err(e) = &result {
            tracing::warn!(job, error = %e, "scheduled job failed");
        }
        state.metrics.schedule_run(job, result.is_ok());
    }
}

/// How long an inbound transaction's answer is kept for de-duplication: a peer retrying the same
/// transaction a day later gets it processed again, which per-PDU de-duplication makes harmless.
const RECEIVED_TXN_TTL_MS: i64 = 24 * 3_600_000;

/// A destination that has not accepted a transaction for this long, and no longer has peeks,
/// is forgotten with its undelivered `expired_peeks` notices.
const DEAD_DESTINATION_MS: i64 = 7 * 24 * 3_600_000;

/// Forgets destinations that only hold notices nobody will receive: no inbound peek from the
/// server remains, it is failing, and it never accepted a transaction or not for a week. (A
/// peeker that comes back learns that its peek is gone from its next renewal.)
async fn forget_dead_destinations(state: &ScheduleContext) -> Result<(), DbError> {
    let forgotten = crate::sender::destinations::forget_dead(&state.db, now_ms() - DEAD_DESTINATION_MS).await?;
    if forgotten > 0 {
        tracing::info!(forgotten, "forgot destinations that stopped answering and have no peeks left");
    }
    Ok(())
}

/// Lapsed peeks, batch after batch until none is left (SQLite: one sweep). Returns how many.
async fn evict_lapsed(state: &ScheduleContext) -> Result<usize, DbError> {
    let mut lapsed_total = 0;
    loop {
        // Soft state: an eviction lost in a crash is redone by the next run, so it need not wait
        // for the WAL flush.
        let lapsed = state
            .db
            .run_soft::<_, DbError, _>(|conn| Ok(inbound::evict_lapsed_batch(conn, now_ms(), EVICTION_BATCH)?))
            .await?;
        if lapsed > 0 {
            state.metrics.peek_evictions(REASON_LAPSED, lapsed);
        }
        lapsed_total += lapsed;
        if (lapsed as i64) < EVICTION_BATCH || state.db.backend() == crate::db::Backend::Sqlite {
            return Ok(lapsed_total);
        }
    }
}

/// OP-6..8 and TBD-1: renews outbound peeks a live device still watches, fails over the ones
/// whose target is gone, and deletes the ones nobody watches.
pub async fn renew_outbound(state: &ScheduleContext) -> Result<(), crate::rooms::RoomError> {
    let run = outbound::run_renewals(&state.outbound).await?;
    if run.renewed + run.failed + run.cancelled > 0 {
        tracing::debug!(?run, "outbound peek renewals");
    }
    Ok(())
}

/// RE-2: deletes lapsed inbound peeks (queueing `expired_peeks`), and peeks the room ended once
/// everything up to their end was delivered. Runs batch after batch until none is left.
pub async fn evict_inbound(state: &ScheduleContext) -> Result<(usize, usize), DbError> {
    let connections = match state.db.backend() {
        crate::db::Backend::Postgres => EVICTION_CONNECTIONS,
        crate::db::Backend::Sqlite => 1,
    };
    let sweeps = futures_util::future::try_join_all((0..connections).map(|_| evict_lapsed(state))).await?;
    let lapsed_total: usize = sweeps.into_iter().sum();
    let ended = state.db.run::<_, DbError, _>(|conn| Ok(inbound::evict_ended(conn)?)).await?;
    crate::transactions::forget_answers_before(&state.db, now_ms() - RECEIVED_TXN_TTL_MS).await?;
    forget_dead_destinations(state).await?;
    for (reason, count) in &ended {
        state.metrics.peek_evictions(reason, *count);
    }
    if let Ok(live) = state.inbound.live_count().await {
        state.metrics.inbound_peeks(live);
    }
    let ended_total: usize = ended.values().sum();
    if lapsed_total + ended_total > 0 {
        tracing::info!(lapsed = lapsed_total, ended = ended_total, "evicted inbound peeks");
    }
    Ok((lapsed_total, ended_total))
}
