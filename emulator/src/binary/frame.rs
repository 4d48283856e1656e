//! The server's side of the binary protocol's bytes, from Apple's "Binary Provider API"
//! (the "Provider Communication with Apple Push Notification Service" chapter of the
//! Local and Remote Notification Programming Guide, retired with the protocol in 2021):
//! reading the notifications a provider writes, writing the error response, writing the
//! feedback service's tuples. Every integer is big-endian (network order). No I/O.
//!
//! A provider writes notifications in any of three formats, told apart by the first
//! byte (the command):
//!
//! ```text
//! command 0 ("simple"):   0 | token length (2) | token | payload length (2) | payload
//! command 1 ("enhanced"): 1 | identifier (4) | expiry (4)
//!                           | token length (2) | token | payload length (2) | payload
//! command 2:              2 | frame length (4) | frame data: a sequence of items,
//!                           each item: item id (1) | item data length (2) | item data
//!     item 1: device token, 32 bytes
//!     item 2: payload, JSON, at most 2048 bytes (not null-terminated)
//!     item 3: notification identifier, 4 bytes (opaque: echoed in an error response)
//!     item 4: expiration date, 4 bytes, UNIX epoch seconds (0: deliver once, do not store)
//!     item 5: priority, 1 byte: 10 (send now) or 5 (when it conserves power)
//! ```
//!
//! APNs answers only a notification it refuses: a 6-byte error response, and then it
//! closes the connection (notifications written after the refused one are not taken):
//!
//! ```text
//! error response:         8 | status (1) | identifier (4) of the refused notification
//! ```
//!
//! The feedback service (a separate port) writes, then closes, one tuple per device
//! token it could not deliver to:
//!
//! ```text
//! feedback tuple:         time (4, UNIX epoch seconds) | token length (2) | token
//! ```

use std::fmt;

/// "Device token: 32 bytes".
pub const TOKEN_LEN: usize = 32;
/// "Payload: variable length, less than or equal to 2 kilobytes".
pub const MAX_PAYLOAD: usize = 2048;
/// The error response: command, status, identifier.
pub const ERROR_RESPONSE_LEN: usize = 6;
/// The largest command-2 frame this server buffers. A notification's items take about
/// 2.1 KB; a frame length far beyond that is refused as an invalid payload size rather
/// than waited for.
pub const MAX_FRAME: usize = 64 * 1024;

/// Command bytes.
pub mod command {
    /// Token and payload only; a refusal names identifier 0.
    pub const SIMPLE: u8 = 0;
    /// Identifier and expiry before token and payload.
    pub const ENHANCED: u8 = 1;
    /// A frame of items.
    pub const FRAME: u8 = 2;
    /// The error response.
    pub const ERROR_RESPONSE: u8 = 8;
}

/// Item ids inside a command-2 frame.
pub mod item {
    pub const DEVICE_TOKEN: u8 = 1;
    pub const PAYLOAD: u8 = 2;
    pub const IDENTIFIER: u8 = 3;
    pub const EXPIRATION: u8 = 4;
    pub const PRIORITY: u8 = 5;
}

/// The status codes of an error response, as Apple's table lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 0: no errors encountered (never sent; a notification taken).
    NoErrors,
    /// 1: processing error.
    Processing,
    /// 2: missing device token.
    MissingToken,
    /// 3: missing topic.
    MissingTopic,
    /// 4: missing payload.
    MissingPayload,
    /// 5: invalid token size.
    InvalidTokenSize,
    /// 6: invalid topic size.
    InvalidTopicSize,
    /// 7: invalid payload size.
    InvalidPayloadSize,
    /// 8: invalid token.
    InvalidToken,
    /// 10: shutdown; the identifier names the last notification taken, and every one
    /// written after it must be sent again on a new connection.
    Shutdown,
    /// 128: protocol error (APNs internal).
    ProtocolError,
    /// 255: none (unknown).
    Unknown,
    /// A code not in Apple's table.
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
}

/// `invalid token (8)`, for logs.
impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Status::NoErrors => "no errors",
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
            Status::Unknown => "unknown",
            Status::Other(_) => "unlisted status",
        };
        write!(f, "{name} ({})", self.code())
    }
}

