-- pgpushd schema, version 3.

-- A send_after of 'infinity' would be a row that never falls due, and breaks the
-- arithmetic that tells the daemon when to wake. Refuse it at INSERT; NOT VALID skips
-- checking existing rows (the daemon copes with them: it never waits for them).
ALTER TABLE pgpushd.outbox
    ADD CONSTRAINT outbox_send_after_must_be_finite CHECK (isfinite(send_after)) NOT VALID;

-- Settled rows still lacking settled_at (settled by a daemon older than version 2): the
-- retention task stamps them first. Empty in steady state, so free to maintain, and it
-- spares that task a scan of the whole table on every pass.
CREATE INDEX IF NOT EXISTS outbox_unsettled ON pgpushd.outbox (id)
    WHERE status <> 'pending' AND settled_at IS NULL;
