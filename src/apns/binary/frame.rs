//! The binary protocol's bytes, and nothing else: notification frames (commands 0, 1 and
//! 2), the error-response packet and feedback tuples, big-endian as Apple's Binary
//! Provider API specifies them. The client encodes command 2 and decodes error packets
//! and feedback; the emulator decodes all three commands. No I/O.
//!
//! ```text
//! command 0:  0 | token len (2) | token | payload len (2) | payload
//! command 1:  1 | identifier (4) | expiry (4) | token len (2) | token | payload len (2) | payload
//! command 2:  2 | frame len (4) | items, each: item id (1) | item len (2) | data
//!             items: 1 token (32), 2 payload (<= 2048), 3 identifier (4),
//!                    4 expiration (4, epoch seconds, 0: do not store), 5 priority (1: 10 or 5)
//! error:      8 | status (1) | identifier (4)
//! feedback:   timestamp (4, epoch seconds) | token len (2) | token
//! ```

use std::fmt;

/// Device tokens of the binary protocol are 32 bytes (64 hex digits).
pub const TOKEN_LEN: usize = 32;
/// The largest payload the binary protocol takes.
pub const MAX_PAYLOAD: usize = 2048;
pub const ERROR_PACKET_LEN: usize = 6;
/// The largest command-2 frame a decoder buffers. A notification's items take about
/// 2.1 KB; anything far beyond is refused as an invalid payload size.
pub const MAX_FRAME: usize = 64 * 1024;

/// Command bytes.
pub mod command {
    /// The original format: no identifier, no answer when it fails but a closed connection.
    pub const SIMPLE: u8 = 0;
    /// "Enhanced": identifier and expiry.
    pub const ENHANCED: u8 = 1;
    /// Items in a frame: identifier, expiration and priority.
    pub const FRAME: u8 = 2;
    /// The server's error response.
    pub const ERROR: u8 = 8;
}

/// Item ids of a command-2 frame.
mod item {
    pub const TOKEN: u8 = 1;
    pub const PAYLOAD: u8 = 2;
    pub const IDENTIFIER: u8 = 3;
    pub const EXPIRATION: u8 = 4;
    pub const PRIORITY: u8 = 5;
}

/// One notification as the client writes it (command 2); the identifier is the
/// connection's to choose, so it is given to [`encode_frame`] separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub token: [u8; TOKEN_LEN],
    /// At most [`MAX_PAYLOAD`] bytes (the encoder does not check: callers do, per row).
    pub payload: Vec<u8>,
    /// Epoch seconds; `Some(0)`: deliver once and do not store. `None`: item left out.
    pub expiration: Option<u32>,
    /// 10 (now) or 5 (power-considerate); `None`: item left out (APNs assumes 10).
    pub priority: Option<u8>,
}

