//! Raising `SETTINGS_MAX_CONCURRENT_STREAMS` after the handshake, as APNs does under token
//! auth: a connection starts at 1 stream and gets the full limit after its first success.
//!
//! h2's server cannot change its settings after the handshake, so [`StreamLimitIo`] does
//! it underneath, on the byte stream between h2 and TLS:
//! - h2 is configured with the full limit (so it enforces no less), and the first frame it
//!   writes, its SETTINGS, is rewritten to advertise the initial limit instead;
//! - once [`RaiseHandle::raise`] is called, a SETTINGS frame with the full limit is slipped
//!   in at the next frame boundary of what h2 writes (frames are tracked by their 9-byte
//!   headers and 24-bit lengths);
//! - the peer acknowledges SETTINGS frames in order, so the wrapper counts the SETTINGS
//!   frames sent (h2's and its own) and removes the ACK of its own from the incoming bytes
//!   before h2 sees it (h2 would take an ACK it did not ask for as a protocol error).
//!
//! After that ACK the wrapper passes bytes straight through. Connections that never need
//! a raise are passed through from the start.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const HEADER_LEN: usize = 9;
const TYPE_SETTINGS: u8 = 0x4;
const FLAG_ACK: u8 = 0x1;
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// The client's connection preface (`PRI * HTTP/2.0...`) precedes its frames.
const CLIENT_PREFACE_LEN: usize = 24;
const READ_CHUNK: usize = 16 * 1024;

/// Asks a [`StreamLimitIo`] to advertise its full limit.
#[derive(Clone, Debug)]
pub(crate) struct RaiseHandle(Arc<AtomicBool>);

