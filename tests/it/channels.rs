//! Live Activity broadcast channels end to end: `pgpushd.channels` rows made, used and
//! deleted at the emulator's channel management listener by the daemon, broadcast rows
//! in the outbox, and a daemon killed between APNs's answer and the commit.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::Client;

use crate::service::{signal, spawn, wait_exit, write_config};
use crate::support::*;

/// An emulator with its channel management listener, the daemon, and a client.
async fn setup(
    tweak: impl FnOnce(&mut pgpushd_emulator::EmulatorConfig),
) -> (TestDb, ApnsSetup, Running, Client) {
    let db = TestDb::new().await;
    let apns = channels_emulator(tweak).await;
    let cfg = config(&db.url, &apns.app_toml);
    let daemon = start(cfg.clone(), ApnsSetup::transport(&cfg));
    let client = db.client().await;
    (db, apns, daemon, client)
}

/// [`ApnsSetup`] with the channel listener, and `channels_endpoint` in the app's config.
async fn channels_emulator(tweak: impl FnOnce(&mut pgpushd_emulator::EmulatorConfig)) -> ApnsSetup {
    let mut apns = ApnsSetup::new(|c| {
        c.channels_listen = Some("127.0.0.1:0".parse().unwrap());
        tweak(c);
    })
    .await;
    let endpoint = apns.emulator.channels_endpoint().unwrap();
    apns.app_toml = apns.app_toml.replacen(
        "connections = 2\n",
        &format!("connections = 2\nchannels_endpoint = \"{endpoint}\"\n"),
        1,
    );
    apns
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn new_channel(client: &Client, storage: &str) -> i64 {
    client
        .query_one(
            "INSERT INTO pgpushd.channels (message_storage) VALUES ($1) RETURNING id",
            &[&storage],
        )
        .await
        .unwrap()
        .get(0)
}

/// The row's status and channel id once its status is `want`.
async fn channel_when(client: &Client, id: i64, want: &str) -> (String, Option<String>) {
    wait_for(
        &format!("channel {id} {want}"),
        Duration::from_secs(20),
        || async move {
            let row = client
                .query_one(
                    "SELECT status, channel_id, last_error FROM pgpushd.channels WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            let status: String = row.get(0);
            (status == want).then(|| (status, row.get::<_, Option<String>>(1)))
        },
    )
    .await
}

async fn broadcast(client: &Client, channel_id: &str, payload: serde_json::Value) -> i64 {
    client
        .query_one(
            "INSERT INTO pgpushd.outbox (channel_id, payload, push_type)
             VALUES ($1, $2, 'liveactivity') RETURNING id",
            &[&channel_id, &payload],
        )
        .await
        .unwrap()
        .get(0)
}

/// The row's status and last_error once it is settled.
async fn settled(client: &Client, id: i64) -> (String, Option<String>) {
    wait_for(
        &format!("row {id} settled"),
        Duration::from_secs(20),
        || async move {
            let row = client
                .query_one(
                    "SELECT status, last_error FROM pgpushd.outbox WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            let status: String = row.get(0);
            (status != "pending").then(|| (status, row.get(1)))
        },
    )
    .await
}

fn update(ts: u64) -> serde_json::Value {
    serde_json::json!({"aps": {"event": "update", "timestamp": ts,
                               "content-state": {"score": "1-0"}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_made_from_sql_carries_broadcasts_until_it_is_closed() {
    let (_db, apns, daemon, client) = setup(|_| {}).await;
    let id = new_channel(&client, "most-recent").await;
    let (_, channel_id) = channel_when(&client, id, "active").await;
    let channel_id = channel_id.expect("an active channel has APNs's id");
    assert_eq!(
        apns.emulator.channels(TOPIC),
        vec![(channel_id.clone(), 1)],
        "made at APNs with the row's storage policy"
    );
    wait_for("the gauge", Duration::from_secs(10), || async {
        daemon
            .metrics
            .encode()
            .contains("pgpushd_channels{app=\"default\",status=\"active\"} 1")
            .then_some(())
    })
    .await;

    // Broadcasts: an update, and an end that APNs keeps until its expiry.
    let ts = now();
    let first = broadcast(&client, &channel_id, update(ts)).await;
    let end = client
        .query_one(
            "INSERT INTO pgpushd.outbox (channel_id, payload, push_type, expires_at, priority)
             VALUES ($1, $2, 'liveactivity', now() + interval '1 hour', 5) RETURNING id",
            &[
                &channel_id,
                &serde_json::json!({"aps": {"event": "end", "timestamp": ts + 1,
                    "content-state": {"score": "2-1"}, "dismissal-date": ts + 600}}),
            ],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    for row in [first, end] {
        assert_eq!(settled(&client, row).await, ("sent".into(), None));
    }
    let broadcasts: Vec<_> = apns
        .emulator
        .records()
        .into_iter()
        .filter(|r| r.is_broadcast())
        .collect();
    assert_eq!(broadcasts.len(), 2);
    assert!(broadcasts
        .iter()
        .all(|r| r.status == 200 && r.channel_id.as_deref() == Some(channel_id.as_str())));
    // The row keeps APNs's own id for the broadcast (apns-unique-id, what Apple asks
    // for in a support request), not the apns-request-id it was sent with.
    let ids: Vec<String> = client
        .query(
            "SELECT apns_id::text FROM pgpushd.outbox WHERE id = ANY($1) ORDER BY id",
            &[&vec![first, end]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(ids[0] != ids[1], "{ids:?}");
    assert!(
        broadcasts.iter().all(|r| !ids.contains(&r.apns_id)),
        "{ids:?}"
    );

    // The application closes it: deleted at APNs, then closed.
    client
        .execute(
            "UPDATE pgpushd.channels SET status = 'closing' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    channel_when(&client, id, "closed").await;
    assert!(apns.emulator.channels(TOPIC).is_empty());
    let closed_at: Option<SystemTime> = client
        .query_one(
            "SELECT closed_at FROM pgpushd.channels WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(closed_at.is_some());

    // A broadcast to the closed channel: APNs's reason, the request made.
    let late = broadcast(&client, &channel_id, update(ts + 2)).await;
    let (status, error) = settled(&client, late).await;
    assert_eq!(status, "failed");
    assert!(
        error
            .as_deref()
            .unwrap()
            .starts_with("ChannelNotRegistered"),
        "{error:?}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_apple_refuses_fails_before_a_request_and_sql_refuses_a_row_for_both_or_neither() {
    let (_db, apns, daemon, client) = setup(|_| {}).await;
    let id = new_channel(&client, "none").await;
    let (_, channel_id) = channel_when(&client, id, "active").await;
    let channel_id = channel_id.unwrap();
    assert_eq!(apns.emulator.channels(TOPIC)[0].1, 0);

    let ts = now();
    let start = broadcast(
        &client,
        &channel_id,
        serde_json::json!({"aps": {"event": "start", "timestamp": ts,
            "attributes-type": "MatchAttributes", "attributes": {"match": 1},
            "content-state": {"score": "0-0"}, "alert": {"title": "Kick-off"}}}),
    )
    .await;
    // A channel that stores no message takes no expiry.
    let stored = client
        .query_one(
            "INSERT INTO pgpushd.outbox (channel_id, payload, push_type, expires_at)
             VALUES ($1, $2, 'liveactivity', now() + interval '1 hour') RETURNING id",
            &[&channel_id, &update(ts)],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    let alert = client
        .query_one(
            "INSERT INTO pgpushd.outbox (channel_id, payload) VALUES ($1, '{\"aps\": {}}')
             RETURNING id",
            &[&channel_id],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    let expected = [
        (
            start,
            "BadPayload: a broadcast cannot start a Live Activity",
        ),
        (stored, "BadExpirationDate: the channel stores no message"),
        (alert, "InvalidPushType: a broadcast is a Live Activity"),
    ];
    for (row, reason) in expected {
        let (status, error) = settled(&client, row).await;
        assert_eq!(status, "failed");
        assert!(error.as_deref().unwrap().starts_with(reason), "{error:?}");
    }
    assert_eq!(
        apns.emulator.stats().broadcasts,
        0,
        "no request for a refused row"
    );

    for (token, channel) in [(Some(token(1)), Some(channel_id.clone())), (None, None)] {
        let e = client
            .execute(
                "INSERT INTO pgpushd.outbox (device_token, channel_id, payload)
                 VALUES ($1, $2, '{}')",
                &[&token, &channel],
            )
            .await
            .unwrap_err();
        assert!(
            format!("{e:?}").contains("outbox_names_a_device_token_or_a_channel_id"),
            "{e:?}"
        );
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_refused_or_throttled_say_why_and_the_limit_fails_them_in_the_end() {
    let (_db, apns, daemon, client) = setup(|c| c.channel_limit = 1).await;
    let first = new_channel(&client, "none").await;
    channel_when(&client, first, "active").await;
    // Past Apple's limit (here 1): retried while the app may close one, then failed.
    let second = new_channel(&client, "none").await;
    channel_when(&client, second, "failed").await;
    let row = client
        .query_one(
            "SELECT attempts, last_error FROM pgpushd.channels WHERE id = $1",
            &[&second],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 3, "max_attempts");
    let error: String = row.get(1);
    assert!(error.starts_with("CannotCreateChannelConfig"), "{error}");

    client
        .execute(
            "UPDATE pgpushd.channels SET status = 'closing' WHERE id = $1",
            &[&first],
        )
        .await
        .unwrap();
    channel_when(&client, first, "closed").await;

    // Refused credentials are not the channel's fault: it waits, no attempt counted.
    apns.emulator
        .script_once(TOPIC, 403, "InvalidProviderToken");
    let third = new_channel(&client, "most-recent").await;
    let (status, attempts) = wait_for("the refusal written", Duration::from_secs(20), || async {
        let row = client
            .query_one(
                "SELECT status, attempts, last_error FROM pgpushd.channels WHERE id = $1",
                &[&third],
            )
            .await
            .unwrap();
        let error: Option<String> = row.get(2);
        error
            .is_some_and(|e| e.starts_with("InvalidProviderToken"))
            .then(|| (row.get::<_, String>(0), row.get::<_, i32>(1)))
    })
    .await;
    assert_eq!((status.as_str(), attempts), ("pending", 0));
    daemon.stop().await;
}

/// The daemon dies after APNs made the channel and before the row says so: the next one
/// finds that channel at APNs and adopts it, instead of making a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_between_apns_answer_and_commit_leaves_no_second_channel() {
    let db = TestDb::new().await;
    let apns = channels_emulator(|_| {}).await;
    let client = db.client().await;
    // Another channel that nobody names, of the other storage policy: never adopted.
    let foreign = apns.emulator.create_channel(TOPIC, 0);
    // APNs makes the channel at once and answers long after.
    apns.emulator.set_latency(Duration::from_secs(30));
    let path = write_config(apns.dir.path(), &db.url, "", &apns.app_toml);
    let mut daemon = spawn(&path, &[]);
    let id = new_channel(&client, "most-recent").await;
    wait_for(
        "the channel made at APNs",
        Duration::from_secs(20),
        || async { (apns.emulator.channels(TOPIC).len() == 2).then_some(()) },
    )
    .await;
    signal(&daemon, nix::sys::signal::Signal::SIGKILL);
    wait_exit(&mut daemon, Duration::from_secs(5));
    let made: Vec<String> = apns
        .emulator
        .channels(TOPIC)
        .into_iter()
        .map(|(id, _)| id)
        .filter(|c| *c != foreign)
        .collect();
    let row = client
        .query_one(
            "SELECT status, channel_id, lease_until > now() FROM pgpushd.channels WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, Option<String>>(1),
            row.get::<_, bool>(2)
        ),
        ("pending".into(), None, true),
        "the lease is out, the answer never written"
    );

    // The lease runs out (five minutes, here at once), and a daemon starts again.
    client
        .execute(
            "UPDATE pgpushd.channels SET lease_until = now() - interval '1s' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    // Another row, as a daemon that died before its create left: a lease run out, and
    // nothing at APNs for it. It is made afresh, the lost attempt counted.
    let lost = new_channel(&client, "most-recent").await;
    client
        .execute(
            "UPDATE pgpushd.channels SET lease = gen_random_uuid(),
                    lease_until = now() - interval '1s'
              WHERE id = $1",
            &[&lost],
        )
        .await
        .unwrap();
    apns.emulator.set_latency(Duration::ZERO);
    let mut again = spawn(&path, &[]);
    let (_, channel_id) = channel_when(&client, id, "active").await;
    assert_eq!(channel_id.as_deref(), made.first().map(String::as_str));
    let (_, fresh) = channel_when(&client, lost, "active").await;
    let fresh = fresh.unwrap();
    let mut at_apns: Vec<String> = apns
        .emulator
        .channels(TOPIC)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    at_apns.sort();
    let mut expected = vec![foreign.clone(), made[0].clone(), fresh];
    expected.sort();
    assert_eq!(
        at_apns, expected,
        "no second channel for the first row; the foreign one left alone"
    );
    let attempts: Vec<i32> = client
        .query(
            "SELECT attempts FROM pgpushd.channels WHERE id = ANY($1) ORDER BY id",
            &[&vec![id, lost]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(attempts, [1, 2], "each lost attempt counts once");

    signal(&again, nix::sys::signal::Signal::SIGTERM);
    wait_exit(&mut again, Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_make_each_channel_once() {
    let db = TestDb::new().await;
    let apns = channels_emulator(|_| {}).await;
    let cfg = config(&db.url, &apns.app_toml);
    let one = start(cfg.clone(), ApnsSetup::transport(&cfg));
    let two = start(cfg.clone(), ApnsSetup::transport(&cfg));
    let client = db.client().await;
    apns.emulator.set_latency(Duration::from_millis(20));
    client
        .execute(
            "INSERT INTO pgpushd.channels (message_storage)
             SELECT CASE WHEN g % 2 = 0 THEN 'none' ELSE 'most-recent' END
               FROM generate_series(1, 40) g",
            &[],
        )
        .await
        .unwrap();
    wait_for("every channel active", Duration::from_secs(30), || async {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pgpushd.channels WHERE status = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 40).then_some(())
    })
    .await;
    let at_apns = apns.emulator.channels(TOPIC);
    assert_eq!(at_apns.len(), 40, "made once each");
    let attempts: i64 = client
        .query_one("SELECT sum(attempts) FROM pgpushd.channels", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 40);
    one.stop().await;
    two.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_list_shows_apns_beside_the_table_and_where_they_differ() {
    let db = TestDb::new().await;
    let apns = channels_emulator(|_| {}).await;
    let client = db.client().await;
    // Rows as a daemon leaves them: two active, one closed long ago.
    let agreed = apns.emulator.create_channel(TOPIC, 1);
    let gone = apns.emulator.create_channel(TOPIC, 0);
    let lingering = apns.emulator.create_channel(TOPIC, 0);
    let unknown = apns.emulator.create_channel(TOPIC, 1);
    for (channel, status) in [
        (&agreed, "active"),
        (&gone, "active"),
        (&lingering, "closed"),
    ] {
        client
            .execute(
                "INSERT INTO pgpushd.channels (status, channel_id) VALUES ($1, $2)",
                &[&status, channel],
            )
            .await
            .unwrap();
    }
    // Deleted behind the table's back.
    assert!(apns.emulator.delete_channel(TOPIC, &gone));
    let path = write_config(apns.dir.path(), &db.url, "", &apns.app_toml);
    let out = pgpushd_command()
        .args(["channels", "list", "--config"])
        .arg(&path)
        .args(["--app", "default"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("APNs has 3 channels of the 10,000 Apple allows"),
        "{text}"
    );
    assert!(
        text.contains("2 active, 0 closing, 0 pending, 0 failed"),
        "{text}"
    );
    assert!(text.contains("agree on 1 channel; they differ"), "{text}");
    assert!(
        text.contains(&format!(
            "no row names (made elsewhere, or their rows were lost):\n  {unknown}\n"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "APNs does not list (deleted behind pgpushd's back?):\n  row 2  {gone}  active"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "closed in the table that APNs still lists:\n  row 3  {lingering}  closed"
        )),
        "{text}"
    );

    // An app without a channel management API says so.
    let no_channels = apns.app_toml.replace(
        &format!(
            "channels_endpoint = \"{}\"\n",
            apns.emulator.channels_endpoint().unwrap()
        ),
        "",
    );
    let path = write_config(apns.dir.path(), &db.url, "", &no_channels);
    let out = pgpushd_command()
        .args(["channels", "list", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("channels_endpoint"), "{error}");
}

/// Makes row `id` as a daemon that died with its create out leaves it: a lease run out,
/// no channel id.
async fn make_uncertain(client: &Client, id: i64) {
    client
        .execute(
            "UPDATE pgpushd.channels SET lease = gen_random_uuid(),
                    lease_until = now() - interval '1s'
              WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
}

/// The channel ids APNs has for [`TOPIC`], sorted.
fn at_apns(apns: &ApnsSetup) -> Vec<String> {
    let mut ids: Vec<String> = apns
        .emulator
        .channels(TOPIC)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    ids.sort();
    ids
}

/// An uncertain row whose look at APNs fails (the list answered 500) is looked for again,
/// never made afresh: the channel its lost create made is adopted once APNs lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncertain_row_whose_list_fails_stays_uncertain() {
    let db = TestDb::new().await;
    let apns = channels_emulator(|_| {}).await;
    let client = db.client().await;
    let lost = apns.emulator.create_channel(TOPIC, 1);
    let id = new_channel(&client, "most-recent").await;
    make_uncertain(&client, id).await;
    apns.emulator.script_once(TOPIC, 500, "InternalServerError");
    let cfg = config(&db.url, &apns.app_toml);
    let daemon = start(cfg.clone(), ApnsSetup::transport(&cfg));
    let (_, channel_id) = channel_when(&client, id, "active").await;
    assert_eq!(channel_id.as_deref(), Some(lost.as_str()), "adopted");
    assert_eq!(at_apns(&apns), vec![lost], "no second channel");
    daemon.stop().await;
}
/// Two uncertain rows of different storage policies, and APNs's two unnamed channels in
/// the order that makes the first row read the second row's channel before its own:
/// each row adopts its own, and nothing is made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncertain_rows_each_find_their_own_channel_whatever_the_order() {
    let db = TestDb::new().await;
    let apns = channels_emulator(|_| {}).await;
    let client = db.client().await;
    let mut made = [
        (apns.emulator.create_channel(TOPIC, 0), "none"),
        (apns.emulator.create_channel(TOPIC, 1), "most-recent"),
    ];
    // The find reads the unnamed channels in sorted order; the first row's is the second.
    made.sort();
    let first = new_channel(&client, made[1].1).await;
    let second = new_channel(&client, made[0].1).await;
    for id in [first, second] {
        make_uncertain(&client, id).await;
    }
    let cfg = config(&db.url, &apns.app_toml);
    let daemon = start(cfg.clone(), ApnsSetup::transport(&cfg));
    let (_, one) = channel_when(&client, first, "active").await;
    let (_, two) = channel_when(&client, second, "active").await;
    assert_eq!(one.as_deref(), Some(made[1].0.as_str()));
    assert_eq!(two.as_deref(), Some(made[0].0.as_str()));
    let mut expected = vec![made[0].0.clone(), made[1].0.clone()];
    expected.sort();
    assert_eq!(at_apns(&apns), expected, "no channel made again");
    daemon.stop().await;
}
/// A transport that, as the keeper's list of an app's channels goes out, plays another
/// keeper: it claims row `other` (a lease) and makes its channel at APNs.
struct CreateDuringList {
    inner: std::sync::Arc<dyn pgpushd::transport::Transport>,
    db_url: String,
    other: i64,
    made: std::sync::Mutex<Option<String>>,
}

impl pgpushd::transport::Transport for CreateDuringList {
    fn send<'a>(
        &'a self,
        n: &'a pgpushd::transport::Notification,
    ) -> futures::future::BoxFuture<'a, pgpushd::transport::Delivery> {
        self.inner.send(n)
    }

    fn manage_channel<'a>(
        &'a self,
        app: &'a str,
        op: &'a pgpushd::channels::ChannelOp,
    ) -> futures::future::BoxFuture<'a, pgpushd::channels::ChannelAnswer> {
        use pgpushd::channels::{ChannelOp, ChannelReply, MessageStorage};
        Box::pin(async move {
            if *op == ChannelOp::List && self.made.lock().unwrap().is_none() {
                let c = plain_client(&self.db_url).await;
                c.execute(
                    "UPDATE pgpushd.channels SET lease = gen_random_uuid(),
                            lease_until = now() + interval '5 minutes'
                      WHERE id = $1",
                    &[&self.other],
                )
                .await
                .unwrap();
                let made = self
                    .inner
                    .manage_channel(app, &ChannelOp::Create(MessageStorage::MostRecent))
                    .await;
                let Ok(ChannelReply::Created { channel_id }) = made else {
                    panic!("{made:?}")
                };
                *self.made.lock().unwrap() = Some(channel_id);
            }
            self.inner.manage_channel(app, op).await
        })
    }
}

/// Another keeper's create claimed between the "no other create is out" check and the
/// list: its channel is in the list, and no row names it yet. The uncertain row must not
/// take it (it waits for that create's outcome), and the other row keeps its channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncertain_row_never_takes_a_channel_another_create_is_making() {
    let db = TestDb::new().await;
    let apns = channels_emulator(|_| {}).await;
    let client = db.client().await;
    // The uncertain row's lost create made nothing.
    let uncertain = new_channel(&client, "most-recent").await;
    make_uncertain(&client, uncertain).await;
    let other: i64 = client
        .query_one(
            "INSERT INTO pgpushd.channels (message_storage, send_after)
             VALUES ('most-recent', now() + interval '1 hour') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let cfg = config(&db.url, &apns.app_toml);
    let racing = std::sync::Arc::new(CreateDuringList {
        inner: ApnsSetup::transport(&cfg),
        db_url: db.url.clone(),
        other,
        made: Default::default(),
    });
    let daemon = start(cfg, racing.clone());
    let (channel, error) = wait_for(
        "the uncertain row's find written",
        Duration::from_secs(20),
        || async {
            let row = client
                .query_one(
                    "SELECT channel_id, last_error FROM pgpushd.channels WHERE id = $1",
                    &[&uncertain],
                )
                .await
                .unwrap();
            let channel: Option<String> = row.get(0);
            let error: Option<String> = row.get(1);
            (channel.is_some() || error.is_some()).then_some((channel, error))
        },
    )
    .await;
    let made = racing.made.lock().unwrap().clone().unwrap();
    assert_eq!(
        channel, None,
        "took the channel another create made: {error:?}"
    );
    // The other keeper writes its outcome; the uncertain row then finds nothing and is
    // made afresh.
    client
        .execute(
            "UPDATE pgpushd.channels SET status = 'active', channel_id = $2, attempts = 1,
                    lease = NULL, lease_until = NULL
              WHERE id = $1",
            &[&other, &made],
        )
        .await
        .unwrap();
    let (_, fresh) = channel_when(&client, uncertain, "active").await;
    let fresh = fresh.unwrap();
    assert_ne!(fresh, made);
    let mut expected = vec![fresh, made];
    expected.sort();
    assert_eq!(at_apns(&apns), expected);
    daemon.stop().await;
}
/// The connection drops while a create is out, after APNs made the channel: the create
/// is not sent again on another connection (a second channel); the row is uncertain,
/// and the channel APNs made is found and adopted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_connection_drops_is_not_sent_again() {
    let (_db, apns, daemon, client) = setup(|_| {}).await;
    apns.emulator.set_latency(Duration::from_secs(2));
    let id = new_channel(&client, "none").await;
    wait_for(
        "the channel made at APNs",
        Duration::from_secs(20),
        || async { (!apns.emulator.channels(TOPIC).is_empty()).then_some(()) },
    )
    .await;
    apns.emulator.set_latency(Duration::ZERO);
    apns.emulator.drop_connections();
    let made = at_apns(&apns);
    let (_, channel_id) = channel_when(&client, id, "active").await;
    assert_eq!(at_apns(&apns), made, "made once");
    assert_eq!(channel_id.as_ref(), made.first());
    daemon.stop().await;
}
/// The gauge of an app's channels goes back to 0 when its last row goes, for an app not
/// in the config (`unknown`) too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_gauge_of_an_unknown_app_falls_back_to_zero() {
    let (_db, _apns, daemon, client) = setup(|_| {}).await;
    let id: i64 = client
        .query_one(
            "INSERT INTO pgpushd.channels (app) VALUES ('elsewhere') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let gauge = |n: i64| format!("pgpushd_channels{{app=\"unknown\",status=\"pending\"}} {n}");
    wait_for("the gauge at 1", Duration::from_secs(10), || async {
        daemon.metrics.encode().contains(&gauge(1)).then_some(())
    })
    .await;
    client
        .execute("DELETE FROM pgpushd.channels WHERE id = $1", &[&id])
        .await
        .unwrap();
    client
        .execute("SELECT pg_notify('pgpushd_channels', '')", &[])
        .await
        .unwrap();
    wait_for("the gauge at 0", Duration::from_secs(10), || async {
        daemon.metrics.encode().contains(&gauge(0)).then_some(())
    })
    .await;
    daemon.stop().await;
}
/// A due row the application holds locked (an open transaction): the keeper's claim
/// skips it, and the keeper must wait, not claim again at once for as long as the lock
/// is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keeper_does_not_spin_on_a_row_the_application_holds_locked() {
    let db = TestDb::new().await;
    let apns = channels_emulator(|_| {}).await;
    let client = db.client().await;
    let id = new_channel(&client, "none").await;
    let mut holder = db.client().await;
    let txn = holder.transaction().await.unwrap();
    txn.execute(
        "SELECT 1 FROM pgpushd.channels WHERE id = $1 FOR UPDATE",
        &[&id],
    )
    .await
    .unwrap();
    let cfg = config(&db.url, &apns.app_toml);
    let daemon = start(cfg.clone(), ApnsSetup::transport(&cfg));
    let scans = || async {
        client
            .query_one(
                "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0)
                   FROM pg_stat_user_tables
                  WHERE schemaname = 'pgpushd' AND relname = 'channels'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = scans().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = scans().await;
    assert!(
        after - before < 50,
        "{} scans of pgpushd.channels in 3 s while the row is locked",
        after - before
    );
    txn.rollback().await.unwrap();
    channel_when(&client, id, "active").await;
    daemon.stop().await;
}

/// More unnamed channels at APNs than a find reads in one round (made outside pgpushd):
/// what was read is remembered, the rest is read on over rounds, and an uncertain row
/// whose create made nothing is made afresh in the end, not looked for for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_list_of_channels_made_elsewhere_is_read_on_over_rounds() {
    let db = TestDb::new().await;
    let apns = channels_emulator(|_| {}).await;
    let client = db.client().await;
    let elsewhere: Vec<String> = (0..70)
        .map(|_| apns.emulator.create_channel(TOPIC, 0))
        .collect();
    let id = new_channel(&client, "most-recent").await;
    make_uncertain(&client, id).await;
    let cfg = config(&db.url, &apns.app_toml);
    let daemon = start(cfg.clone(), ApnsSetup::transport(&cfg));
    let (_, channel_id) = wait_for("the row made afresh", Duration::from_secs(30), || async {
        let row = client
            .query_one(
                "SELECT status, channel_id FROM pgpushd.channels WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        let status: String = row.get(0);
        (status == "active").then(|| (status, row.get::<_, Option<String>>(1)))
    })
    .await;
    let made = channel_id.unwrap();
    assert!(
        !elsewhere.contains(&made),
        "none of the channels made elsewhere adopted"
    );
    assert_eq!(apns.emulator.channels(TOPIC).len(), 71);
    // Each channel read once, over the rounds.
    assert!(
        apns.emulator.stats().channel_calls <= 70 + 2 * 3 + 1,
        "{} channel calls",
        apns.emulator.stats().channel_calls
    );
    daemon.stop().await;
}
