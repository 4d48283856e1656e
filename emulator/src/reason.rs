//! The `reason` strings APNs answers with, and the status each comes with.
//!
//! Apple's lists ("Handling notification responses from APNs", and for broadcast
//! channels "Handling error responses from APNs"). The emulator produces most
//! of them from what it validates; the rest (`IdleTimeout`, `Forbidden`, `Shutdown`, ...)
//! only through [`Emulator::script`](super::Emulator::script), so clients can test how they
//! handle them.

pub const BAD_COLLAPSE_ID: &str = "BadCollapseId";
pub const BAD_DEVICE_TOKEN: &str = "BadDeviceToken";
pub const BAD_EXPIRATION_DATE: &str = "BadExpirationDate";
pub const BAD_MESSAGE_ID: &str = "BadMessageId";
pub const BAD_PRIORITY: &str = "BadPriority";
pub const BAD_TOPIC: &str = "BadTopic";
pub const DEVICE_TOKEN_NOT_FOR_TOPIC: &str = "DeviceTokenNotForTopic";
pub const DUPLICATE_HEADERS: &str = "DuplicateHeaders";
pub const IDLE_TIMEOUT: &str = "IdleTimeout";
pub const INVALID_PUSH_TYPE: &str = "InvalidPushType";
pub const MISSING_DEVICE_TOKEN: &str = "MissingDeviceToken";
pub const MISSING_TOPIC: &str = "MissingTopic";
pub const PAYLOAD_EMPTY: &str = "PayloadEmpty";
pub const TOPIC_DISALLOWED: &str = "TopicDisallowed";
pub const BAD_CERTIFICATE: &str = "BadCertificate";
pub const BAD_CERTIFICATE_ENVIRONMENT: &str = "BadCertificateEnvironment";
pub const EXPIRED_PROVIDER_TOKEN: &str = "ExpiredProviderToken";
pub const FORBIDDEN: &str = "Forbidden";
pub const INVALID_PROVIDER_TOKEN: &str = "InvalidProviderToken";
pub const MISSING_PROVIDER_TOKEN: &str = "MissingProviderToken";
pub const UNRELATED_KEY_ID_IN_TOKEN: &str = "UnrelatedKeyIdInToken";
pub const BAD_ENVIRONMENT_KEY_IN_TOKEN: &str = "BadEnvironmentKeyInToken";
pub const BAD_PATH: &str = "BadPath";
pub const METHOD_NOT_ALLOWED: &str = "MethodNotAllowed";
pub const EXPIRED_TOKEN: &str = "ExpiredToken";
pub const UNREGISTERED: &str = "Unregistered";
pub const PAYLOAD_TOO_LARGE: &str = "PayloadTooLarge";
pub const TOO_MANY_PROVIDER_TOKEN_UPDATES: &str = "TooManyProviderTokenUpdates";
pub const TOO_MANY_REQUESTS: &str = "TooManyRequests";
pub const INTERNAL_SERVER_ERROR: &str = "InternalServerError";
pub const SERVICE_UNAVAILABLE: &str = "ServiceUnavailable";
pub const SHUTDOWN: &str = "Shutdown";

// Broadcast channels: the management API and broadcast publishing.
pub const BAD_CHANNEL_ID: &str = "BadChannelId";
pub const BAD_REQUEST_PARAMS: &str = "BadRequestParams";
pub const BAD_REQUEST_PAYLOAD: &str = "BadRequestPayload";
pub const CANNOT_CREATE_CHANNEL_CONFIG: &str = "CannotCreateChannelConfig";
pub const CHANNEL_NOT_REGISTERED: &str = "ChannelNotRegistered";
/// Apple's name for an app without the broadcast capability.
pub const FEATURE_NOT_ENABLED: &str = "FeatureNotEnabled";
/// What the live service answers instead of [`FEATURE_NOT_ENABLED`] (not in Apple's
/// table; only scripted).
pub const BROADCAST_FEATURE_NOT_ENABLED: &str = "BroadcastFeatureNotEnabled";
pub const MISSING_CHANNEL_ID: &str = "MissingChannelId";
pub const MISSING_PUSH_TYPE: &str = "MissingPushType";
pub const TOPIC_MISMATCH: &str = "TopicMismatch";

/// Every documented reason with its status (and the one seen live,
/// [`BROADCAST_FEATURE_NOT_ENABLED`]).
pub const ALL: &[(u16, &str)] = &[
    (400, BAD_COLLAPSE_ID),
    (400, BAD_DEVICE_TOKEN),
    (400, BAD_EXPIRATION_DATE),
    (400, BAD_MESSAGE_ID),
    (400, BAD_PRIORITY),
    (400, BAD_TOPIC),
    (400, DEVICE_TOKEN_NOT_FOR_TOPIC),
    (400, DUPLICATE_HEADERS),
    (400, IDLE_TIMEOUT),
    (400, INVALID_PUSH_TYPE),
    (400, MISSING_DEVICE_TOKEN),
    (400, MISSING_TOPIC),
    (400, PAYLOAD_EMPTY),
    (400, TOPIC_DISALLOWED),
    (403, BAD_CERTIFICATE),
    (403, BAD_CERTIFICATE_ENVIRONMENT),
    (403, EXPIRED_PROVIDER_TOKEN),
    (403, FORBIDDEN),
    (403, INVALID_PROVIDER_TOKEN),
    (403, MISSING_PROVIDER_TOKEN),
    (403, UNRELATED_KEY_ID_IN_TOKEN),
    (403, BAD_ENVIRONMENT_KEY_IN_TOKEN),
    (404, BAD_PATH),
    (405, METHOD_NOT_ALLOWED),
    (410, EXPIRED_TOKEN),
    (410, UNREGISTERED),
    (413, PAYLOAD_TOO_LARGE),
    (429, TOO_MANY_PROVIDER_TOKEN_UPDATES),
    (429, TOO_MANY_REQUESTS),
    (500, INTERNAL_SERVER_ERROR),
    (503, SERVICE_UNAVAILABLE),
    (503, SHUTDOWN),
    (400, BAD_CHANNEL_ID),
    (400, BAD_REQUEST_PARAMS),
    (400, BAD_REQUEST_PAYLOAD),
    (400, CANNOT_CREATE_CHANNEL_CONFIG),
    (400, CHANNEL_NOT_REGISTERED),
    (400, FEATURE_NOT_ENABLED),
    (400, BROADCAST_FEATURE_NOT_ENABLED),
    (400, MISSING_CHANNEL_ID),
    (400, MISSING_PUSH_TYPE),
    (403, TOPIC_MISMATCH),
];

/// The status Apple documents for `reason`, if it is one of [`ALL`].
pub fn status_of(reason: &str) -> Option<u16> {
    ALL.iter().find(|(_, r)| *r == reason).map(|(s, _)| *s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_unique_and_statuses_known() {
        for (i, (status, reason)) in ALL.iter().enumerate() {
            assert!(ALL[i + 1..].iter().all(|(_, r)| r != reason), "{reason}");
            assert_eq!(status_of(reason), Some(*status));
        }
        assert_eq!(status_of("Nope"), None);
    }
}
