-- pgpushd schema, version 9: the checks of what an application writes, in one function.
--
-- PostgreSQL prepares a table's CHECK constraints for every statement that writes a
-- row, whatever columns it sets: for the outbox's seven checks of the application's
-- columns, about 50 µs of each INSERT and of each of the daemon's outcome UPDATEs
-- (measured: a single-row UPDATE 66 µs with them, 16 µs without; docs/performance.md).
-- One CHECK calling a PL/pgSQL function is prepared in a few microseconds (the function's
-- expressions are planned once per connection), and the function checks a row's
-- application columns only while it is pending: the outcomes the daemon writes (sent,
-- failed, expired) skip them. A row an application sets pending again is checked again.
--
-- The function raises what each constraint did: SQLSTATE 23514 (check_violation), the
-- same message, the same constraint names (an application that reads the constraint
-- name of the error sees no change), and a DETAIL saying what is wrong.
--
-- The statements take the outbox's exclusive lock, held until `migrate` commits; none
-- scans the table. The new CHECK is NOT VALID: every existing row passed the checks it
-- replaces, or (a row written before them) was never held to them.
SET LOCAL lock_timeout = '5s';

CREATE FUNCTION pgpushd.outbox_row_is_valid(
    status text, device_token text, channel_id text, push_type text, priority smallint,
    collapse_id text, payload jsonb
) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    violated text;
    detail text;
BEGIN
    IF status IS DISTINCT FROM 'pending' THEN
        RETURN true;
    END IF;
    -- A NULL passes, as it does a CHECK: NOT NULL says what must be there.
    IF NOT (device_token ~ '^([0-9A-Fa-f]{2})+$'
            OR (device_token ~ '^[A-Za-z0-9_:-]+$'
                AND strpos(device_token, ':') > 0
                AND octet_length(device_token) <= 1024)
            OR (device_token ~ '^\s*\{'
                AND octet_length(device_token) <= 2048
                AND device_token ~ '"endpoint"\s*:\s*"https://'
                AND device_token ~ '"p256dh"\s*:'
                AND device_token ~ '"auth"\s*:')) THEN
        violated := 'outbox_device_token_is_apns_fcm_or_webpush';
        detail := 'device_token is none of: an even number of hex digits (APNs), an FCM '
                  'registration token, a Web Push subscription (JSON with an https '
                  'endpoint and the keys p256dh and auth, at most 2048 bytes)';
    ELSIF NOT ((device_token IS NULL) <> (channel_id IS NULL)) THEN
        violated := 'outbox_names_a_device_token_or_a_channel_id';
        detail := 'a row names a device_token or a channel_id, exactly one of the two';
    ELSIF NOT (channel_id ~ '^[A-Za-z0-9+/_=-]+$' AND octet_length(channel_id) <= 256) THEN
        violated := 'outbox_channel_id_must_be_base64';
        detail := 'channel_id is APNs''s channel id: base64, at most 256 bytes';
    ELSIF NOT (push_type IN ('alert', 'background', 'location', 'voip', 'complication',
                             'fileprovider', 'mdm', 'liveactivity', 'pushtotalk',
                             'widgets', 'controls')) THEN
        violated := 'outbox_push_type_must_be_known';
        detail := format('push_type %L is none of alert, background, location, voip, '
                         'complication, fileprovider, mdm, liveactivity, pushtotalk, '
                         'widgets, controls', push_type);
    ELSIF NOT (priority IN (1, 5, 10)) THEN
        violated := 'outbox_priority_must_be_1_5_or_10';
        detail := format('priority %s is none of 1, 5, 10', priority);
    ELSIF NOT (octet_length(collapse_id) <= 64) THEN
        violated := 'outbox_collapse_id_must_be_at_most_64_bytes';
        detail := format('collapse_id is %s bytes', octet_length(collapse_id));
    ELSIF NOT (jsonb_typeof(payload) = 'object') THEN
        violated := 'outbox_payload_must_be_a_json_object';
        detail := format('payload is a JSON %s', jsonb_typeof(payload));
    ELSE
        RETURN true;
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = 'check_violation',
        MESSAGE = format('new row for relation "outbox" violates check constraint "%s"',
                         violated),
        DETAIL = detail,
        SCHEMA = 'pgpushd',
        TABLE = 'outbox',
        CONSTRAINT = violated;
END
$$;

ALTER TABLE pgpushd.outbox
    DROP CONSTRAINT outbox_device_token_is_apns_fcm_or_webpush,
    DROP CONSTRAINT outbox_names_a_device_token_or_a_channel_id,
    DROP CONSTRAINT outbox_channel_id_must_be_base64,
    DROP CONSTRAINT outbox_push_type_must_be_known,
    DROP CONSTRAINT outbox_priority_must_be_1_5_or_10,
    DROP CONSTRAINT outbox_collapse_id_must_be_at_most_64_bytes,
    DROP CONSTRAINT outbox_payload_must_be_a_json_object,
    ADD CONSTRAINT outbox_row_is_valid
        CHECK (pgpushd.outbox_row_is_valid(status, device_token, channel_id, push_type,
                                           priority, collapse_id, payload)) NOT VALID;
