-- pgpushd schema, version 7: browsers. An app may deliver through Web Push
-- (`provider = "webpush"` in its config section): its rows carry the browser's push
-- subscription, and a sent row keeps the push service's URL for the message.

-- Every statement here takes the outbox's exclusive lock, held until `migrate` commits;
-- none scans the table. Give up after a few seconds rather than queue every INSERT
-- behind a long batch (see 006).
SET LOCAL lock_timeout = '5s';

-- A device token is APNs hex, an FCM registration token (as in version 6), or a Web Push
-- subscription as the browser gives it (`JSON.stringify(subscription)`): a JSON object
-- with an https endpoint and the keys p256dh and auth, of at most 2048 bytes (the
-- browsers' are a few hundred; unregistered_tokens' key must hold it). SQL tells a
-- subscription by its shape only; the daemon parses it and fails a row whose
-- subscription it cannot use, with the reason. NOT VALID, as in 006: every existing row
-- passed the stricter check this replaces.
ALTER TABLE pgpushd.outbox
    ADD CONSTRAINT outbox_device_token_is_apns_fcm_or_webpush
        CHECK (device_token ~ '^([0-9A-Fa-f]{2})+$'
               OR (device_token ~ '^[A-Za-z0-9_:-]+$'
                   AND strpos(device_token, ':') > 0
                   AND octet_length(device_token) <= 1024)
               OR (device_token ~ '^\s*\{'
                   AND octet_length(device_token) <= 2048
                   AND device_token ~ '"endpoint"\s*:\s*"https://'
                   AND device_token ~ '"p256dh"\s*:'
                   AND device_token ~ '"auth"\s*:')) NOT VALID;
ALTER TABLE pgpushd.outbox DROP CONSTRAINT outbox_device_token_must_be_apns_hex_or_fcm;

-- A Web Push service's URL for a sent message (its `Location`), as apns_id and fcm_name
-- are APNs's and FCM's.
ALTER TABLE pgpushd.outbox ADD COLUMN webpush_location text;

COMMENT ON COLUMN pgpushd.unregistered_tokens.device_token IS
    'APNs tokens in lower case; FCM registration tokens as FCM issued them; Web Push subscriptions as the browser gave them';
