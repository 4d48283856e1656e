//! What becomes of a channel's row, as pure functions: what to do for a row the keeper
//! claimed ([`Step`]), and what the answer makes of it ([`ChannelUpdate`]).
//!
//! A row is written back only under the lease its claim took, and the application may
//! have asked for the channel to close meanwhile (its UPDATE does not wait for a lease):
//! so an update says what the row becomes both ways, and the statement picks by the
//! row's status then.

use std::fmt;
use std::time::Duration;

use super::{ChannelAnswer, ChannelError, ChannelReply, MessageStorage};
use crate::backoff::backoff;
use crate::config::RetryConfig;
use crate::outcome::MAX_RETRY_AFTER;

/// A channel's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Active,
    Failed,
    Closing,
    Closed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Active => "active",
            Status::Failed => "failed",
            Status::Closing => "closing",
            Status::Closed => "closed",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        [
            Status::Pending,
            Status::Active,
            Status::Failed,
            Status::Closing,
            Status::Closed,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A channel's row as the keeper claimed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedChannel {
    pub id: i64,
    pub app: String,
    pub storage: MessageStorage,
    /// `Pending` or `Closing`.
    pub status: Status,
    pub channel_id: Option<String>,
    pub attempts: i32,
    /// A create's lease had run out with no outcome written: the daemon that held it
    /// died, maybe after APNs made the channel.
    pub uncertain: bool,
}

/// What to do for a claimed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Make the channel at APNs.
    Create(MessageStorage),
    /// Delete it at APNs.
    Delete(String),
    /// Asked to close before it was ever made: closed, no request.
    Close,
    /// An earlier create may have made it: look for it at APNs before anything else.
    Find(MessageStorage),
}

/// The step for `c`.
pub fn step(c: &ClaimedChannel) -> Step {
    match (&c.channel_id, c.status, c.uncertain) {
        (Some(id), _, _) => Step::Delete(id.clone()),
        (None, _, true) => Step::Find(c.storage),
        (None, Status::Closing, false) => Step::Close,
        (None, _, false) => Step::Create(c.storage),
    }
}

/// The write-back for one claimed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelUpdate {
    pub id: i64,
    /// What the row becomes while its status is still what the claim saw...
    pub status: Status,
    /// ...and what it becomes if the application set it to `closing` meanwhile.
    pub if_closing: Status,
    /// APNs's id, once made (or found).
    pub channel_id: Option<String>,
    pub last_error: Option<String>,
    /// When to take the next step, from now (`None`: as it is).
    pub retry_in: Option<Duration>,
    /// A request that may have done something was made: it counts against `max_attempts`.
    pub attempted: bool,
    /// The row stays uncertain: its lost create's channel was not looked for to the end
    /// (the look was deferred), so the next claim looks again before any create.
    pub uncertain: bool,
}

impl ChannelUpdate {
    fn new(c: &ClaimedChannel, status: Status) -> ChannelUpdate {
        ChannelUpdate {
            id: c.id,
            status,
            if_closing: if status == Status::Active {
                Status::Closing
            } else {
                status
            },
            channel_id: None,
            last_error: None,
            retry_in: None,
            attempted: true,
            uncertain: false,
        }
    }
}

/// What the keeper writes for a claimed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Update(ChannelUpdate),
    /// A create went out and got no answer: APNs may have made the channel. The lease
    /// ends soon (the keeper's `UNSURE_WAIT`), and the claim after that finds the row
    /// uncertain and looks for it ([`Step::Find`]) before making another.
    Unsure {
        id: i64,
        reason: String,
    },
}

/// What a create's (or a find's) answer makes of `c`.
pub fn created(c: &ClaimedChannel, answer: &ChannelAnswer, retry: &RetryConfig) -> Write {
    if let Err(ChannelError::NoAnswer(reason)) = answer {
        return Write::Unsure {
            id: c.id,
            reason: reason.clone(),
        };
    }
    Write::Update(created_update(c, answer, retry))
}

fn created_update(
    c: &ClaimedChannel,
    answer: &ChannelAnswer,
    retry: &RetryConfig,
) -> ChannelUpdate {
    match answer {
        Ok(ChannelReply::Created { channel_id }) => ChannelUpdate {
            channel_id: Some(channel_id.clone()),
            ..ChannelUpdate::new(c, Status::Active)
        },
        Ok(other) => failed(c, format!("APNs answered a create with {other:?}")),
        Err(ChannelError::Rejected(reason) | ChannelError::NoSuchChannel(reason)) => {
            failed(c, reason.clone())
        }
        Err(ChannelError::NoAnswer(reason)) => {
            unreachable!("created() keeps {reason:?} from this")
        }
        Err(ChannelError::Retry { reason, after }) => {
            if c.attempts as u32 + 1 >= retry.max_attempts {
                return failed(
                    c,
                    format!("{reason} (gave up after {} attempts)", c.attempts + 1),
                );
            }
            ChannelUpdate {
                last_error: Some(reason.clone()),
                retry_in: Some(wait(c.attempts, *after, retry)),
                // Asked to close meanwhile: nothing was made, so it is closed next.
                if_closing: Status::Closing,
                ..ChannelUpdate::new(c, Status::Pending)
            }
        }
        Err(ChannelError::Deferred { reason, after }) => deferred(c, reason, *after),
    }
}

