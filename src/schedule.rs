//! Jobs on the cron expressions of `[schedule]` (with seconds). Each run takes its work from
//! the database in claimed batches (`FOR UPDATE SKIP LOCKED` on PostgreSQL), so several
//! instances on one database never process the same rows.

use actix_web::web;
use chrono::Utc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::db::DbError;
use crate::keys::now_ms;
use crate::peeks::inbound::{self, REASON_LAPSED};
use crate::state::AppState;

/// Peeks evicted per claimed batch on PostgreSQL (SQLite sweeps in one transaction).
const EVICTION_BATCH: i64 = 100_000;

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

pub fn start(state: web::Data<AppState>) -> ScheduleHandle {
    let (shutdown, rx) = watch::channel(false);
    let evict = state.settings.evict_inbound.clone();
    let tasks = vec![tokio::spawn(run_job(state, "evict_inbound", evict, rx))];
    ScheduleHandle { shutdown, tasks }
}

async fn run_job(
    state: web::Data<AppState>,
    job: &'static str,
    schedule: cron::Schedule,
    mut shutdown: watch::Receiver<bool>,
) {
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
            "evict_inbound" => evict_inbound(&state).await.map(|_| ()),
            _ => Ok(()),
        };
        if let Err(e) = &result {
            tracing::warn!(job, error = %e, "scheduled job failed");
        }
        state.metrics.schedule_run(job, result.is_ok());
    }
}

/// RE-2: deletes lapsed inbound peeks (queueing `expired_peeks`), and peeks the room ended once
/// everything up to their end was delivered. Runs batch after batch until none is left.
pub async fn evict_inbound(state: &AppState) -> Result<(usize, usize), DbError> {
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
            break;
        }
    }
    let ended = state.db.run::<_, DbError, _>(|conn| Ok(inbound::evict_ended(conn)?)).await?;
    for (reason, count) in &ended {
        state.metrics.peek_evictions(reason, *count);
    }
    let ended_total: usize = ended.values().sum();
    if lapsed_total + ended_total > 0 {
        tracing::info!(lapsed = lapsed_total, ended = ended_total, "evicted inbound peeks");
    }
    Ok((lapsed_total, ended_total))
}
