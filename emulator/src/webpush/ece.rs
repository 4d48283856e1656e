//! Opening a push message as the browser does: RFC 8291 (Message Encryption for Web
//! Push) over RFC 8188's `aes128gcm` content coding, written from the RFCs' text.
//!
//! The body is a header, `salt (16) | rs (4, big-endian) | idlen (1) | keyid (idlen)`,
//! then records of at most `rs` bytes, each AES-128-GCM ciphertext with its 16-byte tag.
//! Web Push puts the application server's ephemeral public key (65 bytes, uncompressed
//! P-256) in `keyid` and sends a single record (RFC 8291 §4). Keys (RFC 8291 §3.4, RFC
//! 8188 §2.2, §2.3):
//!
//! ```text
//! ecdh_secret = ECDH(ua_private, as_public)
//! IKM   = HKDF(salt = auth_secret, ikm = ecdh_secret,
//!              info = "WebPush: info" 0x00 ua_public as_public, 32)
//! CEK   = HKDF(salt, IKM, "Content-Encoding: aes128gcm" 0x00, 16)
//! NONCE = HKDF(salt, IKM, "Content-Encoding: nonce" 0x00, 12)
//! ```
//!
//! The record's plaintext is the message, the last-record delimiter `0x02`, then zero or
//! more `0x00` of padding. Every primitive is openssl's.

use std::fmt;

use openssl::bn::BigNumContext;
use openssl::derive::Deriver;
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::error::ErrorStack;
use openssl::md::Md;
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, PKeyRef, Private, Public};
use openssl::pkey_ctx::PkeyCtx;
use openssl::symm::{self, Cipher};

/// An uncompressed P-256 point: `0x04 | x (32) | y (32)`.
pub const PUBLIC_KEY_LEN: usize = 65;
pub const AUTH_SECRET_LEN: usize = 16;
const SALT_LEN: usize = 16;
/// salt, rs, idlen.
const FIXED_HEADER_LEN: usize = SALT_LEN + 4 + 1;
const TAG_LEN: usize = 16;
/// RFC 8188 §2: a smaller `rs` leaves no room for a delimiter and the tag.
const MIN_RECORD_SIZE: u32 = 18;
const LAST_RECORD: u8 = 0x02;
const NOT_LAST_RECORD: u8 = 0x01;

/// Why a body could not be opened; the text is what the 400 answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EceError {
    /// Shorter than the fixed header (salt, rs, idlen).
    TruncatedHeader(usize),
    /// `rs` below 18.
    RecordSizeTooSmall(u32),
    /// `keyid` is not a 65-byte key (its length given).
    KeyIdLength(usize),
    /// `keyid` is 65 bytes but not a point of P-256.
    KeyIdNotAPoint,
    /// The header promises more `keyid` than the body has.
    TruncatedKeyId,
    /// No record after the header.
    NoRecord,
    /// More than one record (the body's record bytes, and `rs`).
    MoreThanOneRecord { record_bytes: usize, rs: u32 },
    /// A record too short to hold a delimiter and the tag.
    RecordTooShort(usize),
    /// The GCM tag did not verify: wrong keys, or a damaged body.
    Authentication,
    /// The plaintext is all zeros: no delimiter.
    NoDelimiter,
    /// The delimiter is `0x01` (another record should follow) in the only record.
    NotLastRecord,
    /// The last non-zero byte is neither delimiter.
    BadDelimiter(u8),
    /// openssl failed (a key it would not take, say).
    Crypto(String),
}