/// What a delete's answer makes of `c`: closed once APNs has no such channel, else it
/// stays `closing` (a close is never given up: the channel counts against Apple's limit
/// until it is gone).
pub fn deleted(c: &ClaimedChannel, answer: &ChannelAnswer, retry: &RetryConfig) -> ChannelUpdate {
    match answer {
        Ok(ChannelReply::Deleted) | Err(ChannelError::NoSuchChannel(_)) => {
            ChannelUpdate::new(c, Status::Closed)
        }
        Ok(other) => closing(
            c,
            format!("APNs answered a delete with {other:?}"),
            None,
            retry,
        ),
        Err(ChannelError::Retry { reason, after }) => closing(c, reason.clone(), *after, retry),
        // A delete is asked again: a second one of a deleted channel answers BadPath.
        Err(ChannelError::NoAnswer(reason)) => closing(c, reason.clone(), None, retry),
        Err(ChannelError::Rejected(reason)) => {
            closing(c, reason.clone(), Some(retry.backoff_max), retry)
        }
        Err(ChannelError::Deferred { reason, after }) => deferred(c, reason, *after),
    }
}

/// A row asked to close before it was made: closed without a request.
pub fn closed_unmade(c: &ClaimedChannel) -> ChannelUpdate {
    ChannelUpdate {
        attempted: false,
        ..ChannelUpdate::new(c, Status::Closed)
    }
}

/// An uncertain create, once APNs's list showed nothing it could have made: the lost
/// attempt counts, and the row is made again (or, asked to close, closed).
pub fn not_found(c: &ClaimedChannel, retry: &RetryConfig) -> ChannelUpdate {
    if c.status == Status::Closing {
        return ChannelUpdate::new(c, Status::Closed);
    }
    if c.attempts as u32 + 1 >= retry.max_attempts {
        return failed(
            c,
            format!(
                "gave up after {} attempts (the last one's daemon stopped before its answer \
                 was written, and APNs has no channel it could have made)",
                c.attempts + 1
            ),
        );
    }
    ChannelUpdate {
        if_closing: Status::Closed,
        ..ChannelUpdate::new(c, Status::Pending)
    }
}

/// Nothing done; the row's step is taken again after `after`, no attempt counted. An
/// uncertain row stays uncertain: what its lost create made is still to be looked for.
pub fn deferred(c: &ClaimedChannel, reason: &str, after: Duration) -> ChannelUpdate {
    ChannelUpdate {
        last_error: Some(reason.to_owned()),
        retry_in: Some(after.min(MAX_RETRY_AFTER)),
        attempted: false,
        uncertain: c.uncertain,
        if_closing: Status::Closing,
        ..ChannelUpdate::new(c, c.status)
    }
}

fn failed(c: &ClaimedChannel, reason: String) -> ChannelUpdate {
    ChannelUpdate {
        last_error: Some(reason),
        if_closing: Status::Closed,
        ..ChannelUpdate::new(c, Status::Failed)
    }
}

fn closing(
    c: &ClaimedChannel,
    reason: String,
    after: Option<Duration>,
    retry: &RetryConfig,
) -> ChannelUpdate {
    ChannelUpdate {
        last_error: Some(reason),
        retry_in: Some(wait(c.attempts, after, retry)),
        ..ChannelUpdate::new(c, Status::Closing)
    }
}