/// Appends `push` as a command-2 frame carrying `identifier`.
pub fn encode_frame(push: &Push, identifier: u32, out: &mut Vec<u8>) {
    let start = out.len();
    out.push(command::FRAME);
    out.extend_from_slice(&[0; 4]); // frame length, filled in below
    put_item(out, item::TOKEN, &push.token);
    put_item(out, item::PAYLOAD, &push.payload);
    put_item(out, item::IDENTIFIER, &identifier.to_be_bytes());
    if let Some(expiration) = push.expiration {
        put_item(out, item::EXPIRATION, &expiration.to_be_bytes());
    }
    if let Some(priority) = push.priority {
        put_item(out, item::PRIORITY, &[priority]);
    }
    let len = (out.len() - start - 5) as u32;
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

fn put_item(out: &mut Vec<u8>, id: u8, data: &[u8]) {
    out.push(id);
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends a command-1 ("enhanced") notification: what older providers write.
pub fn encode_enhanced(
    token: &[u8],
    payload: &[u8],
    identifier: u32,
    expiry: u32,
    out: &mut Vec<u8>,
) {
    out.push(command::ENHANCED);
    out.extend_from_slice(&identifier.to_be_bytes());
    out.extend_from_slice(&expiry.to_be_bytes());
    put_sized(out, token);
    put_sized(out, payload);
}

/// Appends a command-0 ("simple") notification: what the oldest scripts write.
pub fn encode_simple(token: &[u8], payload: &[u8], out: &mut Vec<u8>) {
    out.push(command::SIMPLE);
    put_sized(out, token);
    put_sized(out, payload);
}

fn put_sized(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// The 32 bytes of a device token written as 64 hex digits (either case).
pub fn parse_token(hex_token: &str) -> Result<[u8; TOKEN_LEN], String> {
    if hex_token.len() != 2 * TOKEN_LEN {
        return Err(format!(
            "the binary protocol needs a 64-hex-digit (32-byte) device token, \
             this one has {} characters",
            hex_token.len()
        ));
    }
    let mut token = [0; TOKEN_LEN];
    hex::decode_to_slice(hex_token, &mut token)
        .map_err(|_| "the device token is not hexadecimal".to_owned())?;
    Ok(token)
}

/// A status of the error-response packet, as Apple lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    NoErrors,
    Processing,
    MissingToken,
    MissingTopic,
    MissingPayload,
    InvalidTokenSize,
    InvalidTopicSize,
    InvalidPayloadSize,
    InvalidToken,
    /// The server closes the connection (maintenance); the identifier is the last
    /// notification it took, everything after it must be resent.
    Shutdown,
    /// Apple-internal.
    ProtocolError,
    Unknown,
    /// A code Apple never listed.
    Other(u8),
}

impl Status {
    pub fn from_code(code: u8) -> Status {
        match code {
            0 => Status::NoErrors,
            1 => Status::Processing,
            2 => Status::MissingToken,
            3 => Status::MissingTopic,
            4 => Status::MissingPayload,
            5 => Status::InvalidTokenSize,
            6 => Status::InvalidTopicSize,
            7 => Status::InvalidPayloadSize,
            8 => Status::InvalidToken,
            10 => Status::Shutdown,
            128 => Status::ProtocolError,
            255 => Status::Unknown,
            other => Status::Other(other),
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Status::NoErrors => 0,
            Status::Processing => 1,
            Status::MissingToken => 2,
            Status::MissingTopic => 3,
            Status::MissingPayload => 4,
            Status::InvalidTokenSize => 5,
            Status::InvalidTopicSize => 6,
            Status::InvalidPayloadSize => 7,
            Status::InvalidToken => 8,
            Status::Shutdown => 10,
            Status::ProtocolError => 128,
            Status::Unknown => 255,
            Status::Other(code) => code,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Status::NoErrors => "no errors encountered",
            Status::Processing => "processing error",
            Status::MissingToken => "missing device token",
            Status::MissingTopic => "missing topic",
            Status::MissingPayload => "missing payload",
            Status::InvalidTokenSize => "invalid token size",
            Status::InvalidTopicSize => "invalid topic size",
            Status::InvalidPayloadSize => "invalid payload size",
            Status::InvalidToken => "invalid token",
            Status::Shutdown => "shutdown",
            Status::ProtocolError => "protocol error",
            Status::Unknown => "unknown error",
            Status::Other(_) => "unlisted status",
        }
    }
}

/// `invalid token (status 8)`: the form `last_error` and the log use.
impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (status {})", self.name(), self.code())
    }
}

/// The server's answer to a notification it refuses, written just before it closes the
/// connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorPacket {
    pub status: Status,
    /// The refused notification's identifier (for `Shutdown`: the last one taken; for a
    /// command-0 notification, which has none: 0).
    pub identifier: u32,
}

impl ErrorPacket {
    pub fn encode(&self) -> [u8; ERROR_PACKET_LEN] {
        let id = self.identifier.to_be_bytes();
        [
            command::ERROR,
            self.status.code(),
            id[0],
            id[1],
            id[2],
            id[3],
        ]
    }

    /// `Err` when the first byte is not command 8: the peer does not speak the protocol.
    pub fn decode(bytes: &[u8; ERROR_PACKET_LEN]) -> Result<ErrorPacket, String> {
        if bytes[0] != command::ERROR {
            return Err(format!(
                "expected an error response (command 8), got a byte {}",
                bytes[0]
            ));
        }
        Ok(ErrorPacket {
            status: Status::from_code(bytes[1]),
            identifier: u32::from_be_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]),
        })
    }
}

/// A notification as the emulator reads it, whichever command carried it. Items a
/// frame left out are `None`; [`check`] says what Apple would answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Notification {
    pub command: u8,
    /// `None` for command 0, which has none (its error packets carry 0).
    pub identifier: Option<u32>,
    pub token: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Command 1's expiry or command 2's expiration item.
    pub expiration: Option<u32>,
    pub priority: Option<u8>,
}

/// A stream the decoder cannot go on reading: answer with this and close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub status: Status,
    pub identifier: u32,
    pub message: String,
}