impl fmt::Display for EceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EceError::TruncatedHeader(n) => write!(
                f,
                "the body ({n} bytes) is shorter than the aes128gcm header (21 bytes)"
            ),
            EceError::RecordSizeTooSmall(rs) => {
                write!(
                    f,
                    "the aes128gcm record size rs is {rs}; it must be at least 18"
                )
            }
            EceError::KeyIdLength(n) => write!(
                f,
                "the aes128gcm keyid is {n} bytes; Web Push puts the application server's \
                 65-byte public key there"
            ),
            EceError::KeyIdNotAPoint => {
                f.write_str("the aes128gcm keyid is not an uncompressed P-256 public key")
            }
            EceError::TruncatedKeyId => f.write_str("the body ends inside the aes128gcm keyid"),
            EceError::NoRecord => f.write_str("the body has no record after its header"),
            EceError::MoreThanOneRecord { record_bytes, rs } => write!(
                f,
                "the body has {record_bytes} bytes of records with rs {rs}: Web Push messages \
                 are a single record"
            ),
            EceError::RecordTooShort(n) => write!(
                f,
                "the record is {n} bytes, too short for a delimiter and the 16-byte tag"
            ),
            EceError::Authentication => f.write_str(
                "the record does not decrypt (AES-GCM tag mismatch): wrong keys or auth secret",
            ),
            EceError::NoDelimiter => f.write_str("the plaintext has no padding delimiter"),
            EceError::NotLastRecord => f.write_str(
                "the only record ends with delimiter 0x01 (not the last record); it must be 0x02",
            ),
            EceError::BadDelimiter(b) => write!(
                f,
                "the record's padding delimiter is 0x{b:02x}; the last record's is 0x02"
            ),
            EceError::Crypto(e) => write!(f, "cannot decrypt: {e}"),
        }
    }
}

impl std::error::Error for EceError {}

impl From<ErrorStack> for EceError {
    fn from(e: ErrorStack) -> Self {
        EceError::Crypto(e.to_string())
    }
}

/// The `aes128gcm` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header<'a> {
    pub salt: &'a [u8],
    pub rs: u32,
    pub key_id: &'a [u8],
}

/// Splits a body into its header and the record bytes after it.
pub fn parse_header(body: &[u8]) -> Result<(Header<'_>, &[u8]), EceError> {
    if body.len() < FIXED_HEADER_LEN {
        return Err(EceError::TruncatedHeader(body.len()));
    }
    let salt = &body[..SALT_LEN];
    let rs = u32::from_be_bytes(body[SALT_LEN..SALT_LEN + 4].try_into().expect("4 bytes"));
    let id_len = usize::from(body[SALT_LEN + 4]);
    let rest = &body[FIXED_HEADER_LEN..];
    if rest.len() < id_len {
        return Err(EceError::TruncatedKeyId);
    }
    let (key_id, records) = rest.split_at(id_len);
    Ok((Header { salt, rs, key_id }, records))
}

/// What a body held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub plaintext: Vec<u8>,
    /// The application server's ephemeral public key (the header's `keyid`).
    pub sender_public_key: Vec<u8>,
    pub rs: u32,
    /// Zero bytes after the delimiter.
    pub padding: usize,
}

/// Opens `body` with the subscription's private key (`ua_private`), its public key as
/// given to the application server (`ua_public`, 65 bytes) and its auth secret.
pub fn decrypt(
    body: &[u8],
    ua_private: &PKeyRef<Private>,
    ua_public: &[u8],
    auth_secret: &[u8],
) -> Result<Opened, EceError> {
    let (header, records) = parse_header(body)?;
    if header.rs < MIN_RECORD_SIZE {
        return Err(EceError::RecordSizeTooSmall(header.rs));
    }
    if header.key_id.len() != PUBLIC_KEY_LEN {
        return Err(EceError::KeyIdLength(header.key_id.len()));
    }
    let as_public = public_key(header.key_id).map_err(|_| EceError::KeyIdNotAPoint)?;
    if records.is_empty() {
        return Err(EceError::NoRecord);
    }
    // RFC 8188 §2: records are rs bytes, the last one possibly shorter; a single record
    // is therefore at most rs.
    if records.len() > header.rs as usize {
        return Err(EceError::MoreThanOneRecord {
            record_bytes: records.len(),
            rs: header.rs,
        });
    }
    if records.len() < TAG_LEN + 1 {
        return Err(EceError::RecordTooShort(records.len()));
    }
    let ecdh_secret = ecdh(ua_private, &as_public)?;
    let ikm = webpush_ikm(&ecdh_secret, auth_secret, ua_public, header.key_id)?;
    let (cek, nonce) = content_keys(header.salt, &ikm)?;
    // A single record: sequence number 0, so the nonce is NONCE itself.
    let (ciphertext, tag) = records.split_at(records.len() - TAG_LEN);
    let padded = symm::decrypt_aead(
        Cipher::aes_128_gcm(),
        &cek,
        Some(&nonce),
        &[],
        ciphertext,
        tag,
    )
    .map_err(|_| EceError::Authentication)?;
    let (plaintext, padding) = unpad_last(&padded)?;
    Ok(Opened {
        plaintext: plaintext.to_vec(),
        sender_public_key: header.key_id.to_vec(),
        rs: header.rs,
        padding,
    })
}

