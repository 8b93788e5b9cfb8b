//! The embedded job store: one SQLite file (`jobs.sqlite` in the weights dir by default), one
//! process. SQLite gives atomic, durable writes: a crash leaves each row as it was before or after
//! an update, never half-written.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{CancelOutcome, Cursor, JobStore, Migrations, ModelRecord, StoreError};
use crate::jobs::{Job, Status};

/// `PRAGMA user_version` after each file of `migrations/sqlite/`. Version 1 is the table as it
/// was before migrations were numbered (made, or brought up to date, by [`SqliteStore::open`]).
const MIGRATIONS: Migrations = &[(
    2,
    include_str!("../../../migrations/sqlite/0002_replicas.sql"),
)];

pub struct SqliteStore {
    path: std::path::PathBuf,
    conn: Mutex<Connection>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2)
}

fn parse(json: &str) -> Result<Job, StoreError> {
    Ok(serde_json::from_str(json)?)
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path)?;
        // WAL: readers never block the writer, and a crash mid-write rolls back cleanly.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY,
                created_at TEXT NOT NULL,
                status TEXT NOT NULL,
                job TEXT NOT NULL
            )",
        )?;
        // The model name a job will write: unique among unfinished jobs (a partial unique index),
        // so that two uploads with one name cannot both be queued. Databases from before the
        // column get it filled from the JSON; duplicates they may hold (the race this closes)
        // keep their oldest job and fail the others.
        let has_name: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'name'")?
            .exists([])?;
        if !has_name {
            conn.execute_batch(
                "BEGIN;
                 ALTER TABLE jobs ADD COLUMN name TEXT;
                 UPDATE jobs SET name = json_extract(job, '$.name');
                 UPDATE jobs SET status = 'failed',
                     job = json_set(job, '$.status', 'failed',
                         '$.error', 'another unfinished job had the same name')
                   WHERE status IN ('queued', 'running') AND rowid NOT IN (
                     SELECT MIN(rowid) FROM jobs WHERE status IN ('queued', 'running')
                     GROUP BY name);
                 COMMIT;",
            )?;
        }
        conn.execute_batch(
            "CREATE UNIQUE INDEX IF NOT EXISTS unfinished_job_names ON jobs (name)
               WHERE status IN ('queued', 'running')",
        )?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (to, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > version) {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", to)?;
            tx.commit()?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().expect("job database lock")
    }
}

fn next_version(tx: &Connection) -> Result<i64, StoreError> {
    Ok(
        tx.query_row("SELECT COALESCE(MAX(version), 0) + 1 FROM jobs", [], |r| {
            r.get(0)
        })?,
    )
}

/// Writes a job row's JSON and status with a new version; `release` drops its claim.
fn write(tx: &Connection, job: &Job, release: bool) -> Result<(), StoreError> {
    let version = next_version(tx)?;
    let json = serde_json::to_string(job)?;
    let sql = if release {
        "UPDATE jobs SET status = ?2, job = ?3, version = ?4, owner = NULL, lease_until = NULL,
             publishing = 0 WHERE id = ?1"
    } else {
        "UPDATE jobs SET status = ?2, job = ?3, version = ?4 WHERE id = ?1"
    };
    tx.execute(sql, params![job.job_id, job.status.as_str(), json, version])?;
    Ok(())
}

