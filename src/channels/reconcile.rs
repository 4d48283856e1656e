//! APNs's list of an app's channels against the table's, as a pure function: for a create
//! whose outcome was never written (the channel it may have made is one APNs lists and no
//! row names), and for `pgpushd channels list`, which shows where the two differ.

use std::collections::{BTreeMap, BTreeSet};

use super::outcome::Status;

/// A row of `pgpushd.channels` that names an APNs channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableChannel {
    pub id: i64,
    pub channel_id: String,
    pub status: Status,
}

/// Where APNs's list and the table differ.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Comparison {
    /// Channels APNs has that no row names: made by a create whose outcome was lost and
    /// not yet found, or by something other than pgpushd. Sorted.
    pub unknown: Vec<String>,
    /// Rows the table holds `active` or `closing` whose channel APNs does not list
    /// (deleted behind pgpushd's back, or the capability switched off).
    pub missing: Vec<TableChannel>,
    /// Rows `closed` (or `failed`) whose channel APNs still lists.
    pub lingering: Vec<TableChannel>,
    /// Channels both have, and the table says exist.
    pub agreed: usize,
}

/// Compares APNs's `listed` channel ids with the `table`'s rows of the same app.
pub fn compare(listed: &[String], table: &[TableChannel]) -> Comparison {
    let at_apns: BTreeSet<&str> = listed.iter().map(String::as_str).collect();
    let by_id: BTreeMap<&str, &TableChannel> =
        table.iter().map(|t| (t.channel_id.as_str(), t)).collect();
    let mut c = Comparison {
        unknown: at_apns
            .iter()
            .filter(|id| !by_id.contains_key(*id))
            .map(|id| id.to_string())
            .collect(),
        ..Comparison::default()
    };
    for t in table {
        let exists = matches!(t.status, Status::Active | Status::Closing);
        match (at_apns.contains(t.channel_id.as_str()), exists) {
            (true, true) => c.agreed += 1,
            (false, true) => c.missing.push(t.clone()),
            (true, false) => c.lingering.push(t.clone()),
            (false, false) => {}
        }
    }
    c
}

impl Comparison {
    pub fn differs(&self) -> bool {
        !(self.unknown.is_empty() && self.missing.is_empty() && self.lingering.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, channel_id: &str, status: Status) -> TableChannel {
        TableChannel {
            id,
            channel_id: channel_id.into(),
            status,
        }
    }

    #[test]
    fn each_difference_is_named() {
        let listed: Vec<String> = ["a", "b", "x", "z"].map(String::from).to_vec();
        let table = [
            row(1, "a", Status::Active),
            row(2, "b", Status::Closing),
            row(3, "c", Status::Active),
            row(4, "z", Status::Closed),
            row(5, "d", Status::Closed),
        ];
        let c = compare(&listed, &table);
        assert_eq!(c.unknown, vec!["x".to_owned()]);
        assert_eq!(c.missing, vec![row(3, "c", Status::Active)]);
        assert_eq!(c.lingering, vec![row(4, "z", Status::Closed)]);
        assert_eq!(c.agreed, 2);
        assert!(c.differs());
        let same = compare(&["a".to_owned()], &[row(1, "a", Status::Active)]);
        assert!(!same.differs());
    }
}
