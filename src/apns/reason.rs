//! Apple's `reason` strings: why APNs refused a request, as the provider API names them.
//!
//! An enum with an [`Reason::Other`] arm, so a reason Apple adds later is kept verbatim
//! (in `last_error`, in logs) instead of being lost.

/// The `reason` strings of the provider API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    // 400
    #[error("BadCollapseId")]
    BadCollapseId,
    #[error("BadDeviceToken")]
    BadDeviceToken,
    #[error("BadExpirationDate")]
    BadExpirationDate,
    #[error("BadMessageId")]
    BadMessageId,
    #[error("BadPriority")]
    BadPriority,
    #[error("BadTopic")]
    BadTopic,
    #[error("DeviceTokenNotForTopic")]
    DeviceTokenNotForTopic,
    #[error("DuplicateHeaders")]
    DuplicateHeaders,
    #[error("IdleTimeout")]
    IdleTimeout,
    #[error("InvalidPushType")]
    InvalidPushType,
    #[error("MissingDeviceToken")]
    MissingDeviceToken,
    #[error("MissingTopic")]
    MissingTopic,
    #[error("PayloadEmpty")]
    PayloadEmpty,
    #[error("TopicDisallowed")]
    TopicDisallowed,
    // 400, broadcast channels
    #[error("FeatureNotEnabled")]
    FeatureNotEnabled,
    /// What the live service answers for [`Reason::FeatureNotEnabled`].
    #[error("BroadcastFeatureNotEnabled")]
    BroadcastFeatureNotEnabled,
    #[error("MissingChannelId")]
    MissingChannelId,
    #[error("BadChannelId")]
    BadChannelId,
    #[error("ChannelNotRegistered")]
    ChannelNotRegistered,
    #[error("BadRequestParams")]
    BadRequestParams,
    #[error("BadRequestPayload")]
    BadRequestPayload,
    #[error("MissingPushType")]
    MissingPushType,
    #[error("CannotCreateChannelConfig")]
    CannotCreateChannelConfig,
    // 403
    #[error("BadCertificate")]
    BadCertificate,
    #[error("BadCertificateEnvironment")]
    BadCertificateEnvironment,
    #[error("ExpiredProviderToken")]
    ExpiredProviderToken,
    #[error("Forbidden")]
    Forbidden,
    #[error("InvalidProviderToken")]
    InvalidProviderToken,
    #[error("MissingProviderToken")]
    MissingProviderToken,
    #[error("UnrelatedKeyIdInToken")]
    UnrelatedKeyIdInToken,
    #[error("BadEnvironmentKeyInToken")]
    BadEnvironmentKeyInToken,
    #[error("TopicMismatch")]
    TopicMismatch,
    // 404, 405
    #[error("BadPath")]
    BadPath,
    #[error("MethodNotAllowed")]
    MethodNotAllowed,
    // 410
    #[error("ExpiredToken")]
    ExpiredToken,
    #[error("Unregistered")]
    Unregistered,
    // 413
    #[error("PayloadTooLarge")]
    PayloadTooLarge,
    // 429
    #[error("TooManyProviderTokenUpdates")]
    TooManyProviderTokenUpdates,
    #[error("TooManyRequests")]
    TooManyRequests,
    // 500, 503
    #[error("InternalServerError")]
    InternalServerError,
    #[error("ServiceUnavailable")]
    ServiceUnavailable,
    #[error("Shutdown")]
    Shutdown,
    /// A reason this code does not know (yet), or a description when there was none.
    #[error("{0}")]
    Other(String),
}

impl Reason {
    pub const KNOWN: [Reason; 42] = [
        Reason::BadCollapseId,
        Reason::BadDeviceToken,
        Reason::BadExpirationDate,
        Reason::BadMessageId,
        Reason::BadPriority,
        Reason::BadTopic,
        Reason::DeviceTokenNotForTopic,
        Reason::DuplicateHeaders,
        Reason::IdleTimeout,
        Reason::InvalidPushType,
        Reason::MissingDeviceToken,
        Reason::MissingTopic,
        Reason::PayloadEmpty,
        Reason::TopicDisallowed,
        Reason::FeatureNotEnabled,
        Reason::BroadcastFeatureNotEnabled,
        Reason::MissingChannelId,
        Reason::BadChannelId,
        Reason::ChannelNotRegistered,
        Reason::BadRequestParams,
        Reason::BadRequestPayload,
        Reason::MissingPushType,
        Reason::CannotCreateChannelConfig,
        Reason::BadCertificate,
        Reason::BadCertificateEnvironment,
        Reason::ExpiredProviderToken,
        Reason::Forbidden,
        Reason::InvalidProviderToken,
        Reason::MissingProviderToken,
        Reason::UnrelatedKeyIdInToken,
        Reason::BadEnvironmentKeyInToken,
        Reason::TopicMismatch,
        Reason::BadPath,
        Reason::MethodNotAllowed,
        Reason::ExpiredToken,
        Reason::Unregistered,
        Reason::PayloadTooLarge,
        Reason::TooManyProviderTokenUpdates,
        Reason::TooManyRequests,
        Reason::InternalServerError,
        Reason::ServiceUnavailable,
        Reason::Shutdown,
    ];

