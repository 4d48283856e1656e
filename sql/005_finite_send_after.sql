-- pgpushd schema, version 5.
--
-- One transaction, which holds no writer however large the table: each UPDATE locks only
-- the rows it changes (and the table in ROW EXCLUSIVE mode, as any writer does), and
-- VALIDATE CONSTRAINT scans under SHARE UPDATE EXCLUSIVE, which INSERTs, UPDATEs and
-- DELETEs do not wait for.

-- Version 3 added `outbox_send_after_must_be_finite` NOT VALID, so rows written before it
-- may still hold an infinite send_after. Every UPDATE's new row version must satisfy the
-- CHECK, so such a row made its batch's outcome UPDATE fail, over and over. Normalise
-- them, then validate the constraint so every row satisfies it from now on.
--
-- '-infinity' meant "due at once": the row keeps its place, due since it was written.
-- 'infinity' on a pending row is a row that would never fall due. It is failed, with a
-- last_error that says why, rather than kept pending at some date far ahead: no real
-- schedule means "never", a made-up date would send it years from now unannounced, and a
-- failed row is visible (status, last_error) and pruned by retention like any other.
-- Settled rows only get a finite send_after (and settled_at, if a retention pass
-- stamped it infinite).
UPDATE pgpushd.outbox
   SET status     = 'failed',
       last_error = 'send_after was ''infinity'' (a row that never falls due), written '
                    || 'before schema version 3: failed by migration 005, not sent',
       settled_at = now(),
       send_after = CASE WHEN isfinite(created_at) THEN created_at ELSE now() END
 WHERE status = 'pending' AND send_after = 'infinity';

UPDATE pgpushd.outbox
   SET send_after = CASE WHEN isfinite(created_at) THEN created_at ELSE now() END
 WHERE NOT isfinite(send_after);

UPDATE pgpushd.outbox
   SET settled_at = coalesce(sent_at, now())
 WHERE NOT isfinite(settled_at);

ALTER TABLE pgpushd.outbox VALIDATE CONSTRAINT outbox_send_after_must_be_finite;
