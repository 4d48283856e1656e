-- pgpushd schema, version 8: Live Activity broadcast channels (iOS 18). A channel is made
-- at APNs's channel management API; one broadcast request then reaches every device
-- subscribed to it. Channels live here like notifications: an application INSERTs one
-- and reads its channel_id back once the daemon has created it at APNs; it asks for one
-- to be deleted with an UPDATE to 'closing'. A broadcast is an outbox row that names a
-- channel_id instead of a device_token.

-- The outbox statements take its exclusive lock, held until `migrate` commits; none
-- scans the table (see 006).
SET LOCAL lock_timeout = '5s';

CREATE TABLE pgpushd.channels (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- names an [apps.NAME] section of the daemon's config: an APNs app (HTTP/2)
    app              text        NOT NULL DEFAULT 'default',
    -- APNs's message storage policy: 'none' (a device that subscribes later sees nothing
    -- until the next broadcast) or 'most-recent' (APNs keeps the last one for it)
    message_storage  text        NOT NULL DEFAULT 'none',
    -- pending -> active (created at APNs) | failed (with last_error);
    -- the application sets 'closing' -> closed (deleted at APNs)
    status           text        NOT NULL DEFAULT 'pending',
    -- APNs's channel id, once created: what the app subscribes with, and what an
    -- outbox row's channel_id names
    channel_id       text,
    attempts         int         NOT NULL DEFAULT 0,
    last_error       text,
    -- when the next step may be taken (a retry's backoff moves it)
    send_after       timestamptz NOT NULL DEFAULT now(),
    -- A create in flight: written and committed before the request goes to APNs, and
    -- cleared with its outcome. One found past its time is a create whose outcome was
    -- never written (the daemon died after APNs answered): the daemon lists APNs's
    -- channels and adopts the one it made, instead of making a second.
    lease            uuid,
    lease_until      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    activated_at     timestamptz,
    closed_at        timestamptz,

    CONSTRAINT channels_message_storage_must_be_none_or_most_recent
        CHECK (message_storage IN ('none', 'most-recent')),
    CONSTRAINT channels_status_must_be_known
        CHECK (status IN ('pending', 'active', 'failed', 'closing', 'closed')),
    CONSTRAINT channels_active_has_a_channel_id
        CHECK (status <> 'active' OR channel_id IS NOT NULL),
    CONSTRAINT channels_attempts_must_not_be_negative
        CHECK (attempts >= 0)
);

-- One row per APNs channel; also the broadcast rows' lookup of their channel's policy.
CREATE UNIQUE INDEX channels_app_channel_id ON pgpushd.channels (app, channel_id);
-- The daemon's work: what to create and what to delete, in order.
CREATE INDEX channels_to_do ON pgpushd.channels (send_after, id)
    WHERE status IN ('pending', 'closing');

-- Wake the daemon for a new channel, and for one asked to close; its own writes do not.
CREATE FUNCTION pgpushd.notify_channels() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_notify('pgpushd_channels', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER channels_notify_insert
    AFTER INSERT ON pgpushd.channels
    FOR EACH STATEMENT EXECUTE FUNCTION pgpushd.notify_channels();
CREATE TRIGGER channels_notify_closing
    AFTER UPDATE OF status ON pgpushd.channels
    FOR EACH ROW WHEN (NEW.status = 'closing' AND OLD.status IS DISTINCT FROM 'closing')
    EXECUTE FUNCTION pgpushd.notify_channels();

-- A broadcast row names APNs's channel id and no device token; a CHECK says exactly one
-- of the two. NOT VALID, as in 006: every existing row has a device token and no channel.
ALTER TABLE pgpushd.outbox ALTER COLUMN device_token DROP NOT NULL;
ALTER TABLE pgpushd.outbox ADD COLUMN channel_id text;
ALTER TABLE pgpushd.outbox
    ADD CONSTRAINT outbox_names_a_device_token_or_a_channel_id
        CHECK ((device_token IS NULL) <> (channel_id IS NULL)) NOT VALID;
-- APNs's channel ids are base64; a header cannot carry much else.
ALTER TABLE pgpushd.outbox
    ADD CONSTRAINT outbox_channel_id_must_be_base64
        CHECK (channel_id ~ '^[A-Za-z0-9+/_=-]+$' AND octet_length(channel_id) <= 256) NOT VALID;
