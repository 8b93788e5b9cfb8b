//! The shared job store: PostgreSQL through tokio-postgres and a deadpool pool. Several replicas
//! use one database: a queued job is claimed with `FOR UPDATE SKIP LOCKED`, so exactly one replica
//! gets it; leases use the database's clock, so replicas' clocks do not matter.
//!
//! The interface is blocking (training threads call it); the store owns a small tokio runtime of
//! its own for the connections, and a call made from inside another runtime runs on a scoped
//! thread rather than blocking that runtime.

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Json;
use tokio_postgres::{NoTls, Row};

use super::{CancelOutcome, Cursor, JobStore, Migrations, ModelRecord, StoreError, Wake};
use crate::jobs::runtime::OwnRuntime;
use crate::jobs::{Job, Status};

/// `migrations/postgres/`, applied in order under an advisory lock (replicas starting together
/// apply each once).
const MIGRATIONS: Migrations = &[
    (
        1,
        include_str!("../../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        include_str!("../../../migrations/postgres/0002_writers.sql"),
    ),
    (
        3,
        include_str!("../../../migrations/postgres/0003_notify.sql"),
    ),
];
/// The channel `migrations/postgres/0003_notify.sql` notifies on.
const CHANNEL: &str = "cnnserve_changes";
/// Any number, the same in every replica: the key of the migrations' advisory lock.
const MIGRATION_LOCK: i64 = 0x636e_6e73_6572_7665;

pub struct PostgresStore {
    describe: String,
    pool: Pool,
    runtime: OwnRuntime,
    /// For the connection that listens for changes.
    config: tokio_postgres::Config,
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Postgres(format!("{}: {}", db.code().code(), db.message())),
        None => StoreError::Postgres(e.to_string()),
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        other => StoreError::Postgres(format!("cannot connect: {other}")),
    }
}

fn unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn job_of(row: &Row, column: usize) -> Result<Job, StoreError> {
    let Json(job) = row.try_get::<_, Json<Job>>(column).map_err(pg)?;
    Ok(job)
}

fn lease_ms(lease: Duration) -> f64 {
    lease.as_secs_f64() * 1000.0
}

impl PostgresStore {
    /// Connects, and applies the migrations the database lacks.
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Config(format!("`--database-url` is not a PostgreSQL URL: {e}"))
        })?;
        let describe = format!(
            "postgres://{}/{}",
            config
                .get_hosts()
                .iter()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            config.get_dbname().unwrap_or("")
        );
        let runtime =
            OwnRuntime::new("postgres").map_err(|e| StoreError::Postgres(e.to_string()))?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // Training threads, the heartbeat, the watcher and request handlers share it; a wait
        // for a connection stays well under a lease, so a busy pool cannot cost a heartbeat its
        // jobs.
        let pool = Pool::builder(manager)
            .max_size(16)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(10)))
            .wait_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| StoreError::Postgres(e.to_string()))?;
        let store = Self {
            describe,
            pool,
            runtime,
            config,
        };
        store.run(async {
            let mut client = store.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(pg)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS cnnserve_migrations (version BIGINT PRIMARY KEY)",
            )
            .await
            .map_err(pg)?;
            let row = tx
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM cnnserve_migrations",
                    &[],
                )
                .await
                .map_err(pg)?;
            let applied: i64 = row.get(0);
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > applied) {
                tx.batch_execute(sql).await.map_err(pg)?;
                tx.execute(
                    "INSERT INTO cnnserve_migrations (version) VALUES ($1)",
                    &[version],
                )
                .await
                .map_err(pg)?;
            }
            tx.commit().await.map_err(pg)
        })?;
        Ok(store)
    }

    /// Runs `fut` on the store's runtime, from any thread.
    fn run<T: Send>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send,
    ) -> Result<T, StoreError> {
        self.runtime.run(fut, || {
            StoreError::Postgres("a database call panicked".into())
        })
    }

    /// Fails the running jobs that `filter` selects (`$1` is its argument).
    fn fail_where(
        &self,
        filter: &'static str,
        arg: Option<String>,
        reason: &str,
    ) -> Result<Vec<Job>, StoreError> {
        self.run(async {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg)?;
            let sql = format!(
                "SELECT job FROM jobs WHERE status = 'running' AND {filter} FOR UPDATE SKIP LOCKED"
            );
            let rows = match &arg {
                Some(arg) => tx.query(&sql, &[arg]).await,
                None => tx.query(&sql, &[]).await,
            }
            .map_err(pg)?;
            let mut failed = Vec::new();
            for row in rows {
                let job = super::failed(job_of(&row, 0)?, reason);
                write(&tx, &job, true).await?;
                failed.push(job);
            }
            tx.commit().await.map_err(pg)?;
            Ok(failed)
        })
    }
}