/// The 6 bytes APNs writes before closing a connection: command 8, `status`, and the
/// identifier of the refused notification (for a command-0 notification, which has
/// none: 0; for [`Status::Shutdown`]: the last notification taken).
pub fn error_response(status: Status, identifier: u32) -> [u8; ERROR_RESPONSE_LEN] {
    let [a, b, c, d] = identifier.to_be_bytes();
    [command::ERROR_RESPONSE, status.code(), a, b, c, d]
}

/// A notification read, whichever command carried it. What a frame left out is `None`;
/// [`check`] says what APNs answers for it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Notification {
    /// 0, 1 or 2.
    pub command: u8,
    /// `None` for command 0.
    pub identifier: Option<u32>,
    pub token: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Command 1's expiry, or command 2's expiration item.
    pub expiration: Option<u32>,
    /// Command 2's priority item.
    pub priority: Option<u8>,
}

/// Bytes that cannot be read as a notification: the connection gets an error response
/// with `status` and `identifier`, and closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub status: Status,
    pub identifier: u32,
    pub message: String,
}

/// Reads the notification at the front of `buf`: `Ok(None)` while `buf` holds only part
/// of it, then the notification and how many bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Notification, usize)>, Malformed> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    match first {
        command::SIMPLE => Ok(token_and_payload(buf, 1).map(|(token, payload, end)| {
            let n = Notification {
                command: command::SIMPLE,
                token: Some(token.to_vec()),
                payload: Some(payload.to_vec()),
                ..Notification::default()
            };
            (n, end)
        })),
        command::ENHANCED => {
            let (Some(identifier), Some(expiry)) = (u32_at(buf, 1), u32_at(buf, 5)) else {
                return Ok(None);
            };
            Ok(token_and_payload(buf, 9).map(|(token, payload, end)| {
                let n = Notification {
                    command: command::ENHANCED,
                    identifier: Some(identifier),
                    token: Some(token.to_vec()),
                    payload: Some(payload.to_vec()),
                    expiration: Some(expiry),
                    priority: None,
                };
                (n, end)
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

/// Commands 0 and 1 end with a length-prefixed token and a length-prefixed payload.
fn token_and_payload(buf: &[u8], at: usize) -> Option<(&[u8], &[u8], usize)> {
    let (token, at) = length_prefixed(buf, at)?;
    let (payload, at) = length_prefixed(buf, at)?;
    Some((token, payload, at))
}

/// A 2-byte length at `at`, then that many bytes: the bytes and where they end.
fn length_prefixed(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let len = usize::from(u16_at(buf, at)?);
    let start = at + 2;
    Some((buf.get(start..start + len)?, start + len))
}

fn decode_frame(buf: &[u8]) -> Result<Option<(Notification, usize)>, Malformed> {
    let Some(frame_len) = u32_at(buf, 1) else {
        return Ok(None);
    };
    let frame_len = frame_len as usize;
    if frame_len > MAX_FRAME {
        return Err(Malformed {
            status: Status::InvalidPayloadSize,
            identifier: 0,
            message: format!("a frame of {frame_len} bytes"),
        });
    }
    let Some(mut items) = buf.get(5..5 + frame_len) else {
        return Ok(None);
    };
    let mut n = Notification {
        command: command::FRAME,
        ..Notification::default()
    };
    let mut malformed = None;
    while let [id, ..] = *items {
        let Some((data, end)) = length_prefixed(items, 1) else {
            malformed = Some("an item runs past the end of its frame".to_owned());
            break;
        };
        items = &items[end..];
        let wrong_size = |what: &str| Some(format!("{what} of {} bytes", data.len()));
        match id {
            item::DEVICE_TOKEN => n.token = Some(data.to_vec()),
            item::PAYLOAD => n.payload = Some(data.to_vec()),
            item::IDENTIFIER => match u32_exactly(data) {
                Some(v) => n.identifier = Some(v),
                None => malformed = wrong_size("an identifier"),
            },
            item::EXPIRATION => match u32_exactly(data) {
                Some(v) => n.expiration = Some(v),
                None => malformed = wrong_size("an expiration date"),
            },
            item::PRIORITY => match data {
                [p] => n.priority = Some(*p),
                _ => malformed = wrong_size("a priority"),
            },
            // An item id Apple did not list: skipped, as a lenient server would.
            _ => {}
        }
        if malformed.is_some() {
            break;
        }
    }
    match malformed {
        Some(message) => Err(Malformed {
            status: Status::ProtocolError,
            identifier: n.identifier.unwrap_or(0),
            message,
        }),
        None => Ok(Some((n, 5 + frame_len))),
    }
}

/// What APNs answers a notification that was read whole: `Ok` when it takes it. Whether
/// a well-sized token belongs to a device (status 8) is for the server to know.
pub fn check(n: &Notification) -> Result<(), Status> {
    match n.token.as_deref() {
        None | Some([]) => return Err(Status::MissingToken),
        Some(t) if t.len() != TOKEN_LEN => return Err(Status::InvalidTokenSize),
        Some(_) => {}
    }
    match n.payload.as_deref() {
        None | Some([]) => return Err(Status::MissingPayload),
        Some(p) if p.len() > MAX_PAYLOAD => return Err(Status::InvalidPayloadSize),
        Some(_) => {}
    }
    match n.priority {
        // Apple lists only 10 and 5; it names no status for another value.
        None | Some(10) | Some(5) => Ok(()),
        Some(_) => Err(Status::Processing),
    }
}

/// A feedback tuple: a device token APNs could not deliver to, and when it found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackTuple {
    /// UNIX epoch seconds.
    pub time: u32,
    pub token: Vec<u8>,
}

/// Appends `tuple` to `out`: time, token length, token.
pub fn write_feedback(tuple: &FeedbackTuple, out: &mut Vec<u8>) {
    out.extend_from_slice(&tuple.time.to_be_bytes());
    out.extend_from_slice(&(tuple.token.len() as u16).to_be_bytes());
    out.extend_from_slice(&tuple.token);
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn u32_exactly(data: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(data.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 32-byte token: 0xa0, 0xa1, ... 0xbf.
    const TOKEN: [u8; 32] = [
        0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae,
        0xaf, 0xb0, 0xb1, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xbb, 0xbc, 0xbd,
        0xbe, 0xbf,
    ];

    /// `parts` joined: the tests write each field as its own literal.
    fn bytes(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn a_command_2_frame_with_every_item() {
        // Items: token 3 + 32, payload 3 + 10, identifier 3 + 4, expiration 3 + 4,
        // priority 3 + 1: 66 bytes.
        let frame = bytes(&[
            &[2],
            &[0, 0, 0, 66],
            &[1, 0, 32],
            &TOKEN,
            &[2, 0, 10],
            b"{\"aps\":{}}",
            &[3, 0, 4, 0x01, 0x02, 0x03, 0x04],
            &[4, 0, 4, 0x65, 0x53, 0xf1, 0x00],
            &[5, 0, 1, 10],
        ]);
        assert_eq!(frame.len(), 5 + 66);
        let (n, used) = decode(&frame).unwrap().unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(
            n,
            Notification {
                command: 2,
                identifier: Some(0x0102_0304),
                token: Some(TOKEN.to_vec()),
                payload: Some(b"{\"aps\":{}}".to_vec()),
                expiration: Some(1_700_000_000),
                priority: Some(10),
            }
        );
        assert_eq!(check(&n), Ok(()));
    }

    #[test]
    fn items_may_come_in_any_order_and_optional_ones_be_left_out() {
        let frame = bytes(&[
            &[2, 0, 0, 0, 50],
            &[3, 0, 4, 0, 0, 0, 7],
            &[2, 0, 2, b'{', b'}'],
            &[1, 0, 32],
            &TOKEN,
            &[9, 0, 0], // an unlisted item: skipped
        ]);
        let (n, used) = decode(&frame).unwrap().unwrap();
        assert_eq!(used, 55);
        assert_eq!(
            (n.identifier, n.expiration, n.priority),
            (Some(7), None, None)
        );
        assert_eq!(n.payload.as_deref(), Some(&b"{}"[..]));
    }

    #[test]
    fn commands_0_and_1() {
        let simple = bytes(&[&[0, 0, 32], &TOKEN, &[0, 2, b'{', b'}']]);
        let (n, used) = decode(&simple).unwrap().unwrap();
        assert_eq!(used, 1 + 2 + 32 + 2 + 2);
        assert_eq!(
            n,
            Notification {
                command: 0,
                token: Some(TOKEN.to_vec()),
                payload: Some(b"{}".to_vec()),
                ..Notification::default()
            }
        );

        let enhanced = bytes(&[
            &[1],
            &[0, 0, 0, 9],             // identifier
            &[0x65, 0x53, 0xf1, 0x00], // expiry: 1700000000
            &[0, 32],
            &TOKEN,
            &[0, 2, b'{', b'}'],
        ]);
        let (n, used) = decode(&enhanced).unwrap().unwrap();
        assert_eq!(used, enhanced.len());
        assert_eq!(
            (n.command, n.identifier, n.expiration, n.priority),
            (1, Some(9), Some(1_700_000_000), None)
        );
        assert_eq!(n.token.as_deref(), Some(&TOKEN[..]));
    }

    #[test]
    fn a_partial_notification_waits_for_the_rest() {
        let stream = bytes(&[
            &[0, 0, 32],
            &TOKEN,
            &[0, 2, b'{', b'}'],
            &[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 32],
            &TOKEN,
            &[0, 2, b'{', b'}'],
            &[2, 0, 0, 0, 40, 1, 0, 32],
            &TOKEN,
            &[2, 0, 2, b'{', b'}'],
        ]);
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
    fn what_apns_refuses() {
        let good = Notification {
            command: 2,
            identifier: Some(1),
            token: Some(TOKEN.to_vec()),
            payload: Some(b"{}".to_vec()),
            expiration: None,
            priority: Some(5),
        };
        assert_eq!(check(&good), Ok(()));
        let with = |f: &dyn Fn(&mut Notification)| {
            let mut n = good.clone();
            f(&mut n);
            check(&n)
        };
        assert_eq!(with(&|n| n.token = None), Err(Status::MissingToken));
        assert_eq!(with(&|n| n.token = Some(vec![])), Err(Status::MissingToken));
        assert_eq!(
            with(&|n| n.token = Some(vec![0; 31])),
            Err(Status::InvalidTokenSize)
        );
        assert_eq!(with(&|n| n.payload = None), Err(Status::MissingPayload));
        assert_eq!(
            with(&|n| n.payload = Some(vec![])),
            Err(Status::MissingPayload)
        );
        assert_eq!(with(&|n| n.payload = Some(vec![b' '; 2048])), Ok(()));
        assert_eq!(
            with(&|n| n.payload = Some(vec![b' '; 2049])),
            Err(Status::InvalidPayloadSize)
        );
        assert_eq!(with(&|n| n.priority = Some(10)), Ok(()));
        assert_eq!(with(&|n| n.priority = Some(7)), Err(Status::Processing));
    }

    #[test]
    fn malformed_input() {
        let e = decode(&[9, 1, 2]).unwrap_err();
        assert_eq!((e.status, e.identifier), (Status::Unknown, 0));

        // A frame length of 65537.
        let e = decode(&[2, 0, 1, 0, 1]).unwrap_err();
        assert_eq!(e.status, Status::InvalidPayloadSize);

        // The identifier item, then a token item claiming more than the frame holds.
        let e = decode(&[2, 0, 0, 0, 9, 3, 0, 4, 0, 0, 0, 42, 1, 0]).unwrap_err();
        assert_eq!((e.status, e.identifier), (Status::ProtocolError, 42));

        // A 2-byte priority.
        let e = decode(&[2, 0, 0, 0, 5, 5, 0, 2, 10, 10]).unwrap_err();
        assert_eq!((e.status, e.identifier), (Status::ProtocolError, 0));
    }

    #[test]
    fn error_responses() {
        assert_eq!(
            error_response(Status::InvalidToken, 0x0a0b_0c0d),
            [8, 8, 0x0a, 0x0b, 0x0c, 0x0d]
        );
        assert_eq!(error_response(Status::Shutdown, 42), [8, 10, 0, 0, 0, 42]);
        assert_eq!(error_response(Status::Unknown, 0), [8, 255, 0, 0, 0, 0]);
        for code in 0..=255u8 {
            assert_eq!(Status::from_code(code).code(), code);
        }
        assert_eq!(Status::Shutdown.to_string(), "shutdown (10)");
    }

    #[test]
    fn feedback_tuples() {
        let mut out = vec![0xee]; // appends
        write_feedback(
            &FeedbackTuple {
                time: 1_700_000_000,
                token: TOKEN.to_vec(),
            },
            &mut out,
        );
        assert_eq!(
            out,
            bytes(&[&[0xee, 0x65, 0x53, 0xf1, 0x00, 0, 32], &TOKEN])
        );
    }
}
