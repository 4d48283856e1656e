//! `pgpushd channels list --app NAME`: the app's broadcast channels as APNs lists them,
//! beside `pgpushd.channels`, and where the two differ: a channel APNs has that no row
//! names (made elsewhere, or its row lost), a row whose channel APNs does not list
//! (deleted behind pgpushd's back), a closed row whose channel APNs still lists. Apple's
//! limit of channels per app and environment is shown against APNs's count.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::channels::reconcile::{compare, Comparison};
use crate::channels::{ChannelOp, ChannelReply, MAX_CHANNELS};
use crate::config::{AppConfig, Config, Endpoint};
use crate::outbox::channels as sql;
use crate::{db, providers};

/// How long the command waits for the database.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// APNs's list and the table's, compared.
pub async fn list(config: &Config, app_name: &str) -> anyhow::Result<String> {
    let app = config
        .apps
        .get(app_name)
        .ok_or_else(|| anyhow::anyhow!("no [apps.{app_name}] section in the config"))?;
    let Some(where_) = app.channels.as_ref() else {
        bail!(
            "[apps.{app_name}] has no channel management API: broadcast channels are an APNs \
             app's (protocol \"http2\"), and beside an endpoint of another host they need \
             channels_endpoint"
        );
    };
    let at_apns = match providers::manage_channel(app, &ChannelOp::List).await? {
        Ok(ChannelReply::Listed(ids)) => ids,
        Ok(other) => bail!("APNs answered the list with {other:?}"),
        Err(e) => bail!("APNs did not list the channels: {e}"),
    };
    let (client, canceller) = db::connect_cancellable(
        &config.database.url,
        config.database.connect_timeout,
        "channels list",
    )
    .await?;
    let read = async {
        Ok::<_, tokio_postgres::Error>((
            sql::named(&client, app_name).await?,
            sql::counts(&client).await?,
        ))
    };
    let (table, counts) = canceller
        .within(STATEMENT_TIMEOUT, read)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from the database within {STATEMENT_TIMEOUT:?}"))?
        .map_err(|e| anyhow::anyhow!(db::describe(&e)))
        .context("reading pgpushd.channels")?;
    let counts: Vec<(&str, i64)> = counts
        .iter()
        .filter(|(app, _, _)| app == app_name)
        .map(|(_, status, n)| (status.as_str(), *n))
        .collect();
    Ok(render(
        app,
        where_,
        &at_apns,
        &counts,
        &compare(&at_apns, &table),
    ))
}

fn render(
    app: &AppConfig,
    endpoint: &Endpoint,
    at_apns: &[String],
    counts: &[(&str, i64)],
    c: &Comparison,
) -> String {
    let mut out = String::new();
    let (host, port) = crate::apns::channels::request::host_port(endpoint);
    let _ = writeln!(
        out,
        "app {} ({}), at {host}:{port}: APNs has {} channels of the {} Apple allows",
        app.name,
        app.topic.as_deref().unwrap_or("no topic"),
        at_apns.len(),
        group(MAX_CHANNELS)
    );
    let count = |status: &str| {
        counts
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    };
    let _ = writeln!(
        out,
        "pgpushd.channels: {} active, {} closing, {} pending, {} failed",
        count("active"),
        count("closing"),
        count("pending"),
        count("failed")
    );
    if !c.differs() {
        let _ = writeln!(
            out,
            "APNs and the table agree on all {}.",
            channels(c.agreed)
        );
        return out;
    }
    let _ = writeln!(
        out,
        "APNs and the table agree on {}; they differ:",
        channels(c.agreed)
    );
    if !c.unknown.is_empty() {
        let _ = writeln!(
            out,
            "APNs has {} that no row names (made elsewhere, or their rows were lost):",
            c.unknown.len()
        );
        for id in &c.unknown {
            let _ = writeln!(out, "  {id}");
        }
    }
    if !c.missing.is_empty() {
        let _ = writeln!(
            out,
            "the table has {} that APNs does not list (deleted behind pgpushd's back?):",
            c.missing.len()
        );
        for t in &c.missing {
            let _ = writeln!(out, "  row {}  {}  {}", t.id, t.channel_id, t.status);
        }
    }
    if !c.lingering.is_empty() {
        let _ = writeln!(
            out,
            "{} closed in the table that APNs still lists:",
            c.lingering.len()
        );
        for t in &c.lingering {
            let _ = writeln!(out, "  row {}  {}  {}", t.id, t.channel_id, t.status);
        }
    }
    out
}

/// "1 channel", "2 channels".
fn channels(n: usize) -> String {
    match n {
        1 => "1 channel".into(),
        n => format!("{n} channels"),
    }
}

/// 10000 as 10,000.
fn group(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(d);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::outcome::Status;
    use crate::channels::reconcile::TableChannel;
    use crate::config::Environment;

    #[test]
    fn the_listing_says_where_apns_and_the_table_differ() {
        let app = AppConfig {
            name: "default".into(),
            topic: Some("com.example.app".into()),
            endpoint: Endpoint::Apple(Environment::Sandbox),
            ca_file: None,
            protocol: crate::config::Protocol::Http2,
            connections: 1,
            request_timeout: Duration::from_secs(10),
            auth: crate::config::Auth::Certificate(crate::config::CertificateAuth {
                file: "ck.pem".into(),
                passphrase_file: None,
            }),
            binary: Default::default(),
            channels: Some(Endpoint::Apple(Environment::Sandbox)),
            proxy: Default::default(),
        };
        let at_apns = vec!["a".to_owned(), "x".to_owned()];
        let table = [
            TableChannel {
                id: 1,
                channel_id: "a".into(),
                status: Status::Active,
            },
            TableChannel {
                id: 2,
                channel_id: "b".into(),
                status: Status::Active,
            },
        ];
        let text = render(
            &app,
            &Endpoint::Apple(Environment::Sandbox),
            &at_apns,
            &[("active", 2)],
            &compare(&at_apns, &table),
        );
        assert!(
            text.contains("api-manage-broadcast.sandbox.push.apple.com:2195"),
            "{text}"
        );
        assert!(
            text.contains("APNs has 2 channels of the 10,000 Apple allows"),
            "{text}"
        );
        assert!(text.contains("2 active, 0 closing"), "{text}");
        assert!(text.contains("APNs has 1 that no row names"), "{text}");
        assert!(text.contains("\n  x\n"), "{text}");
        assert!(text.contains("row 2  b  active"), "{text}");
    }
}
