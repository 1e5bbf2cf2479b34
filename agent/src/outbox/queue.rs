//! The queue: events in commit order, each waiting for ingest's answer. One insert serves every
//! event and keeps the outbox under its cap; the sender reads in seq order; an Ack deletes, a
//! Reject dead-letters.

use kanade_shared::{
    pb,
    wire::{Event, EventBody, ExecResult},
};
use sqlx::{Row, SqliteConnection};

use super::{Outbox, OutboxError, micros_now};
use crate::runner::keep_head_and_tail;

/// When the outbox is over its cap, queued outputs are cut to this many bytes each.
const OVER_CAP_OUTPUT_BYTES: usize = 4 * 1024;

/// An event waiting for its ack.
#[derive(Debug, Clone)]
pub struct Pending {
    pub seq: u64,
    pub event: pb::Event,
    pub bytes: u64,
}

fn kind(body: &EventBody) -> &'static str {
    match body {
        EventBody::Started(_) => "started",
        EventBody::Result(_) => "result",
    }
}

/// Cuts a result's outputs to the over-cap size; returns the bytes cut.
pub(super) fn cut_outputs(r: &mut ExecResult) -> u64 {
    let (stdout, a) = keep_head_and_tail(&r.stdout, OVER_CAP_OUTPUT_BYTES);
    let (stderr, b) = keep_head_and_tail(&r.stderr, OVER_CAP_OUTPUT_BYTES);
    r.stdout = stdout;
    r.stderr = stderr;
    r.stdout_dropped_bytes = r.stdout_dropped_bytes.saturating_add(a);
    r.stderr_dropped_bytes = r.stderr_dropped_bytes.saturating_add(b);
    a + b
}