/// Reads one notification from the front of `buf`: `Ok(None)` until `buf` holds all of
/// it, then the notification and how many bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Notification, usize)>, Malformed> {
    let Some(&command) = buf.first() else {
        return Ok(None);
    };
    match command {
        command::SIMPLE => Ok(decode_sized(buf, 1).map(|(token, payload, used)| {
            let n = Notification {
                command,
                token: Some(token),
                payload: Some(payload),
                ..Notification::default()
            };
            (n, used)
        })),
        command::ENHANCED => {
            if buf.len() < 9 {
                return Ok(None);
            }
            let identifier = be32(&buf[1..5]);
            let expiry = be32(&buf[5..9]);
            Ok(decode_sized(buf, 9).map(|(token, payload, used)| {
                let n = Notification {
                    command,
                    identifier: Some(identifier),
                    token: Some(token),
                    payload: Some(payload),
                    expiration: Some(expiry),
                    priority: None,
                };
                (n, used)
            }))
        }
        command::FRAME => decode_frame(buf),
        other => Err(Malformed {
            status: Status::Unknown,
            identifier: 0,
            message: format!("unknown command {other}"),
        }),
    }
}

/// Token and payload, each after a 2-byte length, from `at` on.
fn decode_sized(buf: &[u8], at: usize) -> Option<(Vec<u8>, Vec<u8>, usize)> {
    let (token, at) = sized(buf, at)?;
    let (payload, at) = sized(buf, at)?;
    Some((token.to_vec(), payload.to_vec(), at))
}

fn sized(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let len = usize::from(be16(buf.get(at..at + 2)?));
    let data = buf.get(at + 2..at + 2 + len)?;
    Some((data, at + 2 + len))
}

fn decode_frame(buf: &[u8]) -> Result<Option<(Notification, usize)>, Malformed> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = be32(&buf[1..5]) as usize;
    if len > MAX_FRAME {
        return Err(Malformed {
            status: Status::InvalidPayloadSize,
            identifier: 0,
            message: format!("a frame of {len} bytes"),
        });
    }
    let Some(items) = buf.get(5..5 + len) else {
        return Ok(None);
    };
    let mut n = Notification {
        command: command::FRAME,
        ..Notification::default()
    };
    let mut rest = items;
    let mut bad_item = None;
    while !rest.is_empty() {
        let Some((id, data, after)) = rest
            .get(1..3)
            .map(|l| usize::from(be16(l)))
            .and_then(|l| Some((rest[0], rest.get(3..3 + l)?, &rest[3 + l..])))
        else {
            bad_item = Some("an item runs past the end of its frame".to_owned());
            break;
        };
        let fixed = |want: usize| (data.len() == want).then_some(data);
        match id {
            item::TOKEN => n.token = Some(data.to_vec()),
            item::PAYLOAD => n.payload = Some(data.to_vec()),
            item::IDENTIFIER => match fixed(4) {
                Some(d) => n.identifier = Some(be32(d)),
                None => bad_item = Some(format!("an identifier of {} bytes", data.len())),
            },
            item::EXPIRATION => match fixed(4) {
                Some(d) => n.expiration = Some(be32(d)),
                None => bad_item = Some(format!("an expiration of {} bytes", data.len())),
            },
            item::PRIORITY => match fixed(1) {
                Some(d) => n.priority = Some(d[0]),
                None => bad_item = Some(format!("a priority of {} bytes", data.len())),
            },
            // Items Apple might have added later: skipped, as a lenient server would.
            _ => {}
        }
        rest = after;
    }
    match bad_item {
        Some(message) => Err(Malformed {
            status: Status::ProtocolError,
            identifier: n.identifier.unwrap_or(0),
            message,
        }),
        None => Ok(Some((n, 5 + len))),
    }
}

/// What APNs answers for a notification that decoded: `Ok` when it would take it.
/// Token validity beyond its size (status 8) is the server's to know.
pub fn check(n: &Notification) -> Result<(), Status> {
    match &n.token {
        None => return Err(Status::MissingToken),
        Some(t) if t.is_empty() => return Err(Status::MissingToken),
        Some(t) if t.len() != TOKEN_LEN => return Err(Status::InvalidTokenSize),
        Some(_) => {}
    }
    match &n.payload {
        None => return Err(Status::MissingPayload),
        Some(p) if p.is_empty() => return Err(Status::MissingPayload),
        Some(p) if p.len() > MAX_PAYLOAD => return Err(Status::InvalidPayloadSize),
        Some(_) => {}
    }
    match n.priority {
        None | Some(5) | Some(10) => Ok(()),
        Some(_) => Err(Status::Processing),
    }
}

