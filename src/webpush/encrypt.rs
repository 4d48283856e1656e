//! A payload encrypted for the browser: RFC 8291's `aes128gcm` Web Push encryption, in
//! RFC 8188's content coding. Each message gets a fresh ephemeral P-256 key pair (the
//! application server's, "AS") and a fresh 16-byte salt. With the browser's key ("UA",
//! `keys.p256dh`) and secret (`keys.auth`):
//!
//! - `ecdh_secret = ECDH(as_private, ua_public)`;
//! - `IKM = HKDF-SHA-256(salt = auth, ikm = ecdh_secret,
//!   info = "WebPush: info" 0x00 ua_public as_public, 32 bytes)`;
//! - `CEK = HKDF(salt, IKM, "Content-Encoding: aes128gcm" 0x00, 16 bytes)`;
//! - `NONCE = HKDF(salt, IKM, "Content-Encoding: nonce" 0x00, 12 bytes)`;
//! - the body: `salt (16) || rs (4, 4096) || idlen (1, 65) || as_public (65)`, then one
//!   record: AES-128-GCM of `plaintext || 0x02` (the last record's delimiter, no
//!   padding), its 16-byte tag at the end.
//!
//! Push services take at most 4096 bytes of encrypted body (RFC 8030, section 7.2, says
//! at least 4096; FCM, Mozilla and Apple take no more), so a payload is at most
//! [`MAX_PLAINTEXT`]: 4096 - 86 (the header) - 16 (the tag) - 1 (the delimiter) = 3993
//! bytes.
//!
//! OpenSSL does every primitive (ECDH, HKDF, AES-GCM, the random salt and key).

use openssl::bn::BigNumContext;
use openssl::derive::Deriver;
use openssl::ec::{EcKey, EcKeyRef, EcPoint, PointConversionForm};
use openssl::error::ErrorStack;
use openssl::md::Md;
use openssl::pkey::{Id, PKey, Private};
use openssl::pkey_ctx::PkeyCtx;
use openssl::symm::{encrypt_aead, Cipher};

use super::subscription::{Subscription, AUTH_LEN, P256DH_LEN};
use crate::openssl_reason::openssl_reason;

/// The largest encrypted body push services take.
pub const MAX_BODY: usize = 4096;
/// The salt's length.
pub const SALT_LEN: usize = 16;
/// The content coding's header: salt, record size, key id length, key id (the AS's
/// public key).
pub const HEADER_LEN: usize = SALT_LEN + 4 + 1 + P256DH_LEN;
/// AES-GCM's tag.
pub const TAG_LEN: usize = 16;
/// The largest payload that fits [`MAX_BODY`] once encrypted: 3993 bytes.
pub const MAX_PLAINTEXT: usize = MAX_BODY - HEADER_LEN - TAG_LEN - 1;
/// The record size written in the header: one record holds the whole message.
pub const RECORD_SIZE: u32 = 4096;

/// The last (and only) record's delimiter (RFC 8188, section 2).
const LAST_RECORD: u8 = 0x02;

/// `Err` naming both numbers when a payload of `len` bytes cannot be sent.
pub fn check_size(len: usize) -> Result<(), String> {
    match len <= MAX_PLAINTEXT {
        true => Ok(()),
        false => Err(format!(
            "the payload is {len} bytes; Web Push carries at most {MAX_PLAINTEXT} \
             ({MAX_BODY} once encrypted)"
        )),
    }
}

/// `plaintext` encrypted for the browser of `sub`, with a fresh key pair and salt: the
/// request's body.
pub fn encrypt(plaintext: &[u8], sub: &Subscription) -> Result<Vec<u8>, String> {
    check_size(plaintext.len())?;
    let failed = |e: ErrorStack| format!("cannot encrypt the payload: {}", openssl_reason(&e));
    let as_key = EcKey::generate(super::p256::group().map_err(failed)?).map_err(failed)?;
    let mut salt = [0; SALT_LEN];
    openssl::rand::rand_bytes(&mut salt).map_err(failed)?;
    encrypt_with(plaintext, sub.p256dh(), sub.auth(), &as_key, &salt)
}

/// [`encrypt`] with the application server's key pair and the salt given: deterministic,
/// for tests.
pub fn encrypt_with(
    plaintext: &[u8],
    ua_public: &[u8; P256DH_LEN],
    auth_secret: &[u8; AUTH_LEN],
    as_private: &EcKeyRef<Private>,
    salt: &[u8; SALT_LEN],
) -> Result<Vec<u8>, String> {
    check_size(plaintext.len())?;
    let failed = |e: ErrorStack| format!("cannot encrypt the payload: {}", openssl_reason(&e));
    let keys = Keys::derive(ua_public, auth_secret, as_private, salt).map_err(failed)?;
    let mut record = Vec::with_capacity(plaintext.len() + 1);
    record.extend_from_slice(plaintext);
    record.push(LAST_RECORD);
    let mut tag = [0; TAG_LEN];
    let ciphertext = encrypt_aead(
        Cipher::aes_128_gcm(),
        &keys.cek,
        Some(&keys.nonce),
        &[],
        &record,
        &mut tag,
    )
    .map_err(failed)?;
    let mut body = Vec::with_capacity(HEADER_LEN + ciphertext.len() + TAG_LEN);
    body.extend_from_slice(salt);
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(P256DH_LEN as u8);
    body.extend_from_slice(&keys.as_public);
    body.extend_from_slice(&ciphertext);
    body.extend_from_slice(&tag);
    Ok(body)
}