    pub fn parse(s: &str) -> Reason {
        if s == "Service Unavailable" {
            return Reason::ServiceUnavailable; // so Apple's table spells it for channels
        }
        Reason::KNOWN
            .into_iter()
            .find(|r| r.to_string() == s)
            .unwrap_or_else(|| Reason::Other(s.to_owned()))
    }

    /// The reasons that say the app's credentials (certificate or provider token) are
    /// refused: every row of the app would get the same answer, so no row is to blame.
    pub fn is_credential_problem(&self) -> bool {
        matches!(
            self,
            Reason::BadCertificate
                | Reason::BadCertificateEnvironment
                | Reason::Forbidden
                | Reason::InvalidProviderToken
                | Reason::MissingProviderToken
                | Reason::UnrelatedKeyIdInToken
                | Reason::BadEnvironmentKeyInToken
                | Reason::TopicMismatch
        )
    }

    /// Apple's explanation, for `last_error` and logs.
    pub fn description(&self) -> &str {
        match self {
            Reason::BadCollapseId => "the collapse identifier exceeds the maximum allowed size",
            Reason::BadDeviceToken => "the device token is invalid (or for the other environment)",
            Reason::BadExpirationDate => "the apns-expiration value is invalid",
            Reason::BadMessageId => "the apns-id value is invalid",
            Reason::BadPriority => "the apns-priority value is invalid",
            Reason::BadTopic => "the apns-topic value is invalid",
            Reason::DeviceTokenNotForTopic => "the device token does not match the topic",
            Reason::DuplicateHeaders => "one or more headers are repeated",
            Reason::IdleTimeout => "idle timeout",
            Reason::InvalidPushType => "the apns-push-type value is invalid",
            Reason::MissingDeviceToken => "the device token is not in the request path",
            Reason::MissingTopic => "the apns-topic header is required and missing",
            Reason::PayloadEmpty => "the payload is empty",
            Reason::TopicDisallowed => "pushing to this topic is not allowed",
            Reason::FeatureNotEnabled | Reason::BroadcastFeatureNotEnabled => {
                "broadcast is not enabled for this bundle id (its Broadcast Capability, under \
                 Push Notifications in the developer account)"
            }
            Reason::MissingChannelId => "the apns-channel-id header is missing",
            Reason::BadChannelId => {
                "the channel id is malformed or too long, or APNs never made it"
            }
            Reason::ChannelNotRegistered => "the channel does not exist (it was deleted)",
            Reason::BadRequestParams => "the request has an attribute APNs does not know",
            Reason::BadRequestPayload => "the request's JSON cannot be parsed",
            Reason::MissingPushType => "the push type is missing",
            Reason::CannotCreateChannelConfig => {
                "the app has reached APNs's limit of channels (10,000 per environment): \
                 delete channels it no longer uses"
            }
            Reason::BadCertificate => "the certificate is invalid",
            Reason::BadCertificateEnvironment => "the certificate is for the wrong environment",
            Reason::ExpiredProviderToken => "the provider token is stale",
            Reason::Forbidden => "the specified action is not allowed",
            Reason::InvalidProviderToken => {
                "the provider token is not valid, or its signature cannot be verified"
            }
            Reason::MissingProviderToken => "no provider certificate or provider token",
            Reason::UnrelatedKeyIdInToken => {
                "the key id in the provider token is unrelated to this connection"
            }
            Reason::BadEnvironmentKeyInToken => {
                "the key in the provider token is for the wrong environment"
            }
            Reason::TopicMismatch => {
                "the bundle ids of the token or certificate do not include the path's"
            }
            Reason::BadPath => "the request path is invalid",
            Reason::MethodNotAllowed => "the request method is not POST",
            Reason::ExpiredToken => "the device token has expired",
            Reason::Unregistered => "the device token is inactive for the topic",
            Reason::PayloadTooLarge => "the payload is too large",
            Reason::TooManyProviderTokenUpdates => "the provider token is being updated too often",
            Reason::TooManyRequests => "too many requests to the same device token or channel",
            Reason::InternalServerError => "internal server error",
            Reason::ServiceUnavailable => "the service is unavailable",
            Reason::Shutdown => "APNs is shutting down",
            Reason::Other(_) => "",
        }
    }

    /// `Reason: description (HTTP status)`, or `Reason (HTTP status)` for unknown ones.
    pub fn explain(&self, status: u16) -> String {
        match self.description() {
            "" => format!("{self} (HTTP {status})"),
            d => format!("{self}: {d} (HTTP {status})"),
        }
    }
}
