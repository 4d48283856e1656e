-- pgpushd schema, version 6: Android. An app may deliver through Firebase Cloud Messaging
-- (`provider = "fcm"` in its config section): its rows carry FCM registration tokens, and
-- a sent row keeps FCM's name for the message.

-- A device token is APNs hex (an even number of hex digits, either case) or an FCM
-- registration token (letters, digits, '-', '_', and the ':' every current token has).
-- Which kind a row's app needs is the daemon's to check: the database does not know the
-- apps' providers. NOT VALID, then VALIDATE: existing rows passed the stricter check this
-- replaces, and validating this way does not block writers while it scans.
ALTER TABLE pgpushd.outbox
    ADD CONSTRAINT outbox_device_token_must_be_apns_hex_or_fcm
        CHECK (device_token ~ '^([0-9A-Fa-f]{2})+$'
               OR (device_token ~ '^[A-Za-z0-9_:-]+$'
                   AND strpos(device_token, ':') > 0
                   AND octet_length(device_token) <= 4096)) NOT VALID;
ALTER TABLE pgpushd.outbox DROP CONSTRAINT outbox_device_token_must_be_even_length_hex;
ALTER TABLE pgpushd.outbox VALIDATE CONSTRAINT outbox_device_token_must_be_apns_hex_or_fcm;

-- FCM's name for a sent message (`projects/P/messages/ID`), as apns_id is APNs's.
ALTER TABLE pgpushd.outbox ADD COLUMN fcm_name text;

-- pgpushd.unregistered_tokens keeps hex tokens in lower case, as before, and FCM tokens
-- as they are: they are case-sensitive.
COMMENT ON COLUMN pgpushd.unregistered_tokens.device_token IS
    'APNs tokens in lower case; FCM registration tokens as FCM issued them';
