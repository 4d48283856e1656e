//! `pgpushd send`'s result: one push's answer as the service gave it, whatever the
//! service.

use std::fmt;

/// A push service's answer to one push sent without a database.
#[derive(Debug, Clone, PartialEq)]
pub struct OneAnswer {
    pub status: u16,
    /// What the service called the message (APNs's `apns-id`, FCM's `name`, Web Push's
    /// `Location`), under the service's name for it.
    pub id: Option<(&'static str, String)>,
    /// Why not, when the service refused: its reason as it gave it.
    pub reason: Option<String>,
}

impl fmt::Display for OneAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}", self.status)?;
        if let Some(r) = &self.reason {
            write!(f, " {r}")?;
        }
        if let Some((name, id)) = &self.id {
            write!(f, " ({name} {id})")?;
        }
        Ok(())
    }
}
