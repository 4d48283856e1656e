//! The `apns-push-type` values Apple documents, and the rules that come with each: the
//! topic suffix it requires, its payload limit, the priorities it allows: the client refuses
//! a row that breaks them before sending it. (The emulator states the same rules in its
//! own words, so a mistake here shows up as a disagreement in the tests.)

use std::fmt;
use std::str::FromStr;

/// The payload limit for every push type but VoIP.
pub const MAX_PAYLOAD: usize = 4096;
/// VoIP pushes may be larger.
pub const MAX_PAYLOAD_VOIP: usize = 5120;
/// `apns-collapse-id` may not exceed this many bytes.
pub const MAX_COLLAPSE_ID: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PushType {
    Alert,
    Background,
    Location,
    Voip,
    Complication,
    FileProvider,
    Mdm,
    LiveActivity,
    PushToTalk,
    Widgets,
    Controls,
}

impl PushType {
    pub const ALL: [PushType; 11] = [
        PushType::Alert,
        PushType::Background,
        PushType::Location,
        PushType::Voip,
        PushType::Complication,
        PushType::FileProvider,
        PushType::Mdm,
        PushType::LiveActivity,
        PushType::PushToTalk,
        PushType::Widgets,
        PushType::Controls,
    ];

    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            PushType::Alert => "alert",
            PushType::Background => "background",
            PushType::Location => "location",
            PushType::Voip => "voip",
            PushType::Complication => "complication",
            PushType::FileProvider => "fileprovider",
            PushType::Mdm => "mdm",
            PushType::LiveActivity => "liveactivity",
            PushType::PushToTalk => "pushtotalk",
            PushType::Widgets => "widgets",
            PushType::Controls => "controls",
        }
    }

    /// What Apple requires at the end of `apns-topic` for this push type (appended to the
    /// bundle id). `None`: the bundle id itself (or, for MDM, the certificate's topic).
    pub fn topic_suffix(self) -> Option<&'static str> {
        match self {
            PushType::Alert | PushType::Background | PushType::Mdm => None,
            PushType::Location => Some(".location-query"),
            PushType::Voip => Some(".voip"),
            PushType::Complication => Some(".complication"),
            PushType::FileProvider => Some(".pushkit.fileprovider"),
            PushType::LiveActivity => Some(".push-type.liveactivity"),
            PushType::PushToTalk => Some(".voip-ptt"),
            PushType::Widgets => Some(".push-type.widgets"),
            PushType::Controls => Some(".push-type.controls"),
        }
    }

    pub fn max_payload(self) -> usize {
        match self {
            PushType::Voip => MAX_PAYLOAD_VOIP,
            _ => MAX_PAYLOAD,
        }
    }

    /// The `apns-priority` to send for a row whose `priority` is NULL. Without the header
    /// APNs uses 10, for every push type ("If you omit this header, APNs sets the
    /// notification priority to 10"), and "it's an error to specify priority 10 for a
    /// background notification": background pushes are sent at 5; the others without
    /// the header.
    pub fn priority_when_unset(self) -> Option<i16> {
        match self {
            PushType::Background => Some(5),
            _ => None,
        }
    }

    /// Whether APNs accepts `priority` for this push type.
    pub fn allows_priority(self, priority: i16) -> bool {
        match self {
            // Apple: "it's an error to specify priority 10 for a background notification".
            PushType::Background => priority == 5 || priority == 1,
            _ => matches!(priority, 1 | 5 | 10),
        }
    }

    /// The topic a request carries: `topic` from the row if set, else the app's bundle id
    /// with this push type's suffix. `None` when there is no topic at all.
    pub fn topic_for(self, row_topic: Option<&str>, app_topic: Option<&str>) -> Option<String> {
        match (row_topic, app_topic) {
            (Some(t), _) => Some(t.to_owned()),
            (None, Some(bundle)) => Some(match self.topic_suffix() {
                Some(suffix) if !bundle.ends_with(suffix) => format!("{bundle}{suffix}"),
                _ => bundle.to_owned(),
            }),
            (None, None) => None,
        }
    }

    /// Whether `topic` is one APNs would accept with this push type.
    pub fn topic_matches(self, topic: &str) -> bool {
        if topic.is_empty() {
            return false;
        }
        let suffixed = PushType::ALL
            .iter()
            .filter_map(|p| p.topic_suffix())
            .find(|s| topic.ends_with(s));
        match (self.topic_suffix(), suffixed) {
            (Some(required), _) => topic.ends_with(required) && topic.len() > required.len(),
            // A plain push type to a suffixed topic goes to the wrong service.
            (None, Some(_)) => false,
            (None, None) => true,
        }
    }
}

impl fmt::Display for PushType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown push type {0:?}")]
pub struct UnknownPushType(pub String);

impl FromStr for PushType {
    type Err = UnknownPushType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PushType::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPushType(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in PushType::ALL {
            assert_eq!(p.as_str().parse::<PushType>().unwrap(), p);
        }
        assert!("Alert".parse::<PushType>().is_err());
    }

    #[test]
    fn topics_get_the_suffix_their_push_type_needs() {
        let app = Some("com.example.app");
        assert_eq!(
            PushType::Alert.topic_for(None, app).unwrap(),
            "com.example.app"
        );
        assert_eq!(
            PushType::Voip.topic_for(None, app).unwrap(),
            "com.example.app.voip"
        );
        assert_eq!(
            PushType::LiveActivity.topic_for(None, app).unwrap(),
            "com.example.app.push-type.liveactivity"
        );
        assert_eq!(
            PushType::Voip
                .topic_for(Some("com.other.voip"), app)
                .unwrap(),
            "com.other.voip"
        );
        assert_eq!(PushType::Alert.topic_for(None, None), None);
    }

    #[test]
    fn topic_matching() {
        assert!(PushType::Voip.topic_matches("com.example.app.voip"));
        assert!(!PushType::Voip.topic_matches("com.example.app"));
        assert!(!PushType::Alert.topic_matches("com.example.app.voip"));
        assert!(PushType::Alert.topic_matches("com.example.app"));
        assert!(!PushType::Voip.topic_matches(".voip"));
        assert!(PushType::PushToTalk.topic_matches("com.example.app.voip-ptt"));
    }

    #[test]
    fn limits_and_priorities() {
        assert_eq!(PushType::Voip.max_payload(), 5120);
        assert_eq!(PushType::Alert.max_payload(), 4096);
        assert!(!PushType::Background.allows_priority(10));
        assert!(PushType::Background.allows_priority(5));
        assert!(PushType::Alert.allows_priority(10));
        assert!(!PushType::Alert.allows_priority(7));
        assert_eq!(PushType::Background.priority_when_unset(), Some(5));
        assert_eq!(PushType::Alert.priority_when_unset(), None);
    }
}
