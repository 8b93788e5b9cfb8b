-- Followers are woken when a job gets a new version or the registry changes, rather than at their
-- next poll (which stays, as a fallback). Delivered when the writing transaction commits.
CREATE FUNCTION cnnserve_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cnnserve_changes', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_changed AFTER INSERT OR UPDATE OF version ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION cnnserve_notify();
CREATE TRIGGER models_changed AFTER INSERT OR DELETE ON models
    FOR EACH STATEMENT EXECUTE FUNCTION cnnserve_notify();
