//! Live Activity broadcast channels (iOS 18): one request to APNs reaches every device
//! subscribed to a channel. Channels live in `pgpushd.channels`, as notifications live in
//! the outbox: an application INSERTs one and reads its `channel_id` back once the daemon
//! has created it at APNs's channel management API; it asks for one to be deleted by
//! setting `status = 'closing'`. A broadcast is an outbox row naming a `channel_id`.
//!
//! - [`keeper`]: the daemon's loop that creates and deletes channels at APNs, and writes
//!   the outcome back;
//! - [`outcome`]: pure: what an answer of the management API makes of a channel's row;
//! - [`reconcile`]: pure: APNs's list of channels against the table's, for a create
//!   whose outcome was never written (adopt what it made) and for `pgpushd channels list`;
//! - the SQL is `outbox::channels`'s; the requests are `apns::channels`'s.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

pub mod keeper;
pub mod outcome;
pub mod reconcile;

/// Apple's limit of channels per app and environment.
pub const MAX_CHANNELS: usize = 10_000;

/// A channel's message storage policy at APNs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageStorage {
    /// APNs keeps nothing: a device that subscribes later sees nothing until the next
    /// broadcast (`message-storage-policy` 0). Its broadcasts must not carry an expiration.
    None,
    /// APNs keeps the most recent broadcast for devices that subscribe later
    /// (`message-storage-policy` 1).
    MostRecent,
}

impl MessageStorage {
    /// As the table spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStorage::None => "none",
            MessageStorage::MostRecent => "most-recent",
        }
    }

    /// APNs's `message-storage-policy`.
    pub fn policy(self) -> u8 {
        match self {
            MessageStorage::None => 0,
            MessageStorage::MostRecent => 1,
        }
    }

    pub fn from_policy(policy: u64) -> Option<MessageStorage> {
        match policy {
            0 => Some(MessageStorage::None),
            1 => Some(MessageStorage::MostRecent),
            _ => None,
        }
    }
}

impl FromStr for MessageStorage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(MessageStorage::None),
            "most-recent" => Ok(MessageStorage::MostRecent),
            other => Err(format!(
                "message storage {other:?} is not \"none\" or \"most-recent\""
            )),
        }
    }
}

impl fmt::Display for MessageStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One request to APNs's channel management API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelOp {
    /// `POST /1/apps/{bundle id}/channels`.
    Create(MessageStorage),
    /// `GET /1/apps/{bundle id}/channels` with `apns-channel-id`.
    Read(String),
    /// `DELETE /1/apps/{bundle id}/channels` with `apns-channel-id`.
    Delete(String),
    /// `GET /1/apps/{bundle id}/all-channels`.
    List,
}

/// What APNs answered a [`ChannelOp`] with, when it did what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelReply {
    Created { channel_id: String },
    Read(MessageStorage),
    Deleted,
    Listed(Vec<String>),
}

/// Why a [`ChannelOp`] did not happen, as what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelError {
    /// The channel does not exist at APNs (`ChannelNotRegistered`, `BadChannelId`): for a
    /// delete, it is gone already.
    NoSuchChannel(String),
    /// Refused for good (a bad request, a bundle id that is not the app's, ...).
    Rejected(String),
    /// The request went out and no answer came: it may have been done. A create is then
    /// looked for at APNs before it is made again.
    NoAnswer(String),
    /// Try again later, counting the attempt (5xx, 429, no answer); `after` is APNs's
    /// `Retry-After`, when it said.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// Not the channel's fault (credentials refused, the app's broadcast capability off,
    /// APNs unreachable, the app not loaded here): try again after `after` without
    /// counting an attempt.
    Deferred { reason: String, after: Duration },
}

impl ChannelError {
    pub fn reason(&self) -> &str {
        match self {
            ChannelError::NoSuchChannel(r)
            | ChannelError::Rejected(r)
            | ChannelError::NoAnswer(r) => r,
            ChannelError::Retry { reason, .. } | ChannelError::Deferred { reason, .. } => reason,
        }
    }
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

pub type ChannelAnswer = Result<ChannelReply, ChannelError>;