/// The backoff after attempt `attempts + 1`, or APNs's `Retry-After` when longer.
fn wait(attempts: i32, after: Option<Duration>, retry: &RetryConfig) -> Duration {
    let backoff = backoff(
        attempts.max(0) as u32,
        retry.backoff_base,
        retry.backoff_max,
    );
    after.map_or(backoff, |a| a.min(MAX_RETRY_AFTER).max(backoff))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry() -> RetryConfig {
        RetryConfig {
            max_attempts: 3,
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(60),
        }
    }

    fn claimed(status: Status, channel_id: Option<&str>, uncertain: bool) -> ClaimedChannel {
        ClaimedChannel {
            id: 1,
            app: "default".into(),
            storage: MessageStorage::MostRecent,
            status,
            channel_id: channel_id.map(str::to_owned),
            attempts: 0,
            uncertain,
        }
    }

    #[test]
    fn each_claimed_row_has_its_step() {
        let s = MessageStorage::MostRecent;
        assert_eq!(
            step(&claimed(Status::Pending, None, false)),
            Step::Create(s)
        );
        assert_eq!(step(&claimed(Status::Pending, None, true)), Step::Find(s));
        assert_eq!(step(&claimed(Status::Closing, None, true)), Step::Find(s));
        assert_eq!(step(&claimed(Status::Closing, None, false)), Step::Close);
        assert_eq!(
            step(&claimed(Status::Closing, Some("c1"), true)),
            Step::Delete("c1".into())
        );
    }

    #[test]
    fn a_create_makes_the_channel_active_or_says_why_not() {
        let c = claimed(Status::Pending, None, false);
        let update = |answer: ChannelAnswer| match created(&c, &answer, &retry()) {
            Write::Update(u) => u,
            other => panic!("{other:?}"),
        };
        let made = update(Ok(ChannelReply::Created {
            channel_id: "c1".into(),
        }));
        assert_eq!(
            (made.status, made.if_closing),
            (Status::Active, Status::Closing)
        );
        assert_eq!(made.channel_id.as_deref(), Some("c1"));
        assert!(made.attempted && made.last_error.is_none());

        let refused = update(Err(ChannelError::Rejected("BadRequestPayload".into())));
        assert_eq!(
            (refused.status, refused.if_closing),
            (Status::Failed, Status::Closed)
        );
        assert_eq!(refused.last_error.as_deref(), Some("BadRequestPayload"));

        let again = update(Err(ChannelError::Retry {
            reason: "InternalServerError".into(),
            after: Some(Duration::from_secs(30)),
        }));
        assert_eq!(again.status, Status::Pending);
        assert_eq!(again.retry_in, Some(Duration::from_secs(30)));
        assert!(again.attempted);

        let last = ClaimedChannel {
            attempts: 2,
            ..c.clone()
        };
        let gave_up = created_update(
            &last,
            &Err(ChannelError::Retry {
                reason: "x".into(),
                after: None,
            }),
            &retry(),
        );
        assert_eq!(gave_up.status, Status::Failed);
        assert!(gave_up
            .last_error
            .unwrap()
            .contains("gave up after 3 attempts"));

        let waiting = update(Err(ChannelError::Deferred {
            reason: "InvalidProviderToken".into(),
            after: Duration::from_secs(60),
        }));
        assert_eq!(waiting.status, Status::Pending);
        assert!(!waiting.attempted);
        assert_eq!(waiting.retry_in, Some(Duration::from_secs(60)));

        // No answer: APNs may have made it; looked for before another is made.
        assert_eq!(
            created(&c, &Err(ChannelError::NoAnswer("timeout".into())), &retry()),
            Write::Unsure {
                id: 1,
                reason: "timeout".into()
            }
        );
    }

    #[test]
    fn a_close_is_done_once_apns_has_no_such_channel_and_never_given_up() {
        let c = claimed(Status::Closing, Some("c1"), false);
        assert_eq!(
            deleted(&c, &Ok(ChannelReply::Deleted), &retry()).status,
            Status::Closed
        );
        assert_eq!(
            deleted(
                &c,
                &Err(ChannelError::NoSuchChannel("BadPath".into())),
                &retry()
            )
            .status,
            Status::Closed
        );
        let many = ClaimedChannel {
            attempts: 50,
            ..c.clone()
        };
        let again = deleted(
            &many,
            &Err(ChannelError::Retry {
                reason: "x".into(),
                after: None,
            }),
            &retry(),
        );
        assert_eq!(
            (again.status, again.if_closing),
            (Status::Closing, Status::Closing)
        );
        assert!(again.retry_in.is_some_and(|d| d <= Duration::from_secs(60)));
        assert_eq!(closed_unmade(&c).status, Status::Closed);
        assert!(!closed_unmade(&c).attempted);
    }

    #[test]
    fn an_uncertain_create_with_nothing_at_apns_is_made_again_counting_the_lost_attempt() {
        let c = claimed(Status::Pending, None, true);
        let again = not_found(&c, &retry());
        assert_eq!(
            (again.status, again.if_closing),
            (Status::Pending, Status::Closed)
        );
        assert!(again.attempted && again.retry_in.is_none());
        let closing = claimed(Status::Closing, None, true);
        assert_eq!(not_found(&closing, &retry()).status, Status::Closed);
        let last = ClaimedChannel { attempts: 2, ..c };
        assert_eq!(not_found(&last, &retry()).status, Status::Failed);
    }

    #[test]
    fn a_deferred_look_for_a_lost_create_leaves_the_row_uncertain() {
        let c = claimed(Status::Pending, None, true);
        let waiting = deferred(&c, "list refused", Duration::from_secs(1));
        assert!(waiting.uncertain && !waiting.attempted);
        assert!(!not_found(&c, &retry()).uncertain);
        let plain = claimed(Status::Pending, None, false);
        assert!(!deferred(&plain, "x", Duration::from_secs(1)).uncertain);
    }
}
