-- pgpushd schema, version 6: Android. An app may deliver through Firebase Cloud Messaging
-- (`provider = "fcm"` in its config section): its rows carry FCM registration tokens, and
-- a sent row keeps FCM's name for the message.

-- Every statement here takes the outbox's exclusive lock, held until `migrate` commits:
-- writers and batches wait meanwhile. None scans the table, so that is a moment; but the
-- lock queues behind open batch transactions (up to `max_batch_duration`), and every
-- INSERT would queue behind it. Give up instead after a few seconds, and let the operator
-- run `migrate` again.
SET LOCAL lock_timeout = '5s';

-- A device token is APNs hex (an even number of hex digits, either case) or an FCM
-- registration token (letters, digits, '-', '_', and the ':' every current token has), of
-- at most 1024 bytes (FCM's are about 160; unregistered_tokens' key must hold it). Which
-- kind a row's app needs is the daemon's to check: the database does not know the apps'
-- providers. NOT VALID, and never validated here: validating would scan the whole table
-- under the lock above, and every existing row passed the stricter check this replaces.
ALTER TABLE pgpushd.outbox
    ADD CONSTRAINT outbox_device_token_must_be_apns_hex_or_fcm
        CHECK (device_token ~ '^([0-9A-Fa-f]{2})+$'
               OR (device_token ~ '^[A-Za-z0-9_:-]+$'
                   AND strpos(device_token, ':') > 0
                   AND octet_length(device_token) <= 1024)) NOT VALID;
ALTER TABLE pgpushd.outbox DROP CONSTRAINT outbox_device_token_must_be_even_length_hex;

-- FCM's name for a sent message (`projects/P/messages/ID`), as apns_id is APNs's.
ALTER TABLE pgpushd.outbox ADD COLUMN fcm_name text;

-- pgpushd.unregistered_tokens keeps hex tokens in lower case, as before, and FCM tokens
-- as they are: they are case-sensitive.
COMMENT ON COLUMN pgpushd.unregistered_tokens.device_token IS
    'APNs tokens in lower case; FCM registration tokens as FCM issued them';