/// What one message is encrypted with.
struct Keys {
    cek: [u8; 16],
    nonce: [u8; 12],
    as_public: Vec<u8>,
}

impl Keys {
    /// RFC 8291, section 3.4, from the application server's side.
    fn derive(
        ua_public: &[u8; P256DH_LEN],
        auth_secret: &[u8; AUTH_LEN],
        as_private: &EcKeyRef<Private>,
        salt: &[u8; SALT_LEN],
    ) -> Result<Keys, ErrorStack> {
        let group = as_private.group();
        let mut ctx = BigNumContext::new()?;
        let as_public =
            as_private
                .public_key()
                .to_bytes(group, PointConversionForm::UNCOMPRESSED, &mut ctx)?;
        let ua_point = EcPoint::from_bytes(group, ua_public, &mut ctx)?;
        let ua_key = PKey::from_ec_key(EcKey::from_public_key(group, &ua_point)?)?;
        let own = PKey::from_ec_key(as_private.to_owned())?;
        let ecdh_secret = ecdh(&own, &ua_key)?;
        Keys::from_secret(&ecdh_secret, ua_public, &as_public, auth_secret, salt)
    }

    /// The keys from the ECDH secret: the part both sides share (the browser's in tests).
    fn from_secret(
        ecdh_secret: &[u8],
        ua_public: &[u8],
        as_public: &[u8],
        auth_secret: &[u8],
        salt: &[u8],
    ) -> Result<Keys, ErrorStack> {
        let mut key_info = b"WebPush: info\0".to_vec();
        key_info.extend_from_slice(ua_public);
        key_info.extend_from_slice(as_public);
        let mut ikm = [0; 32];
        hkdf(auth_secret, ecdh_secret, &key_info, &mut ikm)?;
        let mut cek = [0; 16];
        hkdf(salt, &ikm, b"Content-Encoding: aes128gcm\0", &mut cek)?;
        let mut nonce = [0; 12];
        hkdf(salt, &ikm, b"Content-Encoding: nonce\0", &mut nonce)?;
        Ok(Keys {
            cek,
            nonce,
            as_public: as_public.to_vec(),
        })
    }
}

/// The shared secret of `own` (private) and `peer` (public): the x coordinate.
fn ecdh(
    own: &PKey<Private>,
    peer: &PKey<impl openssl::pkey::HasPublic>,
) -> Result<Vec<u8>, ErrorStack> {
    let mut deriver = Deriver::new(own)?;
    // Not validated again: the browser's point was checked on the curve when its
    // subscription was read (`Subscription::parse`), and on P-256 (cofactor 1) that is
    // all there is to check. The full check costs a scalar multiplication, as much as
    // the ECDH itself.
    deriver.set_peer_ex(peer, false)?;
    deriver.derive_to_vec()
}

