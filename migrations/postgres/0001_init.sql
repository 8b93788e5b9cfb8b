-- Jobs, their claims and the model registry, shared by every replica.
CREATE SEQUENCE job_versions;
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL,
    status TEXT NOT NULL,
    name TEXT NOT NULL,
    job JSONB NOT NULL,
    -- The replica running the job, and until when its claim holds without a heartbeat.
    owner TEXT,
    lease_until TIMESTAMPTZ,
    cancel_requested BOOLEAN NOT NULL DEFAULT false,
    -- Past its commit point: trained, saving its model; too late to cancel.
    publishing BOOLEAN NOT NULL DEFAULT false,
    -- Bumped on every write: watchers on other replicas ask for what changed since.
    version BIGINT NOT NULL DEFAULT nextval('job_versions')
);
-- Names are reserved by unfinished jobs across replicas.
CREATE UNIQUE INDEX unfinished_job_names ON jobs (name) WHERE status IN ('queued', 'running');
CREATE INDEX queued_jobs ON jobs (created_at) WHERE status = 'queued';
CREATE INDEX jobs_by_version ON jobs (version);
-- The model registry: a fine-tuned model exists when it has a row here.
CREATE TABLE models (
    name TEXT PRIMARY KEY,
    job_id TEXT,
    meta JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- The pretrained weights every replica must share, by digest.
CREATE TABLE pretrained (
    name TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL
);
