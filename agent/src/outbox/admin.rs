//! What the operator sees and does: `kanade-agent status` and `kanade-agent dead-letters`.

use chrono::{DateTime, Utc};
use sqlx::{Row, SqliteConnection};

use super::{Outbox, OutboxError, micros_now};

/// A dead-lettered event.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: i64,
    pub seq: i64,
    pub result_id: String,
    pub kind: String,
    pub reason: String,
    pub dead_at: DateTime<Utc>,
}

/// What `kanade-agent status` reports.
#[derive(Debug, Clone)]
pub struct OutboxStatus {
    pub pending_events: u64,
    pub pending_bytes: u64,
    pub oldest_pending: Option<DateTime<Utc>>,
    pub dead_letters: u64,
    pub running_runs: u64,
    /// What the sender last said about its connection, and since when (RFC 3339).
    pub connection: Option<String>,
    pub connection_since: Option<String>,
    pub last_ack: Option<String>,
}

pub(super) async fn set_state(
    conn: &mut SqliteConnection,
    key: &str,
    value: &str,
) -> Result<(), OutboxError> {
    sqlx::query("INSERT INTO agent_state (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
        .bind(key)
        .bind(value)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

impl Outbox {
    /// Records what the sender is doing ("connected to …", "disconnected from …: why"), and
    /// since when, for `status` and a waiting `exec --wait`.
    pub async fn set_connection(&self, state: &str) -> Result<(), OutboxError> {
        self.guard(async {
            let mut tx = self.pool.begin().await?;
            if self.connection_state_in(&mut tx).await?.as_deref() != Some(state) {
                set_state(&mut tx, "connection", state).await?;
                set_state(
                    &mut tx,
                    "connection_since",
                    &chrono::Utc::now().to_rfc3339(),
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn connection_state_in(
        &self,
        conn: &mut SqliteConnection,
    ) -> Result<Option<String>, OutboxError> {
        Ok(sqlx::query_scalar::<_, String>(
            "SELECT value FROM agent_state WHERE key = 'connection'",
        )
        .fetch_optional(&mut *conn)
        .await?)
    }

    /// What the sender last said about its connection.
    pub async fn connection_state(&self) -> Result<Option<String>, OutboxError> {
        self.guard(async {
            let mut conn = self.pool.acquire().await?;
            self.connection_state_in(&mut conn).await
        })
        .await
    }

    pub async fn status(&self) -> Result<OutboxStatus, OutboxError> {
        self.guard(async {
            let row = sqlx::query(
                "SELECT COUNT(*) AS n, COALESCE(SUM(bytes), 0) AS bytes, MIN(enqueued_at) AS oldest FROM outbox",
            )
            .fetch_one(&self.pool)
            .await?;
            let dead: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dead_letters")
                .fetch_one(&self.pool)
                .await?;
            let running: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs")
                .fetch_one(&self.pool)
                .await?;
            let state = |key: &'static str| {
                let pool = self.pool.clone();
                async move {
                    sqlx::query_scalar::<_, String>("SELECT value FROM agent_state WHERE key = ?1")
                        .bind(key)
                        .fetch_optional(&pool)
                        .await
                }
            };
            Ok(OutboxStatus {
                pending_events: row.try_get::<i64, _>("n")? as u64,
                pending_bytes: row.try_get::<i64, _>("bytes")? as u64,
                oldest_pending: row
                    .try_get::<Option<i64>, _>("oldest")?
                    .and_then(DateTime::from_timestamp_micros),
                dead_letters: dead as u64,
                running_runs: running as u64,
                connection: state("connection").await?,
                connection_since: state("connection_since").await?,
                last_ack: state("last_ack").await?,
            })
        })
        .await
    }

    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, OutboxError> {
        self.guard(async {
            let rows = sqlx::query(
                "SELECT id, seq, result_id, kind, reason, dead_at FROM dead_letters ORDER BY id",
            )
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(DeadLetter {
                        id: r.try_get("id")?,
                        seq: r.try_get("seq")?,
                        result_id: r.try_get("result_id")?,
                        kind: r.try_get("kind")?,
                        reason: r.try_get("reason")?,
                        dead_at: DateTime::from_timestamp_micros(r.try_get("dead_at")?)
                            .unwrap_or_default(),
                    })
                })
                .collect()
        })
        .await
    }

    /// Puts a dead letter back at the end of the queue.
    pub async fn retry_dead_letter(&self, id: i64) -> Result<(), OutboxError> {
        self.guard(async {
            let mut tx = self.pool.begin().await?;
            let moved = sqlx::query(
                "INSERT INTO outbox (result_id, kind, payload, bytes, enqueued_at) \
                 SELECT result_id, kind, payload, length(CAST(payload AS BLOB)), ?2 FROM dead_letters WHERE id = ?1",
            )
            .bind(id)
            .bind(micros_now())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if moved == 0 {
                return Err(OutboxError::NoSuchDeadLetter { id });
            }
            sqlx::query("DELETE FROM dead_letters WHERE id = ?1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            self.wake_sender();
            Ok(())
        })
        .await
    }

    pub async fn purge_dead_letter(&self, id: i64) -> Result<(), OutboxError> {
        self.guard(async {
            let gone = sqlx::query("DELETE FROM dead_letters WHERE id = ?1")
                .bind(id)
                .execute(&self.pool)
                .await?
                .rows_affected();
            if gone == 0 {
                return Err(OutboxError::NoSuchDeadLetter { id });
            }
            Ok(())
        })
        .await
    }
}