fn name_taken(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

impl JobStore for SqliteStore {
    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    fn is_shared(&self) -> bool {
        false
    }

    fn create(&self, job: &Job) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let model: bool = tx
            .prepare("SELECT 1 FROM models WHERE name = ?1")?
            .exists([&job.name])?;
        if model {
            return Err(StoreError::NameTaken(job.name.clone()));
        }
        let version = next_version(&tx)?;
        let written = tx.execute(
            "INSERT INTO jobs (id, created_at, status, job, name, version)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                job.job_id,
                job.created_at.to_rfc3339(),
                job.status.as_str(),
                serde_json::to_string(job)?,
                job.name,
                version
            ],
        );
        match written {
            Err(e) if name_taken(&e) => return Err(StoreError::NameTaken(job.name.clone())),
            other => other?,
        };
        tx.commit()?;
        Ok(())
    }

    fn update(&self, job: &Job, owner: Option<&str>) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(owner) = owner {
            let held: bool = tx
                .prepare("SELECT 1 FROM jobs WHERE id = ?1 AND status = 'running' AND owner = ?2")?
                .exists(params![job.job_id, owner])?;
            if !held {
                return Err(StoreError::LeaseLost(job.job_id.clone()));
            }
        }
        write(&tx, job, job.status.is_finished())?;
        tx.commit()?;
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let json: Option<String> = self
            .conn()
            .query_row("SELECT job FROM jobs WHERE id = ?1", [id], |row| row.get(0))
            .optional()?;
        json.as_deref().map(parse).transpose()
    }

    fn all(&self) -> Result<Vec<Job>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT job FROM jobs ORDER BY created_at, rowid")?;
        let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
        let mut jobs = Vec::new();
        for json in rows {
            jobs.push(parse(&json?)?);
        }
        Ok(jobs)
    }

    fn counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn changes(&self, since: &Cursor) -> Result<(Cursor, Vec<Job>), StoreError> {
        // One connection and one writer at a time: versions commit in order.
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT version, job FROM jobs WHERE version > ?1 ORDER BY version")?;
        let rows = stmt.query_map([since.version], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
        })?;
        let (mut last, mut jobs) = (since.version, Vec::new());
        for row in rows {
            let (v, json) = row?;
            last = last.max(v);
            jobs.push(parse(&json)?);
        }
        let next = Cursor {
            version: last,
            ..Cursor::default()
        };
        Ok((next, jobs))
    }

    fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM jobs WHERE id = ?1 AND status NOT IN ('queued', 'running')",
            [id],
        )?;
        Ok(n > 0)
    }

    fn claim(
        &self,
        owner: &str,
        bases: &[String],
        lease: Duration,
    ) -> Result<Option<Job>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let json: Option<String> = tx
            .query_row(
                "SELECT job FROM jobs WHERE status = 'queued'
                   AND json_extract(job, '$.base_model') IN (SELECT value FROM json_each(?1))
                 ORDER BY created_at, rowid LIMIT 1",
                [serde_json::to_string(bases)?],
                |row| row.get(0),
            )
            .optional()?;
        let Some(json) = json else {
            return Ok(None);
        };
        let job = super::claimed(parse(&json)?);
        write(&tx, &job, false)?;
        tx.execute(
            "UPDATE jobs SET owner = ?2, lease_until = ?3, cancel_requested = 0, publishing = 0
             WHERE id = ?1",
            params![job.job_id, owner, now_ms() + lease_ms(lease)],
        )?;
        tx.commit()?;
        Ok(Some(job))
    }

    fn renew(
        &self,
        owner: &str,
        jobs: &[String],
        lease: Duration,
    ) -> Result<Vec<(String, bool)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "UPDATE jobs SET lease_until = ?2 WHERE owner = ?1 AND status = 'running'
               AND id IN (SELECT value FROM json_each(?3))
             RETURNING id, cancel_requested",
        )?;
        let ids = serde_json::to_string(jobs)?;
        let rows = stmt.query_map(params![owner, now_ms() + lease_ms(lease), ids], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, bool>(1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn expire(&self) -> Result<Vec<Job>, StoreError> {
        self.fail_where(
            "(lease_until IS NULL OR lease_until < ?1)",
            params![now_ms()],
            super::LEASE_EXPIRED,
        )
    }

    fn fail_running(&self, owner: Option<&str>, reason: &str) -> Result<Vec<Job>, StoreError> {
        match owner {
            Some(owner) => self.fail_where("owner = ?1", params![owner], reason),
            None => self.fail_where("1 = 1", params![], reason),
        }
    }

    fn cancel(&self, id: &str) -> Result<CancelOutcome, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row: Option<(String, bool)> = tx
            .query_row(
                "SELECT job, publishing FROM jobs WHERE id = ?1",
                [id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let Some((json, publishing)) = row else {
            return Ok(CancelOutcome::NotFound);
        };
        let job = parse(&json)?;
        let outcome = match job.status {
            Status::Queued => {
                let job = super::cancelled(job);
                write(&tx, &job, true)?;
                CancelOutcome::Cancelled(Box::new(job))
            }
            Status::Running if publishing => CancelOutcome::TooLate(Box::new(job)),
            Status::Running => {
                tx.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1", [id])?;
                CancelOutcome::Requested(Box::new(job))
            }
            _ => CancelOutcome::Finished(Box::new(job)),
        };
        tx.commit()?;
        Ok(outcome)
    }

    fn start_publishing(&self, id: &str, owner: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE jobs SET publishing = 1 WHERE id = ?1 AND owner = ?2 AND status = 'running'
               AND cancel_requested = 0",
            params![id, owner],
        )?;
        Ok(n > 0)
    }

    fn finish(
        &self,
        job: &Job,
        owner: &str,
        model: Option<&ModelRecord>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let held: bool = tx
            .prepare("SELECT 1 FROM jobs WHERE id = ?1 AND status = 'running' AND owner = ?2")?
            .exists(params![job.job_id, owner])?;
        if !held {
            return Err(StoreError::LeaseLost(job.job_id.clone()));
        }
        if let Some(model) = model {
            match insert_model(&tx, model) {
                Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)))
                    if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
                {
                    return Err(StoreError::NameTaken(model.name.clone()))
                }
                other => other?,
            }
        }
        write(&tx, job, true)?;
        tx.commit()?;
        Ok(())
    }

    fn models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, job_id, meta FROM models ORDER BY name")?;
        let rows = stmt.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, Option<String>>(1)?,
                row.get::<_, String>(2)?,
            ))
        })?;
        let mut models = Vec::new();
        for row in rows {
            let (name, job_id, meta) = row?;
            models.push(ModelRecord {
                name,
                job_id,
                meta: serde_json::from_str(&meta)?,
            });
        }
        Ok(models)
    }

    fn register(&self, model: &ModelRecord) -> Result<bool, StoreError> {
        let conn = self.conn();
        match insert_model(&conn, model) {
            Ok(()) => Ok(true),
            Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)))
                if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn unregister(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM models WHERE name = ?1", [name])?
            > 0)
    }

    fn check_pretrained(&self, name: &str, sha256: &str) -> Result<Option<String>, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO pretrained (name, sha256) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
            params![name, sha256],
        )?;
        let recorded: String = conn.query_row(
            "SELECT sha256 FROM pretrained WHERE name = ?1",
            [name],
            |r| r.get(0),
        )?;
        Ok((recorded != sha256).then_some(recorded))
    }
}

