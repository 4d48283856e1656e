//! The binary protocol's bytes, and nothing else: notification frames (commands 0, 1 and
//! 2), the error-response packet and feedback tuples, big-endian as Apple's Binary
//! Provider API specifies them, as the client needs them: it writes command 2 and reads
//! error packets and feedback tuples (commands 0 and 1 are listed for reference: the
//! emulator, which reads all three, has its own codec). No I/O.
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
/// Command bytes.
pub mod command {
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

fn sized(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let len = usize::from(be16(buf.get(at..at + 2)?));
    let data = buf.get(at + 2..at + 2 + len)?;
    Some((data, at + 2 + len))
}

/// One entry of the feedback service: a token APNs could not deliver to, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackTuple {
    /// Epoch seconds: when APNs found the app gone from the device.
    pub timestamp: u32,
    pub token: Vec<u8>,
}

/// What the feedback service writes (for the client's tests).
#[cfg(test)]
pub fn encode_feedback(t: &FeedbackTuple, out: &mut Vec<u8>) {
    out.extend_from_slice(&t.timestamp.to_be_bytes());
    out.extend_from_slice(&(t.token.len() as u16).to_be_bytes());
    out.extend_from_slice(&t.token);
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
        // Token, payload and identifier items only.
        assert_eq!(out.len(), 5 + 35 + 5 + 7);
        assert_eq!(&out[..5], &[2, 0, 0, 0, 47]);
        assert_eq!(&out[45..], &[3, 0, 4, 0, 0, 0, 7]);
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
