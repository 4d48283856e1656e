-- pgpushd schema, version 1: the outbox, unregistered tokens, the NOTIFY trigger.
-- Applied by `pgpushd migrate` inside one transaction; the schema itself and the
-- version table are created by the migration runner.

CREATE TABLE pgpushd.outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- names an [apps.NAME] section of the daemon's config
    app           text        NOT NULL DEFAULT 'default',
    -- hex, as the device reported it (either case; not necessarily 64 digits)
    device_token  text        NOT NULL,
    -- the complete APNs payload: {"aps": {...}, ...custom keys}
    payload       jsonb       NOT NULL,
    push_type     text        NOT NULL DEFAULT 'alert',
    priority      smallint,
    collapse_id   text,
    -- overrides the app's topic
    topic         text,
    -- apns-expiration; a row still pending after it is not sent (status 'expired')
    expires_at    timestamptz,
    -- scheduling and retry backoff both move it
    send_after    timestamptz NOT NULL DEFAULT now(),
    status        text        NOT NULL DEFAULT 'pending',
    attempts      int         NOT NULL DEFAULT 0,
    last_error    text,
    apns_id       uuid,
    created_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz,

    -- What can be known at INSERT time is refused there, inside the producer's own
    -- transaction, under a name that says what is wrong.
    CONSTRAINT outbox_device_token_must_be_even_length_hex
        CHECK (device_token ~ '^([0-9A-Fa-f]{2})+$'),
    CONSTRAINT outbox_push_type_must_be_known
        CHECK (push_type IN ('alert', 'background', 'location', 'voip', 'complication',
                             'fileprovider', 'mdm', 'liveactivity', 'pushtotalk',
                             'widgets', 'controls')),
    CONSTRAINT outbox_priority_must_be_1_5_or_10
        CHECK (priority IN (1, 5, 10)),
    CONSTRAINT outbox_collapse_id_must_be_at_most_64_bytes
        CHECK (octet_length(collapse_id) <= 64),
    CONSTRAINT outbox_payload_must_be_a_json_object
        CHECK (jsonb_typeof(payload) = 'object'),
    CONSTRAINT outbox_status_must_be_known
        CHECK (status IN ('pending', 'sent', 'failed', 'expired')),
    CONSTRAINT outbox_attempts_must_not_be_negative
        CHECK (attempts >= 0)
);

-- The claim query orders by exactly (send_after, id) over pending rows, so each claim is
-- an index range scan however many rows are pending.
CREATE INDEX outbox_pending_due ON pgpushd.outbox (send_after, id) WHERE status = 'pending';

-- Tokens APNs reported as no longer valid (410 Unregistered / ExpiredToken, binary
-- status 8, the feedback service). Rows for them fail without being sent; an app
-- re-registers a token by deleting it here. Tokens are stored in lower case.
CREATE TABLE pgpushd.unregistered_tokens (
    app              text        NOT NULL,
    device_token     text        NOT NULL,
    unregistered_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app, device_token)
);

-- One notification per INSERT statement, not per row; it carries nothing: the daemon
-- reads rows from the table, never from the notification.
CREATE FUNCTION pgpushd.notify_outbox() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_notify('pgpushd_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify
    AFTER INSERT ON pgpushd.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION pgpushd.notify_outbox();
