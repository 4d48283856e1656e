//! `pgpushd status` as aligned text tables, for people.

use std::fmt;
use std::time::Duration;

use crate::outbox::status::{AppCounts, StatusReport, ERROR_WINDOW};
use crate::transport::short_token;

impl StatusReport {
    /// The report as text, with device tokens whole (`full_tokens`) or shortened to their
    /// first 8 hex digits, as the logs show them (`Display` shortens them).
    pub fn display(&self, full_tokens: bool) -> impl fmt::Display + '_ {
        Rendered {
            report: self,
            full_tokens,
        }
    }
}

struct Rendered<'a> {
    report: &'a StatusReport,
    full_tokens: bool,
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.display(false).fmt(f)
    }
}

impl fmt::Display for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (report, full_tokens) = (self.report, self.full_tokens);
        writeln!(f, "Rows by app and status")?;
        if report.apps.is_empty() {
            writeln!(f, "  (the outbox is empty)")?;
        } else {
            let mut total = AppCounts {
                app: "(all)".into(),
                ..AppCounts::default()
            };
            let mut rows = Vec::new();
            for a in &report.apps {
                total.pending += a.pending;
                total.due += a.due;
                total.retrying += a.retrying;
                total.sent += a.sent;
                total.failed += a.failed;
                total.expired += a.expired;
                rows.push(counts_row(a));
            }
            if report.apps.len() > 1 {
                rows.push(counts_row(&total));
            }
            table(
                f,
                &[
                    "APP", "PENDING", "DUE", "RETRYING", "SENT", "FAILED", "EXPIRED",
                ],
                &rows,
            )?;
        }
        writeln!(f)?;
        match &report.oldest_due {
            Some(o) => writeln!(
                f,
                "Oldest due row:  id {} (app {}, {} attempt(s)), {}",
                o.id,
                o.app,
                o.attempts,
                if o.overdue == Duration::MAX {
                    "due since -infinity".to_owned()
                } else {
                    format!("due for {}", age(o.overdue))
                }
            )?,
            None => writeln!(f, "Oldest due row:  none, nothing is waiting to be sent")?,
        }
        match report.next_scheduled {
            Some(d) => writeln!(f, "Next scheduled:  due in {}", age(d))?,
            None => writeln!(f, "Next scheduled:  none")?,
        }
        match report.awake_for {
            Some(d) => writeln!(
                f,
                "Wake-up:         a daemon is awake (for {} more unless it finds rows): writers skip NOTIFY",
                age(d)
            )?,
            None => writeln!(f, "Wake-up:         asleep: writers NOTIFY")?,
        }
        match (report.long_batches, report.longest_batch) {
            (n, Some(longest)) if n > 0 => writeln!(
                f,
                "Long batches:    {n} batch transaction(s) (pgpushd-batch) open longer than {}s, the oldest for {}",
                report.long_batch_after.as_secs(),
                age(longest)
            )?,
            _ => writeln!(
                f,
                "Long batches:    none open longer than {}s",
                report.long_batch_after.as_secs()
            )?,
        }
        if report.never_due > 0 {
            writeln!(
                f,
                "Never due:       {} pending row(s) with send_after = infinity",
                report.never_due
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "Most common errors (failed or expired in the last {} hours, or pending a retry)",
            ERROR_WINDOW.as_secs() / 3600
        )?;
        if report.errors.is_empty() {
            writeln!(f, "  (none)")?;
        } else {
            let rows: Vec<Vec<String>> = report
                .errors
                .iter()
                .map(|e| {
                    vec![
                        e.count.to_string(),
                        e.status.clone(),
                        e.app.clone(),
                        shorten(&e.error, 100),
                    ]
                })
                .collect();
            table(f, &["COUNT", "STATUS", "APP", "ERROR"], &rows)?;
        }
        writeln!(f)?;
        writeln!(f, "Unregistered tokens")?;
        if report.unregistered.is_empty() {
            writeln!(f, "  (none)")?;
        } else {
            let rows: Vec<Vec<String>> = report
                .unregistered
                .iter()
                .map(|u| vec![u.app.clone(), u.tokens.to_string(), ago(u.newest)])
                .collect();
            table(f, &["APP", "TOKENS", "NEWEST"], &rows)?;
            writeln!(f)?;
            let rows: Vec<Vec<String>> = report
                .newest_unregistered
                .iter()
                .map(|t| {
                    let token = if full_tokens {
                        &t.device_token
                    } else {
                        short_token(&t.device_token)
                    };
                    vec![t.app.clone(), token.to_owned(), ago(t.ago)]
                })
                .collect();
            table(f, &["APP", "NEWEST TOKENS", "UNREGISTERED"], &rows)?;
        }
        Ok(())
    }
}