/// The last record's plaintext without its delimiter and padding, and the padding's
/// length (RFC 8188 §2: zeros after the delimiter, which is `0x02` in the last record).
pub fn unpad_last(padded: &[u8]) -> Result<(&[u8], usize), EceError> {
    let Some(at) = padded.iter().rposition(|&b| b != 0) else {
        return Err(EceError::NoDelimiter);
    };
    match padded[at] {
        LAST_RECORD => Ok((&padded[..at], padded.len() - at - 1)),
        NOT_LAST_RECORD => Err(EceError::NotLastRecord),
        other => Err(EceError::BadDelimiter(other)),
    }
}

/// RFC 8291 §3.4's IKM: HKDF-SHA-256 with the auth secret as salt over the ECDH secret,
/// info `"WebPush: info" 0x00 ua_public as_public`, 32 bytes.
pub fn webpush_ikm(
    ecdh_secret: &[u8],
    auth_secret: &[u8],
    ua_public: &[u8],
    as_public: &[u8],
) -> Result<Vec<u8>, ErrorStack> {
    let info = [b"WebPush: info\0".as_slice(), ua_public, as_public].concat();
    hkdf(auth_secret, ecdh_secret, &info, 32)
}

/// RFC 8188 §2.2 and §2.3: the content-encryption key (16 bytes) and nonce (12 bytes).
pub fn content_keys(salt: &[u8], ikm: &[u8]) -> Result<(Vec<u8>, Vec<u8>), ErrorStack> {
    let cek = hkdf(salt, ikm, b"Content-Encoding: aes128gcm\0", 16)?;
    let nonce = hkdf(salt, ikm, b"Content-Encoding: nonce\0", 12)?;
    Ok((cek, nonce))
}

/// HKDF-SHA-256 (RFC 5869), extract then expand, by openssl.
pub fn hkdf(salt: &[u8], ikm: &[u8], info: &[u8], len: usize) -> Result<Vec<u8>, ErrorStack> {
    let mut ctx = PkeyCtx::new_id(Id::HKDF)?;
    ctx.derive_init()?;
    ctx.set_hkdf_md(Md::sha256())?;
    ctx.set_hkdf_salt(salt)?;
    ctx.set_hkdf_key(ikm)?;
    ctx.add_hkdf_info(info)?;
    let mut out = vec![0; len];
    ctx.derive(Some(&mut out))?;
    Ok(out)
}

/// The shared secret of ECDH between `private` and `public` (the x coordinate, 32 bytes).
pub fn ecdh(private: &PKeyRef<Private>, public: &PKeyRef<Public>) -> Result<Vec<u8>, ErrorStack> {
    let mut deriver = Deriver::new(private)?;
    // Checked when it was read ([`public_key`]); checking again costs a scalar
    // multiplication per message.
    deriver.set_peer_ex(public, false)?;
    deriver.derive_to_vec()
}

/// A P-256 public key from its uncompressed encoding (65 bytes, `0x04 | x | y`).
pub fn public_key(uncompressed: &[u8]) -> Result<PKey<Public>, ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let mut ctx = BigNumContext::new()?;
    if uncompressed.len() != PUBLIC_KEY_LEN || uncompressed[0] != 0x04 {
        // Compressed points and other lengths are not what Web Push sends.
        return Err(ErrorStack::get());
    }
    // Decoding checks that the point is on the curve. P-256's cofactor is 1, so that is
    // the whole of a public key's validation (NIST SP 800-56A's partial validation):
    // OpenSSL's full check would add a scalar multiplication and find nothing more.
    let point = EcPoint::from_bytes(&group, uncompressed, &mut ctx)?;
    PKey::from_ec_key(EcKey::from_public_key(&group, &point)?)
}

