//! The bytes of an HTTP/2 connection, watched as they pass, for what h2 keeps to itself:
//! the server's GOAWAY with its last-stream-id, and our SETTINGS ACK (by which time h2
//! has applied the server's SETTINGS, a new stream limit). See [`super::connection`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the server's GOAWAY said.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GoAway {
    pub last_stream_id: u32,
    pub code: u32,
}

/// Who hears what the watch sees (the connection's shared state).
pub(super) trait Watcher: Send + Sync + 'static {
    /// The server sent a GOAWAY.
    fn went_away(&self, frame: GoAway);
    /// Our SETTINGS ACK went out: h2 has applied the server's SETTINGS.
    fn settings_applied(&self);
}

/// The connection's bytes, watched as they pass (h2 keeps these to itself): the server's
/// GOAWAY and its last-stream-id as it is read, and our SETTINGS ACK as it is written, by
/// which time h2 has applied the server's SETTINGS (a new stream limit). Only frame
/// headers are parsed: 9 bytes each, and the first 8 bytes of a GOAWAY's payload.
pub(super) struct FrameWatch<S> {
    io: S,
    shared: Arc<dyn Watcher>,
    read: Frames,
    written: Frames,
}

const SETTINGS_FRAME: u8 = 0x4;
const GOAWAY_FRAME: u8 = 0x7;

/// Frame boundaries in one direction of the connection.
struct Frames {
    /// Bytes to pass over before the first frame (the client's preface).
    skip: usize,
    head: [u8; 9],
    /// Bytes of `head` read so far.
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The current frame is a GOAWAY: the start of its payload.
    goaway: Option<Vec<u8>>,
}

enum Seen {
    GoAway(GoAway),
    SettingsAck,
}

impl Frames {
    fn new(skip: usize) -> Frames {
        Frames {
            skip,
            head: [0; 9],
            have: 0,
            left: 0,
            goaway: None,
        }
    }

    fn pass(&mut self, mut data: &[u8], mut seen: impl FnMut(Seen)) {
        let skip = self.skip.min(data.len());
        self.skip -= skip;
        data = &data[skip..];
        while !data.is_empty() {
            if self.left > 0 {
                let n = self.left.min(data.len());
                if let Some(start) = &mut self.goaway {
                    let want = (8 - start.len()).min(n);
                    start.extend_from_slice(&data[..want]);
                    if start.len() == 8 {
                        let last = u32::from_be_bytes([start[0], start[1], start[2], start[3]]);
                        let code = u32::from_be_bytes([start[4], start[5], start[6], start[7]]);
                        self.goaway = None;
                        seen(Seen::GoAway(GoAway {
                            last_stream_id: last & 0x7fff_ffff,
                            code,
                        }));
                    }
                }
                self.left -= n;
                data = &data[n..];
                continue;
            }
            let n = (9 - self.have).min(data.len());
            self.head[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 9 {
                self.have = 0;
                let [l0, l1, l2, kind, flags, ..] = self.head;
                self.left = u32::from_be_bytes([0, l0, l1, l2]) as usize;
                self.goaway = (kind == GOAWAY_FRAME && self.left >= 8).then(Vec::new);
                if kind == SETTINGS_FRAME && flags & 1 == 1 {
                    seen(Seen::SettingsAck);
                }
            }
        }
    }
}

impl<S> FrameWatch<S> {
    pub(super) fn new(io: S, shared: Arc<dyn Watcher>) -> FrameWatch<S> {
        FrameWatch {
            io,
            shared,
            read: Frames::new(0),
            // The client's connection preface.
            written: Frames::new(24),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameWatch<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let this = &mut *self;
            let shared = &this.shared;
            this.read.pass(&buf.filled()[before..], |seen| {
                if let Seen::GoAway(g) = seen {
                    shared.went_away(g)
                }
            });
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameWatch<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            let this = &mut *self;
            let shared = &this.shared;
            this.written.pass(&buf[..n], |seen| {
                if let Seen::SettingsAck = seen {
                    shared.settings_applied()
                }
            });
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