/// HKDF-SHA-256 (RFC 5869), extract then expand, filling `out`.
fn hkdf(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) -> Result<(), ErrorStack> {
    let mut ctx = PkeyCtx::new_id(Id::HKDF)?;
    ctx.derive_init()?;
    ctx.set_hkdf_md(Md::sha256())?;
    ctx.set_hkdf_salt(salt)?;
    ctx.set_hkdf_key(ikm)?;
    ctx.add_hkdf_info(info)?;
    ctx.derive(Some(out))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::webpush::base64url;
    use crate::webpush::subscription::tests::{subscription, AUTH, P256DH};
    use openssl::bn::BigNum;
    use openssl::symm::decrypt_aead;

    /// RFC 8291, Appendix A: the user agent's private key.
    pub(crate) const UA_PRIVATE: &str = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94";
    const AS_PRIVATE: &str = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw";
    const AS_PUBLIC: &str =
        "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8";
    const SALT: &str = "DGv6ra1nlYgDCS1FRnbzlw";
    const PLAINTEXT: &str = "When I grow up, I want to be a watermelon";
    const BODY: &str = "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN";

    /// A P-256 private key from its scalar (base64url), its public key derived.
    fn key(private: &str) -> EcKey<Private> {
        let group = crate::webpush::p256::group().unwrap();
        let d = BigNum::from_slice(&base64url::decode(private).unwrap()).unwrap();
        let mut ctx = BigNumContext::new().unwrap();
        let mut public = EcPoint::new(group).unwrap();
        public.mul_generator2(group, &d, &mut ctx).unwrap();
        EcKey::from_private_components(group, &d, &public).unwrap()
    }

    fn array<const N: usize>(text: &str) -> [u8; N] {
        base64url::decode(text).unwrap().try_into().unwrap()
    }

    /// The browser's side (RFC 8291, section 3.4; RFC 8188, section 2): the plaintext of
    /// a one-record body, or why not.
    pub(crate) fn decrypt(
        body: &[u8],
        ua_private: &EcKeyRef<Private>,
        auth: &[u8],
    ) -> Result<Vec<u8>, String> {
        let group = ua_private.group();
        let mut ctx = BigNumContext::new().unwrap();
        let salt = &body[..SALT_LEN];
        let rs = u32::from_be_bytes(body[16..20].try_into().unwrap());
        let idlen = body[20] as usize;
        assert_eq!((rs, idlen), (RECORD_SIZE, P256DH_LEN));
        let as_public = &body[21..21 + idlen];
        let record = &body[21 + idlen..];
        assert!(record.len() <= rs as usize);
        let peer = EcPoint::from_bytes(group, as_public, &mut ctx).unwrap();
        let peer = PKey::from_ec_key(EcKey::from_public_key(group, &peer).unwrap()).unwrap();
        let own = PKey::from_ec_key(ua_private.to_owned()).unwrap();
        let secret = ecdh(&own, &peer).unwrap();
        let ua_public = ua_private
            .public_key()
            .to_bytes(group, PointConversionForm::UNCOMPRESSED, &mut ctx)
            .unwrap();
        let keys = Keys::from_secret(&secret, &ua_public, as_public, auth, salt).unwrap();
        let (ciphertext, tag) = record.split_at(record.len() - TAG_LEN);
        let mut plain = decrypt_aead(
            Cipher::aes_128_gcm(),
            &keys.cek,
            Some(&keys.nonce),
            &[],
            ciphertext,
            tag,
        )
        .map_err(|e| openssl_reason(&e))?;
        match plain.pop() {
            Some(LAST_RECORD) => Ok(plain),
            other => Err(format!("delimiter {other:?}")),
        }
    }

    #[test]
    fn rfc_8291_appendix_a_is_reproduced() {
        let as_key = key(AS_PRIVATE);
        let body = encrypt_with(
            PLAINTEXT.as_bytes(),
            &array(P256DH),
            &array(AUTH),
            &as_key,
            &array(SALT),
        )
        .unwrap();
        assert_eq!(base64url::encode(&body), BODY);
        assert_eq!(base64url::encode(&body[21..86]), AS_PUBLIC);
        assert_eq!(
            decrypt(&body, &key(UA_PRIVATE), &array::<16>(AUTH)).unwrap(),
            PLAINTEXT.as_bytes()
        );
    }

    #[test]
    fn every_message_has_its_own_key_and_salt_and_the_browser_reads_it() {
        let sub = subscription("https://push.example/x");
        let ua = key(UA_PRIVATE);
        let first = encrypt(b"{\"n\": 1}", &sub).unwrap();
        let second = encrypt(b"{\"n\": 1}", &sub).unwrap();
        assert_ne!(first[..HEADER_LEN], second[..HEADER_LEN]);
        for body in [&first, &second] {
            assert_eq!(body.len(), 8 + HEADER_LEN + 1 + TAG_LEN);
            assert_eq!(decrypt(body, &ua, sub.auth()).unwrap(), b"{\"n\": 1}");
        }
        let mut tampered = first.clone();
        tampered[HEADER_LEN] ^= 1;
        assert!(decrypt(&tampered, &ua, sub.auth()).is_err());
        assert!(
            decrypt(&first, &ua, &[0; 16]).is_err(),
            "another auth secret"
        );
    }

    #[test]
    fn the_largest_payload_fills_4096_bytes_and_one_more_is_refused() {
        assert_eq!(MAX_PLAINTEXT, 3993);
        let sub = subscription("https://push.example/x");
        let largest = vec![b'a'; MAX_PLAINTEXT];
        let body = encrypt(&largest, &sub).unwrap();
        assert_eq!(body.len(), MAX_BODY);
        assert_eq!(
            decrypt(&body, &key(UA_PRIVATE), sub.auth()).unwrap(),
            largest
        );
        let e = encrypt(&vec![b'a'; MAX_PLAINTEXT + 1], &sub).unwrap_err();
        assert_eq!(
            e,
            "the payload is 3994 bytes; Web Push carries at most 3993 (4096 once encrypted)"
        );
        assert_eq!(encrypt(b"", &sub).unwrap().len(), HEADER_LEN + 1 + TAG_LEN);
    }
}
