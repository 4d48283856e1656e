//! The `apns-push-type` values and what APNs requires with each, as the emulator reads
//! Apple's "Sending notification requests to APNs": the topic a push type must be sent
//! to, the payload limit, the `apns-priority` values, and the `apns-collapse-id` limit.
//!
//! Written as the emulator's own table, not taken from pgpushd's client: the client has
//! its own rules, and the two meeting in tests is what checks both.
//!
//! | push type      | `apns-topic` Apple asks for                         | payload   |
//! |----------------|-----------------------------------------------------|-----------|
//! | `alert`        | the bundle id                                       | 4096      |
//! | `background`   | the bundle id (priority 5, never 10)                | 4096      |
//! | `location`     | bundle id + `.location-query`                       | 4096      |
//! | `voip`         | bundle id + `.voip`                                 | 5120      |
//! | `complication` | bundle id + `.complication`                         | 4096      |
//! | `fileprovider` | bundle id + `.pushkit.fileprovider`                 | 4096      |
//! | `mdm`          | the MDM topic from the push certificate, as it is   | 4096      |
//! | `liveactivity` | bundle id + `.push-type.liveactivity`               | 4096      |
//! | `pushtotalk`   | bundle id + `.voip-ptt`                             | 4096      |
//! | `widgets`      | bundle id + `.push-type.widgets`                    | 4096      |
//! | `controls`     | bundle id + `.push-type.controls`                   | 4096      |

use std::fmt;

/// "For regular remote notifications, the maximum size is 4KB (4096 bytes)."
pub const MAX_PAYLOAD: usize = 4096;
/// "For Voice over Internet Protocol (VoIP) notifications, the maximum size is 5KB
/// (5120 bytes)."
pub const MAX_PAYLOAD_VOIP: usize = 5120;
/// `apns-collapse-id`: "The value of this key must not exceed 64 bytes."
pub const MAX_COLLAPSE_ID: usize = 64;

/// `apns-priority` 10: send immediately.
pub const PRIORITY_IMMEDIATE: i16 = 10;
/// `apns-priority` 5: send at a time that takes the device's power into account.
pub const PRIORITY_POWER_CONSIDERATE: i16 = 5;
/// `apns-priority` 1: power above all; do not wake the device.
pub const PRIORITY_POWER_FIRST: i16 = 1;

/// A push type APNs knows.
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

/// What `apns-topic` must be for a push type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topic {
    /// The app's bundle id, nothing appended.
    BundleId,
    /// The app's bundle id with this appended.
    Suffixed(&'static str),
    /// The topic of the MDM push certificate (`com.apple.mgmt.External.…`), taken as is.
    Mdm,
}

/// One row of Apple's `apns-push-type` list.
struct Rule {
    push_type: PushType,
    /// The header value.
    name: &'static str,
    topic: Topic,
}

const RULES: [Rule; 11] = [
    Rule {
        push_type: PushType::Alert,
        name: "alert",
        topic: Topic::BundleId,
    },
    Rule {
        push_type: PushType::Background,
        name: "background",
        topic: Topic::BundleId,
    },
    Rule {
        push_type: PushType::Location,
        name: "location",
        topic: Topic::Suffixed(".location-query"),
    },
    Rule {
        push_type: PushType::Voip,
        name: "voip",
        topic: Topic::Suffixed(".voip"),
    },
    Rule {
        push_type: PushType::Complication,
        name: "complication",
        topic: Topic::Suffixed(".complication"),
    },
    Rule {
        push_type: PushType::FileProvider,
        name: "fileprovider",
        topic: Topic::Suffixed(".pushkit.fileprovider"),
    },
    Rule {
        push_type: PushType::Mdm,
        name: "mdm",
        topic: Topic::Mdm,
    },
    Rule {
        push_type: PushType::LiveActivity,
        name: "liveactivity",
        topic: Topic::Suffixed(".push-type.liveactivity"),
    },
    Rule {
        push_type: PushType::PushToTalk,
        name: "pushtotalk",
        topic: Topic::Suffixed(".voip-ptt"),
    },
    Rule {
        push_type: PushType::Widgets,
        name: "widgets",
        topic: Topic::Suffixed(".push-type.widgets"),
    },
    Rule {
        push_type: PushType::Controls,
        name: "controls",
        topic: Topic::Suffixed(".push-type.controls"),
    },
];

impl PushType {
    /// Every push type, in the table's order.
    pub fn all() -> impl Iterator<Item = PushType> {
        RULES.iter().map(|r| r.push_type)
    }