fn insert_model(conn: &Connection, model: &ModelRecord) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO models (name, job_id, meta, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![
            model.name,
            model.job_id,
            serde_json::to_string(&model.meta)?,
            chrono::Utc::now().to_rfc3339()
        ],
    )?;
    Ok(())
}

impl SqliteStore {
    /// Fails the running jobs matching `filter` (over `owner`, `lease_until`).
    fn fail_where(
        &self,
        filter: &str,
        args: impl rusqlite::Params,
        reason: &str,
    ) -> Result<Vec<Job>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let jsons: Vec<String> = {
            let mut stmt = tx.prepare(&format!(
                "SELECT job FROM jobs WHERE status = 'running' AND {filter}"
            ))?;
            let rows = stmt.query_map(args, |row| row.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut failed = Vec::new();
        for json in jsons {
            let job = super::failed(parse(&json)?, reason);
            write(&tx, &job, true)?;
            failed.push(job);
        }
        tx.commit()?;
        Ok(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, name: &str, status: &str) -> Job {
        let mut job: serde_json::Value = serde_json::json!({
            "job_id": id, "status": status, "created_at": "2026-12-01T00:00:00Z",
            "started_at": null, "finished_at": null, "base_model": "googlenet", "name": name,
            "params": crate::train::Params::default(),
            "dataset": {"classes": ["a", "b"], "counts": {"train": [1, 1], "valid": [1, 0], "test": [0, 0]},
                        "skipped": [], "ignored": 0},
            "progress": null, "history": [], "result": null, "error": null
        });
        job["status"] = status.into();
        serde_json::from_value(job).unwrap()
    }

    #[test]
    fn unfinished_jobs_cannot_share_a_name_finished_ones_free_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("jobs.sqlite")).unwrap();
        store.create(&job("a", "pets", "queued")).unwrap();
        assert!(matches!(
            store.create(&job("b", "pets", "queued")),
            Err(StoreError::NameTaken(n)) if n == "pets"
        ));
        store.update(&job("a", "pets", "running"), None).unwrap();
        assert!(store.create(&job("b", "pets", "queued")).is_err());
        store.update(&job("a", "pets", "failed"), None).unwrap();
        store.create(&job("b", "pets", "queued")).unwrap();
    }

    #[test]
    fn an_old_database_gets_the_name_rule_and_keeps_the_oldest_of_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE jobs (id TEXT PRIMARY KEY, created_at TEXT NOT NULL,
                 status TEXT NOT NULL, job TEXT NOT NULL)",
            )
            .unwrap();
            for id in ["old", "new"] {
                let json = serde_json::to_string(&job(id, "twin", "queued")).unwrap();
                conn.execute(
                    "INSERT INTO jobs VALUES (?1, '2026-12-01T00:00:00Z', 'queued', ?2)",
                    params![id, json],
                )
                .unwrap();
            }
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.get("old").unwrap().unwrap().status.as_str(), "queued");
        let new = store.get("new").unwrap().unwrap();
        assert_eq!(new.status.as_str(), "failed");
        assert!(new.error.unwrap().contains("same name"));
        assert!(matches!(
            store.create(&job("third", "twin", "queued")),
            Err(StoreError::NameTaken(_))
        ));
    }
}
