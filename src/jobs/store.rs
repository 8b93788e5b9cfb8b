//! Jobs on disk: one SQLite database in the weights dir, one row per job holding its JSON.
//!
//! SQLite gives atomic, durable writes for free: a crash leaves each row as it was before or after
//! an update, never half-written.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::Job;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("an unfinished job is already called `{0}`")]
    NameTaken(String),
    #[error("job database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("job database holds an unreadable job: {0}")]
    Corrupt(#[from] serde_json::Error),
}

pub struct Store {
    conn: Connection,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        // WAL: readers never block the writer, and a crash mid-write rolls back cleanly.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
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
        Ok(Self { conn })
    }

    pub fn put(&self, job: &Job) -> Result<(), StoreError> {
        let json = serde_json::to_string(job)?;
        let written = self.conn.execute(
            "INSERT INTO jobs (id, created_at, status, job, name) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(id) DO UPDATE SET status = excluded.status, job = excluded.job",
            params![
                job.job_id,
                job.created_at.to_rfc3339(),
                job.status.as_str(),
                json,
                job.name
            ],
        );
        match written {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
            {
                Err(StoreError::NameTaken(job.name.clone()))
            }
            other => other.map(|_| ()).map_err(StoreError::from),
        }
    }

    pub fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let json: Option<String> = self
            .conn
            .query_row("SELECT job FROM jobs WHERE id = ?1", [id], |row| row.get(0))
            .optional()?;
        Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
    }

    /// Every job, oldest first.
    pub fn all(&self) -> Result<Vec<Job>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT job FROM jobs ORDER BY created_at, rowid")?;
        let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
        let mut jobs = Vec::new();
        for json in rows {
            jobs.push(serde_json::from_str(&json?)?);
        }
        Ok(jobs)
    }

    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM jobs WHERE id = ?1", [id])?;
        Ok(())
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
        let store = Store::open(&dir.path().join("jobs.sqlite")).unwrap();
        store.put(&job("a", "pets", "queued")).unwrap();
        assert!(matches!(
            store.put(&job("b", "pets", "queued")),
            Err(StoreError::NameTaken(n)) if n == "pets"
        ));
        store.put(&job("a", "pets", "running")).unwrap();
        store.put(&job("a", "pets", "failed")).unwrap();
        store.put(&job("b", "pets", "queued")).unwrap();
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
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get("old").unwrap().unwrap().status.as_str(), "queued");
        let new = store.get("new").unwrap().unwrap();
        assert_eq!(new.status.as_str(), "failed");
        assert!(new.error.unwrap().contains("same name"));
        assert!(matches!(
            store.put(&job("third", "twin", "queued")),
            Err(StoreError::NameTaken(_))
        ));
    }
}