impl RaiseHandle {
    pub fn raise(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A server-side IO wrapper; see the module documentation.
pub(crate) struct StreamLimitIo<T> {
    inner: T,
    /// `None`: plain pass-through.
    state: Option<Box<State>>,
}

impl<T> StreamLimitIo<T> {
    /// `limits`: `Some((initial, raised))` to start at `initial` streams and advertise
    /// `raised` when asked; h2 must be configured with `raised`.
    pub fn new(inner: T, limits: Option<(u32, u32)>) -> (Self, Option<RaiseHandle>) {
        let Some((initial, raised)) = limits else {
            return (StreamLimitIo { inner, state: None }, None);
        };
        let flag = Arc::new(AtomicBool::new(false));
        let state = State {
            initial,
            raised,
            raise: flag.clone(),
            capture: Some(Vec::with_capacity(64)),
            pending: Vec::new(),
            pending_pos: 0,
            out: FrameCursor::default(),
            injected: false,
            acks: VecDeque::new(),
            rbuf: Vec::new(),
            rpos: 0,
            ready: 0,
            preface_left: CLIENT_PREFACE_LEN,
            payload_left: 0,
            swallowed: false,
        };
        let io = StreamLimitIo {
            inner,
            state: Some(Box::new(state)),
        };
        (io, Some(RaiseHandle(flag)))
    }
}

struct State {
    initial: u32,
    raised: u32,
    raise: Arc<AtomicBool>,
    // Outgoing.
    /// h2's first frame (its SETTINGS) while it is being collected for the rewrite.
    capture: Option<Vec<u8>>,
    /// Bytes of ours (the rewritten or the injected SETTINGS) to write before h2's next.
    pending: Vec<u8>,
    pending_pos: usize,
    out: FrameCursor,
    injected: bool,
    /// SETTINGS frames sent and not yet acknowledged, oldest first: `true` for ours.
    acks: VecDeque<bool>,
    // Incoming: bytes read, `rbuf[rpos..ready]` cleared for h2, `rbuf[ready..]` not yet.
    rbuf: Vec<u8>,
    rpos: usize,
    ready: usize,
    preface_left: usize,
    payload_left: usize,
    /// Our ACK has been removed: nothing more to do.
    swallowed: bool,
}

impl State {
    fn done(&self) -> bool {
        self.swallowed && self.rbuf.is_empty() && self.pending.is_empty() && self.capture.is_none()
    }

    fn should_inject(&self) -> bool {
        !self.injected
            && self.capture.is_none()
            && self.out.at_boundary()
            && self.raise.load(Ordering::Acquire)
    }

    fn inject(&mut self) {
        self.pending.extend_from_slice(&settings_frame(self.raised));
        self.injected = true;
        self.acks.push_back(true);
    }

    fn drain_pending<T: AsyncWrite + Unpin>(
        &mut self,
        inner: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending_pos < self.pending.len() {
            let n =
                ready!(Pin::new(&mut *inner).poll_write(cx, &self.pending[self.pending_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending_pos += n;
        }
        self.pending.clear();
        self.pending_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Takes bytes of h2's first frame; once it is whole, queues it rewritten.
    fn capture_first(&mut self, buf: &[u8]) -> usize {
        let capture = self.capture.as_mut().expect("capturing");
        let mut taken = 0;
        loop {
            let need = if capture.len() < HEADER_LEN {
                HEADER_LEN - capture.len()
            } else {
                HEADER_LEN + frame_len(&capture[..HEADER_LEN]) - capture.len()
            };
            if need == 0 || taken == buf.len() {
                break;
            }
            let n = need.min(buf.len() - taken);
            capture.extend_from_slice(&buf[taken..taken + n]);
            taken += n;
        }
        let whole = capture.len() >= HEADER_LEN
            && capture.len() == HEADER_LEN + frame_len(&capture[..HEADER_LEN]);
        if whole {
            let mut frame = self.capture.take().expect("capturing");
            if frame[3] == TYPE_SETTINGS && frame[4] & FLAG_ACK == 0 {
                set_max_concurrent_streams(&mut frame, self.initial);
                self.acks.push_back(false);
            } else {
                tracing::warn!("h2 did not start with SETTINGS: stream limit left as is");
            }
            self.pending.extend_from_slice(&frame);
        }
        taken
    }

    fn poll_write<T: AsyncWrite + Unpin>(
        &mut self,
        inner: &mut T,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.drain_pending(inner, cx))?;
        if self.capture.is_some() {
            return Poll::Ready(Ok(self.capture_first(buf)));
        }
        if self.should_inject() {
            self.inject();
            ready!(self.drain_pending(inner, cx))?;
        }
        // Stop at the next boundary while an injection waits for one.
        let limit = if !self.injected && self.raise.load(Ordering::Acquire) {
            self.out.until_boundary(buf)
        } else {
            buf.len()
        };
        let n = ready!(Pin::new(&mut *inner).poll_write(cx, &buf[..limit]))?;
        let acks = &mut self.acks;
        self.out.advance(&buf[..n], |header| {
            if header[3] == TYPE_SETTINGS && header[4] & FLAG_ACK == 0 {
                acks.push_back(false);
            }
        });
        Poll::Ready(Ok(n))
    }

    fn poll_flush<T: AsyncWrite + Unpin>(
        &mut self,
        inner: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.drain_pending(inner, cx))?;
        if self.should_inject() {
            self.inject();
            ready!(self.drain_pending(inner, cx))?;
        }
        Pin::new(inner).poll_flush(cx)
    }

    fn poll_read<T: AsyncRead + Unpin>(
        &mut self,
        inner: &mut T,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.rpos < self.ready {
                let n = (self.ready - self.rpos).min(out.remaining());
                out.put_slice(&self.rbuf[self.rpos..self.rpos + n]);
                self.rpos += n;
                if self.rpos == self.rbuf.len() {
                    self.rbuf.clear();
                    self.rpos = 0;
                    self.ready = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if self.swallowed && self.rbuf.is_empty() {
                return Pin::new(inner).poll_read(cx, out);
            }
            if self.rpos > 0 {
                self.rbuf.drain(..self.rpos);
                self.ready -= self.rpos;
                self.rpos = 0;
            }
            let old = self.rbuf.len();
            self.rbuf.resize(old + READ_CHUNK, 0);
            let mut chunk = ReadBuf::new(&mut self.rbuf[old..]);
            let polled = Pin::new(&mut *inner).poll_read(cx, &mut chunk);
            let n = chunk.filled().len();
            self.rbuf.truncate(old + n);
            ready!(polled)?;
            if n == 0 {
                // End of stream: hand over what is left, whole frames or not.
                self.ready = self.rbuf.len();
                if self.rpos == self.ready {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            self.scan();
        }
    }

    /// Clears incoming bytes for h2 up to the next incomplete frame header, removing the
    /// ACK of our SETTINGS.
    fn scan(&mut self) {
        while !self.swallowed && self.ready < self.rbuf.len() {
            let available = self.rbuf.len() - self.ready;
            if self.preface_left > 0 || self.payload_left > 0 {
                let left = if self.preface_left > 0 {
                    &mut self.preface_left
                } else {
                    &mut self.payload_left
                };
                let n = (*left).min(available);
                *left -= n;
                self.ready += n;
                continue;
            }
            if available < HEADER_LEN {
                break;
            }
            let header = &self.rbuf[self.ready..self.ready + HEADER_LEN];
            let len = frame_len(header);
            if header[3] == TYPE_SETTINGS && header[4] & FLAG_ACK != 0 {
                let ours = self.acks.pop_front() == Some(true);
                if ours && len == 0 {
                    self.rbuf.drain(self.ready..self.ready + HEADER_LEN);
                    self.swallowed = true;
                    break;
                }
            }
            self.ready += HEADER_LEN;
            self.payload_left = len;
        }
        if self.swallowed {
            self.ready = self.rbuf.len();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StreamLimitIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.state.as_deref_mut() {
            None => Pin::new(&mut this.inner).poll_read(cx, out),
            Some(state) => {
                let polled = state.poll_read(&mut this.inner, cx, out);
                if state.done() {
                    this.state = None;
                }
                polled
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StreamLimitIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.state.as_deref_mut() {
            None => Pin::new(&mut this.inner).poll_write(cx, buf),
            Some(state) => {
                let polled = state.poll_write(&mut this.inner, cx, buf);
                if state.done() {
                    this.state = None;
                }
                polled
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.state.as_deref_mut() {
            None => Pin::new(&mut this.inner).poll_flush(cx),
            Some(state) => state.poll_flush(&mut this.inner, cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(state) = this.state.as_deref_mut() {
            ready!(state.drain_pending(&mut this.inner, cx))?;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Where a byte stream is in its sequence of frames.
#[derive(Clone, Copy, Default)]
struct FrameCursor {
    header: [u8; HEADER_LEN],
    have: usize,
    payload_left: usize,
}

impl FrameCursor {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }

    /// Moves over `bytes`, calling `on_header` with each frame header completed.
    fn advance(&mut self, mut bytes: &[u8], mut on_header: impl FnMut(&[u8; HEADER_LEN])) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (HEADER_LEN - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == HEADER_LEN {
                self.have = 0;
                self.payload_left = frame_len(&self.header);
                on_header(&self.header);
            }
        }
    }

    /// How many of `bytes` come before the next frame boundary (all, if none is in them).
    fn until_boundary(&self, bytes: &[u8]) -> usize {
        if self.at_boundary() {
            return 0;
        }
        let mut cursor = *self;
        let mut pos = 0;
        while pos < bytes.len() {
            cursor.advance(&bytes[pos..pos + 1], |_| {});
            pos += 1;
            if cursor.at_boundary() {
                return pos;
            }
            // Skip the rest of a payload at once.
            if cursor.payload_left > 0 {
                let n = cursor.payload_left.min(bytes.len() - pos);
                cursor.payload_left -= n;
                pos += n;
                if cursor.at_boundary() {
                    return pos;
                }
            }
        }
        pos
    }
}

fn frame_len(header: &[u8]) -> usize {
    (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2])
}

/// A SETTINGS frame carrying only `MAX_CONCURRENT_STREAMS`.
fn settings_frame(max_streams: u32) -> [u8; HEADER_LEN + 6] {
    let mut frame = [0u8; HEADER_LEN + 6];
    frame[2] = 6;
    frame[3] = TYPE_SETTINGS;
    frame[9..11].copy_from_slice(&MAX_CONCURRENT_STREAMS.to_be_bytes());
    frame[11..15].copy_from_slice(&max_streams.to_be_bytes());
    frame
}

/// Sets `MAX_CONCURRENT_STREAMS` in a whole SETTINGS frame, adding it if absent.
fn set_max_concurrent_streams(frame: &mut Vec<u8>, value: u32) {
    for entry in frame[HEADER_LEN..].chunks_exact_mut(6) {
        if entry[..2] == MAX_CONCURRENT_STREAMS.to_be_bytes() {
            entry[2..].copy_from_slice(&value.to_be_bytes());
            return;
        }
    }
    frame.extend_from_slice(&MAX_CONCURRENT_STREAMS.to_be_bytes());
    frame.extend_from_slice(&value.to_be_bytes());
    let len = frame.len() - HEADER_LEN;
    frame[..3].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::future::Future;
    use tokio::io::DuplexStream;
    use tokio::sync::watch;

    /// Reads and writes at most a few bytes per call, so frames split everywhere.
    struct Trickle {
        inner: DuplexStream,
        /// `false`: pass everything at once.
        trickle: bool,
        step: usize,
    }

    impl Trickle {
        fn next(&mut self) -> usize {
            if !self.trickle {
                return usize::MAX;
            }
            self.step = self.step % 7 + 1;
            self.step
        }
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self.next().min(buf.remaining());
            let mut small = ReadBuf::new(buf.initialize_unfilled_to(n));
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut small))?;
            let filled = small.filled().len();
            buf.advance(filled);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.next().min(buf.len());
            Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[test]
    fn frame_helpers() {
        let mut frame = settings_frame(1000).to_vec();
        assert_eq!(frame_len(&frame), 6);
        set_max_concurrent_streams(&mut frame, 1);
        assert_eq!(frame, settings_frame(1).to_vec());
        let mut empty = vec![0, 0, 0, TYPE_SETTINGS, 0, 0, 0, 0, 0];
        set_max_concurrent_streams(&mut empty, 7);
        assert_eq!(empty, settings_frame(7).to_vec());

        // Two frames: 9+2 and 9+0 bytes.
        let bytes = [[0, 0, 2, 0, 0, 0, 0, 0, 1, 0xaa, 0xbb].as_slice(), &[0; 9]].concat();
        let mut cursor = FrameCursor::default();
        let mut headers = 0;
        cursor.advance(&bytes[..4], |_| headers += 1);
        assert_eq!((headers, cursor.at_boundary()), (0, false));
        assert_eq!(cursor.until_boundary(&bytes[4..]), 7);
        assert_eq!(cursor.until_boundary(&bytes[4..8]), 4);
        cursor.advance(&bytes[4..11], |_| headers += 1);
        assert_eq!((headers, cursor.at_boundary()), (1, true));
        assert_eq!(cursor.until_boundary(&bytes[11..]), 0);
        cursor.advance(&bytes[11..], |_| headers += 1);
        assert_eq!((headers, cursor.at_boundary()), (2, true));
    }

    async fn limit_rises(trickle: bool) {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let server_io = Trickle {
            inner: server_io,
            trickle,
            step: 0,
        };
        let (io, raise) = StreamLimitIo::new(server_io, Some((1, 100)));
        let raise = raise.unwrap();
        let server = tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .max_concurrent_streams(100)
                .handshake::<_, bytes::Bytes>(io)
                .await
                .unwrap();
            let mut served = 0;
            while let Some(request) = conn.accept().await {
                let (_, mut respond) = request.unwrap();
                respond
                    .send_response(http::Response::new(()), true)
                    .unwrap();
                served += 1;
                raise.raise();
            }
            served
        });

        let (mut send, conn) = h2::client::handshake(client_io).await.unwrap();
        let (limit_tx, mut limit) = watch::channel(0usize);
        let client = tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            poll_fn(|cx| {
                let polled = conn.as_mut().poll(cx);
                limit_tx.send_replace(conn.max_concurrent_send_streams());
                polled
            })
            .await
        });
        let request = || {
            http::Request::post("https://localhost/3/device/x")
                .body(())
                .unwrap()
        };
        limit.wait_for(|l| *l == 1).await.unwrap();
        let (response, _) = send.send_request(request(), true).unwrap();
        assert_eq!(response.await.unwrap().status(), 200);
        limit.wait_for(|l| *l == 100).await.unwrap();
        let mut answers = Vec::new();
        for _ in 0..50 {
            send = send.ready().await.unwrap();
            answers.push(send.send_request(request(), true).unwrap().0);
        }
        for answer in answers {
            assert_eq!(answer.await.unwrap().status(), 200);
        }
        drop(send);
        client.await.unwrap().unwrap();
        assert_eq!(server.await.unwrap(), 51);
    }

    #[tokio::test]
    async fn the_limit_rises_without_a_protocol_error() {
        limit_rises(false).await;
    }

    #[tokio::test]
    async fn the_limit_rises_when_every_frame_is_split() {
        limit_rises(true).await;
    }

    #[tokio::test]
    async fn pass_through_without_limits() {
        let (client_io, server_io) = tokio::io::duplex(4096);
        let (io, raise) = StreamLimitIo::new(server_io, None);
        assert!(raise.is_none());
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(io).await.unwrap();
            let (_, mut respond) = conn.accept().await.unwrap().unwrap();
            respond
                .send_response(http::Response::new(()), true)
                .unwrap();
            poll_fn(|cx| conn.poll_closed(cx)).await.unwrap();
        });
        let (send, conn) = h2::client::handshake(client_io).await.unwrap();
        let client = tokio::spawn(conn);
        let mut send = send.ready().await.unwrap();
        let request = http::Request::post("https://localhost/").body(()).unwrap();
        let (response, _) = send.send_request(request, true).unwrap();
        assert_eq!(response.await.unwrap().status(), 200);
        drop(send);
        client.await.unwrap().unwrap();
        server.await.unwrap();
    }
}