/// The uncompressed encoding (65 bytes) of a P-256 key's public half.
pub fn public_bytes<T: openssl::pkey::HasPublic>(key: &PKeyRef<T>) -> Result<Vec<u8>, ErrorStack> {
    let ec = key.ec_key()?;
    let mut ctx = BigNumContext::new()?;
    ec.public_key().to_bytes(
        ec.group(),
        openssl::ec::PointConversionForm::UNCOMPRESSED,
        &mut ctx,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use openssl::bn::BigNum;

    fn b64(text: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(text).unwrap()
    }

    /// RFC 8291 §5 and Appendix A: the example's values.
    const PLAINTEXT: &str = "When I grow up, I want to be a watermelon";
    const UA_PRIVATE: &str = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94";
    const UA_PUBLIC: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const AS_PUBLIC: &str =
        "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8";
    const AS_PRIVATE: &str = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw";
    const AUTH_SECRET: &str = "BTBZMqHH6r4Tts7J_aSIgg";
    const SALT: &str = "DGv6ra1nlYgDCS1FRnbzlw";
    const BODY: &str = "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27ml\
                        mlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPT\
                        pK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN";

    /// A P-256 private key from its scalar and public point.
    pub(crate) fn private_key(d: &[u8], public: &[u8]) -> PKey<Private> {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let mut ctx = BigNumContext::new().unwrap();
        let point = EcPoint::from_bytes(&group, public, &mut ctx).unwrap();
        let key = EcKey::from_private_components(&group, &BigNum::from_slice(d).unwrap(), &point)
            .unwrap();
        key.check_key().unwrap();
        PKey::from_ec_key(key).unwrap()
    }

    fn ua() -> PKey<Private> {
        private_key(&b64(UA_PRIVATE), &b64(UA_PUBLIC))
    }

    #[test]
    fn the_rfc_8291_example_opens_to_its_plaintext() {
        let opened = decrypt(&b64(BODY), &ua(), &b64(UA_PUBLIC), &b64(AUTH_SECRET)).unwrap();
        assert_eq!(opened.plaintext, PLAINTEXT.as_bytes());
        assert_eq!(opened.sender_public_key, b64(AS_PUBLIC));
        assert_eq!((opened.rs, opened.padding), (4096, 0));
    }

    #[test]
    fn the_rfc_8291_example_header() {
        let body = b64(BODY);
        let (header, records) = parse_header(&body).unwrap();
        assert_eq!(header.salt, b64(SALT));
        assert_eq!(header.rs, 4096);
        assert_eq!(header.key_id, b64(AS_PUBLIC));
        // The plaintext, its delimiter and the tag.
        assert_eq!(records.len(), PLAINTEXT.len() + 1 + 16);
    }

    #[test]
    fn the_rfc_8291_example_intermediate_values() {
        // Appendix A's ecdh_secret, IKM, CEK and NONCE, from both sides of the exchange.
        let as_key = private_key(&b64(AS_PRIVATE), &b64(AS_PUBLIC));
        let from_ua = ecdh(&ua(), &public_key(&b64(AS_PUBLIC)).unwrap()).unwrap();
        let from_as = ecdh(&as_key, &public_key(&b64(UA_PUBLIC)).unwrap()).unwrap();
        assert_eq!(from_ua, from_as);
        assert_eq!(from_ua, b64("kyrL1jIIOHEzg3sM2ZWRHDRB62YACZhhSlknJ672kSs"));
        let ikm = webpush_ikm(
            &from_ua,
            &b64(AUTH_SECRET),
            &b64(UA_PUBLIC),
            &b64(AS_PUBLIC),
        )
        .unwrap();
        assert_eq!(ikm, b64("S4lYMb_L0FxCeq0WhDx813KgSYqU26kOyzWUdsXYyrg"));
        let (cek, nonce) = content_keys(&b64(SALT), &ikm).unwrap();
        assert_eq!(cek, b64("oIhVW04MRdy2XN9CiKLxTg"));
        assert_eq!(nonce, b64("4h_95klXJ5E_qnoN"));
    }

    #[test]
    fn the_rfc_8188_example_keys() {
        // RFC 8188 §3.1: IKM, salt and the CEK and NONCE they give.
        let (cek, nonce) = content_keys(
            &b64("I1BsxtFttlv3u_Oo94xnmw"),
            &b64("yqdlZ-tYemfogSmv7Ws5PQ"),
        )
        .unwrap();
        assert_eq!(cek, b64("_wniytB-ofscZDh4tbSjHw"));
        assert_eq!(nonce, b64("Bcs8gkIRKLI8GeI8"));
    }

    #[test]
    fn damaged_or_misaddressed_bodies_are_refused() {
        let body = b64(BODY);
        let open = |body: &[u8]| decrypt(body, &ua(), &b64(UA_PUBLIC), &b64(AUTH_SECRET));
        let mut flipped = body.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(open(&flipped), Err(EceError::Authentication));
        assert_eq!(
            decrypt(&body, &ua(), &b64(UA_PUBLIC), &[0; 16]),
            Err(EceError::Authentication)
        );
        assert_eq!(open(&body[..10]), Err(EceError::TruncatedHeader(10)));
        assert_eq!(open(&body[..50]), Err(EceError::TruncatedKeyId));
        assert_eq!(open(&body[..86]), Err(EceError::NoRecord));
        assert_eq!(open(&body[..96]), Err(EceError::RecordTooShort(10)));
        let mut small_rs = body.clone();
        small_rs[16..20].copy_from_slice(&17u32.to_be_bytes());
        assert_eq!(open(&small_rs), Err(EceError::RecordSizeTooSmall(17)));
        let mut two_records = body.clone();
        two_records[16..20].copy_from_slice(&40u32.to_be_bytes());
        assert_eq!(
            open(&two_records),
            Err(EceError::MoreThanOneRecord {
                record_bytes: 58,
                rs: 40
            })
        );
        let mut no_key = body[..21].to_vec();
        no_key[20] = 0;
        no_key.extend_from_slice(&body[86..]);
        assert_eq!(open(&no_key), Err(EceError::KeyIdLength(0)));
        let mut not_a_point = body.clone();
        not_a_point[22] ^= 1;
        assert_eq!(open(&not_a_point), Err(EceError::KeyIdNotAPoint));
    }

    #[test]
    fn padding_and_delimiters() {
        assert_eq!(unpad_last(b"hi\x02"), Ok((&b"hi"[..], 0)));
        assert_eq!(unpad_last(b"hi\x02\0\0\0"), Ok((&b"hi"[..], 3)));
        assert_eq!(unpad_last(b"\x02"), Ok((&b""[..], 0)));
        assert_eq!(unpad_last(b"hi\x01\0"), Err(EceError::NotLastRecord));
        assert_eq!(unpad_last(b"hi\0"), Err(EceError::BadDelimiter(b'i')));
        assert_eq!(unpad_last(b"\0\0"), Err(EceError::NoDelimiter));
        assert_eq!(unpad_last(b""), Err(EceError::NoDelimiter));
    }

    #[test]
    fn public_keys_must_be_uncompressed_points() {
        let ua_public = b64(UA_PUBLIC);
        let key = public_key(&ua_public).unwrap();
        assert_eq!(public_bytes(&key).unwrap(), ua_public);
        assert!(public_key(&ua_public[..64]).is_err());
        let mut compressed = ua_public[..33].to_vec();
        compressed[0] = 0x02;
        assert!(public_key(&compressed).is_err());
        let mut off_curve = ua_public.clone();
        off_curve[64] ^= 1;
        assert!(public_key(&off_curve).is_err());
    }
}