    fn rule(self) -> &'static Rule {
        RULES
            .iter()
            .find(|r| r.push_type == self)
            .expect("every push type has a row")
    }

    /// The push type an `apns-push-type` value names (exactly: lower case, no blanks).
    pub fn from_header(value: &str) -> Option<PushType> {
        RULES.iter().find(|r| r.name == value).map(|r| r.push_type)
    }

    /// The `apns-push-type` value.
    pub fn name(self) -> &'static str {
        self.rule().name
    }

    /// What must follow the bundle id in `apns-topic`; `None` when the topic is the
    /// bundle id itself (or, for `mdm`, the MDM topic).
    pub fn topic_suffix(self) -> Option<&'static str> {
        match self.rule().topic {
            Topic::Suffixed(suffix) => Some(suffix),
            Topic::BundleId | Topic::Mdm => None,
        }
    }

    /// Whether APNs takes a request of this push type to `topic`: a suffixed push type
    /// needs its suffix after a non-empty bundle id; the others must not carry any push
    /// type's suffix (that topic belongs to another service).
    pub fn topic_matches(self, topic: &str) -> bool {
        if topic.is_empty() {
            return false;
        }
        match self.topic_suffix() {
            Some(suffix) => topic.len() > suffix.len() && topic.ends_with(suffix),
            None => !RULES.iter().any(|r| match r.topic {
                Topic::Suffixed(suffix) => topic.ends_with(suffix),
                Topic::BundleId | Topic::Mdm => false,
            }),
        }
    }

    /// The payload limit in bytes.
    pub fn max_payload(self) -> usize {
        match self {
            PushType::Voip => MAX_PAYLOAD_VOIP,
            _ => MAX_PAYLOAD,
        }
    }

    /// The priority applied when `apns-priority` is absent: "If you omit this header,
    /// APNs sets the notification priority to 10", whatever the push type. A background
    /// push without the header is therefore at 10, which [`Self::allows_priority`]
    /// refuses.
    pub fn default_priority(self) -> i16 {
        PRIORITY_IMMEDIATE
    }

    /// Whether `apns-priority: priority` is accepted with this push type. Apple lists
    /// 10, 5 and 1, and "it's an error to specify priority 10 for a background
    /// notification".
    pub fn allows_priority(self, priority: i16) -> bool {
        match priority {
            PRIORITY_IMMEDIATE => self != PushType::Background,
            PRIORITY_POWER_CONSIDERATE | PRIORITY_POWER_FIRST => true,
            _ => false,
        }
    }
}

impl fmt::Display for PushType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_push_type_has_one_row_and_its_name_reads_back() {
        assert_eq!(PushType::all().count(), 11);
        for p in PushType::all() {
            assert_eq!(PushType::from_header(p.name()), Some(p));
        }
        for bad in ["Alert", "alert ", "", "loud", "voip-ptt"] {
            assert_eq!(PushType::from_header(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn topics_as_apple_lists_them() {
        let cases = [
            ("alert", "com.example.app"),
            ("background", "com.example.app"),
            ("location", "com.example.app.location-query"),
            ("voip", "com.example.app.voip"),
            ("complication", "com.example.app.complication"),
            ("fileprovider", "com.example.app.pushkit.fileprovider"),
            (
                "mdm",
                "com.apple.mgmt.External.0c5b2d5a-3a2c-4d2b-9f40-6d5c1e3e1a11",
            ),
            ("liveactivity", "com.example.app.push-type.liveactivity"),
            ("pushtotalk", "com.example.app.voip-ptt"),
            ("widgets", "com.example.app.push-type.widgets"),
            ("controls", "com.example.app.push-type.controls"),
        ];
        for (name, topic) in cases {
            let p = PushType::from_header(name).unwrap();
            assert!(p.topic_matches(topic), "{name} to {topic}");
            if p.topic_suffix().is_some() {
                assert!(
                    !p.topic_matches("com.example.app"),
                    "{name} to the bundle id"
                );
            }
        }
        assert!(!PushType::Alert.topic_matches("com.example.app.voip"));
        assert!(!PushType::Mdm.topic_matches("com.example.app.voip"));
        assert!(!PushType::Voip.topic_matches(".voip"));
        assert!(!PushType::Alert.topic_matches(""));
        // `.voip-ptt` is not `.voip`.
        assert!(!PushType::Voip.topic_matches("com.example.app.voip-ptt"));
    }

    #[test]
    fn limits_and_priorities() {
        assert_eq!(PushType::Voip.max_payload(), 5120);
        for p in PushType::all().filter(|p| *p != PushType::Voip) {
            assert_eq!(p.max_payload(), 4096, "{p}");
        }
        assert_eq!(MAX_COLLAPSE_ID, 64);
        assert!(!PushType::Background.allows_priority(10));
        assert!(PushType::Background.allows_priority(5));
        assert!(PushType::Background.allows_priority(1));
        assert!(PushType::Alert.allows_priority(10));
        for bad in [0, 2, 7, 11, -5] {
            assert!(!PushType::Alert.allows_priority(bad), "{bad}");
        }
        // Absent means 10 for every type, so a background push must carry 5 (or 1).
        assert_eq!(PushType::Background.default_priority(), 10);
    }
}
