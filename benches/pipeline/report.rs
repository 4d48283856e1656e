//! Medians, the table, `target/bench/pipeline.json`, and what machine it ran on.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

use crate::Plan;

#[derive(Debug, Clone, Copy)]
pub enum Floor {
    AtLeast(f64),
    AtMost(f64),
}

impl Floor {
    fn passes(self, v: f64) -> bool {
        match self {
            Floor::AtLeast(f) => v >= f,
            Floor::AtMost(f) => v <= f,
        }
    }

    fn describe(self) -> String {
        match self {
            Floor::AtLeast(f) => format!(">= {}", number(f)),
            Floor::AtMost(f) => format!("<= {}", number(f)),
        }
    }
}

/// Every run's figure, by key, in the order keys were first added.
#[derive(Default)]
pub struct Samples {
    order: Vec<String>,
    values: BTreeMap<String, Vec<f64>>,
}

impl Samples {
    pub fn add(&mut self, key: &str, v: f64) {
        if !self.values.contains_key(key) {
            self.order.push(key.to_owned());
        }
        self.values.entry(key.to_owned()).or_default().push(v);
    }

    fn stats(&self, key: &str) -> Option<(f64, f64, f64)> {
        let v = self.values.get(key)?;
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some((median(v.iter().copied()), min, max))
    }
}

/// The middle value (the mean of the two middle ones for an even count); NaN for none.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Large figures with thousands separators, small ones with 2 decimals.
fn number(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    if v.abs() >= 1000.0 {
        let digits = format!("{:.0}", v.abs());
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if v < 0.0 {
            out.insert(0, '-');
        }
        out
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn table(samples: &Samples, floors: &BTreeMap<&str, Floor>, plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\npgpushd pipeline bench: median of {} run(s), {} rows per drain, {} rows of backlog",
        plan.runs,
        number(plan.rows as f64),
        number(plan.backlog_rows as f64)
    );
    let _ = writeln!(
        out,
        "| {:<26} | {:>9} | {:>9} | {:>9} | {:>9} | {:<6} |",
        "scenario", "median", "min", "max", "floor", "result"
    );
    let _ = writeln!(
        out,
        "|{:-<28}|{:->11}|{:->11}|{:->11}|{:->11}|{:-<8}|",
        "", "", "", "", "", ""
    );
    for key in &samples.order {
        let Some((median, min, max)) = samples.stats(key) else {
            continue;
        };
        let (floor, result) = match floors.get(key.as_str()) {
            Some(f) if f.passes(median) => (f.describe(), "pass"),
            Some(f) => (f.describe(), "FAIL"),
            None => (String::new(), ""),
        };
        let _ = writeln!(
            out,
            "| {:<26} | {:>9} | {:>9} | {:>9} | {:>9} | {:<6} |",
            key,
            number(median),
            number(min),
            number(max),
            floor,
            result
        );
    }
    out
}

/// Writes the medians under their keys, plus every run and the machine, to
/// `target/bench/pipeline.json`.
pub fn write_json(
    samples: &Samples,
    floors: &BTreeMap<&str, Floor>,
    plan: &Plan,
    runs: Vec<serde_json::Value>,
) -> anyhow::Result<PathBuf> {
    let mut json = serde_json::Map::new();
    let mut failed = Vec::new();
    for key in &samples.order {
        if let Some((median, min, max)) = samples.stats(key) {
            json.insert(key.clone(), median.into());
            json.insert(
                format!("{key}_range"),
                serde_json::json!({"min": min, "max": max, "runs": samples.values[key]}),
            );
            if floors.get(key.as_str()).is_some_and(|f| !f.passes(median)) {
                failed.push(key.clone());
            }
        }
    }
    json.insert("floors_missed".into(), serde_json::to_value(failed)?);
    json.insert("plan".into(), serde_json::to_value(plan)?);
    json.insert(
        "settings".into(),
        serde_json::json!({
            "batch_size": 500, "max_batches_in_flight": 4, "connections": 2,
            "poll_interval": "5s", "postgres_fsync": plan.fsync, "emulator_max_streams": 1000,
        }),
    );
    json.insert("machine".into(), machine());
    json.insert("per_run".into(), runs.into());
    // The binary lives in target/release: its grandparent is the target directory.
    let target = PathBuf::from(crate::procs::BIN)
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("pipeline.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    Ok(path)
}

/// CPU model, cores, memory, kernel, PostgreSQL version.
pub fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| (kb / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    let run = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    serde_json::json!({
        "cpu_model": model,
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "memory_gib": mem_gib,
        "kernel": run("uname", &["-sr"]),
        "postgres": run("pg_config", &["--version"]),
    })
}