impl Outbox {
    /// Inserts one event inside the caller's transaction, first making room under the cap.
    pub(super) async fn enqueue_in(
        &self,
        conn: &mut SqliteConnection,
        mut event: Event,
    ) -> Result<u64, OutboxError> {
        let mut payload = serde_json::to_string(&event)?;
        let queued: i64 = sqlx::query_scalar("SELECT COALESCE(SUM(bytes), 0) FROM outbox")
            .fetch_one(&mut *conn)
            .await?;
        if queued as u64 + payload.len() as u64 > self.cap_bytes {
            if let EventBody::Result(r) = &mut event.body {
                let cut = cut_outputs(r);
                if cut > 0 {
                    tracing::warn!(cap_bytes = self.cap_bytes, result_id = %r.result_id, cut_bytes = cut,
                        "outbox is at its cap: cut this result's outputs");
                    payload = serde_json::to_string(&event)?;
                }
            }
            self.shrink_queued(conn, queued as u64 + payload.len() as u64)
                .await?;
        }
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO outbox (result_id, kind, payload, bytes, enqueued_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) RETURNING seq",
        )
        .bind(event.body.result_id())
        .bind(kind(&event.body))
        .bind(&payload)
        .bind(payload.len() as i64)
        .bind(micros_now())
        .fetch_one(&mut *conn)
        .await?;
        Ok(seq as u64)
    }

    /// Cuts the outputs of queued results, largest first, until the outbox fits its cap.
    async fn shrink_queued(
        &self,
        conn: &mut SqliteConnection,
        mut total: u64,
    ) -> Result<(), OutboxError> {
        let rows = sqlx::query(
            "SELECT seq, payload FROM outbox WHERE kind = 'result' AND bytes > ?1 ORDER BY bytes DESC",
        )
        .bind((2 * OVER_CAP_OUTPUT_BYTES + 4096) as i64)
        .fetch_all(&mut *conn)
        .await?;
        let mut cut_total = 0u64;
        for row in rows {
            if total <= self.cap_bytes {
                break;
            }
            let seq: i64 = row.try_get("seq")?;
            let payload: String = row.try_get("payload")?;
            let Ok(mut event) = serde_json::from_str::<Event>(&payload) else {
                continue;
            };
            let EventBody::Result(r) = &mut event.body else {
                continue;
            };
            cut_outputs(r);
            let shorter = serde_json::to_string(&event)?;
            total -= (payload.len() - shorter.len()) as u64;
            cut_total += (payload.len() - shorter.len()) as u64;
            sqlx::query("UPDATE outbox SET payload = ?1, bytes = ?2 WHERE seq = ?3")
                .bind(&shorter)
                .bind(shorter.len() as i64)
                .bind(seq)
                .execute(&mut *conn)
                .await?;
        }
        if cut_total > 0 {
            tracing::warn!(
                cap_bytes = self.cap_bytes,
                cut_bytes = cut_total,
                "outbox is at its cap: cut queued outputs (event metadata is kept)"
            );
        }
        if total > self.cap_bytes {
            tracing::error!(
                cap_bytes = self.cap_bytes,
                bytes = total,
                "outbox is over its cap with nothing left to cut; keeping every event"
            );
        }
        Ok(())
    }

    /// Up to `limit` events after `after_seq`, in order. Rows that cannot be decoded are moved
    /// to the dead letters on the way, and never make the answer look empty while valid events
    /// follow them.
    pub async fn pending(
        &self,
        mut after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Pending>, OutboxError> {
        self.guard(async {
            let mut out = Vec::with_capacity(limit.min(1024));
            while out.is_empty() {
                let rows = sqlx::query(
                    "SELECT seq, payload, bytes FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )
                .bind(after_seq as i64)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
                if rows.is_empty() {
                    break;
                }
                for row in rows {
                    let seq: i64 = row.try_get("seq")?;
                    after_seq = seq as u64;
                    let payload: String = row.try_get("payload")?;
                    match serde_json::from_str::<Event>(&payload) {
                        Ok(mut event) => {
                            event.seq = seq as u64;
                            out.push(Pending {
                                seq: seq as u64,
                                event: event.into(),
                                bytes: row.try_get::<i64, _>("bytes")? as u64,
                            });
                        }
                        Err(err) => {
                            let reason = format!("undecodable outbox row: {err}");
                            tracing::error!(seq, %reason, "moving an outbox row to the dead letters");
                            self.dead_letter(seq as u64, &reason).await?;
                        }
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// Forgets acknowledged events.
    pub async fn ack(&self, seqs: &[u64]) -> Result<(), OutboxError> {
        self.guard(async {
            let mut tx = self.pool.begin().await?;
            for seq in seqs {
                sqlx::query("DELETE FROM outbox WHERE seq = ?1")
                    .bind(*seq as i64)
                    .execute(&mut *tx)
                    .await?;
            }
            super::admin::set_state(&mut tx, "last_ack", &chrono::Utc::now().to_rfc3339()).await?;
            tx.commit().await?;
            self.answered.notify_waiters();
            Ok(())
        })
        .await
    }

    /// Moves an event to the dead letters with the reason it can never be delivered.
    pub async fn dead_letter(&self, seq: u64, reason: &str) -> Result<(), OutboxError> {
        self.guard(async {
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "INSERT INTO dead_letters (seq, result_id, kind, payload, reason, enqueued_at, dead_at) \
                 SELECT seq, result_id, kind, payload, ?2, enqueued_at, ?3 FROM outbox WHERE seq = ?1",
            )
            .bind(seq as i64)
            .bind(reason)
            .bind(micros_now())
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM outbox WHERE seq = ?1")
                .bind(seq as i64)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            self.answered.notify_waiters();
            Ok(())
        })
        .await
    }

    /// Whether an event is still waiting (neither acked nor dead-lettered).
    pub async fn is_pending(&self, seq: u64) -> Result<bool, OutboxError> {
        self.guard(async {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE seq = ?1")
                .bind(seq as i64)
                .fetch_one(&self.pool)
                .await?;
            Ok(n > 0)
        })
        .await
    }

    /// Whether an event was dead-lettered.
    pub async fn is_dead(&self, seq: u64) -> Result<bool, OutboxError> {
        self.guard(async {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dead_letters WHERE seq = ?1")
                .bind(seq as i64)
                .fetch_one(&self.pool)
                .await?;
            Ok(n > 0)
        })
        .await
    }
}
