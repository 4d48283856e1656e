//! The monitoring files in `contrib/`: the Grafana dashboard and the Prometheus alert
//! rules name only series the running daemon exports (scraped from a daemon that has
//! delivered rows, not read from the code), with labels those series have; the
//! dashboard is importable and its queries are valid PromQL; the rules pass `promtool
//! check rules` and their unit tests (`promtool test rules`), each alert is tested
//! firing and quiet, and the docs describe every panel and alert.
//!
//! The promtool checks say SKIPPED without promtool (Debian's `prometheus` package;
//! `.ci/run` installs it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::*;

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dashboard() -> serde_json::Value {
    let path = contrib("grafana/pgpushd.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// docs/operations.md, its lines joined (a name in bold may wrap).
fn operations_doc() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md");
    read(&path).split_whitespace().collect::<Vec<_>>().join(" ")
}

const RULES: &str = "prometheus/pgpushd-alerts.yml";
const RULE_TESTS: &str = "prometheus/pgpushd-alerts.test.yml";

/// Series Prometheus itself adds for every target.
const PROMETHEUS_OWN: [&str; 1] = ["up"];
/// The daemon's series with an `app` label, which the dashboard's `$app` selects.
const PER_APP: [&str; 7] = [
    "pgpushd_rows_total",
    "pgpushd_push_request_duration_seconds_bucket",
    "pgpushd_push_request_duration_seconds_count",
    "pgpushd_push_request_duration_seconds_sum",
    "pgpushd_push_connections",
    "pgpushd_app_healthy",
    "pgpushd_channels",
];
/// Labels Prometheus adds to every series it scrapes.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

// ---------------------------------------------------------------------------------------
// What the daemon exports

/// The series names a scrape can hold, each with the label names seen on it.
struct Exported {
    series: BTreeMap<String, BTreeSet<String>>,
}

/// Series names from the exposition's `# TYPE` lines: a counter `x` is sampled as
/// `x_total`, a histogram as `x_bucket`, `x_sum` and `x_count`, a gauge as `x`.
fn parse_exposition(text: &str) -> Exported {
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (family, kind) = rest.split_once(' ').unwrap();
        let names: Vec<String> = match kind {
            "counter" => vec![format!("{family}_total")],
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{family}{s}"))
                .collect(),
            "gauge" | "unknown" => vec![family.to_owned()],
            other => panic!("a {other} in the exposition: {line}"),
        };
        for name in names {
            series.entry(name).or_default();
        }
    }
    // Every sample is one of them; its labels are recorded.
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap();
        let name = &line[..name_end];
        let labels = series
            .get_mut(name)
            .unwrap_or_else(|| panic!("{name} is sampled but has no # TYPE: {line}"));
        if line[name_end..].starts_with('{') {
            let inside = &line[name_end + 1..line.find('}').unwrap()];
            for pair in split_matchers(inside) {
                labels.insert(pair.split('=').next().unwrap().to_owned());
            }
        }
    }
    Exported { series }
}