/// A connection listening on [`CHANNEL`]: its client (the connection lives while it does) and
/// the task that reads its messages and calls `wake` on each notification (it ends when the
/// connection does).
async fn listen(
    config: &tokio_postgres::Config,
    wake: Wake,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let reader = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = futures_util::StreamExt::next(&mut messages).await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(_)) => wake(),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the job database's change notifications stopped");
                    break;
                }
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok((client, reader))
}

/// Writes a job row's JSON and status with a new version; `release` drops its claim.
async fn write(client: &impl GenericClient, job: &Job, release: bool) -> Result<(), StoreError> {
    let sql = if release {
        "UPDATE jobs SET status = $2, job = $3, version = nextval('job_versions'),
             writer = pg_current_xact_id(), owner = NULL, lease_until = NULL, publishing = false
             WHERE id = $1"
    } else {
        "UPDATE jobs SET status = $2, job = $3, version = nextval('job_versions'),
             writer = pg_current_xact_id() WHERE id = $1"
    };
    client
        .execute(sql, &[&job.job_id, &job.status.as_str(), &Json(job)])
        .await
        .map_err(pg)?;
    Ok(())
}

async fn held(client: &impl GenericClient, id: &str, owner: &str) -> Result<bool, StoreError> {
    let row = client
        .query_opt(
            "SELECT 1 FROM jobs WHERE id = $1 AND status = 'running' AND owner = $2 FOR UPDATE",
            &[&id, &owner],
        )
        .await
        .map_err(pg)?;
    Ok(row.is_some())
}

async fn insert_model(
    client: &impl GenericClient,
    model: &ModelRecord,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO models (name, job_id, meta) VALUES ($1, $2, $3)",
            &[&model.name, &model.job_id, &Json(&model.meta)],
        )
        .await
        .map(|_| ())
}

