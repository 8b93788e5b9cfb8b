-- Claims with leases (one replica runs a job), cross-replica cancels, change versions for
-- watchers, and the model registry: the database, not the files, says which fine-tuned models exist.
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_until INTEGER;
ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN publishing INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_by_version ON jobs (version);
CREATE TABLE models (
    name TEXT PRIMARY KEY,
    job_id TEXT,
    meta TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE pretrained (
    name TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL
);