/// `a="x",b="y,z"` split at the commas outside quotes.
fn split_matchers(inside: &str) -> Vec<String> {
    let (mut out, mut current, mut quoted, mut escaped) = (vec![], String::new(), false, false);
    for c in inside.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    out.push(current);
    out.into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Scrapes a daemon that has sent rows (and failed one), so that the labelled series
/// exist too.
async fn scrape_a_working_daemon() -> Exported {
    let db = TestDb::new().await;
    let apns = ApnsSetup::new(|_| {}).await;
    apns.emulator.script(&token(3), 400, "BadDeviceToken");
    let port = free_port();
    let cfg = config(
        &db.url,
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{port}\"\n{}",
            apns.app_toml
        ),
    );
    let daemon = start(cfg.clone(), ApnsSetup::transport(&cfg));
    let client = db.client().await;
    // Enough rows at once to reach `awake_min_rate`: the wake-up's series get values too.
    insert_rows(&client, 1, 300).await;
    let text = wait_for(
        "the rows to be counted and served",
        Duration::from_secs(20),
        || async {
            let (status, body) =
                tokio::task::spawn_blocking(move || try_http_get(port, "/metrics"))
                    .await
                    .unwrap()
                    .ok()?;
            (status == 200
                && body.contains(r#"outcome="sent""#)
                && body.contains(r#"outcome="failed",reason="BadDeviceToken""#)
                && body.contains("pgpushd_push_request_duration_seconds_bucket")
                && body.contains(r#"pgpushd_wakeup_transitions_total{to="awake"}"#))
            .then_some(body)
        },
    )
    .await;
    daemon.stop().await;
    parse_exposition(&text)
}

// ---------------------------------------------------------------------------------------
// What the dashboard and the rules ask for

/// A vector selector in an expression: its metric name and the label names it matches on.
#[derive(Debug)]
struct Selector {
    metric: String,
    labels: Vec<String>,
}

/// PromQL's words that are not metric names when not followed by `(`.
const KEYWORDS: [&str; 22] = [
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Words followed by a list of label names in parentheses.
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Every vector selector in a PromQL expression (Grafana's `$variables` allowed).
fn selectors(expr: &str) -> Vec<Selector> {
    let b = expr.as_bytes();
    let mut out: Vec<Selector> = Vec::new();
    let mut i = 0;
    let word_end = |mut j: usize| {
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b':') {
            j += 1;
        }
        j
    };
    let skip_string = |mut j: usize| {
        let quote = b[j];
        j += 1;
        while j < b.len() && b[j] != quote {
            j += if b[j] == b'\\' { 2 } else { 1 };
        }
        j + 1
    };
    let closing = |mut j: usize, open: u8, close: u8| {
        let mut depth = 0;
        while j < b.len() {
            match b[j] {
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return j + 1;
                    }
                }
                b'"' | b'\'' | b'`' => {
                    j = skip_string(j);
                    continue;
                }
                _ => {}
            }
            j += 1;
        }
        panic!("unbalanced {} in {expr}", open as char)
    };
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'"' || c == b'\'' || c == b'`' {
            i = skip_string(i);
        } else if c == b'[' {
            i = closing(i, b'[', b']');
        } else if c == b'{' {
            // Label matchers: name, operator, string; the metric is the word before.
            let end = closing(i, b'{', b'}');
            let labels: Vec<String> = split_matchers(&expr[i + 1..end - 1])
                .iter()
                .map(|m| m[..m.find(['=', '!']).unwrap()].trim().to_owned())
                .collect();
            match out.last_mut() {
                Some(s) if s.labels.is_empty() && expr[..i].ends_with(&s.metric) => {
                    s.labels = labels
                }
                _ => panic!("a selector without a metric name in {expr}"),
            }
            i = end;
        } else if c == b'$' {
            i = if b.get(i + 1) == Some(&b'{') {
                closing(i + 1, b'{', b'}')
            } else {
                word_end(i + 1)
            };
        } else if c.is_ascii_digit() || c == b'.' {
            // Numbers and durations (5m, 1e3, 0.99).
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let end = word_end(i);
            let word = &expr[i..end];
            let next = expr[end..].trim_start();
            if LABEL_LISTS.contains(&word) && next.starts_with('(') {
                let open = expr.len() - next.len();
                i = closing(open, b'(', b')');
                continue;
            }
            if !KEYWORDS.contains(&word) && !next.starts_with('(') {
                out.push(Selector {
                    metric: word.to_owned(),
                    labels: Vec::new(),
                });
            }
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// Each query of the dashboard, named by its panel: (where, expression).
fn dashboard_queries(d: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in panels(d) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("a target of {:?} without an expr", panel["title"]));
            out.push((
                format!(
                    "panel {:?} {}",
                    panel["title"].as_str().unwrap_or("?"),
                    target["refId"].as_str().unwrap_or("?")
                ),
                expr.to_owned(),
            ));
        }
    }
    out
}

/// The panels, those inside collapsed rows included.
fn panels(d: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// The template variables' queries: `label_values(SELECTOR, LABEL)`.
fn variable_queries(d: &serde_json::Value) -> Vec<(String, String, String)> {
    d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap();
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable {}: {q}", v["name"]));
            let (selector, label) = inner.rsplit_once(',').unwrap();
            (
                format!("variable {}", v["name"]),
                selector.trim().to_owned(),
                label.trim().to_owned(),
            )
        })
        .collect()
}

/// The `expr:` of each rule in a rules file: a plain scalar, or a `|` / `>` block.
fn rule_exprs(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let indent = line.len() - line.trim_start().len();
            let block: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            out.push(block.join("\n").trim().to_owned());
        } else {
            out.push(rest.trim_matches(['"', '\'']).to_owned());
        }
    }
    out
}