impl JobStore for PostgresStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn is_shared(&self) -> bool {
        true
    }

    /// LISTENs on a connection of its own (not the pool's), listening before it returns; if that
    /// connection drops, it reconnects every few seconds and wakes once when it is back, for what
    /// it may have missed.
    fn subscribe(&self, wake: Wake) -> Result<(), StoreError> {
        let config = self.config.clone();
        let first = self.run(async { listen(&config, wake.clone()).await.map_err(pg) })?;
        self.runtime.spawn(async move {
            let (mut client, mut reader) = first;
            loop {
                let _ = reader.await;
                drop(client);
                loop {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    match listen(&config, wake.clone()).await {
                        Ok(next) => {
                            (client, reader) = next;
                            wake();
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot listen for job database changes")
                        }
                    }
                }
            }
        });
        Ok(())
    }

    fn create(&self, job: &Job) -> Result<(), StoreError> {
        self.run(async {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg)?;
            // Serializes name checks: a model registered meanwhile is seen.
            tx.execute("LOCK TABLE models IN SHARE MODE", &[])
                .await
                .map_err(pg)?;
            let model = tx
                .query_opt("SELECT 1 FROM models WHERE name = $1", &[&job.name])
                .await
                .map_err(pg)?;
            if model.is_some() {
                return Err(StoreError::NameTaken(job.name.clone()));
            }
            let inserted = tx
                .execute(
                    "INSERT INTO jobs (id, created_at, status, name, job) VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &job.job_id,
                        &job.created_at,
                        &job.status.as_str(),
                        &job.name,
                        &Json(job),
                    ],
                )
                .await;
            match inserted {
                Err(e) if unique_violation(&e) => {
                    return Err(StoreError::NameTaken(job.name.clone()))
                }
                other => other.map_err(pg)?,
            };
            tx.commit().await.map_err(pg)
        })
    }

    fn update(&self, job: &Job, owner: Option<&str>) -> Result<(), StoreError> {
        self.run(async {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg)?;
            if let Some(owner) = owner {
                if !held(&tx, &job.job_id, owner).await? {
                    return Err(StoreError::LeaseLost(job.job_id.clone()));
                }
            }
            write(&tx, job, job.status.is_finished()).await?;
            tx.commit().await.map_err(pg)
        })
    }

    fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.run(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let row = client
                .query_opt("SELECT job FROM jobs WHERE id = $1", &[&id])
                .await
                .map_err(pg)?;
            row.map(|r| job_of(&r, 0)).transpose()
        })
    }

    fn all(&self) -> Result<Vec<Job>, StoreError> {
        self.run(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let rows = client
                .query("SELECT job FROM jobs ORDER BY created_at, id", &[])
                .await
                .map_err(pg)?;
            rows.iter().map(|r| job_of(r, 0)).collect()
        })
    }

    fn counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.run(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let rows = client
                .query("SELECT status, COUNT(*) FROM jobs GROUP BY status", &[])
                .await
                .map_err(pg)?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn changes(&self, since: &Cursor) -> Result<(Cursor, Vec<Job>), StoreError> {
        self.run(async {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            // One snapshot for both reads: the oldest transaction open in it, and the rows.
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg)?;
            let horizon: i64 = tx
                .query_one(
                    "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
                    &[],
                )
                .await
                .map_err(pg)?
                .get(0);
            let rows = tx
                .query(
                    "SELECT version, job, writer::text::bigint FROM jobs
                     WHERE version > $1 OR writer >= $2::bigint::text::xid8 ORDER BY version",
                    &[&since.version, &since.horizon],
                )
                .await
                .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            let mut next = Cursor {
                version: since.version,
                horizon,
                returned: Vec::new(),
            };
            let mut jobs = Vec::new();
            for row in rows {
                let (version, writer): (i64, i64) = (row.get(0), row.get(2));
                if writer >= horizon {
                    next.returned.push(version);
                }
                if version <= since.version && since.returned.contains(&version) {
                    continue;
                }
                next.version = next.version.max(version);
                jobs.push(job_of(&row, 1)?);
            }
            Ok((next, jobs))
        })
    }

    fn delete(&self, id: &str) -> Result<bool, StoreError> {
        self.run(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let n = client
                .execute(
                    "DELETE FROM jobs WHERE id = $1 AND status NOT IN ('queued', 'running')",
                    &[&id],
                )
                .await
                .map_err(pg)?;
            Ok(n > 0)
        })
    }

    fn claim(
        &self,
        owner: &str,
        bases: &[String],
        lease: Duration,
    ) -> Result<Option<Job>, StoreError> {
        self.run(async {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg)?;
            let row = tx
                .query_opt(
                    "SELECT job FROM jobs WHERE status = 'queued' AND job->>'base_model' = ANY($1)
                     ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
                    &[&bases],
                )
                .await
                .map_err(pg)?;
            let Some(row) = row else {
                return Ok(None);
            };
            let job = super::claimed(job_of(&row, 0)?);
            write(&tx, &job, false).await?;
            tx.execute(
                "UPDATE jobs SET owner = $2, lease_until = now() + $3::float8 * interval '1 millisecond',
                     cancel_requested = false, publishing = false WHERE id = $1",
                &[&job.job_id, &owner, &lease_ms(lease)],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            Ok(Some(job))
        })
    }

    fn renew(
        &self,
        owner: &str,
        jobs: &[String],
        lease: Duration,
    ) -> Result<Vec<(String, bool)>, StoreError> {
        self.run(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let rows = client
                .query(
                    "UPDATE jobs SET lease_until = now() + $2::float8 * interval '1 millisecond'
                     WHERE owner = $1 AND status = 'running' AND id = ANY($3)
                     RETURNING id, cancel_requested",
                    &[&owner, &lease_ms(lease), &jobs],
                )
                .await
                .map_err(pg)?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn expire(&self) -> Result<Vec<Job>, StoreError> {
        self.fail_where(
            "(lease_until IS NULL OR lease_until < now())",
            None,
            super::LEASE_EXPIRED,
        )
    }

    fn fail_running(&self, owner: Option<&str>, reason: &str) -> Result<Vec<Job>, StoreError> {
        match owner {
            Some(owner) => self.fail_where("owner = $1", Some(owner.to_string()), reason),
            None => self.fail_where("true", None, reason),
        }
    }

    fn cancel(&self, id: &str) -> Result<CancelOutcome, StoreError> {
        self.run(async {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg)?;
            let row = tx
                .query_opt(
                    "SELECT job, publishing FROM jobs WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await
                .map_err(pg)?;
            let Some(row) = row else {
                return Ok(CancelOutcome::NotFound);
            };
            let job = job_of(&row, 0)?;
            let publishing: bool = row.get(1);
            let outcome = match job.status {
                Status::Queued => {
                    let job = super::cancelled(job);
                    write(&tx, &job, true).await?;
                    CancelOutcome::Cancelled(Box::new(job))
                }
                Status::Running if publishing => CancelOutcome::TooLate(Box::new(job)),
                Status::Running => {
                    tx.execute(
                        "UPDATE jobs SET cancel_requested = true, version = nextval('job_versions'),
                             writer = pg_current_xact_id() WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .map_err(pg)?;
                    CancelOutcome::Requested(Box::new(job))
                }
                _ => CancelOutcome::Finished(Box::new(job)),
            };
            tx.commit().await.map_err(pg)?;
            Ok(outcome)
        })
    }

    fn start_publishing(&self, id: &str, owner: &str) -> Result<bool, StoreError> {
        self.run(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let n = client
                .execute(
                    "UPDATE jobs SET publishing = true WHERE id = $1 AND owner = $2
                       AND status = 'running' AND NOT cancel_requested",
                    &[&id, &owner],
                )
                .await
                .map_err(pg)?;
            Ok(n > 0)
        })
    }

    fn finish(
        &self,
        job: &Job,
        owner: &str,
        model: Option<&ModelRecord>,
    ) -> Result<(), StoreError> {
        self.run(async {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg)?;
            if !held(&tx, &job.job_id, owner).await? {
                return Err(StoreError::LeaseLost(job.job_id.clone()));
            }
            // The registry first: a `create` holding `models` for a name check waits for nothing
            // this transaction has written (a job row written first would make its unique-name
            // check wait on us while we wait on its table lock: a deadlock).
            if let Some(model) = model {
                match insert_model(&tx, model).await {
                    Err(e) if unique_violation(&e) => {
                        return Err(StoreError::NameTaken(model.name.clone()))
                    }
                    other => other.map_err(pg)?,
                }
            }
            write(&tx, job, true).await?;
            tx.commit().await.map_err(pg)
        })
    }

    fn models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        self.run(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let rows = client
                .query("SELECT name, job_id, meta FROM models ORDER BY name", &[])
                .await
                .map_err(pg)?;
            rows.iter()
                .map(|r| {
                    let Json(meta) = r.try_get(2).map_err(pg)?;
                    Ok(ModelRecord {
                        name: r.get(0),
                        job_id: r.get(1),
                        meta,
                    })
                })
                .collect()
        })
    }

    fn register(&self, model: &ModelRecord) -> Result<bool, StoreError> {
        self.run(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            match insert_model(&client, model).await {
                Ok(()) => Ok(true),
                Err(e) if unique_violation(&e) => Ok(false),
                Err(e) => Err(pg(e)),
            }
        })
    }

    fn unregister(&self, name: &str) -> Result<bool, StoreError> {
        self.run(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let n = client
                .execute("DELETE FROM models WHERE name = $1", &[&name])
                .await
                .map_err(pg)?;
            Ok(n > 0)
        })
    }

    fn check_pretrained(&self, name: &str, sha256: &str) -> Result<Option<String>, StoreError> {
        self.run(async {
            let client = self.pool.get().await.map_err(pool_error)?;
            client
                .execute(
                    "INSERT INTO pretrained (name, sha256) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                    &[&name, &sha256],
                )
                .await
                .map_err(pg)?;
            let row = client
                .query_one("SELECT sha256 FROM pretrained WHERE name = $1", &[&name])
                .await
                .map_err(pg)?;
            let recorded: String = row.get(0);
            Ok((recorded != sha256).then_some(recorded))
        })
    }
}
