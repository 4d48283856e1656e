//! What was asked and answered: one [`Record`] per request, built only when someone
//! listens (a subscriber, the `--record` file, or the in-memory history), and handed out
//! without ever waiting on a reader or the disk.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;

use anyhow::Context;
use bytes::Bytes;
use serde::{Serialize, Serializer};
use tokio::sync::broadcast;

/// One request and the answer it got. Serialized as one JSON line in the record file:
/// `at` in RFC 3339 with microseconds (latency is measured from it: milliseconds are too
/// coarse), `payload` as the JSON it is (a string if it is not JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    /// The connection it came on (numbered from 1 in accept order).
    pub connection: u64,
    /// The `apns-id` answered: the request's, or the one the emulator made up (a
    /// broadcast: its `apns-request-id`).
    pub apns_id: String,
    /// As in the path; empty when the path had none.
    pub device_token: String,
    pub topic: Option<String>,
    pub push_type: Option<String>,
    /// `None` when absent or not a number.
    pub priority: Option<u8>,
    pub expiration: Option<u64>,
    pub collapse_id: Option<String>,
    #[serde(serialize_with = "json_or_text")]
    pub payload: Bytes,
    pub status: u16,
    pub reason: Option<String>,
    /// A broadcast's `apns-channel-id` (empty if it had none); `None` for a device push.
    /// A broadcast's `topic` is the bundle id in its path, its `apns_id` the
    /// `apns-request-id` answered, and its `device_token` empty. Left out of the JSON
    /// line when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_id: Option<String>,
}

impl Record {
    /// Whether it is a broadcast (`POST /4/broadcasts/apps/<bundle>`).
    pub fn is_broadcast(&self) -> bool {
        self.channel_id.is_some()
    }

    /// The payload as JSON, if it is JSON.
    pub fn payload_json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.payload).ok()
    }
}

pub(crate) fn rfc3339<S: Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*at))
}

pub(crate) fn json_or_text<S: Serializer>(payload: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(json) => json.serialize(s),
        Err(_) => s.serialize_str(&String::from_utf8_lossy(payload)),
    }
}

/// Subscribers may fall this many records behind before they lose some: two seconds at
/// 30k requests/s.
const SUBSCRIBER_BACKLOG: usize = 1 << 16;

/// Records of type `R`: the HTTP/2 emulator's [`Record`], or the binary emulator's.
pub(crate) struct Recorder<R = Record> {
    subscribers: broadcast::Sender<Arc<R>>,
    history: Mutex<VecDeque<Arc<R>>>,
    history_len: usize,
    file: Option<FileWriter<R>>,
}

struct FileWriter<R> {
    /// `None` asks the writer to flush and stop.
    lines: mpsc::Sender<Option<Arc<R>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<R: Serialize + Send + Sync + 'static> Recorder<R> {
    /// `history_len`: how many of the latest records [`Recorder::history`] keeps.
    pub fn new(file: Option<&Path>, history_len: usize) -> anyhow::Result<Recorder<R>> {
        let file = file
            .map(|path| -> anyhow::Result<FileWriter<R>> {
                let out = File::create(path)
                    .with_context(|| format!("cannot create record file {}", path.display()))?;
                let (lines, rx) = mpsc::channel();
                let path = path.to_owned();
                let thread = std::thread::Builder::new()
                    .name("emulator-record".into())
                    .spawn(move || write_lines(BufWriter::new(out), rx, &path))?;
                Ok(FileWriter {
                    lines,
                    thread: Mutex::new(Some(thread)),
                })
            })
            .transpose()?;
        Ok(Recorder {
            subscribers: broadcast::channel(SUBSCRIBER_BACKLOG).0,
            history: Mutex::new(VecDeque::new()),
            history_len,
            file,
        })
    }

    /// Whether a record would go anywhere (if not, don't build it).
    pub fn wanted(&self) -> bool {
        self.history_len > 0 || self.file.is_some() || self.subscribers.receiver_count() > 0
    }

