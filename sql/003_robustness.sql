-- pgpushd schema, version 3.
--
-- Applied in two steps (see src/outbox/migrate.rs): the index, built CONCURRENTLY outside
-- any transaction, then the constraint, in the transaction that records the version. A run
-- interrupted between them builds nothing twice: the index is there (or, INVALID, is
-- dropped and built again).

-- Settled rows still lacking settled_at (settled by a daemon older than version 2): the
-- retention task stamps them first. Empty in steady state, so free to maintain, and it
-- spares that task a scan of the whole table on every pass. Built CONCURRENTLY: on an
-- outbox from before version 2 it holds every settled row, and INSERTs go on meanwhile.
-- pgpushd:step no-transaction
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_unsettled ON pgpushd.outbox (id)
    WHERE status <> 'pending' AND settled_at IS NULL;

-- A send_after of 'infinity' would be a row that never falls due, and breaks the
-- arithmetic that tells the daemon when to wake. Refuse it at INSERT; NOT VALID skips
-- checking existing rows (the daemon copes with them: it never waits for them). The
-- outbox's exclusive lock, for a moment: no scan.
-- pgpushd:step
ALTER TABLE pgpushd.outbox
    ADD CONSTRAINT outbox_send_after_must_be_finite CHECK (isfinite(send_after)) NOT VALID;