fn counts_row(a: &AppCounts) -> Vec<String> {
    vec![
        a.app.clone(),
        a.pending.to_string(),
        a.due.to_string(),
        a.retrying.to_string(),
        a.sent.to_string(),
        a.failed.to_string(),
        a.expired.to_string(),
    ]
}

/// Writes `rows` under `headers`, two spaces between columns, indented by two; columns
/// whose every cell is a number are right-aligned.
fn table(f: &mut fmt::Formatter<'_>, headers: &[&str], rows: &[Vec<String>]) -> fmt::Result {
    let columns = headers.len();
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([headers[i].len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..columns).map(width).collect();
    let numeric: Vec<bool> = (0..columns)
        .map(|i| rows.iter().all(|r| r[i].parse::<i64>().is_ok()))
        .collect();
    let line = |f: &mut fmt::Formatter<'_>, cells: &[&str]| {
        let mut text = String::from(" ");
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            text.push(' ');
            if numeric[i] {
                text.extend(std::iter::repeat_n(' ', pad));
                text.push_str(cell);
            } else {
                text.push_str(cell);
                if i + 1 < columns {
                    text.extend(std::iter::repeat_n(' ', pad));
                }
            }
            if i + 1 < columns {
                text.push(' ');
            }
        }
        writeln!(f, "{}", text.trim_end())
    };
    line(f, headers)?;
    for r in rows {
        line(f, &r.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    Ok(())
}

/// A duration for people: at most the two largest units ("3m 12s", "2days 4h", "3days").
pub fn age(d: Duration) -> String {
    let secs = d.as_secs();
    // Round to the unit below the largest, so no "3days 3s".
    let unit = match secs {
        86_400.. => 3600,
        3600.. => 60,
        _ => 1,
    };
    if d == Duration::MAX {
        return "forever".into();
    }
    let rounded = secs.saturating_add(unit / 2) / unit * unit;
    if rounded == 0 {
        return "0s".into();
    }
    let text = humantime::format_duration(Duration::from_secs(rounded)).to_string();
    text.split(' ').take(2).collect::<Vec<_>>().join(" ")
}

fn ago(d: Duration) -> String {
    if d == Duration::MAX {
        return "at -infinity".into();
    }
    format!("{} ago", age(d))
}

fn shorten(text: &str, max: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let cut: String = one_line.chars().take(max - 1).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::status::{ErrorCount, LONG_BATCH};

    #[test]
    fn ages_keep_the_two_largest_units() {
        assert_eq!(age(Duration::from_millis(300)), "0s");
        assert_eq!(age(Duration::from_secs(192)), "3m 12s");
        assert_eq!(
            age(Duration::from_secs(2 * 86_400 + 4 * 3600 + 5)),
            "2days 4h"
        );
        assert_eq!(age(Duration::from_secs(3600)), "1h");
        assert_eq!(age(Duration::from_secs(3 * 86_400 + 3)), "3days");
        assert_eq!(age(Duration::from_secs(7200 + 59)), "2h 1m");
    }

    #[test]
    fn tables_align_text_left_and_numbers_right() {
        let status = StatusReport {
            apps: vec![
                AppCounts {
                    app: "default".into(),
                    pending: 12,
                    due: 3,
                    retrying: 1,
                    sent: 10_234,
                    failed: 14,
                    expired: 2,
                },
                AppCounts {
                    app: "b".into(),
                    sent: 5,
                    ..AppCounts::default()
                },
            ],
            oldest_due: None,
            next_scheduled: Some(Duration::from_secs(300)),
            never_due: 0,
            awake_for: None,
            errors: vec![ErrorCount {
                status: "failed".into(),
                app: "default".into(),
                error: "BadDeviceToken".into(),
                count: 14,
            }],
            unregistered: vec![],
            newest_unregistered: vec![],
            long_batches: 0,
            longest_batch: None,
            long_batch_after: LONG_BATCH,
        };
        let text = status.to_string();
        let expected = "\
Rows by app and status
  APP      PENDING  DUE  RETRYING   SENT  FAILED  EXPIRED
  default       12    3         1  10234      14        2
  b              0    0         0      5       0        0
  (all)         12    3         1  10239      14        2

Oldest due row:  none, nothing is waiting to be sent
Next scheduled:  due in 5m
Wake-up:         asleep: writers NOTIFY
Long batches:    none open longer than 60s

Most common errors (failed or expired in the last 24 hours, or pending a retry)
  COUNT  STATUS  APP      ERROR
     14  failed  default  BadDeviceToken

Unregistered tokens
  (none)
";
        assert_eq!(text, expected, "\n{text}");
    }
}