    pub fn record(&self, record: R) {
        let record = Arc::new(record);
        if let Some(file) = &self.file {
            let _ = file.lines.send(Some(record.clone()));
        }
        if self.history_len > 0 {
            let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
            if history.len() == self.history_len {
                history.pop_front();
            }
            history.push_back(record.clone());
        }
        let _ = self.subscribers.send(record);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<R>> {
        self.subscribers.subscribe()
    }

    pub fn history(&self) -> Vec<Arc<R>> {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        history.iter().cloned().collect()
    }

    /// Stops the file writer once it has written everything recorded so far. Blocks.
    pub fn finish(&self) {
        let Some(file) = &self.file else { return };
        let _ = file.lines.send(None);
        let thread = file.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// The writer thread: a line per record, flushed whenever it catches up.
fn write_lines<R: Serialize>(
    out: BufWriter<File>,
    rx: mpsc::Receiver<Option<Arc<R>>>,
    path: &Path,
) {
    let mut writer = LineWriter {
        out,
        path,
        failed: false,
    };
    loop {
        let Ok(Some(record)) = rx.recv() else { break };
        writer.write(&*record);
        let stop = loop {
            match rx.try_recv() {
                Ok(Some(record)) => writer.write(&*record),
                Ok(None) | Err(mpsc::TryRecvError::Disconnected) => break true,
                Err(mpsc::TryRecvError::Empty) => break false,
            }
        };
        let flushed = writer.out.flush();
        writer.report(flushed);
        if stop {
            break;
        }
    }
}

struct LineWriter<'a> {
    out: BufWriter<File>,
    path: &'a Path,
    /// Warn once, not per line.
    failed: bool,
}

impl LineWriter<'_> {
    fn write<R: Serialize>(&mut self, record: &R) {
        let written = serde_json::to_writer(&mut self.out, record)
            .map_err(std::io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"));
        self.report(written);
    }

    fn report(&mut self, result: std::io::Result<()>) {
        if let Err(error) = result {
            if !self.failed {
                tracing::warn!(path = %self.path.display(), %error, "cannot write the record file");
                self.failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    pub(crate) fn sample(payload: &'static [u8]) -> Record {
        Record {
            at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            connection: 1,
            apns_id: "123e4567-e89b-12d3-a456-426614174000".into(),
            device_token: "ab".repeat(32),
            topic: Some("com.example.app".into()),
            push_type: Some("alert".into()),
            priority: Some(10),
            expiration: None,
            collapse_id: None,
            payload: Bytes::from_static(payload),
            status: 200,
            reason: None,
            channel_id: None,
        }
    }

    #[test]
    fn serializes_payload_as_json() {
        let line = serde_json::to_value(sample(br#"{"aps":{"alert":"hi"}}"#)).unwrap();
        assert_eq!(line["payload"], serde_json::json!({"aps": {"alert": "hi"}}));
        assert_eq!(line["at"], "2023-11-14T22:13:20.123000Z");
        assert_eq!(line["status"], 200);
        let text = serde_json::to_value(sample(b"not json")).unwrap();
        assert_eq!(text["payload"], "not json");
        assert!(text.get("channel_id").is_none());
        let broadcast = Record {
            channel_id: Some("AAAA".into()),
            ..sample(b"{}")
        };
        assert!(broadcast.is_broadcast());
        assert_eq!(
            serde_json::to_value(broadcast).unwrap()["channel_id"],
            "AAAA"
        );
    }

    #[test]
    fn history_is_bounded_and_file_gets_every_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.jsonl");
        let recorder = Recorder::new(Some(&path), 2).unwrap();
        assert!(recorder.wanted());
        let mut rx = recorder.subscribe();
        for status in [200, 400, 410] {
            recorder.record(Record {
                status,
                ..sample(b"{}")
            });
        }
        let kept: Vec<u16> = recorder.history().iter().map(|r| r.status).collect();
        assert_eq!(kept, [400, 410]);
        assert_eq!(rx.try_recv().unwrap().status, 200);
        recorder.finish();
        let text = std::fs::read_to_string(&path).unwrap();
        let statuses: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["status"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(statuses, [200, 400, 410]);
    }

    #[test]
    fn nothing_wanted_without_listeners() {
        let recorder: Recorder = Recorder::new(None, 0).unwrap();
        assert!(!recorder.wanted());
        let rx = recorder.subscribe();
        assert!(recorder.wanted());
        drop(rx);
        assert!(!recorder.wanted());
    }
}
