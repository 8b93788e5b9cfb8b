-- The transaction that last gave each row a version. A version is taken when a row is written but
-- seen when its transaction commits, so a follower that read version 101 may later find 100
-- committed: it reads again the rows written by transactions still open at its last look.
ALTER TABLE jobs ADD COLUMN writer xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX jobs_by_writer ON jobs (writer);