/// One entry of the feedback service: a token APNs could not deliver to, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackTuple {
    /// Epoch seconds: when APNs found the app gone from the device.
    pub timestamp: u32,
    pub token: Vec<u8>,
}

pub fn encode_feedback(t: &FeedbackTuple, out: &mut Vec<u8>) {
    out.extend_from_slice(&t.timestamp.to_be_bytes());
    put_sized(out, &t.token);
}

/// Reads one tuple from the front of `buf`: `None` until `buf` holds all of it.
pub fn decode_feedback(buf: &[u8]) -> Option<(FeedbackTuple, usize)> {
    let timestamp = be32(buf.get(0..4)?);
    let (token, used) = sized(buf, 4)?;
    Some((
        FeedbackTuple {
            timestamp,
            token: token.to_vec(),
        },
        used,
    ))
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN_HEX: &str = "740f4707bebcf74f9b7c25d48e3358945f6aa01da5ddb387462c7eaf61bb78ad";

    fn token() -> [u8; 32] {
        parse_token(TOKEN_HEX).unwrap()
    }

    #[test]
    fn a_command_2_frame_byte_for_byte() {
        let push = Push {
            token: token(),
            payload: br#"{"aps":{}}"#.to_vec(),
            expiration: Some(0x5f5e_1000),
            priority: Some(10),
        };
        let mut out = vec![0xee]; // appends, never overwrites
        encode_frame(&push, 0x0102_0304, &mut out);
        let mut want = vec![0xee, 2];
        let items_len = (3 + 32) + (3 + 10) + (3 + 4) + (3 + 4) + (3 + 1);
        want.extend_from_slice(&(items_len as u32).to_be_bytes());
        want.extend_from_slice(&[1, 0, 32]);
        want.extend_from_slice(&token());
        want.extend_from_slice(&[2, 0, 10]);
        want.extend_from_slice(br#"{"aps":{}}"#);
        want.extend_from_slice(&[3, 0, 4, 1, 2, 3, 4]);
        want.extend_from_slice(&[4, 0, 4, 0x5f, 0x5e, 0x10, 0x00]);
        want.extend_from_slice(&[5, 0, 1, 10]);
        assert_eq!(out, want);

        let (n, used) = decode(&out[1..]).unwrap().unwrap();
        assert_eq!(used, out.len() - 1);
        assert_eq!(
            n,
            Notification {
                command: 2,
                identifier: Some(0x0102_0304),
                token: Some(token().to_vec()),
                payload: Some(br#"{"aps":{}}"#.to_vec()),
                expiration: Some(0x5f5e_1000),
                priority: Some(10),
            }
        );
        assert_eq!(check(&n), Ok(()));
    }

    #[test]
    fn optional_items_are_left_out() {
        let push = Push {
            token: token(),
            payload: b"{}".to_vec(),
            expiration: None,
            priority: None,
        };
        let mut out = Vec::new();
        encode_frame(&push, 7, &mut out);
        assert_eq!(out.len(), 5 + 35 + 5 + 7);
        let (n, _) = decode(&out).unwrap().unwrap();
        assert_eq!((n.expiration, n.priority), (None, None));
    }

    #[test]
    fn commands_0_and_1_byte_for_byte() {
        let mut simple = Vec::new();
        encode_simple(&token(), b"{}", &mut simple);
        let mut want = vec![0, 0, 32];
        want.extend_from_slice(&token());
        want.extend_from_slice(&[0, 2, b'{', b'}']);
        assert_eq!(simple, want);
        let (n, used) = decode(&simple).unwrap().unwrap();
        assert_eq!((n.command, n.identifier, used), (0, None, simple.len()));
        assert_eq!(n.payload.as_deref(), Some(&b"{}"[..]));

        let mut enhanced = Vec::new();
        encode_enhanced(&token(), b"{}", 9, 1_700_000_000, &mut enhanced);
        let mut want = vec![1, 0, 0, 0, 9];
        want.extend_from_slice(&1_700_000_000u32.to_be_bytes());
        want.extend_from_slice(&[0, 32]);
        want.extend_from_slice(&token());
        want.extend_from_slice(&[0, 2, b'{', b'}']);
        assert_eq!(enhanced, want);
        let (n, _) = decode(&enhanced).unwrap().unwrap();
        assert_eq!(
            (n.command, n.identifier, n.expiration),
            (1, Some(9), Some(1_700_000_000))
        );
    }

    #[test]
    fn partial_input_waits_for_more() {
        let mut stream = Vec::new();
        encode_simple(&token(), b"{}", &mut stream);
        encode_enhanced(&token(), b"{}", 1, 0, &mut stream);
        let push = Push {
            token: token(),
            payload: b"{}".to_vec(),
            expiration: Some(0),
            priority: Some(5),
        };
        encode_frame(&push, 2, &mut stream);
        // Every prefix short of a whole notification asks for more; whole ones decode.
        let mut at = 0;
        let mut seen = Vec::new();
        for end in 0..=stream.len() {
            if let Some((n, used)) = decode(&stream[at..end]).unwrap() {
                assert_eq!(at + used, end);
                seen.push(n.command);
                at = end;
            }
        }
        assert_eq!(seen, [0, 1, 2]);
        assert_eq!(at, stream.len());
    }

    #[test]
    fn what_apns_would_refuse() {
        let good = Notification {
            command: 2,
            identifier: Some(1),
            token: Some(vec![0; 32]),
            payload: Some(b"{}".to_vec()),
            expiration: None,
            priority: None,
        };
        assert_eq!(check(&good), Ok(()));
        let with = |f: &dyn Fn(&mut Notification)| {
            let mut n = good.clone();
            f(&mut n);
            check(&n)
        };
        assert_eq!(with(&|n| n.token = None), Err(Status::MissingToken));
        assert_eq!(
            with(&|n| n.token = Some(vec![0; 31])),
            Err(Status::InvalidTokenSize)
        );
        assert_eq!(with(&|n| n.payload = None), Err(Status::MissingPayload));
        assert_eq!(
            with(&|n| n.payload = Some(vec![b' '; 2049])),
            Err(Status::InvalidPayloadSize)
        );
        assert_eq!(with(&|n| n.payload = Some(vec![b' '; 2048])), Ok(()));
        assert_eq!(with(&|n| n.priority = Some(7)), Err(Status::Processing));
    }

    #[test]
    fn malformed_streams() {
        let e = decode(&[9, 1, 2]).unwrap_err();
        assert_eq!((e.status, e.identifier), (Status::Unknown, 0));

        let mut huge = vec![2];
        huge.extend_from_slice(&((MAX_FRAME + 1) as u32).to_be_bytes());
        let e = decode(&huge).unwrap_err();
        assert_eq!(e.status, Status::InvalidPayloadSize);

        // Identifier item first, then an item longer than the frame.
        let frame = [2, 0, 0, 0, 9, 3, 0, 4, 0, 0, 0, 42, 1, 0];
        let e = decode(&frame).unwrap_err();
        assert_eq!((e.status, e.identifier), (Status::ProtocolError, 42));
    }

    #[test]
    fn error_packets() {
        let p = ErrorPacket {
            status: Status::InvalidToken,
            identifier: 0x0a0b_0c0d,
        };
        assert_eq!(p.encode(), [8, 8, 0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(ErrorPacket::decode(&p.encode()), Ok(p));
        assert!(ErrorPacket::decode(&[2, 8, 0, 0, 0, 1]).is_err());
        for code in 0..=255u8 {
            assert_eq!(Status::from_code(code).code(), code);
        }
        assert_eq!(Status::Shutdown.to_string(), "shutdown (status 10)");
        assert_eq!(
            Status::from_code(42).to_string(),
            "unlisted status (status 42)"
        );
    }

    #[test]
    fn feedback_tuples() {
        let t = FeedbackTuple {
            timestamp: 1_700_000_000,
            token: token().to_vec(),
        };
        let mut out = Vec::new();
        encode_feedback(&t, &mut out);
        assert_eq!(&out[..6], &[0x65, 0x53, 0xf1, 0x00, 0, 32]);
        assert_eq!(&out[6..], &token());
        assert_eq!(decode_feedback(&out), Some((t, 38)));
        assert_eq!(decode_feedback(&out[..37]), None);
    }

    #[test]
    fn tokens_must_be_64_hex_digits() {
        assert_eq!(parse_token(TOKEN_HEX).unwrap()[0], 0x74);
        assert_eq!(
            parse_token(&TOKEN_HEX.to_uppercase()).unwrap(),
            parse_token(TOKEN_HEX).unwrap()
        );
        assert!(parse_token("abcd").unwrap_err().contains("4 characters"));
        assert!(parse_token(&"zz".repeat(32))
            .unwrap_err()
            .contains("not hexadecimal"));
    }
}
