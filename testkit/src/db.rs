//! A database of its own for every test: a fresh PostgreSQL database on the test server, or a
//! fresh SQLite file.
use std::{collections::BTreeMap, sync::Arc};

use chrono::{DateTime, Utc};
use kanade_ingest::store::{self, Store};
use uuid::Uuid;

/// The PostgreSQL server tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("KANADE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// One row of `execution_results` as PostgreSQL holds it: the columns that say which run it is,
/// whose, whether its EventStarted arrived, and whether it finished.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredRun {
    pub result_id: Uuid,
    pub pc_id: String,
    pub exec_id: String,
    /// Known only from the run's EventStarted.
    pub timeout_secs: Option<i64>,
    /// `None` while running.
    pub status: Option<String>,
    pub exit_code: Option<i32>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A database of its own for one test: a fresh PostgreSQL database (dropped afterwards) or a
/// fresh SQLite file in a temporary directory.
pub struct TestDb {
    pub url: String,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Postgres => TestDb::postgres().await,
            Backend::Sqlite => TestDb::sqlite(),
        }
    }

    pub async fn postgres() -> TestDb {
        let admin = postgres_admin_url();
        let name = format!("kanade_test_{}", Uuid::new_v4().simple());
        let pool = sqlx::PgPool::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("tests need PostgreSQL at {admin}: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .expect("creating a test database");
        pool.close().await;
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        TestDb {
            url: format!("{base}/{name}"),
            pg_name: Some(name),
            _dir: None,
        }
    }

    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("ingest.db").display());
        TestDb {
            url,
            pg_name: None,
            _dir: Some(dir),
        }
    }

    /// The PostgreSQL database's name (`None` for SQLite).
    pub fn postgres_name(&self) -> Option<&str> {
        self.pg_name.as_deref()
    }

    /// Every row of PostgreSQL's `execution_results`, read straight from the database (not
    /// through ingest, nor any proxy in front of it), by `result_id`; panics if a `result_id` is
    /// stored twice.
    pub async fn stored_runs(&self) -> BTreeMap<Uuid, StoredRun> {
        assert!(self.pg_name.is_some(), "stored_runs reads PostgreSQL");
        let pool = sqlx::PgPool::connect(&self.url)
            .await
            .expect("connecting to the test database");
        let rows: Vec<StoredRun> = sqlx::query_as(
            "SELECT result_id, pc_id, exec_id, timeout_secs, status, exit_code, finished_at \
             FROM execution_results",
        )
        .fetch_all(&pool)
        .await
        .expect("reading execution_results");
        pool.close().await;
        let count = rows.len();
        let by_id: BTreeMap<_, _> = rows.into_iter().map(|r| (r.result_id, r)).collect();
        assert_eq!(by_id.len(), count, "a result_id is stored twice");
        by_id
    }

    /// The store itself, migrated, for direct inspection.
    pub async fn store(&self) -> Arc<dyn Store> {
        let store = store::open(&self.url, "kanade-test")
            .await
            .expect("opening the store");
        store.migrate().await.expect("migrating");
        store
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        cleanup_on_test_server(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
    }
}

/// Runs one clean-up statement on the test server, from a `Drop`: outside any runtime
/// guarantee, so on a small runtime of its own in a thread of its own; a failure is ignored
/// (the server is gone, or so is the thing to clean up).
pub(crate) fn cleanup_on_test_server(statement: String) {
    let admin = postgres_admin_url();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
                let _ = sqlx::query(sqlx::AssertSqlSafe(statement))
                    .execute(&pool)
                    .await;
            }
        });
    })
    .join();
}
