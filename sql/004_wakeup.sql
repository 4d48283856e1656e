-- pgpushd schema, version 4: NOTIFY only when no daemon is awake.
--
-- PostgreSQL takes a database-wide lock when a transaction that called pg_notify commits
-- and holds it through the commit's WAL flush, so writers that notify commit one at a
-- time. While a daemon is awake it looks for new rows itself, and writers skip NOTIFY.
--
-- The awake state is a deadline in epoch milliseconds, kept in a sequence: a sequence's
-- value is not read through a snapshot, so writers see the current deadline at any
-- isolation level. An awake daemon keeps pushing the deadline ahead; a daemon that dies
-- stops pushing and the deadline passes by itself within a second or so.
CREATE SEQUENCE IF NOT EXISTS pgpushd.awake_until MINVALUE 0 START 0;
SELECT setval('pgpushd.awake_until', 0, true);
-- Writers read it from the trigger, as themselves.
GRANT SELECT ON SEQUENCE pgpushd.awake_until TO PUBLIC;

-- The hand-over barrier. Before it reads the deadline, the trigger takes the shared
-- transaction-level advisory lock (1885827189, 2002873189) ('pgpu', 'wake'), held until
-- the writer commits or rolls back. A daemon going to sleep sets the deadline to 0, then
-- takes the same lock exclusively without queueing (pg_try_advisory_xact_lock): once it
-- has it, every writer that may have seen it awake has finished, and its last claim sees
-- their rows. When it cannot, it stays awake and tries again later. A writer that cannot
-- take the shared lock (a daemon is crossing the barrier this very moment) notifies: the
-- trigger never waits.
CREATE OR REPLACE FUNCTION pgpushd.notify_outbox() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared(1885827189, 2002873189)
       OR coalesce(pg_sequence_last_value('pgpushd.awake_until'), 0)
          < (extract(epoch FROM clock_timestamp()) * 1000)::bigint THEN
        PERFORM pg_notify('pgpushd_outbox', '');
    END IF;
    RETURN NULL;
END
$$;