/// `(alert name, its lines)` for each alerting rule.
fn alerts(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.trim_start().strip_prefix("- alert:") {
            out.push((name.trim().to_owned(), String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_rules_name_only_series_the_daemon_exports() {
    let exported = scrape_a_working_daemon().await;
    let d = dashboard();
    let mut queries = dashboard_queries(&d);
    let rules = read(&contrib(RULES));
    let exprs = rule_exprs(&rules);
    assert_eq!(exprs.len(), alerts(&rules).len(), "an expr per alert");
    queries.extend(
        alerts(&rules)
            .into_iter()
            .zip(exprs)
            .map(|((name, _), e)| (format!("alert {name}"), e)),
    );
    for (place, selector, label) in variable_queries(&d) {
        queries.push((place.clone(), selector.clone()));
        for s in selectors(&selector) {
            let known = &exported.series.get(&s.metric);
            assert!(
                TARGET_LABELS.contains(&&*label) || known.is_some_and(|l| l.contains(&label)),
                "{place}: {} has no label {label}",
                s.metric
            );
        }
    }

    // The per-app series are those the daemon labels with `app`.
    // (The deprecated `pgpushd_apns_*` names of three of them aside: exported one more
    // release, and named by neither the dashboard nor the rules.)
    let with_app: BTreeSet<&str> = exported
        .series
        .iter()
        .filter(|(name, labels)| labels.contains("app") && !name.starts_with("pgpushd_apns_"))
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(with_app, PER_APP.into_iter().collect());

    let mut unknown = BTreeSet::new();
    let mut unknown_labels = BTreeSet::new();
    for (place, expr) in &queries {
        let found = selectors(expr);
        assert!(!found.is_empty(), "{place} names no series: {expr}");
        for s in found {
            if PROMETHEUS_OWN.contains(&&*s.metric) {
                continue;
            }
            let Some(labels) = exported.series.get(&s.metric) else {
                unknown.insert(format!("{} ({place})", s.metric));
                continue;
            };
            for l in &s.labels {
                if !labels.contains(l) && !TARGET_LABELS.contains(&&**l) {
                    unknown_labels.insert(format!("{}{{{l}}} ({place})", s.metric));
                }
            }
        }
    }
    assert!(
        unknown.is_empty() && unknown_labels.is_empty(),
        "not exported by the daemon:\n  {}\nlabels it does not have:\n  {}\nthe daemon \
         exports: {:?}",
        unknown.into_iter().collect::<Vec<_>>().join("\n  "),
        unknown_labels.into_iter().collect::<Vec<_>>().join("\n  "),
        exported.series
    );
}

#[test]
fn the_expression_reader_finds_names_labels_and_nothing_else() {
    let found = selectors(
        r#"histogram_quantile(0.99, sum by (app, le) (rate(pgpushd_x_bucket{job=~"$job", app=~"a,}b"}[$__rate_interval])))
           / on (job) group_left () max without (instance) (pgpushd_y offset 5m) > bool 0.5
           unless topk(3, up{job="pgpushd"}) or vector(1) and ${z}"#,
    );
    let got: Vec<(&str, Vec<&str>)> = found
        .iter()
        .map(|s| (&*s.metric, s.labels.iter().map(|l| &**l).collect()))
        .collect();
    assert_eq!(
        got,
        [
            ("pgpushd_x_bucket", vec!["job", "app"]),
            ("pgpushd_y", vec![]),
            ("up", vec!["job"]),
        ]
    );
    // The exposition: counters are sampled with _total, histograms in three series.
    let exported = parse_exposition(
        "# TYPE a counter\na_total{x=\"1\"} 2\n# TYPE b histogram\nb_bucket{le=\"1\"} 1\n\
         b_sum 1\nb_count 1\n# TYPE c gauge\nc 3\n# EOF\n",
    );
    assert_eq!(
        exported.series.keys().collect::<Vec<_>>(),
        ["a_total", "b_bucket", "b_count", "b_sum", "c"]
    );
    assert!(exported.series["a_total"].contains("x"));
}

#[test]
fn the_dashboard_is_importable_with_a_datasource_input_and_the_variables() {
    let d = dashboard();
    let inputs = d["__inputs"].as_array().unwrap();
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "{inputs:?}"
    );
    assert_eq!(d["uid"], "pgpushd");
    assert!(d["id"].is_null(), "an exported dashboard has no id");
    let variables: BTreeMap<&str, &serde_json::Value> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    assert!(variables["app"]["multi"].as_bool().unwrap());
    assert!(variables["app"]["includeAll"].as_bool().unwrap());
    assert!(variables.contains_key("job"));
    for v in variables.values() {
        assert_eq!(v["datasource"]["uid"], "${DS_PROMETHEUS}", "{v}");
    }

    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "id {} twice",
            p["id"]
        );
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "{g}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        assert!(p["description"].as_str().is_some_and(|s| !s.is_empty()));
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        }
        // Every query follows the job variable; those of per-app series the app too.
        for (_, expr) in dashboard_queries(&serde_json::json!({ "panels": [p] })) {
            for s in selectors(&expr) {
                let wants = |l: &str| s.labels.iter().any(|x| x == l);
                assert!(wants("job"), "{}: {expr}", p["title"]);
                if PER_APP.contains(&&*s.metric) {
                    assert!(wants("app"), "{}: {expr}", p["title"]);
                }
            }
        }
    }

    // The panels the operations docs describe.
    let titles: BTreeSet<&str> = panels(&d)
        .iter()
        .filter(|p| p["type"] != "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    for expected in [
        "Rows pending",
        "Oldest due row waiting",
        "Rows by outcome",
        "Top reasons (dashboard range)",
        "Retried and deferred",
        "APNs latency",
        "Requests in flight",
        "APNs connections",
        "Apps healthy",
        "Database up and daemons scraped",
        "Database trouble",
        "Awake",
        "Wake-ups",
        "NOTIFYs received and avoided",
    ] {
        assert!(
            titles.contains(expected),
            "no panel {expected:?}: {titles:?}"
        );
    }
    let docs = operations_doc();
    for t in &titles {
        assert!(
            docs.contains(&format!("**{t}**")),
            "docs/operations.md never describes {t:?}"
        );
    }
    for row in panels(&d).iter().filter(|p| p["type"] == "row") {
        let t = row["title"].as_str().unwrap();
        assert!(
            docs.contains(&format!("**{t}.**")),
            "docs/operations.md: no row {t:?}"
        );
    }
}

