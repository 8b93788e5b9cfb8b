//! Jobs on disk: one SQLite database in the weights dir, one row per job holding its JSON.
//!
//! SQLite gives atomic, durable writes for free: a crash leaves each row as it was before or after
//! an update, never half-written.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::Job;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
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
        Ok(Self { conn })
    }

    pub fn put(&self, job: &Job) -> Result<(), StoreError> {
        let json = serde_json::to_string(job)?;
        self.conn.execute(
            "INSERT INTO jobs (id, created_at, status, job) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET status = excluded.status, job = excluded.job",
            params![
                job.job_id,
                job.created_at.to_rfc3339(),
                job.status.as_str(),
                json
            ],
        )?;
        Ok(())
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