#[test]
fn every_alert_waits_has_a_severity_says_what_to_do_and_is_documented() {
    let rules = read(&contrib(RULES));
    let tests = read(&contrib(RULE_TESTS));
    let docs = operations_doc();
    let alerts = alerts(&rules);
    assert_eq!(alerts.len(), 6, "{alerts:?}");
    for (name, body) in &alerts {
        assert!(body.contains("\n        for: "), "{name} has no for:");
        assert!(
            body.contains("severity: warning") || body.contains("severity: critical"),
            "{name} has no severity"
        );
        assert!(body.contains("summary: "), "{name}");
        assert!(body.contains("description: "), "{name}");
        assert!(body.contains("docs/operations.md#alerts"), "{name}");
        assert!(
            docs.contains(&format!("**{name}**")),
            "docs never describe {name}"
        );
        // Tested both firing and quiet.
        let cases: Vec<&str> = tests
            .split(&format!("alertname: {name}\n"))
            .skip(1)
            .map(|after| after.trim_start())
            .collect();
        assert!(
            cases.iter().any(|c| c.starts_with("exp_alerts: []")),
            "no test of {name} staying quiet"
        );
        assert!(
            cases.iter().any(|c| c.starts_with("exp_alerts:\n")),
            "no test of {name} firing"
        );
    }
}

fn promtool() -> bool {
    let ok = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        skip_without("promtool (Debian: apt-get install prometheus)");
    }
    ok
}

fn promtool_passes(args: &[&str], dir: &Path) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_the_rules_and_their_tests_pass() {
    if !promtool() {
        return;
    }
    let dir = contrib("prometheus");
    promtool_passes(&["check", "rules", "pgpushd-alerts.yml"], &dir);
    promtool_passes(&["test", "rules", "pgpushd-alerts.test.yml"], &dir);
}

#[test]
fn the_dashboards_queries_are_valid_promql() {
    if !promtool() {
        return;
    }
    let d = dashboard();
    let variables: Vec<String> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| format!("${}", v["name"].as_str().unwrap()))
        .collect();
    // Each query as a recording rule, Grafana's variables replaced as Grafana would.
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, (place, expr)) in dashboard_queries(&d).iter().enumerate() {
        let mut e = expr
            .replace("$__rate_interval", "5m")
            .replace("$__range", "6h");
        for v in &variables {
            e = e.replace(v, ".*");
        }
        assert!(
            !e.contains('$'),
            "{place} uses an undefined variable: {expr}"
        );
        file.push_str(&format!(
            "      - record: dashboard:query_{n}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.yml"), file).unwrap();
    promtool_passes(&["check", "rules", "dashboard.yml"], dir.path());
}
